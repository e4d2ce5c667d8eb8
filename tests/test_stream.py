"""Caches larger than memory: train features streamed shard by shard give the in-memory result for that order."""
import json

import numpy as np
import pytest
import torch

from conftest import make_synthetic_cache, run_cli
from dinoprobe.stream import streaming_order
from dinoprobe.sweep import expand_grid, run_sweep
from dinoprobe.tensors import load_feature_splits
from dinoprobe.train import TrainConfig, train_head

ROW_BYTES = 32 * 4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("stream") / "cache", n=(600, 200, 200), shard_rows=70)


def test_a_small_budget_streams_instead_of_loading(sharded):
    data = load_feature_splits(sharded, "cls", max_memory=150 * ROW_BYTES)
    assert data.x["train"] is None and data.stream is not None and len(data.stream) == 600
    assert data.stream.buffer_shards == 2  # two 70-row shards fit a 150-row budget
    assert load_feature_splits(sharded, "cls", max_memory=10**9).stream is None


def test_streaming_order_visits_every_row_once_buffer_by_buffer():
    rows = [70] * 8
    generator = torch.Generator().manual_seed(0)
    first, second = streaming_order(rows, 2, generator), streaming_order(rows, 2, generator)
    assert sorted(first.tolist()) == list(range(560)) and not torch.equal(first, second)
    shard_of = np.searchsorted(np.cumsum([0] + rows), first.numpy(), side="right") - 1
    blocks = [set(shard_of[i:i + 140]) for i in range(0, 560, 140)]
    assert all(len(b) == 2 for b in blocks)  # each read-ahead buffer holds two whole shards


@pytest.mark.parametrize("normalize,head", [("none", "linear"), ("standardize", "mlp")])
def test_streamed_training_equals_in_memory_training_in_the_same_order(sharded, normalize, head):
    cfg = TrainConfig(head=head, normalize=normalize, epochs=3, batch_size=64, lr=1e-2)
    streamed = load_feature_splits(sharded, "cls", max_memory=150 * ROW_BYTES)
    in_memory = load_feature_splits(sharded, "cls")
    _, _, a = train_head(streamed, cfg, progress=False)
    _, _, b = train_head(in_memory, cfg, progress=False, order_fn=streamed.stream.order)
    np.testing.assert_allclose(a.step_losses, b.step_losses, atol=1e-5)
    assert [h["val_acc"] for h in a.history] == [h["val_acc"] for h in b.history]


def test_sweep_streams_too(sharded):
    data = load_feature_splits(sharded, "cls", max_memory=150 * ROW_BYTES)
    configs = expand_grid({"head": ["linear"], "lr": [1e-3, 1e-2]}, TrainConfig(epochs=2, batch_size=64))
    outcomes = run_sweep(configs, lambda feature: data, progress=False)
    _, _, alone = train_head(data, configs[1], progress=False)
    np.testing.assert_allclose(outcomes[1].result.step_losses, alone.step_losses, atol=1e-4)


def test_probe_cli_with_a_tiny_budget(sharded, tmp_path):
    run_cli("probe", "--cache", sharded, "--out", tmp_path / "r", "--max-memory", "10KB", "--epochs", 2, check=True)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test"]["n"] == 200
