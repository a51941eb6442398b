"""Progress: the time-left estimator, the live line on a pseudo-terminal, per-epoch lines
elsewhere."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys

import pytest
from helpers import QUICK, REPO

from saelab.experiment.progress import Estimator, ProgressDisplay, clock


def test_time_left_is_overhead_plus_work_at_the_rate_measured():
    # a: a small stage (work 10 a step), b: a large one (1,000 a step), c: taken from a checkpoint
    est = Estimator({"a": 100, "b": 200, "c": 0}, {"a": 10.0, "b": 1000.0, "c": 5.0}, rate=1000.0)
    assert est.stage_left("a") is None and est.run_left("a") is None  # nothing measured yet
    est.update("a", 20, 2.0)  # 0.1 s a step: 0.01 s of work at the timed rate, 0.09 s overhead
    assert est.stage_left("a") == pytest.approx(80 * 0.1)  # its own pace
    assert est.step_time("b") == pytest.approx(0.09 + 1.0)  # the overhead, plus b's work
    assert est.run_left("a") == pytest.approx(8.0 + 200 * 1.09)  # c has nothing left
    est.update("a", 100, 10.0)
    est.update("b", 50, 100.0)  # b shows 2 s a step: the two stages refit overhead and rate
    overhead, per_work = est.model()
    assert overhead + 10 * per_work == pytest.approx(0.1)
    assert overhead + 1000 * per_work == pytest.approx(2.0)
    assert est.run_left("b") == pytest.approx(150 * 2.0)  # b at its own pace
    assert clock(75) == "1:15" and clock(3725) == "1:02:05" and clock(None) == "?"


def test_a_recorded_run_is_estimated_within_twice_the_truth_after_one_epoch():
    """The default run as it ran (tests/data: its stages' steps, step work, the device rate
    and each stage's seconds): replayed, the estimate after the first stage's first epoch is
    within 2x of the time the run then took."""
    recorded = json.loads((REPO / "tests" / "data" / "progress_default_run.json").read_text())
    est = Estimator(recorded["steps"], recorded["per_step"], recorded["rate"])
    first = next(iter(recorded["steps"]))
    epoch_steps = recorded["steps"][first] / recorded["epochs"][first]
    epoch_seconds = recorded["seconds"][first] / recorded["epochs"][first]
    est.update(first, epoch_steps, epoch_seconds)
    truth = sum(recorded["seconds"].values()) - epoch_seconds
    assert 0.5 < est.run_left(first) / truth < 2.0


class Terminal:
    """A stream that says it is a terminal, keeping what was written."""

    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_the_live_line_shows_stage_epoch_steps_times_and_numbers(monkeypatch):
    from saelab.nn.meter import Meter

    monkeypatch.setenv("COLUMNS", "200")  # the line is cut to the terminal's width
    stream, meter = Terminal(), Meter()
    progress = ProgressDisplay("auto", Estimator({"finetune": 40}, {"finetune": 25.0}, 1e4),
                               stream)
    progress.begin("finetune", "finetune", 4, 10, meter)
    for _ in range(16):
        meter.step()
    progress.epoch_done(16, 2, {"epoch": 2, "train_loss": 0.25, "val_acc": 0.9})
    progress.close()
    line = stream.text.split("\r\x1b[K")[-2]
    assert line.startswith("finetune: epoch 2/4 [########............]  40%")
    assert "left (run ~" in line and line.endswith("train_loss 0.25 val_acc 0.9")
    idle = Estimator({}, {}, 1.0)
    assert ProgressDisplay("auto", idle, Terminal()).bar
    assert not ProgressDisplay("lines", idle, Terminal()).bar


@pytest.mark.slow
def test_a_run_under_a_pseudo_terminal_draws_the_live_line(tmp_path):
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "saelab", *QUICK, "pretrain.epochs=30",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, stdin=child,
                            stdout=child, stderr=child)
    os.close(child)
    out = b""
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    assert "\r\x1b[Kpretrain layer 1: epoch " in text and " left (run ~" in text
    assert "pretrain layer 1 epoch 1/30:" not in text  # no per-epoch lines on a terminal...
    log = (tmp_path / "run" / "saelab.log").read_text()
    assert "pretrain layer 1 epoch 1/30:" in log  # ...but in the run's log
    assert "saelab: mnist classes" in text  # the table at the end
