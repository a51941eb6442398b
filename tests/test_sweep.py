"""The sweep summary on job folders written here: rows, statistics over seeds, the figure."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from saelab.report.sweep import write_summary

# (labels per class, seed) -> (finetune, scratch, probe, baseline) test accuracy
RESULTS = {("10", 0): (0.70, 0.60, 0.50, 0.65), ("10", 1): (0.74, 0.61, 0.52, 0.66),
           ("10", 2): (0.72, 0.65, 0.51, 0.64), ("null", 0): (0.98, 0.975, 0.70, 0.92),
           ("null", 1): (0.981, 0.976, 0.71, 0.921)}


def job(sweep: Path, num: int, labels: str, seed: int, error: str | None = None) -> None:
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(
        f"- data.labels_per_class={labels}\n- seed={seed}\n- finetune.lr=0.001\n")
    metrics = {"data": {"classes": list(range(10)),
                        "n_labelled_train": 100 if labels == "10" else 55000},
               "timings": {"total_s": 10.0}}
    if error:
        metrics["error"] = error
    else:
        accs = dict(zip(("finetune", "scratch", "probe", "baseline"), RESULTS[labels, seed],
                        strict=True))
        for stage in ("baseline", "probe", "finetune", "scratch"):  # in the order they run
            metrics[stage] = {"test_acc": accs[stage], "val_acc": accs[stage] - 0.01}
        metrics["semisup"] = {"test_acc": metrics["finetune"]["test_acc"] + 0.05}
        for arm in ("finetune", "scratch", "semisup"):  # tuned: also selected on all of val
            metrics[arm]["beside"] = {"test_acc": metrics[arm]["test_acc"] - 0.01}
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path) -> Path:
    for num, (labels, seed) in enumerate(RESULTS):
        job(tmp_path, num, labels, seed)
    job(tmp_path, 5, "null", 2, error="NonFiniteLossError: diverged")
    write_summary(tmp_path)
    return tmp_path


def test_per_seed_rows_stay_in_summary_csv(sweep):
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 6 and sum(bool(r["error"]) for r in rows) == 1
    assert {float(r["scratch_test_acc"]) for r in rows if not r["error"]} == {
        v[1] for v in RESULTS.values()}


def test_seeds_are_grouped_with_mean_std_and_the_paired_interval(sweep):
    groups = {r["data.labels_per_class"]: r
              for r in csv.DictReader((sweep / "summary_seeds.csv").open())}
    few, full = groups["10"], groups["null"]
    assert (few["n"], few["failed"], full["n"], full["failed"]) == ("3", "0", "2", "1")
    assert float(few["finetune_test_acc_mean"]) == pytest.approx(0.72)
    assert float(few["finetune_test_acc_std"]) == pytest.approx(0.02)  # ddof 1
    # paired differences 0.10, 0.13, 0.07: mean 0.10, sd 0.03, t(0.975, 2) = 4.303
    half = 4.3027 * 0.03 / 3 ** 0.5
    assert float(few["finetune_minus_scratch_mean"]) == pytest.approx(0.10)
    assert float(few["finetune_minus_scratch_ci95_low"]) == pytest.approx(0.10 - half, abs=1e-4)
    assert float(few["finetune_minus_scratch_ci95_high"]) == pytest.approx(0.10 + half, abs=1e-4)
    # semisup = finetune + 0.05 in every seed: a difference with no spread
    assert float(few["semisup_minus_finetune_mean"]) == pytest.approx(0.05)
    assert float(few["semisup_minus_finetune_ci95_low"]) == pytest.approx(0.05)
    md = (sweep / "summary.md").read_text()
    assert "## Statistics over seeds" in md and "| 10 | 3 | 0 | 72.00 ± 2.00 |" in md
    assert "semisup - scratch (95% CI)" in md and "finetune - scratch (95% CI)" in md
    # the trials selected on the whole validation split: their own table
    beside = md.split("### Selected on the whole validation split")[1]
    assert "finetune_beside_test_acc" in beside and "| 10 | 3 | 0 | 71.00 ± 2.00 |" in beside


def test_the_figure_is_drawn_against_labels_per_class(sweep):
    assert (sweep / "summary.png").stat().st_size > 10_000
    assert "![test accuracy against data.labels_per_class](summary.png)" in (
        sweep / "summary.md").read_text()


def test_without_seeds_there_are_no_groups_but_still_the_figure(tmp_path):
    job(tmp_path, 0, "10", 0)
    job(tmp_path, 1, "null", 0)
    write_summary(tmp_path)
    assert not (tmp_path / "summary_seeds.csv").exists()
    assert "Statistics over seeds" not in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.png").exists()
