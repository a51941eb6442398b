"""The common per-sample input path, the benchmark's slow reference: torchvision's `MNIST` with
`ToTensor` + `Normalize` transforms behind a `DataLoader` (shuffled, `num_workers=0`, each
minibatch collated sample by sample), the same networks, Adam and batch size as the config;
lower layers encode each minibatch on the fly, as such code does without precomputed codes.

Running it in full would take many minutes, so each stage is timed over a fixed number of
training steps and one validation pass, and its full time extrapolated as
epochs × (steps per epoch × seconds per step + seconds per validation pass). Weights stay at their
initialisation: the cost per step does not depend on them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from saelab.data.splits import TORCHVISION, load_raw
from saelab.nn.networks import AutoEncoder, StackedNet

WARMUP_STEPS = 2
VAL_BATCH = 1000  # the test batch size of PyTorch's MNIST example


def loaders(cfg) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over torchvision's dataset, split as saelab splits the
    training set (`data.val_size` held out; `data.train_limit` ignored: full MNIST only)."""
    data = cfg.data
    load_raw(data.name, data.root, data.mirror, data.download)  # fills the cache from the mirror
    # [0, 1] from ToTensor, then (x - 0.5) / 0.5: saelab's minus_one_one pixels.
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    full = TORCHVISION[data.name](str(Path(data.root).expanduser()), train=True, download=False,
                               transform=pipeline)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = int(data.val_size)
    train = DataLoader(Subset(full, order[n_val:]), batch_size=cfg.baseline.batch_size,
                       shuffle=True, num_workers=0)
    val = DataLoader(Subset(full, order[:n_val]), batch_size=VAL_BATCH, num_workers=0)
    return train, val


def time_stage(model: nn.Module, frozen: nn.Module, loss_kind: str, train: DataLoader,
               val: DataLoader, cfg_stage, steps: int) -> dict:
    """Seconds per training step (loading, frozen encoders, step) and per validation pass."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg_stage.lr,
                           weight_decay=cfg_stage.weight_decay)

    def inputs(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return frozen(x.flatten(1))

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = inputs(x)
        if loss_kind == "mse":
            return F.mse_loss(model(x), x)
        return F.cross_entropy(model(x), y)

    batches = iter(train)
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        opt.step()
    step_s = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    with torch.no_grad():
        for x, y in val:
            loss_of(x, y)
    val_s = time.perf_counter() - start
    epochs = cfg_stage.epochs
    return {"step_s": step_s, "val_pass_s": val_s, "measured_steps": steps,
            "extrapolated_s": epochs * (len(train) * step_s + val_s)}


def stack(autoencoders: list[AutoEncoder]) -> nn.Module:
    """The frozen encoders a stage reads its inputs through (none: the pixels)."""
    return StackedNet.from_autoencoders(autoencoders, None) if autoencoders else nn.Identity()


def run_per_sample(cfg, steps: int) -> dict:
    """Every stage of the experiment, timed on `steps` steps each and extrapolated."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train, val = loaders(cfg)
    sizes, k = list(cfg.model.sizes), len(cfg.data.classes)
    act, tied = cfg.model.activation, cfg.model.tied
    autoencoders = [AutoEncoder(d_in, d_out, act, tied)
                    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True)]
    stages = {"baseline": time_stage(StackedNet(sizes[:1], k), nn.Identity(),
                                     "ce", train, val, cfg.baseline, steps)}
    for i, ae in enumerate(autoencoders, start=1):
        stages[f"pretrain_layer{i}"] = time_stage(ae, stack(autoencoders[: i - 1]),
                                                  "mse", train, val, cfg.pretrain, steps)
        if i < len(autoencoders):  # each layer below the top is probed too
            stages[f"probe_layer{i}"] = time_stage(
                nn.Linear(sizes[i], k), stack(autoencoders[:i]), "ce", train, val,
                cfg.probe, steps)
    body = stack(autoencoders)
    stages["probe"] = time_stage(nn.Linear(sizes[-1], k), body, "ce", train, val, cfg.probe,
                                 steps)
    stages["finetune"] = time_stage(StackedNet.from_autoencoders(autoencoders, k), nn.Identity(),
                                    "ce", train, val, cfg.finetune, steps)
    stages["probe_scratch"] = time_stage(nn.Linear(sizes[-1], k), stack(autoencoders),
                                         "ce", train, val, cfg.probe, steps)
    stages["scratch"] = time_stage(StackedNet.from_autoencoders(autoencoders, k),
                                   nn.Identity(), "ce", train, val, cfg.scratch, steps)
    return {"stage_s": {name: s["extrapolated_s"] for name, s in stages.items()},
            "total_s": sum(s["extrapolated_s"] for s in stages.values()),
            "measured_s": time.perf_counter() - start, "stages": stages,
            "n_train": len(train.dataset)}
