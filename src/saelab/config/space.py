"""Tuning the compared stages with the same budget: each trial is a setting drawn from one search
space (`tune.space`, in Hydra's sweep syntax), and the trial kept is the one the labelled
validation images choose; the test set is only ever reported.

Trial t of every arm draws the same value of a key they share (a seeded draw per seed, trial and
key): the arms differ in what they are, not in the luck of their draws. A key only some arms have
(fine-tuning's `encoder_lr_scale`, the semi-supervised stage's `threshold`) is drawn for those
within the same trials: it comes out of their own budget.
"""

from __future__ import annotations

import math
import random
import zlib
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

from saelab.errors import ConfigError


def parse(space: list[str]) -> dict[str, Any]:
    """{key: its sweep (choice, interval or range)} of `key=sweep` items, or ConfigError."""
    parser, out = OverridesParser.create(), {}
    for item in space:
        try:
            (override,) = parser.parse_overrides([item])
        except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors, made one line
            raise ConfigError("tune.space", item, str(exc).splitlines()[0]) from None
        sweep = override.value()
        if not isinstance(sweep, ChoiceSweep | IntervalSweep | RangeSweep):
            raise ConfigError("tune.space", item, "must be key=choice(...), key=interval(a,b), "
                              "key=tag(log, interval(a,b)) or key=range(a,b)")
        out[override.key_or_group] = sweep
    return out


def draw(sweep: Any, rng: random.Random) -> Any:
    """One value of a sweep: uniform over a choice or a range (its end excluded, as Python's),
    uniform over an interval, or log-uniform with the `log` tag."""
    if isinstance(sweep, ChoiceSweep):
        return rng.choice(list(sweep.list))
    if isinstance(sweep, RangeSweep):
        return rng.choice(list(range(int(sweep.start), int(sweep.stop), int(sweep.step or 1))))
    low, high = float(sweep.start), float(sweep.end)
    if "log" in sweep.tags:
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def extremes(sweep: Any) -> list[Any]:
    """The values that bound what a sweep can draw: every choice, an interval's ends, a range's
    first and last values."""
    if isinstance(sweep, ChoiceSweep):
        return list(sweep.list)
    if isinstance(sweep, RangeSweep):
        values = list(range(int(sweep.start), int(sweep.stop), int(sweep.step or 1)))
        return values[:1] + values[-1:]
    return [float(sweep.start), float(sweep.end)]


def trial_settings(space: list[str], keys: set[str], seed: int, trials: int
                   ) -> list[dict[str, Any]]:
    """The settings of each trial of a stage whose group has `keys`: {key: value} of the space's
    keys it has, the same values as every other stage's trial of that number."""
    sweeps = parse(space)
    out = []
    for t in range(trials):
        drawn = {}
        for key in sorted(sweeps):
            if key in keys:
                rng = random.Random(zlib.crc32(f"{seed}/{t}/{key}".encode()))
                drawn[key] = draw(sweeps[key], rng)
        out.append(drawn)
    return out
