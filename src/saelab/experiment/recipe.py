"""The training recipe, top to bottom.

    train(cfg, folder, device, record):
        load the data; fingerprint every stage of the plan (saelab.experiment.stages.plan:
        the pixel baseline, each layer pretrained then probed, fine-tuning, scratch, ...);
        read the folder's checkpoints (refusing another config's); open the logger;
        for each stage, in order:
            take its training data (the codes of the layer below, the labelled images, ...);
            take it from the folder or the store (reuse.reusable), or train it: one Lightning
            fit per trial from the same random start, the trial best on validation kept;
            save its checkpoint (and into the store); hand its network on; record its metrics.

Each stage's network, Lightning module and data come from the stage itself; whether a checkpoint
stands for it is decided in saelab.experiment.reuse. Only the metrics record, the folder and the
progress display are written to, all handed down, never a callback up.
"""

from __future__ import annotations

import logging
import signal
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from saelab.data.batches import EvalBatches, Minibatches
from saelab.data.splits import load_splits
from saelab.errors import Interrupted
from saelab.experiment.devices import device_name
from saelab.experiment.fingerprints import Planned, fingerprinted
from saelab.experiment.keys import View
from saelab.experiment.loggers import (
    final_metrics,
    flat_config,
    log_final,
    make_logger,
    mlflow_run_id,
)
from saelab.experiment.progress import Estimator, ProgressDisplay
from saelab.experiment.record import MetricsRecord
from saelab.experiment.reuse import reusable, saved_stages
from saelab.experiment.stages import Stage
from saelab.experiment.state import Experiment
from saelab.nn.callbacks import KeepBestOn
from saelab.nn.fastpath import FastPath
from saelab.nn.modules import StageModule
from saelab.runs.checkpoints import Store, write_checkpoint
from saelab.runs.folder import RunFolder
from saelab.seeds import restore_rng, rng_digest, rng_state, substream
from saelab.signals import STOP

# Lightning's start-up chatter (accelerator report, tips) hides the experiment's own log lines.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("pytorch_lightning.accelerators.cuda").setLevel(logging.WARNING)
log = logging.getLogger("saelab")

# What a stage's result holds in metrics.json, and its checkpoint beside the weights, the random
# states and where it ran (copied as is from the store).
RESULT_KEYS = ("seconds", "history", "trials", "beside")
CHECKPOINT_KEYS = ("state_dict", "rng", "rng_in", "where", *RESULT_KEYS)
REPEATS = 5  # timed steps of the device's rate


def train(cfg: DictConfig, folder: RunFolder, device: torch.device, record: MetricsRecord,
          overrides: list[str] | None = None) -> Experiment:
    """Train (or take from checkpoints) every stage of the experiment `cfg` (validated) in
    `folder`, whose lock the caller holds; `record` gets the data and each stage as it finishes,
    and `overrides` is what the folder records (default: what it holds). Returns what the stages
    left: the data, the autoencoders and every trained network."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("loading the data: %s, classes %s", cfg.data.name, list(cfg.data.classes))
    experiment = Experiment(cfg, device, load_splits(cfg.data, cfg.seed, device))
    plan = fingerprinted(cfg, experiment.data.checksums)
    saved = saved_stages(folder, plan, cfg.overwrite)
    folder.write_config(cfg, overrides if overrides is not None else folder.read_overrides())
    logger = open_logger(cfg, folder, record) if folder.writer else None
    splits, (_, y, _, val_y) = experiment.data, experiment.labelled()
    log.info("data from %s: %d train / %d val / %d test images, %d / %d of them labelled",
             splits.source, len(splits.train_y), len(splits.val_y), len(splits.test_y), len(y),
             len(val_y))
    estimate = estimator(experiment, plan, device)
    progress = ProgressDisplay(cfg.progress if folder.writer else "lines", estimate)
    # The estimate's plan beside the data: with each stage's seconds, a recorded run replays.
    record("data", data=splits.summary(), work={
        "rate": estimate.rate, "steps": dict(estimate.steps), "per_step": dict(estimate.work)})
    store = Store(cfg.store) if cfg.store else None
    trained: set[str] = set()
    try:
        for name, planned in plan.items():
            stage, settings = planned.stage, planned.settings
            with own_stream(stage, cfg.seed):
                data = stage.training_data(experiment, settings)  # x, y, val x, val y
                STOP.check()
                start, state = rng_digest(), rng_state()
                found = reusable(planned, saved[name], trained, store, start,
                                 folder.checkpoint(name))
                if found is not None:  # its checkpoint stands for it
                    contents, origin = found
                    module = build(experiment, stage, settings)
                    module.model.load_state_dict(contents["state_dict"])
                    module.model.to(device)
                    restore_rng(contents["rng"])
                    if origin != "checkpoint":  # the run folder stays self-contained
                        write_checkpoint(folder, name, {**planned.header(), **{
                            k: contents[k] for k in CHECKPOINT_KEYS if k in contents}})
                    progress.skip(name)
                    result = {k: contents[k] for k in RESULT_KEYS if k in contents}
                else:
                    module, result = select(cfg, experiment, stage, settings, data, state,
                                            logger, progress)
                    path = write_checkpoint(folder, name, {
                        **planned.header(), "state_dict": module.model.state_dict(),
                        "rng": rng_state(), "rng_in": start, "where": where(cfg, device),
                        **result})
                    if store is not None and folder.writer:
                        store.put(path, name, planned.fingerprint)
                    trained.add(name)
                    origin = "trained"
                stage.keep(experiment, module.model, settings)
                record(name, **{name: {**stage.metrics(experiment, module, settings), **result,
                                       "origin": origin, "fingerprint": planned.fingerprint}})
    finally:
        progress.close()
    if logger is not None:  # every finished run, figures or not: sweeps compare
        log_final(logger, cfg, final_metrics(cfg, record.metrics))
    return experiment


def open_logger(cfg: DictConfig, folder: RunFolder, record: MetricsRecord) -> pl.loggers.Logger:
    """The run's logger (once the folder is known to be this config's), its hyper-parameters
    logged; an MLflow run's id goes into metrics.json, so that the report joins the same run."""
    logger = make_logger(cfg, folder.path,
                         mlflow_run_id=folder.read_metrics().get("mlflow_run_id"))
    logger.log_hyperparams(flat_config(cfg))
    if mlflow_run_id(logger):
        record.metrics["mlflow_run_id"] = mlflow_run_id(logger)
    return logger


