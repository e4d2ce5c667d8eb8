"""Caches larger than memory: train features streamed shard by shard give the in-memory result for that order."""
import json

import numpy as np
import pytest
import torch

from dinoprobe import Probe, Sweep
from dinoprobe.cache.arrays import load_cache
from dinoprobe.cache.stream import streaming_order
from dinoprobe.train.loop import TrainConfig, train_heads
from dinoprobe.train.sources import InMemory

import processes
from conftest import assert_clean_error, make_synthetic_cache, run_cli

ROW_BYTES = 32 * 4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("stream") / "cache", n=(600, 200, 200), shard_rows=70)


def test_a_small_budget_streams_instead_of_loading(sharded):
    data = load_cache(sharded, "cls", max_memory=150 * ROW_BYTES)
    assert data.x["train"] is None and data.stream is not None and len(data.stream) == 600
    assert data.stream.buffer_shards == 2  # two 70-row shards fit a 150-row budget
    assert load_cache(sharded, "cls", max_memory=10**9).stream is None


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
    streamed = load_cache(sharded, "cls", max_memory=150 * ROW_BYTES)
    in_memory = load_cache(sharded, "cls")
    a, = train_heads([cfg], streamed.X_train, streamed.y_train, streamed.X_val, streamed.y_val, 6)
    class InStreamOrder(InMemory):  # the in-memory source, visiting rows in the streamed split's order
        def order(self, n, generator):
            return streamed.stream.order(n, generator)

    b, = train_heads([cfg], InStreamOrder(in_memory.X_train), in_memory.y_train, in_memory.X_val,
                     in_memory.y_val, 6)
    np.testing.assert_allclose(a.step_losses, b.step_losses, atol=1e-5)
    assert [h["val_acc"] for h in a.history] == [h["val_acc"] for h in b.history]


def test_heads_side_by_side_stream_too(sharded):
    data = load_cache(sharded, "cls", max_memory=150 * ROW_BYTES)
    configs = [TrainConfig(head="linear", lr=lr, epochs=2, batch_size=64) for lr in (1e-3, 1e-2)]
    together = train_heads(configs, data.X_train, data.y_train, data.X_val, data.y_val, 6)
    alone, = train_heads(configs[1:], data.X_train, data.y_train, data.X_val, data.y_val, 6)
    assert together[1].group_size == 2
    np.testing.assert_allclose(together[1].step_losses, alone.step_losses, atol=1e-4)
    search = Sweep(Probe(head="linear", epochs=2, batch_size=64), param_grid={"lr": [1e-3, 1e-2]})
    search.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
    assert search.best_score_ == max(r.best_val_acc for r in together)


def test_probe_cli_with_a_tiny_budget_says_it_streamed(sharded, tmp_path):
    proc = run_cli("probe", "--cache", sharded, "--out", tmp_path / "r", "--max-memory", "10KB", "--epochs", 2,
                   check=True)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test"]["n"] == 200
    assert "streamed from disk (9 shards, 1 per read-ahead buffer" in proc.stdout
    assert json.loads((tmp_path / "r" / "run.json").read_text())["train_features"]["mode"] == "streamed"
    proc = run_cli("probe", "--cache", sharded, "--out", tmp_path / "m", "--max-memory", "1GB", "--epochs", 2,
                   check=True)
    assert "held in memory" in proc.stdout
    proc = run_cli("sweep", "--cache", sharded, "--out", tmp_path / "s", "--max-memory", "10KB", "--epochs", 1,
                   "--lr", "1e-3,1e-2", check=True)
    assert "streamed from disk" in proc.stdout
    assert json.loads((tmp_path / "s" / "run.json").read_text())["train_features"]["mode"] == "streamed"
    for bad in ("0", "-1GB", "lots", "0.0001B"):
        assert run_cli("probe", "--cache", sharded, "--out", tmp_path / "x", "--max-memory", bad).returncode == 2


