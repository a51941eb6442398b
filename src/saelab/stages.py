"""The stages of an experiment, in one place: for each, its name, label and config group, the config
keys it reads, the stages it consumes, whether it sees labels, how its network is built and handed
on, its work, and how a finished run's folder rebuilds it.

`plan(cfg)` lists the stages of a config in the order they run; the pipeline walks it, the run
folder checks checkpoints against `expected(...)`, and the loader, the progress display, the
terminal table, the report, the sweep summary, the robustness study and the benchmark read it.
Adding a stage is one entry in `plan` plus its class here (and its Lightning module).

A stage reads its config through a `View` of exactly the keys it declares, resolved: reading any
other key is an error, so the fingerprint (those values, the data files' checksums, the consumed
stages' fingerprints, the checkpoint format) cannot leave out something a stage depends on. What
the pipeline reads beside the stages (where a run runs: accelerator, devices, the fast path; its
figures, logger and progress display) is recorded, never fingerprinted; tests/test_stages.py
checks that none of it changes a trained weight.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from saelab.autoencoder import AutoEncoder, classifier, stack_encoders
from saelab.data import Splits
from saelab.evaluation import CHUNK, classifier_metrics, in_chunks
from saelab.modules import AutoencoderModule, ClassifierModule, StageModule
from saelab.runfolder import FORMAT
from saelab.schema import Codes, leaves

# Keys every stage reads: which images (and with labels, which of them are labelled), and the
# numerics that change results.
DATA = ("seed", "data.name", "data.classes", "data.pixels", "data.val_size", "data.train_limit")
LABELS = ("data.labels_per_class", "data.labelled_val_per_class")
NUMERICS = ("trainer.precision", "fastpath.matmul_precision")
# Scratch trains on a generator of its own (seeded from `seed` and this), so that adding it, or
# its dropout, changes no other stage's numbers.
SCRATCH_SEED = 104_729


def group_keys(prefix: str, *without: str) -> tuple[str, ...]:
    """Every key of a config group, from the schema, less `without`."""
    return tuple(k.path for k in leaves() if k.path.startswith(f"{prefix}.")
                 and k.path not in without)


# ---------------------------------------------------------------------------------------------
# What stages hand each other


@dataclass
class Experiment:
    """What the stages of one run hand each other, in the order they run: the pretrained
    autoencoders, the inputs the last one learned from, and every network trained so far. A
    finished run read back (`data` None) holds the same networks."""

    cfg: DictConfig
    device: torch.device
    data: Splits | None = None
    autoencoders: list[AutoEncoder] = field(default_factory=list)
    initial: list[dict] = field(default_factory=list)  # each encoder's initial weights
    inputs: tuple[torch.Tensor, ...] = ()  # the train/val/test inputs of the last layer
    networks: dict[str, nn.Module] = field(default_factory=dict)  # by stage name
    head_init: dict | None = None  # the probe's head before training

    @property
    def n_classes(self) -> int:
        return len(self.cfg.data.classes)

    def labelled(self) -> tuple[torch.Tensor, ...]:
        """The labelled training and validation images and labels: x, y, val x, val y."""
        return (*self.data.labelled("train"), *self.data.labelled("val"))


class UndeclaredKey(AttributeError):
    """A stage read a config key it does not declare (and so does not fingerprint)."""


class View:
    """The config keys a stage declares, resolved and read like the config (`view.pretrain.lr`,
    `view.model.sizes[1]`, enums as enums); any other key is an UndeclaredKey."""

    def __init__(self, stage: str, values: dict[str, Any], prefix: str = ""):
        self._stage, self._values, self._prefix = stage, values, prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        path = self._prefix + name
        if path in self._values:
            value = self._values[path]
            enum = CHOICES.get(path)
            return enum(value) if enum is not None and value is not None else value
        if any(k.startswith(f"{path}.") for k in self._values):
            return View(self._stage, self._values, f"{path}.")
        raise UndeclaredKey(f"stage {self._stage} reads {path}, a key it does not declare")

    def __getitem__(self, index: int) -> Any:
        return self.__getattr__(str(index))

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self.__getattr__(name)
        except UndeclaredKey:
            return default


CHOICES = {k.path: k.choices for k in leaves() if k.choices is not None}


# ---------------------------------------------------------------------------------------------
# The stages


class Stage:
    """One trained stage. `name`: its checkpoint's stem and its metrics.json key; `group`: the
    config group of its optimisation settings; `keys`: every config key it reads; `consumes`: the
    stages whose results it starts from; `labelled`: whether it sees labels; `classifies`: whether
    it is a classifier, with test and validation accuracy."""

    name: str
    label: str
    group: str
    keys: tuple[str, ...]
    consumes: tuple[str, ...] = ()
    labelled: bool = True
    classifies: bool = True
    trains_encoders: bool = False  # its network's body is a stack of encoders it trains
    about: str = ""  # what it is, in a few words (the report's table)

    def inputs(self, ex: Experiment, s: View) -> tuple[torch.Tensor | None, ...]:
        """What it trains and selects on: x, y, val x, val y (y None without labels)."""
        return ex.labelled()

    def model(self, ex: Experiment, s: View) -> nn.Module:
        """Its network, freshly built (initial weights drawn from the random stream)."""
        raise NotImplementedError

    def module(self, ex: Experiment, model: nn.Module, s: View) -> StageModule:
        """The Lightning module that trains `model`."""
        return ClassifierModule(model, s[self.group], self.label, self.group)

    def before_fit(self, ex: Experiment, s: View) -> None:
        """Called right before it is trained or loaded."""

    def keep(self, ex: Experiment, model: nn.Module, s: View) -> None:
        """Hand the trained network on to the stages after it."""
        ex.networks[self.name] = model

    def metrics(self, ex: Experiment, module: StageModule, s: View) -> dict:
        """Its entry in metrics.json (the pipeline adds its time, history and origin)."""
        return classifier_metrics(ex.networks[self.name], ex.data)

    def weights(self, ex: Experiment, s: View) -> int:
        """Weights of the network it trains: its work per sample, for time estimates."""
        raise NotImplementedError

    def n_samples(self, ex: Experiment) -> int:
        """Training samples in one pass."""
        return len(ex.data.labelled("train")[1]) if self.labelled else len(ex.data.train_y)

    def rebuild(self, ex: Experiment, s: View, state: dict) -> None:
        """A finished run read back: its trained network from its checkpoint, handed on."""
        model = self.model(ex, s)
        model.load_state_dict(state)
        self.keep(ex, model.to(ex.device).eval(), s)


def deep_network(ex: Experiment, autoencoders: list[AutoEncoder]) -> nn.Sequential:
    """The stacked encoders of `autoencoders` topped by a linear head."""
    return classifier(stack_encoders(autoencoders), autoencoders[-1].encoder.out_features,
                      ex.n_classes)


def deep_weights(ex: Experiment) -> int:
    """Weights of the deep classifier: every encoder and the head."""
    sizes = list(ex.cfg.model.sizes)
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)) + sizes[-1] * \
        ex.n_classes


class Baseline(Stage):
    name = label = group = "baseline"
    about = "softmax regression on pixels"
    keys = DATA + LABELS + group_keys("baseline") + NUMERICS

    def model(self, ex: Experiment, s: View) -> nn.Module:
        return classifier(nn.Identity(), 28 * 28, ex.n_classes)

    def weights(self, ex: Experiment, s: View) -> int:
        return 28 * 28 * ex.n_classes


class PretrainLayer(Stage):
    """Greedy pretraining of hidden layer k, without labels, on the codes of the layer below."""

    group = "pretrain"
    labelled = classifies = False

    def __init__(self, k: int):
        self.k = k
        self.name, self.label = f"pretrain_layer{k}", f"pretrain layer {k}"
        # Its own sizes and noise level, and (from layer 2) the codes of the layer below, which
        # are `pretrain.codes`: nothing of the layers above it.
        own = (f"model.sizes.{k - 1}", f"model.sizes.{k}", "model.activation", "model.tied",
               f"pretrain.noise.levels.{k - 1}")
        keys = group_keys("pretrain", "pretrain.noise.levels",
                          *(("pretrain.codes",) if k == 1 else ()))
        self.keys = DATA + own + keys + NUMERICS
        self.consumes = (f"pretrain_layer{k - 1}",) if k > 1 else ()

    def inputs(self, ex: Experiment, s: View) -> tuple[torch.Tensor | None, ...]:
        if self.k == 1:
            ex.inputs = (ex.data.train_x, ex.data.val_x, ex.data.test_x)
        else:  # the codes of the layer below, as this layer is to learn them
            below = ex.autoencoders[-1]
            code = below.encode if s.pretrain.codes == Codes.activation else below.encoder
            ex.inputs = tuple(in_chunks(code, x) for x in ex.inputs)
        return ex.inputs[0], None, ex.inputs[1], ex.inputs[1]

    def model(self, ex: Experiment, s: View) -> nn.Module:
        ae = AutoEncoder(s.model.sizes[self.k - 1], s.model.sizes[self.k], s.model.activation,
                         s.model.tied)
        ex.initial.append(copy.deepcopy(ae.encoder.state_dict()))  # where scratch starts
        return ae

    def module(self, ex: Experiment, model: nn.Module, s: View) -> StageModule:
        # Masking sets inputs to the background: black pixels for layer 1, zero codes above.
        background = ex.data.background if self.k == 1 else 0.0
        return AutoencoderModule(model, s.pretrain, self.label, f"pretrain/layer{self.k}",
                                 background=background,
                                 noise_level=s.pretrain.noise.levels[self.k - 1])

    def keep(self, ex: Experiment, model: nn.Module, s: View) -> None:
        ex.autoencoders.append(model.eval())

    def metrics(self, ex: Experiment, module: StageModule, s: View) -> dict:
        """Sizes, noise level, and the reconstruction MSE per value on each split's inputs."""
        ae = module.model
        out = {"in": ae.encoder.in_features, "out": ae.encoder.out_features,
               "noise_level": module.noise_level}
        for split, x in zip(("train", "val", "test"), ex.inputs, strict=True):
            if len(x):
                errors, counts = zip(*(module.evaluate(part) for part in x.split(CHUNK)),
                                     strict=True)
                out[f"{split}_recon_mse"] = sum(map(float, errors)) / sum(map(float, counts))
        return out

    def weights(self, ex: Experiment, s: View) -> int:
        return 2 * s.model.sizes[self.k - 1] * s.model.sizes[self.k]  # encoder and decoder


