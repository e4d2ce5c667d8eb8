"""Epochs over fixed buffers, and on CUDA one epoch captured as a CUDA graph and replayed.

Training a head on cached features is launch-bound on a GPU: a step of a linear head is a few dozen kernels of a
few microseconds each, and the host takes longer to launch them than the GPU to run them. A CUDA graph records
one epoch's kernels once and launches them all with one call per epoch. A graph replays the same kernels on the
same memory, so everything that changes from epoch to epoch lives in buffers the graph reads: the epoch's row
order (copied in before each replay) and the optimizer's step-dependent numbers (learning rate, Adam's
bias corrections) for each of its steps. What the epoch leaves for its bookkeeping (losses, predictions) are the
graph's outputs, refreshed by every replay.

The first epoch runs eagerly over the same buffers (on the stream the capture will use: it also initialises
cuBLAS there), the second is captured and replayed, the rest replayed. Dropout masks come from the heads' own
generator, registered with the graph: each replay advances it by what the captured epoch drew, so replay k draws
what eager epoch k would. Without `capture` (a CPU) every epoch runs eagerly over the buffers: the tests hold that
path to the usual one. If capturing fails, training goes on without a graph and says why.
"""
from __future__ import annotations

import warnings

import torch

from dinoprobe.cache.arrays import shuffled_batches

# Whether training on CUDA uses graphs when the caller does not say (train_heads' static_epochs=None). Off until the
# gpu tests (tests/test_gpu.py: graph against step by step, dropout included) have passed on a GPU: until then a
# caller asks for graphs with static_epochs=True.
GRAPHS_BY_DEFAULT = False


class StaticEpochs:
    """An in-memory source's epochs (`InMemory.epoch_rows`, the order `epochs` uses) run by `train_batches(batches,
    step_numbers)` over fixed buffers; `run(step)` trains one epoch starting at global step `step` and returns what
    `train_batches` returned."""

    def __init__(self, source, normalizer, config, steps_per_epoch: int, optimizer, factors: list[float],
                 train_batches, capture: bool, generator: torch.Generator | None = None):
        self.optimizer, self.factors, self.train_batches = optimizer, factors, train_batches
        self.batch_size, self.steps = config.batch_size, steps_per_epoch
        self.x = normalizer(source.x)
        device = self.x.device
        self.orders = source.epoch_rows(config.batch_size, config.seed, config.epoch_length)
        rows = config.epoch_length * config.batch_size if config.epoch_length else len(source)
        self.rows = torch.zeros(rows, dtype=torch.long, device=device)
        self.numbers = torch.zeros(steps_per_epoch, 3, dtype=torch.float32, device=device)
        self.step_numbers = [tuple(row.unbind()) for row in self.numbers]  # 0-d views, read at each step
        self.capture, self.generator = capture, generator  # generator: the dropout masks', if any
        self.stream = torch.cuda.Stream(device) if capture else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.record = None

    def run(self, step: int):
        self.rows.copy_(next(self.orders))
        numbers = [self.optimizer.scalars(f) for f in self.factors[step:step + self.steps]]
        self.numbers.copy_(torch.tensor(numbers, dtype=torch.float32))
        if not self.capture:
            return self._epoch()
        with torch.cuda.device(self.x.device):  # the heads' GPU, which need not be the current one (cuda:1)
            return self._graphed_epoch()

    def _graphed_epoch(self):
        if self.graph is not None:
            self.graph.replay()
            return self.record
        self.stream.wait_stream(torch.cuda.current_stream())
        if self.record is None:  # the first epoch, eagerly, on the capture stream (cuBLAS and the allocator warm up)
            with torch.cuda.stream(self.stream):
                self.record = self._epoch()
            torch.cuda.current_stream().wait_stream(self.stream)
            return self.record
        graph = torch.cuda.CUDAGraph()
        try:
            if self.generator is not None:
                graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                record = self._epoch()  # recorded, not run: nothing has changed yet
        except Exception as err:  # noqa: BLE001 - a graph is an optimisation: train on without one
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {str(err)[:200]}); training on "
                          "without graphs", RuntimeWarning, stacklevel=2)
            self.capture = False
            return self._epoch()
        self.graph, self.record = graph, record
        graph.replay()
        return record

    def _epoch(self):
        return self.train_batches(shuffled_batches(self.x, self.rows, self.batch_size), self.step_numbers)
