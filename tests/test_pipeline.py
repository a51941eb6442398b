"""The experiment on a slice of real MNIST: metrics, the networks each stage leaves, the scratch
control, learning from few labels, dropout."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    QUICK,
    TINY,
    assert_accuracy_matches_its_confusion_matrix,
    compose_cfg,
    epochs,
    layers,
    run_cli,
)

from saelab.api import execute
from saelab.config.job import compose
from saelab.data.batches import EvalBatches, Minibatches
from saelab.data.splits import load_splits
from saelab.experiment.fingerprints import fingerprinted
from saelab.experiment.stages import plan
from saelab.nn.modules import AutoencoderModule, ClassifierModule
from saelab.nn.networks import AutoEncoder, StackedNet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An in-process quick run, for tests that look at the trained networks; scratch with a
    vanishing learning rate ends where it started."""
    return execute(compose([*QUICK, "scratch.lr=1e-12"]), tmp_path_factory.mktemp("run"))


def test_stack_equals_sequential_encoders_and_probe_keeps_them(tiny):
    x = tiny.data.test_x[:64]
    h = x
    for ae in tiny.autoencoders:
        h = ae.encode(h)
    assert torch.allclose(StackedNet.from_autoencoders(tiny.autoencoders, None).codes(x), h,
                          atol=1e-6)
    assert torch.allclose(tiny.networks["probe"].codes(x), h, atol=1e-6)
    probe_linears, tuned_linears = (tiny.networks[n].encoders for n in ("probe", "finetune"))
    for ae, probed, tuned in zip(tiny.autoencoders, probe_linears, tuned_linears, strict=True):
        assert torch.equal(probed.weight, ae.encoder.weight)  # bit-identical after the probe
        assert torch.equal(probed.bias, ae.encoder.bias)
        assert not torch.equal(tuned.weight, ae.encoder.weight)  # fine-tuning moved them
    # the fine-tuned model starts from the probe's head, then trains it
    tuned, probe = tiny.networks["finetune"].head, tiny.networks["probe"].head
    assert not torch.equal(tuned.weight, probe.weight)


def test_scratch_starts_from_the_encoders_initial_weights_and_never_sees_pretrained_ones(tiny):
    """With a vanishing learning rate scratch ends where it started: at the initial weights of
    each autoencoder's encoder and of the probe's head, re-drawn here from the random state each
    checkpoint recorded (autoencoder k is drawn right after layer k-1 ends)."""
    run = tiny
    ckpt = {p.stem: torch.load(p, weights_only=True) for p in (run.dir / "checkpoints").iterdir()}
    pl.seed_everything(0, verbose=False)
    torch.nn.Linear(784, 10)  # the baseline's head
    linears = run.networks["scratch"].encoders
    for k, (lin, ae) in enumerate(zip(linears, run.autoencoders, strict=True), start=1):
        if k > 1:
            torch.set_rng_state(ckpt[f"pretrain_layer{k - 1}"]["rng"]["cpu"])
        initial = AutoEncoder(ae.encoder.in_features, ae.encoder.out_features).encoder
        torch.testing.assert_close(lin.weight, initial.weight, rtol=0, atol=1e-9)
        assert (lin.weight - ae.encoder.weight).abs().max() > 1e-3  # not the pretrained ones
    torch.set_rng_state(ckpt["pretrain_layer2"]["rng"]["cpu"])
    StackedNet.from_autoencoders(run.autoencoders, None)  # the probe's frozen stacks are built
    StackedNet.from_autoencoders(run.autoencoders, None)  # first, one per split
    head = torch.nn.Linear(9, 10)  # the probe's head, before the probe trained it
    torch.testing.assert_close(run.networks["scratch"].head.weight, head.weight, rtol=0, atol=1e-9)
    assert not torch.equal(run.networks["probe"].head.weight, head.weight)


def test_tiny_in_process_run_metrics_and_fingerprints(tiny):
    m = tiny.metrics
    assert m["data"] | {"n_train": 600, "n_val": 200, "n_test": 300, "n_labelled_train": 600,
                        "n_labelled_val": 200} == m["data"]
    want = fingerprinted(tiny.cfg, m["data"]["checksums"])
    for name in ("baseline", "probe", "finetune", "scratch"):
        assert m[name]["fingerprint"] == want[name].fingerprint and m[name]["origin"] == "trained"
    assert [layer["fingerprint"] for layer in layers(m)] == [
        want[f"pretrain_layer{k}"].fingerprint for k in (1, 2)]
    assert set(m["versions"]) == {"python", "saelab", "torch", "lightning", "hydra", "omegaconf",
                                  "tensorboard"}
    assert m["device"].startswith("cpu")


def test_autoencoder_loss_decreases():
    cfg = compose_cfg(*TINY, "pretrain.epochs=3")
    data = load_splits(cfg.data, seed=0)
    ae = AutoEncoder(784, 196)
    stage = AutoencoderModule(ae, cfg.pretrain, "pretrain layer 1", "pretrain/layer1")
    before = stage.evaluate(data.val_x)
    pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        stage, Minibatches(data.train_x, None, 128), EvalBatches(data.val_x, data.val_x))
    after = stage.evaluate(data.val_x)
    losses = [h["train_loss"] for h in stage.history if "train_loss" in h]  # epoch 0: a check
    assert losses[0] > losses[1] > losses[2]
    assert after[0] / after[1] < 0.5 * before[0] / before[1]


