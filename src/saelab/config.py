"""Composing a config and checking it: the ranges declared in the schema, the rules that tie keys
together, configs saved by earlier versions, and the config of a run being resumed.

Everything here runs before any heavy import, so that bad input fails at once with one line:
`ConfigError(key, value, allowed)`, printed as `saelab: error: key=value: allowed` (exit 2).
"""

from __future__ import annotations

import copy
import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from saelab import datasets
from saelab.errors import ConfigError
from saelab.runfolder import CONFIG, RunFolder
from saelab.schema import (
    PRECISIONS,
    Accelerator,
    Activation,
    Config,
    Logger,
    Noise,
    Pixels,
    ReconLoss,
    Sparsity,
    Strategy,
    bounds_text,
    followers,
    leaves,
    register,
)

CONFIG_MODULE = "saelab.conf"
SCHEMA_KEYS = frozenset(k.path for k in leaves())
# Keys that moved since a config was saved (old dotted key -> new one), applied when a saved
# config is loaded; keys it lacks take the schema's defaults.
MOVED = {
    "trainer.steps_per_item": "fastpath.steps_per_item",
    "trainer.cuda_graphs": "fastpath.cuda_graphs",
    "trainer.compile": "fastpath.compile",
    "trainer.matmul_precision": "fastpath.matmul_precision",
}


# ---------------------------------------------------------------------------------------------
# Composition


def config_groups() -> dict[str, list[str]]:
    """The config groups and their options (`group=option`), listed from the files in conf/
    (Hydra's own `hydra/` aside)."""
    conf = files(CONFIG_MODULE)
    groups = {d.name: sorted(p.name.removesuffix(".yaml") for p in d.iterdir()
                             if p.name.endswith(".yaml"))
              for d in conf.iterdir() if d.is_dir() and d.name != "hydra"}
    return {name: options for name, options in sorted(groups.items()) if options}


@contextmanager
def hydra_compose() -> Iterator:
    """Hydra's Compose API on saelab's configs, with the schema registered."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose beside it
        yield compose
        return
    with initialize_config_module(CONFIG_MODULE):
        yield compose


def compose_raw(overrides: list[str], hydra: bool = False) -> DictConfig:
    """The composed config (with Hydra's own node if `hydra`), any Hydra or type error turned into
    a ConfigError naming the key."""
    with hydra_compose() as compose:
        try:
            cfg = compose("config", overrides=list(overrides), return_hydra_config=hydra)
        except Exception as exc:  # noqa: BLE001 - Hydra's and OmegaConf's errors, made one line
            raise composition_error(exc, overrides) from None
    check_keys(cfg)
    return cfg


def check_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Every key of `cfg` is a key of the schema: `+key=value` (which Hydra adds past the schema's
    type checks) cannot add one that saelab would ignore and then refuse to read back."""
    known = SCHEMA_KEYS
    for name in cfg:
        path = f"{prefix}{name}"
        if path in known or path == "hydra":
            continue
        node = cfg._get_node(name)
        if isinstance(node, DictConfig) and any(k.startswith(f"{path}.") for k in known):
            check_keys(node, f"{path}.")
            continue
        raise no_such_key(path, OmegaConf.select(cfg, str(name),
                                                 throw_on_resolution_failure=False),
                          "; `+` adds none to the schema")


def without_hydra(composed: DictConfig) -> tuple[DictConfig, DictConfig]:
    """A config composed with Hydra's node, split: the job's config and Hydra's node."""
    with open_dict(composed):
        hydra = composed.pop("hydra")
    return composed, hydra


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The validated config of a run with these overrides (as on the command line)."""
    cfg = compose_raw(list(overrides))
    validate(cfg)
    return cfg


def composition_error(exc: Exception, overrides: list[str]) -> ConfigError:
    """One line from Hydra's composition errors: unknown key or preset, wrong type, bad value."""
    from hydra.errors import MissingConfigException

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides
                 if "=" in o}
        return omegaconf_error(cause, given.get(cause.full_key))
    text = str(exc)
    if isinstance(exc, MissingConfigException) or "Could not find" in text:
        return missing_option(text, overrides)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ConfigError("overrides", " ".join(overrides), first)


