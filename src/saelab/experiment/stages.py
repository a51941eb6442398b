"""The stages of an experiment, in one place: for each, its name, label and config group, the config
keys it reads, the stages it consumes, whether it sees labels, how its network is built and handed
on, its work, and how a finished run's folder rebuilds it.

`plan(cfg)` lists the stages of a config in the order they run; the recipe walks it, and the
fingerprints, the run reader, the progress display, the terminal table, the report, the sweep
summary, the robustness study and the benchmark read it. Adding a stage is one entry in `plan`
plus its class here (and its Lightning module): docs/development.md, "Add a stage".
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from saelab.config import kinds
from saelab.config.schema import Arm, Codes, HeadInit, Kind
from saelab.data.batches import Minibatches
from saelab.data.transforms import corrupt
from saelab.experiment.keys import DATA, LABEL_KEYS, NUMERICS, View, group_keys
from saelab.experiment.state import Experiment
from saelab.nn.evaluation import CHUNK, classifier_metrics, in_chunks
from saelab.nn.networks import AUTOENCODERS, LayerAutoEncoder, StackedNet
from saelab.seeds import substream

if TYPE_CHECKING:  # the stages' builders import Lightning (nn.modules) when they run: reading the
    # registry (the sweep summary, the benchmark's reference loops) imports neither Lightning nor
    # the NVML check it switches on (nn.fastpath.NVML_CHECK)
    from saelab.nn.modules import StageModule

log = logging.getLogger("saelab")

# The salts of the random streams of their own (saelab.seeds) that stages train on, so that
# adding one (scratch, semi-supervised fine-tuning), or its dropout, changes no other number.
SCRATCH_SALT = 104_729
SEMISUP_SALT = 130_363
VAL_NOISE_SALT = 611_953  # the fixed corruption of the validation inputs (+ the layer)


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
    trains_encoders: bool = False  # its network's encoders are trained by it
    own_stream: bool = False  # runs on a random stream of its own (changes no other number)
    tuned: bool = False  # trained once per tuning trial, the best on validation kept
    about: str = ""  # what it is, in a few words (the report's table)

    def training_data(self, experiment: Experiment, settings: View
                      ) -> tuple[torch.Tensor | None, ...]:
        """What it trains and selects on: x, y, val x, val y (y None without labels)."""
        return experiment.labelled()

    def trials(self, settings: View) -> list[View]:
        """The settings it trains under: its own, or each of its tuning trials'."""
        if not self.tuned:
            return [settings]
        return settings.tuning(self.group, list(settings.tune.space), settings.seed,
                               settings.tune.trials)

    def model(self, experiment: Experiment, settings: View) -> torch.nn.Module:
        """Its network, freshly built (initial weights drawn from the random stream)."""
        raise NotImplementedError

    def module(self, experiment: Experiment, model: torch.nn.Module, settings: View
               ) -> StageModule:
        """The Lightning module that trains `model`."""
        from saelab.nn.modules import ClassifierModule

        return ClassifierModule(model, settings[self.group], self.label, self.group)

    def before_fit(self, experiment: Experiment, settings: View) -> None:
        """Called right before it is trained or loaded."""

    def keep(self, experiment: Experiment, model: torch.nn.Module, settings: View) -> None:
        """Hand the trained network on to the stages after it."""
        experiment.networks[self.name] = model

    def metrics(self, experiment: Experiment, module: StageModule, settings: View) -> dict:
        """Its entry in metrics.json (the recipe adds its time, history and origin)."""
        model, inputs = self.measured(experiment, module)
        out = classifier_metrics(model, experiment.data, inputs)
        experiment.scores[self.name] = out.get("val_acc")
        return out

    def measured(self, experiment: Experiment, module: StageModule
                 ) -> tuple[torch.nn.Module, tuple | None]:
        """The network its metrics measure, and what it reads of the labelled validation and the
        test images (None: the images)."""
        return experiment.networks[self.name], None

    def weights(self, experiment: Experiment, settings: View) -> int:
        """Weights of the network it trains: its work per sample, for time estimates."""
        raise NotImplementedError

    def n_samples(self, experiment: Experiment) -> int:
        """Training samples in one pass."""
        data = experiment.data
        return len(data.labelled("train")[1]) if self.labelled else len(data.train_y)

    def rebuild(self, experiment: Experiment, settings: View, state: dict) -> None:
        """A finished run read back: its trained network from its checkpoint, handed on."""
        model = self.model(experiment, settings)
        model.load_state_dict(state)
        self.keep(experiment, model.to(experiment.device).eval(), settings)


