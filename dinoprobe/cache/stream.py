"""Training on caches larger than memory: train features read from HDF5 one read-ahead buffer at a time.

An epoch visits the shards in a shuffled order, a buffer of a few shards at a time, rows shuffled within the
buffer (`streaming_order`). Given the same order, streamed and in-memory training see identical batches, so they
give identical results (tested). Labels and the val/test splits stay in memory: they are small.
"""
from __future__ import annotations

import numpy as np
import torch

from dinoprobe.cache.specs import columns, select, width
from dinoprobe.errors import DinoprobeError


def non_finite_rows(x: torch.Tensor, chunk: int = 1 << 12) -> torch.Tensor:
    """The indices of the rows of `x` that hold NaN or infinity, a block of rows at a time: torch.isfinite on a
    float tensor builds a float temporary (|x|) as large as its input, which on all of a split's features took
    1.6 times their memory again at once."""
    rows = x.flatten(1)  # (N, everything else): a view of contiguous features
    finite = torch.empty(len(x), dtype=torch.bool, device=x.device)
    for i in range(0, len(x), chunk):  # into one result: a small one per block, kept between the blocks'
        torch.all(torch.isfinite(rows[i:i + chunk]), 1, out=finite[i:i + chunk])  # temporaries, fragments the heap
    return torch.nonzero(~finite)[:, 0]


def check_finite(cache_dir, where: str, x: torch.Tensor, paths=None) -> None:
    """Refuse cached features that hold NaN or infinity, naming how many rows, the first one's input and the two
    causes: a damaged cache, or a backbone run in fp16, where DINOv3's activations overflow."""
    bad = non_finite_rows(x)
    if len(bad):
        first = int(bad[0])
        example = f" (the first: {paths[first]})" if paths is not None else ""
        raise DinoprobeError(f"cache {cache_dir}: {len(bad)} {where} row(s) hold NaN or infinite features"
                             f"{example}; rebuild it with `dinoprobe features ... --overwrite` (with --precision bf16 "
                             "or fp32 if it was extracted in fp16, where DINOv3's activations overflow)")


def no_epoch_length(kind: str, epoch_length: int | None) -> None:
    if epoch_length is not None:
        raise DinoprobeError(f"epoch_length (a fixed number of iterations per epoch) needs in-memory features; "
                             f"{kind} read one pass per epoch — drop epoch_length (--epoch-length), or drop "
                             "--views / raise --max-memory so the features are held in memory")


def streaming_plan(rows_per_shard: list[int], buffer_shards: int, generator: torch.Generator):
    """One epoch: [(shards of a read-ahead buffer, their global rows shuffled)], buffers in shuffled shard order."""
    offsets = np.concatenate([[0], np.cumsum(rows_per_shard)]).astype(np.int64)
    shard_order = torch.randperm(len(rows_per_shard), generator=generator).tolist()
    plan = []
    for i in range(0, len(shard_order), buffer_shards):
        group = shard_order[i:i + buffer_shards]
        rows = torch.cat([torch.arange(int(offsets[s]), int(offsets[s + 1])) for s in group])
        plan.append((group, rows[torch.randperm(len(rows), generator=generator)]))
    return plan


def streaming_order(rows_per_shard: list[int], buffer_shards: int, generator: torch.Generator) -> torch.Tensor:
    """The global row order of `streaming_plan`: what in-memory training must follow to match streaming."""
    plan = streaming_plan(rows_per_shard, buffer_shards, generator)
    return torch.cat([rows for _, rows in plan]) if plan else torch.zeros(0, dtype=torch.long)


class StreamedTrainSplit:
    """The train split's features on disk, read a buffer of shards at a time within a memory budget."""

    def __init__(self, reader, manifest: dict, parts: tuple[str, ...], max_bytes: int, device):
        self.reader, self.parts, self.device = reader, tuple(parts), device  # reader: a cache.ShardReader
        self.columns = columns(self.parts)
        shards = sorted(manifest["splits"]["train"]["shards"], key=lambda s: s["start"])
        self.entries = [s for s in shards if s["rows"]]
        self.rows = [s["rows"] for s in shards if s["rows"]]
        self.dim = width(self.parts, manifest["feature_dim"])
        shard_bytes = max(self.rows) * self.dim * 4
        self.buffer_shards = max(1, int(max_bytes // shard_bytes))  # at least one shard, whatever the budget

    def __len__(self) -> int:
        return sum(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    def order(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if n != len(self):
            raise DinoprobeError(f"streaming order for {n} rows asked of a split with {len(self)}")
        return streaming_order(self.rows, self.buffer_shards, generator)

    def _read(self, shard: int) -> torch.Tensor:
        x = torch.from_numpy(select(self.reader.read(self.entries[shard], self.columns), self.parts))
        check_finite(self.reader.cache_dir, self.entries[shard]["file"], x)  # as in-memory training checks
        return x

    def epochs(self, normalizer, batch_size: int, seed: int, epoch_length: int | None = None):
        """A training source (train.sources.TrainSource): every epoch the batches of `streaming_order`."""
        no_epoch_length("streamed features", epoch_length)
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield ((normalizer(x), rows) for x, rows in self.iterate_batches(batch_size, generator))

    def iterate_batches(self, batch_size: int, generator: torch.Generator):
        """(features, rows) batches of `streaming_order`, holding only the current buffer's shards in memory: one
        buffer per read-ahead group, the previous group's partial batch at its front and each shard read into its
        rows, from which each batch is gathered (a permuted copy of the buffer would double the budget)."""
        offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        carry_x = torch.zeros(0, self.dim)  # a partial batch carried into the next buffer, so batches match the order
        carry_y = torch.zeros(0, dtype=torch.long)
        plan = streaming_plan(self.rows, self.buffer_shards, generator)
        for number, (group, rows) in enumerate(plan):
            buffer = torch.empty(len(carry_x) + len(rows), self.dim)
            buffer[:len(carry_x)] = carry_x
            start_in_buffer = np.zeros(len(self.rows), dtype=np.int64)
            start_in_buffer[group] = len(carry_x) + np.concatenate([[0], np.cumsum([self.rows[s] for s in group])[:-1]])
            for s in group:
                buffer[start_in_buffer[s]:start_in_buffer[s] + self.rows[s]] = self._read(s)
            shard = np.searchsorted(offsets, rows.numpy(), side="right") - 1
            order = torch.cat([torch.arange(len(carry_x)),
                               torch.from_numpy(start_in_buffer[shard] + rows.numpy() - offsets[shard])])
            y = torch.cat([carry_y, rows])
            buffer = buffer.to(self.device, non_blocking=True)  # on a GPU: one copy, then batches gathered there
            order, y = order.to(self.device), y.to(self.device)
            last = number == len(plan) - 1
            full = len(y) if last else len(y) - len(y) % batch_size
            for begin in range(0, full, batch_size):
                yield buffer.index_select(0, order[begin:begin + batch_size]), y[begin:begin + batch_size]
            carry_x, carry_y = buffer.index_select(0, order[full:]).cpu(), y[full:].cpu()

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) std per dimension in one streamed pass, for --normalize standardize."""
        total = torch.zeros(self.dim, dtype=torch.float64)
        squares = torch.zeros(self.dim, dtype=torch.float64)
        for shard in range(len(self.entries)):
            x = self._read(shard).double()
            total += x.sum(0)
            squares += (x * x).sum(0)
        n = len(self)
        mean = total / n
        var = (squares - n * mean * mean) / max(1, n - 1)
        return mean.float().to(self.device), var.clamp_min(0).sqrt().float().to(self.device)