def omegaconf_error(exc: OmegaConfBaseException, given: str | None = None) -> ConfigError:
    """A type or key error of OmegaConf on the schema, as key, value (`given` on the command line,
    if known) and what is allowed."""
    key = exc.full_key or "config"
    message = str(exc).splitlines()[0]
    value = given if given is not None else getattr(exc, "value", None)
    if "not in" in message or "Could not override" in message or "not found" in message:
        return no_such_key(key, value)
    if "expected one of" in message:
        return ConfigError(key, value, "allowed: " + message.split("expected one of ")[1]
                           .strip("[]").replace("'", ""))
    if "is not a valid bool" in message:
        return ConfigError(key, value, "must be true or false")
    if "is not a ListConfig" in message:
        return ConfigError(key, value, "must be a list, e.g. [1,2]")
    if "could not be converted to" in message:
        kind = message.rsplit(" ", 1)[1].lower()
        kind = {"float": "a number", "integer": "an integer", "boolean": "true or false",
                "string": "a string"}.get(kind, kind)
        return ConfigError(key, value, f"must be {kind}")
    return ConfigError(key, value, message)


def no_such_key(key: str, value: Any, why: str = "") -> ConfigError:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    listing = f"saelab --help {key.split('.')[0]}" if parent else "saelab --help"
    return ConfigError(key, value, f"no such key{f' in {parent}' if parent else ''}{why} (the "
                       f"keys: {listing})")


# Plugins named by a preset or override, and the extra that installs them.
PLUGINS = {"hydra/sweeper/optuna": "sweep", "hydra/launcher/joblib": "sweep",
           "hydra/launcher/submitit_slurm": "slurm", "hydra/launcher/slurm": "slurm"}


def missing_option(text: str, overrides: list[str]) -> ConfigError:
    """An unknown preset (listing the known ones) or a plugin that is not installed (naming the
    extra that installs it)."""
    missing = text.split("Could not find '", 1)[1].split("'", 1)[0] if "Could not find '" in \
        text else ""
    for plugin, extra in PLUGINS.items():
        if missing.startswith(plugin):
            given = next((o for o in overrides if o.split("=")[0].lstrip("+~") in
                          ("hparams_search", "hydra/launcher", "hydra/sweeper")), missing)
            return ConfigError(*given.split("=", 1) if "=" in given else (given, ""),
                               f"needs a plugin that is not installed: pip install -e "
                               f"'.[{extra}]'")
    group, _, option = missing.rpartition("/")
    listed = text.split("Available options", 1)[-1].split("Config search path")[0]
    options = [line.strip() for line in listed.splitlines() if line.startswith("\t")]
    return ConfigError(group or "config", option,
                       f"no such preset; available: {', '.join(options) or 'none'}")


# ---------------------------------------------------------------------------------------------
# Rules


def _bad_bound(value: Any, bounds: dict[str, float]) -> bool:
    checks = {"gt": value > bounds.get("gt", 0), "ge": value >= bounds.get("ge", 0),
              "lt": value < bounds.get("lt", 0), "le": value <= bounds.get("le", 0)}
    return not all(checks[b] for b in bounds)


def check_bounds(cfg: DictConfig) -> None:
    """Every key's range, as declared in the schema (for lists: every element's)."""
    for k in leaves():
        if not k.bounds:
            continue
        value = OmegaConf.select(cfg, k.path, throw_on_missing=True)
        if value is None:
            continue
        values = list(value) if isinstance(value, ListConfig | list) else [value]
        if any(_bad_bound(v, k.bounds) for v in values):
            shown = values if isinstance(value, ListConfig | list) else value
            every = "every element " if isinstance(value, ListConfig | list) else ""
            raise ConfigError(k.path, shown, f"{every}must be {bounds_text(k.bounds, ' and ')}")


def validate(cfg: DictConfig, files: bool = True) -> None:
    """Raise ConfigError naming the first bad key, its value and what is allowed. `cfg` is typed by
    the schema (types and choices already checked); this checks ranges and cross-key rules, and
    with `files` that the paths it names exist (a finished run read back needs no data)."""
    try:
        check_bounds(cfg)
        _rules(cfg, files)
    except OmegaConfBaseException as exc:  # e.g. an interpolation to a missing key
        raise omegaconf_error(exc) from None


def cuda_devices() -> int:
    """CUDA GPUs on this machine, asked of the driver itself (no torch import: the front door
    answers at once)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int()
        ok = driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0
    except (OSError, AttributeError):
        return 0
    return count.value if ok else 0


def check_folder(key: str, path: str | Path) -> None:
    """A folder saelab is to write in exists or can be made (it is made now), and is writable."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, str(path), f"cannot be created ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), "is not writable")


def check_paths(cfg: DictConfig) -> None:
    """The folders a run writes outside its run folder: the shared store, and the data cache
    unless it holds the data set already."""
    if cfg.store:
        check_folder("store", cfg.store)
    raw = Path(cfg.data.root).expanduser() / datasets.FOLDERS[cfg.data.name] / "raw"
    if not all((raw / stem).is_file() for stem in datasets.MD5[cfg.data.name]):
        check_folder("data.root", cfg.data.root)


