"""Sweeps on a real SLURM cluster: a single node on this machine (scripts/slurm_cluster.sh; CI
starts one), every job a SLURM job through submitit (`hydra/launcher=slurm`).

They check what a cluster adds to a local sweep: the numbers are the basic launcher's; a job
preempted (USR2, submitit's requeue) or out of time continues from its finished stages in its own
folder and ends with the numbers of an uninterrupted run; a sweep with a failed or a cancelled
job exits 1 naming it. Without a cluster they skip, saying how to start one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import QUICK, REPO

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# One job at a time (each takes both CPUs, so its numbers are the basic launcher's, which runs
# with the machine's default threads), on the CPU, in the cluster's one partition.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=4", "trainer=cpu",
         "progress=lines"]
STAGES = ("baseline", "pretrain_layer1", "probe_layer1", "pretrain_layer2", "probe", "finetune",
          "probe_scratch", "scratch")


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        pytest.skip("no SLURM cluster answers: start one with scripts/slurm_cluster.sh install "
                    "&& scripts/slurm_cluster.sh start (as root; .ci/run does)")


def sweep(directory: Path, *overrides: str, launcher: list[str] = SLURM, wait: bool = True):
    cmd = [sys.executable, "-m", "saelab", "-m", *launcher, *QUICK, *overrides,
           f"hydra.sweep.dir={directory}"]
    if wait:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def layers(overrides: list[str]) -> tuple[str, ...]:
    """The stages of a run of debug=quick with `overrides` (its depth from `model.sizes`)."""
    sizes = next((o for o in overrides if o.startswith("model.sizes=")), None)
    if sizes is None:
        return STAGES
    n = sizes.count(",")
    return ("baseline", *(f"{s}{k}" for k in range(1, n) for s in ("pretrain_layer",
                                                                    "probe_layer")),
            f"pretrain_layer{n}", "probe", "finetune", "probe_scratch", "scratch")


def numbers(job_dir: Path, stages: tuple[str, ...] = STAGES) -> dict:
    """Every stage's accuracies (or reconstruction error)."""
    metrics = json.loads((job_dir / "metrics.json").read_text())
    keys = ("test_acc", "val_acc", "val_recon_mse")
    return {s: {k: metrics[s][k] for k in keys if k in metrics[s]} for s in stages}


def origins(job_dir: Path, stages: tuple[str, ...] = STAGES) -> dict[str, str]:
    """Where each stage came from: trained, or its checkpoint."""
    metrics = json.loads((job_dir / "metrics.json").read_text())
    return {s: metrics[s]["origin"] for s in stages}


def job_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def wait_for(path: Path, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.5)
    assert path.exists(), path


