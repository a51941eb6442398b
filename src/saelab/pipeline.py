"""The experiment, top to bottom: load the data, then train each stage of the config's plan
(`saelab.stages.plan`: pixel baseline, greedy pretraining layer by layer, probe, fine-tuning, the
from-scratch control) or take it from a checkpoint, recording each as it finishes.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from saelab.data import Minibatches, load_splits
from saelab.modules import EvalBatches, StageModule
from saelab.progress import Estimator, ProgressDisplay
from saelab.runfolder import RunFolder
from saelab.runner import Runner
from saelab.stages import Expected, Experiment, Stage, View, expected

# Lightning's start-up chatter (accelerator report, tips) hides the experiment's own log lines.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("pytorch_lightning.accelerators.cuda").setLevel(logging.WARNING)
log = logging.getLogger("saelab")

# What the pipeline reports to as it goes: a part's name and what metrics.json gets for it.
Record = Callable[..., None]
REPEATS = 5  # timed steps of the device's rate


def run_experiment(cfg: DictConfig, folder: RunFolder, device: torch.device, record: Record,
                   open_logger: Callable[[], pl.loggers.Logger] | None = None,
                   overrides: list[str] | None = None) -> Experiment:
    """Run every stage of the experiment `cfg` (validated) in `folder` (whose lock the caller
    holds), calling `record(part, **sections)` after the data and after each stage, and
    `open_logger()` for the logger once the folder is known to be this config's; return what the
    stages left: the data, the autoencoders and every trained network."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("loading the data: %s, classes %s", cfg.data.name, list(cfg.data.classes))
    ex = Experiment(cfg, device, load_splits(cfg.data, cfg.seed, device))
    want = expected(cfg, ex.data.checksums)
    usable = folder.check(cfg, want)
    folder.write_config(cfg, overrides if overrides is not None else folder.read_overrides())
    logger = open_logger() if open_logger is not None else None
    data, (_, y, _, val_y) = ex.data, ex.labelled()
    log.info("data from %s: %d train / %d val / %d test images, %d / %d of them labelled",
             data.source, len(data.train_y), len(data.val_y), len(data.test_y), len(y),
             len(val_y))
    estimate = estimator(ex, want, device)
    progress = ProgressDisplay(cfg.progress if folder.writer else "lines", estimate)
    runner = Runner(cfg, folder, want, usable, device, logger, progress)
    # The estimate's plan beside the data: with each stage's seconds, a recorded run replays.
    record("data", data=data.summary(), work={
        "rate": estimate.rate, "steps": dict(estimate.steps), "per_step": dict(estimate.work)})
    try:
        for name, exp in want.items():  # the stages, in the order they run (stages.plan)
            stage, s = exp.stage, exp.settings
            with own_stream(stage, cfg.seed):
                inputs = stage.inputs(ex, s)
                module, fitted = runner.fit(exp, partial(attempt, ex, stage, inputs),
                                            stage.views(s), beside(ex, stage, s))
                stage.keep(ex, module.model, s)
                record(name, **{name: {**stage.metrics(ex, module, s), **fitted}})
    finally:
        progress.close()
    return ex


def attempt(ex: Experiment, stage: Stage, inputs: tuple, view: View
            ) -> tuple[StageModule, Minibatches, EvalBatches]:
    """A stage's Lightning module (its network freshly built) and data, under settings `view`."""
    train_x, train_y, val_x, val_y = inputs
    module = stage.module(ex, stage.model(ex, view).to(ex.device), view)
    stage.before_fit(ex, view)
    return (module, batches(ex.cfg, train_x, train_y, view[stage.group]),
            EvalBatches(val_x, val_y))


def beside(ex: Experiment, stage: Stage, s: View) -> tuple[EvalBatches, EvalBatches] | None:
    """For a tuned stage (`tune.full_val`): the whole validation split, to select on beside,
    and the test set, to report what it would have chosen."""
    if not (stage.tuned and s.tune.full_val):
        return None
    data = ex.data
    return EvalBatches(data.val_x, data.val_y), EvalBatches(data.test_x, data.test_y)


@contextmanager
def own_stream(stage: Stage, seed: int) -> Iterator[None]:
    """A stage that runs on a random stream of its own (a layer's probe), seeded from the run's
    seed and its name: the stream of every other stage stays as if it were not there."""
    if not stage.own_stream:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + zlib.crc32(stage.name.encode()))
        yield


def batches(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor | None, settings) -> Minibatches:
    """A stage's training minibatches, from its settings (`batch_size`, `steps_per_epoch`,
    `sample_with_replacement`) and the run's seed."""
    return Minibatches(x, y, settings.batch_size, cfg.fastpath.steps_per_item, cfg.seed,
                       sample_with_replacement=settings.sample_with_replacement,
                       steps_per_epoch=settings.steps_per_epoch)


def estimator(ex: Experiment, want: dict[str, Expected], device: torch.device) -> Estimator:
    """What the progress display estimates time left from: each stage's optimiser steps (every
    trial of a tuned stage) and the work of one (minibatch x weights of what it trains), and the
    rate at which this device gets through work."""
    steps, work = {}, {}
    for name, exp in want.items():
        stage, s = exp.stage, exp.settings
        settings = s[stage.group]
        trials = s.tune.trials if stage.tuned else 1
        steps[name] = float(trials * settings.epochs * Minibatches.steps(
            stage.n_samples(ex), settings.batch_size, settings.steps_per_epoch))
        work[name] = float(settings.batch_size * stage.weights(ex, s))
    return Estimator(steps, work, rate(device))


@torch.no_grad()
def rate(device: torch.device, batch: int = 128, d_in: int = 784, d_out: int = 196) -> float:
    """Work (minibatch x weights) per second of one autoencoder training step here: a few timed
    steps of a 784-196 layer, on a random stream of their own (no other number changes)."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        layer = nn.Linear(d_in, d_out).to(device)
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
