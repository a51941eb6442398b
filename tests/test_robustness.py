"""The robustness study on a tiny finished run: rows, accuracies, plot, run folder untouched."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import folder_state

from saelab.report.robustness import LEVELS, main, noisy


@pytest.mark.slow
def test_robustness_csv_plot_and_clean_accuracy_equal_the_run(tiny_run, tmp_path):
    before = folder_state(tiny_run)
    main([str(tiny_run), "--out", str(tmp_path), "--device", "cpu"])
    rows = list(csv.DictReader((tmp_path / "robustness.csv").open()))
    models = ["pixel baseline", "stacked AE", f"from scratch [{tiny_run.name}]"]
    assert [(r["model"], r["noise"], float(r["level"])) for r in rows] == [
        (m, kind, level) for m in models for kind, levels in LEVELS.items() for level in levels]
    acc = {(r["model"], r["noise"], float(r["level"])): float(r["test_acc"]) for r in rows}
    m = json.loads((tiny_run / "metrics.json").read_text())
    for model, stage in zip(models, ("baseline", "finetune", "scratch"), strict=True):
        assert acc[model, "gaussian", 0.0] == pytest.approx(m[stage]["test_acc"], abs=1e-9)
        assert acc[model, "masking", 0.0] == acc[model, "gaussian", 0.0]
        assert acc[model, "gaussian", 1.0] < acc[model, "gaussian", 0.0]
        assert acc[model, "masking", 0.5] < acc[model, "masking", 0.0]
    assert (tmp_path / "robustness.png").stat().st_size > 10_000
    assert folder_state(tiny_run) == before  # the run folder is only read


def test_noise_is_scaled_to_the_pixel_range_clipped_and_reproducible():
    x = torch.rand(2000, 784)  # zero_one pixels; the same images in [-1, 1] are 2x - 1
    out = noisy(x, "gaussian", 0.5, "zero_one")
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, noisy(x, "gaussian", 0.5, "zero_one"))
    assert torch.allclose(noisy(2 * x - 1, "gaussian", 0.5, "minus_one_one"), 2 * out - 1,
                          atol=1e-5)
    grey = torch.full((2000, 784), 0.5)  # far from the clipping bounds
    assert float((noisy(grey, "gaussian", 0.1, "zero_one") - grey).std()) == pytest.approx(
        0.05, rel=0.02)  # sigma 0.1 in [-1, 1] units is 0.05 in [0, 1] units
    for pixels, low in (("zero_one", 0.0), ("minus_one_one", -1.0)):
        masked = noisy(grey, "masking", 0.25, pixels)
        assert float((masked == low).float().mean()) == pytest.approx(0.25, abs=0.01)


def test_unfinished_run_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RUN_DIR" in err and ".hydra/config.yaml" in err