class Probe(Stage):
    """A linear head on the frozen pretrained stack's top codes: the pretrained features' worth,
    and fine-tuning's starting head."""

    name = label = group = "probe"
    about = "linear head on the frozen pretrained stack"
    keys = DATA + LABELS + group_keys("probe") + NUMERICS

    def __init__(self, n_layers: int):
        self.consumes = tuple(f"pretrain_layer{k}" for k in range(1, n_layers + 1))

    def inputs(self, ex: Experiment, s: View) -> tuple[torch.Tensor | None, ...]:
        # One stack per split, as saelab 0.1 built them: building a stack draws initial weights,
        # which come before the head's, so published numbers reproduce.
        x, y, vx, vy = ex.labelled()
        top = [in_chunks(stack_encoders(ex.autoencoders).to(ex.device), images)
               for images in (x, vx)]
        return top[0], y, top[1], vy

    def model(self, ex: Experiment, s: View) -> nn.Module:
        head = classifier(nn.Identity(), ex.autoencoders[-1].encoder.out_features, ex.n_classes)
        ex.head_init = copy.deepcopy(head[1].state_dict())
        return head

    def keep(self, ex: Experiment, model: nn.Module, s: View) -> None:
        """The network it stands for: the frozen stack topped by the trained head."""
        probe = deep_network(ex, ex.autoencoders).to(ex.device)
        probe[1].load_state_dict(model[1].state_dict())
        ex.networks[self.name] = probe

    def weights(self, ex: Experiment, s: View) -> int:
        return ex.cfg.model.sizes[-1] * ex.n_classes


