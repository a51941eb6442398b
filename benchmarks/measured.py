"""The docs' measured numbers, from one source: `docs/measured.json`.

Every figure the README and docs/ quote from a run lives in a generated block of the page
(between `<!-- measured:NAME -->` and `<!-- /measured -->`), rendered from docs/measured.json,
which holds what the runs recorded (their metrics.json, or a sweep's summary), the command that
made each, and the CPU it ran on. The pages cannot disagree about a run, and a test checks that
every block is as rendered.

    python benchmarks/measured.py record NAME RUN_OR_SWEEP_DIR --command "saelab ..."
    python benchmarks/measured.py render          # rewrite every block from docs/measured.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

from saelab.config.schema import Arm, Config
from saelab.report.stats import mean_interval, mean_std, points_interval, points_spread
from saelab.report.sweep import collect, groups, pairs

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "docs" / "measured.json"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- measured:(\S+) -->\n)(.*?)(<!-- /measured -->)", re.S)
CLASSIFIERS = ("baseline", "probe", "finetune", "scratch")
PAIRS = pairs([arm.value for arm in Arm])  # the compared arms in pairs, as the sweep summary
ARMS = list(dict.fromkeys(arm for pair in PAIRS for arm in pair))
LABELS = "data.labels_per_class"


def cpu() -> str:
    """The CPU's model name (lscpu), what the numbers are tied to."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def record(name: str, folder: Path, command: str) -> None:
    """Add a run's metrics (or a sweep's per-seed statistics and rows, with each job's time) to
    docs/measured.json."""
    measured = json.loads(SOURCE.read_text()) if SOURCE.exists() else {}
    entry: dict = {"command": command, "cpu": cpu()}
    if (folder / "metrics.json").exists():
        metrics = json.loads((folder / "metrics.json").read_text())
        entry["metrics"] = {k: v for k, v in metrics.items() if k not in ("versions",)}
    else:  # a sweep: per group of seeds, each column's mean and std, each pair's interval
        entry["groups"] = []
        for g in groups(collect(folder)):
            columns = sorted({c for r in g.finished for c in r.metrics})
            entry["groups"].append({
                "overrides": g.overrides, "n": len(g.finished),
                "failed": len(g.rows) - len(g.finished),
                "mean_std": {c: mean_std(g.values(c)) for c in columns if g.values(c)},
                "paired": {f"{a} - {b}": mean_interval(g.paired(a, b))
                           for a, b in arm_pairs(columns)},
                "seconds": [r.metrics.get("total_s") for r in g.rows]})
    measured[name] = entry
    SOURCE.write_text(json.dumps(measured, indent=1) + "\n")


def arm_pairs(columns: list[str]) -> list[tuple[str, str]]:
    """Pairs of the arms' columns of one kind (`finetune_test_acc`, `scratch_test_acc`)."""
    arm = {c: c.split("_", 1) for c in columns if c.split("_", 1)[0] in ARMS}
    return [(a, b) for a in arm for b in arm if a != b and arm[a][1] == arm[b][1]]


def pct(value) -> str:
    return f"{100 * float(value):.2f}%"


def spread(group: dict, column: str) -> str:
    got = group["mean_std"].get(column)
    return "–" if got is None else points_spread(*got)


def interval(group: dict, a: str, b: str) -> str:
    got = group["paired"].get(f"{a} - {b}")
    return "–" if got is None else points_interval(*got)


def run_row(m: dict, name: str) -> str:
    """A results-table row of one run: its command, accuracies and time."""
    cells = [f"`{m[name]['command']}`", *(pct(m[name]["metrics"][s]["test_acc"])
                                           for s in CLASSIFIERS),
             f"{m[name]['metrics']['timings']['total_s']:.0f} s"]
    cells[3] = f"**{cells[3]}**"
    return "| " + " | ".join(cells) + " |"


