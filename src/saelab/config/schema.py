"""The configuration's typed schema: every key, its type, default, allowed values, range and a
one-line description, in one place.

The dataclasses are registered in Hydra's ConfigStore at the root (`saelab_schema`, first in the
defaults list of `conf/config.yaml`), so every YAML file in `conf/` and every override is merged
onto typed nodes: a misspelled key, a string where a number belongs or a value outside a choice is
refused by OmegaConf while the config is composed. Ranges (`gt`, `ge`, `le`, ...) and the rules
that tie several keys together are checked by `saelab.config.validate`. The docs' table of keys
(`docs/configuration.md`) is generated from this module: `python -m saelab.config.schema`.

Imports neither torch nor torchvision: the command line composes and checks configs before any
heavy import.
"""

from __future__ import annotations

import copy
import inspect
import re
import textwrap
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from enum import StrEnum
from itertools import groupby
from typing import Any

from omegaconf import II

# ---------------------------------------------------------------------------------------------
# Choices: each allowed value written once, here.


class Dataset(StrEnum):
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"


class Pixels(StrEnum):
    """How raw bytes 0..255 become model inputs."""

    minus_one_one = "minus_one_one"  # x / 127.5 - 1, for tanh units
    notebook = "notebook"  # x / 128 - 1, the course notebook's
    zero_one = "zero_one"  # x / 255, for sigmoid units with a cross-entropy reconstruction


class Activation(StrEnum):
    tanh = "tanh"
    sigmoid = "sigmoid"
    relu = "relu"


class Kind(StrEnum):
    """Kinds of autoencoder a stack is made of (their shapes: saelab.config.kinds; their
    networks: saelab.nn.networks.AUTOENCODERS)."""

    dense = "dense"  # Linear -> activation -> Linear, on flat vectors
    conv = "conv"  # convolution -> max-pooling -> activation; unpooling -> transposed convolution


