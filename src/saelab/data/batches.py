"""Minibatches as index slices of tensors that stay on the device, and validation data in chunks."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from saelab.seeds import substream

CHUNK = 10_000  # samples evaluated at once: a whole split's codes, validation chunks


class Minibatches:
    """Lightning's training data: each item is a chunk of shuffled minibatch index slices.

    The tensors stay where they are (CPU or GPU); a minibatch is `x[idx]`, so there is no
    per-sample transform or collation. Handing Lightning a chunk of many minibatches per step keeps
    its per-step machinery out of the hot loop. Under data parallelism each rank takes every
    `world`-th sample of the shared permutation, so ranks see disjoint, equal-sized shards.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int,
                 steps_per_item: int = 0, seed: int = 0, rank: int = 0, world: int = 1,
                 sample_with_replacement: bool = False, steps_per_epoch: int | None = None):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.with_replacement = sample_with_replacement
        self.epoch = 0
        self.steps_per_epoch, self.chunk = steps_per_epoch, steps_per_item

    def shard(self, rank: int, world: int) -> None:
        """Serve rank `rank` of `world` data-parallel processes (known once the Trainer exists)."""
        self.rank, self.world = rank, world

    @property
    def n_local(self) -> int:
        return len(self.x) // self.world

    @staticmethod
    def steps(n: int, batch_size: int, steps_per_epoch: int | None = None) -> int:
        """Optimiser steps in an epoch over `n` samples."""
        return steps_per_epoch or -(-n // batch_size)

    @property
    def n_steps(self) -> int:
        return self.steps(self.n_local, self.batch_size, self.steps_per_epoch)

    @property
    def steps_per_item(self) -> int:
        return self.chunk or self.n_steps

    def __len__(self) -> int:
        return -(-self.n_steps // self.steps_per_item)

    def __iter__(self) -> Iterator[tuple]:
        gen = torch.Generator().manual_seed(substream(self.seed, self.epoch))
        self.epoch += 1
        if self.with_replacement:  # n_steps full minibatches, however few the samples
            perm = torch.randint(len(self.x), (self.n_steps * self.batch_size * self.world,),
                                 generator=gen)
        else:  # at most one pass
            n = min(self.n_steps * self.batch_size, self.n_local) * self.world
            perm = torch.randperm(len(self.x), generator=gen)[:n]
        local = perm[self.rank:: self.world].to(self.x.device)
        slices = local.split(self.batch_size)
        for start in range(0, len(slices), self.steps_per_item):
            yield self.x, self.y, slices[start: start + self.steps_per_item]


class EvalBatches:
    """Validation data for Lightning: a split in a few large chunks (one iterable, not a list,
    which Lightning would read as several dataloaders)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        # An empty split (no validation set) must give no chunks, not one empty chunk.
        pairs = zip(x.split(CHUNK), y.split(CHUNK), strict=True)
        self.chunks = list(pairs) if len(x) else []

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        return iter(self.chunks)
