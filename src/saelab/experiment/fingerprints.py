"""Each stage's fingerprint: what its checkpoint must record to stand for it in a config.

A stage's fingerprint hashes the values of the config keys it declares (saelab.experiment.keys),
the data files' checksums, the fingerprints of the stages it consumes and the checkpoint format.
`fingerprinted(cfg, checksums)` gives every stage of the config's plan as a `Planned`: its stage,
those values, and the view of the config it trains under.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from saelab.experiment.keys import View
from saelab.experiment.stages import Stage, plan
from saelab.runs.checkpoints import FORMAT


def plain(value: Any) -> Any:
    """A config value as plain JSON data (enums as their names)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return value.value if isinstance(value, Enum) else value


def key_value(cfg: DictConfig, key: str) -> Any:
    """The resolved value of a stage key; a list element of a null list is null."""
    parent, _, last = key.rpartition(".")
    if last.isdigit():
        items = OmegaConf.select(cfg, parent)
        return None if items is None else plain(items[int(last)])
    return plain(OmegaConf.select(cfg, key, throw_on_missing=True))


def fingerprint(stage: str, values: dict, data: dict, consumes: dict) -> str:
    blob = json.dumps({"format": FORMAT, "stage": stage, "values": values, "data": data,
                       "consumes": consumes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class Planned:
    """A stage as a config plans it: the values of the keys it reads, the checksums of the data
    files, the fingerprints of the stages it consumes, and its own fingerprint."""

    stage: Stage
    values: dict[str, Any]
    data: dict[str, str]
    consumes: dict[str, str]
    fingerprint: str

    @property
    def settings(self) -> View:
        """The config as the stage reads it: its declared keys only."""
        return View(self.stage.name, self.values)

    def header(self) -> dict:
        """What its checkpoint records beside the weights, so that a mismatch can be named."""
        return {"fingerprint": self.fingerprint, "values": self.values, "data": self.data,
                "consumes": self.consumes}


def fingerprinted(cfg: DictConfig, checksums: dict[str, str]) -> dict[str, Planned]:
    """Every stage of `cfg`'s plan, in order, with data files of `checksums`."""
    out: dict[str, Planned] = {}
    for stage in plan(cfg):
        values = {key: key_value(cfg, key) for key in stage.keys}
        consumes = {c: out[c].fingerprint for c in stage.consumes}
        out[stage.name] = Planned(stage, values, checksums, consumes,
                                  fingerprint(stage.name, values, checksums, consumes))
    return out
