"""A finished run, read back: `saelab.load_run(RUN_DIR)` and what a run's networks can do.

`load_run` changes no file (not a byte, not a modification time) and needs the data set only when
the splits are asked for (`run.splits()`, checked against the checksums the run recorded). It
refuses an unfinished or damaged run with a ConfigError naming the missing or unreadable file: it
checks that every stage of the saved config has a checkpoint, readable, whose fingerprint is the
one that config and the recorded data give, and that each consumed the stages it names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from saelab.config.job import load_saved
from saelab.config.rules import validate
from saelab.data.splits import Splits, load_splits, scale_pixels
from saelab.errors import ConfigError
from saelab.experiment.devices import find_device
from saelab.experiment.fingerprints import fingerprinted
from saelab.experiment.reuse import RUN_DIR, finished_stages
from saelab.experiment.stages import plan
from saelab.experiment.state import Experiment
from saelab.nn.evaluation import in_chunks
from saelab.nn.networks import LayerAutoEncoder, StackedNet
from saelab.runs.folder import RunFolder

PRETRAINED = "pretrain"  # the stack of pretrained encoders, as the probe reads it


@dataclass
class Run:
    """A run's config, metrics and networks (on `device`, in eval mode): the pretrained
    autoencoders, and every classifier stage's network by stage name."""

    dir: Path
    cfg: DictConfig
    metrics: dict
    autoencoders: list[LayerAutoEncoder]
    networks: dict[str, StackedNet]
    device: torch.device
    data: Splits | None = None

    @classmethod
    def of(cls, run_dir: Path, experiment: Experiment, metrics: dict) -> Run:
        """The run the recipe has just trained (with its data)."""
        return cls(run_dir, experiment.cfg, metrics, experiment.autoencoders,
                   experiment.networks, experiment.device, experiment.data)

    def splits(self) -> Splits:
        """The run's train/val/test splits, loaded once and checked against its data files."""
        if self.data is None:
            data = load_splits(self.cfg.data, self.cfg.seed, self.device)
            recorded = self.metrics["data"].get("checksums")
            if recorded != data.checksums:
                raise ConfigError("data", data.source, f"files differ from those the run was "
                                  f"trained on ({recorded})")
            self.data = data
        return self.data

    @cached_property
    def pretrained(self) -> StackedNet:
        """The stacked pretrained encoders (no head), as the probe reads them."""
        return StackedNet.from_autoencoders(self.autoencoders, None).to(self.device).eval()

    @property
    def stacks(self) -> dict[str, StackedNet]:
        """Every stack of encoders by name: the pretrained one, and each network that trained
        its encoders (fine-tuning, scratch)."""
        trained = {s.name: self.networks[s.name] for s in plan(self.cfg)
                   if s.trains_encoders and s.name in self.networks}
        return {PRETRAINED: self.pretrained, **trained}

    def network(self, model: str) -> StackedNet:
        if model not in self.networks:
            raise ConfigError("model", model, f"allowed: {', '.join(self.networks)}")
        return self.networks[model]

    def inputs(self, images) -> torch.Tensor:
        """Raw images (integers 0..255, N x 28 x 28 or N x 784; NumPy or torch) as the networks'
        inputs: the run's pixel transform, on its device."""
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ConfigError("images", f"dtype {x.dtype}", "must be raw pixels: integers "
                              "0..255 (uint8)")
        if x.ndim not in (2, 3) or (x.ndim == 2 and x.shape[1] != 784) or (
                x.ndim == 3 and tuple(x.shape[1:]) != (28, 28)):
            raise ConfigError("images", f"shape {tuple(x.shape)}", "must be N x 28 x 28 or "
                              "N x 784")
        if x.dtype != torch.uint8 and len(x) and (int(x.min()) < 0 or int(x.max()) > 255):
            raise ConfigError("images", f"values {int(x.min())}..{int(x.max())}",
                              "must be pixels in 0..255")
        return scale_pixels(x.to(torch.uint8).to(self.device), self.cfg.data.pixels)

    @torch.no_grad()
    def encode(self, images, layer: int | None = None, stack: str = PRETRAINED,
               scaled: bool = False, maps: bool = False) -> torch.Tensor:
        """The codes of hidden layer `layer` (1 = first; default the top) computed by `stack`
        (one of `stacks`: the pretrained encoders, or the encoders of fine-tuning or scratch), in
        the recipe's own chunks (bit-identical to its evaluation on the CPU), one flat row per
        image. `scaled`: `images` are model inputs already, not raw pixels. `maps`: in the
        layer's shape instead (`shape`: (channels, side, side) for a convolutional layer)."""
        n = len(self.autoencoders)
        layer = n if layer is None else layer
        if not 1 <= layer <= n:
            raise ConfigError("layer", layer, f"must be in 1..{n}")
        stacks = self.stacks
        if stack not in stacks:
            raise ConfigError("stack", stack, f"allowed: {', '.join(stacks)}")
        net = stacks[stack]
        codes = in_chunks(lambda x: net.codes(x, layer), images if scaled else self.inputs(images))
        return codes.unflatten(1, self.shape(layer)) if maps else codes

    def shape(self, layer: int | None = None) -> tuple[int, ...]:
        """The shape of one image's codes at hidden layer `layer` (default the top): (units,)
        for a dense layer, (channels, side, side) for a convolutional one."""
        return tuple(self.autoencoders[(layer or len(self.autoencoders)) - 1].shapes[1])

    @torch.no_grad()
    def predict_proba(self, images, model: str = "finetune", scaled: bool = False
                      ) -> torch.Tensor:
        """Class probabilities of a classifier stage (`finetune`, `scratch`, `probe`,
        `baseline`, ...)."""
        net = self.network(model)
        return in_chunks(lambda x: net(x).softmax(1), images if scaled else self.inputs(images))

    def predict(self, images, model: str = "finetune", scaled: bool = False) -> torch.Tensor:
        """Predicted classes (0..k-1, in the order of `data.classes`)."""
        return self.predict_proba(images, model, scaled).argmax(1)




def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> Run:
    """A finished run read from its folder, without writing anything (see the module's doc)."""
    device = find_device(device)
    path = Path(run_dir).expanduser().resolve()
    cfg = load_saved(path)
    validate(cfg, files=False)
    folder = RunFolder(path, writer=False)
    try:
        metrics = json.loads(folder.metrics_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(RUN_DIR, str(run_dir), f"unreadable metrics.json ({exc})") from None
    checksums = metrics.get("data", {}).get("checksums")
    if checksums is None:
        raise ConfigError(RUN_DIR, str(run_dir), "was written before fingerprints (saelab 0.1) "
                          "or is damaged: metrics.json records no data checksums")
    plan = fingerprinted(cfg, checksums)
    saved = finished_stages(folder, plan)
    experiment = Experiment(cfg, device)
    for name, planned in plan.items():  # each stage rebuilds its network, in order
        planned.stage.rebuild(experiment, planned.settings, saved[name]["state_dict"])
    return Run(path, cfg, metrics, experiment.autoencoders, experiment.networks, device)