def deep_network(experiment: Experiment, autoencoders: list[LayerAutoEncoder]) -> StackedNet:
    """The stacked encoders of `autoencoders` topped by a fresh linear head."""
    return StackedNet.from_autoencoders(autoencoders, experiment.n_classes)


def deep_weights(experiment: Experiment) -> int:
    """Multiply-adds of the deep classifier per sample: every encoder and the head (for a dense
    stack, its weights)."""
    model = experiment.cfg.model
    kind, n = kinds.kind_of(model), kinds.depth(model)
    return (sum(kind.macs(model, k) for k in range(1, n + 1))
            + kinds.sizes(model)[-1] * experiment.n_classes)


class Baseline(Stage):
    name = label = group = "baseline"
    about = "softmax regression on pixels"
    keys = DATA + LABEL_KEYS + group_keys("baseline") + NUMERICS

    def model(self, experiment: Experiment, settings: View) -> StackedNet:
        return StackedNet([28 * 28], experiment.n_classes)

    def weights(self, experiment: Experiment, settings: View) -> int:
        return 28 * 28 * experiment.n_classes


class PretrainLayer(Stage):
    """Greedy pretraining of hidden layer k, without labels, on the codes of the layer below."""

    group = "pretrain"
    labelled = classifies = False

    def __init__(self, k: int, kind: Kind):
        self.k = k
        self.name, self.label = f"pretrain_layer{k}", f"pretrain layer {k}"
        self.kind = kinds.KINDS[kind]
        # Its own shape and noise level, and (from layer 2) the codes of the layer below, which
        # are `pretrain.codes`: nothing of the layers above it.
        own = ("model.kind", *self.kind.layer_keys(k), "model.activation", "model.tied",
               f"pretrain.noise.levels.{k - 1}")
        keys = group_keys("pretrain", "pretrain.noise.levels",
                          *(("pretrain.codes",) if k == 1 else ()))
        self.keys = DATA + own + keys + NUMERICS
        self.consumes = (f"pretrain_layer{k - 1}",) if k > 1 else ()

    def training_data(self, experiment: Experiment, settings: View
                      ) -> tuple[torch.Tensor | None, ...]:
        data = experiment.data
        if self.k == 1:
            experiment.layer_inputs = (data.train_x, data.val_x, data.test_x)
        elif settings.pretrain.codes == Codes.activation:  # the codes of the layer below
            experiment.layer_inputs = experiment.layer_codes
        else:  # or its pre-activations, as this layer is to learn them
            below = experiment.autoencoders[-1].encoder
            experiment.layer_inputs = tuple(in_chunks(below, x) for x in experiment.layer_inputs)
        train, val = experiment.layer_inputs[:2]
        if settings.pretrain.noise.validation:  # one fixed corrupted copy: the denoising target
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(substream(settings.seed, VAL_NOISE_SALT + self.k))
                noisy = corrupt(val, settings.pretrain.noise.kind, self.level(settings),
                                self.background(experiment))
            return train, None, noisy, val
        return train, None, val, val

    def level(self, settings: View) -> float:
        """Its noise level: its own entry of `noise.levels`, else `noise.level`."""
        own = settings.pretrain.noise.levels[self.k - 1]
        return settings.pretrain.noise.level if own is None else own

    def background(self, experiment: Experiment) -> float:
        """What masking sets inputs to: black pixels for layer 1, zero codes above."""
        return experiment.data.background if self.k == 1 else 0.0

    def model(self, experiment: Experiment, settings: View) -> LayerAutoEncoder:
        model = settings.model
        ae = AUTOENCODERS[model.kind].of(model, self.k)
        experiment.initial.append(copy.deepcopy(ae.encoder.state_dict()))  # where scratch starts
        return ae

    def module(self, experiment: Experiment, model: LayerAutoEncoder, settings: View
               ) -> StageModule:
        from saelab.nn.modules import AutoencoderModule

        return AutoencoderModule(model, settings.pretrain, self.label, f"pretrain/layer{self.k}",
                                 background=self.background(experiment),
                                 noise_level=self.level(settings))

    def keep(self, experiment: Experiment, model: LayerAutoEncoder, settings: View) -> None:
        """Hands on the autoencoder and its codes of every split, computed once: its metrics,
        its probe and the next layer read them (a finished run read back has no inputs)."""
        experiment.autoencoders.append(model.eval())
        experiment.layer_codes = tuple(in_chunks(model.encode, x) for x in experiment.layer_inputs)
        # They are the frozen stack's codes where every layer learnt from the codes below it;
        # above a layer that learnt pre-activations, the stack's codes are not what it computed.
        stacked = self.k == 1 or settings.pretrain.codes == Codes.activation
        experiment.stack_codes = experiment.layer_codes if stacked else ()

    def metrics(self, experiment: Experiment, module: StageModule, settings: View) -> dict:
        """Sizes and shape of its codes, noise level, the reconstruction MSE per value on each
        split's inputs, and the encoder's contraction on the validation inputs (its Jacobian's
        squared norm, averaged: what `pretrain.contractive` penalises, reported for every
        autoencoder)."""
        ae = module.model
        d_in, d_out = ae.sizes
        out = {"in": d_in, "out": d_out, "shape": list(ae.shapes[1]),
               "noise_level": module.noise_level}
        inputs = [list(zip(x.split(CHUNK), codes.split(CHUNK), strict=True)) if len(x) else []
                  for x, codes in zip(experiment.layer_inputs, experiment.layer_codes, strict=True)]
        for split, parts in zip(("train", "val", "test"), inputs, strict=True):
            if parts:
                errors, counts = zip(*(module.evaluate(x, codes=codes) for x, codes in parts),
                                     strict=True)
                out[f"{split}_recon_mse"] = sum(map(float, errors)) / sum(map(float, counts))
        val = inputs[1]
        if val:
            with torch.no_grad():
                out["val_contraction"] = (sum(float(ae.contraction(x, codes)) * len(x)
                                              for x, codes in val) / sum(len(x) for x, _ in val))
        return out

    def weights(self, experiment: Experiment, settings: View) -> int:
        return 2 * self.kind.macs(settings.model, self.k)  # encoder and decoder


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
        self.keys = DATA + LABEL_KEYS + group_keys("probe") + NUMERICS
        self.consumes = tuple(f"pretrain_layer{j}" for j in range(1, k + 1))
        self.own_stream = not self.top

    def stack(self, experiment: Experiment) -> StackedNet:
        """The frozen stack whose codes it reads (building one draws its initial weights)."""
        return StackedNet.from_autoencoders(experiment.autoencoders[: self.k], None).to(
            experiment.device)

    def training_data(self, experiment: Experiment, settings: View
                      ) -> tuple[torch.Tensor | None, ...]:
        x, y, val_x, val_y = experiment.labelled()
        # The top probe builds one stack per split, as saelab 0.1 did: building a stack draws
        # initial weights, which come before the head's, so published numbers reproduce.
        stack = self.stack(experiment)
        val_stack = self.stack(experiment) if self.top else stack
        codes = self.known_codes(experiment) or (in_chunks(stack.codes, x),
                                                 in_chunks(val_stack.codes, val_x))
        return codes[0], y, codes[1], val_y

    def known_codes(self, experiment: Experiment) -> tuple[torch.Tensor, ...]:
        """Its codes of the labelled train, validation and test images where pretraining computed
        them already as its frozen stack's, and every image is labelled (the same rows, in the
        same chunks, so the same numbers as its frozen stack's)."""
        data = experiment.data
        whole = data.labelled_train is None and data.labelled_val is None
        return experiment.stack_codes if whole else ()

    def measured(self, experiment: Experiment, module: StageModule
                 ) -> tuple[torch.nn.Module, tuple | None]:
        """Its head on the known codes (the whole network's numbers, without its stack's
        forward pass over the images again), else the network on the images."""
        codes = self.known_codes(experiment)
        return (module.model, codes[1:]) if codes else super().measured(experiment, module)

    def model(self, experiment: Experiment, settings: View) -> StackedNet:
        head = StackedNet([experiment.autoencoders[self.k - 1].sizes[1]], experiment.n_classes)
        if self.top:  # the head every deep network's starts from with model.head=random
            experiment.head_init = copy.deepcopy(head.head.state_dict())
        return head

    def keep(self, experiment: Experiment, model: StackedNet, settings: View) -> None:
        """The network it stands for: the frozen stack topped by the trained head."""
        probe = deep_network(experiment, experiment.autoencoders[: self.k]).to(experiment.device)
        probe.head.load_state_dict(model.head.state_dict())
        experiment.networks[self.name] = probe

    def metrics(self, experiment: Experiment, module: StageModule, settings: View) -> dict:
        out = super().metrics(experiment, module, settings)
        pixels = experiment.scores.get("baseline")
        if pixels is not None and out.get("val_acc", 1.0) < pixels:
            log.warning("%s: validation accuracy %.2f%% is below the pixel baseline's %.2f%%: "
                        "these features lose what the pixels have", self.label,
                        100 * out["val_acc"], 100 * pixels)
        return out

    def weights(self, experiment: Experiment, settings: View) -> int:
        return kinds.sizes(experiment.cfg.model)[self.k] * experiment.n_classes