class Optimizer(StrEnum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(StrEnum):
    none = "none"
    cosine = "cosine"


class Codes(StrEnum):
    activation = "activation"
    pre_activation = "pre_activation"


class ReconLoss(StrEnum):
    mse = "mse"
    bce = "bce"


class Noise(StrEnum):
    none = "none"
    masking = "masking"
    gaussian = "gaussian"
    salt_pepper = "salt_pepper"


class Sparsity(StrEnum):
    none = "none"
    kl = "kl"
    l1 = "l1"


class HeadInit(StrEnum):
    """How a deep network's classifier head starts, the same rule for every one of them."""

    probe = "probe"  # a linear head trained on the frozen stack it tops (scratch: its own)
    zero = "zero"
    random = "random"  # the probe's initial head: one draw, shared


class Arm(StrEnum):
    """The stages a tuned study compares, each tuned with the same budget."""

    finetune = "finetune"
    scratch = "scratch"
    semisup = "semisup"


class Accelerator(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"


class Strategy(StrEnum):
    # ddp runs the whole recipe in every process (each stage's Trainer joins the same process
    # group); ddp_spawn would train in throw-away processes and lose each stage's best weights.
    auto = "auto"
    ddp = "ddp"


class MatmulPrecision(StrEnum):
    highest = "highest"  # float32
    high = "high"  # TF32
    medium = "medium"  # bfloat16


class ProgressMode(StrEnum):
    auto = "auto"  # a live progress line on a terminal, per-epoch lines elsewhere
    bar = "bar"  # always the live line
    lines = "lines"  # always the per-epoch lines


class Logger(StrEnum):
    tensorboard = "tensorboard"
    csv = "csv"
    mlflow = "mlflow"


# Lightning's precision settings that saelab runs with (a free-form string in Lightning). The
# splits stay float32 tensors on the device, which autocast (the mixed settings) reads; Lightning's
# "-true" half and double settings would cast the networks only, and each step would fail.
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


# ---------------------------------------------------------------------------------------------
# Keys


def key(default: Any, doc: str, **bounds: float) -> Any:
    """A schema field: its default, its one-line description and its numeric bounds (`gt`, `ge`,
    `lt`, `le`; for a list, of every element), which `config.validate` checks."""
    meta = {"doc": doc, "bounds": bounds}
    if isinstance(default, list | dict) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: Dataset = key(Dataset.mnist, "data set")
    classes: list[int] = key(list(range(10)), "classes to keep, relabelled 0..k-1 in this "
                             "order ([0, 9] is the binary task)", ge=0, le=9)
    root: str = key("${oc.env:SAELAB_CACHE,'~/.cache/saelab'}",
                    "cache folder (torchvision layout: <root>/MNIST/raw/*-ubyte)")
    mirror: str | None = key("${oc.env:SAELAB_MIRROR,null}",
                             "offline mirror in torchvision's layout, decompressed into the cache")
    download: bool = key(True, "download when neither the cache nor the mirror has the data")
    pixels: Pixels = key(Pixels.minus_one_one, "pixel scaling")
    val_size: int = key(5000, "validation images carved from the training set (stratified, "
                        "seeded), counted for all ten classes: a subset keeps the same fraction",
                        ge=0, lt=30000)
    batch_size: int = key(128, "default minibatch size of every stage", gt=0)
    train_limit: int | None = key(None, "cap on the training split (stratified), for quick runs",
                                  gt=0)
    test_limit: int | None = key(None, "cap on the test set (stratified), for quick runs", gt=0)
    labels_per_class: int | None = key(None, "labelled training images per class that the "
                                       "baseline, probe, fine-tuning and scratch see (null: all); "
                                       "pretraining always sees every training image", gt=0)
    labelled_val_per_class: int | None = key(None, "labelled validation images per class that "
                                             "those stages select on (null: labels_per_class, "
                                             "capped at the validation split)", gt=0)


@dataclass
class ConvConfig:
    channels: list[int] = key([16, 32], "feature maps of each convolutional layer, bottom first",
                              gt=0)
    kernels: list[int] = key([5, 5], "odd kernel side of each layer ('same' padding)", gt=0)
    pools: list[int] = key([2, 2], "max-pooling window and stride of each layer (1: none); "
                           "it must divide the side of the maps it pools", gt=0)


@dataclass
class ModelConfig:
    kind: Kind = key(Kind.dense, "kind of autoencoder: dense (its layers: model.sizes) or conv "
                     "(model.conv); the other kind's keys are not read")
    sizes: list[int] = key([784, 196, 49, 25, 9], "dense: layer sizes from the 784 pixels to the "
                           "top code; one autoencoder per consecutive pair", gt=0)
    conv: ConvConfig = key(ConvConfig(), "conv: the convolutional layers, one autoencoder each")
    activation: Activation = key(Activation.tanh, "hidden units")
    tied: bool = key(False, "decoder weight = encoder weight transposed (conv: the encoder's "
                     "filters in the transposed convolution); own bias")
    head: HeadInit = key(HeadInit.probe, "how the deep networks' classifier head starts, one "
                         "rule for fine-tuning, scratch and semi-supervised: probe (a linear head "
                         "trained on the frozen stack it tops), zero, or random (the probe's "
                         "initial head)")


@dataclass
class StageConfig:
    """Optimisation of one trained stage."""

    optimizer: Optimizer = key(Optimizer.adam, "optimiser")
    lr: float = key(1e-3, "learning rate", gt=0)
    momentum: float = key(0.9, "momentum (sgd only)", ge=0)
    nesterov: bool = key(False, "Nesterov momentum (sgd only)")
    weight_decay: float = key(0.0, "L2 weight decay", ge=0)
    epochs: int = key(20, "epochs (the weights of the best validation epoch are kept)", ge=0)
    batch_size: int = key(II("data.batch_size"), "minibatch size", gt=0)
    schedule: Schedule = key(Schedule.cosine, "learning-rate schedule, per epoch")
    patience: int | None = key(None, "stop after this many epochs without validation "
                               "improvement (null: never)", gt=0)
    steps_per_epoch: int | None = key(None, "optimiser steps per epoch (null: one pass over the "
                                      "training set)", gt=0)
    sample_with_replacement: bool = key(False, "draw minibatches at random with replacement")


@dataclass
class NoiseConfig:
    kind: Noise = key(Noise.none, "denoising: corrupt the input, reconstruct the clean one")
    level: float = key(0.0, "fraction of inputs hit (masking, salt_pepper) or sigma (gaussian)",
                       ge=0)
    levels: list[float] | None = key(None, "one level per layer, bottom first, replacing level",
                                     ge=0)
    validation: bool = key(False, "select each layer's epoch (and stop early) on corrupted "
                           "validation inputs (one fixed draw): the denoising objective itself")


@dataclass
class SparsityConfig:
    kind: Sparsity = key(Sparsity.none, "sparsity penalty on the codes")
    target: float = key(0.05, "kl: target mean activation (mapped to 0..1)", gt=0, lt=1)
    weight: float = key(0.0, "weight of the penalty", ge=0)


@dataclass
class ContractiveConfig:
    weight: float = key(0.0, "weight of the contractive penalty: the squared Frobenius norm of "
                        "the encoder's Jacobian at each input, averaged (Rifai et al. 2011; 0: "
                        "off)", ge=0)


@dataclass
class PretrainConfig(StageConfig):
    codes: Codes = key(Codes.activation, "codes handed to the next layer: the activation (as the "
                       "stacked network computes them) or the Linear output (the notebook's "
                       "quirk)")
    loss: ReconLoss = key(ReconLoss.mse, "reconstruction loss (bce: sigmoid units on zero_one "
                          "pixels)")
    noise: NoiseConfig = key(NoiseConfig(), "denoising")
    sparsity: SparsityConfig = key(SparsityConfig(), "sparsity")
    contractive: ContractiveConfig = key(ContractiveConfig(), "contractive autoencoders")


@dataclass
class ProbeConfig(StageConfig):
    lr: float = key(1e-2, "learning rate (a linear head on a few tanh codes learns fast)", gt=0)


@dataclass
class DropoutConfig:
    input: float = key(0.0, "dropout rate on the input pixels, training loss only", ge=0, lt=1)
    hidden: float = key(0.0, "dropout rate on every hidden layer, training loss only", ge=0, lt=1)


@dataclass
class AugmentConfig:
    shift: int = key(0, "translate each labelled training image by up to this many pixels, at "
                     "random (background-padded)", ge=0, le=4)


@dataclass
class FinetuneConfig(StageConfig):
    epochs: int = key(30, "epochs (the weights of the best validation epoch are kept)", ge=0)
    encoder_lr_scale: float = key(1.0, "learning-rate multiplier of the encoders (the "
                                  "notebook's idea to spare pretrained features)", ge=0)
    dropout: DropoutConfig = key(DropoutConfig(), "dropout")
    augment: AugmentConfig = key(AugmentConfig(), "data augmentation of the labelled images")


def following(cls: type, leader: str, name: str, doc: str, drop: tuple[str, ...] = (),
              docs: dict[str, str] | None = None, own: dict[str, tuple[type, Any]] | None = None
              ) -> type:
    """A config class with every key of `cls` but `drop`, each defaulting to the same key of the
    group `leader` (`${leader.key}`), nested groups key by key: a key added to `cls` follows
    without a second class to edit. `docs`: descriptions that differ from `cls`'s; `own`: keys
    with a type and default (`key(...)`) of their own, replacing or added."""
    docs, own = docs or {}, own or {}
    out = []
    for f in fields(cls):
        if f.name in own:
            out.append((f.name, *own[f.name]))
        if f.name in drop or f.name in own:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        text = docs.get(f.name, f.metadata["doc"])
        if is_dataclass(default):
            sub = following(type(default), f"{leader}.{f.name}", f"{name}{f.name.title()}",
                            text)
            out.append((f.name, sub, key(sub(), text)))
        else:
            out.append((f.name, f.type, key(II(f"{leader}.{f.name}"), text,
                                            **f.metadata["bounds"])))
    out += [(k, *typed) for k, typed in own.items() if k not in {f.name for f in fields(cls)}]
    made = make_dataclass(name, out)
    made.__module__, made.__doc__ = __name__, doc  # where its types' names resolve
    return made


# The fine-tuned network's control: the same network from random weights. Every key follows
# fine-tuning's (`finetune.lr=...` sets both) but the encoders' learning-rate scale, which only
# pretrained encoders have; `scratch.epochs=0` skips it.
ScratchConfig = following(FinetuneConfig, "finetune", "ScratchConfig",
                          "The fine-tuned network trained from random weights: the control.",
                          drop=("encoder_lr_scale",),
                          docs={"epochs": "epochs (0: no scratch stage)"})

# Semi-supervised fine-tuning: fine-tuning that also learns from the unlabelled training images,
# through its own confident predictions (pseudo-labels, Lee 2013; with a confidence threshold and
# a perturbed student input as in FixMatch, Sohn et al. 2020). Off unless `semisup.epochs` > 0;
# every other optimisation key follows fine-tuning's.
SemisupConfig = following(
    FinetuneConfig, "finetune", "SemisupConfig",
    "Fine-tuning that also learns from the unlabelled images, through pseudo-labels.",
    own={"epochs": (int, key(0, "epochs (0: no semi-supervised stage)", ge=0)),
         "unlabelled_batch_size": (int, key(128, "unlabelled images per step", gt=0)),
         "threshold": (float, key(0.95, "an unlabelled image's pseudo-label counts when the "
                                  "network's clean prediction is this confident (0: always, as "
                                  "Lee 2013)", ge=0, le=1)),
         "weight": (float, key(1.0, "weight of the pseudo-label loss, once ramped up", ge=0)),
         "ramp": (float, key(0.2, "fraction of the training steps over which that weight rises "
                             "from 0", ge=0, le=1)),
         "noise": (float, key(0.2, "masking noise on the unlabelled images the network learns "
                              "from (their pseudo-labels come from the clean ones)", ge=0,
                              lt=1))})


@dataclass
class TuneConfig:
    """Tuning each compared stage (arm) with the same budget, on validation only."""

    trials: int = key(0, "trials per tuned stage, each a training from the same start (0: no "
                      "tuning: each stage trains once with its settings)", ge=0)
    arms: list[Arm] = key(list(Arm), "the stages tuned")
    space: list[str] = key([], "the search space: key=sweep, the key in the stage's group (lr, "
                           "dropout.hidden, ...), the sweep choice(a,b,...), interval(a,b), "
                           "tag(log, interval(a,b)) or range(a,b) (b excluded). Every arm draws "
                           "the same value of a key they share; a key an arm lacks is not drawn "
                           "for it")
    full_val: bool = key(True, "also report selection on the whole validation split, beside "
                         "selection on the labelled validation images")


@dataclass
class TrainerConfig:
    """Lightning `Trainer` arguments shared by every stage."""

    accelerator: Accelerator = key(Accelerator.auto, "where to train (auto: a GPU if present)")
    devices: int = key(1, "devices (more than one needs strategy=ddp)", gt=0)
    strategy: Strategy = key(Strategy.auto, "ddp: data parallelism over `devices` processes")
    precision: str = key("32-true", f"Lightning precision: {', '.join(PRECISIONS)}")


@dataclass
class FastpathConfig:
    """How saelab runs its training steps (the speed-ups Lightning does not provide)."""

    steps_per_item: int = key(0, "minibatches per Lightning step (0: a whole epoch), which keeps "
                              "Lightning out of the hot loop", ge=0)
    cuda_graphs: bool = key(False, "GPU: replay each full-size step from a CUDA graph "
                            "(adam/adamw, one device, 32-true)")
    compile: bool = key(False, "GPU: torch.compile the loss")
    matmul_precision: MatmulPrecision = key(MatmulPrecision.highest,
                                            "GPU: float32 matmul precision")


@dataclass
class ActmaxConfig:
    steps: int = key(200, "projected gradient-ascent steps", gt=0)
    lr: float = key(0.05, "step, as a fraction of norm", gt=0)
    norm: float = key(10.0, "L2 radius of the inputs (MNIST test digits in [-1, 1]: 26-28)", gt=0)


@dataclass
class VisualizeConfig:
    enabled: bool = key(True, "figures, their TensorBoard images, HPARAMS and report.md")
    samples: list[int] | None = key(None, "test-set indices of the images in the "
                                    "reconstruction panels (null: the first of each class, "
                                    "about ten)", ge=0)
    actmax: ActmaxConfig = key(ActmaxConfig(), "activation maximisation (Erhan et al. 2009)")
    embedding_points: int = key(1000, "test codes in TensorBoard's projector (0: none)", ge=0)


@dataclass
class LoggerConfig:
    kind: Logger = key(Logger.tensorboard, "where scalars, hparams and figures go (tensorboard: "
                       "in the run folder; csv: metrics.csv; mlflow: an MLflow store)")
    tracking_uri: str = key("sqlite:///outputs/mlflow.db", "mlflow: the tracking store")
    artifacts: str = key("outputs/mlflow-artifacts", "mlflow: where figures are stored")
    experiment: str = key("saelab", "mlflow: the experiment name")


@dataclass
class Config:
    seed: int = key(0, "random seed of everything: splits, initial weights, minibatches",
                    ge=0, le=2**32 - 1)
    resume: str | None = key(None, "a run folder to continue: finished stages are loaded")
    overwrite: bool = key(False, "train into a folder holding another config's results, "
                          "removing saelab's files there first")
    store: str | None = key(None, "a folder of finished stages shared between runs: a stage "
                            "whose fingerprint is there is copied, not trained")
    progress: ProgressMode = key(ProgressMode.auto, "progress display")
    data: DataConfig = key(DataConfig(), "the data set: classes, validation split, pixel "
                                 "scaling, limits")
    model: ModelConfig = key(ModelConfig(), "the stacked network")
    baseline: StageConfig = key(StageConfig(), "softmax regression on raw pixels")
    pretrain: PretrainConfig = key(PretrainConfig(), "greedy layer-wise pretraining, one "
                                   "autoencoder per layer")
    probe: ProbeConfig = key(ProbeConfig(), "linear head on the frozen pretrained stack")
    finetune: FinetuneConfig = key(FinetuneConfig(), "the whole stack and head, end to end")
    scratch: ScratchConfig = key(ScratchConfig(), "the fine-tuned network trained from random "
                                 "weights: the control")
    semisup: SemisupConfig = key(SemisupConfig(), "fine-tuning that also learns from the "
                                 "unlabelled images (pseudo-labels)")
    tune: TuneConfig = key(TuneConfig(), "tuning the compared stages, the same budget each")
    trainer: TrainerConfig = key(TrainerConfig(), "Lightning Trainer arguments")
    fastpath: FastpathConfig = key(FastpathConfig(), "saelab's training-step speed-ups")
    logger: LoggerConfig = key(LoggerConfig(), "experiment logger")
    visualize: VisualizeConfig = key(VisualizeConfig(), "figures and report")


SCHEMA_NAME = "saelab_schema"


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent), at the root so that it is not offered
    as a choice by `--help` or shell completion."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance().store
    # Hydra 1.4 warns on storing a name again unless told to replace it; 1.3 replaces silently
    # and has no such parameter.
    replace = {"replace": True} if "replace" in inspect.signature(store).parameters else {}
    store(name=SCHEMA_NAME, node=Config, **replace)


# ---------------------------------------------------------------------------------------------
# Walking the schema (validation, docs)


@dataclass
class Key:
    """One leaf of the schema."""

    path: str
    type: Any
    default: Any
    doc: str
    bounds: dict[str, float]

    @property
    def choices(self) -> type[StrEnum] | None:
        """The enum of the key's allowed values, if it has one."""
        name = self.type if isinstance(self.type, str) else getattr(self.type, "__name__", "")
        return next((e for e in StrEnum.__subclasses__() if e.__name__ == name), None)


def leaves(node: Any = Config, prefix: str = "") -> list[Key]:
    """Every leaf key of the schema, depth first, in declaration order."""
    out = []
    for f in fields(node):
        path = f"{prefix}{f.name}"
        if not isinstance(node, type):  # a group's default instance sets its own values
            default = getattr(node, f.name)  # (scratch.dropout follows finetune.dropout)
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
        if is_dataclass(default):
            out += leaves(default, f"{path}.")
        else:
            out.append(Key(path, f.type, default, f.metadata["doc"], f.metadata["bounds"]))
    return out


def followers() -> dict[str, list[str]]:
    """The keys whose default follows another key's value (`${finetune.lr}`), by that key."""
    out: dict[str, list[str]] = {}
    for k in leaves():
        if isinstance(k.default, str) and re.fullmatch(r"\$\{[\w.]+\}", k.default):
            out.setdefault(k.default[2:-1], []).append(k.path)
    return out


BOUND_TEXT = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def sections() -> dict[str, str]:
    """The groups of keys (`data`, `pretrain`, ...), each with what it holds."""
    return {f.name: f.metadata["doc"] for f in fields(Config)
            if f.default is MISSING and is_dataclass(f.default_factory())}


def bounds_text(bounds: dict[str, float], joiner: str = ", ") -> str:
    """A key's range in words: `>= 0, <= 9`."""
    return joiner.join(f"{BOUND_TEXT[b]} {int(v) if float(v).is_integer() else f'{v:g}'}"
                       for b, v in bounds.items())


def default_text(k: Key) -> str:
    if isinstance(k.default, list):  # enums by their names
        return "[" + ", ".join(str(v) for v in k.default) + "]"
    return "null" if k.default is None else str(k.default)


def type_text(k: Key) -> str:
    """The key's type in words, with its choices."""
    if k.choices is not None:
        return " | ".join(k.choices)
    t = k.type if isinstance(k.type, str) else getattr(k.type, "__name__", str(k.type))
    listed = next((e for e in StrEnum.__subclasses__() if t == f"list[{e.__name__}]"), None)
    if listed is not None:
        return f"list of {' | '.join(listed)}"
    return t.replace("|", "or").replace(" None", " null")


def markdown() -> str:
    """docs/configuration.md: one table of every key."""
    lines = ["# Configuration keys", "",
             "Generated from `src/saelab/config/schema.py` by `python -m saelab.config.schema`; "
             "do not edit.",
             "Every key is set on the command line as `key=value` (e.g. `pretrain.lr=3e-3`).",
             "Values like `${finetune.lr}` follow the key they name unless set.", "",
             "| key | type | default | range | description |", "|---|---|---|---|---|"]
    for k in leaves():
        cells = (f"`{k.path}`", type_text(k), f"`{default_text(k)}`", bounds_text(k.bounds),
                 k.doc)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def text(section: str | None = None, width: int = 100) -> str:
    """The keys for `saelab --help`: `key=default  [type, range]  meaning`, one entry per key
    (wrapped at `width`), the top-level keys first, then each group under what it holds; with
    `section`, that group's keys only."""
    docs, lines = sections(), []
    for name, keys in groupby(leaves(), key=lambda k: k.path.rpartition(".")[0].split(".")[0]):
        if section not in (None, name):
            continue
        lines.append(f"{name}: {docs[name]}" if name else "top level:")
        for k in keys:
            kind = ", ".join(filter(None, (type_text(k), bounds_text(k.bounds))))
            # Lists as typed on the command line ([0,9]), so that no wrap splits a default.
            entry = f"{k.path}={default_text(k).replace(', ', ',')}  [{kind}]  {k.doc}"
            lines.append(textwrap.fill(entry, width, initial_indent="  ",
                                       subsequent_indent="      ", break_on_hyphens=False))
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
