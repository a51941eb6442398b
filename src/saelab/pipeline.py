"""The experiment, top to bottom: load the data, then train each stage of the config's plan
(`saelab.stages.plan`: pixel baseline, greedy pretraining layer by layer, probe, fine-tuning, the
from-scratch control) or take it from a checkpoint, recording each as it finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from saelab.data import Minibatches, load_splits
from saelab.modules import EvalBatches
from saelab.progress import ProgressDisplay
from saelab.runfolder import RunFolder
from saelab.runner import Runner
from saelab.stages import Expected, Experiment, expected

# Lightning's start-up chatter (accelerator report, tips) hides the experiment's own log lines.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("pytorch_lightning.accelerators.cuda").setLevel(logging.WARNING)
log = logging.getLogger("saelab")

# What the pipeline reports to as it goes: a part's name and what metrics.json gets for it.
Record = Callable[..., None]


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
    progress = ProgressDisplay(cfg.progress if folder.writer else "lines", work(ex, want))
    runner = Runner(cfg, folder, want, usable, device, logger, progress)
    record("data", data=data.summary())
    try:
        for name, exp in want.items():
            stage, s = exp.stage, exp.settings
            train_x, train_y, val_x, val_y = stage.inputs(ex, s)
            module = stage.module(ex, stage.model(ex, s).to(device), s)
            stage.before_fit(ex, s)
            fitted = runner.fit(module, exp, batches(cfg, train_x, train_y, s[stage.group]),
                                EvalBatches(val_x, val_y))
            stage.keep(ex, module.model, s)
            record(name, **{name: {**stage.metrics(ex, module, s), **fitted}})
    finally:
        progress.close()
    return ex


def batches(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor | None, settings) -> Minibatches:
    """A stage's training minibatches, from its settings (`batch_size`, `steps_per_epoch`,
    `sample_with_replacement`) and the run's seed."""
    return Minibatches(x, y, settings.batch_size, cfg.fastpath.steps_per_item, cfg.seed,
                       sample_with_replacement=settings.sample_with_replacement,
                       steps_per_epoch=settings.steps_per_epoch)


def work(ex: Experiment, want: dict[str, Expected]) -> dict[str, float]:
    """Each stage's training work, steps x batch x weights of the network it trains: what the
    progress display estimates time left from."""
    out = {}
    for name, exp in want.items():
        stage, s = exp.stage, exp.settings
        settings = s[stage.group]
        steps = Minibatches.steps(stage.n_samples(ex), settings.batch_size,
                                  settings.steps_per_epoch)
        out[name] = float(settings.epochs * steps * settings.batch_size * stage.weights(ex, s))
    return out