def initial_network(experiment: Experiment) -> StackedNet:
    """The deep network at the very weights pretraining started from (the encoders) and the
    probe's initial head: no pretrained weight in it."""
    fresh = [ae.untrained() for ae in experiment.autoencoders]
    for ae, state in zip(fresh, experiment.initial, strict=True):
        ae.encoder.load_state_dict(state)
    net = deep_network(experiment, fresh)
    net.head.load_state_dict(experiment.head_init)
    return net


class ScratchProbe(Probe):
    """The probe of the random stack scratch starts from: scratch's head with model.head=probe,
    so that scratch starts the way fine-tuning does (a head fitted on its frozen features)."""

    name = "probe_scratch"
    label = "probe (random stack)"
    about = "linear head on the frozen stack at its initial, random weights"
    own_stream = True
    top = False

    def __init__(self, n_layers: int, model_keys: tuple[str, ...]):  # its own names: Probe's
        self.k = n_layers  # are a layer's
        self.keys = DATA + LABEL_KEYS + group_keys("probe") + model_keys + NUMERICS
        self.consumes = tuple(f"pretrain_layer{j}" for j in range(1, n_layers + 1))

    def stack(self, experiment: Experiment) -> StackedNet:
        return initial_network(experiment).to(experiment.device)

    def known_codes(self, experiment: Experiment) -> tuple[torch.Tensor, ...]:
        return ()  # the random stack's codes are its own

    def model(self, experiment: Experiment, settings: View) -> StackedNet:
        head = StackedNet([experiment.autoencoders[-1].sizes[1]], experiment.n_classes)
        head.head.load_state_dict(experiment.head_init)  # the probe's own start
        return head

    def keep(self, experiment: Experiment, model: StackedNet, settings: View) -> None:
        net = initial_network(experiment).to(experiment.device)
        net.head.load_state_dict(model.head.state_dict())
        experiment.networks[self.name] = net

    def rebuild(self, experiment: Experiment, settings: View, state: dict) -> None:
        """Not kept by a run read back: its stack's initial weights are drawn, not saved (its
        numbers are in metrics.json, and scratch's checkpoint holds what scratch made of it)."""


