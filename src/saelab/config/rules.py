"""Checking a composed config before anything runs: the ranges the schema declares, the rules that
tie keys together (and to the data sets' published sizes), the paths a run will write, and a
tuning space's every draw. A failure is one ConfigError naming the key, the value and what is
allowed."""

from __future__ import annotations

import copy
import ctypes
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saelab.config import catalogue, costs, kinds
from saelab.config.compose import SCHEMA_KEYS, omegaconf_error
from saelab.config.schema import (
    PRECISIONS,
    Accelerator,
    Activation,
    Logger,
    Noise,
    Pixels,
    ReconLoss,
    Sparsity,
    Strategy,
    bounds_text,
    leaves,
)
from saelab.config.space import extremes, parse
from saelab.errors import ConfigError


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
    raw = Path(cfg.data.root).expanduser() / catalogue.FOLDERS[cfg.data.name] / "raw"
    if not all((raw / stem).is_file() for stem in catalogue.MD5[cfg.data.name]):
        check_folder("data.root", cfg.data.root)


def _rules(cfg: DictConfig, files: bool) -> None:
    data, model, pre = cfg.data, cfg.model, cfg.pretrain
    classes = list(data.classes)
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ConfigError("data.classes", classes, "needs at least 2 distinct classes in 0..9")
    if files and data.mirror and not Path(data.mirror).expanduser().is_dir():
        raise ConfigError("data.mirror", data.mirror, "directory does not exist")
    if data.labels_per_class is not None:
        fewest = min(catalogue.train_counts(data.name, classes, data.val_size, data.train_limit))
        if data.labels_per_class > fewest:
            raise ConfigError("data.labels_per_class", data.labels_per_class, f"must be at most "
                              f"{fewest}, the smallest class of this training split")
    if data.labelled_val_per_class is not None and data.labels_per_class is None:
        raise ConfigError("data.labelled_val_per_class", data.labelled_val_per_class,
                          "needs data.labels_per_class (with every label, validation uses "
                          "the whole validation split)")

    kinds.kind_of(model).check(model)
    n_layers = kinds.depth(model)
    if files:  # a run to start, not one read back
        need, (have, where) = costs.peak_bytes(cfg), costs.memory_limit(cfg)
        if need > have:
            shape = kinds.kind_of(model).keys[0]
            raise ConfigError(shape, list(OmegaConf.select(cfg, shape)), f"needs at least "
                              f"{costs.size(need)} (the "
                              "autoencoders, the deep network with its gradients and Adam's "
                              f"moments, and the images, in float32); {where} "
                              f"{costs.size(have)}")

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
        if len(levels) != n_layers:
            raise ConfigError("pretrain.noise.levels", list(levels),
                              f"must be null or a list of {n_layers} levels, one per layer")
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
        n_test = catalogue.test_size(data.name, classes, data.test_limit)
        if max(samples) >= n_test:
            raise ConfigError("visualize.samples", list(samples),
                              f"indices must be below the test-set size {n_test}")


def check_space(cfg: DictConfig) -> None:
    """Every key of `tune.space` is a key of a tuned stage's group, and every value it can draw
    is one that key allows there."""
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
