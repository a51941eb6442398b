"""The Lightning modules that train the stages: a module holds its network, its loss, its
evaluation and its optimiser.

Each Lightning step receives a chunk of minibatch index slices (saelab.data.batches.Minibatches)
and runs them as plain optimiser steps, so Lightning's per-step machinery stays outside the hot
loop; the loss is summed on the device and read once per epoch (no host sync inside an epoch).
The validation metric goes through `self.log`, where Lightning's callbacks find it: `KeepBest`
keeps the weights of the best validation epoch (in memory), Lightning's `EarlyStopping` applies
`patience` and `EpochRecord` keeps each stage's history and sends the epoch's scalars to every
logger (saelab.nn.callbacks). A module brings these callbacks itself (`configure_callbacks`), so
any Trainer that fits it applies them.

saelab leaves Lightning's automatic optimisation (`automatic_optimization = False`) because a
Lightning step here is a whole chunk of optimiser steps: Lightning's per-step hooks would cost
more than a small network's step itself (docs/performance.md).
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from torch import nn
from torch.nn import functional as F

from saelab.config.schema import Noise, Optimizer, ReconLoss, Schedule, Sparsity
from saelab.data.transforms import corrupt, translate
from saelab.errors import NonFiniteLossError
from saelab.nn.callbacks import EpochRecord, KeepBest
from saelab.nn.fastpath import StepLoop
from saelab.nn.meter import Meter
from saelab.nn.networks import StackedNet

log = logging.getLogger("saelab")


def make_optimizer(groups: list[dict], cfg, capturable: bool = False) -> torch.optim.Optimizer:
    """SGD (with momentum/nesterov), Adam or AdamW on parameter groups, each group's `lr_scale`
    multiplying the stage's learning rate."""
    groups = [{"params": g["params"], "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in groups]
    if cfg.optimizer == Optimizer.sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0 and cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    kind = {Optimizer.adam: torch.optim.Adam, Optimizer.adamw: torch.optim.AdamW}[cfg.optimizer]
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






def kl_sparsity(codes: torch.Tensor, target: float, low: float) -> torch.Tensor:
    """Sum over units of KL(target || mean activation), activations mapped from [low, 1] to
    [0, 1] so that tanh and sigmoid units share one definition."""
    rho_hat = ((codes - low) / (1 - low)).mean(0).clamp(1e-6, 1 - 1e-6)
    rho = target
    return (rho * torch.log(rho / rho_hat)
            + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


class StageModule(pl.LightningModule):
    """What every stage shares: the step loop, the epoch's loss, the optimiser and schedule, and
    the validation metric (`monitor`, better when higher with `mode="max"`). Subclasses define
    `loss`, `evaluate` and `val_metric`."""

    monitor = "val_acc"
    mode = "max"

    def __init__(self, model: nn.Module, cfg, label: str, tag: str):
        super().__init__()
        self.model, self.cfg, self.label, self.tag = model, cfg, label, tag
        self.automatic_optimization = False
        self.history: list[dict] = []
        self.meter = Meter()
        self._loss_sum: torch.Tensor | None = None
        self._steps = 0
        self._val_sums: list[torch.Tensor] = []
        self.kept: dict = {}  # the check whose weights were kept (KeepBest)
        self.beside: dict = {}  # selection on the whole validation split (KeepBestOn)
        # Eager optimiser steps; the FastPath callback picks each fit's loop (graphs on a GPU).
        self.step_loop = StepLoop(self.loss, self.manual_backward, meter=self.meter)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters())}]

    def configure_callbacks(self) -> list[pl.Callback]:
        """The per-epoch concerns, joined to any Trainer that fits this stage: history and
        logging, the best validation epoch's weights, early stopping after `patience` epochs
        without improvement (without a validation split: the last epoch, no early stop)."""
        callbacks: list[pl.Callback] = [EpochRecord(), KeepBest()]
        if self.cfg.patience:
            callbacks.append(EarlyStopping(self.monitor, mode=self.mode,
                                           patience=self.cfg.patience,
                                           check_on_train_epoch_end=False, strict=False))
        return callbacks

    def configure_optimizers(self):
        optimizer = make_optimizer(self.param_groups(), self.cfg, self.step_loop.capturable)
        if self.cfg.schedule == Schedule.cosine:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(self.cfg.epochs, 1))
            return [optimizer], [sched]
        return optimizer

    def training_step(self, batch, batch_idx):
        x, y, slices = batch
        total = self.step_loop.run(self.optimizers(use_pl_optimizer=False), x, y, slices)
        self._loss_sum = total if self._loss_sum is None else self._loss_sum + total
        self._steps += len(slices)

    def epoch_loss(self) -> float:
        """The epoch's mean training loss over every process (the epoch's one host sync);
        NonFiniteLossError if it diverged."""
        loss = self.trainer.strategy.reduce(self._loss_sum / self._steps, reduce_op="mean").item()
        self._loss_sum, self._steps = None, 0
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"{self.label}: training loss became {loss} in epoch {self.current_epoch + 1}; "
                f"try a lower learning rate (now {self.cfg.lr})")
        return loss

    def on_train_epoch_end(self):
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def validation_step(self, batch, batch_idx):
        sums = self.evaluate(*batch)
        self._val_sums = sums if not self._val_sums else [a + b for a, b in
                                                           zip(self._val_sums, sums, strict=True)]

    def on_validation_epoch_end(self):
        sums = [float(v) for v in torch.stack(self._val_sums).tolist()]
        self._val_sums = []
        if not self.trainer.sanity_checking:
            self.log(self.monitor, sums[0] / sums[1], logger=False)

    @torch.no_grad()
    def score(self, batches) -> float | None:
        """The validation metric on `batches` now, outside Lightning's loop (None: no data)."""
        sums = [torch.stack(self.evaluate(*batch)) for batch in batches]
        if not sums:
            return None
        total = torch.stack(sums).sum(0)
        return float(total[0] / total[1])


