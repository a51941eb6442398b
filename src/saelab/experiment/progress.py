"""Progress during long work: a live line on a terminal, one log line per epoch elsewhere.

The per-epoch lines always go to the run's log file. The step loop calls `Meter.step()` after
every optimiser step: a counter, a read of the stop flag and, every few steps, a clock read; the
live line is redrawn at most `REDRAW_S` apart and shows what is already on the host (the last
epoch's loss and validation metric), so drawing never waits for the device.

Time left comes from measured throughput as soon as there is any. A step's time is a fixed
overhead (Python, the optimiser's launches) plus its work (minibatch size times the weights of the
network it trains) at the device's rate: the rate is timed on a few steps before the run (so that
the first stage, a small linear classifier, does not set the pace of the large autoencoders
after it), the overhead is what the steps measured so far took beyond their work, and both are
refitted to the stages measured once two of them differ enough in work. The current stage's
remainder is its remaining steps at the pace it has shown itself.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from saelab.config.schema import ProgressMode
from saelab.nn.meter import Meter, epoch_line

log = logging.getLogger("saelab")

REDRAW_S = 0.25
REFIT_SPREAD = 4.0  # stages whose step work differs this much refit the rate to the run
EPOCH = "saelab_epoch"  # marks a per-epoch log record






def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class Estimator:
    """Time left (see the module's docstring). `steps`: each stage's optimiser steps (0: taken
    from a checkpoint); `work`: the work of one of its steps; `rate`: work per second."""

    steps: dict[str, float]
    work: dict[str, float]
    rate: float
    done: dict[str, float] = field(default_factory=dict)  # steps
    seconds: dict[str, float] = field(default_factory=dict)

    def update(self, stage: str, done: float, seconds: float) -> None:
        self.done[stage], self.seconds[stage] = done, seconds

    def model(self) -> tuple[float, float] | None:
        """(overhead seconds per step, seconds per unit of work) from the steps measured so far;
        None before any."""
        measured = [(self.done[s], self.seconds[s], self.work[s]) for s in self.done
                    if self.done[s] > 0]
        if not measured:
            return None
        per_work = 1.0 / self.rate
        works = [w for _, _, w in measured]
        if min(works) > 0 and max(works) / min(works) > REFIT_SPREAD:
            # Least squares of step time against step work, each stage weighted by its steps.
            n = sum(d for d, _, _ in measured)
            mw = sum(d * w for d, _, w in measured) / n
            mt = sum(t for _, t, _ in measured) / n
            var = sum(d * (w - mw) ** 2 for d, _, w in measured)
            cov = sum(d * (w - mw) * (t / d - mt) for d, t, w in measured)
            if var > 0 and cov / var > 0 and mt - cov / var * mw >= 0:
                per_work = cov / var
                return mt - per_work * mw, per_work
        overhead = sum(t - d * w * per_work for d, t, w in measured) / sum(
            d for d, _, _ in measured)
        return max(overhead, 0.0), per_work

    def step_time(self, stage: str) -> float | None:
        fitted = self.model()
        return None if fitted is None else fitted[0] + fitted[1] * self.work[stage]

    def stage_left(self, stage: str) -> float | None:
        done = self.done.get(stage, 0.0)
        left = max(self.steps[stage] - done, 0.0)
        own = self.seconds[stage] / done if done else self.step_time(stage)
        return None if own is None else left * own

    def run_left(self, stage: str) -> float | None:
        """Seconds left in `stage` and every stage after it."""
        names = list(self.steps)
        here = self.stage_left(stage)
        later = [self.steps[s] * t for s in names[names.index(stage) + 1:]
                 if self.steps[s] and (t := self.step_time(s)) is not None]
        return None if here is None else here + sum(later)


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel, whose cell output can be updated in place."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class NotebookLine:
    """The live line as a Jupyter cell's display, updated in place (the terminal's carriage
    return does not move back in a notebook)."""

    def __init__(self):
        from IPython.display import Pretty, display

        self.pretty = Pretty
        self.handle = display(Pretty(""), display_id=True)

    def write(self, text: str) -> None:
        self.handle.update(self.pretty(text))


class ProgressDisplay:
    """One run's display. `bar`: a live line per stage on `stream` (in a Jupyter notebook, a cell
    display updated in place); `lines`: per-epoch log lines. `auto` is the live line on a
    terminal or in a notebook. With the live line, the per-epoch lines go to the log file only,
    and on a terminal other log records clear the line before they print."""

    def __init__(self, mode: str, estimate: Estimator, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        notebook = stream is None and in_notebook()
        self.bar = mode == ProgressMode.bar or (mode == ProgressMode.auto and (
            self.stream.isatty() or notebook))
        self.notebook = NotebookLine() if self.bar and notebook else None
        self.estimate = estimate
        self.offset = 0  # steps of the stage's earlier trials
        self.stage = self.label = ""
        self.epochs = self.steps_per_epoch = 0
        self.start = self._next = 0.0
        self.last: dict = {}
        self._drawn = False
        if self.bar:
            self._filter = _ClearLine(self)
            for handler in self._terminal_handlers():
                handler.addFilter(self._filter)

    def _terminal_handlers(self) -> list[logging.Handler]:
        """The log handlers that print where the live line is (the file handler keeps every
        line): a terminal's, or in a notebook every stream's (the cell's output)."""
        return [h for logger in (logging.getLogger(), log) for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and (self.notebook or getattr(h.stream, "isatty", lambda: False)())]

    def close(self) -> None:
        self.clear()
        if self.bar:
            for logger in (logging.getLogger(), log):
                for handler in logger.handlers:
                    handler.removeFilter(self._filter)

    def begin(self, stage: str, label: str, epochs: int, steps_per_epoch: int,
              meter: Meter, part: tuple[int, int] = (0, 1)) -> None:
        """A stage starts training, `epochs` of `steps_per_epoch` optimiser steps; `part`: which
        of how many trials of it this is."""
        trial, trials = part
        self.stage, self.epochs = stage, epochs
        self.label = label if trials == 1 else f"{label} trial {trial + 1}/{trials}"
        self.steps_per_epoch = steps_per_epoch
        self.offset = trial * epochs * steps_per_epoch
        if not trial:
            self.start = time.monotonic()
        self.last = {}
        meter.steps = 0
        meter.display = self
        self.tick(0, force=True)

    def skip(self, stage: str) -> None:
        """A stage taken from a checkpoint: no work left in it."""
        self.estimate.steps[stage] = 0.0

    def tick(self, steps: int, force: bool = False) -> None:
        now = time.monotonic()
        self.estimate.update(self.stage, self.offset + steps, now - self.start)
        if self.bar and (force or now >= self._next):
            self._next = now + REDRAW_S
            self.draw(steps, now)

    def epoch_done(self, steps: int, epoch: int, record: dict) -> None:
        self.last = record
        # The epoch's line goes to the log either way; on the terminal the live line shows it.
        log.info("%s", epoch_line(self.label, epoch, self.epochs, record), extra={EPOCH: True})
        if self.bar:
            self.tick(steps, force=True)

    def line(self, steps: int, now: float) -> str:
        """The live line: stage, epoch, a bar of the stage's steps, times, latest numbers."""
        total = max(self.epochs * self.steps_per_epoch, 1)
        frac = min(steps / total, 1.0)
        epoch = min(steps // max(self.steps_per_epoch, 1) + 1, self.epochs)
        filled = int(frac * 20)
        numbers = " ".join(f"{k} {v:.4g}" for k, v in self.last.items() if k != "epoch")
        return (f"{self.label}: epoch {epoch}/{self.epochs} [{'#' * filled}{'.' * (20 - filled)}] "
                f"{frac:4.0%} {clock(now - self.start)} elapsed, "
                f"~{clock(self.estimate.stage_left(self.stage))} left "
                f"(run ~{clock(self.estimate.run_left(self.stage))}) {numbers}").rstrip()

    def draw(self, steps: int, now: float) -> None:
        if self.notebook is not None:
            self.notebook.write(self.line(steps, now))
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\033[K" + self.line(steps, now)[:width])
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False


class _ClearLine(logging.Filter):
    """On the terminal: drops the per-epoch lines (the live line shows them) and clears the live
    line before any other record prints (the next tick redraws it)."""

    def __init__(self, progress: ProgressDisplay):
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, EPOCH, False):
            return False
        self.progress.clear()
        return True
