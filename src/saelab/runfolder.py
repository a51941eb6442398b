"""The run folder, files only: what it holds, who writes it, and when a checkpoint found there may
stand for a stage of the config being run.

    RUN/
      .hydra/config.yaml   the config as the run resolved it, and .hydra/overrides.yaml
      .lock                one writer at a time (flock), naming its holder
      metrics.json         every number; rewritten atomically after each stage
      checkpoints/*.pt     one per stage: weights, random-number state, fingerprint, history
      tensorboard/ csv/    the logger's files;  figures/, report.md: the report
      saelab.log           the log (Hydra's file handler)
      .saelab-files        the manifest: every file saelab wrote here, listed before writing

Each checkpoint records its stage's fingerprint (`saelab.stages`: the config keys the stage reads,
the data files' checksums, the stages it consumes, the checkpoint format). A checkpoint is reused
only when its fingerprint is the config's; one of another config stops the run before training
(`overwrite=true` removes saelab's files instead), and a missing or unreadable one is retrained
with every stage that consumes it. saelab never writes over a file it did not list, never through
a symbolic link, and never leaves a temporary file behind.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from saelab.errors import ConfigError

if TYPE_CHECKING:
    from saelab.stages import Expected

log = logging.getLogger("saelab")

FORMAT = 3  # checkpoint format: 3 the stage registry of saelab 0.3 (2: 0.2, 1: 0.1)
CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
FIGURES = "figures"
REPORT = "report.md"
LOGGER_DIRS = ("tensorboard", "csv")  # the loggers' files (MLflow writes to its own store)
LOCK = ".lock"
LOG = "saelab.log"
# Every file saelab wrote into the folder, listed before it is written: `overwrite=true` removes
# these and nothing else, and saelab never writes over a file it does not list.
MANIFEST = ".saelab-files"
WHERE = "hydra.run.dir"  # the setting that names a run folder


# ---------------------------------------------------------------------------------------------
# Files


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Write `data` (or let `data(tmp)` write) through a temporary file and a rename: a reader
    sees the old file or the new, whole. A failed write (a full disk) leaves no temporary."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        it when the holder dies) or stop naming its holder. Temporary files of writers that died
        (a full disk, a kill) go."""
        if not self.writer or self._lock_fd is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(WHERE, str(self.path), f"cannot be written ({exc.strerror})"
                              ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(WHERE, str(self.path), f"is in use by {self.holder(fd)}; wait for "
                              "it or choose another folder") from None
        holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)})")
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        self._lock_fd = fd
        for stale in self.path.rglob("*.tmp[0-9]*"):  # no writer but us now
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()

    @staticmethod
    def holder(fd: int) -> str:
        """Who holds the lock open on `fd` (which is closed)."""
        text = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return text

    def in_use(self) -> str | None:
        """Who holds the folder's lock now, or None (for readers, which take no lock)."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.holder(fd)
        os.close(fd)
        return None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def discard(self) -> None:
        """After a run refused late (bad data, too many labels asked): remove the folder if it
        holds nothing but what the refused run made (its lock and log)."""
        if not self.writer or not self.path.is_dir() or {p.name for p in self.path.iterdir()} - {
                LOCK, LOG}:
            return
        log_file = self.path / LOG
        for logger in (logging.getLogger(), log):
            for handler in list(logger.handlers):
                if getattr(handler, "baseFilename", None) == str(log_file.absolute()):
                    handler.close()
                    logger.removeHandler(handler)
        for name in (LOCK, LOG):
            (self.path / name).unlink(missing_ok=True)
        self.path.rmdir()

    # -- what saelab wrote -----------------------------------------------------------------

    def owned_files(self) -> set[str]:
        """The files saelab wrote here (relative paths), from the manifest."""
        try:
            return set(json.loads((self.path / MANIFEST).read_text()))
        except (OSError, ValueError):
            return set()

    def inside(self, rel: str | Path) -> Path:
        """`rel` in the folder, or ConfigError if reaching it would go through a symbolic link
        (saelab writes only inside the run folder)."""
        path = self.path
        for part in Path(rel).parts:
            path = path / part
            if path.is_symlink():
                raise ConfigError(WHERE, str(self.path), f"{path.relative_to(self.path)} is a "
                                  "symbolic link: saelab writes only inside the run folder")
        return path

    def claim(self, *rels: str | Path) -> None:
        """List files in the manifest before they are written."""
        owned = self.owned_files()
        new = {str(Path(r)) for r in rels} - owned
        if new and self.writer:
            atomic_write(self.path / MANIFEST, json.dumps(sorted(owned | new), indent=0))

    def write(self, rel: str | Path, data: bytes | str | Callable[[Path], None]) -> None:
        """Write a file of saelab's: listed, inside the folder, atomically. A file at that place
        that saelab did not write is never replaced."""
        if not self.writer:
            return
        path = self.inside(rel)
        if path.exists() and str(Path(rel)) not in self.owned_files():
            raise ConfigError(WHERE, str(self.path), f"holds {rel}, which saelab did not write; "
                              "move it or choose another folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.claim(rel)
        atomic_write(path, data)

    def files_under(self, rel: str) -> set[str]:
        """The regular files under folder `rel` (relative paths), not through links."""
        top = self.path / rel
        if not top.is_dir() or top.is_symlink():
            return set()
        return {str(p.relative_to(self.path)) for p in top.rglob("*")
                if p.is_file() and not p.is_symlink()}

    def logger_files(self) -> set[str]:
        return set().union(*(self.files_under(d) for d in LOGGER_DIRS))

    def claim_logger_files(self, before: set[str]) -> None:
        """List the files the loggers wrote since `before` (their names are their own)."""
        try:
            self.claim(*(self.logger_files() - before))
        except OSError as exc:  # a full disk: they stay unlisted, so never removed by saelab
            log.warning("could not list the loggers' files in %s: %s", MANIFEST, exc)

    def clear(self) -> None:
        """`overwrite=true`: remove the files the manifest lists (never through a link), then the
        folders they leave empty."""
        owned = self.owned_files()
        for rel in sorted(owned):
            try:
                path = self.inside(rel)
            except ConfigError:
                continue
            if path.is_file():
                path.unlink()
        for rel in sorted({str(Path(r).parent) for r in owned} - {"."}, key=len, reverse=True):
            folder = self.path / rel
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
        (self.path / MANIFEST).unlink(missing_ok=True)
        log.info("overwrite: removed saelab's %d files in %s", len(owned), self.path)

    # -- contents --------------------------------------------------------------------------

    def write_config(self, cfg: DictConfig, overrides: list[str]) -> None:
        """Save the run's config, resolved (what it ran with, whatever the environment later),
        and its overrides (what `resume` and the sweep summary read)."""
        self.write(CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        self.write(OVERRIDES, OmegaConf.to_yaml(OmegaConf.create(overrides)))

    def read_overrides(self) -> list[str]:
        path = self.path / OVERRIDES
        return list(OmegaConf.load(path) or []) if path.is_file() else []

    def read_metrics(self) -> dict:
        try:
            return json.loads(self.metrics_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def write_metrics(self, metrics: dict) -> None:
        self.write(METRICS, json.dumps(metrics, indent=2))

    # -- stages ----------------------------------------------------------------------------

    def check(self, cfg: DictConfig, want: dict[str, Expected]) -> dict[str, dict | None]:
        """The checkpoints that stand for stages of `cfg`: {stage: contents, or None to train}.

        Before anything is written, a run stops (ConfigError naming the key) on: a checkpoint of
        another config, of an earlier checkpoint format or of a stage this config does not have
        (`overwrite=true` removes saelab's files instead); a file saelab did not write where it
        would write one; a symbolic link on the way to its files. A damaged checkpoint is
        retrained, with every stage that consumes it."""
        for rel in (CONFIG, OVERRIDES, METRICS, CHECKPOINTS, FIGURES, REPORT, *LOGGER_DIRS):
            self.inside(rel)
        owned = self.owned_files()
        if owned and cfg.overwrite and self.writer:
            self.clear()
            owned = set()
        fixed = [CONFIG, OVERRIDES, METRICS, REPORT, *(f"{CHECKPOINTS}/{n}.pt" for n in want)]
        foreign = [str(r) for r in fixed if (self.path / r).exists() and str(r) not in owned]
        if foreign:
            raise ConfigError(WHERE, str(self.path), f"holds {foreign[0]}, which saelab did not "
                              "write (or an earlier saelab, without a manifest); move it or "
                              "choose another folder")
        found = {Path(r).stem: self.path / r for r in owned
                 if Path(r).parent.name == CHECKPOINTS and (self.path / r).is_file()}
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
                    if saved.get("format", 1) != FORMAT:
                        raise ConfigError("checkpoints", str(path), "written by another saelab "
                                          f"(checkpoint format {saved.get('format', 1)}, this "
                                          f"one reads {FORMAT}); use a new folder or "
                                          "overwrite=true")
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
            if saved.get("format", 1) != FORMAT or saved.get("fingerprint") != exp.fingerprint:
                raise ConfigError("RUN_DIR", str(self.path), f"{where} was not trained with the "
                                  "run's saved config")
            out[name] = saved
        return out

    def save_stage(self, exp: Expected, contents: dict) -> Path:
        """Write a stage's checkpoint (fingerprint, inputs and consumed stages with it)."""
        import torch

        name = exp.stage.name
        saved = {"format": FORMAT, "stage": name, "fingerprint": exp.fingerprint,
                 "inputs": exp.inputs, "data": exp.data, "consumes": exp.consumes, **contents}
        # Serialised in memory first: torch's zip writer turns a failed write (a full disk) into
        # a RuntimeError; a plain file write raises the OSError a run stops cleanly on.
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        self.write(f"{CHECKPOINTS}/{name}.pt", buffer.getvalue())
        return self.checkpoint(name)


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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.entry(exp), lambda tmp: shutil.copyfile(checkpoint, tmp))
        except OSError as exc:
            raise ConfigError("store", str(self.path), f"cannot be written ({exc.strerror})"
                              ) from None
