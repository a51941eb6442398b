"""Shared fixtures: the offline mirror beside the repo, a private cache, tiny-run overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Absolute, so that symlinks into it and subprocesses started elsewhere find it: the README's test
# command gives it relative to the repository root (`SAELAB_MIRROR=../shared/data pytest`).
os.environ["SAELAB_MIRROR"] = str(Path(os.environ.get("SAELAB_MIRROR",
                                                      REPO.parent / "shared" / "data")).resolve())
os.environ.setdefault("SAELAB_CACHE", tempfile.mkdtemp(prefix="saelab-cache-"))

# A real but small run: a few thousand MNIST images, one or two epochs per stage, on the CPU.
TINY = [
    "data.train_limit=3000", "data.val_size=500", "data.test_limit=1000", "data.batch_size=32",
    "baseline.epochs=2", "pretrain.epochs=3", "probe.epochs=3", "finetune.epochs=2",
    "trainer.accelerator=cpu",
]


def compose_cfg(*overrides: str):
    """The composed config, as the CLI builds it (not yet validated)."""
    from saelab.config import compose_raw

    return compose_raw(list(overrides))


def run_cli(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m saelab` with `overrides`, writing into `run_dir`."""
    cmd = [sys.executable, "-m", "saelab", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One complete tiny run of the CLI, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_cli(run_dir, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