def started(net: StackedNet, experiment: Experiment, rule: HeadInit) -> StackedNet:
    """`net` (a copy) with its head as `model.head` says: kept (probe), zero, or the probe's
    initial head (random)."""
    net = copy.deepcopy(net)
    if rule == HeadInit.zero:
        torch.nn.init.zeros_(net.head.weight)
        torch.nn.init.zeros_(net.head.bias)
    elif rule == HeadInit.random:
        net.head.load_state_dict(experiment.head_init)
    return net


class Finetune(Stage):
    """The pretrained stack and its head (`model.head`), trained end to end."""

    name = label = group = "finetune"
    about = "whole stack and head, end to end"
    consumes = ("probe",)
    trains_encoders = True

    def __init__(self, tuned: bool = False):
        self.tuned = tuned
        self.keys = (DATA + LABEL_KEYS + group_keys(self.group) + ("model.head",) + NUMERICS
                     + (group_keys("tune") if tuned else ()))

    def model(self, experiment: Experiment, settings: View) -> StackedNet:
        return started(experiment.networks["probe"], experiment, settings.model.head)

    def module(self, experiment: Experiment, model: StackedNet, settings: View) -> StageModule:
        from saelab.nn.modules import ClassifierModule

        own = settings[self.group]
        return ClassifierModule(model, own, self.label, self.group,
                                encoder_lr_scale=own.get("encoder_lr_scale"),
                                dropout=own.dropout, shift=own.augment.shift,
                                background=experiment.data.background)

    def weights(self, experiment: Experiment, settings: View) -> int:
        return deep_weights(experiment)

    def rebuild(self, experiment: Experiment, settings: View, state: dict) -> None:
        model = deep_network(experiment, experiment.autoencoders)
        model.load_state_dict(state)
        self.keep(experiment, model.to(experiment.device).eval(), settings)


