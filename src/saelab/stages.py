"""The trainable stages as LightningModules: autoencoder pretraining and classification.

Each Lightning step receives a chunk of minibatch index slices (see `data.Minibatches`) and runs
them as plain optimiser steps, so Lightning's per-step machinery stays outside the hot loop. Losses
and metrics accumulate on the device and are read once per epoch: no host sync inside an epoch.
The best validation epoch is kept (model selection on validation only) and `patience` stops early.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from saelab.autoencoder import AutoEncoder
from saelab.errors import NonFiniteLossError
from saelab.evaluation import CHUNK
from saelab.fastpath import StepLoop

log = logging.getLogger("saelab")


def make_optimizer(groups: list[dict], cfg, capturable: bool = False) -> torch.optim.Optimizer:
    """SGD (with momentum/nesterov), Adam or AdamW on parameter groups, each group's `lr_scale`
    multiplying the stage's learning rate."""
    groups = [{"params": g["params"], "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in groups]
    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0 and cfg.get("nesterov", False),
                               weight_decay=cfg.weight_decay)
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    if capturable:
        # A CUDA graph reads the learning rate from a device tensor at every replay, so the
        # schedule's per-epoch changes (written in place into it) reach the captured step.
        device = groups[0]["params"][0].device
        for group in groups:
            group["lr"] = torch.tensor(group["lr"], device=device)
    # fused: one kernel updates every parameter (10-15% faster steps on the CPU, fewer launches
    # on a GPU); capturable: step counts on the device, so that a CUDA graph can replay it.
    return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True,
                capturable=capturable)


def corrupt(x: torch.Tensor, kind: str, level: float, background: float) -> torch.Tensor:
    """Denoising corruption (Vincent et al. 2010): masking sets a fraction `level` of inputs to the
    background value, gaussian adds N(0, level^2), salt_pepper sets a fraction to min or max."""
    if kind == "none" or level == 0:
        return x
    if kind == "gaussian":
        return x + level * torch.randn_like(x)
    hit = torch.rand_like(x) < level
    if kind == "masking":
        return x.masked_fill(hit, background)
    if kind == "salt_pepper":
        salt = torch.where(torch.rand_like(x) < 0.5, 1.0, background)
        return torch.where(hit, salt, x)
    raise ValueError(f"unknown corruption {kind!r}")


