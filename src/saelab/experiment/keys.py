"""The config keys a stage reads, and the guard that keeps it to them.

A stage reads its config through a `View` of exactly the keys it declares, resolved: reading any
other key raises UndeclaredKey, so its fingerprint (saelab.experiment.fingerprints) cannot leave
out something the stage depends on. What the recipe reads beside the stages (where a run runs:
accelerator, devices, the fast path; its figures, logger and progress display) is recorded, never
fingerprinted; tests/test_stages.py checks that none of it changes a trained weight.
"""

from __future__ import annotations

from typing import Any

from saelab.config.schema import leaves
from saelab.config.space import trial_settings

# Keys every stage reads: which images (and with labels, which of them are labelled), and the
# numerics that change results.
DATA = ("seed", "data.name", "data.classes", "data.pixels", "data.val_size", "data.train_limit")
LABEL_KEYS = ("data.labels_per_class", "data.labelled_val_per_class")
NUMERICS = ("trainer.precision", "fastpath.matmul_precision")
CHOICES = {k.path: k.choices for k in leaves() if k.choices is not None}  # keys of an enum


def group_keys(prefix: str, *without: str) -> tuple[str, ...]:
    """Every key of a config group, from the schema, less `without`."""
    return tuple(k.path for k in leaves() if k.path.startswith(f"{prefix}.")
                 and k.path not in without)


class UndeclaredKey(AttributeError):
    """A stage read a config key it does not declare (and so does not fingerprint)."""


class View:
    """The config keys a stage declares, resolved and read like the config (`view.pretrain.lr`,
    `view.model.sizes[1]`, enums as enums); any other key is an UndeclaredKey. (Its own names,
    `get`, `tuning`, `drawn` and `trial`, are no config key's.)"""

    def __init__(self, stage: str, values: dict[str, Any], prefix: str = "",
                 drawn: dict[str, Any] | None = None, trial: int | None = None):
        self._stage, self._values, self._prefix = stage, values, prefix
        self.drawn, self.trial = drawn or {}, trial  # a tuning trial's settings and number

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        path = self._prefix + name
        if path in self._values:
            value = self._values[path]
            enum = CHOICES.get(path)
            return enum(value) if enum is not None and value is not None else value
        if any(k.startswith(f"{path}.") for k in self._values):
            return View(self._stage, self._values, f"{path}.")
        raise UndeclaredKey(f"stage {self._stage} reads {path}, a key it does not declare")

    def __getitem__(self, index: int) -> Any:
        return self.__getattr__(str(index))

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self.__getattr__(name)
        except UndeclaredKey:
            return default

    def tuning(self, group: str, space: list[str], seed: int, count: int) -> list[View]:
        """This view under each of `count` tuning trials: the space's keys that `group` has,
        drawn (saelab.config.space)."""
        keys = {k[len(group) + 1:] for k in self._values if k.startswith(f"{group}.")}
        return [View(self._stage, {**self._values, **{f"{group}.{k}": v for k, v in d.items()}},
                     drawn=d, trial=t)
                for t, d in enumerate(trial_settings(space, keys, seed, count))]