class AutoencoderModule(StageModule):
    """Greedy pretraining of one layer: reconstruct the (clean) input from a possibly corrupted
    copy, with an optional sparsity penalty on the codes and an optional contractive penalty on
    the encoder's Jacobian (at the input the encoder sees, corrupted or not). `noise_level` (this
    layer's entry of `noise.levels`) replaces `noise.level` when given."""

    monitor = "val_recon_mse"
    mode = "min"

    def __init__(self, model: nn.Module, cfg, label: str, tag: str, background: float = -1.0,
                 noise_level: float | None = None):
        super().__init__(model, cfg, label, tag)
        self.background = background
        self.code_low = -1.0 if isinstance(model.activation, nn.Tanh) else 0.0
        # Plain Python copies of the settings the loss reads at every step (a config lookup
        # costs microseconds, as much as a small layer's forward pass).
        self.noise_kind = Noise(cfg.noise.kind)
        self.noise_level = cfg.noise.level if noise_level is None else noise_level
        self.bce = cfg.loss == ReconLoss.bce
        self.sparsity_kind = Sparsity(cfg.sparsity.kind)
        self.sparsity_weight, self.sparsity_target = cfg.sparsity.weight, cfg.sparsity.target
        self.contractive_weight = cfg.contractive.weight

    def reconstruction_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.model.encode(x)
        return codes, self.model.decode(codes)

    def reconstruct(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of `x`, from its `codes` where they are already known."""
        out = self.reconstruction_logits(x)[1] if codes is None else self.model.decode(codes)
        return torch.sigmoid(out) if self.bce else out

    def loss(self, x: torch.Tensor, _y=None) -> torch.Tensor:
        noisy = corrupt(x, self.noise_kind, self.noise_level, self.background)
        codes, out = self.reconstruction_logits(noisy)
        if self.bce:
            loss = F.binary_cross_entropy_with_logits(out, x, reduction="sum") / len(x)
        else:
            loss = F.mse_loss(out, x)
        if self.sparsity_kind == Sparsity.kl:
            loss = loss + self.sparsity_weight * kl_sparsity(codes, self.sparsity_target,
                                                             self.code_low)
        elif self.sparsity_kind == Sparsity.l1:
            loss = loss + self.sparsity_weight * codes.abs().mean()
        if self.contractive_weight:
            loss = loss + self.contractive_weight * self.model.contraction(noisy, codes)
        return loss

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, clean: torch.Tensor | None = None,
                 codes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Sum of squared errors of the reconstruction of `x` (from its `codes`, where known)
        against `clean` (default: `x` itself), and number of values."""
        err = (self.reconstruct(x, codes) - (x if clean is None else clean)).pow(2).sum()
        return [err, torch.tensor(float(x.numel()), device=x.device)]


class ClassifierModule(StageModule):
    """Cross-entropy training of a StackedNet; its encoders' learning rate is scaled by
    `encoder_lr_scale` (the course notebook's idea to spare the pretrained features). With
    `dropout` (its `input` and `hidden` rates: fine-tuning, scratch), the training loss drops
    inputs and hidden units; with `shift`, it sees each image translated at random by up to that
    many pixels. The network itself has no dropout layer, so evaluation and saved weights are as
    without."""

    def __init__(self, model: StackedNet, cfg, label: str, tag: str,
                 encoder_lr_scale: float | None = None, dropout=None, shift: int = 0,
                 background: float = -1.0):
        super().__init__(model, cfg, label, tag)
        self.encoder_lr_scale = encoder_lr_scale
        self.p_input = dropout.input if dropout else 0.0
        self.p_hidden = dropout.hidden if dropout else 0.0
        self.shift, self.background = shift, background

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        return translate(x, self.shift, self.background) if self.shift else x

    def param_groups(self) -> list[dict]:
        groups = [{"params": list(self.model.head.parameters())}]
        encoders = [p for p in self.model.encoder_parameters() if p.requires_grad]
        if encoders:
            scale = self.encoder_lr_scale
            groups.append({"params": encoders,
                           **({"lr_scale": scale} if scale is not None else {})})
        return groups

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward pass: the network, with dropout on the input and after every
        hidden activation when configured."""
        return self.model(x, self.p_input, self.p_hidden)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(self.augmented(x)), y)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Number of correct predictions and of samples."""
        correct = (self.model(x).argmax(1) == y).sum().float()
        return [correct, torch.tensor(float(len(y)), device=x.device)]


class SemisupModule(ClassifierModule):
    """Fine-tuning that also learns from unlabelled images, through the network's own confident
    predictions (pseudo-labels, Lee 2013): each step adds, to the labelled minibatch's loss, the
    cross-entropy of an unlabelled minibatch, perturbed (translated, masked, dropped out), against
    the classes the network predicts for the same images clean, where it is at least `threshold`
    sure (FixMatch's weak and strong views, Sohn et al. 2020). That loss's weight rises from 0 to
    `weight` over the first `ramp` of the `steps`. The unlabelled images come without labels: the
    module never holds one."""

    def __init__(self, model: StackedNet, cfg, label: str, tag: str, unlabelled: torch.Tensor,
                 steps: int, **kwargs):
        super().__init__(model, cfg, label, tag, **kwargs)
        self.unlabelled = unlabelled
        # Plain Python copies of what the loss reads at every step.
        self.u_batch, self.threshold = cfg.unlabelled_batch_size, cfg.threshold
        self.weight, self.noise = cfg.weight, cfg.noise
        self.ramp_steps = max(cfg.ramp * steps, 1.0)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        labelled = super().loss(x, y)
        pool = self.unlabelled
        u = pool[torch.randint(len(pool), (self.u_batch,), device=pool.device)]
        with torch.no_grad():
            confidence, pseudo = self.model(u).softmax(1).max(1)
            counts = (confidence >= self.threshold).float()
        student = corrupt(self.augmented(u), Noise.masking, self.noise, self.background)
        unlabelled = (F.cross_entropy(self.logits(student), pseudo, reduction="none")
                      * counts).mean()
        weight = self.weight * min(1.0, self.meter.steps / self.ramp_steps)
        return labelled + weight * unlabelled


# ---------------------------------------------------------------------------------------------
# Per-epoch concerns