def select(cfg: DictConfig, experiment: Experiment, stage: Stage, settings: View,
           data: tuple[torch.Tensor | None, ...], start: dict, logger: pl.loggers.Logger | None,
           progress: ProgressDisplay) -> tuple[StageModule, dict]:
    """Train `stage` on `data` (x, y, val x, val y) once per trial (its own settings, or each
    tuning trial's), every trial from the random state `start`; return the module of the trial
    whose kept validation check is best, and the stage's result (seconds, history, trials)."""
    train_x, train_y, val_x, val_y = data
    began, best, trials = time.perf_counter(), None, []
    full_val = full_validation(experiment, stage, settings)
    candidates = stage.trials(settings)
    for t, trial in enumerate(candidates):
        if t:
            restore_rng(start)
        module = build(experiment, stage, trial)
        if module.cfg.epochs > 0:
            fit(cfg, module, stage.name,
                minibatches(cfg, train_x, train_y, trial[stage.group]),
                EvalBatches(val_x, val_y), logger, progress, full_val, (t, len(candidates)))
        module.model.to(experiment.device)  # Lightning's teardown leaves it on the CPU
        if len(candidates) > 1:
            trials.append(trial_record(module, trial, len(candidates), full_val))
        if best is None or better(module, best):
            best = module
    result = {"seconds": time.perf_counter() - began, "history": best.history}
    if trials:
        result |= {"trials": trials, "beside": max(
            (t["beside"] for t in trials if t["beside"]), default={},
            key=lambda b: b["val_acc"])}
    return best, result


def build(experiment: Experiment, stage: Stage, settings: View) -> StageModule:
    """A stage's Lightning module, its network freshly built, under `settings`."""
    module = stage.module(experiment, stage.model(experiment, settings).to(experiment.device),
                          settings)
    stage.before_fit(experiment, settings)
    return module


def minibatches(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor | None, own) -> Minibatches:
    """A stage's training minibatches, from its own settings (`batch_size`, `steps_per_epoch`,
    `sample_with_replacement`) and the run's seed."""
    return Minibatches(x, y, own.batch_size, cfg.fastpath.steps_per_item, cfg.seed,
                       sample_with_replacement=own.sample_with_replacement,
                       steps_per_epoch=own.steps_per_epoch)


