"""Seeded random sub-streams.

What must not move another part's numbers when it is added or changed (a stage's corruption of its
validation inputs, scratch's and semi-supervised training, each layer's probe, the labelled subset,
each epoch's shuffle) draws from a random stream of its own, seeded from the run's seed and a salt
of its own: `substream(seed, salt)`. A stage's checkpoint records the random state at its end
(restored when it is loaded, so that a resumed run goes on exactly as an uninterrupted one) and a
digest of the state at its start.
"""

from __future__ import annotations

import hashlib

import torch

STRIDE = 100_003  # between the streams of consecutive seeds (as saelab 0.1 seeded them)


def substream(seed: int, salt: int) -> int:
    """The seed of the random stream named `salt` in a run of seed `seed`."""
    return seed * STRIDE + salt


def rng_state() -> dict:
    """The global random-number state (CPU, and CUDA where present) at this point."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def rng_digest() -> str:
    """A short digest of the CPU random-number state: where a stage starts in the stream."""
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
