"""One run, as the command line and `saelab.run` both do it: take the folder's lock, train (or
continue), draw the figures and the report, record how it ended, print the table."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from saelab.errors import ConfigError, Interrupted
from saelab.pipeline import Laps, is_main_process, run_experiment
from saelab.report import build_report
from saelab.runfolder import CLASSIFIERS, RunFolder
from saelab.signals import handled

log = logging.getLogger("saelab")


def execute(cfg: DictConfig, run_dir: Path, overrides: list[str], start: float) -> dict:
    """Run the experiment of `cfg` (validated) in `run_dir`; return its metrics. `start`: when
    the invocation began (`time.perf_counter()`), the table's start-up row. An error or a stop
    request is recorded in metrics.json (the finished stages stay) and raised again."""
    laps = Laps(start)
    laps.lap("startup")
    folder = RunFolder(run_dir, writer=is_main_process())
    folder.lock()
    try:
        with handled():
            try:
                run = run_experiment(cfg, run_dir, overrides, laps, folder)
                if folder.writer and cfg.visualize.enabled:
                    build_report(run)
                    laps.lap("figures")
            except Interrupted as exc:
                folder.record(interrupted=exc.signum)
                raise
            except ConfigError:  # bad input (another config's folder, bad data): not a result
                raise
            except Exception as exc:
                folder.record(error=f"{type(exc).__name__}: {exc}")
                raise
        metrics = {**run.metrics, "timings": laps.timings()}
        folder.write_metrics(metrics)
    finally:
        folder.unlock()
    if folder.writer:
        print(summary_table(metrics, run_dir))
    return metrics


def summary_table(metrics: dict, out_dir: Path) -> str:
    """Accuracies of every classifier, and where the invocation's time went: one row per part,
    adding up to the total (stages taken from a checkpoint say so)."""
    data = metrics["data"]
    labelled = "" if data["n_labelled_train"] == data["n_train"] else (
        f", {data['n_labelled_train']} / {data['n_labelled_val']} labelled")
    lines = [f"saelab: {data['name']} classes {data['classes']} "
             f"({data['n_train']} train / {data['n_val']} val / {data['n_test']} test{labelled}; "
             f"source {data['source']})",
             f"{'part':<18}{'test acc':>10}{'val acc':>10}{'time':>9}  note"]
    rows = {s: metrics[s] for s in CLASSIFIERS if s in metrics}
    rows |= {f"pretrain_layer{i}": layer for i, layer in enumerate(metrics["pretrain"], start=1)}
    for part, seconds in metrics["timings"].items():
        name = part.removesuffix("_s")
        if name == "total":
            continue
        stage = rows.get(name, {})
        test = f"{stage['test_acc']:.2%}" if "test_acc" in stage else ""
        val = f"{stage['val_acc']:.2%}" if "val_acc" in stage else ""
        origin = stage.get("origin", "trained")
        note = {"trained": "", "checkpoint": "loaded from its checkpoint"}.get(
            origin, "copied from the store")
        if "val_recon_mse" in stage:
            note = f"val recon MSE {stage['val_recon_mse']:.4f}" + (f"; {note}" if note else "")
        label = name.replace("pretrain_layer", "pretrain layer ")
        lines.append(f"{label:<18}{test:>10}{val:>10}{seconds:>8.1f}s  {note}")
    lines.append(f"{'total':<38}{metrics['timings']['total_s']:>8.1f}s  outputs in {out_dir}")
    return "\n".join(lines)
