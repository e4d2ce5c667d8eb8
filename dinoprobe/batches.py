"""Where training's mini-batches come from, the one place where the kinds of train features differ:
features in memory, one augmented view per image per epoch, or shards streamed from disk (stream.py)."""
from __future__ import annotations

from typing import Union

import torch

from dinoprobe.errors import DinoprobeError
from dinoprobe.stream import StreamedTrainSplit


class AugmentedViews:
    """K cached augmented views per train image, (N, K, D), and the clean features (N, D) that normalisation
    statistics come from. Training samples one view per image per epoch."""

    def __init__(self, views: torch.Tensor, clean: torch.Tensor):
        if views.dim() != 3 or clean.dim() != 2 or views.shape[0] != clean.shape[0] \
                or views.shape[2] != clean.shape[1]:
            raise DinoprobeError(f"views {tuple(views.shape)} do not fit clean features {tuple(clean.shape)}; "
                             "expected (N, K, D) and (N, D)")
        self.views, self.clean = views, clean

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.clean.shape)

    def __len__(self) -> int:
        return len(self.clean)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clean.mean(0), self.clean.std(0)

    def to(self, device) -> "AugmentedViews":
        return AugmentedViews(self.views.to(device), self.clean.to(device))


TrainSource = Union[torch.Tensor, AugmentedViews, StreamedTrainSplit]


def sample_views(views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One augmented view per image, uniformly at random: (N, K, D) -> (N, D)."""
    n, k = views.shape[:2]
    choice = torch.randint(k, (n,), generator=generator).to(views.device)
    return views[torch.arange(n, device=views.device), choice]


class BatchStream:
    """One epoch of (normalised features, labels) mini-batches per `epoch()` call, from the run's own generators:
    the batch order from `seed`, the view choice from `seed + 1`, so adding views leaves the order unchanged."""

    def __init__(self, train: TrainSource, labels: torch.Tensor, normalizer, batch_size: int, seed: int,
                 order_fn=None, rows: torch.Tensor | None = None):
        self.train, self.labels, self.normalizer, self.batch_size = train, labels, normalizer, batch_size
        self.rows = rows  # (N, n): each head its own training rows (few-shot tries), one shared order
        self.order_generator = torch.Generator().manual_seed(seed)
        self.view_generator = torch.Generator().manual_seed(seed + 1)
        self.order_fn = order_fn
        # in memory, normalise once rather than every batch
        self.features = normalizer(train) if isinstance(train, torch.Tensor) else None

    def epoch(self):
        if isinstance(self.train, StreamedTrainSplit):
            for x, y in self.train.iterate_batches(self.batch_size, self.order_generator):
                yield self.normalizer(x), y
            return
        x = self.features
        if isinstance(self.train, AugmentedViews):
            x = self.normalizer(sample_views(self.train.views, self.view_generator))
        if self.rows is not None:  # batch positions drawn as for train[rows] alone, mapped through each head's rows
            order = torch.randperm(self.rows.shape[1], generator=self.order_generator).to(x.device)
            for idx in order.split(self.batch_size):
                picked = self.rows[:, idx]  # (N, B)
                yield x[picked], self.labels[picked].t()  # (N, B, D), (B, N)
            return
        n = len(x)
        order = self.order_fn(n, self.order_generator) if self.order_fn \
            else torch.randperm(n, generator=self.order_generator)
        for idx in order.to(x.device, non_blocking=True).split(self.batch_size):
            yield x.index_select(0, idx), self.labels.index_select(0, idx)
