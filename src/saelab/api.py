"""`saelab.run`: one run from Python (a notebook, a script), exactly as the command line does it:
compose and check the config, log to the run's `saelab.log`, write `.hydra/`, train, draw the
figures and the report. The caller's logging and signal handlers are as they were afterwards."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from saelab.config import compose_raw, job_config

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's job logging


@contextmanager
def run_logging(run_dir: Path) -> Iterator[None]:
    """saelab's log lines to the terminal and to `run_dir/saelab.log` for the length of a run."""
    logger = logging.getLogger("saelab")
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stdout),
                logging.FileHandler(run_dir / "saelab.log")]
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)
        logger.propagate = propagate


def run(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict:
    """Run the experiment of `overrides` (as on the command line, e.g. ["data.classes=[0,9]"])
    in `run_dir` (default: a new outputs/runs/<date>_<time>, as the command line) and return its
    metrics. Raises ConfigError for bad input, as the command line exits 2."""
    start = time.perf_counter()
    overrides = list(overrides)
    hydra = compose_raw(overrides, hydra=True).hydra
    job, recorded = job_config(overrides)
    folder = Path(job.resume or run_dir or hydra.run.dir).expanduser()
    from saelab.app import execute  # heavy imports, once the config is known to be good

    with run_logging(folder):
        return execute(job, folder, recorded, start)
