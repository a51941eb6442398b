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
from torch import nn

from saelab.autoencoder import AutoEncoder, classifier, stack_encoders
from saelab.config import load_saved, validate
from saelab.data import Splits, load_splits, scale_pixels
from saelab.errors import ConfigError
from saelab.evaluation import encode
from saelab.runfolder import RunFolder, expected

STACKS = ("pretrained", "finetuned", "scratch")
MODELS = ("finetuned", "scratch", "probe", "baseline")


@dataclass
class Run:
    """A run's config, metrics and networks (on `device`, in eval mode)."""

    dir: Path
    cfg: DictConfig
    metrics: dict
    autoencoders: list[AutoEncoder]
    baseline: nn.Sequential
    probe: nn.Sequential
    finetuned: nn.Sequential
    scratch: nn.Sequential | None
    device: torch.device
    data: Splits | None = None

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
    def pretrained(self) -> nn.Sequential:
        """The stacked pretrained encoders (Linear, activation, ...), as the probe reads them."""
        return stack_encoders(self.autoencoders).to(self.device).eval()

    def body(self, stack: str) -> nn.Sequential:
        if stack not in STACKS or (stack == "scratch" and self.scratch is None):
            have = [s for s in STACKS if s != "scratch" or self.scratch is not None]
            raise ConfigError("stack", stack, f"allowed: {', '.join(have)}")
        return {"pretrained": self.pretrained, "finetuned": self.finetuned[0],
                "scratch": self.scratch[0] if self.scratch is not None else None}[stack]

    def network(self, model: str) -> nn.Sequential:
        nets = {"finetuned": self.finetuned, "scratch": self.scratch, "probe": self.probe,
                "baseline": self.baseline}
        if nets.get(model) is None:
            raise ConfigError("model", model, f"allowed: "
                              f"{', '.join(m for m in MODELS if nets[m] is not None)}")
        return nets[model]

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
    def encode(self, images, layer: int | None = None, stack: str = "pretrained",
               scaled: bool = False) -> torch.Tensor:
        """The codes of hidden layer `layer` (1 = first; default the top) computed by `stack`:
        the first `layer` Linear+activation pairs of the pretrained, fine-tuned or scratch body,
        in the pipeline's own chunks (bit-identical to its evaluation on the CPU). `scaled`:
        `images` are model inputs already, not raw pixels."""
        n = len(self.autoencoders)
        layer = n if layer is None else layer
        if not 1 <= layer <= n:
            raise ConfigError("layer", layer, f"must be in 1..{n}")
        net = self.body(stack)[: 2 * layer]
        return encode(net, images if scaled else self.inputs(images))

    @torch.no_grad()
    def predict_proba(self, images, model: str = "finetuned", scaled: bool = False
                      ) -> torch.Tensor:
        """Class probabilities of a classifier (`finetuned`, `scratch`, `probe`, `baseline`)."""
        net = self.network(model)
        return encode(lambda x: net(x).softmax(1), images if scaled else self.inputs(images))

    def predict(self, images, model: str = "finetuned", scaled: bool = False) -> torch.Tensor:
        """Predicted classes (0..k-1, in the order of `data.classes`)."""
        return self.predict_proba(images, model, scaled).argmax(1)


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> Run:
    """A finished run read from its folder, without writing anything (see the module's doc)."""
    path = Path(run_dir).expanduser().resolve()
    cfg = load_saved(path)
    validate(cfg, files=False)
    folder = RunFolder(path, writer=False)
    try:
        metrics = json.loads(folder.metrics_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("RUN_DIR", str(run_dir), f"unreadable metrics.json ({exc})") from None
    checksums = metrics.get("data", {}).get("checksums")
    if checksums is None:
        raise ConfigError("RUN_DIR", str(run_dir), "was written before fingerprints (saelab 0.1) "
                          "or is damaged: metrics.json records no data checksums")
    device = torch.device(device) if device is not None else torch.device("cpu")
    states = {name: saved["state_dict"]
              for name, saved in folder.finished(expected(cfg, checksums)).items()}
    return build(path, cfg, metrics, states, device)


def build(path: Path, cfg: DictConfig, metrics: dict, states: dict[str, dict],
          device: torch.device) -> Run:
    """The run's networks from their state dicts."""
    sizes, k = list(cfg.model.sizes), len(cfg.data.classes)
    aes = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        ae = AutoEncoder(d_in, d_out, cfg.model.activation, cfg.model.tied)
        ae.load_state_dict(states[f"pretrain_layer{i}"])
        aes.append(ae.to(device).eval())

    def deep(state: dict | None) -> nn.Sequential | None:
        if state is None:
            return None
        net = classifier(stack_encoders(aes), sizes[-1], k)
        net.load_state_dict(state)
        return net.to(device).eval()

    baseline = classifier(nn.Identity(), sizes[0], k)
    baseline.load_state_dict(states["baseline"])
    probe = classifier(stack_encoders(aes), sizes[-1], k)
    probe[1].load_state_dict({key[2:]: v for key, v in states["probe"].items()})
    return Run(path, cfg, metrics, aes, baseline.to(device).eval(), probe.to(device).eval(),
               deep(states["finetune"]), deep(states.get("scratch")), device)