class Finetune(Stage):
    """The pretrained stack and the probe's head, trained end to end."""

    name = label = group = "finetune"
    about = "whole stack and head, end to end"
    keys = DATA + LABELS + group_keys("finetune") + NUMERICS
    consumes = ("probe",)
    trains_encoders = True

    def model(self, ex: Experiment, s: View) -> nn.Module:
        return copy.deepcopy(ex.networks["probe"])

    def module(self, ex: Experiment, model: nn.Module, s: View) -> StageModule:
        return ClassifierModule(model, s.finetune, self.label, self.group,
                                encoder_lr_scale=s.finetune.encoder_lr_scale,
                                dropout=s.finetune.dropout)

    def weights(self, ex: Experiment, s: View) -> int:
        return deep_weights(ex)

    def rebuild(self, ex: Experiment, s: View, state: dict) -> None:
        model = deep_network(ex, ex.autoencoders)
        model.load_state_dict(state)
        self.keep(ex, model.to(ex.device).eval(), s)


class Scratch(Finetune):
    """The fine-tuned network's architecture from the very weights pretraining started from (the
    encoders) and the probe's initial head, trained end to end like fine-tuning: the control."""

    name = label = group = "scratch"
    about = "the same network from random weights, end to end"
    keys = DATA + LABELS + group_keys("scratch") + ("model.sizes", "model.activation") + NUMERICS

    def __init__(self, n_layers: int):
        # It starts from the encoders' and the probe head's initial weights, which the random
        # stream of pretraining determines: it consumes the pretrained layers.
        self.consumes = tuple(f"pretrain_layer{k}" for k in range(1, n_layers + 1))

    def model(self, ex: Experiment, s: View) -> nn.Module:
        sizes = list(s.model.sizes)
        fresh = [AutoEncoder(a, b, s.model.activation) for a, b in zip(sizes[:-1], sizes[1:],
                                                                        strict=True)]
        for ae, state in zip(fresh, ex.initial, strict=True):
            ae.encoder.load_state_dict(state)
        net = deep_network(ex, fresh)
        if ex.head_init is not None:
            net[1].load_state_dict(ex.head_init)
        return net

    def module(self, ex: Experiment, model: nn.Module, s: View) -> StageModule:
        return ClassifierModule(model, s.scratch, self.label, self.group,
                                dropout=s.scratch.dropout)

    def before_fit(self, ex: Experiment, s: View) -> None:
        torch.manual_seed(s.seed * 100_003 + SCRATCH_SEED)


