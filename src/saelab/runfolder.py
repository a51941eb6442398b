"""The run folder, files only: what it holds, who writes it, and when a checkpoint found there may
stand for a stage of the config being run.

    RUN/
      .hydra/config.yaml   the config (unresolved, as composed) and .hydra/overrides.yaml
      .lock                one writer at a time (flock), naming its holder
      metrics.json         every number; rewritten atomically after each stage
      checkpoints/*.pt     one per stage: weights, random-number state, fingerprint, history
      tensorboard/ csv/    the logger's files;  figures/, report.md: the report
      saelab.log           the log (Hydra's file handler)

Each checkpoint records its stage's fingerprint (`saelab.stages`: the config keys the stage reads,
the data files' checksums, the stages it consumes, the checkpoint format). A checkpoint is reused
only when its fingerprint is the config's; one of another config stops the run before training
(`overwrite=true` clears the folder instead), and a missing or unreadable one is retrained with
every stage that consumes it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from saelab.errors import ConfigError

if TYPE_CHECKING:
    from saelab.stages import Expected

log = logging.getLogger("saelab")

FORMAT = 2  # checkpoint format: 2 adds fingerprints and random-number states (1: saelab 0.1)
CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
# What saelab writes into a run folder; `overwrite=true` removes these and nothing else (the log
# is being appended to by this very run, the lock is held by it).
OWN_FILES = (".hydra", METRICS, CHECKPOINTS, "figures", "report.md", "tensorboard", "csv")


# ---------------------------------------------------------------------------------------------
# Files


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write through a temp file and a rename: a reader sees the old file or the new, whole."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


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


def write_checkpoint(path: Path, contents: dict) -> None:
    import torch

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(contents, tmp)
    tmp.replace(path)


def first_difference(saved: dict, want: Expected) -> tuple[str, Any, Any]:
    """(key, value here, value there) of the first input that differs, else the data files, else
    the first consumed stage."""
    for key, value in want.inputs.items():
        if saved.get("inputs", {}).get(key, "<absent>") != value:
            return key, value, saved.get("inputs", {}).get(key, "<absent>")
    if saved.get("data") != want.data:
        return "data files (md5)", want.data, saved.get("data")
    for name, fp in want.consumes.items():
        if saved.get("consumes", {}).get(name) != fp:
            return f"stage {name}", fp, saved.get("consumes", {}).get(name)
    return "fingerprint", want.fingerprint, saved.get("fingerprint")


# ---------------------------------------------------------------------------------------------
# The folder


class RunFolder:
    """A run folder and its one writer. `writer=False` (data-parallel ranks above 0, readers)
    takes no lock and writes nothing."""

    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self._lock_fd: int | None = None
        # Whether this invocation may record into metrics.json: once `check` has found the folder
        # holds nothing of another config (an error must not land on another run's results).
        self.owned = False

    def checkpoint(self, stage: str) -> Path:
        return self.path / CHECKPOINTS / f"{stage}.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    # -- one writer ------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the folder's lock (held until `unlock` or the process ends; the kernel releases
        it when the holder dies) or stop naming its holder."""
        if not self.writer or self._lock_fd is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError("hydra.run.dir", str(self.path),
                              f"is in use by {holder}; wait for it or choose another "
                              "folder") from None
        holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)})")
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # -- contents --------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        return sorted((self.path / CHECKPOINTS).glob("*.pt"))

    def clear(self) -> None:
        """`overwrite=true`: remove saelab's own files (nothing else in the folder)."""
        for name in OWN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        log.info("overwrite: removed saelab's files in %s", self.path)

    def write_config(self, cfg: DictConfig, overrides: list[str]) -> None:
        """Save the run's config and its overrides (what `resume` and the sweep summary read)."""
        if not self.writer:
            return
        (self.path / CONFIG).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / CONFIG, OmegaConf.to_yaml(cfg))
        atomic_write(self.path / OVERRIDES, OmegaConf.to_yaml(OmegaConf.create(overrides)))

    def read_overrides(self) -> list[str]:
        path = self.path / OVERRIDES
        return list(OmegaConf.load(path) or []) if path.is_file() else []

    def read_metrics(self) -> dict:
        try:
            return json.loads(self.metrics_path.read_text())
        except FileNotFoundError:
            return {}

    def write_metrics(self, metrics: dict) -> None:
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.metrics_path, json.dumps(metrics, indent=2))

    def record(self, **fields: Any) -> None:
        """Add `fields` (an error, an interruption) to metrics.json, keeping what it holds; only
        into a folder that `check` found to be this config's."""
        if self.owned:
            self.write_metrics({**self.read_metrics(), **fields})

    # -- stages ----------------------------------------------------------------------------

    def check(self, cfg: DictConfig, want: dict[str, Expected]) -> dict[str, dict | None]:
        """The checkpoints that stand for stages of `cfg`: {stage: contents, or None to train}.

        A checkpoint of another config, one written before fingerprints, or one of a stage this
        config does not have stops the run (ConfigError naming the key, before anything is
        written), unless `overwrite=true`, which clears the folder. A damaged one is retrained,
        with every stage that consumes it."""
        found = {p.stem: p for p in self.checkpoints()}
        if found and cfg.overwrite:
            if self.writer:
                self.clear()
            self.owned = True
            return dict.fromkeys(want)
        usable: dict[str, dict | None] = {}
        for name, exp in want.items():
            path = found.get(name)
            saved = None
            if path is not None:
                try:
                    saved = read_checkpoint(path)
                except DamagedCheckpoint as exc:
                    log.warning("%s: retraining %s and every stage that consumes it", exc, name)
                else:
                    if saved.get("format", 1) < FORMAT:
                        raise ConfigError("checkpoints", str(path), "written by saelab 0.1, "
                                          "before fingerprints: it cannot be checked against "
                                          "this config; use a new folder or overwrite=true")
                    if saved["fingerprint"] != exp.fingerprint:
                        key, here, there = first_difference(saved, exp)
                        raise ConfigError(key, here, f"{self.path} holds stage {name} trained "
                                          f"with {there!r}; use a new folder or overwrite=true")
            upstream = [c for c in exp.stage.consumes if usable.get(c) is None]
            if saved is not None and upstream:
                log.warning("%s: retrained because %s is", name, upstream[0])
                saved = None
            usable[name] = saved
        extra = sorted(found.keys() - want.keys())
        if extra:
            raise ConfigError(extra[0], "checkpoint", f"{self.path} holds checkpoints/"
                              f"{extra[0]}.pt, a stage this config does not have; use a new "
                              "folder or overwrite=true")
        self.owned = True
        return usable

    def finished(self, want: dict[str, Expected]) -> dict[str, dict]:
        """Every stage's checkpoint contents, if the folder holds a finished run of `want`: each
        checkpoint there, readable, with the fingerprint the run's config gives (so consuming the
        stages it names). Else a ConfigError naming the missing or unreadable file."""
        out = {}
        for name, exp in want.items():
            path = self.checkpoint(name)
            where = path.relative_to(self.path)
            if not path.is_file():
                raise ConfigError("RUN_DIR", str(self.path), f"is not a finished run: missing "
                                  f"{where} (finish it: saelab resume={self.path})")
            try:
                saved = read_checkpoint(path)
            except DamagedCheckpoint as exc:
                raise ConfigError("RUN_DIR", str(self.path), str(exc)) from None
            if saved.get("format", 1) < FORMAT or saved.get("fingerprint") != exp.fingerprint:
                raise ConfigError("RUN_DIR", str(self.path), f"{where} was not trained with the "
                                  "run's saved config")
            out[name] = saved
        return out

    def save_stage(self, exp: Expected, contents: dict) -> Path:
        """Write a stage's checkpoint (fingerprint, inputs and consumed stages with it)."""
        path = self.checkpoint(exp.stage.name)
        if self.writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_checkpoint(path, {"format": FORMAT, "stage": exp.stage.name,
                                    "fingerprint": exp.fingerprint, "inputs": exp.inputs,
                                    "data": exp.data, "consumes": exp.consumes, **contents})
        return path


class Store:
    """Finished stages shared between runs (`store=DIR`), one file per fingerprint; a run copies
    a matching one into its own checkpoints instead of training it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def entry(self, exp: Expected) -> Path:
        return self.path / f"{exp.stage.name}-{exp.fingerprint}.pt"

    def get(self, exp: Expected) -> dict | None:
        """The stored stage of this fingerprint, or None (a damaged entry is a miss, warned)."""
        entry = self.entry(exp)
        if not entry.is_file():
            return None
        try:
            saved = read_checkpoint(entry)
        except DamagedCheckpoint as exc:
            log.warning("store: %s; training the stage instead", exc)
            return None
        if saved.get("fingerprint") != exp.fingerprint:
            log.warning("store: %s does not hold fingerprint %s; training the stage instead",
                        entry, exp.fingerprint)
            return None
        return saved

    def put(self, checkpoint: Path, exp: Expected) -> None:
        """Add a finished stage (atomically: jobs of a parallel sweep may race, one wins)."""
        self.path.mkdir(parents=True, exist_ok=True)
        entry = self.entry(exp)
        tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
        shutil.copyfile(checkpoint, tmp)
        tmp.replace(entry)
