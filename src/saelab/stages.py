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
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from saelab.autoencoder import AutoEncoder, classifier, stack_encoders
from saelab.data import Minibatches, Splits
from saelab.evaluation import CHUNK, classifier_metrics, in_chunks
from saelab.runfolder import FORMAT
from saelab.schema import Arm, Codes, HeadInit, leaves

if TYPE_CHECKING:  # the stages' builders import Lightning (modules) when they run: reading the
    # registry (the sweep summary, the benchmark's reference loops) imports neither Lightning nor
    # the NVML check it switches on (fastpath.NVML_CHECK)
    from saelab.modules import StageModule

log = logging.getLogger("saelab")

# Keys every stage reads: which images (and with labels, which of them are labelled), and the
# numerics that change results.
DATA = ("seed", "data.name", "data.classes", "data.pixels", "data.val_size", "data.train_limit")
LABELS = ("data.labels_per_class", "data.labelled_val_per_class")
NUMERICS = ("trainer.precision", "fastpath.matmul_precision")
# Scratch trains on a generator of its own (seeded from `seed` and this), so that adding it, or
# its dropout, changes no other stage's numbers.
SCRATCH_SEED = 104_729
SEMISUP_SEED = 130_363
VAL_NOISE_SEED = 611_953  # the fixed corruption of the validation inputs (+ the layer)


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
    scores: dict[str, float | None] = field(default_factory=dict)  # validation accuracy
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
    `view.model.sizes[1]`, enums as enums); any other key is an UndeclaredKey. (Its own names,
    `get`, `tuning`, `drawn` and `trial`, are no config key's.)"""

    def __init__(self, stage: str, values: dict[str, Any], prefix: str = "",
                 drawn: dict[str, Any] | None = None, trial: int | None = None):
        self._stage, self._values, self._prefix = stage, values, prefix
        self.drawn, self.trial = drawn or {}, trial  # a tuning trial's settings and number

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

    def tuning(self, group: str, space: list[str], seed: int, count: int) -> list[View]:
        """This view under each of `count` tuning trials: the space's keys that `group` has,
        drawn (saelab.tune)."""
        from saelab.tune import trial_settings

        keys = {k[len(group) + 1:] for k in self._values if k.startswith(f"{group}.")}
        return [View(self._stage, {**self._values, **{f"{group}.{k}": v for k, v in d.items()}},
                     drawn=d, trial=t)
                for t, d in enumerate(trial_settings(space, keys, seed, count))]


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
    own_stream: bool = False  # runs on a random stream of its own (changes no other number)
    tuned: bool = False  # trained once per tuning trial, the best on validation kept
    about: str = ""  # what it is, in a few words (the report's table)

    def inputs(self, ex: Experiment, s: View) -> tuple[torch.Tensor | None, ...]:
        """What it trains and selects on: x, y, val x, val y (y None without labels)."""
        return ex.labelled()

    def views(self, s: View) -> list[View]:
        """The settings it trains under: its own, or each of its tuning trials'."""
        return s.tuning(self.group, list(s.tune.space), s.seed, s.tune.trials) if self.tuned \
            else [s]

    def model(self, ex: Experiment, s: View) -> nn.Module:
        """Its network, freshly built (initial weights drawn from the random stream)."""
        raise NotImplementedError

    def module(self, ex: Experiment, model: nn.Module, s: View) -> StageModule:
        """The Lightning module that trains `model`."""
        from saelab.modules import ClassifierModule

        return ClassifierModule(model, s[self.group], self.label, self.group)

    def before_fit(self, ex: Experiment, s: View) -> None:
        """Called right before it is trained or loaded."""

    def keep(self, ex: Experiment, model: nn.Module, s: View) -> None:
        """Hand the trained network on to the stages after it."""
        ex.networks[self.name] = model

    def metrics(self, ex: Experiment, module: StageModule, s: View) -> dict:
        """Its entry in metrics.json (the pipeline adds its time, history and origin)."""
        out = classifier_metrics(ex.networks[self.name], ex.data)
        ex.scores[self.name] = out.get("val_acc")
        return out

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
        val = ex.inputs[1]
        if s.pretrain.noise.validation:  # one fixed corrupted copy: the denoising objective
            from saelab.modules import corrupt

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s.seed * 100_003 + VAL_NOISE_SEED + self.k)
                noisy = corrupt(val, s.pretrain.noise.kind, self.level(s), self.background(ex))
            return ex.inputs[0], None, noisy, val
        return ex.inputs[0], None, val, val

    def level(self, s: View) -> float:
        """Its noise level: its own entry of `noise.levels`, else `noise.level`."""
        own = s.pretrain.noise.levels[self.k - 1]
        return s.pretrain.noise.level if own is None else own

    def background(self, ex: Experiment) -> float:
        """What masking sets inputs to: black pixels for layer 1, zero codes above."""
        return ex.data.background if self.k == 1 else 0.0

    def model(self, ex: Experiment, s: View) -> nn.Module:
        ae = AutoEncoder(s.model.sizes[self.k - 1], s.model.sizes[self.k], s.model.activation,
                         s.model.tied)
        ex.initial.append(copy.deepcopy(ae.encoder.state_dict()))  # where scratch starts
        return ae

    def module(self, ex: Experiment, model: nn.Module, s: View) -> StageModule:
        from saelab.modules import AutoencoderModule

        return AutoencoderModule(model, s.pretrain, self.label, f"pretrain/layer{self.k}",
                                 background=self.background(ex), noise_level=self.level(s))

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
    """A linear head on the frozen codes of pretrained layer k: what the features learned up to
    that layer are worth to a linear classifier. The top layer's probe is fine-tuning's starting
    head; each layer below it has one too (`probe_layer{k}`), on a random stream of its own, so
    that probing every layer changes no other number. A probe that falls below the pixel
    baseline on validation says so."""

    group = "probe"

    def __init__(self, k: int, n_layers: int):
        self.k, self.top = k, k == n_layers
        self.name = "probe" if self.top else f"probe_layer{k}"
        self.label = "probe" if self.top else f"probe layer {k}"
        self.about = f"linear head on the frozen pretrained stack's layer-{k} codes"
        self.keys = DATA + LABELS + group_keys("probe") + NUMERICS
        self.consumes = tuple(f"pretrain_layer{j}" for j in range(1, k + 1))
        self.own_stream = not self.top

    def stack(self, ex: Experiment) -> nn.Sequential:
        """The frozen stack whose codes it reads."""
        return stack_encoders(ex.autoencoders[: self.k]).to(ex.device)

    def inputs(self, ex: Experiment, s: View) -> tuple[torch.Tensor | None, ...]:
        x, y, vx, vy = ex.labelled()
        if self.top:  # one stack per split, as saelab 0.1 built them: building a stack draws
            # initial weights, which come before the head's, so published numbers reproduce
            codes = [in_chunks(self.stack(ex), images) for images in (x, vx)]
        else:
            stack = self.stack(ex)
            codes = [in_chunks(stack, images) for images in (x, vx)]
        return codes[0], y, codes[1], vy

    def model(self, ex: Experiment, s: View) -> nn.Module:
        head = classifier(nn.Identity(), ex.autoencoders[self.k - 1].encoder.out_features,
                          ex.n_classes)
        if self.top:  # the head every deep network's starts from with model.head=random
            ex.head_init = copy.deepcopy(head[1].state_dict())
        return head

    def keep(self, ex: Experiment, model: nn.Module, s: View) -> None:
        """The network it stands for: the frozen stack topped by the trained head."""
        probe = deep_network(ex, ex.autoencoders[: self.k]).to(ex.device)
        probe[1].load_state_dict(model[1].state_dict())
        ex.networks[self.name] = probe

    def metrics(self, ex: Experiment, module: StageModule, s: View) -> dict:
        out = super().metrics(ex, module, s)
        pixels = ex.scores.get("baseline")
        if pixels is not None and out.get("val_acc", 1.0) < pixels:
            log.warning("%s: validation accuracy %.2f%% is below the pixel baseline's %.2f%%: "
                        "these features lose what the pixels have", self.label,
                        100 * out["val_acc"], 100 * pixels)
        return out

    def weights(self, ex: Experiment, s: View) -> int:
        return ex.cfg.model.sizes[self.k] * ex.n_classes