def test_labels_per_class_subsets_what_the_labelled_stages_see():
    full = load_splits(compose_cfg(*QUICK).data, seed=0)
    cfg = compose(["data.labels_per_class=7", "data.labelled_val_per_class=3", *QUICK])
    few = load_splits(cfg.data, seed=0)
    # pretraining's splits are those of a run with every label
    assert torch.equal(few.train_x, full.train_x) and torch.equal(few.val_x, full.val_x)
    x, y = few.labelled("train")
    assert torch.bincount(y).tolist() == [7] * 10 and len(x.unique(dim=0)) == 70
    _, vy = few.labelled("val")
    assert torch.bincount(vy).tolist() == [3] * 10
    assert few.summary()["n_labelled_train"] == 70 and few.summary()["n_labelled_val"] == 30
    # labelled images are training images, drawn per seed
    rows = {r.numpy().tobytes() for r in few.train_x}
    assert all(r.numpy().tobytes() in rows for r in x)
    other = load_splits(cfg.data, seed=1)
    assert not torch.equal(other.labelled("train")[0], x)
    # the validation subset defaults to labels_per_class, capped at the split's classes
    default = load_splits(compose(["data.labels_per_class=50", *QUICK]).data, seed=0)
    assert torch.bincount(default.labelled("val")[1]).tolist() == torch.clamp(
        torch.bincount(default.val_y), max=50).tolist()


def test_pretraining_fingerprint_does_not_depend_on_labels_per_class():
    sums = {"f": "0"}
    runs = [fingerprinted(compose([*QUICK, *extra]), sums)
            for extra in ([], ["data.labels_per_class=10"], ["data.labels_per_class=50"])]
    assert len({r["pretrain_layer1"].fingerprint for r in runs}) == 1
    for stage in ("baseline", "probe", "finetune", "scratch"):
        assert len({r[stage].fingerprint for r in runs}) == 3


def test_few_labels_run_trains_labelled_stages_on_exactly_n_per_class(tmp_path):
    run = execute(compose([*QUICK, "data.labels_per_class=5"]), tmp_path)
    m = run.metrics
    assert (m["data"]["n_labelled_train"], m["data"]["n_labelled_val"]) == (50, 50)
    assert m["data"]["n_train"] == 600
    # one epoch of 50 images in minibatches of 128: one step, for every labelled stage
    for stage in ("baseline", "probe", "finetune", "scratch"):
        assert epochs(m[stage]) == 1
        assert_accuracy_matches_its_confusion_matrix(m[stage], m["data"]["n_test"])


def test_dropout_applies_to_the_training_loss_only():
    torch.manual_seed(0)
    cfg = compose(["finetune.dropout.input=0.2", "finetune.dropout.hidden=0.5"]).finetune
    net = StackedNet([784, 64, 16], 10)
    stage = ClassifierModule(net, cfg, "finetune", "finetune", dropout=cfg.dropout)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    assert not torch.equal(stage.logits(x), stage.logits(x))  # masks drawn at every call
    assert torch.equal(stage.model(x), stage.model(x))  # the network itself has no dropout
    correct, n = stage.evaluate(x, y)
    assert float(correct) == float((net(x).argmax(1) == y).sum()) and float(n) == 256
    plain = ClassifierModule(net, compose().finetune, "finetune", "finetune")
    assert torch.equal(plain.logits(x), net(x))
    # scratch follows fine-tuning's dropout unless set
    assert compose(["finetune.dropout.hidden=0.3"]).scratch.dropout.hidden == 0.3


@pytest.mark.slow
def test_tiny_run_writes_complete_metrics_far_above_chance(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["data"]["source"].startswith(("mirror:", "cache:"))
    assert [(layer["in"], layer["out"]) for layer in layers(m)] == [
        (784, 196), (196, 49), (49, 25), (25, 9)]
    assert all(0 < layer["val_recon_mse"] < 1 for layer in layers(m))
    # chance is 0.1; the probe reads only 9 codes learned from 3,000 images in 3 epochs
    assert m["baseline"]["test_acc"] > 0.7 and m["finetune"]["test_acc"] > 0.7
    assert m["scratch"]["test_acc"] > 0.6
    assert m["probe"]["test_acc"] > 0.3
    assert m["finetune"]["val_acc"] > 0.7
    assert sorted(m["finetune"]["per_class_acc"]) == [str(d) for d in range(10)]
    assert sum(map(sum, m["finetune"]["confusion_matrix"])) == 1000
    # every stage of the registry's plan, in its order: the per-layer probes, scratch's probe
    stages = [stage.name for stage in plan(compose(TINY))]
    assert {"probe_layer1", "probe", "probe_scratch", "scratch"} <= set(stages)
    assert list(m["timings"]) == ["startup_s", "data_s", *(f"{s}_s" for s in stages),
                                  "figures_s", "total_s"]
    assert m["timings"]["total_s"] == pytest.approx(
        sum(v for k, v in m["timings"].items() if k != "total_s"))
    ckpts = {p.name for p in (tiny_run / "checkpoints").iterdir()}
    assert ckpts == {f"{s}.pt" for s in stages}
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_cli_prints_summary_table_with_a_row_per_part(tmp_path):
    proc = run_cli(tmp_path / "run", *QUICK, "data.classes=[0,9]", "seed=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("saelab: mnist"):]
    for part in ("startup", "data", "baseline", "pretrain layer 1", "probe", "finetune",
                 "scratch", "total"):
        assert f"\n{part} " in table
    assert str(tmp_path / "run") in table
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["classes"] == [0, 9] and m["finetune"]["test_acc"] > 0.9
