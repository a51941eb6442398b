"""Reusing a run: `saelab.run` as the command line, `load_run`'s methods, `saelab-encode`, and
the docs' example as written."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import signal

import numpy as np
import pytest
import torch
from helpers import QUICK, REPO, folder_state, run_cli

import saelab
from saelab.api import execute
from saelab.data.splits import load_raw, scale_pixels
from saelab.nn.evaluation import in_chunks
from saelab.nn.networks import StackedNet
from saelab.report.export import main as encode_main

TIMINGS = ("seconds", "timings", "rate", "versions", "git_commit", "device", "origin", "source")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """An in-process run (the pipeline's own Run, with its data) and its folder."""
    run_dir = tmp_path_factory.mktemp("quick") / "run"
    return execute(saelab.compose(QUICK), run_dir)


def test_load_run_codes_and_predictions_equal_the_pipelines_exactly(quick):
    run = saelab.load_run(quick.dir)
    data = quick.data
    for k in range(1, len(quick.autoencoders) + 1):
        stack = StackedNet.from_autoencoders(quick.autoencoders[:k], None)
        codes = in_chunks(stack.codes, data.test_x)  # as the probes computed them
        assert torch.equal(run.encode(data.test_x, layer=k, scaled=True), codes)
    # raw 0-255 images give the same codes: the run's pixel transform, in the pipeline's chunks
    raw = load_raw("mnist", quick.cfg.data.root, quick.cfg.data.mirror, False)
    first = raw.test_x[:500]
    assert torch.equal(run.encode(first), run.encode(scale_pixels(first, "minus_one_one"),
                                                     scaled=True))
    predicted = run.predict(data.test_x, scaled=True)
    accuracy = float((predicted == data.test_y).float().mean())
    assert accuracy == quick.metrics["finetune"]["test_acc"]
    assert torch.equal(run.predict(data.test_x, "scratch", scaled=True),
                       quick.networks["scratch"](data.test_x).argmax(1))
    assert run.predict_proba(first.numpy()).sum(1).allclose(torch.ones(500))


@pytest.mark.parametrize("images, message", [
    (np.zeros((4, 28, 28), dtype=np.float32), "dtype"),
    (np.zeros((4, 27, 28), dtype=np.uint8), "shape"),
    (np.full((4, 784), 300, dtype=np.int64), "0..255"),
])
def test_load_run_methods_refuse_what_is_not_raw_pixels(quick, images, message):
    with pytest.raises(saelab.errors.ConfigError, match=message):
        saelab.load_run(quick.dir).encode(images)


def test_saelab_encode_writes_codes_probabilities_and_labels_and_changes_nothing(quick,
                                                                               tmp_path):
    before = folder_state(quick.dir)
    out = tmp_path / "codes.npz"
    encode_main([str(quick.dir), "--layer", "1", "--stack", "finetune", "--out", str(out)])
    npz = np.load(out)
    data = quick.data
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        expected = in_chunks(lambda part: quick.networks["finetune"].codes(part, 1), x).numpy()
        assert np.array_equal(npz[f"codes_{split}"], expected)
        assert np.array_equal(npz[f"labels_{split}"], y.numpy())
    assert (npz["pred_test"] == npz["labels_test"]).mean() == pytest.approx(
        quick.metrics["finetune"]["test_acc"], abs=1e-7)  # the metric is a float32 ratio
    assert npz["proba_val"].shape == (200, 10) and list(npz["classes"]) == list(range(10))
    assert folder_state(quick.dir) == before


def test_saelab_encode_reads_npy_and_idx_images(quick, tmp_path):
    raw = load_raw("mnist", quick.cfg.data.root, quick.cfg.data.mirror, False)
    images = raw.test_x[:100].numpy()
    np.save(tmp_path / "mine.npy", images)
    idx = (0x803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (100, 28, 28))
    (tmp_path / "mine.gz").write_bytes(gzip.compress(idx + images.tobytes()))
    outs = []
    for name in ("mine.npy", "mine.gz"):
        encode_main([str(quick.dir), "--images", str(tmp_path / name), "--out",
                     str(tmp_path / f"{name}.npz")])
        outs.append(np.load(tmp_path / f"{name}.npz"))
    assert np.array_equal(outs[0]["codes_images"], outs[1]["codes_images"])
    run = saelab.load_run(quick.dir)
    assert np.array_equal(outs[0]["codes_images"], run.encode(images).numpy())
    assert outs[0]["codes_images"].shape == (100, 9) and "labels_images" not in outs[0]


@pytest.mark.parametrize("content, message", [
    (np.zeros((3, 28, 28), dtype=np.float64), "dtype"),
    (np.zeros((3, 10), dtype=np.uint8), "shape"),
    (np.full((3, 28, 28), -1, dtype=np.int32), "0..255"),
])
def test_saelab_encode_bad_images_are_one_line_and_exit_2(quick, tmp_path, capsys, content,
                                                          message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(SystemExit) as exit_:
        encode_main([str(quick.dir), "--images", str(tmp_path / "bad.npy"), "--out",
                     str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "x.npz").exists()


def test_saelab_encode_never_writes_into_the_run_folder_by_default(quick, capsys, monkeypatch):
    monkeypatch.chdir(quick.dir)
    with pytest.raises(SystemExit):
        encode_main([".", "--splits", "test"])
    assert "--out" in capsys.readouterr().err


def test_run_leaves_the_callers_logging_and_signal_handlers_as_they_were(tmp_path):
    root, saelab_logger = logging.getLogger(), logging.getLogger("saelab")
    state = (list(root.handlers), root.level, list(saelab_logger.handlers), saelab_logger.level,
             saelab_logger.propagate)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saelab.run(QUICK, tmp_path / "run")
    assert (list(root.handlers), root.level, list(saelab_logger.handlers), saelab_logger.level,
            saelab_logger.propagate) == state
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert "loading the data" in (tmp_path / "run" / "saelab.log").read_text()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


def without_timings(metrics: dict) -> dict:
    """metrics.json less what differs between two identical runs (times, the speed measured for
    the progress estimate, versions, paths; the first run reads the mirror, the second the cache
    it filled)."""
    if isinstance(metrics, dict):
        return {k: without_timings(v) for k, v in metrics.items() if k not in TIMINGS}
    if isinstance(metrics, list):
        return [without_timings(v) for v in metrics]
    return metrics


@pytest.mark.slow
def test_run_and_the_command_line_give_identical_metrics(tmp_path):
    api = saelab.run(QUICK, tmp_path / "api")
    proc = run_cli(tmp_path / "cli", *QUICK)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert without_timings(api) == without_timings(cli)
    assert (tmp_path / "api" / ".hydra" / "overrides.yaml").read_text() == (
        tmp_path / "cli" / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_the_docs_example_runs_as_written(tmp_path, monkeypatch):
    text = (REPO / "docs" / "api.md").read_text()
    example = re.search(r"### An example, start to finish.*?```python\n(.*?)```", text,
                        re.S).group(1)
    monkeypatch.chdir(tmp_path)  # its relative paths land here, not in the repository
    monkeypatch.setenv("SAELAB_MIRROR", os.environ["SAELAB_MIRROR"])
    namespace: dict = {}
    exec(compile(example, "docs/api.md", "exec"), namespace)  # noqa: S102 - the docs' own code
    assert namespace["accuracy"] > 0.9
    assert namespace["metrics"]["finetune"]["origin"] == "trained"  # a run of its own
    assert (tmp_path / "outputs" / "api-demo-codes.png").stat().st_size > 5000
