"""Shared fixtures: the offline mirror beside the repo, a private cache, one tiny run (the helpers
the tests share are in helpers.py).

Whole runs and sweeps (in process or through the command line) and checks over every config key
or option are marked `slow`; the edit loop is `pytest -m "not slow"`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers import REPO, TINY, run_cli

# Absolute, so that symlinks into it and subprocesses started elsewhere find it: the README's test
# command gives it relative to the repository root (`SAELAB_MIRROR=../shared/data pytest`).
os.environ["SAELAB_MIRROR"] = str(Path(os.environ.get("SAELAB_MIRROR",
                                                      REPO.parent / "shared" / "data")).resolve())
os.environ.setdefault("SAELAB_CACHE", tempfile.mkdtemp(prefix="saelab-cache-"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One complete tiny run of the CLI, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_cli(run_dir, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