def initial_network(ex: Experiment) -> nn.Sequential:
    """The deep network at the very weights pretraining started from (the encoders) and the
    probe's initial head: no pretrained weight in it."""
    fresh = [AutoEncoder(ae.encoder.in_features, ae.encoder.out_features, ex.cfg.model.activation)
             for ae in ex.autoencoders]
    for ae, state in zip(fresh, ex.initial, strict=True):
        ae.encoder.load_state_dict(state)
    net = deep_network(ex, fresh)
    net[1].load_state_dict(ex.head_init)
    return net


class ScratchProbe(Probe):
    """The probe of the random stack scratch starts from: scratch's head with model.head=probe,
    so that scratch starts the way fine-tuning does (a head fitted on its frozen features)."""

    name = "probe_scratch"
    label = "probe (random stack)"
    about = "linear head on the frozen stack at its initial, random weights"
    own_stream = True
    top = False

    def __init__(self, n_layers: int):  # its own names: Probe's are a layer's
        self.k = n_layers
        self.keys = DATA + LABELS + group_keys("probe") + ("model.sizes", "model.activation") + \
            NUMERICS
        self.consumes = tuple(f"pretrain_layer{j}" for j in range(1, n_layers + 1))

    def stack(self, ex: Experiment) -> nn.Sequential:
        return initial_network(ex)[0].to(ex.device)

    def model(self, ex: Experiment, s: View) -> nn.Module:
        head = classifier(nn.Identity(), ex.autoencoders[-1].encoder.out_features, ex.n_classes)
        head[1].load_state_dict(ex.head_init)  # the probe's own start
        return head

    def keep(self, ex: Experiment, model: nn.Module, s: View) -> None:
        net = initial_network(ex).to(ex.device)
        net[1].load_state_dict(model[1].state_dict())
        ex.networks[self.name] = net

    def rebuild(self, ex: Experiment, s: View, state: dict) -> None:
        """Not kept by a run read back: its stack's initial weights are drawn, not saved (its
        numbers are in metrics.json, and scratch's checkpoint holds what scratch made of it)."""