def test_each_shard_is_hashed_once_while_read(sharded, monkeypatch):
    """No separate hashing pass: loading two features and streaming three epochs hashes each shard once."""
    import hashlib

    from dinoprobe.cache import store as cache_module
    from dinoprobe.cache.arrays import load_features

    hashed = []

    class CountingHashlib:
        @staticmethod
        def sha256(data=b""):
            hashed.append(len(data))
            return hashlib.sha256(data)

    monkeypatch.setattr(cache_module, "hashlib", CountingHashlib)
    monkeypatch.setattr(cache_module, "sha256_file", lambda *a: pytest.fail("a separate full-file hashing pass"))
    loaded = load_features(sharded, ["cls", "cls+patch_mean"], max_memory=150 * ROW_BYTES)
    entries = [e for s in cache_module.read_manifest(sharded)["splits"].values() for e in s["shards"]]
    shard_sizes = {e["bytes"] for e in entries}

    def shard_hashes():  # the manifest's own fingerprint is hashed too: count hashes of shard-sized data
        return sum(size in shard_sizes for size in hashed)

    assert shard_hashes() == len(entries)
    data = loaded["cls"]
    train_heads([TrainConfig(head="linear", epochs=3, batch_size=64)], data.X_train, data.y_train, data.X_val,
                data.y_val, 6)
    assert shard_hashes() == len(entries)  # streamed epochs re-read columns, not hashes


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("feature", ["cls", "cls+patch_mean"])
def test_the_memory_a_load_takes_is_what_the_check_expects(tmp_path, dtype, feature):
    """The up-front check is only as good as its estimate: a load peaked at 3.8 times the features it kept (parts
    then their concatenation, a float32 copy of each stored column, torch.isfinite's |x| temporary), which the
    check did not count, so a load it let through could still meet the OOM killer. tracemalloc sees numpy's and
    Python's allocations, where the features live."""
    import tracemalloc

    from dinoprobe.cache.arrays import memory_needed

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(4000, 500, 500), dim=384, shard_rows=256, dtype=dtype)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    host, _ = memory_needed(manifest, {feature: tuple(feature.split("+"))})
    load_cache(cache_dir, feature)  # once first: what the first load imports is not the load's memory
    tracemalloc.start()
    try:
        data = load_cache(cache_dir, feature)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = sum(x.numel() * 4 for x in data.x.values())
    assert peak <= host <= 1.3 * peak, (peak / kept, host / kept)


def test_features_that_cannot_fit_in_memory_are_refused_naming_max_memory(tmp_path, monkeypatch):
    """Past the available memory Linux's OOM killer would end the load with no message: refused up front, naming
    --max-memory, which then streams the train split instead."""
    import dinoprobe.cache.arrays as arrays_module
    from dinoprobe.errors import DinoprobeError

    from conftest import assert_clean_error

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(3000, 100, 100), dim=256, shard_rows=256)
    need, _ = arrays_module.memory_needed(json.loads((cache_dir / "manifest.json").read_text()), {"cls": ("cls",)})
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: need - 1)
    with pytest.raises(DinoprobeError, match="--max-memory"):
        load_cache(cache_dir, "cls")
    proc = run_cli("probe", "--cache", cache_dir, "--out", tmp_path / "r", "--epochs", 1)
    assert_clean_error(proc, "need about", "--max-memory")
    assert not (tmp_path / "r").exists()
    import re

    budget = re.search(r"--max-memory (\d+[KMG]?B)", proc.stderr).group(1)  # the advice, taken as given, works
    assert budget == f"{(need - 1) // 2 // 2**10}KB"
    run_cli("probe", "--cache", cache_dir, "--out", tmp_path / "r", "--epochs", 1, "--max-memory", budget, check=True)
    assert load_cache(cache_dir, "cls", max_memory=1000).stream is not None  # streamed: no refusal
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: need)
    assert load_cache(cache_dir, "cls").x["train"].shape == (3000, 256)


def test_non_finite_rows_are_found_across_blocks_as_numpy_finds_them():
    """The check goes a block of rows at a time (torch.isfinite's |x| temporary is as large as its input): rows on
    either side of a block boundary, and a 3-D tensor of views, are found as numpy's isfinite finds them."""
    from dinoprobe.cache.stream import non_finite_rows

    x = np.random.default_rng(0).normal(size=(10_000, 3, 4)).astype(np.float32)
    for row, value in ((0, np.nan), (4095, np.inf), (4096, -np.inf), (8191, np.nan), (9_999, np.nan)):
        x[row, row % 3, row % 4] = value
    expected = np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(1))
    assert non_finite_rows(torch.from_numpy(x)).tolist() == expected.tolist() == [0, 4095, 4096, 8191, 9999]
    plain = np.ascontiguousarray(x[:, 0])  # 2-D: the rows whose bad value sits in view 0
    assert non_finite_rows(torch.from_numpy(plain)).tolist() == np.flatnonzero(~np.isfinite(plain).all(1)).tolist() \
        == [0, 4095, 9999]
    assert non_finite_rows(torch.zeros(0, 8)).tolist() == []


