"""What the stages of one run hand each other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from saelab.data.splits import Splits
from saelab.nn.networks import LayerAutoEncoder, StackedNet


@dataclass
class Experiment:
    """What the stages of one run hand each other, in the order they run: the pretrained
    autoencoders, the inputs the last one learned from, and every network trained so far. A
    finished run read back (`data` None) holds the same networks."""

    cfg: DictConfig
    device: torch.device
    data: Splits | None = None
    autoencoders: list[LayerAutoEncoder] = field(default_factory=list)
    initial: list[dict] = field(default_factory=list)  # each encoder's initial weights
    layer_inputs: tuple[torch.Tensor, ...] = ()  # the train/val/test inputs of the last layer
    layer_codes: tuple[torch.Tensor, ...] = ()  # and its codes of them, computed once
    stack_codes: tuple[torch.Tensor, ...] = ()  # the same, where they are the frozen stack's
    networks: dict[str, StackedNet] = field(default_factory=dict)  # by stage name
    scores: dict[str, float | None] = field(default_factory=dict)  # validation accuracy
    head_init: dict | None = None  # the probe's head before training

    @property
    def n_classes(self) -> int:
        return len(self.cfg.data.classes)

    def labelled(self) -> tuple[torch.Tensor, ...]:
        """The labelled training and validation images and labels: x, y, val x, val y."""
        return (*self.data.labelled("train"), *self.data.labelled("val"))
