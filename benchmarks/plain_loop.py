"""saelab's default experiment written as a plain PyTorch loop: the benchmark's reference.
It takes either kind of stack (model.kind: dense, or conv with saelab's convolutional autoencoder).

Tensors in memory, index-sliced minibatches, no framework. It follows the composed config stage by
stage with the same data (`load_splits`), networks, Adam, batch size, epochs, per-epoch cosine
schedule and per-epoch validation keeping the best check (the weights a stage starts from
compete, as in saelab): the pixel baseline, greedy pretraining with each layer's codes computed
once and each layer below the top probed, the probe on the top codes, fine-tuning end to end, a
probe on the initial (random) stack, and the same network trained from the encoders' initial
weights and that head (scratch). It measures what saelab's metrics.json reports, so that both do
the same work: each classifier's validation and test accuracy, each autoencoder's reconstruction
error on the three splits and its contraction on validation.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from saelab.config import kinds
from saelab.data.batches import CHUNK
from saelab.data.splits import load_splits
from saelab.nn.evaluation import in_chunks, predict
from saelab.nn.networks import AUTOENCODERS, StackedNet


def fit(model: nn.Module, loss_fn: Callable, score_fn: Callable, x: torch.Tensor,
        y: torch.Tensor | None, val: tuple, cfg, gen: torch.Generator) -> float:
    """Train `model` for `cfg.epochs` and keep its best validation check (highest score; the
    first before training); returns the seconds spent."""
    if cfg.optimizer != "adam" or cfg.schedule != "cosine":
        raise ValueError("the plain loop mirrors the default config only (adam, cosine)")
    start = time.perf_counter()
    # The same Adam implementation as saelab's (fused), so that only the framework differs.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    with torch.no_grad():
        best, best_state = score_fn(*val), copy.deepcopy(model.state_dict())
    for _ in range(cfg.epochs):
        total = torch.zeros((), device=x.device)
        for idx in torch.randperm(len(x), generator=gen).to(x.device).split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(x[idx], None if y is None else y[idx])
            loss.backward()
            opt.step()
            total += loss.detach()
        if not math.isfinite(total.item()):
            raise RuntimeError("training loss is not finite")
        with torch.no_grad():
            score = score_fn(*val)
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
        sched.step()
    model.load_state_dict(best_state)
    return time.perf_counter() - start


def accuracy(model: nn.Module) -> Callable:
    return lambda x, y: float((predict(model, x) == y).float().mean())


def cross_entropy(model: nn.Module) -> Callable:
    return lambda x, y: F.cross_entropy(model(x), y)


@torch.no_grad()
def autoencoder_metrics(ae: nn.Module, inputs: tuple, codes: tuple) -> dict:
    """What saelab reports of an autoencoder: its reconstruction MSE on each split (from the
    codes already computed) and its contraction on the validation split."""
    def chunks(x, h):
        return zip(x.split(CHUNK), h.split(CHUNK), strict=True)

    out = {split: sum(float((ae.decode(h) - x).pow(2).sum()) for x, h in chunks(x, h)) / x.numel()
           for split, x, h in zip(("train", "val", "test"), inputs, codes, strict=True)}
    out["contraction"] = sum(float(ae.contraction(x, h)) * len(x)
                             for x, h in chunks(inputs[1], codes[1])) / len(inputs[1])
    return out


def run_plain(cfg, device: torch.device) -> dict:
    """The whole experiment; returns seconds per stage, the total, each classifier's
    validation and test accuracy and each autoencoder's measurements."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_splits(cfg.data, cfg.seed, device)
    k, sizes = len(data.classes), kinds.sizes(cfg.model)
    images = (data.train_x, data.val_x, data.test_x)
    seconds, val_acc, test_acc, autoencoder = {}, {}, {}, {}

    def train_classifier(name: str, model: nn.Module, x: tuple, cfg_stage,
                         measured: StackedNet | None = None) -> None:
        """Fit `model` on `x` (train, val and test inputs) and measure it on them, or (the
        random stack's probe, as saelab does) as the network `measured` it tops, on the images."""
        seconds[name] = fit(model, cross_entropy(model), accuracy(model), x[0], data.train_y,
                            (x[1], data.val_y), cfg_stage, gen)
        measured, x = (model, x) if measured is None else (measured, images)
        val_acc[name] = accuracy(measured)(x[1], data.val_y)
        test_acc[name] = accuracy(measured)(x[2], data.test_y)

    train_classifier("baseline", StackedNet(sizes[:1], k).to(device), images, cfg.baseline)

    autoencoders, initial, codes = [], [], images
    for i, d_out in enumerate(sizes[1:], start=1):
        ae = AUTOENCODERS[cfg.model.kind].of(cfg.model, i).to(device)
        initial.append(copy.deepcopy(ae))
        seconds[f"pretrain_layer{i}"] = fit(
            ae, lambda x, _y, ae=ae: F.mse_loss(ae(x), x),
            lambda x, _y, ae=ae: -float(F.mse_loss(ae(x), x)), codes[0], None,
            (codes[1], None), cfg.pretrain, gen)
        autoencoders.append(ae.eval())
        inputs, codes = codes, tuple(in_chunks(ae.encode, c) for c in codes)
        autoencoder[f"pretrain_layer{i}"] = autoencoder_metrics(ae, inputs, codes)
        if i < len(sizes) - 1:  # each layer below the top is probed too
            train_classifier(f"probe_layer{i}", StackedNet([d_out], k).to(device), codes,
                             cfg.probe)

    head = StackedNet(sizes[-1:], k).to(device)
    scratch = StackedNet.from_autoencoders(initial, k).to(device)
    scratch.head.load_state_dict(head.head.state_dict())
    train_classifier("probe", head, codes, cfg.probe)
    probe = StackedNet.from_autoencoders(autoencoders, k).to(device)
    probe.head.load_state_dict(head.head.state_dict())
    train_classifier("finetune", probe, images, cfg.finetune)

    # Scratch's head: fitted on the frozen random stack's codes, as fine-tuning's on the
    # pretrained one's (model.head=probe).
    random_codes = tuple(in_chunks(scratch.codes, x) for x in images[:2])  # measured on images
    train_classifier("probe_scratch", scratch.head, random_codes, cfg.probe, scratch)
    train_classifier("scratch", scratch, images, cfg.scratch)
    return {"stage_s": seconds, "total_s": time.perf_counter() - start, "test_acc": test_acc,
            "val_acc": val_acc, "autoencoders": autoencoder, "n_train": len(data.train_y)}
