"""Experiments as configuration: presets, sweeps and their summary, DDP on the CPU, determinism."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    QUICK,
    REPO,
    assert_accuracy_matches_its_confusion_matrix,
    epochs,
    layers,
    run_cli,
)
from omegaconf import OmegaConf

from saelab.api import execute
from saelab.config import kinds
from saelab.config.compose import compose_raw
from saelab.config.job import compose
from saelab.experiment.stages import plan

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
SMALL = QUICK  # a sweep job of a few seconds: one hidden layer pair, one epoch per stage


def compose_full(*overrides: str):
    """The composed config including Hydra's own (sweeper, launcher, mode)."""
    return compose_raw(list(overrides), hydra=True)


def multirun(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "saelab", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def read_summary(sweep_dir: Path) -> tuple[list[dict], str]:
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows, (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_runs_through_the_pipeline(name, tmp_path):
    """Each preset's own networks, optimisers and stages, trained by the pipeline for two steps a
    stage on a few hundred images: every stage of its plan leaves a checkpoint and numbers."""
    preset = compose([f"experiment={name}"])
    shrink = ["data.train_limit=300", "data.test_limit=100", "visualize.enabled=false",
              "store=null", "trainer.accelerator=cpu",
              *(f"{group}.{key}={value}" for group in ("baseline", "pretrain", "probe",
                                                       "finetune")
                for key, value in (("epochs", 1), ("steps_per_epoch", 2))),
              *(["data.labels_per_class=5"] if preset.data.labels_per_class else []),
              *(["tune.trials=1"] if preset.tune.trials else [])]
    run = execute(compose([f"experiment={name}", *shrink]), tmp_path / "run")
    assert [ae.sizes[1] for ae in run.autoencoders] == kinds.sizes(preset.model)[1:]
    data = run.splits()
    for stage in plan(run.cfg):
        assert (tmp_path / "run" / "checkpoints" / f"{stage.name}.pt").is_file()
        if stage.classifies:  # the recorded accuracy is its network's on the test set
            predicted = run.predict(data.test_x, stage.name, scaled=True)
            assert run.metrics[stage.name]["test_acc"] == pytest.approx(
                float((predicted == data.test_y).float().mean()))
    assert run.networks["finetune"](torch.zeros(2, 784)).shape == (2, len(preset.data.classes))


@pytest.mark.parametrize("name", ["seed_notebook_binary", "seed_notebook_multiclass"])
def test_seed_notebook_presets_follow_the_notebook(name):
    cfg = compose_full(f"experiment={name}")
    binary = name.endswith("binary")
    assert list(cfg.data.classes) == ([0, 9] if binary else list(range(10)))
    assert (cfg.data.pixels, cfg.data.val_size) == ("notebook", 0)
    assert list(cfg.model.sizes) == [784, 196, 49, 25, 9]
    assert cfg.pretrain.codes == "pre_activation"
    expected_lr = {"baseline": 1e-3 if binary else 1e-1, "pretrain": 0.1, "probe": 1e-3,
                   "finetune": 1e-3}
    for stage, lr in expected_lr.items():
        s = cfg[stage]
        assert (s.optimizer, s.lr, s.momentum, s.batch_size, s.epochs) == ("sgd", lr, 0, 1, 1)
        assert s.sample_with_replacement and s.schedule == "none"
        # 1,000 steps for the pixel baseline, as many steps as samples for the others
        assert s.steps_per_epoch == (1000 if stage == "baseline" else None)


def test_optuna_preset_asks_to_maximise_validation_accuracy_over_its_keys():
    """The preset as configured (the slow test below runs a search)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    hydra = compose_full("hparams_search=optuna").hydra
    assert hydra.mode.name == "MULTIRUN"
    assert hydra.sweeper._target_.endswith("OptunaSweeper")
    assert hydra.sweeper.direction == "maximize"
    assert {"model.sizes", "pretrain.lr", "finetune.lr", "pretrain.epochs",
            "finetune.epochs"} <= set(hydra.sweeper.params)


@pytest.mark.slow
def test_optuna_search_runs_and_reports_the_best_validation_accuracy(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "search"
    cmd = [sys.executable, "-m", "saelab", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
           *SMALL, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, _ = read_summary(sweep)
    assert len(rows) == 2 and rows[0]["pretrain.lr"] != rows[1]["pretrain.lr"]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    saved = json.loads((sweep / rows[0]["job"] / "metrics.json").read_text())
    assert best.best_value == saved["finetune"]["val_acc"] == float(rows[0]["finetune_val_acc"])
    assert float(best.best_params["pretrain.lr"]) in {  # the best trial (or one tied with it)
        float(r["pretrain.lr"]) for r in rows if float(r["finetune_val_acc"]) == best.best_value}


@pytest.mark.slow
def test_an_optuna_study_samples_its_written_space_and_resumes_from_sqlite(tmp_path):
    """Six trials of a study stored in SQLite, four in a first invocation and two resuming it.
    Each parameter the study sampled lies in the space as written, a range without its end (with
    hydra-optuna-sweeper 1.3, range(1,3) also sampled 3), and each trial ran what it sampled."""
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = {"pretrain.epochs": "range(1,3)", "finetune.epochs": "range(1,3)"}
    quick = [o for o in SMALL if o.split("=")[0] not in space]
    for n_trials, sweep in ((4, "first"), (2, "again")):
        cmd = [sys.executable, "-m", "saelab", "hparams_search=optuna", *quick,
               *(f"{k}={v}" for k, v in space.items()), f"hydra.sweeper.n_trials={n_trials}",
               f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=s",
               f"hydra.sweep.dir={tmp_path / sweep}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "execution whitelist" not in proc.stderr  # Hydra 1.4 trusts saelab's callback
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(6)]
    for t in trials:
        assert t.params["pretrain.epochs"] in (1, 2) and t.params["finetune.epochs"] in (1, 2)
        assert 1e-4 <= t.params["pretrain.lr"] <= 1e-2 and 1e-4 <= t.params["finetune.lr"] <= 3e-3
    jobs = [tmp_path / "first" / str(n) for n in range(4)] + [
        tmp_path / "again" / str(n) for n in range(2)]
    for t, job in zip(trials, jobs, strict=True):
        ran = json.loads((job / "metrics.json").read_text())["config"]
        # a categorical choice is stored as its text (model.sizes: "[784,500,250,100,9]")
        drawn = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in t.params.items()}
        assert {key: OmegaConf.select(OmegaConf.create(ran), key) for key in drawn} == drawn


@pytest.mark.parametrize("launcher, target", [("joblib", "JoblibLauncher"),
                                              ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher, target):
    pytest.importorskip(f"hydra_plugins.hydra_{'submitit' if launcher == 'slurm' else launcher}"
                        "_launcher")
    hydra = compose_full(f"hydra/launcher={launcher}").hydra
    assert hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert (hydra.launcher.gpus_per_node, hydra.launcher.tasks_per_node) == (1, 1)


@pytest.fixture(scope="module")
def sweep_2x1(tmp_path_factory) -> Path:
    """A real 2x1 multirun: two pretraining learning rates, one fine-tuning learning rate."""
    sweep = tmp_path_factory.mktemp("sweep") / "2x1"
    proc = multirun(sweep, *SMALL, "pretrain.lr=1e-3,3e-2", "finetune.lr=3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_multirun_summary_has_one_row_per_job_sorted_by_val_acc(sweep_2x1):
    sweep = sweep_2x1
    rows, md = read_summary(sweep)
    assert sorted(r["pretrain.lr"] for r in rows) == ["0.001", "0.03"]
    assert {r["finetune.lr"] for r in rows} == {"0.003"}
    for row in rows:
        saved = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["finetune_val_acc"]) == saved["finetune"]["val_acc"]
        assert float(row["probe_test_acc"]) == saved["probe"]["test_acc"]
        assert float(row["baseline_test_acc"]) == saved["baseline"]["test_acc"]
        assert float(row["scratch_test_acc"]) == saved["scratch"]["test_acc"]
        assert float(row["total_s"]) == saved["timings"]["total_s"] and not row["error"]
    vals = [float(r["finetune_val_acc"]) for r in rows]
    assert vals == sorted(vals, reverse=True)
    # markdown: only the varying override is a column, the fixed ones are listed once
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[1] == "pretrain.lr" and "finetune.lr" not in table[0]
    assert "`finetune.lr=0.003`" in md
    assert [line.split(" | ")[1] for line in table[1:]] == [r["pretrain.lr"] for r in rows]


@pytest.mark.slow
def test_failing_job_is_a_row_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, *SMALL, "pretrain.optimizer=sgd", "pretrain.lr=1e12,1e-3")
    assert proc.returncode == 1, proc.stderr[-3000:]  # a sweep's exit status is its jobs'
    assert proc.stderr.strip().splitlines()[-1].startswith("saelab: 1 of 2 jobs failed: 0 ")
    rows, md = read_summary(sweep)
    assert [float(r["pretrain.lr"]) for r in rows] == [1e-3, 1e12]  # the failed job last
    good, broken = rows
    assert float(good["finetune_test_acc"]) > 0 and not good["error"]
    assert broken["error"].startswith("NonFiniteLossError: pretrain layer 1: training loss")
    assert broken["finetune_val_acc"] == "" and broken["job"] == "0"
    saved = json.loads((sweep / "0" / "metrics.json").read_text())
    assert saved["error"] == broken["error"] and saved["baseline"]["test_acc"] > 0  # kept
    assert "1 failed" in md and "NonFiniteLossError" in md


def test_a_sweep_with_one_invalid_job_is_refused_before_anything_trains(tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, *SMALL, "finetune.lr=-1,1e-3")
    assert proc.returncode == 2
    assert proc.stderr == "saelab: error: finetune.lr=-1.0: must be > 0\n"
    assert not sweep.exists()


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes_matches_one_process_with_twice_the_batch(sweep_2x1,
                                                                              tmp_path):
    """Two ranks with batch 64 see, step by step, the two halves of the one-process batch of 128
    and average their gradients: the pixel baseline (initialised before any process group
    exists, so identically) must come out as in the sweep's job with pretrain.lr=1e-3."""
    run_dir = tmp_path / "ddp"
    proc = run_cli(run_dir, "trainer=ddp", "data.batch_size=64", *SMALL, "pretrain.lr=1e-3",
                   "finetune.lr=3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_ddp_process_1.log").read_text()
    assert proc.stdout.count("saelab: mnist") == 1  # only rank 0 reports
    rows, _ = read_summary(sweep_2x1)
    single = sweep_2x1 / next(r["job"] for r in rows if r["pretrain.lr"] == "0.001")
    weights = [torch.load(d / "checkpoints" / "baseline.pt")["state_dict"]
               for d in (single, run_dir)]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-6)
    m, ref = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, single))
    assert m["baseline"]["test_acc"] == ref["baseline"]["test_acc"]
    assert m["config"]["trainer"]["strategy"] == "ddp"
    assert [m["data"][k] for k in ("n_train", "n_val", "n_test")] == [600, 200, 300]
    assert [epochs(m[s]) for s in ("baseline", "probe", "finetune")] == [1, 1, 1]
    for stage in ("probe", "finetune"):
        assert_accuracy_matches_its_confusion_matrix(m[stage], 300)


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(sweep_2x1, tmp_path):
    """A single run repeats, in a fresh process, the sweep's job with pretrain.lr=1e-3."""
    overrides = [*SMALL, "pretrain.lr=1e-3", "finetune.lr=3e-3"]
    proc = run_cli(tmp_path / "again", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, _ = read_summary(sweep_2x1)
    job = next(r["job"] for r in rows if r["pretrain.lr"] == "0.001")
    first, again = (json.loads((d / "metrics.json").read_text())
                    for d in (sweep_2x1 / job, tmp_path / "again"))
    assert first["config"] == again["config"]
    for stage in ("baseline", "probe", "finetune", "scratch"):
        for key in ("test_acc", "val_acc", "confusion_matrix"):
            assert first[stage][key] == again[stage][key], (stage, key)
    assert [p["val_recon_mse"] for p in layers(first)] == [
        p["val_recon_mse"] for p in layers(again)]
    assert first["version"] and "git_commit" in first
    saved = (tmp_path / "again" / ".hydra" / "overrides.yaml").read_text()
    assert saved.count("\n") == len(overrides) and "pretrain.lr=1e-3" in saved
