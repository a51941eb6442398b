"""saelab's default experiment written as a plain PyTorch loop: the benchmark's reference.
It takes either kind of stack (model.kind: dense, or conv with saelab's convolutional autoencoder).

Tensors in memory, index-sliced minibatches, no framework. It follows the composed config stage by
stage with the same data (`load_splits`), networks, Adam, batch size, epochs, per-epoch cosine
schedule and per-epoch validation keeping the best epoch: the pixel baseline, greedy pretraining
with each layer's codes computed once and each layer below the top probed, the probe on the top
codes, fine-tuning end to end, a probe on the initial (random) stack, and the same network trained
from the encoders' initial weights and that head (scratch).
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
from saelab.data.splits import load_splits
from saelab.nn.evaluation import in_chunks, predict
from saelab.nn.networks import AUTOENCODERS, StackedNet


def fit(model: nn.Module, loss_fn: Callable, score_fn: Callable, x: torch.Tensor,
        y: torch.Tensor | None, val: tuple, cfg, gen: torch.Generator) -> float:
    """Train `model` for `cfg.epochs` and keep its best validation epoch (highest score);
    returns the seconds spent."""
    if cfg.optimizer != "adam" or cfg.schedule != "cosine":
        raise ValueError("the plain loop mirrors the default config only (adam, cosine)")
    start = time.perf_counter()
    # The same Adam implementation as saelab's (fused), so that only the framework differs.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    best, best_state = -math.inf, None
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


def run_plain(cfg, device: torch.device) -> dict:
    """The whole experiment; returns seconds per stage, the total and the test accuracies."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_splits(cfg.data, cfg.seed, device)
    k, sizes = len(data.classes), kinds.sizes(cfg.model)
    val = (data.val_x, data.val_y)
    seconds, test_acc = {}, {}

    def train_classifier(name: str, model: nn.Module, x: torch.Tensor, stage_val: tuple,
                         cfg_stage) -> None:
        seconds[name] = fit(model, cross_entropy(model), accuracy(model), x, data.train_y,
                            stage_val, cfg_stage, gen)

    baseline = StackedNet(sizes[:1], k).to(device)
    train_classifier("baseline", baseline, data.train_x, val, cfg.baseline)
    test_acc["baseline"] = accuracy(baseline)(data.test_x, data.test_y)

    autoencoders, initial, codes = [], [], (data.train_x, data.val_x)
    for i, d_out in enumerate(sizes[1:], start=1):
        ae = AUTOENCODERS[cfg.model.kind].of(cfg.model, i).to(device)
        initial.append(copy.deepcopy(ae))
        seconds[f"pretrain_layer{i}"] = fit(
            ae, lambda x, _y, ae=ae: F.mse_loss(ae(x), x),
            lambda x, _y, ae=ae: -float(F.mse_loss(ae(x), x)), codes[0], None,
            (codes[1], None), cfg.pretrain, gen)
        autoencoders.append(ae.eval())
        codes = tuple(in_chunks(ae.encode, c) for c in codes)
        if i < len(sizes) - 1:  # each layer below the top is probed too
            layer_head = StackedNet([d_out], k).to(device)
            train_classifier(f"probe_layer{i}", layer_head, codes[0], (codes[1], data.val_y),
                             cfg.probe)

    head = StackedNet(sizes[-1:], k).to(device)
    scratch = StackedNet.from_autoencoders(initial, k).to(device)
    scratch.head.load_state_dict(head.head.state_dict())
    train_classifier("probe", head, codes[0], (codes[1], data.val_y), cfg.probe)
    probe = StackedNet.from_autoencoders(autoencoders, k).to(device)
    probe.head.load_state_dict(head.head.state_dict())
    test_acc["probe"] = accuracy(probe)(data.test_x, data.test_y)

    train_classifier("finetune", probe, data.train_x, val, cfg.finetune)
    test_acc["finetune"] = accuracy(probe)(data.test_x, data.test_y)

    # Scratch's head: fitted on the frozen random stack's codes, as fine-tuning's on the
    # pretrained one's (model.head=probe).
    random_codes = tuple(in_chunks(scratch.codes, x) for x in (data.train_x, data.val_x))
    train_classifier("probe_scratch", scratch.head, random_codes[0], (random_codes[1], data.val_y),
                     cfg.probe)
    train_classifier("scratch", scratch, data.train_x, val, cfg.scratch)
    test_acc["scratch"] = accuracy(scratch)(data.test_x, data.test_y)
    return {"stage_s": seconds, "total_s": time.perf_counter() - start, "test_acc": test_acc,
            "n_train": len(data.train_y)}