def test_training_s_copies_are_counted_before_the_cache_is_read(tmp_path, monkeypatch):
    """Standardised or L2-normalised training holds a normalised copy of the train and val features besides them,
    logistic regression a float64 copy, k-NN an L2-normalised one: a check that counted the load only let a run
    through that the OOM killer then ended mid-training. With memory for the load but not that copy, they are
    refused up front, and an unnormalised probe runs."""
    import dinoprobe.cache.arrays as arrays_module

    from conftest import assert_clean_error

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(3000, 1000, 100), dim=256, shard_rows=64)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    load_only, _ = arrays_module.memory_needed(manifest, {"cls": ("cls",)})
    copy = (3000 + 1000) * 256 * 4  # the normalised train and val rows, float32
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: load_only + copy // 2)
    for args in (("probe", "--normalize", "standardize", "--epochs", 1), ("probe", "--normalize", "l2", "--epochs", 1),
                 ("sweep", "--normalize", "none,standardize", "--epochs", 1),
                 ("logreg", "--normalize", "none"), ("knn",)):  # a float64 copy; the L2-normalised bank
        proc = run_cli(*args, "--cache", cache_dir, "--out", tmp_path / "r")
        # logistic regression and k-NN hold the train split in memory: no --max-memory to advise
        streamable = args[0] in ("probe", "sweep")
        assert_clean_error(proc, "need about", "--max-memory" if streamable else "--shots")
        assert streamable or "--max-memory" not in proc.stderr
    run_cli("probe", "--normalize", "none", "--cache", cache_dir, "--out", tmp_path / "r", "--epochs", 1, check=True)
    # memory for the load and one copy, not for val's evaluation each epoch beside it (a chunk of 1,000 rows'
    # logits and hidden activations): refused; with it, a normalising probe runs, k-NN's similarity blocks do not fit
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: load_only + copy)
    assert_clean_error(run_cli("probe", "--normalize", "standardize", "--cache", cache_dir, "--out", tmp_path / "r2",
                               "--epochs", 1), "need about")
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: load_only + copy + 1000 * 4 * (6 + 256))
    run_cli("probe", "--normalize", "standardize", "--cache", cache_dir, "--out", tmp_path / "r2", "--epochs", 1,
            check=True)
    assert_clean_error(run_cli("knn", "--cache", cache_dir, "--out", tmp_path / "r3"), "need about")


def test_logistic_regression_s_solver_is_counted_before_the_cache_is_read(tmp_path, monkeypatch):
    """Full-batch L-BFGS holds the logits, probabilities and gradient of every row it fits, in float64: with many
    classes that is far more than the features (here 200 classes x 2,400 rows against 8 numbers a row). Counted up
    front, a logreg that could not run is refused before the cache is read; a few-shot one, which fits a draw of K
    images per class, is counted by that draw and runs."""
    import dinoprobe.cache.arrays as arrays_module
    from dinoprobe.estimators.logreg import problem_bytes

    from conftest import assert_clean_error

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(2000, 400), splits=("train", "val"), dim=8, num_classes=200)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    with_copies, _ = arrays_module.memory_needed(manifest, {"cls": ("cls",)}, working_copies=2)
    solver = problem_bytes(2000 + 400, 8, 200)  # the refit's rows: train and val
    assert solver > 5 * with_copies
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: with_copies + solver // 2)
    proc = run_cli("logreg", "--cache", cache_dir, "--out", tmp_path / "r")
    assert_clean_error(proc, "need about", "--shots")
    assert not (tmp_path / "r").exists()
    # a 2-shot draw fits 400 rows: its solver needs a fifth as much, and runs
    assert problem_bytes(2 * 200, 8, 200) < solver / 4 and with_copies < solver / 4
    run_cli("logreg", "--cache", cache_dir, "--out", tmp_path / "r", "--shots", 2, "--tries", 1, check=True)