def _rules(cfg: DictConfig, files: bool) -> None:
    data, model, pre = cfg.data, cfg.model, cfg.pretrain
    classes = list(data.classes)
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ConfigError("data.classes", classes, "needs at least 2 distinct classes in 0..9")
    if files and data.mirror and not Path(data.mirror).expanduser().is_dir():
        raise ConfigError("data.mirror", data.mirror, "directory does not exist")
    if data.labels_per_class is not None:
        fewest = min(datasets.train_counts(data.name, classes, data.val_size, data.train_limit))
        if data.labels_per_class > fewest:
            raise ConfigError("data.labels_per_class", data.labels_per_class, f"must be at most "
                              f"{fewest}, the smallest class of this training split")
    if data.labelled_val_per_class is not None and data.labels_per_class is None:
        raise ConfigError("data.labelled_val_per_class", data.labelled_val_per_class,
                          "needs data.labels_per_class (with every label, validation uses "
                          "the whole validation split)")

    sizes = list(model.sizes)
    if len(sizes) < 2:
        raise ConfigError("model.sizes", sizes, "needs at least 2 sizes (input, one hidden)")
    if sizes[0] != 784:
        raise ConfigError("model.sizes", sizes, "must start at the input size 784 (28x28)")

    if pre.loss == ReconLoss.bce and (model.activation != Activation.sigmoid
                                      or data.pixels != Pixels.zero_one):
        raise ConfigError("pretrain.loss", "bce",
                          "needs model.activation=sigmoid and data.pixels=zero_one")
    fraction = pre.noise.kind != Noise.gaussian  # a fraction of inputs, not a sigma
    if fraction and pre.noise.level > 1:
        raise ConfigError("pretrain.noise.level", pre.noise.level,
                          "must be <= 1 (a fraction of inputs; only gaussian noise takes a "
                          "sigma)")
    levels = pre.noise.levels
    if levels is not None:
        if len(levels) != len(sizes) - 1:
            raise ConfigError("pretrain.noise.levels", list(levels),
                              f"must be null or a list of {len(sizes) - 1} levels, one per layer")
        for i, level in enumerate(levels):
            if fraction and level > 1:
                raise ConfigError(f"pretrain.noise.levels.{i}", level,
                                  "must be <= 1 (a fraction of inputs; only gaussian noise "
                                  "takes a sigma)")
    if pre.sparsity.kind == Sparsity.kl and model.activation == Activation.relu:
        raise ConfigError("pretrain.sparsity.kind", "kl", "needs tanh or sigmoid units")

    trainer = cfg.trainer
    if files and trainer.accelerator in (Accelerator.gpu, Accelerator.cuda) and not cuda_devices():
        raise ConfigError("trainer.accelerator", trainer.accelerator.value, "this machine has no "
                          "CUDA GPU: use trainer=cpu (or accelerator auto)")
    if trainer.precision not in PRECISIONS:
        raise ConfigError("trainer.precision", trainer.precision,
                          f"allowed: {', '.join(PRECISIONS)}")
    if trainer.strategy == Strategy.ddp and cfg.fastpath.steps_per_item != 1:
        raise ConfigError("fastpath.steps_per_item", cfg.fastpath.steps_per_item,
                          "must be 1 with trainer.strategy=ddp (DDP averages the gradients of "
                          "one forward and backward per Lightning step)")
    if trainer.strategy == Strategy.auto and trainer.devices != 1:
        raise ConfigError("trainer.devices", trainer.devices,
                          "more than one device needs trainer.strategy=ddp (use trainer=ddp)")

    if files and cfg.logger.kind == Logger.mlflow and find_spec("mlflow") is None:
        raise ConfigError("logger", "mlflow", "needs MLflow: pip install -e '.[mlflow]'")

    if cfg.tune.trials:
        check_space(cfg)

    samples = cfg.visualize.samples
    if samples is not None:
        if not samples:
            raise ConfigError("visualize.samples", [], "must be null or a non-empty list of "
                              "test-set indices")
        n_test = datasets.test_size(data.name, classes, data.test_limit)
        if max(samples) >= n_test:
            raise ConfigError("visualize.samples", list(samples),
                              f"indices must be below the test-set size {n_test}")


def check_space(cfg: DictConfig) -> None:
    """Every key of `tune.space` is a key of a tuned stage's group, and every value it can draw
    is one that key allows there."""
    from saelab.tune import extremes, parse

    arms = [arm.value for arm in cfg.tune.arms]
    for key, sweep in parse(list(cfg.tune.space)).items():
        owners = [arm for arm in arms if f"{arm}.{key}" in SCHEMA_KEYS]
        if not owners:
            raise ConfigError("tune.space", key, f"no tuned stage ({', '.join(arms)}) has this "
                              "key in its group")
        for value in extremes(sweep):
            trial = copy.deepcopy(cfg)
            for arm in owners:
                try:
                    OmegaConf.update(trial, f"{arm}.{key}", value, merge=False)
                    check_bounds(trial)
                except (ConfigError, OmegaConfBaseException) as exc:
                    reason = str(exc).splitlines()[0]
                    raise ConfigError("tune.space", f"{key}={value}", reason) from None


