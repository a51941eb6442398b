"""The stage registry: every stage reads exactly the keys it declares (and fingerprints).

A stage reads its config through a view of its declared keys, so reading another one fails; what
the pipeline reads around the stages must not change a trained weight either. These tests prove
both on a real micro run: for every stage, every schema key it does not declare (with those of the
stages it consumes) is changed at once, and its trained weights must come out bit-identical; and
changing any key it declares must change its fingerprint.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saelab.api import execute
from saelab.config import kinds
from saelab.config.compose import compose_raw
from saelab.config.job import compose
from saelab.config.rules import validate
from saelab.config.schema import Key, leaves
from saelab.errors import ConfigError
from saelab.experiment.fingerprints import fingerprinted
from saelab.experiment.keys import UndeclaredKey, View
from saelab.experiment.stages import plan
from saelab.runs.checkpoints import read_checkpoint

# Three hidden layers (so that layers read list elements), every stage on, seconds per run.
MICRO = ["debug=quick", "model.sizes=[784,16,8,4]", "data.train_limit=300", "data.val_size=100",
         "data.test_limit=100", "data.batch_size=50", "visualize.actmax.steps=2",
         "visualize.embedding_points=10", "visualize.samples=[0,1]"]
# The same with a convolutional stack of three layers (28 -> 14 -> 7 -> 7).
CONV_MICRO = [*MICRO, "model.kind=conv", "model.conv.channels=[3,4,5]",
              "model.conv.kernels=[3,3,3]", "model.conv.pools=[2,2,1]"]
KINDS = pytest.mark.parametrize("micro_overrides", [MICRO, CONV_MICRO], ids=["dense", "conv"])
SUMS = {"train-images-idx3-ubyte": "0"}  # any data checksums: fingerprints only
# Keys that cannot change within one test process: where the run goes, and continuing one.
FIXED = {"resume", "trainer.devices", "trainer.strategy"}
# The keys `plan(cfg)` reads to decide which stages run (the depth, the arms, the tuned arms).
PLAN_KEYS = {"model.kind", "model.sizes", "model.conv.channels", "model.conv.kernels",
             "model.conv.pools", "model.head", "scratch.epochs", "semisup.epochs", "tune.trials",
             "tune.arms"}


def other_value(k: Key, value):
    """A valid value of key `k` other than `value` (None: no such value worth trying)."""
    if k.choices is not None:
        return next(c for c in k.choices if c != value)
    if isinstance(value, bool):
        return not value
    upper = k.bounds.get("le", k.bounds.get("lt", float("inf")))
    if isinstance(value, int) or (value is None and "int" in str(k.type)):
        bumped = (value or 0) + 2
        return bumped if bumped <= upper else (value or 0) - 1
    if isinstance(value, float) or (value is None and "float" in str(k.type)):
        bumped = (value or 0.05) * 2
        return bumped if bumped < upper else (value or 0.05) / 2
    if isinstance(value, str) or (value is None and "str" in str(k.type)):
        return None if value is None else f"{value}/."  # the same place, written otherwise
    return None


def perturbed(base: DictConfig, name: str, tmp: Path) -> tuple[DictConfig, list[str]]:
    """`base` with every schema key changed that leaves the declared keys of stage `name` and of
    the stages it consumes as they are (a key they interpolate, like `data.batch_size`, is one of
    them in effect), as far as the config stays valid; and the keys changed. List keys change
    their last element that no stage declares."""
    want = fingerprinted(base, SUMS)
    declared = closure(want, name)
    inputs = {n: want[n].values for n in want if set(want[n].stage.keys) <= declared}
    cfg, changed = copy.deepcopy(base), []
    for k in leaves():
        if k.path in declared or k.path in FIXED:
            continue
        current = OmegaConf.select(cfg, k.path)
        if isinstance(current, StrEnum):
            current = current.value
        if k.path == "store":
            new = str(tmp / "store")
        elif current is None and str(k.type).startswith("list"):  # a null list: give one
            if any(d.startswith(f"{k.path}.") for d in declared):
                continue
            new = [0.1] * kinds.depth(cfg.model) if "float" in str(k.type) else [0, 1]
        elif OmegaConf.is_list(current):
            items = list(current)
            free = [i for i in range(len(items)) if f"{k.path}.{i}" not in declared]
            if not free:
                continue
            items[free[-1]] += 1 if isinstance(items[free[-1]], int) else items[free[-1]]
            new = items
        else:
            new = other_value(k, current)
        if new is None:
            continue
        candidate = copy.deepcopy(cfg)
        try:
            OmegaConf.update(candidate, k.path, new, merge=False)
            validate(candidate)
        except (ConfigError, OmegaConfBaseException):
            continue
        now = fingerprinted(candidate, SUMS)
        if all(n in now and now[n].values == values for n, values in inputs.items()):
            cfg = candidate
            changed.append(k.path)
    return cfg, changed


def closure(plan, name: str) -> set[str]:
    """The keys a stage declares, with those of every stage it consumes, transitively."""
    planned = plan[name]
    return set(planned.stage.keys).union(*(closure(plan, c) for c in planned.stage.consumes))


def test_a_view_gives_declared_keys_typed_and_refuses_every_other():
    view = View("x", {"pretrain.lr": 1e-3, "pretrain.optimizer": "adam", "model.sizes.1": 49})
    assert view.pretrain.lr == 1e-3 and view.model.sizes[1] == 49
    assert view.pretrain.optimizer.__class__.__name__ == "Optimizer"
    with pytest.raises(UndeclaredKey, match="stage x reads pretrain.epochs"):
        _ = view.pretrain.epochs
    with pytest.raises(UndeclaredKey, match="model.sizes.0"):
        _ = view.model.sizes[0]


@pytest.mark.slow
@KINDS
def test_changing_any_declared_key_changes_the_fingerprint(micro_overrides):
    micro = compose(micro_overrides)
    base = fingerprinted(micro, SUMS)
    changed = functools.cache(lambda o: fingerprinted(compose_raw([*micro_overrides, o]),
                                                      SUMS))  # valid or
    for name, planned in base.items():  # not
        for key in planned.stage.keys:
            parent, _, last = key.rpartition(".")
            path = parent if last.isdigit() else key
            k = next(k for k in leaves() if k.path == path)
            value = OmegaConf.select(micro, path)
            if OmegaConf.is_list(value):  # one element, or the whole list one shorter
                items = list(value)
                if last.isdigit():
                    items[int(last)] = items[int(last)] + 1
                new = f"[{','.join(map(str, items if last.isdigit() else items[:-1]))}]"
            elif value is None and last.isdigit():  # an element of a null list: give the list
                new = f"[{','.join(['0.1'] * kinds.depth(micro.model))}]"
            else:
                new = other_value(k, value.value if isinstance(value, StrEnum) else value)
            if new is None:
                continue
            now = changed(f"{path}={new}")
            if name not in now:  # the change took the stage out of the plan: only a key that
                assert path in PLAN_KEYS, key  # decides which stages run may do that
                continue
            assert now[name].fingerprint != planned.fingerprint, key


@pytest.mark.slow
@KINDS
def test_keys_a_stage_does_not_declare_leave_its_trained_weights_bit_identical(tmp_path,
                                                                               micro_overrides):
    cfg = compose(micro_overrides)
    reference = tmp_path / "reference"
    execute(cfg, reference)
    want = fingerprinted(cfg, SUMS)
    assert {s.name for s in plan(cfg)} == set(want)
    for name in want:
        changed_cfg, changed = perturbed(cfg, name, tmp_path)
        assert len(changed) > 20, (name, changed)  # much of the schema changed at once
        run_dir = tmp_path / name
        execute(changed_cfg, run_dir)
        mine = read_checkpoint(run_dir / "checkpoints" / f"{name}.pt")["state_dict"]
        ref = read_checkpoint(reference / "checkpoints" / f"{name}.pt")["state_dict"]
        assert mine.keys() == ref.keys()
        for key, value in ref.items():
            assert torch.equal(mine[key], value), (name, key, changed)


@pytest.mark.slow
def test_reading_the_registry_imports_no_lightning():
    """The benchmark's reference loops read the registry: Lightning, imported, would switch on
    its NVML check and make every Adam step of theirs ask NVML about CUDA."""
    code = ("import os, sys, saelab.experiment.stages; print('pytorch_lightning' in sys.modules, "
            "'PYTORCH_NVML_BASED_CUDA_CHECK' in os.environ)")
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.split() == ["False", "False"]


@KINDS
@pytest.mark.parametrize("labels", [None, 3], ids=["every label", "3 labels per class"])
@pytest.mark.parametrize("codes", ["activation", "pre_activation"])
def test_the_codes_pretraining_hands_on_are_the_frozen_stacks(micro_overrides, labels, codes):
    """Each pretrained layer computes its codes of every split once (PretrainLayer.keep): the
    next layer learns from them, its metrics decode them, and its probe trains on them and is
    measured on them when every image is labelled. They must be, bit for bit, what the frozen
    stack computes from the pixels, as a probe computes them otherwise; above a layer that
    learnt the pre-activations below it they are not, and none are handed on as the stack's."""
    from saelab.data.splits import load_splits
    from saelab.experiment.state import Experiment
    from saelab.nn.evaluation import classifier_metrics, in_chunks
    from saelab.nn.networks import StackedNet

    cfg = compose([*micro_overrides, f"data.labels_per_class={labels or 'null'}",
                   f"pretrain.codes={codes}"])
    data = load_splits(cfg.data, cfg.seed, "cpu")
    experiment = Experiment(cfg, torch.device("cpu"), data)
    stages = fingerprinted(cfg, data.checksums)
    for k in range(1, kinds.depth(cfg.model) + 1):
        pretrain = stages[f"pretrain_layer{k}"]
        pretrain.stage.training_data(experiment, pretrain.settings)
        pretrain.stage.keep(experiment, pretrain.stage.model(experiment, pretrain.settings),
                            pretrain.settings)
        stack = StackedNet.from_autoencoders(experiment.autoencoders, None)
        stack_codes = [in_chunks(stack.codes, x) for x in (data.train_x, data.val_x, data.test_x)]
        if k == 1 or codes == "activation":
            for ours, its in zip(experiment.stack_codes, stack_codes, strict=True):
                assert torch.equal(ours, its)
        else:
            assert not torch.equal(experiment.layer_codes[0], stack_codes[0])
            assert experiment.stack_codes == ()
        probe = stages["probe" if k == kinds.depth(cfg.model) else f"probe_layer{k}"]
        x, _, val_x, _ = probe.stage.training_data(experiment, probe.settings)
        train_x, _, labelled_val_x, _ = experiment.labelled()
        assert torch.equal(x, in_chunks(stack.codes, train_x))
        assert torch.equal(val_x, in_chunks(stack.codes, labelled_val_x))
        # Its metrics read them too: its head on them measures what the whole network does.
        head = probe.stage.model(experiment, probe.settings)
        probe.stage.keep(experiment, head, probe.settings)
        model, inputs = probe.stage.measured(experiment, SimpleNamespace(model=head))
        network = experiment.networks[probe.stage.name]
        assert classifier_metrics(model, data, inputs) == classifier_metrics(network, data)
