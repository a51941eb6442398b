"""The run folder as files: what it holds, its one writer, and writing safely into it.

    RUN/
      .hydra/config.yaml   the config as the run resolved it, and .hydra/overrides.yaml
      .lock                one writer at a time (flock), naming its holder
      metrics.json         every number; rewritten atomically after each stage
      checkpoints/*.pt     one per stage (saelab.runs.checkpoints)
      tensorboard/ csv/    the logger's files;  figures/, report.md: the report
      saelab.log           the log (Hydra's file handler)
      .saelab-files        the manifest: every file saelab wrote here, listed before writing

saelab never writes over a file it did not list, never through a symbolic link, and never leaves a
temporary file behind. Whether a checkpoint found here may stand for a stage of the config being
run is not decided here but by the experiment (saelab.experiment.reuse).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from saelab.errors import ConfigError

log = logging.getLogger("saelab")

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

    # -- before a run writes -----------------------------------------------------------------

    def prepare(self, overwrite: bool, checkpoints: list[str]) -> dict[str, Path]:
        """Make the folder safe to write a run of the stages `checkpoints` into, before anything
        is written; return the checkpoints saelab wrote here, by stage.

        Stops (ConfigError naming the folder) on a symbolic link on the way to saelab's files and
        on a file saelab did not write where it would write one; `overwrite` removes saelab's files
        first."""
        for rel in (CONFIG, OVERRIDES, METRICS, CHECKPOINTS, FIGURES, REPORT, *LOGGER_DIRS):
            self.inside(rel)
        owned = self.owned_files()
        if owned and overwrite and self.writer:
            self.clear()
            owned = set()
        fixed = [CONFIG, OVERRIDES, METRICS, REPORT,
                 *(f"{CHECKPOINTS}/{name}.pt" for name in checkpoints)]
        foreign = [str(r) for r in fixed if (self.path / r).exists() and str(r) not in owned]
        if foreign:
            raise ConfigError(WHERE, str(self.path), f"holds {foreign[0]}, which saelab did not "
                              "write (or an earlier saelab, without a manifest); move it or "
                              "choose another folder")
        return {Path(r).stem: self.path / r for r in sorted(owned)
                if Path(r).parent.name == CHECKPOINTS and (self.path / r).is_file()}
