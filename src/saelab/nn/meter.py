"""What the step loop reports to after every optimiser step: a step counter that reads the stop
flag and, now and then, tells the progress display (saelab.experiment.progress) if one is
attached, else logs one line per epoch."""

from __future__ import annotations

import logging

from saelab.errors import Interrupted
from saelab.signals import STOP

log = logging.getLogger("saelab")
CHECK_EVERY = 16  # steps between clock reads: a step takes 0.1 ms or more


class Meter:
    """What the step loop reports to: steps done, stop requests, and the display (if any)."""

    __slots__ = ("steps", "display")

    def __init__(self):
        self.steps = 0
        self.display = None  # the progress display (experiment.progress), if one is shown

    def step(self) -> None:
        self.steps += 1
        if STOP.signum is not None:
            raise Interrupted(STOP.signum)
        if self.display is not None and not self.steps % CHECK_EVERY:
            self.display.tick(self.steps)

    def epoch_done(self, label: str, epoch: int, epochs: int, record: dict) -> None:
        if self.display is not None:
            self.display.epoch_done(self.steps, epoch, record)
        else:
            log.info("%s", epoch_line(label, epoch, epochs, record))


def epoch_line(label: str, epoch: int, epochs: int, record: dict) -> str:
    text = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
    return f"{label} epoch {epoch}/{epochs}: {text}"
