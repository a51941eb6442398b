"""Sweep summary: at the end of a multirun, one table of every job's overrides and accuracies.

Registered as a Hydra callback in `conf/config.yaml`, it reads what each job left in its folder
(`.hydra/overrides.yaml` and `metrics.json`) rather than the launcher's return values, so it works
alike for the basic, joblib and SLURM launchers and for the Optuna sweeper, and a job that failed
(its error recorded in its `metrics.json` by the CLI) or died is still a row.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# (column, stage in metrics.json, key): fine-tuned validation accuracy first, the sort key.
METRICS = [
    ("finetune_val_acc", "finetune", "val_acc"),
    ("finetune_test_acc", "finetune", "test_acc"),
    ("probe_val_acc", "probe", "val_acc"),
    ("probe_test_acc", "probe", "test_acc"),
    ("baseline_val_acc", "baseline", "val_acc"),
    ("baseline_test_acc", "baseline", "test_acc"),
    ("total_s", "timings", "total_s"),
]


@dataclass
class JobRow:
    """One job of a sweep: its folder (relative to the sweep), overrides, metrics and error."""

    job: str
    overrides: dict[str, str]
    metrics: dict[str, float]
    error: str | None

    @property
    def sort_key(self) -> tuple:
        """Finished jobs by decreasing validation accuracy, then those without one, then failed
        jobs; ties in job order."""
        val = self.metrics.get("finetune_val_acc")
        num = int(self.job) if self.job.isdigit() else math.inf
        return (self.error is not None, val is None, -(val or 0.0), num, self.job)


def read_job(job_dir: Path, sweep_dir: Path) -> JobRow:
    """The row of the job in `job_dir`, whatever state it ended in."""
    listed = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml") or []
    overrides = dict(item.split("=", 1) if "=" in item else (item, "") for item in listed)
    path = job_dir / "metrics.json"
    if not path.exists():
        return JobRow(str(job_dir.relative_to(sweep_dir)), overrides, {},
                      "no metrics.json: the job died before its first stage")
    saved: dict[str, Any] = json.loads(path.read_text())
    metrics = {column: float(saved[stage][key]) for column, stage, key in METRICS
               if key in saved.get(stage, {})}
    error = saved.get("error")
    if error is None and "finetune" not in saved:
        error = "incomplete: no fine-tuning results (interrupted?)"
    return JobRow(str(job_dir.relative_to(sweep_dir)), overrides, metrics, error)


def collect(sweep_dir: Path) -> list[JobRow]:
    """Every job folder under `sweep_dir` (each holds `.hydra/overrides.yaml`), sorted."""
    jobs = [read_job(p.parent.parent, sweep_dir)
            for p in sweep_dir.glob("**/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda row: row.sort_key)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _format(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}s" if column == "total_s" else f"{value:.2%}"


def write_summary(sweep_dir: Path) -> tuple[Path, Path]:
    """Write `summary.csv` (every override, raw numbers) and `summary.md` (the overrides that vary
    across jobs, percentages) into `sweep_dir`; return both paths."""
    rows = collect(sweep_dir)
    keys = list(dict.fromkeys(k for row in rows for k in row.overrides))
    varying = [k for k in keys if len({row.overrides.get(k) for row in rows}) > 1] or keys
    common = [f"`{k}={rows[0].overrides[k]}`" for k in keys if k not in varying]
    columns = [column for column, _, _ in METRICS]

    csv_path = sweep_dir / "summary.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *keys, *columns, "error"])
        for row in rows:
            writer.writerow([row.job, *(row.overrides.get(k, "") for k in keys),
                             *(row.metrics.get(c, "") for c in columns), row.error or ""])

    failed = sum(row.error is not None for row in rows)
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(rows)} jobs ({failed} failed), sorted by fine-tuned validation accuracy.", ""]
    if common:
        lines += [f"Common overrides: {', '.join(common)}.", ""]
    header = ["job", *varying, *columns, *(["error"] if failed else [])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.job, *(row.overrides.get(k, "") for k in varying),
                 *(_format(c, row.metrics.get(c)) for c in columns)]
        cells += [row.error or ""] if failed else []
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    md_path = sweep_dir / "summary.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    """Hydra callback: write the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        csv_path, md_path = write_summary(Path(config.hydra.sweep.dir))
        print(f"saelab: sweep summary in {md_path} and {csv_path}")
