"""Checkpoint files: one per finished stage, in a run folder or in the shared store.

A checkpoint is a dict saved by torch: the checkpoint `FORMAT`, the stage's name and fingerprint
with what the fingerprint was computed from (saelab.experiment.fingerprints), the network's
`state_dict`, the random-number state at the stage's end (`rng`) and a digest of it at its start
(`rng_in`), where it ran, and its record (seconds, history, trials). What a checkpoint may stand
for is the experiment's decision (saelab.experiment.reuse); this module only reads and writes them.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

from saelab.errors import ConfigError
from saelab.runs.folder import CHECKPOINTS, RunFolder, atomic_write

log = logging.getLogger("saelab")

# 4: saelab 0.4, networks as StackedNet (state_dict keys `encoders.{i}.*`, `head.*`); 3: 0.3's
# Sequential(body, head) (`0.{2i}.*`, `1.*`); 2: 0.2; 1: 0.1. Other formats are refused in one line.
FORMAT = 4


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read, or is not what its name says."""


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, or DamagedCheckpoint saying why not."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, unpickling errors, I/O errors
        reason = str(exc).split(". ")[0][:100]
        raise DamagedCheckpoint(f"{path} is unreadable ({type(exc).__name__}: {reason})") from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise DamagedCheckpoint(f"{path} is not a saelab checkpoint")
    return saved


def other_format(saved: dict) -> str | None:
    """Why a readable checkpoint of another saelab cannot be used, or None if it is this one's."""
    found = saved.get("format", 1)
    if found == FORMAT:
        return None
    return (f"written by another saelab (checkpoint format {found}, this one reads {FORMAT}: "
            "docs/runs.md, 'Checkpoints of earlier versions')")


def write_checkpoint(folder: RunFolder, name: str, contents: dict) -> Path:
    """Write stage `name`'s checkpoint into `folder` (the format added); return its path."""
    import torch

    # Serialised in memory first: torch's zip writer turns a failed write (a full disk) into a
    # RuntimeError; a plain file write raises the OSError a run stops cleanly on.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "stage": name, **contents}, buffer)
    folder.write(f"{CHECKPOINTS}/{name}.pt", buffer.getvalue())
    return folder.checkpoint(name)


class Store:
    """Finished stages shared between runs (`store=DIR`), one file per stage and fingerprint; a
    run copies a matching one into its own checkpoints instead of training it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def entry(self, name: str, fingerprint: str) -> Path:
        return self.path / f"{name}-{fingerprint}.pt"

    def get(self, name: str, fingerprint: str) -> dict | None:
        """The stored stage of this fingerprint, or None (a damaged entry is a miss, warned)."""
        entry = self.entry(name, fingerprint)
        if not entry.is_file():
            return None
        try:
            saved = read_checkpoint(entry)
        except DamagedCheckpoint as exc:
            log.warning("store: %s; training the stage instead", exc)
            return None
        if saved.get("fingerprint") != fingerprint:  # (the format is part of a fingerprint)
            log.warning("store: %s does not hold fingerprint %s; training the stage instead",
                        entry, fingerprint)
            return None
        return saved

    def put(self, checkpoint: Path, name: str, fingerprint: str) -> None:
        """Add a finished stage (atomically: jobs of a parallel sweep may race, one wins)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.entry(name, fingerprint),
                         lambda tmp: shutil.copyfile(checkpoint, tmp))
        except OSError as exc:
            raise ConfigError("store", str(self.path), f"cannot be written ({exc.strerror})"
                              ) from None
