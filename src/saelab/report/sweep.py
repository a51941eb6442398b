"""Sweep summary: at the end of a multirun, one table of every job's overrides and accuracies,
statistics over seeds, and a figure of accuracy against a swept number (labels per class).

Registered as a Hydra callback in `conf/config.yaml`, it reads what each job left in its folder
(`.hydra/overrides.yaml` and `metrics.json`) rather than the launcher's return values, so it works
alike for the basic, joblib and SLURM launchers and for the Optuna sweeper, and a job that failed
(its error recorded in its `metrics.json`), was stopped or died is still a row.

Jobs whose overrides differ only in `seed` form a group: mean ± standard deviation (ddof 1) of
every accuracy over the seeds that finished, how many did and did not, and the per-seed paired
difference fine-tuned - scratch with its 95% Student's t interval.
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

from saelab.config.schema import Arm
from saelab.report.stats import mean_interval, mean_std, points_interval, points_spread
from saelab.runs.folder import METRICS, OVERRIDES

SEED = "seed"
LABELS_PER_CLASS = "data.labels_per_class"
SORT_STAGE = "finetune"  # the stage whose validation accuracy ranks the jobs (a search's objective)


def classifier_stages(metrics: dict) -> list[str]:
    """The classifier stages a job's metrics.json holds (sections with a test accuracy), in the
    order the job ran them."""
    return [name for name, section in metrics.items()
            if isinstance(section, dict) and "test_acc" in section]


def column_order(rows: list[JobRow]) -> list[str]:
    """Every classifier stage of the sweep, for the columns: the ranking stage first, then the
    others, latest first."""
    names = list(dict.fromkeys(n for row in rows for n in row.stages))
    return [*(n for n in names if n == SORT_STAGE), *(n for n in reversed(names)
                                                       if n != SORT_STAGE)]


def columns(order: list[str]) -> list[str]:
    return [*(f"{s}_{k}" for s in order for k in ("val_acc", "test_acc")), "total_s"]


@dataclass
class JobRow:
    """One job of a sweep: its folder (relative to the sweep), overrides, metrics and error."""

    job: str
    overrides: dict[str, str]
    metrics: dict[str, float]
    error: str | None
    labelled_per_class: float | None = None  # labelled training images per class it used
    stages: tuple[str, ...] = ()  # its classifier stages, in the order they ran
    interrupted: int | None = None  # the signal that stopped it, its finished stages kept

    @property
    def sort_key(self) -> tuple:
        """Finished jobs by decreasing validation accuracy, then those without one, then failed
        jobs; ties in job order."""
        val = self.metrics.get(f"{SORT_STAGE}_val_acc")
        num = int(self.job) if self.job.isdigit() else math.inf
        return (self.error is not None, val is None, -(val or 0.0), num, self.job)


def read_job(job_dir: Path, sweep_dir: Path) -> JobRow:
    """The row of the job in `job_dir`, whatever state it ended in."""
    listed = OmegaConf.load(job_dir / OVERRIDES) or []
    overrides = dict(item.split("=", 1) if "=" in item else (item, "") for item in listed)
    name = str(job_dir.relative_to(sweep_dir))
    path = job_dir / METRICS
    if not path.exists():
        return JobRow(name, overrides, {}, "no metrics.json: the job died before its first stage")
    saved: dict[str, Any] = json.loads(path.read_text())
    stages = classifier_stages(saved)
    metrics = {f"{stage}_{key}": float(saved[stage][key]) for stage in stages
               for key in ("val_acc", "test_acc") if key in saved[stage]}
    metrics |= {f"{stage}_beside_test_acc": float(saved[stage]["beside"]["test_acc"])
                for stage in stages if saved[stage].get("beside")}
    if "total_s" in saved.get("timings", {}):
        metrics["total_s"] = float(saved["timings"]["total_s"])
    error = saved.get("error")
    if error is None and "interrupted" in saved:
        error = f"interrupted by signal {saved['interrupted']}"
    if error is None and SORT_STAGE not in saved:
        error = "incomplete: no fine-tuning results (interrupted?)"
    data = saved.get("data", {})
    per_class = data["n_labelled_train"] / len(data["classes"]) if "n_labelled_train" in data \
        else None
    return JobRow(name, overrides, metrics, error, per_class, tuple(stages),
                  saved.get("interrupted"))


def collect(sweep_dir: Path) -> list[JobRow]:
    """Every job folder under `sweep_dir` (each holds `.hydra/overrides.yaml`), sorted."""
    jobs = [read_job(p.parent.parent, sweep_dir) for p in sweep_dir.glob(f"**/{OVERRIDES}")]
    return sorted(jobs, key=lambda row: row.sort_key)


@dataclass
class Group:
    """Jobs that differ only in their seed."""

    overrides: dict[str, str]
    rows: list[JobRow]

    @property
    def finished(self) -> list[JobRow]:
        return [r for r in self.rows if r.error is None]

    def values(self, column: str) -> list[float]:
        return [r.metrics[column] for r in self.finished if column in r.metrics]

    def paired(self, a: str, b: str) -> list[float]:
        """Per seed: column `a` - column `b`, where a job has both."""
        return [r.metrics[a] - r.metrics[b] for r in self.finished if {a, b} <= r.metrics.keys()]


def pairs(order: list[str]) -> list[tuple[str, str]]:
    """The compared arms present, in pairs: each pretrained arm against scratch, and the
    semi-supervised arm against fine-tuning."""
    arms = [arm.value for arm in (Arm.semisup, Arm.finetune, Arm.scratch) if arm.value in order]
    return [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:]]


def groups(rows: list[JobRow]) -> list[Group]:
    """The jobs grouped by every override but the seed, in order of first appearance by job."""
    out: dict[tuple, Group] = {}
    for row in sorted(rows, key=lambda r: (int(r.job) if r.job.isdigit() else math.inf, r.job)):
        key = tuple(sorted((k, v) for k, v in row.overrides.items() if k != SEED))
        out.setdefault(key, Group(dict(key), [])).rows.append(row)
    return list(out.values())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _format(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}s" if column == "total_s" else f"{value:.2%}"


def _mean_std(values: list[float]) -> str:
    return points_spread(*mean_std(values)) if values else "–"


def _interval(values: list[float]) -> str:
    got = mean_interval(values)
    if got is None:
        return "–" if not values else f"{100 * values[0]:+.2f} (n=1)"
    return points_interval(*got)


def seed_table(sweep_groups: list[Group], varying: list[str], order: list[str],
               suffix: str = "test_acc") -> list[str]:
    """A table of statistics over seeds (in percentage points) of each stage's `suffix` column
    (the test accuracy of the weights its validation chose, or of those the whole validation
    split chose: `beside_test_acc`), and the paired differences of the compared arms."""
    tests = [f"{s}_{suffix}" for s in order]
    compared = pairs(order)
    header = [*varying, "n", "failed", *tests, *(f"{a} - {b} (95% CI)" for a, b in compared)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in sweep_groups:
        cells = [g.overrides.get(k, "") for k in varying]
        cells += [str(len(g.finished)), str(len(g.rows) - len(g.finished))]
        cells += [_mean_std(g.values(c)) for c in tests]
        cells += [_interval(g.paired(f"{a}_{suffix}", f"{b}_{suffix}")) for a, b in compared]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def write_groups_csv(path: Path, sweep_groups: list[Group], keys: list[str],
                     order: list[str]) -> None:
    tests = [f"{s}_test_acc" for s in order]
    compared = pairs(order)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "n", "failed", *(f"{c}_{m}" for c in tests for m in
                                                  ("mean", "std")),
                         *(f"{a}_minus_{b}_{m}" for a, b in compared
                           for m in ("mean", "ci95_low", "ci95_high"))])
        for g in sweep_groups:
            stats = []
            for c in tests:
                values = g.values(c)
                mean, sd = mean_std(values) if values else (None, None)
                stats += ["" if mean is None else mean, "" if sd is None else sd]
            for a, b in compared:
                stats += mean_interval(g.paired(f"{a}_test_acc", f"{b}_test_acc")) or (
                    "", "", "")
            writer.writerow([*(g.overrides.get(k, "") for k in keys), len(g.finished),
                             len(g.rows) - len(g.finished), *stats])


def numeric_key(rows: list[JobRow], varying: list[str]) -> str | None:
    """The swept key to plot against: labels per class if swept, else the first varying key
    whose values are all numbers."""
    def number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    candidates = [k for k in varying if k != SEED and all(
        number(r.overrides.get(k, ""))
        or (k == LABELS_PER_CLASS and r.overrides.get(k) == "null")
        for r in rows)]
    if LABELS_PER_CLASS in candidates:
        return LABELS_PER_CLASS
    return candidates[0] if candidates else None


def accuracy_plot(path: Path, sweep_groups: list[Group], key: str, others: list[str],
         order: list[str]) -> None:
    """Test accuracy of every stage against `key`, mean ± std over seeds; one line per stage and
    per value of the other varying keys; labels per class on a log scale, "all" at the full
    count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[tuple[float, float, float, str]]] = {}
    for g in sweep_groups:
        value = g.overrides.get(key, "")
        full = value == "null"
        if full:
            counts = [r.labelled_per_class for r in g.finished if r.labelled_per_class]
            if not counts:
                continue
            x = sum(counts) / len(counts)
        else:
            x = float(value)
        rest = tuple(f"{k}={g.overrides.get(k, '')}" for k in others)
        for stage in order:
            values = g.values(f"{stage}_test_acc")
            if values:
                mean, sd = mean_std(values)
                lines.setdefault((stage, rest), []).append(
                    (x, 100 * mean, 100 * (sd or 0.0), "all" if full else value))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ticks: dict[float, str] = {}
    for (stage, rest), pts in lines.items():
        pts.sort()
        xs, ys, sds, names = zip(*pts, strict=True)
        ticks.update(zip(xs, names, strict=True))
        label = " ".join([stage, *rest])
        ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=label)
    if key == LABELS_PER_CLASS:
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images per class")
    else:
        ax.set_xlabel(key)
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="stage (finetune: pretrained, then fine-tuned)",
              title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(sweep_dir: Path) -> tuple[list[Path], list[JobRow]]:
    """Write `summary.csv` (every job, every override, raw numbers), `summary.md` (the overrides
    that vary, percentages, statistics over seeds), `summary_seeds.csv` and, when a number is
    swept, `summary.png` into `sweep_dir`; return the paths written and the jobs' rows."""
    rows = collect(sweep_dir)
    order = column_order(rows)
    cols = columns(order)
    keys = list(dict.fromkeys(k for row in rows for k in row.overrides))
    varying = [k for k in keys if len({row.overrides.get(k) for row in rows}) > 1] or keys
    common = [f"`{k}={rows[0].overrides[k]}`" for k in keys if k not in varying]

    csv_path = sweep_dir / "summary.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *keys, *cols, "error"])
        for row in rows:
            writer.writerow([row.job, *(row.overrides.get(k, "") for k in keys),
                             *(row.metrics.get(c, "") for c in cols), row.error or ""])
    written = [csv_path]

    failed = sum(row.error is not None for row in rows)
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(rows)} jobs ({failed} failed), sorted by fine-tuned validation accuracy.", ""]
    if common:
        lines += [f"Common overrides: {', '.join(common)}.", ""]
    header = ["job", *varying, *cols, *(["error"] if failed else [])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.job, *(row.overrides.get(k, "") for k in varying),
                 *(_format(c, row.metrics.get(c)) for c in cols)]
        cells += [row.error or ""] if failed else []
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    sweep_groups, others = groups(rows), [k for k in varying if k != SEED]
    if SEED in varying:
        lines += ["", "## Statistics over seeds", "",
                  "Test accuracy in %, mean ± standard deviation (ddof 1) over the seeds that "
                  "finished; the paired differences of the compared arms per seed, mean and 95% "
                  "Student's t interval, in points.", "",
                  *seed_table(sweep_groups, others, order)]
        tuned = [s for s in order if any(f"{s}_beside_test_acc" in r.metrics for r in rows)]
        if tuned:
            lines += ["", "### Selected on the whole validation split", "",
                      "The same trials, the epoch and the trial chosen on the whole validation "
                      "split (the literature's setting) rather than on the labelled validation "
                      "images: reported beside, never used.", "",
                      *seed_table(sweep_groups, others, tuned, "beside_test_acc")]
        seeds_path = sweep_dir / "summary_seeds.csv"
        write_groups_csv(seeds_path, sweep_groups, others, order)
        written.append(seeds_path)
    key = numeric_key(rows, others)
    if key is not None:
        png = sweep_dir / "summary.png"
        # Each stage but the probes below the top (and of scratch's random stack): a figure
        # with every layer's probe would hide the comparison it is for.
        accuracy_plot(png, sweep_groups, key, [k for k in others if k != key],
             [s for s in order if not s.startswith("probe_")])
        lines += ["", f"![test accuracy against {key}](summary.png)"]
        written.append(png)
    md_path = sweep_dir / "summary.md"
    md_path.write_text("\n".join(lines) + "\n")
    return [*written, md_path], rows


class SweepSummary(Callback):
    """Hydra callback: write the sweep summary when a multirun ends, and keep which jobs were
    stopped by a signal (their folders, to continue them) and which failed otherwise, whatever
    process or machine ran them, for the sweep's exit status."""

    jobs: int = 0
    failed: list[str] = []
    stopped: list[tuple[str, int, Path]] = []  # job, signal, folder

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        paths, rows = write_summary(sweep_dir)
        SweepSummary.jobs = len(rows)
        SweepSummary.stopped = [(row.job, row.interrupted, (sweep_dir / row.job).resolve())
                                for row in rows if row.interrupted is not None]
        SweepSummary.failed = [row.job for row in rows
                               if row.error is not None and row.interrupted is None]
        print(f"saelab: sweep summary in {', '.join(str(p) for p in paths)}")