class Scratch(Finetune):
    """The fine-tuned network's architecture from the very weights pretraining started from (the
    encoders) and the same head rule, trained end to end like fine-tuning: the control."""

    name = label = group = "scratch"
    about = "the same network from random weights, end to end"

    def __init__(self, n_layers: int, head: HeadInit, model_keys: tuple[str, ...],
                 tuned: bool = False):
        super().__init__(tuned)
        self.keys = (*self.keys, *model_keys)
        # It starts from the encoders' and the probe head's initial weights, which the random
        # stream of pretraining determines: it consumes the pretrained layers (and with
        # model.head=probe, the probe of its own random stack).
        self.consumes = (*(f"pretrain_layer{k}" for k in range(1, n_layers + 1)),
                         *((ScratchProbe.name,) if head == HeadInit.probe else ()))

    def model(self, experiment: Experiment, settings: View) -> StackedNet:
        if settings.model.head == HeadInit.probe:
            return copy.deepcopy(experiment.networks[ScratchProbe.name])
        return started(initial_network(experiment), experiment, settings.model.head)

    def before_fit(self, experiment: Experiment, settings: View) -> None:
        torch.manual_seed(substream(settings.seed, SCRATCH_SALT))


class Semisup(Finetune):
    """Fine-tuning that also learns from every training image, unlabelled, through its own
    confident predictions (nn.modules.SemisupModule); it sees no label outside the labelled
    subset."""

    name = label = group = "semisup"
    about = "fine-tuned on the labels and on pseudo-labels of the unlabelled images"

    def module(self, experiment: Experiment, model: StackedNet, settings: View) -> StageModule:
        from saelab.nn.modules import SemisupModule

        own = settings.semisup
        steps = Minibatches.steps(self.n_samples(experiment), own.batch_size,
                                  own.steps_per_epoch) * own.epochs
        return SemisupModule(model, own, self.label, self.group, experiment.data.train_x, steps,
                             encoder_lr_scale=own.encoder_lr_scale, dropout=own.dropout,
                             shift=own.augment.shift, background=experiment.data.background)

    def before_fit(self, experiment: Experiment, settings: View) -> None:
        torch.manual_seed(substream(settings.seed, SEMISUP_SALT))

    def weights(self, experiment: Experiment, settings: View) -> int:
        # Each step also reads an unlabelled minibatch twice (the clean prediction, the student).
        own = settings.semisup
        return deep_weights(experiment) * (1 + 2 * own.unlabelled_batch_size // own.batch_size)


def plan(cfg: DictConfig) -> list[Stage]:
    """The stages of `cfg`, in the order they run: a linear classifier on the pixels; one
    autoencoder per hidden layer, each probed by a linear classifier on its frozen codes; the
    stack fine-tuned; the same network trained from random weights; and, if on, fine-tuning that
    also learns from the unlabelled images."""
    n, architecture = kinds.depth(cfg.model), kinds.model_keys(cfg.model)
    tuned = set(cfg.tune.arms) if cfg.tune.trials else set()
    stages: list[Stage] = [Baseline()]
    for k in range(1, n + 1):
        stages += [PretrainLayer(k, Kind(cfg.model.kind)), Probe(k, n)]
    stages.append(Finetune(Arm.finetune in tuned))
    if cfg.scratch.epochs > 0:
        if cfg.model.head == HeadInit.probe:
            stages.append(ScratchProbe(n, architecture))
        stages.append(Scratch(n, cfg.model.head, architecture, Arm.scratch in tuned))
    if cfg.semisup.epochs > 0:
        stages.append(Semisup(Arm.semisup in tuned))
    return stages