# ---------------------------------------------------------------------------------------------
# Saved configs and resumption


def select(cfg: DictConfig, path: str) -> Any:
    """The resolved value at a dotted key; list elements as `key.3`."""
    return OmegaConf.select(cfg, path, throw_on_missing=True)


def load_saved(run_dir: str | Path, key: str = "RUN_DIR") -> DictConfig:
    """The config saved in run folder `run_dir` by this or an earlier version, on the schema:
    moved keys go to their new place, missing keys take their defaults. `key` names the setting
    that pointed there."""
    path = Path(run_dir).expanduser() / CONFIG
    if not path.is_file():
        raise ConfigError(key, str(run_dir), f"must be a run folder holding {CONFIG}")
    try:
        saved = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(key, str(path), f"unreadable saved config ({reason})") from None
    if not isinstance(saved, DictConfig):
        raise ConfigError(key, str(path), "unreadable saved config (not a mapping of keys)")
    for old, new in MOVED.items():
        parent, _, leaf = old.rpartition(".")
        node = OmegaConf.select(saved, parent)
        if isinstance(node, DictConfig) and leaf in node:
            OmegaConf.update(saved, new, node.pop(leaf), force_add=True)
    register()
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), saved)
    except OmegaConfBaseException as exc:
        err = omegaconf_error(exc)
        raise ConfigError(key, str(path), f"saved config does not fit the schema: {err}") from None


def update_with_followers(cfg: DictConfig, key: str, value: Any,
                          following: dict[str, list[str]]) -> None:
    """Set `key` in a saved (resolved) config, and with it every key that follows it by default
    (`scratch.lr` follows `finetune.lr`) and still held its value: as a fresh run would."""
    old = OmegaConf.select(cfg, key)
    OmegaConf.update(cfg, key, value, merge=False)
    for follower in following.get(key, []):
        if OmegaConf.select(cfg, follower) == old:
            update_with_followers(cfg, follower, OmegaConf.select(cfg, key), following)


def resumed_config(run_dir: str, overrides: list[str]) -> DictConfig:
    """The config of `resume=RUN_DIR ...`: the run's saved config with the other overrides applied
    (a `group=option` override applies what that preset changes). Checked like any config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = load_saved(run_dir, "resume")
    defaults, groups = None, config_groups()
    for o in OverridesParser.create().parse_overrides(overrides):
        name = o.key_or_group
        if name in ("resume", "overwrite") or (name.startswith("hydra") and name !=
                                                "hydra.run.dir"):
            if name == "overwrite":
                cfg.overwrite = o.value()
            continue
        if name == "hydra.run.dir":
            if Path(o.value()).expanduser().resolve() != Path(run_dir).expanduser().resolve():
                raise ConfigError("hydra.run.dir", o.value(),
                                  f"a resumed run stays in its folder ({run_dir})")
            continue
        if o.is_sweep_override() or o.is_add() or o.is_delete():
            raise ConfigError(name, o.input_line, "with resume, overrides are key=value or "
                              "group=option")
        try:
            if name in groups:
                defaults = compose_raw([]) if defaults is None else defaults
                changed = compose_raw([o.input_line])
                for k in leaves():
                    if select(changed, k.path) != select(defaults, k.path):
                        OmegaConf.update(cfg, k.path, OmegaConf.select(changed, k.path))
            else:
                update_with_followers(cfg, name, o.value(), followers())
        except OmegaConfBaseException as exc:
            raise omegaconf_error(exc) from None
    cfg.resume = run_dir
    validate(cfg)
    return cfg


def job_config(overrides: list[str], composed: DictConfig | None = None
               ) -> tuple[DictConfig, list[str]]:
    """The checked config of one run and the overrides its folder records. With `resume=RUN_DIR`:
    that run's saved config with the other overrides applied, and its saved overrides followed by
    the new ones. `composed`: the config Hydra already composed from `overrides`."""
    cfg = composed if composed is not None else compose_raw(overrides)
    if cfg.resume is None:
        validate(cfg)
        return cfg, list(overrides)
    previous = RunFolder(Path(cfg.resume).expanduser(), writer=False).read_overrides()
    new = [o for o in overrides if o.split("=", 1)[0] != "resume"]
    return resumed_config(cfg.resume, overrides), [*previous, *new]
