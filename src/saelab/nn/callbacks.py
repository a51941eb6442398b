"""The per-epoch concerns of a stage's fit, as Lightning callbacks: its history and logged scalars
(`EpochRecord`), and model selection on validation (`KeepBest`, `KeepBestOn`). Each receives the
saelab module being fitted (saelab.nn.modules.StageModule, which brings these callbacks)."""

from __future__ import annotations

import pytorch_lightning as pl


class EpochRecord(pl.Callback):
    """Each epoch: the stage's history entry, the epoch's scalars to every logger (under the
    stage's tag, step = epoch) and one log line."""

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch = module.current_epoch + 1
        record = {"epoch": epoch, "train_loss": module.epoch_loss()}
        if module.monitor in trainer.callback_metrics:
            record[module.monitor] = float(trainer.callback_metrics[module.monitor])
        module.history.append(record)
        scalars = {f"{module.tag}/{k}": v for k, v in record.items() if k != "epoch"}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=epoch)
        if trainer.global_rank == 0:
            module.meter.epoch_done(module.label, epoch, module.cfg.epochs, record)


class KeepBest(pl.Callback):
    """Keep the weights of the best validation check in memory and load them when the fit ends
    (model selection on validation only; without a validation split, the last epoch's). The
    first check comes before any training: the weights a stage starts from compete too."""

    def __init__(self):
        self.best: float | None = None
        self.epoch = 0  # of the best check (0: before training)
        self.state: dict | None = None

    def consider(self, score: float, module: pl.LightningModule, epoch: int) -> None:
        if self.best is None or (score > self.best if module.mode == "max" else score < self.best):
            self.best, self.epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        score = module.score(trainer.val_dataloaders or [])
        if score is not None:
            module.history.append({"epoch": 0, module.monitor: score})
            self.consider(score, module, 0)

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or module.monitor not in trainer.callback_metrics:
            return
        self.consider(float(trainer.callback_metrics[module.monitor]), module,
                      module.current_epoch + 1)

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        module.kept = {"epoch": self.epoch, module.monitor: self.best}
        if self.state is not None:
            module.model.load_state_dict(self.state)


class KeepBestOn(KeepBest):
    """Selection on another validation set (the whole validation split), reported beside and
    never used: the accuracy of its best check there, and the test accuracy of those weights
    (`module.beside`). The module's own weights stay those its validation chose."""

    def __init__(self, val, test):
        super().__init__()
        self.val, self.test = val, test

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.consider(module.score(self.val), module, 0)

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.consider(module.score(self.val), module, module.current_epoch + 1)

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        own = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        module.model.load_state_dict(self.state)
        module.beside = {"epoch": self.epoch, "val_acc": self.best,
                        "test_acc": module.score(self.test)}
        module.model.load_state_dict(own)