def kl_sparsity(codes: torch.Tensor, target: float, low: float) -> torch.Tensor:
    """Sum over units of KL(target || mean activation), activations mapped from [low, 1] to
    [0, 1] so that tanh and sigmoid units share one definition."""
    rho_hat = ((codes - low) / (1 - low)).mean(0).clamp(1e-6, 1 - 1e-6)
    rho = target
    return (rho * torch.log(rho / rho_hat)
            + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


class Stage(pl.LightningModule):
    """Shared training loop of every stage; subclasses define `loss` and `evaluate`."""

    higher_is_better = True

    def __init__(self, model: nn.Module, cfg, label: str, tag: str):
        super().__init__()
        self.model, self.cfg, self.label, self.tag = model, cfg, label, tag
        self.automatic_optimization = False
        self.best_state: dict | None = None
        self.best_score: float | None = None
        self.bad_epochs = 0
        self.history: list[dict] = []
        self._loss_sum: torch.Tensor | None = None
        self._steps = 0
        self._val_sums: list[torch.Tensor] = []
        self._record: dict = {}
        # Eager optimiser steps; the FastPath callback picks each fit's loop (graphs on a GPU).
        self.step_loop = StepLoop(self.loss, self.manual_backward)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters())}]

    def configure_optimizers(self):
        optimizer = make_optimizer(self.param_groups(), self.cfg, self.step_loop.capturable)
        if self.cfg.get("schedule", "none") == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(self.cfg.epochs, 1))
            return [optimizer], [sched]
        return optimizer

    def training_step(self, batch, batch_idx):
        x, y, slices = batch
        total = self.step_loop.run(self.optimizers(use_pl_optimizer=False), x, y, slices)
        self._loss_sum = total if self._loss_sum is None else self._loss_sum + total
        self._steps += len(slices)

    def on_train_epoch_end(self):
        loss = self.trainer.strategy.reduce(self._loss_sum / self._steps, reduce_op="mean").item()
        self._loss_sum, self._steps = None, 0
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"{self.label}: training loss became {loss} in epoch {self.current_epoch + 1}; "
                f"try a lower learning rate (now {self.cfg.lr})")
        self._record = {"epoch": self.current_epoch + 1, "train_loss": loss, **self._record}
        self.history.append(self._record)
        self.log_scalars(self._record)
        self._record = {}
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        sums = self.evaluate(x, y)
        self._val_sums = sums if not self._val_sums else [a + b for a, b in
                                                           zip(self._val_sums, sums, strict=True)]

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self._val_sums = []
            return
        values = [float(v) for v in torch.stack(self._val_sums).tolist()]
        self._val_sums = []
        metrics = self.val_metrics(values)
        score = next(iter(metrics.values()))
        self._record.update(metrics)
        improved = self.best_score is None or (
            score > self.best_score if self.higher_is_better else score < self.best_score)
        if improved:
            self.best_score, self.bad_epochs = score, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_epochs += 1
            patience = self.cfg.get("patience")
            if patience and self.bad_epochs >= patience:
                self.trainer.should_stop = True

    def log_scalars(self, record: dict) -> None:
        """One line per epoch on the terminal and the epoch's scalars in TensorBoard."""
        epoch = record["epoch"]
        text = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
        if self.global_rank == 0:
            log.info("%s epoch %d/%d: %s", self.label, epoch, self.cfg.epochs, text)
        if self.logger is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.logger.experiment.add_scalar(f"{self.tag}/{key}", value, epoch)

    def restore_best(self) -> None:
        """Load the weights of the best validation epoch, if validation ran."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


class AutoencoderStage(Stage):
    """Greedy pretraining of one layer: reconstruct the (clean) input from a possibly corrupted
    copy, with an optional sparsity penalty on the codes. `noise_level` (this layer's entry of
    `noise.levels`) replaces `noise.level` when given."""

    higher_is_better = False

    def __init__(self, model: AutoEncoder, cfg, label: str, tag: str, background: float = -1.0,
                 noise_level: float | None = None):
        super().__init__(model, cfg, label, tag)
        self.background = background
        self.code_low = -1.0 if isinstance(model.activation, nn.Tanh) else 0.0
        # Plain Python copies of the settings the loss reads at every step (a config lookup
        # costs microseconds, as much as a small layer's forward pass).
        self.noise_kind = cfg.noise.kind
        self.noise_level = cfg.noise.level if noise_level is None else noise_level
        self.bce = cfg.loss == "bce"
        self.sparsity_kind = cfg.sparsity.kind
        self.sparsity_weight, self.sparsity_target = cfg.sparsity.weight, cfg.sparsity.target

    def reconstruction_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.model.encode(x)
        return codes, self.model.decode(codes)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reconstruction_logits(x)[1]
        return torch.sigmoid(out) if self.bce else out

    def loss(self, x: torch.Tensor, _y=None) -> torch.Tensor:
        noisy = corrupt(x, self.noise_kind, self.noise_level, self.background)
        codes, out = self.reconstruction_logits(noisy)
        if self.bce:
            loss = F.binary_cross_entropy_with_logits(out, x, reduction="sum") / len(x)
        else:
            loss = F.mse_loss(out, x)
        if self.sparsity_kind == "kl":
            loss = loss + self.sparsity_weight * kl_sparsity(codes, self.sparsity_target,
                                                             self.code_low)
        elif self.sparsity_kind == "l1":
            loss = loss + self.sparsity_weight * codes.abs().mean()
        return loss

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, _y=None) -> list[torch.Tensor]:
        """Sum of squared reconstruction errors and number of values."""
        err = (self.reconstruct(x) - x).pow(2).sum()
        return [err, torch.tensor(float(x.numel()), device=x.device)]

    def val_metrics(self, sums: list[float]) -> dict:
        return {"val_recon_mse": sums[0] / sums[1]}


class ClassifierStage(Stage):
    """Cross-entropy training of `model` = Sequential(body, head); the body's learning rate is
    scaled by `encoder_lr_scale` (the course notebook's idea to spare the pretrained features)."""

    def param_groups(self) -> list[dict]:
        body, head = self.model[0], self.model[1]
        groups = [{"params": list(head.parameters())}]
        body_params = [p for p in body.parameters() if p.requires_grad]
        if body_params:
            scale = self.cfg.get("encoder_lr_scale", 1.0)
            groups.append({"params": body_params, "lr_scale": scale})
        return groups

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Number of correct predictions and of samples."""
        correct = (self.model(x).argmax(1) == y).sum().float()
        return [correct, torch.tensor(float(len(y)), device=x.device)]

    def val_metrics(self, sums: list[float]) -> dict:
        return {"val_acc": sums[0] / sums[1]}


class EvalBatches:
    """Validation data for Lightning: a split in a few large chunks (one iterable, not a list,
    which Lightning would read as several dataloaders)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        # An empty split (no validation set) must give no chunks, not one empty chunk.
        pairs = zip(x.split(CHUNK), y.split(CHUNK), strict=True)
        self.chunks = list(pairs) if len(x) else []

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        return iter(self.chunks)