def blocks(m: dict) -> dict[str, str]:
    """Every generated block, by name."""
    from saelab.api import summary_table

    out = {}
    if {"default", "binary"} <= m.keys():
        out["results"] = "\n".join([
            "| task | command | pixel baseline | probe | fine-tuned | scratch | time |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            "| 10 digits " + run_row(m, "default"), "| 0 vs 9 " + run_row(m, "binary"),
            "", f"CPU: {m['default']['cpu']}, default threads. Another CPU may move the last "
            "digit (float sums in another order); a time is one run's on a machine shared with "
            "other work."])
    if "default" in m:
        metrics = m["default"]["metrics"]
        cfg = OmegaConf.merge(OmegaConf.structured(Config), metrics["config"])  # on the schema
        table = summary_table(cfg, metrics, Path("outputs/runs/<date>_<time>"))
        out["terminal"] = f"```\n{table}\n```"
    for name in ("cae2", "conv_mnist", "conv_fashion"):  # the papers' presets, one run each
        if name in m:
            out[name] = preset_table(m[name])
    if {"conv_mnist_seeds", "conv_fashion"} <= m.keys():
        out["conv"] = conv_table(m["conv_mnist_seeds"], m["conv_fashion"])
    if "conv_mnist_seeds" in m:  # the preset over seeds: every stage in each job
        out["conv_mnist_seeds"] = study_table(m["conv_mnist_seeds"])
        out["conv_mnist_seeds_time"] = study_time(m["conv_mnist_seeds"], "")
    for name in ("study_wide", "study_default", "study_conv"):
        if name in m:
            out[name] = study_table(m[name])
            out[f"{name}_beside"] = study_table(m[name], "beside_test_acc")
            out[f"{name}_time"] = study_time(m[name])
    if "pretrain_select" in m:
        out["pretrain_select"] = jobs_table(
            m["pretrain_select"], ["pretrain.noise.level", "model.tied"],
            {"pixels (baseline)": "baseline_val_acc", "layer 1": "probe_layer1_val_acc",
             "layer 2": "probe_layer2_val_acc", "layer 3 (top)": "probe_val_acc"})
    if "head_rule" in m:
        out["head_rule"] = jobs_table(
            m["head_rule"], [LABELS, "model.head"],
            {"pretrained + fine-tuned": "finetune_val_acc", "scratch": "scratch_val_acc"})
    return out


def preset_table(entry: dict) -> str:
    """One run of a paper's preset: the fine-tuned network's test error, each compared stage's
    accuracy, each layer's contraction on validation, and the time."""
    metrics = entry["metrics"]
    layers = [section["val_contraction"] for stage, section in metrics.items()
              if stage.startswith("pretrain_layer")]  # in the run's order: layer 10 after 9
    cells = [f"`{entry['command']}`", f"**{100 * (1 - metrics['finetune']['test_acc']):.2f}%**",
             pct(metrics["finetune"]["val_acc"]),
             *(pct(metrics[s]["test_acc"]) if s in metrics else "–"
               for s in ("scratch", "probe", "baseline")),
             " / ".join(f"{c:.3g}" for c in layers), f"{metrics['timings']['total_s']:.0f} s"]
    return "\n".join([
        "| command | fine-tuned test error | its val accuracy | scratch | probe | pixel baseline "
        "| val ‖J‖²_F per layer | time |", "|" + " --- |" * len(cells),
        "| " + " | ".join(cells) + " |", "",
        f"Seed {metrics['seed']}, saelab {metrics['version']}; CPU: {entry['cpu']}, default "
        "threads."])


