"""Progress: the time-left estimator, the live line on a pseudo-terminal, per-epoch lines
elsewhere."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest
from conftest import QUICK, REPO

from saelab.progress import Estimator, ProgressDisplay, clock


def test_time_left_is_work_left_at_the_speed_shown():
    est = Estimator({"a": 100.0, "b": 300.0, "c": 0.0})  # c: taken from a checkpoint
    assert est.stage_left("a") is None and est.run_left("a") is None  # nothing measured yet
    est.update("a", 25.0, 5.0)  # 5 units a second so far
    assert est.stage_left("a") == pytest.approx(15.0)
    assert est.run_left("a") == pytest.approx(15.0 + 300 / 5)
    est.update("a", 100.0, 20.0)
    est.update("b", 30.0, 2.0)  # b runs at 15 units a second: its own speed for its remainder
    assert est.stage_left("b") == pytest.approx(270 / 15)
    run_speed = 130 / 22  # later stages at the speed of the whole run so far
    assert est.run_left("b") == pytest.approx(270 / 15 + 0 / run_speed)
    assert clock(75) == "1:15" and clock(3725) == "1:02:05" and clock(None) == "?"


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
    from saelab.progress import Meter

    monkeypatch.setenv("COLUMNS", "200")  # the line is cut to the terminal's width
    stream, meter = Terminal(), Meter()
    progress = ProgressDisplay("auto", {"finetune": 1000.0}, stream)  # 40 steps of 25 work units
    progress.begin("finetune", "finetune", 4, 10, meter)
    for _ in range(16):
        meter.step()
    progress.epoch_done(16, 2, {"epoch": 2, "train_loss": 0.25, "val_acc": 0.9})
    progress.close()
    line = stream.text.split("\r\x1b[K")[-2]
    assert line.startswith("finetune: epoch 2/4 [########............]  40%")
    assert "left (run ~" in line and line.endswith("train_loss 0.25 val_acc 0.9")
    assert ProgressDisplay("auto", {}, Terminal()).bar
    assert not ProgressDisplay("lines", {}, Terminal()).bar


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
