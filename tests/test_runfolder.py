"""Results that never lie: fingerprints, one writer, the read-only loader, faults that destroy
nothing, exact resumption, stop requests. Each fault of the run-folder issue is a test here."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import QUICK, REPO, copy_of, epochs, folder_state, layers, run_cli

import saelab
from saelab.errors import ConfigError, Interrupted
from saelab.experiment.fingerprints import fingerprinted
from saelab.experiment.stages import plan
from saelab.nn import meter
from saelab.report.build import main as report_main
from saelab.report.robustness import main as robustness_main
from saelab.runs.checkpoints import FORMAT, read_checkpoint
from saelab.runs.folder import RunFolder

STAGES = ["baseline", "pretrain_layer1", "probe_layer1", "pretrain_layer2", "probe", "finetune",
          "probe_scratch", "scratch"]
DENOISING = [*QUICK, "pretrain.noise.kind=masking", "pretrain.noise.level=0.3"]


def accuracies(metrics: dict) -> dict:
    """Every number a run reports about its networks (not its timings or origins)."""
    out = {s: (metrics[s]["test_acc"], metrics[s].get("val_acc"), metrics[s]["history"])
           for s in ("baseline", "probe", "finetune", "scratch")}
    out["pretrain"] = [(p["val_recon_mse"], p["test_recon_mse"], p["history"])
                       for p in layers(metrics)]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished denoising quick run (the source of every fault below, copied first)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    saelab.run(DENOISING, run_dir)
    return run_dir



def test_checkpoints_record_the_fingerprint_of_exactly_the_keys_each_stage_reads(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    cfg = saelab.load_run(finished).cfg
    want = fingerprinted(cfg, metrics["data"]["checksums"])
    assert [s.name for s in plan(cfg)] == STAGES
    for name in STAGES:
        saved = read_checkpoint(finished / "checkpoints" / f"{name}.pt")
        assert saved["fingerprint"] == want[name].fingerprint and saved["format"] == FORMAT
        assert set(saved["rng"]) == {"cpu", "cuda"}
    layer2 = want["pretrain_layer2"]
    assert layer2.consumes == {"pretrain_layer1": want["pretrain_layer1"].fingerprint}
    assert "pretrain.noise.level" in layer2.values and "finetune.lr" not in layer2.values
    assert "data.labels_per_class" not in layer2.values  # pretraining sees no labels
    assert "visualize.enabled" not in want["finetune"].values  # recorded, not fingerprinted
    assert "trainer.accelerator" not in want["finetune"].values
    assert "trainer.precision" in want["finetune"].values  # numerics change results


# 1. Stale checkpoints reused silently ----------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    (["pretrain.epochs=5", "finetune.epochs=6", "finetune.lr=3e-3"], "pretrain.epochs"),
    (["model.sizes=[784,100,10]"], "model.sizes.1"),
    (["seed=1"], "seed"),
])
def test_a_different_config_into_a_finished_folder_stops_naming_the_key(finished, tmp_path,
                                                                       change, key):
    run_dir = copy_of(finished, tmp_path)
    before = folder_state(run_dir, attempt=True)
    with pytest.raises(ConfigError, match=rf"^{key}=.*holds stage \w+ trained with") as err:
        saelab.run([*DENOISING, *change], run_dir)
    assert "overwrite=true" in str(err.value) and str(run_dir) in str(err.value)
    # results, config and checkpoints: not a byte, not a modification time
    assert folder_state(run_dir, attempt=True) == before


def test_the_same_config_into_the_same_folder_continues_without_training(finished, tmp_path,
                                                                        caplog):
    run_dir = copy_of(finished, tmp_path)
    first = json.loads((run_dir / "metrics.json").read_text())
    again = saelab.run(DENOISING, run_dir)
    assert accuracies(again) == accuracies(first)
    assert all(again[s]["origin"] == "checkpoint" for s in ("baseline", "probe", "finetune"))


def test_overwrite_removes_only_saelabs_files_and_retrains(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    metrics = saelab.run([*DENOISING, "finetune.epochs=2", "overwrite=true"], run_dir)
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert epochs(metrics["finetune"]) == 2
    assert all(metrics[s]["origin"] == "trained" for s in ("baseline", "finetune"))


def test_checkpoints_written_before_fingerprints_are_never_reused(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    legacy = run_dir / "checkpoints" / "baseline.pt"
    saved = torch.load(legacy, weights_only=True)
    torch.save({"state_dict": saved["state_dict"], "seconds": 1.0, "history": []}, legacy)
    before = folder_state(run_dir, attempt=True)
    with pytest.raises(ConfigError, match="checkpoint format 1, this one reads"):
        saelab.run(DENOISING, run_dir)
    assert folder_state(run_dir, attempt=True) == before


def test_checkpoints_of_saelab_0_3_are_refused_in_one_line_by_a_run_and_by_load_run(finished,
                                                                                   tmp_path):
    """0.3 saved its networks as Sequential(body, head) (format 3): neither a run nor load_run
    reads them as 0.4's StackedNet, and each says why, naming the format and where to read."""
    run_dir = copy_of(finished, tmp_path)
    path = run_dir / "checkpoints" / "finetune.pt"
    saved = torch.load(path, weights_only=True)
    state = saved["state_dict"]
    renamed = {("1." + k.removeprefix("head.")) if k.startswith("head.") else
               f"0.{2 * int(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in state.items()}
    torch.save({**saved, "format": 3, "state_dict": renamed}, path)
    before = folder_state(run_dir, attempt=True)
    for attempt in (lambda: saelab.run([f"resume={run_dir}"]), lambda: saelab.load_run(run_dir)):
        with pytest.raises(ConfigError, match=r"checkpoint format 3, this one reads 4: "
                                              r"docs/runs.md") as err:
            attempt()
        assert "\n" not in str(err.value)
    assert folder_state(run_dir, attempt=True) == before


# 2. Two runs in one folder at once --------------------------------------------------------------

def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path):
    holder = RunFolder(tmp_path / "run")
    holder.lock()
    try:
        with pytest.raises(ConfigError, match=rf"is in use by pid {os.getpid()} on "):
            saelab.run(QUICK, tmp_path / "run")
    finally:
        holder.unlock()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_the_lock_dies_with_its_holder(tmp_path):
    code = ("import sys, time; from saelab.runs.folder import RunFolder; "
            f"RunFolder(__import__('pathlib').Path({str(tmp_path)!r})).lock(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
        RunFolder(tmp_path).lock()
    proc.kill()
    proc.wait()
    folder = RunFolder(tmp_path)
    folder.lock()  # the kernel released it
    folder.unlock()


# 3 and 4. A corrupt or missing checkpoint -------------------------------------------------------

@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_report_and_robustness_refuse_a_damaged_run_and_change_nothing(finished, tmp_path,
                                                                       fault, capsys):
    run_dir = copy_of(finished, tmp_path)
    ckpt = run_dir / "checkpoints" / "pretrain_layer2.pt"
    if fault == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        ckpt.unlink()
    before = folder_state(run_dir)
    for main in (report_main, robustness_main):
        with pytest.raises(SystemExit) as exit_:
            main([str(run_dir), *(["--out", str(tmp_path / "rob")] if main is robustness_main
                                  else [])])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "checkpoints/pretrain_layer2.pt" in err
        assert ("unreadable" if fault == "truncated" else "missing") in err
    assert folder_state(run_dir) == before
    with pytest.raises(ConfigError, match="pretrain_layer2.pt"):
        saelab.load_run(run_dir)


@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_resume_retrains_a_damaged_stage_and_every_stage_that_consumes_it(finished, tmp_path,
                                                                         fault, capsys):
    run_dir = copy_of(finished, tmp_path)
    first = json.loads((run_dir / "metrics.json").read_text())
    ckpt = run_dir / "checkpoints" / "pretrain_layer2.pt"
    if fault == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        ckpt.unlink()
    again = saelab.run([f"resume={run_dir}"])
    origins = {s: again[s]["origin"] for s in ("baseline", "probe", "finetune", "scratch")}
    origins |= {f"pretrain_layer{k}": p["origin"] for k, p in enumerate(layers(again), 1)}
    assert origins == {"baseline": "checkpoint", "pretrain_layer1": "checkpoint",
                       "pretrain_layer2": "trained", "probe": "trained", "finetune": "trained",
                       "scratch": "trained"}
    logged = capsys.readouterr().out
    if fault == "truncated":
        assert "pretrain_layer2.pt is unreadable" in logged
    assert "probe: retrained because pretrain_layer2 was" in logged
    # retrained from the restored random state: the same numbers as the first time (CPU)
    assert accuracies(again) == accuracies(first)


# 5. Exact resumption ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("last", STAGES[:-1])
def test_a_denoising_run_resumed_after_any_stage_equals_the_uninterrupted_run(finished, tmp_path,
                                                                             last):
    run_dir = copy_of(finished, tmp_path)
    first = json.loads((run_dir / "metrics.json").read_text())
    for name in STAGES[STAGES.index(last) + 1:]:  # as if killed right after `last`
        (run_dir / "checkpoints" / f"{name}.pt").unlink()
    again = saelab.run([f"resume={run_dir}"])
    assert accuracies(again) == accuracies(first)


# 6. resume with overrides ----------------------------------------------------------------------

def test_resume_applies_overrides_that_change_no_finished_stage(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    for name in ("finetune", "scratch"):
        (run_dir / "checkpoints" / f"{name}.pt").unlink()
    metrics = saelab.run([f"resume={run_dir}", "finetune.epochs=2", "visualize.enabled=false"])
    assert epochs(metrics["finetune"]) == 2
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "epochs: 2" in saved  # the folder's config is the one that trained it
    assert "finetune.epochs=2" in (run_dir / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_resume_applies_a_group_override_by_what_its_preset_changes(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "checkpoints" / "scratch.pt").unlink()
    metrics = saelab.run([f"resume={run_dir}", "trainer=cpu", "logger=csv"])
    assert metrics["config"]["trainer"]["accelerator"] == "cpu"  # where it runs: not a change
    assert metrics["config"]["logger"]["kind"] == "csv"
    assert metrics["finetune"]["origin"] == "checkpoint" and metrics["scratch"]["origin"] == (
        "trained")
    with pytest.raises(ConfigError, match="holds stage baseline"):  # this one changes stages
        saelab.run([f"resume={run_dir}", "experiment=sae3_mnist"])


def test_resume_refuses_an_override_that_would_change_a_finished_stage(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = folder_state(run_dir, attempt=True)
    with pytest.raises(ConfigError, match=r"^finetune.epochs=3: .* holds stage finetune"):
        saelab.run([f"resume={run_dir}", "finetune.epochs=3"])
    assert folder_state(run_dir, attempt=True) == before


# 7. Stop requests --------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_within_a_step_keeps_finished_stages_and_resume_completes(
        finished, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    step = meter.Meter.step
    calls = []

    def step_then_signal(self):
        calls.append(1)
        if len(calls) == 8:  # in pretraining layer 1 (5 steps per stage and epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        step(self)

    monkeypatch.setattr(meter.Meter, "step", step_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        saelab.run(DENOISING, run_dir)
    assert stop.value.exit_code == 143 and len(calls) == 8  # no step after the signal
    assert signal.getsignal(signal.SIGTERM) == previous  # the caller's handler is back
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] == signal.SIGTERM and "baseline" in metrics
    assert "pretrain" not in metrics  # the partial stage is dropped
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"baseline.pt"}
    monkeypatch.setattr(meter.Meter, "step", step)
    again = saelab.run([f"resume={run_dir}"])
    assert "interrupted" not in again
    assert accuracies(again) == accuracies(json.loads((finished / "metrics.json").read_text()))


def test_sigterm_between_steps_where_lightning_sees_it_first_is_a_stop_too(tmp_path,
                                                                          monkeypatch):
    """During validation Lightning's own SIGTERM handler raises its SIGTERMException (a
    SystemExit with code 0) before any step of ours runs: it must end as our stop does."""
    from saelab.nn import modules

    validation_end = modules.StageModule.on_validation_epoch_end
    calls = []

    def signal_in_validation(self):
        calls.append(1)
        if len(calls) == 3:  # pretraining layer 1, epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        validation_end(self)

    monkeypatch.setattr(modules.StageModule, "on_validation_epoch_end", signal_in_validation)
    with pytest.raises(Interrupted) as stop:
        saelab.run([*QUICK, "pretrain.epochs=5"], tmp_path / "run")
    assert stop.value.exit_code == 143
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["interrupted"] == signal.SIGTERM and "pretrain" not in metrics


@pytest.mark.slow
def test_sigterm_to_the_command_line_exits_143_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "saelab", *QUICK, "pretrain.epochs=400", "progress=lines",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / "checkpoints" / "baseline.pt").exists():
        time.sleep(0.2)
    time.sleep(1.0)  # inside pretraining layer 1
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("saelab: stopped by signal 15")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] == 15 and "pretrain" not in metrics
    resumed = run_cli(None, f"resume={run_dir}", "pretrain.epochs=1", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_ends_a_sweep_with_the_summary_of_the_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "saelab", "-m", *QUICK, "progress=lines",
           "pretrain.epochs=1,400,2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (sweep / "1" / "checkpoints" / "baseline.pt"
                                               ).exists():
        time.sleep(0.2)
    time.sleep(1.0)  # job 1 (400 pretraining epochs) is pretraining
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    rows = {r["job"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    assert set(rows) == {"0", "1"} and not (sweep / "2").exists()  # job 2 did not start
    assert not rows["0"]["error"] and rows["1"]["error"] == "interrupted by signal 15"


# The loader ---------------------------------------------------------------------------------------

def test_load_run_changes_nothing_and_needs_no_data_until_splits_are_asked(finished, tmp_path,
                                                                          monkeypatch):
    run_dir = copy_of(finished, tmp_path)
    saved = run_dir / ".hydra" / "config.yaml"  # the data the run used, gone
    saved.write_text(saved.read_text().replace(os.environ["SAELAB_MIRROR"], str(
        tmp_path / "nowhere")).replace(os.environ["SAELAB_CACHE"], str(tmp_path / "nocache")))
    before = folder_state(run_dir)
    run = saelab.load_run(run_dir)
    assert [ae.encoder.out_features for ae in run.autoencoders] == [32, 9]
    assert "scratch" in run.networks and run.metrics["finetune"]["test_acc"] > 0
    x = torch.zeros(3, 28, 28, dtype=torch.uint8)
    assert run.predict(x).shape == (3,)
    with pytest.raises(ConfigError):  # the data is not there: asked for, it is an error
        run.splits()
    assert folder_state(run_dir) == before


# The store of finished stages ------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_takes_its_pretrained_stages_from_the_store_with_identical_metrics(tmp_path,
                                                                                capsys):
    store = tmp_path / "store"
    saelab.run([*QUICK, f"store={store}"], tmp_path / "all")
    assert len(list(store.glob("*.pt"))) == len(STAGES)
    few = [*QUICK, "data.labels_per_class=20"]
    shared = saelab.run([*few, f"store={store}"], tmp_path / "shared")
    alone = saelab.run(few, tmp_path / "alone")
    assert [p["origin"].split(":")[0] for p in layers(shared)] == ["store", "store"]
    assert all(shared[s]["origin"] == "trained" for s in ("baseline", "probe", "finetune"))
    assert accuracies(shared) == accuracies(alone)  # as if it had trained them itself
    assert {p.name for p in (tmp_path / "shared" / "checkpoints").iterdir()} == {
        f"{s}.pt" for s in STAGES}  # self-contained: loadable without the store
    saelab.load_run(tmp_path / "shared")
    # a damaged entry is a miss, with a warning, and is replaced
    entry = next(store.glob("pretrain_layer1-*.pt"))
    entry.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    again = saelab.run([*QUICK, "seed=0", f"store={store}", "finetune.epochs=2"], tmp_path / "d")
    assert "store: " in capsys.readouterr().out and layers(again)[0]["origin"] == "trained"
    assert layers(again)[1]["origin"] == "trained"  # it consumes a retrained stage
    saelab.load_run(tmp_path / "d")
    assert entry.stat().st_size > 1000
