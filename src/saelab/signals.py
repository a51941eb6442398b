"""Stop requests: SIGTERM (a batch scheduler's time limit) and SIGINT (Ctrl-C) set a flag that the
training step loop reads between optimiser steps, a plain attribute read with no host sync, so a
run stops within a step and keeps everything it finished.

saelab uses this rather than Lightning's own SIGTERM handling, which only acts between Lightning
steps (a saelab Lightning step is a chunk of many optimiser steps) and ends the fit with exit code 0
as if it had finished; a stop here is recorded in metrics.json and exits 128 + the signal.

`handled()` installs the handlers for the length of a run and restores the caller's afterwards
(a notebook keeps its own). A second signal of the same kind while stopping falls back to the
default behaviour, so a stuck run can still be killed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from saelab.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The flag: the number of the first signal received, or None."""

    signum: int | None = None

    def check(self) -> None:
        """Raise Interrupted if a stop was requested (called between steps and stages)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: the default behaviour (terminate, or Ctrl-C)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = signum


STOP = StopRequest()


@contextmanager
def handled() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT set STOP while the block runs (main thread only; elsewhere, e.g. in a
    launcher's worker thread, the block runs without them). A run starts with no stop request:
    a sweep checks STOP before starting a job, and skips it."""
    STOP.signum = None
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    previous = {s: signal.signal(s, STOP._handle) for s in SIGNALS}
    try:
        yield STOP
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
