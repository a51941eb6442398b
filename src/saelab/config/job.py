"""The config of one job: composed and checked (`compose`), or, with `resume=RUN_DIR`, the config
that run saved, read on the schema (keys moved since it was saved go to their new place), with
the new overrides applied as a fresh run would apply them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saelab.config.compose import compose_raw, config_groups, omegaconf_error
from saelab.config.rules import validate
from saelab.config.schema import Config, followers, leaves, register
from saelab.errors import ConfigError
from saelab.runs.folder import CONFIG, RunFolder

# Keys that moved since a config was saved (old dotted key -> new one), applied when a saved
# config is loaded; keys it lacks take the schema's defaults.
MOVED = {
    "trainer.steps_per_item": "fastpath.steps_per_item",
    "trainer.cuda_graphs": "fastpath.cuda_graphs",
    "trainer.compile": "fastpath.compile",
    "trainer.matmul_precision": "fastpath.matmul_precision",
}


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The validated config of a run with these overrides (as on the command line)."""
    cfg = compose_raw(list(overrides))
    validate(cfg)
    return cfg


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
