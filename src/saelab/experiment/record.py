"""The run's metrics.json and its one writer: where the numbers come from (versions, commit,
device, config), each part of the run as it finishes, and the time of each part."""

from __future__ import annotations

import logging
import platform
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from saelab.runs.folder import RunFolder

log = logging.getLogger("saelab")


def git_commit() -> str | None:
    """The commit of the saelab source tree, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except OSError:
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    """The versions a run's numbers depend on."""
    import hydra
    import omegaconf
    import pytorch_lightning as pl
    import tensorboard
    import torch

    return {"python": platform.python_version(), "saelab": version("saelab"),
            "torch": torch.__version__, "lightning": pl.__version__,
            "hydra": hydra.__version__, "omegaconf": omegaconf.__version__,
            "tensorboard": tensorboard.__version__}


class Laps:
    """Wall-clock time of each part of an invocation, contiguous, so the parts add up."""

    def __init__(self, start: float | None = None):
        self.mark = time.perf_counter() if start is None else start
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[f"{name}_s"] = self.seconds.get(f"{name}_s", 0.0) + now - self.mark
        self.mark = now
        return self.seconds[f"{name}_s"]

    def timings(self) -> dict[str, float]:
        return {**self.seconds, "total_s": sum(self.seconds.values())}


class MetricsRecord:
    """The run's metrics.json and its one writer: rewritten atomically after each part, so an
    interrupted run keeps what it finished."""

    def __init__(self, folder: RunFolder, laps: Laps, header: dict):
        self.folder, self.laps, self.metrics = folder, laps, dict(header)

    def __call__(self, part: str, **sections: Any) -> None:
        """`part` finished (its time lap closes): merge `sections` and write."""
        self.metrics.update(sections)
        self.laps.lap(part)
        self.write()

    def write(self) -> None:
        self.metrics["timings"] = self.laps.timings()
        self.folder.write_metrics(self.metrics)

    def ended(self, **fields: Any) -> None:
        """How a run ended early (an error, a stop request), beside what it finished; only into
        a folder found to be this config's (an error must not land on another run's results).
        Best effort: on a full disk the run stops all the same."""
        if self.folder.owned:
            self.metrics.update(fields)
            try:
                self.write()
            except OSError as exc:
                log.warning("could not record how the run ended in metrics.json: %s", exc)
