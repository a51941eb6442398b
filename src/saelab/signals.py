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

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from saelab.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


# A signal this soon after the first is the same request reaching a process twice (to a sweep's
# process group, and passed on by the sweep to its workers), not a second one.
SAME_REQUEST_S = 2.0


class StopRequest:
    """The flag: the number of the first signal received, or None."""

    signum: int | None = None
    at: float = 0.0

    def check(self) -> None:
        """Raise Interrupted if a stop was requested (called between steps and stages)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is not None and now - self.at > SAME_REQUEST_S:
            # asked twice: the default behaviour (terminate, or Ctrl-C)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        if self.signum is None:
            self.signum, self.at = signum, now


STOP = StopRequest()


def install() -> None:
    """SIGTERM and SIGINT set STOP from now on (a sweep's worker process: between its jobs too,
    so that a stop request never kills it while idle)."""
    for s in SIGNALS:
        signal.signal(s, STOP._handle)


def workers() -> list[int]:
    """This process's worker processes (a parallel launcher's, e.g. joblib's loky workers), not
    their helpers (loky's resource tracker), from /proc."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"loky" in command and b"resource_tracker" not in command:
            found.append(int(stat.parent.name))
    return found


@contextmanager
def sweep_handled() -> Iterator[StopRequest]:
    """A sweep's main process: SIGTERM and SIGINT set STOP and are passed on to the workers
    running its jobs (a batch scheduler signals the main process only), which stop their job;
    the main process then writes the summary and exits 128 + the signal."""

    def stop_sweep(signum, frame) -> None:
        STOP._handle(signum, frame)
        for pid in workers():
            with suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, stop_sweep) for s in SIGNALS}
    try:
        yield STOP
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
