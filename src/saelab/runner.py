"""Training one stage, or taking it from a checkpoint: the run folder's, or the shared store's.

A stage is taken from a checkpoint when it has the config's fingerprint, none of the stages it
consumes was trained in this invocation, and it started from the random state the stage starts
from now. Its checkpoint keeps the random-number state at its end, restored when it is loaded, so
a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from saelab.data import Minibatches
from saelab.errors import Interrupted
from saelab.fastpath import FastPath
from saelab.modules import EvalBatches, KeepBestOn, StageModule
from saelab.progress import ProgressDisplay
from saelab.runfolder import RunFolder, Store
from saelab.schema import Accelerator
from saelab.signals import STOP
from saelab.stages import Expected, View

log = logging.getLogger("saelab")

# What a stage's record holds (metrics.json), and a checkpoint besides its fingerprint (copied as
# is from the store).
RECORD = ("seconds", "history", "trials", "beside")
CONTENTS = ("state_dict", "rng", "rng_in", "where", *RECORD)


def data_device(cfg: DictConfig) -> torch.device:
    """Where the splits live: the accelerator's device, so minibatches never cross to it."""
    accelerator = cfg.trainer.accelerator
    if accelerator in (Accelerator.gpu, Accelerator.cuda) or (
            accelerator == Accelerator.auto and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def is_main_process() -> bool:
    """Rank 0 of a data-parallel run (or a plain run): the one process that writes files.
    Lightning's rank covers its own launcher (LOCAL_RANK), torchrun (RANK) and SLURM tasks."""
    return rank_zero_only.rank == 0


def rng_state() -> dict:
    """The global random-number state (CPU, and CUDA where present) at this point."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def rng_digest() -> str:
    """A short digest of the CPU random-number state: where a stage starts in the stream."""
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def where(cfg: DictConfig, device: torch.device) -> dict:
    """Where a stage ran: recorded with it, never part of its fingerprint."""
    return {"device": device_name(device), "accelerator": str(cfg.trainer.accelerator),
            "devices": cfg.trainer.devices, "strategy": str(cfg.trainer.strategy),
            "cuda_graphs": cfg.fastpath.cuda_graphs, "compile": cfg.fastpath.compile}


Attempt = Callable[[View], tuple[StageModule, Minibatches, EvalBatches]]


@dataclass
class Runner:
    """Trains, or takes from a checkpoint, each stage of one run."""

    cfg: DictConfig
    folder: RunFolder
    want: dict[str, Expected]
    usable: dict[str, dict | None]
    device: torch.device
    logger: pl.loggers.Logger | None
    progress: ProgressDisplay
    trained: set[str] = field(default_factory=set)

    def fit(self, exp: Expected, attempt: Attempt, views: list[View],
            beside: tuple[EvalBatches, EvalBatches] | None = None
            ) -> tuple[StageModule, dict]:
        """Train the stage of `exp` or load it; return its module and its record (seconds,
        history, where it came from). `attempt(view)` builds the module and its data under the
        settings `view`; with several views (a tuned stage) each is a trial from the same start,
        and the trial whose validation check is best is kept. `beside`: the whole validation
        split and the test set, for selection on the former, reported beside."""
        STOP.check()
        name, stage = exp.stage.name, exp.stage
        start, state = rng_digest(), rng_state()
        store = Store(self.cfg.store) if self.cfg.store else None
        saved, origin, source = self.usable.get(name), "checkpoint", self.folder.checkpoint(name)
        fresh = [c for c in stage.consumes if c in self.trained]
        if fresh:
            if saved is not None:
                log.info("%s: retrained because %s was", stage.label, fresh[0])
            saved = None
        elif saved is None and store is not None:
            source = store.entry(exp)
            saved, origin = store.get(exp), f"store:{source}"
        if saved is not None and saved["rng_in"] != start:
            log.warning("%s: %s started from another random state; retraining", stage.label,
                        source)
            saved = None
        if saved is not None:
            module = attempt(views[0])[0]
            module.model.load_state_dict(saved["state_dict"])
            module.model.to(self.device)
            restore_rng(saved["rng"])
            if origin != "checkpoint":  # the run folder stays self-contained
                self.folder.save_stage(exp, {k: saved[k] for k in CONTENTS if k in saved})
            log.info("%s: loaded from %s, not retrained", stage.label, source)
            self.progress.skip(name)
            return module, {**{k: saved[k] for k in RECORD if k in saved}, "origin": origin,
                            "fingerprint": exp.fingerprint}
        began = time.perf_counter()
        module, trials = None, []
        for t, view in enumerate(views):
            if t:  # every trial from the same start
                restore_rng(state)
            candidate, train, val = attempt(view)
            if candidate.cfg.epochs > 0:
                self.train(candidate, name, train, val, beside, (t, len(views)))
            candidate.model.to(self.device)  # Lightning's teardown leaves it on the CPU
            if len(views) > 1:
                trials.append(self.trial(candidate, view, beside))
                drawn = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in view.drawn.items())
                log.info("%s: trial %d/%d (%s): best check at epoch %d, %s %.4g", stage.label,
                         t + 1, len(views), drawn, candidate.kept.get("epoch", 0),
                         candidate.monitor, candidate.kept.get(candidate.monitor) or float("nan"))
            if module is None or better(candidate, module):
                module = candidate
        record = {"seconds": time.perf_counter() - began, "history": module.history}
        if trials:
            record |= {"trials": trials, "beside": max(
                (t["beside"] for t in trials if t["beside"]), default={},
                key=lambda b: b["val_acc"])}
        path = self.folder.save_stage(exp, {"state_dict": module.model.state_dict(),
                                            "rng": rng_state(), "rng_in": start,
                                            "where": where(self.cfg, self.device), **record})
        if store is not None and self.folder.writer:
            store.put(path, exp)
        self.trained.add(name)
        return module, {**record, "origin": "trained", "fingerprint": exp.fingerprint}

    @staticmethod
    def trial(module: StageModule, view: View, beside) -> dict:
        """A trial's record: the settings it drew, its kept check, and (reported, never used)
        its test accuracy and its selection on the whole validation split."""
        return {"settings": view.drawn, "kept": module.kept,
                "test_acc": module.score(beside[1]) if beside else None,
                "beside": {**module.beside, "trial": view.trial} if module.beside else {}}

    def train(self, module: StageModule, name: str, train: Minibatches, val: EvalBatches,
              beside: tuple[EvalBatches, EvalBatches] | None = None,
              part: tuple[int, int] = (0, 1)) -> None:
        """One Lightning fit of `module`: `epochs` of its minibatches, validated after each.
        `part`: which of how many trials of the stage it is."""
        trainer = pl.Trainer(
            accelerator=self.cfg.trainer.accelerator, devices=self.cfg.trainer.devices,
            strategy=self.cfg.trainer.strategy, precision=self.cfg.trainer.precision,
            max_epochs=module.cfg.epochs, logger=self.logger or False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, log_every_n_steps=1,
            callbacks=[FastPath.from_config(self.cfg.fastpath),
                       *([KeepBestOn(*beside)] if beside else [])],
            limit_val_batches=None if len(val) else 0)
        train.shard(trainer.global_rank, trainer.world_size)
        self.progress.begin(name, module.label, module.cfg.epochs, train.n_steps, module.meter,
                            part)
        module.model.train()
        try:
            trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
        except SIGTERMException:  # Lightning saw the SIGTERM first (between steps): ours
            raise Interrupted(STOP.signum or signal.SIGTERM) from None


def better(a: StageModule, b: StageModule) -> bool:
    """Whether trial `a`'s kept validation check beats trial `b`'s (ties: the earlier trial)."""
    x, y = a.kept.get(a.monitor), b.kept.get(b.monitor)
    if x is None or y is None:
        return False
    return x > y if a.mode == "max" else x < y
