"""The experiment end to end on a slice of real MNIST: metrics, models, bad input, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, compose_cfg, run_cli

from saelab.autoencoder import AutoEncoder, stack_encoders
from saelab.config import validate
from saelab.data import Minibatches, load_splits
from saelab.errors import ConfigError
from saelab.pipeline import run_experiment
from saelab.stages import AutoencoderStage, EvalBatches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An in-process tiny run, for tests that look at the trained models."""
    cfg = compose_cfg(*TINY)
    validate(cfg)
    return run_experiment(cfg, tmp_path_factory.mktemp("inproc"))


def test_tiny_run_writes_complete_metrics_far_above_chance(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["data"] | {"n_train": 3000, "n_val": 500, "n_test": 1000} == m["data"]
    assert m["data"]["source"].startswith(("mirror:", "cache:"))
    assert [(layer["in"], layer["out"]) for layer in m["pretrain"]] == [
        (784, 196), (196, 49), (49, 25), (25, 9)]
    assert all(0 < layer["val_recon_mse"] < 1 for layer in m["pretrain"])
    # chance is 0.1; the probe reads only 9 codes learned from 3,000 images in 3 epochs
    assert m["baseline"]["test_acc"] > 0.7 and m["finetune"]["test_acc"] > 0.7
    assert m["probe"]["test_acc"] > 0.3
    assert m["finetune"]["val_acc"] > 0.7
    assert sorted(m["finetune"]["per_class_acc"]) == [str(d) for d in range(10)]
    assert sum(map(sum, m["finetune"]["confusion_matrix"])) == 1000
    assert set(m["timings"]) == {"baseline_s", "pretrain_s", "probe_s", "finetune_s", "total_s"}
    ckpts = {p.name for p in (tiny_run / "checkpoints").iterdir()}
    assert ckpts == {"baseline.pt", "probe.pt", "finetune.pt",
                     *(f"pretrain_layer{i}.pt" for i in range(1, 5))}
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_prints_summary_table(tmp_path):
    proc = run_cli(tmp_path / "run", *TINY, "data.classes=[0,9]", "model.sizes=[784,300,100,30]",
                   "data.batch_size=256", "seed=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout
    assert "baseline" in table and "probe" in table and "finetune" in table
    assert str(tmp_path / "run") in table
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["classes"] == [0, 9] and m["finetune"]["test_acc"] > 0.95


def test_autoencoder_loss_decreases():
    cfg = compose_cfg(*TINY, "pretrain.epochs=3")
    data = load_splits(cfg.data, seed=0)
    ae = AutoEncoder(784, 196)
    stage = AutoencoderStage(ae, cfg.pretrain, "pretrain layer 1", "pretrain/layer1")
    before = stage.evaluate(data.val_x)
    import pytorch_lightning as pl

    pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        stage, Minibatches(data.train_x, None, 128), EvalBatches(data.val_x, data.val_x))
    after = stage.evaluate(data.val_x)
    losses = [h["train_loss"] for h in stage.history]
    assert losses[0] > losses[1] > losses[2]
    assert after[0] / after[1] < 0.5 * before[0] / before[1]


def test_stack_equals_sequential_encoders_and_probe_keeps_them(tiny):
    x = tiny.data.test_x[:64]
    h = x
    for ae in tiny.autoencoders:
        h = ae.encode(h)
    assert torch.allclose(stack_encoders(tiny.autoencoders)(x), h, atol=1e-6)
    assert torch.allclose(tiny.probe[0](x), h, atol=1e-6)
    probe_linears = [m for m in tiny.probe[0] if isinstance(m, torch.nn.Linear)]
    tuned_linears = [m for m in tiny.finetuned[0] if isinstance(m, torch.nn.Linear)]
    for ae, probed, tuned in zip(tiny.autoencoders, probe_linears, tuned_linears, strict=True):
        assert torch.equal(probed.weight, ae.encoder.weight)  # bit-identical after the probe
        assert torch.equal(probed.bias, ae.encoder.bias)
        assert not torch.equal(tuned.weight, ae.encoder.weight)  # fine-tuning moved them
    # the fine-tuned model starts from the probe's head, then trains it
    assert not torch.equal(tiny.finetuned[1].weight, tiny.probe[1].weight)


BAD_INPUT = [
    ("model.sizes=[100,50]", "model.sizes", "784"),
    ("model.sizes=[784]", "model.sizes", "at least 2"),
    ("model.sizes=[784,0,9]", "model.sizes", "positive"),
    ("data.classes=[0,12]", "data.classes", "0..9"),
    ("data.classes=[3,3]", "data.classes", "2 distinct"),
    ("data.classes=[3]", "data.classes", "2 distinct"),
    ("data.name=cifar", "data.name", "mnist, fashion_mnist"),
    ("pretrain.lr=0", "pretrain.lr", "> 0"),
    ("finetune.lr=-1e-3", "finetune.lr", "> 0"),
    ("data.batch_size=0", "data.batch_size", "> 0"),
    ("probe.batch_size=-5", "probe.batch_size", "> 0"),
    ("baseline.epochs=-1", "baseline.epochs", ">= 0"),
    ("data.mirror=/nonexistent/mirror", "data.mirror", "does not exist"),
]


@pytest.mark.parametrize("override, key, allowed", BAD_INPUT)
def test_bad_config_names_key_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(override))
    assert err.value.key == key
    assert allowed in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("model.sizes=[784,0,9]", "model.sizes"),
    ("data.classes=[0,12]", "data.classes"),
    ("pretrain.lr=0", "pretrain.lr"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, override, key):
    proc = run_cli(tmp_path / "run", override)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"saelab: error: {key}=")
    assert not (tmp_path / "run" / "metrics.json").exists()  # failed before any training


def test_cli_corrupt_mirror_exits_2(tmp_path):
    (tmp_path / "mirror" / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "mirror" / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\0" * 99)
    proc = run_cli(tmp_path / "run", f"data.mirror={tmp_path / 'mirror'}",
                   f"data.root={tmp_path / 'cache'}")
    assert proc.returncode == 2
    assert proc.stderr.startswith("saelab: error: data.mirror=")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_non_finite_loss_stops_naming_stage_and_keeps_earlier_stages(tmp_path):
    proc = run_cli(tmp_path / "run", *TINY, "pretrain.optimizer=sgd", "pretrain.lr=1e12")
    assert proc.returncode == 1
    assert "pretrain layer 1" in proc.stderr and "lower learning rate" in proc.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["baseline"]["test_acc"] > 0.7 and "finetune" not in m
    assert (tmp_path / "run" / "checkpoints" / "baseline.pt").exists()


def test_resume_loads_finished_stages_and_trains_the_rest(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, *TINY).returncode == 0
    first = json.loads((run_dir / "metrics.json").read_text())
    # simulate a crash during fine-tuning: its checkpoint and metrics are missing
    (run_dir / "checkpoints" / "finetune.pt").unlink()
    (run_dir / "metrics.json").write_text(json.dumps({k: v for k, v in first.items()
                                                       if k != "finetune"}))
    proc = run_cli(tmp_path / "resume", f"resume={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    for stage in ("baseline", "pretrain layer 1", "pretrain layer 4", "probe"):
        assert f"{stage}: loaded from" in log
    assert "finetune: loaded" not in log and "finetune epoch 2/2" in log
    second = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("baseline", "probe"):
        assert second[stage]["test_acc"] == first[stage]["test_acc"]
    assert second["finetune"]["test_acc"] > 0.7
    assert (run_dir / "checkpoints" / "finetune.pt").exists()