def started(net: nn.Sequential, ex: Experiment, rule: HeadInit) -> nn.Sequential:
    """`net` (a copy) with its head as `model.head` says: kept (probe), zero, or the probe's
    initial head (random)."""
    net = copy.deepcopy(net)
    if rule == HeadInit.zero:
        nn.init.zeros_(net[1].weight)
        nn.init.zeros_(net[1].bias)
    elif rule == HeadInit.random:
        net[1].load_state_dict(ex.head_init)
    return net


class Finetune(Stage):
    """The pretrained stack and its head (`model.head`), trained end to end."""

    name = label = group = "finetune"
    about = "whole stack and head, end to end"
    consumes = ("probe",)
    trains_encoders = True

    def __init__(self, tuned: bool = False):
        self.tuned = tuned
        self.keys = (DATA + LABELS + group_keys(self.group) + ("model.head",) + NUMERICS
                     + (group_keys("tune") if tuned else ()))

    def model(self, ex: Experiment, s: View) -> nn.Module:
        return started(ex.networks["probe"], ex, s.model.head)

    def module(self, ex: Experiment, model: nn.Module, s: View) -> StageModule:
        settings = s[self.group]
        from saelab.modules import ClassifierModule

        return ClassifierModule(model, settings, self.label, self.group,
                                encoder_lr_scale=settings.get("encoder_lr_scale"),
                                dropout=settings.dropout, shift=settings.augment.shift,
                                background=ex.data.background)

    def weights(self, ex: Experiment, s: View) -> int:
        return deep_weights(ex)

    def rebuild(self, ex: Experiment, s: View, state: dict) -> None:
        model = deep_network(ex, ex.autoencoders)
        model.load_state_dict(state)
        self.keep(ex, model.to(ex.device).eval(), s)