def test_standardising_features_takes_one_copy_of_them_and_leaves_them_as_they_were():
    """(x - mean) / std made two temporaries the size of the features (the difference, then the quotient): at the
    peak, two copies besides the features. Measured in a fresh process, as the resident peak (64 MB tensors are
    mapped and unmapped whole, so the peak is exact to a page)."""

    code = """
import torch
from dinoprobe.train.heads import Normalizer
# VmHWM, the peak resident size of this process's memory (getrusage's maxrss keeps the parent's across exec)
peak = lambda: int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
features = lambda: torch.randn(40_000, 400, generator=torch.Generator().manual_seed(0))
mean, std = torch.randn(400), torch.rand(400) + 0.5
norm = Normalizer("standardize", mean, std)
x = features()  # the last and largest allocation: the resident peak is now where the process stands
base = peak()
out = norm(x)
grown = (peak() - base) * 1024 / x.nbytes
assert torch.equal(x, features())
torch.testing.assert_close(out, (features() - mean) / std, rtol=0, atol=0)
print(grown)
"""
    proc = processes.run(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 0.9 < float(proc.stdout) < 1.5


@pytest.mark.parametrize("kind", ["none", "standardize", "l2"])
def test_normalising_into_a_buffer_gives_what_a_new_tensor_holds(kind):
    """logistic regression normalises its rows a block at a time into one reused buffer (`out=`)."""
    from dinoprobe.train.heads import Normalizer

    g = torch.Generator().manual_seed(0)
    x, mean, std = torch.randn(50, 12, generator=g), torch.randn(12, generator=g), torch.rand(12, generator=g) + 0.5
    norm = Normalizer(kind, mean, std)
    expected = {"none": x, "standardize": (x - mean) / std, "l2": x / x.norm(dim=1, keepdim=True)}[kind]
    buffer = torch.full((50, 12), float("nan"))
    result = norm(x, out=buffer)
    assert result.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(norm(x), expected)


def test_finding_non_finite_rows_keeps_the_heap_from_growing():
    """A (block,) result per block, kept in a list between the blocks' temporaries, was carved out of the freed
    temporaries, so each block's next ones took new memory: 0.3-0.5 times the features at the peak in about two
    runs of three (it runs on every split a cache loads and every array an estimator is given). One result tensor
    written a block at a time: at most 0.11 in every run. Measured in three fresh processes side by side (the
    resident peak, reset before the call); the largest counts."""

    code = """
import torch
from dinoprobe.cache.stream import non_finite_rows
status = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
torch.set_num_threads(4)
x = torch.randn(160_000, 256, generator=torch.Generator().manual_seed(0))
non_finite_rows(x[:10])
open("/proc/self/clear_refs", "w").write("5")  # the resident peak starts again from here
base = status("VmRSS")
assert non_finite_rows(x).tolist() == []
print((status("VmHWM") - base) / x.nbytes)
"""
    runs = [processes.Process(["-c", code])
            for _ in range(3)]
    results = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in results]
    assert max(float(out) for out, _ in results) < 0.2, results


SCORING_CODE = """
import sys, types
import numpy as np, torch
from dinoprobe import settings
from dinoprobe.estimators.base import _Classifier
from dinoprobe.runs.reports import evaluate
status = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
multilabel, rows, classes = sys.argv[1] == "multi", int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
weight = torch.randn(16, classes, generator=g) * 0.1
class Linear(_Classifier):  # an estimator's predict_proba over (rows, classes) scores, as a head gives them
    def __init__(self):
        pass
    def _scores(self, X):
        return X @ weight
estimator = Linear()
estimator.classes_, estimator.n_features_in_, estimator.multilabel_ = np.arange(classes), 16, multilabel
estimator.thresholds_ = np.full(classes, 0.5)
x = torch.randn(rows, 16, generator=g)
y = (torch.rand(rows, classes, generator=g) < 0.05).float() if multilabel else torch.randint(0, classes, (rows,), generator=g)
split = lambda n: types.SimpleNamespace(x={"test": x[:n]}, y={"test": y[:n]}, classes=[str(c) for c in range(classes)],
                                        num_classes=classes, multilabel=multilabel)
evaluate(estimator, split(50), ("test",))  # what a first scoring imports is not its memory
open("/proc/self/clear_refs", "w").write("5")  # the resident peak starts again from here
base = status("VmRSS")
evaluate(estimator, split(rows), ("test",))
print(status("VmHWM") - base)
"""


