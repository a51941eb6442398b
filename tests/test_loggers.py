"""The logger group: per-epoch scalars, the final metrics with the config and the figures, read
back through each logger's own reader."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import QUICK, REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import saelab

pytestmark = pytest.mark.slow  # whole runs with their figures

FIGURES = ["visualize.enabled=true", "visualize.actmax.steps=2", "visualize.embedding_points=0"]


def test_tensorboard_gets_every_epoch_of_every_stage_and_the_final_metrics(tmp_path):
    metrics = saelab.run([*QUICK, *FIGURES, "finetune.epochs=2"], tmp_path / "run")
    events = [EventAccumulator(str(p)).Reload()
              for p in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")]
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for acc in events
               for tag in acc.Tags()["scalars"]}
    assert scalars["finetune/val_acc"] == pytest.approx(
        [h["val_acc"] for h in metrics["finetune"]["history"] if "train_loss" in h])
    assert len(scalars["pretrain/layer2/train_loss"]) == 1
    assert scalars["final/scratch_test_acc"] == pytest.approx([metrics["scratch"]["test_acc"]])
    hparams = (tmp_path / "run" / "tensorboard" / "hparams.yaml").read_text()
    assert "finetune.lr: 0.001" in hparams  # the config, no longer {}


def test_csv_logger_holds_the_epochs_and_the_final_metrics(tmp_path):
    metrics = saelab.run([*QUICK, *FIGURES, "logger=csv", "finetune.epochs=2"], tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    tuned = [float(r["finetune/val_acc"]) for r in rows if r.get("finetune/val_acc")]
    assert tuned == pytest.approx([h["val_acc"] for h in metrics["finetune"]["history"]
                                   if "train_loss" in h])
    final = [r for r in rows if r.get("final/finetune_test_acc")]
    assert float(final[0]["final/finetune_test_acc"]) == pytest.approx(
        metrics["finetune"]["test_acc"])
    assert "finetune.lr: 0.001" in (tmp_path / "run" / "csv" / "hparams.yaml").read_text()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_mlflow_run_holds_params_metrics_and_figures(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from saelab.cli import prepare

    monkeypatch.chdir(tmp_path)  # the store's default place is outputs/ under the working folder
    overrides = [*QUICK, *FIGURES, "logger=mlflow"]
    prepare([saelab.compose(overrides)])
    metrics = saelab.run(overrides, tmp_path / "run")
    client = MlflowClient("sqlite:///outputs/mlflow.db")
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.params["finetune.lr"] == "0.001" and run.data.params["model.sizes"] == (
        "[784, 32, 9]")
    history = client.get_metric_history(run.info.run_id, "finetune/val_acc")
    assert [m.value for m in history] == pytest.approx(
        [h["val_acc"] for h in metrics["finetune"]["history"] if "train_loss" in h])
    assert run.data.metrics["final/finetune_test_acc"] == pytest.approx(
        metrics["finetune"]["test_acc"])
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/confusion_matrix.png" in figures and len(figures) == 12
    assert (tmp_path / "outputs" / "mlflow-artifacts").is_dir()


def test_parallel_sweep_jobs_share_a_new_mlflow_store_without_failing(tmp_path):
    """Two joblib workers starting on a store that does not exist yet: the front door creates
    the store and the experiment first, so neither job races to create them."""
    pytest.importorskip("mlflow")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from mlflow.tracking import MlflowClient

    cmd = [sys.executable, "-m", "saelab", "-m", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2", "logger=mlflow", *QUICK, "seed=0,1",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert len(rows) == 2 and not any(r["error"] for r in rows)
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("saelab")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_a_tensorboard_server_compares_every_job_of_a_sweep_without_figures(tmp_path):
    """HPARAMS, asked through TensorBoard's own HTTP API on a two-job sweep with figures off
    (debug=quick has none): one row per job, each with its final metrics."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "saelab", "-m", *QUICK, "seed=0,1",
                           f"hydra.sweep.dir={sweep}"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep),
                               "--port", str(port), "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/data/plugin/hparams"
    try:
        for _ in range(240):  # until it answers
            try:
                experiment = post(f"{base}/experiment", {"experimentName": ""})
                if experiment.get("metricInfos"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        names = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"final/finetune_test_acc", "final/scratch_test_acc",
                "final/probe_layer1_test_acc"} <= names
        groups = post(f"{base}/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
            "colParams": [], "startIndex": 0, "sliceSize": 100})
        assert groups["totalSize"] == 2
        for group in groups["sessionGroups"]:
            values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            assert 0 < values["final/finetune_test_acc"] <= 1
    finally:
        server.terminate()
        server.wait(timeout=30)
