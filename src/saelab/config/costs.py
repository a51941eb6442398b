"""What a run will cost, known before it runs: the memory it holds at its peak against the memory
of the machine (or of the GPU it trains on), and the cautions a config deserves (minibatches
larger than what they are drawn from, more optimiser steps than any run can finish).

Torch-free, like all of saelab.config: the front door answers at once.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from saelab.config import catalogue, kinds
from saelab.config.schema import Accelerator

FLOAT = 4  # bytes of a float32: weights, their gradients and Adam's moments, the pixels
PIXELS = 28 * 28
# Optimiser steps beyond which no run finishes: at 10 µs a step (a small network on a GPU with
# CUDA graphs; the CPU takes 0.1 ms and more) they take over a day.
STEPS_WARNED = 10**10
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")  # a container's memory, where it is smaller


def weights(model, n_classes: int) -> tuple[int, int]:
    """Weights and biases of the autoencoders (encoders and decoders) and of the deep network."""
    kind = kinds.kind_of(model)
    layers = [kind.weights(model, k) for k in range(1, kinds.depth(model) + 1)]
    autoencoders = sum(encoder + decoder for encoder, decoder in layers)
    deep = (sum(encoder for encoder, _ in layers) + kinds.sizes(model)[-1] * n_classes
            + n_classes)
    return autoencoders, deep


def images(cfg: DictConfig) -> int:
    """Images of the splits a run holds on its device (train, validation, test)."""
    data, classes = cfg.data, list(cfg.data.classes)
    train = sum(catalogue.train_counts(data.name, classes, data.val_size, data.train_limit))
    return (train + catalogue.val_size_of(data.name, classes, data.val_size)
            + catalogue.test_size(data.name, classes, data.test_limit))


def peak_bytes(cfg: DictConfig) -> int:
    """A lower bound of the memory a run holds while it fine-tunes: every autoencoder (kept for
    the stages after it), the probe's network, the fine-tuned network with its gradients and
    Adam's two moments, and the splits' pixels, all in float32."""
    autoencoders, deep = weights(cfg.model, len(cfg.data.classes))
    return FLOAT * (autoencoders + deep + 4 * deep + images(cfg) * PIXELS)


def gpu_bytes() -> int | None:
    """Memory of the first CUDA GPU, asked of the driver (None: no GPU or no driver)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        device, total = ctypes.c_int(), ctypes.c_size_t()
        ok = (driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(device), 0) == 0
              and driver.cuDeviceTotalMem_v2(ctypes.byref(total), device) == 0)
    except (OSError, AttributeError):
        return None
    return total.value if ok else None


def host_bytes() -> int:
    """The machine's memory, or its container's where that is smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = CGROUP_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def on_gpu(cfg: DictConfig) -> bool:
    """Whether the run's data and networks live on a GPU."""
    accelerator = cfg.trainer.accelerator
    return accelerator in (Accelerator.gpu, Accelerator.cuda) or (
        accelerator == Accelerator.auto and gpu_bytes() is not None)


def memory_limit(cfg: DictConfig) -> tuple[int, str]:
    """The memory the run has, and where: the GPU's when it trains on one, else the machine's."""
    if on_gpu(cfg):
        gpu = gpu_bytes()
        if gpu is not None:
            return gpu, "the GPU has"
    return host_bytes(), "this machine has"


def size(n: float) -> str:
    """Bytes in words: '2.2 TB', '23.4 GiB'."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    k = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
    return f"{n / 1024**k:.1f} {units[k]}"


def training_images(cfg: DictConfig) -> tuple[int, int]:
    """Images of the training split, and how many of them the labelled stages see."""
    classes = list(cfg.data.classes)
    n_train = sum(catalogue.train_counts(cfg.data.name, classes, cfg.data.val_size,
                                         cfg.data.train_limit))
    labelled = (cfg.data.labels_per_class * len(classes) if cfg.data.labels_per_class
                else n_train)
    return n_train, labelled


def stage_steps(cfg: DictConfig) -> dict[str, int]:
    """Optimiser steps of each trained config group, every epoch, layer and tuning trial."""
    n_train, labelled = training_images(cfg)
    layers = kinds.depth(cfg.model)
    trials = cfg.tune.trials or 1
    count = {"baseline": (labelled, 1), "pretrain": (n_train, layers), "probe": (labelled, layers),
             "finetune": (labelled, trials), "scratch": (labelled, trials),
             "semisup": (labelled, trials)}
    out = {}
    for group, (n, repeats) in count.items():
        own = cfg[group]
        per_epoch = own.steps_per_epoch or -(-n // own.batch_size)
        out[group] = own.epochs * per_epoch * repeats
    return out


def warn(jobs: list[DictConfig]) -> None:
    """Print each caution of the jobs once, on the standard error: `saelab: warning: ...`."""
    for line in dict.fromkeys(line for job in jobs for line in cautions(job)):
        print(f"saelab: warning: {line}", file=sys.stderr)


def cautions(cfg: DictConfig) -> list[str]:
    """What the front door warns of (one line each, the run goes on): minibatches larger than
    the images they are drawn from, and more optimiser steps than a run can finish."""
    n_train, labelled = training_images(cfg)
    lines = []
    for group in ("baseline", "pretrain", "probe", "finetune", "scratch", "semisup"):
        own, n = cfg[group], n_train if group == "pretrain" else labelled
        if own.epochs and own.batch_size > n and not own.sample_with_replacement:
            lines.append(f"{group}.batch_size={own.batch_size} is larger than the {n} training "
                         f"images it draws from: each epoch is one step over all of them")
    steps = stage_steps(cfg)
    total = sum(steps[g] for g in steps if cfg[g].epochs)
    if total > STEPS_WARNED:
        most = max(steps, key=steps.get)
        lines.append(f"{most}.epochs={cfg[most].epochs}: the run takes {total:.3g} optimiser "
                     f"steps, over a day even at 10 µs a step; it will not finish")
    return lines