def start_requeued_now(seconds: float = 120) -> None:
    """SLURM holds a requeued job back a while (Reason=BeginTime): start it at once."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        held = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i"], capture_output=True,
                              text=True).stdout.split()
        for job in held:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"],
                           capture_output=True)
        if held:
            return
        time.sleep(0.5)


def test_a_two_job_sweep_gives_the_basic_launchers_numbers(tmp_path):
    on_slurm = sweep(tmp_path / "slurm", "seed=0,1")
    assert on_slurm.returncode == 0, on_slurm.stderr[-3000:]
    basic = sweep(tmp_path / "basic", "seed=0,1", launcher=["progress=lines"])
    assert basic.returncode == 0, basic.stderr[-3000:]
    for job in ("0", "1"):
        assert numbers(tmp_path / "slurm" / job) == numbers(tmp_path / "basic" / job)
    assert (tmp_path / "slurm" / "summary.md").is_file()
    assert list((tmp_path / "slurm" / ".submitit").iterdir())  # submitit's logs, per job


def test_a_preempted_job_continues_from_its_finished_stages_with_the_same_numbers(tmp_path):
    """USR2 (a preemption's notice; submitit checkpoints and requeues the job): the requeued job
    takes the stages it finished from its folder and ends as an uninterrupted run."""
    slow = ["pretrain.epochs=200"]  # about a minute of pretraining to be preempted in
    running = sweep(tmp_path / "slurm", "seed=0", *slow, wait=False)
    wait_for(tmp_path / "slurm" / "0" / "checkpoints" / "probe_layer1.pt")
    (job,) = job_ids()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    start_requeued_now()
    out, err = running.communicate(timeout=900)
    assert running.returncode == 0, err[-3000:]
    reference = sweep(tmp_path / "basic", "seed=0", *slow, launcher=["progress=lines"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert numbers(tmp_path / "slurm" / "0") == numbers(tmp_path / "basic" / "0")
    taken = origins(tmp_path / "slurm" / "0")
    assert taken["baseline"] == taken["pretrain_layer1"] == "checkpoint"  # not trained again
    assert taken["finetune"] == "trained"


def test_a_job_out_of_time_is_requeued_until_its_stages_are_done(tmp_path):
    """The time limit's notice (USR2, `signal_delay_s` before it) requeues the job, up to
    `max_num_timeout` times; each allocation continues from the stages the last one finished."""
    # SLURM sends the notice `signal_delay_s` before the limit or up to 60 s earlier: 60 to 120 s
    # into a 3-minute allocation. So the work comes in stages far shorter than that (1,500 epochs
    # of a thin layer: 8 to 16 s on the 2-core CI machine), each allocation finishing several,
    # and there is more of it than one allocation holds (24 layers: 6 min there, in 4 allocations
    # whose notice came 120 s in; 3 min on a machine twice as fast). The requeues allowed are
    # many, so a slower machine gets there too. (14 min in all with the reference run.)
    sizes = ",".join(["784", *["16"] * 24, "9"])
    slow = [f"model.sizes=[{sizes}]", "pretrain.epochs=1500"]
    timed = [*SLURM, "hydra.launcher.timeout_min=3", "hydra.launcher.signal_delay_s=60",
             "hydra.launcher.max_num_timeout=30"]
    running = sweep(tmp_path / "slurm", "seed=0", *slow, launcher=timed, wait=False)
    deadline = time.monotonic() + 1800
    while running.poll() is None and time.monotonic() < deadline:
        start_requeued_now(seconds=5)
    out, err = running.communicate(timeout=60)
    assert running.returncode == 0, err[-3000:]
    # submitit's lines land in the job's saelab.log, which every allocation appends to (SLURM
    # truncates the job's own .err file on each requeue)
    log = (tmp_path / "slurm" / "0" / "saelab.log").read_text()
    assert "this job is timed-out" in log and "Requeued job" in log
    reference = sweep(tmp_path / "basic", "seed=0", *slow, launcher=["progress=lines"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert numbers(tmp_path / "slurm" / "0", layers(slow)) == numbers(tmp_path / "basic" / "0",
                                                                      layers(slow))
    assert "checkpoint" in origins(tmp_path / "slurm" / "0", layers(slow)).values()


def test_a_sweep_with_a_failed_job_exits_1_naming_it(tmp_path):
    proc = sweep(tmp_path / "slurm", "pretrain.optimizer=sgd", "pretrain.lr=1e12,1e-3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "saelab: 1 of 2 jobs failed: 0 (their errors: summary.md)")


def test_a_cancelled_job_makes_the_sweep_exit_1_and_says_how_to_continue_it(tmp_path):
    running = sweep(tmp_path / "slurm", "seed=0", "pretrain.epochs=400", wait=False)
    wait_for(tmp_path / "slurm" / "0" / "checkpoints" / "baseline.pt")
    (job,) = job_ids()
    subprocess.run(["scancel", job], check=True)  # SIGTERM, as a user or an administrator
    out, err = running.communicate(timeout=600)
    assert running.returncode == 1, err[-3000:]
    folder = (tmp_path / "slurm" / "0").resolve()
    assert (f"saelab: job 0 stopped by signal 15: finished stages kept; continue it with: "
            f"saelab resume={folder}") in err.splitlines(), err[-3000:]
