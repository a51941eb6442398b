"""What the tests share besides fixtures: the debug presets' overrides, reading a run's metrics,
running the command line, copying and comparing folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The debug presets users run too (conf/debug): a real but small run (a few thousand MNIST images,
# one to three epochs per stage, on the CPU), and smaller still for runs that only check what a
# run does (one hidden layer pair, one epoch per stage, no figures).
TINY = ["debug=tiny"]
QUICK = ["debug=quick"]


def installed(module: str) -> bool:
    """Whether `module` (a Hydra plugin, say) is installed. find_spec raises, rather than answer
    None, when a parent package is missing: `hydra_plugins` is there only once some Hydra plugin
    is installed, which the core alone installs none of."""
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def epochs(section: dict) -> int:
    """The training epochs a stage's history records (its check before training aside)."""
    return sum("train_loss" in h for h in section["history"])


def layers(metrics: dict) -> list[dict]:
    """The pretrained layers' sections of a run's metrics.json, bottom first."""
    return [section for name, section in metrics.items() if name.startswith("pretrain_layer")]


def compose_cfg(*overrides: str):
    """The composed config, as the CLI builds it (not yet validated)."""
    from saelab.config.compose import compose_raw

    return compose_raw(list(overrides))


def run_cli(run_dir: Path | None, *overrides: str, timeout: int = 300,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m saelab` with `overrides`, writing into `run_dir` (if given)."""
    where = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    cmd = [sys.executable, "-m", "saelab", *overrides, *where]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a finished run to damage (links copied as links)."""
    shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def folder_state(path: Path, attempt: bool = False) -> dict[str, tuple[bytes, int]]:
    """Every file under `path`: its bytes and modification time (to show nothing changed).
    `attempt`: leave out what a refused run may touch: the lock it took (naming itself) and the
    log lines it wrote before refusing."""
    skip = {".lock", "saelab.log"} if attempt else set()
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file() and p.name not in skip}


def assert_accuracy_matches_its_confusion_matrix(section: dict, n_test: int) -> None:
    """A classifier stage's recorded test accuracy is the share of the diagonal of its confusion
    matrix, which counts every test image once."""
    cm = section["confusion_matrix"]
    assert sum(map(sum, cm)) == n_test
    assert section["test_acc"] == pytest.approx(sum(cm[i][i] for i in range(len(cm))) / n_test)
