"""Where training's mini-batches come from. Every source speaks one small protocol (`TrainSource`), so the loop
never asks what kind it has: features in memory (`InMemory`), each head its own rows of them (`PerHeadRows`,
few-shot tries), one cached augmented view per image per epoch (`cache.arrays.AugmentedViews`), or shards streamed
from disk (`cache.stream.StreamedTrainSplit`).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from dinoprobe.cache.arrays import endless_batches, shuffled_batches

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@runtime_checkable
class TrainSource(Protocol):
    """Train features of shape (rows, width) that yield mini-batches.

    `epochs(normalizer, batch_size, seed, epoch_length)` returns an endless iterator of epochs; each epoch yields
    (features, rows): normalised features (B, D) and their positions in the split (B,) (per-head sources: (N, B, D)
    and (N, B)). An epoch is one pass over the rows, or with `epoch_length` that many full batches from an endless
    shuffled stream (DINOv3's linear evaluation). The batch order comes from a generator seeded by `seed`, so a
    source reproduces its order whatever else runs.
    `moments()` gives the clean features' mean and standard deviation (for --normalize standardize)."""

    shape: tuple[int, int]

    def __len__(self) -> int: ...

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def epochs(self, normalizer, batch_size: int, seed: int, epoch_length: int | None = None) -> Iterator[Batches]: ...


class InMemory:
    """An (N, D) tensor: normalised once, a random permutation per epoch cut into batches."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.shape = tuple(x.shape)

    def __len__(self) -> int:
        return len(self.x)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.mean(0), self.x.std(0)

    def order(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(n, generator=generator)

    def epochs(self, normalizer, batch_size: int, seed: int, epoch_length: int | None = None) -> Iterator[Batches]:
        x = normalizer(self.x)
        for rows in self.epoch_rows(batch_size, seed, epoch_length):
            yield shuffled_batches(x, rows, batch_size)

    def epoch_rows(self, batch_size: int, seed: int, epoch_length: int | None = None) -> Iterator[torch.Tensor]:
        """Each epoch's rows in batch order, one CPU tensor: its consecutive `batch_size` slices are the batches
        (a CUDA graph replays one epoch over rows copied into the same buffer)."""
        generator = torch.Generator().manual_seed(seed)
        if epoch_length is None:
            while True:
                yield self.order(len(self), generator)
        stream = endless_batches(len(self), batch_size, generator, self.order)
        while True:
            yield torch.cat(list(itertools.islice(stream, epoch_length)))


class PerHeadRows:
    """Each of N heads trains on its own rows of one (N_rows, D) tensor (few-shot tries): one shared order over
    positions 0..n-1, mapped through each head's rows, so each head sees exactly the batches it would see trained
    alone on x[rows[i]]."""

    def __init__(self, x: torch.Tensor, rows: torch.Tensor):
        self.x, self.rows = x, rows.to(x.device)  # rows (N, n)
        self.shape = (rows.shape[1], x.shape[1])

    def __len__(self) -> int:
        return self.rows.shape[1]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:  # the first head's rows (plan_groups makes them one set)
        x = self.x[self.rows[0]]
        return x.mean(0), x.std(0)

    def epochs(self, normalizer, batch_size: int, seed: int, epoch_length: int | None = None) -> Iterator[Batches]:
        generator = torch.Generator().manual_seed(seed)
        x = normalizer(self.x)
        n = self.rows.shape[1]
        stream = endless_batches(n, batch_size, generator) if epoch_length else None
        while True:
            batches = (itertools.islice(stream, epoch_length) if stream is not None
                       else torch.randperm(n, generator=generator).split(batch_size))
            yield ((x[self.rows[:, idx]], self.rows[:, idx]) for idx in (i.to(x.device) for i in batches))


def as_train_source(train) -> TrainSource:
    """A tensor becomes `InMemory`; anything already speaking the protocol is used as it is."""
    if isinstance(train, torch.Tensor):
        return InMemory(train)
    if not isinstance(train, TrainSource):
        raise TypeError(f"training features must be a tensor or a TrainSource, got {type(train).__name__}")
    return train