class Scratch(Finetune):
    """The fine-tuned network's architecture from the very weights pretraining started from (the
    encoders) and the same head rule, trained end to end like fine-tuning: the control."""

    name = label = group = "scratch"
    about = "the same network from random weights, end to end"

    def __init__(self, n_layers: int, head: HeadInit, tuned: bool = False):
        super().__init__(tuned)
        self.keys = (*self.keys, "model.sizes", "model.activation")
        # It starts from the encoders' and the probe head's initial weights, which the random
        # stream of pretraining determines: it consumes the pretrained layers (and with
        # model.head=probe, the probe of its own random stack).
        self.consumes = (*(f"pretrain_layer{k}" for k in range(1, n_layers + 1)),
                         *((ScratchProbe.name,) if head == HeadInit.probe else ()))

    def model(self, ex: Experiment, s: View) -> nn.Module:
        if s.model.head == HeadInit.probe:
            return copy.deepcopy(ex.networks[ScratchProbe.name])
        return started(initial_network(ex), ex, s.model.head)

    def before_fit(self, ex: Experiment, s: View) -> None:
        torch.manual_seed(s.seed * 100_003 + SCRATCH_SEED)


class Semisup(Finetune):
    """Fine-tuning that also learns from every training image, unlabelled, through its own
    confident predictions (modules.SemisupModule); it sees no label outside the labelled
    subset."""

    name = label = group = "semisup"
    about = "fine-tuned on the labels and on pseudo-labels of the unlabelled images"

    def module(self, ex: Experiment, model: nn.Module, s: View) -> StageModule:
        settings = s.semisup
        steps = Minibatches.steps(self.n_samples(ex), settings.batch_size,
                                  settings.steps_per_epoch) * settings.epochs
        from saelab.modules import SemisupModule

        return SemisupModule(model, settings, self.label, self.group, ex.data.train_x, steps,
                             encoder_lr_scale=settings.encoder_lr_scale,
                             dropout=settings.dropout, shift=settings.augment.shift,
                             background=ex.data.background)

    def before_fit(self, ex: Experiment, s: View) -> None:
        torch.manual_seed(s.seed * 100_003 + SEMISUP_SEED)

    def weights(self, ex: Experiment, s: View) -> int:
        # Each step also reads an unlabelled minibatch twice (the clean prediction, the student).
        return deep_weights(ex) * (1 + 2 * s.semisup.unlabelled_batch_size //
                                   s.semisup.batch_size)


def plan(cfg: DictConfig) -> list[Stage]:
    """The stages of `cfg`, in the order they run: a linear classifier on the pixels; one
    autoencoder per hidden layer, each probed by a linear classifier on its frozen codes; the
    stack fine-tuned; the same network trained from random weights; and, if on, fine-tuning that
    also learns from the unlabelled images."""
    n = len(cfg.model.sizes) - 1
    tuned = set(cfg.tune.arms) if cfg.tune.trials else set()
    stages: list[Stage] = [Baseline()]
    for k in range(1, n + 1):
        stages += [PretrainLayer(k), Probe(k, n)]
    stages.append(Finetune(Arm.finetune in tuned))
    if cfg.scratch.epochs > 0:
        if cfg.model.head == HeadInit.probe:
            stages.append(ScratchProbe(n))
        stages.append(Scratch(n, cfg.model.head, Arm.scratch in tuned))
    if cfg.semisup.epochs > 0:
        stages.append(Semisup(Arm.semisup in tuned))
    return stages


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