def conv_table(seeds: dict, fashion: dict) -> str:
    """The README's table of the convolutional presets: test error of the fine-tuned network and
    of scratch, over seeds (mean ± std) on MNIST, one run on Fashion-MNIST, and the times."""
    group = seeds["groups"][0]

    def error(column: str) -> str:
        mean, sd = group["mean_std"][column]
        return f"{100 * (1 - mean):.2f}% ± {100 * sd:.2f}"

    times = [t for t in group["seconds"] if t]
    metrics = fashion["metrics"]
    rows = [(f"`{seeds['command']}`", f"**{error('finetune_test_acc')}**",
             error("scratch_test_acc"), f"{min(times):.0f}-{max(times):.0f} s each"),
            (f"`{fashion['command']}`",
             f"**{100 * (1 - metrics['finetune']['test_acc']):.2f}%**",
             f"{100 * (1 - metrics['scratch']['test_acc']):.2f}%" if "scratch" in metrics
             else "–",
             f"{metrics['timings']['total_s']:.0f} s")]
    return "\n".join([
        "| command | fine-tuned test error | scratch | time |", "| --- | --- | --- | --- |",
        *("| " + " | ".join(row) + " |" for row in rows), "",
        f"MNIST: mean ± standard deviation over the {group['n']} seeds; Fashion-MNIST: seed 0. "
        f"CPU: {fashion['cpu']}, default threads."])


def jobs_table(entry: dict, keys: list[str], columns: dict[str, str]) -> str:
    """One row per job of a sweep (one seed each): its overrides and validation accuracies."""
    lines = ["| " + " | ".join([*keys, *columns]) + " |", "|" + " --- |" * (len(keys) +
                                                                           len(columns))]
    for g in entry["groups"]:
        cells = [g["overrides"].get(k, "") for k in keys]
        cells += [f"{100 * g['mean_std'][c][0]:.2f}%" if c in g["mean_std"] else "–"
                  for c in columns.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_time(entry: dict, note: str = ", the first of each seed pretraining") -> str:
    seconds = [s for g in entry["groups"] for s in g["seconds"] if s]
    return (f"{len(seconds)} jobs, {sum(seconds) / 60:.0f} minutes of the jobs' own times "
            f"summed (each {min(seconds):.0f}-{max(seconds):.0f} s{note}; the sweep's start adds "
            f"seconds); CPU: {entry['cpu']}, default threads.")


def study_table(entry: dict, suffix: str = "test_acc") -> str:
    """The study's table: per label count, each arm's test accuracy in %, mean ± std over seeds
    (of the weights the labelled validation images chose, or with `beside_test_acc` the whole
    validation split), the paired differences of the arms with their 95% intervals in points,
    the pixel baseline and the frozen probes of each layer."""
    probes = sorted({c.rsplit("_", 2)[0] for g in entry["groups"] for c in g["mean_std"]
                     if c.startswith("probe_layer") and c.endswith("_test_acc")})
    header = ["labels per class", "seeds", *ARMS, *(f"{a} − {b}" for a, b in PAIRS), "baseline",
              *probes, "probe"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for g in sorted(entry["groups"], key=lambda g: int(g["overrides"].get(LABELS, 0))):
        cells = [g["overrides"].get(LABELS, "all"), str(g["n"]),
                 *(spread(g, f"{arm}_{suffix}") for arm in ARMS),
                 *(interval(g, f"{a}_{suffix}", f"{b}_{suffix}") for a, b in PAIRS),
                 *(spread(g, f"{s}_test_acc") for s in ("baseline", *probes, "probe"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(check: bool = False) -> list[Path]:
    """Rewrite every generated block from docs/measured.json; the pages that changed (with
    `check`, nothing is written)."""
    generated = blocks(json.loads(SOURCE.read_text()))
    changed = []
    for page in PAGES:
        text = page.read_text()
        new = BLOCK.sub(lambda b: f"{b.group(1)}{generated[b.group(2)]}\n{b.group(4)}"
                        if b.group(2) in generated else b.group(0), text)
        if new != text:
            changed.append(page)
            if not check:
                page.write_text(new)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("name")
    rec.add_argument("folder", type=Path)
    rec.add_argument("--command", required=True)
    sub.add_parser("render")
    args = parser.parse_args()
    if args.what == "record":
        record(args.name, args.folder, args.command)
    else:
        print("\n".join(str(p) for p in render()) or "every block is current")


if __name__ == "__main__":
    main()
