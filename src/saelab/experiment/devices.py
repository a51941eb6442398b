"""Where a run runs: the device its data lives on, its name as recorded, which process writes."""

from __future__ import annotations

import os
import platform

import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from saelab.config.schema import Accelerator
from saelab.errors import ConfigError


def data_device(cfg: DictConfig) -> torch.device:
    """Where the splits live: the accelerator's device, so minibatches never cross to it."""
    accelerator = cfg.trainer.accelerator
    if accelerator in (Accelerator.gpu, Accelerator.cuda) or (
            accelerator == Accelerator.auto and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def is_main_process() -> bool:
    """Rank 0 of a data-parallel run (or a plain run): the one process that writes files.
    Lightning's rank covers its own launcher (LOCAL_RANK), torchrun (RANK) and SLURM tasks."""
    return rank_zero_only.rank == 0


def find_device(device: str | torch.device | None, key: str = "device") -> torch.device:
    """`device` (default: the CPU) if this machine has it, else ConfigError naming `key`."""
    try:
        found = torch.device(device if device is not None else "cpu")
        torch.empty(0, device=found)
    except (RuntimeError, AssertionError) as exc:  # a bad name, or CUDA absent
        reason = str(exc).strip().splitlines()[0][:80]
        raise ConfigError(key, str(device), f"not a device of this machine ({reason}); e.g. "
                          "cpu, cuda, cuda:1") from None
    return found