def test_scoring_a_split_with_many_classes_stays_within_its_budget():
    """A run's metrics scored 8,192 rows at a time whatever the classes: 24 bytes a (row, class) cell at the peak
    (the logits, their float64 copy, the probabilities), 0.96 GB at 5,000 classes and 1.9 GB at iNaturalist's
    10,000 — after hours of training, and counted by no check. The rows per block now follow the classes, so a
    block stays near settings.SCORING_BYTES (256 MB). Measured in a fresh process."""

    from dinoprobe import settings

    proc = processes.run(["-c", SCORING_CODE, "single", "20000", "5000"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert settings.SCORING_BYTES / 2 < int(proc.stdout) < 1.3 * settings.SCORING_BYTES


def test_the_memory_check_counts_what_scoring_a_multilabel_split_takes():
    """Multi-label metrics rank every row of a class, so a split is scored whole; the check counts
    MULTILABEL_SCORE_CELL_BYTES a (row, class) cell, which must bound the measured peak, and not by a wide
    margin."""

    from dinoprobe import settings

    rows, classes = 20_000, 500
    proc = processes.run(["-c", SCORING_CODE, "multi", str(rows), str(classes)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    counted = rows * classes * settings.MULTILABEL_SCORE_CELL_BYTES
    assert 0.5 * counted < int(proc.stdout) <= counted  # 0.63-0.89 of it here


def test_evaluating_val_while_training_stays_within_its_budget():
    """Each epoch a head's val predictions are computed a chunk of rows at a time: 8,192 rows of a 10,000-class
    head's logits were 0.3 GB beside the training. With many classes the chunk has fewer rows, so its logits and
    hidden activations stay within settings.VAL_CHUNK_BYTES (64 MB). Measured in a fresh process, the smaller of two
    runs' resident peaks: one run in a full suite once read 163 MB where 36-83 MB is usual here."""

    code = """
import torch
from dinoprobe import Probe
status = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
g = torch.Generator().manual_seed(0)
y, y_val = torch.arange(10_000).repeat(2), torch.randint(0, 10_000, (8192,), generator=g)
x, x_val = torch.randn(len(y), 16, generator=g), torch.randn(8192, 16, generator=g)
Probe(head="linear", epochs=1).fit(x[:10_000], y[:10_000], X_val=x_val[:10], y_val=y_val[:10])  # imports
peaks = []
for _ in range(2):
    open("/proc/self/clear_refs", "w").write("5")  # the resident peak starts again from here
    base = status("VmRSS")
    Probe(head="linear", epochs=2).fit(x, y, X_val=x_val, y_val=y_val)
    peaks.append(status("VmHWM") - base)
print(min(peaks), *peaks)
"""
    proc = processes.run(["-W", "ignore", "-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak, *peaks = map(int, proc.stdout.split())
    assert peak < 8192 * 10_000 * 4 / 2, peaks  # was 1.05 times it (328 MB)


def test_scoring_is_counted_before_the_cache_is_read(tmp_path, monkeypatch):
    """With 10,000 classes a block of scores is 0.26 GB while the features (8 numbers a row) are a megabyte:
    memory for the features but not for scoring the run is refused up front, not after training."""
    import dinoprobe.cache.arrays as arrays_module

    from conftest import assert_clean_error

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(2000, 2000), splits=("train", "val"), dim=8,
                                     num_classes=10_000)
    room = 100 * 2**20  # a hundred times the features; less than a block of 1,118 rows' scores at 10,000 classes
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: room)
    for command in ("probe", "knn"):  # (logistic regression's solver needs more: 0.9 GiB, counted since 981c5fd)
        assert_clean_error(run_cli(command, "--cache", cache_dir, "--out", tmp_path / "r"), "need about 0.3 GiB")
    assert not (tmp_path / "r").exists()
    # a multi-label split is scored whole: 2,000 rows x 1,000 classes, 0.16 GiB counted (a single-label block of
    # the same rows, 0.04 GiB, would fit)
    tagged = make_synthetic_cache(tmp_path / "m", n=(2000, 2000), splits=("train", "val"), dim=8, num_classes=1000,
                                  multilabel=True)
    for command in ("probe", "logreg"):  # (k-NN's similarity block, 0.25 GiB, is more than that)
        assert_clean_error(run_cli(command, "--cache", tagged, "--out", tmp_path / "r"), "need about 0.2 GiB")
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: 2**30)
    run_cli("knn", "--cache", tagged, "--out", tmp_path / "r", "--k", "5", check=True)  # the cache is sound


def test_streamed_training_holds_about_its_budget(tmp_path):
    """--max-memory bounds the train features held at once: a read-ahead buffer was made from a list of its shards
    and then copied whole in shuffled order (5.4 times the budget at the peak, here), so following the refusal's
    advice in a container still met the OOM killer. Measured in a fresh process: the peak resident size while a streamed
    probe trains, over the resident size after the cache was read."""

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(65_536, 500), dim=512, shard_rows=2048, splits=("train", "val"))
    budget = 64 * 2**20  # 16 shards of 4 MB: the whole train split is 128 MB
    code = f"""
from dinoprobe import Probe, load_cache
status = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
data = load_cache({str(cache_dir)!r}, "cls", max_memory={budget})
assert data.stream is not None and data.stream.buffer_shards == 16
Probe(head="linear", epochs=1).fit(data.x["val"], data.y["val"])  # what a first fit imports is not training's
base = status("VmRSS")
Probe(head="linear", epochs=2).fit(data.X_train, data.y_train, X_val=data.x["val"], y_val=data.y["val"])
print((status("VmHWM") - base) / {budget})
"""
    proc = processes.run(["-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 1.6  # the buffer, shards read into it, the allocator's leftovers: 1.2-1.3 (was 5.4)


def test_knn_s_search_takes_what_the_check_counts():
    """k-NN holds an L2-normalised copy of the train features and a block of similarities with topk's work on it
    (about 150 MB whatever the split's size): the up-front check counts both (a 1.1 GB container ended k-NN on
    200,000 rows with the OOM killer when it counted the copy alone). Its count bounds the measured peak, and not
    by a wide margin."""

    from dinoprobe.estimators.knn import SEARCH_BYTES, neighbour_bytes

    code = """
import torch
from dinoprobe.estimators.knn import KNN
status = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
g = torch.Generator().manual_seed(0)
y, y_val = torch.randint(0, 5, (100_000,), generator=g), torch.randint(0, 5, (1000,), generator=g)
x, x_val = torch.randn(100_000, 128, generator=g), torch.randn(1000, 128, generator=g)
KNN().fit(x[:300], y[:300])  # what a first fit imports is not the search's
base = status("VmRSS")
KNN().fit(x, y, X_val=x_val, y_val=y_val)
print(status("VmHWM") - base, x.nbytes)
"""
    proc = processes.run(["-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr
    grown, copy = map(int, proc.stdout.split())
    assert copy + SEARCH_BYTES / 2 < grown <= copy + SEARCH_BYTES + neighbour_bytes(1000, 200)  # val's, kept by fit


def test_knn_s_check_counts_the_neighbours_its_ks_keep(tmp_path, monkeypatch):
    """fit keeps each val row's nearest max(k): 12 bytes each, 120 MB for 2,000 val rows at k = 5,000. The
    up-front check counts them for the ks asked for: with room for k = 200's, `--k 10` runs and `--k 5000` is
    refused before the cache is read."""
    import dinoprobe.cache.arrays as arrays_module
    from dinoprobe.estimators.knn import SEARCH_BYTES

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(6000, 2000), splits=("train", "val"), dim=8, num_classes=3)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    room, _ = arrays_module.memory_needed(manifest, {"cls": ("cls",)}, working_copies=1, working_bytes=SEARCH_BYTES)
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: room + 2000 * 200 * 12 + (8 << 20))
    run_cli("knn", "--cache", cache_dir, "--out", tmp_path / "small", "--k", "10", check=True)
    proc = run_cli("knn", "--cache", cache_dir, "--out", tmp_path / "large", "--k", "5000")
    assert_clean_error(proc, "in cpu memory", "fit on fewer rows")
    assert not (tmp_path / "large").exists()