def plan(cfg: DictConfig) -> list[Stage]:
    """The stages of `cfg`, in the order they run: a linear classifier on the pixels, one
    autoencoder per hidden layer, a probe on the frozen stack, the stack fine-tuned, and the same
    network trained from random weights."""
    n = len(cfg.model.sizes) - 1
    return [Baseline(), *(PretrainLayer(k) for k in range(1, n + 1)), Probe(n), Finetune(),
            *([Scratch(n)] if cfg.scratch.epochs > 0 else [])]


# ---------------------------------------------------------------------------------------------
# Fingerprints


def plain(value: Any) -> Any:
    """A config value as plain JSON data (enums as their names)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return value.value if isinstance(value, Enum) else value


def key_value(cfg: DictConfig, key: str) -> Any:
    """The resolved value of a stage key; a list element of a null list is null."""
    parent, _, last = key.rpartition(".")
    if last.isdigit():
        items = OmegaConf.select(cfg, parent)
        return None if items is None else plain(items[int(last)])
    return plain(OmegaConf.select(cfg, key, throw_on_missing=True))


def fingerprint(stage: str, inputs: dict, data: dict, consumes: dict) -> str:
    blob = json.dumps({"format": FORMAT, "stage": stage, "inputs": inputs, "data": data,
                       "consumes": consumes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class Expected:
    """What a stage's checkpoint must record to stand for it in this config, and the view of the
    config the stage reads."""

    stage: Stage
    inputs: dict[str, Any]
    data: dict[str, str]
    consumes: dict[str, str]
    fingerprint: str

    @property
    def settings(self) -> View:
        return View(self.stage.name, self.inputs)


def expected(cfg: DictConfig, data: dict[str, str]) -> dict[str, Expected]:
    """Each stage's fingerprint under `cfg`, with data files of checksums `data`, in order."""
    out: dict[str, Expected] = {}
    for stage in plan(cfg):
        inputs = {key: key_value(cfg, key) for key in stage.keys}
        consumes = {c: out[c].fingerprint for c in stage.consumes}
        out[stage.name] = Expected(stage, inputs, data, consumes,
                                   fingerprint(stage.name, inputs, data, consumes))
    return out
