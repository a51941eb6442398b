"""One run, as the command line and `saelab.run` both do it: take the folder's lock, train (or
continue) every stage (saelab.experiment.recipe), draw the figures and the report, record how it
ended, print the table.

Nothing heavy is imported until a run starts, so that `saelab.run` refuses bad input at once.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from saelab.config.compose import compose_raw, without_hydra
from saelab.config.costs import warn
from saelab.config.job import job_config
from saelab.config.rules import check_paths
from saelab.errors import ConfigError, Interrupted
from saelab.runs.folder import RunFolder
from saelab.signals import handled

if TYPE_CHECKING:
    from saelab.experiment.run import Run

log = logging.getLogger("saelab")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's job logging


# ---------------------------------------------------------------------------------------------
# One run


def execute(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None,
            start: float | None = None) -> Run:
    """Run the experiment of `cfg` (validated) in `run_dir`; return the run (its metrics, data and
    networks). `overrides`: what the folder records (default: what it holds); `start`: when the
    invocation began (`time.perf_counter()`), the table's start-up row. An error or a stop
    request is recorded in metrics.json (the finished stages stay) and raised again."""
    from saelab.experiment.devices import data_device, device_name, is_main_process
    from saelab.experiment.recipe import train
    from saelab.experiment.record import Laps, MetricsRecord, git_commit, versions
    from saelab.experiment.run import Run
    from saelab.report.build import build_report

    laps = Laps(start)
    laps.lap("startup")
    folder = RunFolder(run_dir, writer=is_main_process())
    device = data_device(cfg)
    installed = versions()
    record = MetricsRecord(folder, laps, {
        "version": installed["saelab"], "git_commit": git_commit(), "seed": cfg.seed,
        "versions": installed, "device": device_name(device),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)})
    folder.lock()
    logger_files = folder.logger_files()
    try:
        with handled():
            try:
                experiment = train(cfg, folder, device, record, overrides)
                run = Run.of(run_dir, experiment, record.metrics)
                if folder.writer and cfg.visualize.enabled:
                    build_report(run, folder)
                    laps.lap("figures")
            except Interrupted as exc:
                record.ended(interrupted=exc.signum)
                raise
            except ConfigError:  # bad input (another config's folder, bad data): not a result
                raise
            except Exception as exc:
                record.ended(error=f"{type(exc).__name__}: {exc}")
                raise
        record.write()
    except ConfigError:  # refused late (bad data files, too many labels asked): leave nothing
        folder.unlock()
        folder.discard()
        raise
    finally:
        folder.claim_logger_files(logger_files)
        folder.unlock()
    if folder.writer:
        print(summary_table(cfg, record.metrics, run_dir))
    return run


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
    """`saelab.run`: the experiment of `overrides` (as on the command line, e.g.
    ["data.classes=[0,9]"]) in `run_dir` (default: a new outputs/runs/<date>_<time>, as the
    command line); returns its metrics. Raises ConfigError for bad input, as the command line
    exits 2. The caller's logging and signal handlers are as they were afterwards."""
    start = time.perf_counter()
    overrides = list(overrides)
    composed, hydra = without_hydra(compose_raw(overrides, hydra=True))
    job, recorded = job_config(overrides, composed)
    check_paths(job)
    warn([job])
    folder = Path(job.resume or run_dir or hydra.run.dir).expanduser()
    with run_logging(folder):
        return execute(job, folder, recorded, start).metrics


# ---------------------------------------------------------------------------------------------
# The table


def summary_table(cfg: DictConfig, metrics: dict, out_dir: Path) -> str:
    """Accuracies of every classifier, and where the invocation's time went: one row per part,
    adding up to the total (stages taken from a checkpoint say so)."""
    from saelab.experiment.stages import plan

    data = metrics["data"]
    labelled = "" if data["n_labelled_train"] == data["n_train"] else (
        f", {data['n_labelled_train']} / {data['n_labelled_val']} labelled")
    lines = [f"saelab: {data['name']} classes {data['classes']} "
             f"({data['n_train']} train / {data['n_val']} val / {data['n_test']} test{labelled}; "
             f"source {data['source']})",
             f"{'part':<22}{'test acc':>10}{'val acc':>10}{'time':>9}  note"]
    labels = {stage.name: stage.label for stage in plan(cfg)}
    for part, seconds in metrics["timings"].items():
        name = part.removesuffix("_s")
        if name == "total":
            continue
        stage = metrics.get(name, {}) if name in labels else {}
        test = f"{stage['test_acc']:.2%}" if "test_acc" in stage else ""
        val = f"{stage['val_acc']:.2%}" if "val_acc" in stage else ""
        origin = stage.get("origin", "trained")
        note = {"trained": "", "checkpoint": "loaded from its checkpoint"}.get(
            origin, "copied from the store")
        if "val_recon_mse" in stage:
            note = f"val recon MSE {stage['val_recon_mse']:.4f}" + (f"; {note}" if note else "")
        lines.append(f"{labels.get(name, name):<22}{test:>10}{val:>10}{seconds:>8.1f}s  "
                     f"{note}".rstrip())
    lines.append(f"{'total':<42}{metrics['timings']['total_s']:>8.1f}s  outputs in {out_dir}")
    return "\n".join(lines)