def fit(cfg: DictConfig, module: StageModule, name: str, train_batches: Minibatches,
        val_batches: EvalBatches, logger: pl.loggers.Logger | None, progress: ProgressDisplay,
        full_val: tuple[EvalBatches, EvalBatches] | None = None,
        part: tuple[int, int] = (0, 1)) -> None:
    """One Lightning fit of `module`: `epochs` of its minibatches, validated after each (and on
    `full_val`'s whole validation split, reported beside). `part`: which of how many trials."""
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy, precision=cfg.trainer.precision,
        max_epochs=module.cfg.epochs, logger=logger or False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1,
        callbacks=[FastPath.from_config(cfg.fastpath),
                   *([KeepBestOn(*full_val)] if full_val else [])],
        limit_val_batches=None if len(val_batches) else 0)
    train_batches.shard(trainer.global_rank, trainer.world_size)
    progress.begin(name, module.label, module.cfg.epochs, train_batches.n_steps, module.meter,
                   part)
    module.model.train()
    try:
        trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches)
    except SIGTERMException:  # Lightning saw the SIGTERM first (between steps): ours
        raise Interrupted(STOP.signum or signal.SIGTERM) from None


def full_validation(experiment: Experiment, stage: Stage, settings: View
                    ) -> tuple[EvalBatches, EvalBatches] | None:
    """For a tuned stage (`tune.full_val`): the whole validation split, to select on beside,
    and the test set, to report what that selection would have chosen."""
    if not (stage.tuned and settings.tune.full_val):
        return None
    data = experiment.data
    return EvalBatches(data.val_x, data.val_y), EvalBatches(data.test_x, data.test_y)


def trial_record(module: StageModule, trial: View, count: int, full_val) -> dict:
    """A trial's record: the settings it drew, its kept check, and (reported, never used) its
    test accuracy and its selection on the whole validation split."""
    drawn = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in trial.drawn.items())
    log.info("%s: trial %d/%d (%s): best check at epoch %d, %s %.4g", module.label,
             trial.trial + 1, count, drawn, module.kept.get("epoch", 0), module.monitor,
             module.kept.get(module.monitor) or float("nan"))
    return {"settings": trial.drawn, "kept": module.kept,
            "test_acc": module.score(full_val[1]) if full_val else None,
            "beside": {**module.beside, "trial": trial.trial} if module.beside else {}}


def better(a: StageModule, b: StageModule) -> bool:
    """Whether trial `a`'s kept validation check beats trial `b`'s (ties: the earlier trial)."""
    x, y = a.kept.get(a.monitor), b.kept.get(b.monitor)
    if x is None or y is None:
        return False
    return x > y if a.mode == "max" else x < y


def where(cfg: DictConfig, device: torch.device) -> dict:
    """Where a stage ran: recorded with it, never part of its fingerprint."""
    return {"device": device_name(device), "accelerator": str(cfg.trainer.accelerator),
            "devices": cfg.trainer.devices, "strategy": str(cfg.trainer.strategy),
            "cuda_graphs": cfg.fastpath.cuda_graphs, "compile": cfg.fastpath.compile}


@contextmanager
def own_stream(stage: Stage, seed: int) -> Iterator[None]:
    """A stage that runs on a random stream of its own (a layer's probe), seeded from the run's
    seed and its name: the stream of every other stage stays as if it were not there."""
    if not stage.own_stream:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(substream(seed, zlib.crc32(stage.name.encode())))
        yield


def estimator(experiment: Experiment, plan: dict[str, Planned], device: torch.device
              ) -> Estimator:
    """What the progress display estimates time left from: each stage's optimiser steps (every
    trial of a tuned stage) and the work of one (minibatch x weights of what it trains), and the
    rate at which this device gets through work."""
    steps, work = {}, {}
    for name, planned in plan.items():
        stage, settings = planned.stage, planned.settings
        own = settings[stage.group]
        trials = settings.tune.trials if stage.tuned else 1
        steps[name] = float(trials * own.epochs * Minibatches.steps(
            stage.n_samples(experiment), own.batch_size, own.steps_per_epoch))
        work[name] = float(own.batch_size * stage.weights(experiment, settings))
    return Estimator(steps, work, rate(device))


@torch.no_grad()
def rate(device: torch.device, batch: int = 128, d_in: int = 784, d_out: int = 196) -> float:
    """Work (minibatch x weights) per second of one autoencoder training step here: a few timed
    steps of a 784-196 layer, on a random stream of their own (no other number changes)."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        layer = torch.nn.Linear(d_in, d_out).to(device)
        x = torch.randn(batch, d_in, device=device)
        opt = torch.optim.Adam(layer.parameters())
        for repeat in range(REPEATS + 1):
            if repeat == 1:  # the first step warms up
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                began = time.perf_counter()
            opt.zero_grad()
            torch.tanh(layer(x)).pow(2).mean().backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - began) / REPEATS
    return batch * d_in * d_out / max(seconds, 1e-9)
