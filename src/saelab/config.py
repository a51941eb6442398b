"""Check a composed config before any training, so bad input fails fast with one clear line."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from saelab.autoencoder import ACTIVATIONS
from saelab.data import DATASETS, PIXEL_SCALES
from saelab.errors import ConfigError

STAGES = ("baseline", "pretrain", "probe", "finetune")
OPTIMIZERS = ("sgd", "adam", "adamw")
# torch.set_float32_matmul_precision: full float32, TF32, bfloat16 (GPU fast path only).
MATMUL_PRECISIONS = ("highest", "high", "medium")


def _number(cfg: DictConfig, key: str, path: str, low: float, strict: bool = True,
            integer: bool = False, high: float | None = None) -> None:
    value = cfg.get(key)
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if ok:
        ok = value > low if strict else value >= low
        ok = ok and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
        raise ConfigError(f"{path}.{key}", value, f"must be {kind} {bound}")


def _choice(cfg: DictConfig, key: str, path: str, allowed) -> None:
    if cfg.get(key) not in allowed:
        raise ConfigError(f"{path}.{key}", cfg.get(key), f"allowed: {', '.join(allowed)}")


def _fast_path(trainer: DictConfig) -> None:
    """The GPU fast-path keys; configs saved before they existed lack them and keep defaults."""
    for key in ("cuda_graphs", "compile"):
        if not isinstance(trainer.get(key, False), bool):
            raise ConfigError(f"trainer.{key}", trainer.get(key), "must be true or false")
    precision = trainer.get("matmul_precision", "highest")
    if precision not in MATMUL_PRECISIONS:
        raise ConfigError("trainer.matmul_precision", precision,
                          f"allowed: {', '.join(MATMUL_PRECISIONS)}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key, its value and what is allowed."""
    data = cfg.data
    _choice(data, "name", "data", list(DATASETS))
    _choice(data, "pixels", "data", list(PIXEL_SCALES))
    classes = list(data.classes) if not isinstance(data.classes, int | str) else None
    if classes is None or not all(isinstance(c, int) and 0 <= c <= 9 for c in classes):
        raise ConfigError("data.classes", classes or data.classes,
                          "must be a list of class indices in 0..9")
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ConfigError("data.classes", classes, "needs at least 2 distinct classes")
    _number(data, "val_size", "data", 0, strict=False, integer=True)
    _number(data, "batch_size", "data", 0, integer=True)
    for key in ("train_limit", "test_limit"):
        if data.get(key) is not None:
            _number(data, key, "data", 0, integer=True)
    if data.mirror and not Path(data.mirror).expanduser().is_dir():
        raise ConfigError("data.mirror", data.mirror, "directory does not exist")

    sizes = cfg.model.sizes
    if isinstance(sizes, int | str) or len(sizes) < 2:
        raise ConfigError("model.sizes", sizes, "needs at least 2 sizes (input, one hidden)")
    if not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ConfigError("model.sizes", list(sizes), "sizes must be positive integers")
    if sizes[0] != 784:
        raise ConfigError("model.sizes", list(sizes), "must start at the input size 784 (28x28)")
    _choice(cfg.model, "activation", "model", list(ACTIVATIONS))

    for name in STAGES:
        stage = cfg[name]
        _choice(stage, "optimizer", name, OPTIMIZERS)
        _number(stage, "lr", name, 0)
        _number(stage, "batch_size", name, 0, integer=True)
        _number(stage, "epochs", name, 0, strict=False, integer=True)
        _number(stage, "momentum", name, 0, strict=False)
        _number(stage, "weight_decay", name, 0, strict=False)
        _choice(stage, "schedule", name, ("none", "cosine"))
        for key in ("patience", "steps_per_epoch"):
            if stage.get(key) is not None:
                _number(stage, key, name, 0, integer=True)
    _number(cfg.finetune, "encoder_lr_scale", "finetune", 0, strict=False)

    pre = cfg.pretrain
    _choice(pre, "codes", "pretrain", ("activation", "pre_activation"))
    _choice(pre, "loss", "pretrain", ("mse", "bce"))
    if pre.loss == "bce" and (cfg.model.activation != "sigmoid" or data.pixels != "zero_one"):
        raise ConfigError("pretrain.loss", "bce",
                          "needs model.activation=sigmoid and data.pixels=zero_one")
    _choice(pre.noise, "kind", "pretrain.noise", ("none", "masking", "gaussian", "salt_pepper"))
    high = None if pre.noise.kind == "gaussian" else 1.0
    _number(pre.noise, "level", "pretrain.noise", 0, strict=False, high=high)
    levels = pre.noise.get("levels")
    if levels is not None:
        if isinstance(levels, int | float | str) or len(levels) != len(sizes) - 1:
            raise ConfigError("pretrain.noise.levels", levels,
                              f"must be null or a list of {len(sizes) - 1} levels, one per layer")
        for i, level in enumerate(levels):
            _number({str(i): level}, str(i), "pretrain.noise.levels", 0, strict=False, high=high)
    _choice(pre.sparsity, "kind", "pretrain.sparsity", ("none", "kl", "l1"))
    _number(pre.sparsity, "weight", "pretrain.sparsity", 0, strict=False)
    if pre.sparsity.kind == "kl":
        if cfg.model.activation == "relu":
            raise ConfigError("pretrain.sparsity.kind", "kl", "needs tanh or sigmoid units")
        _number(pre.sparsity, "target", "pretrain.sparsity", 0, high=0.999)

    _choice(cfg.trainer, "accelerator", "trainer", ("auto", "cpu", "gpu", "cuda"))
    _number(cfg.trainer, "steps_per_item", "trainer", 0, strict=False, integer=True)
    _fast_path(cfg.trainer)
    # ddp runs the whole pipeline in every process (each stage's Trainer joins the same process
    # group); ddp_spawn would train in throw-away processes and lose each stage's best weights.
    _choice(cfg.trainer, "strategy", "trainer", ("auto", "ddp"))
    if cfg.trainer.strategy == "ddp" and cfg.trainer.steps_per_item != 1:
        raise ConfigError("trainer.steps_per_item", cfg.trainer.steps_per_item,
                          "must be 1 with trainer.strategy=ddp (DDP averages the gradients of "
                          "one forward and backward per Lightning step)")
    if cfg.trainer.strategy == "auto" and cfg.trainer.devices != 1:
        raise ConfigError("trainer.devices", cfg.trainer.devices,
                          "more than one device needs trainer.strategy=ddp (use trainer=ddp)")
    _visualize(visualize_settings(cfg))


def visualize_settings(cfg: DictConfig) -> DictConfig:
    """The run's `visualize` group, or the packaged default for runs saved before it existed."""
    if "visualize" in cfg:
        return cfg.visualize
    return OmegaConf.load(files("saelab.conf") / "visualize" / "default.yaml")


def _visualize(settings: DictConfig) -> None:
    """The figure settings (`visualize` group)."""
    if not isinstance(settings.enabled, bool):
        raise ConfigError("visualize.enabled", settings.enabled, "must be true or false")
    samples = settings.samples
    if samples is not None and (isinstance(samples, int | str) or not samples or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in samples)):
        raise ConfigError("visualize.samples", samples,
                          "must be null or a non-empty list of test-set indices >= 0")
    _number(settings.actmax, "steps", "visualize.actmax", 0, integer=True)
    _number(settings.actmax, "lr", "visualize.actmax", 0)
    _number(settings.actmax, "norm", "visualize.actmax", 0)
    _number(settings, "embedding_points", "visualize", 0, strict=False, integer=True)
