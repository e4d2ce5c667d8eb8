"""Sweeps (heads side by side == separate probe runs), grid handling, and the logistic-regression / k-NN baselines."""
import csv
import json

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, make_synthetic_cache, run_cli
from dinoprobe import cache
from dinoprobe.baselines import fit_logreg_batched, fit_logreg_sklearn, knn_scores, logreg_protocol
from dinoprobe.errors import DinoprobeError
from dinoprobe.sweep import (DINOV3_LINEAR_LRS, dinov3_linear_grid, expand_grid, head_bytes, plan_groups,
                             run_sweep)
from dinoprobe.tensors import load_feature_splits
from dinoprobe.train import TrainConfig, train_head


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache")


@pytest.fixture(scope="module")
def data(synthetic):
    return load_feature_splits(synthetic, "cls")


@pytest.mark.parametrize("grid", [
    {"head": ["linear"], "lr": [1e-3, 1e-1], "optimizer": ["adam", "sgd"], "weight_decay": [0, 1e-3],
     "label_smoothing": [0.0, 0.1]},
    {"head": ["mlp"], "lr": [1e-3, 3e-3], "dropout": [0.0, 0.3], "label_smoothing": [0.0, 0.1],
     "optimizer": ["adamw"]},
])
def test_side_by_side_equals_separate_probe_runs(data, grid):
    configs = expand_grid(grid, TrainConfig(epochs=4, batch_size=64, seed=5, warmup_epochs=1, patience=2))
    outcomes = run_sweep(configs, lambda feature: data, progress=False)
    assert max(o.group_size for o in outcomes) > 1  # really batched
    for cfg, batched in zip(configs, [o.result for o in outcomes]):
        _, _, alone = train_head(data, cfg, progress=False)
        assert [h["val_acc"] for h in batched.history] == [h["val_acc"] for h in alone.history], cfg
        assert batched.best_epoch == alone.best_epoch
        np.testing.assert_allclose(batched.step_losses, alone.step_losses, atol=1e-4)
        for key, value in alone.best_state.items():
            torch.testing.assert_close(batched.best_state[key], value, atol=1e-4, rtol=1e-4)


def test_grid_expansion_and_grouping():
    configs = expand_grid({"head": ["linear", "mlp"], "lr": [1e-3, 1e-2], "hidden": [64, 128],
                           "batch_size": [32, 64]})
    # a linear head ignores hidden: 2 lr x 2 bs linear + 2 lr x 2 hidden x 2 bs mlp
    assert len(configs) == 4 + 8
    groups = plan_groups(configs, dim=32, num_classes=5, n_val=100, max_memory=None)
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2, 2, 2]  # (bs) x (linear, mlp64, mlp128)
    for group in groups:
        assert len({(configs[i].batch_size, configs[i].head, configs[i].hidden) for i in group}) == 1
    one = head_bytes(configs[0], 32, 5, 100)
    small = plan_groups(configs, 32, 5, 100, max_memory=one)
    assert len(small) == len(configs)  # a budget of one head: every head alone, nothing fails


def test_dinov3_preset_is_13_lrs_scaled_by_batch():
    grid = dinov3_linear_grid(1024)
    assert len(grid["lr"]) == 13 and grid["optimizer"] == ["sgd"] and grid["head"] == ["linear"]
    assert grid["lr"][0] == pytest.approx(DINOV3_LINEAR_LRS[0] * 4) and grid["lr"][-1] == pytest.approx(0.4)


def test_unknown_grid_option_and_bad_values():
    with pytest.raises(DinoprobeError, match="unknown grid options"):
        expand_grid({"colour": ["red"]})
    with pytest.raises(DinoprobeError, match="lr must be > 0"):
        expand_grid({"lr": [-1.0]})


def test_sweep_selects_the_best_val_config(data):
    configs = expand_grid({"head": ["linear"], "lr": [1e-6, 1e-2]}, TrainConfig(epochs=3, batch_size=64))
    outcomes = run_sweep(configs, lambda feature: data, progress=False)
    assert outcomes[1].result.best_val_acc > outcomes[0].result.best_val_acc


def test_sweep_cli_writes_table_plot_and_a_best_run(synthetic, tmp_path):
    proc = run_cli("sweep", "--cache", synthetic, "--out", tmp_path / "s", "--head", "linear,mlp",
                   "--lr", "1e-3,1e-2", "--epochs", 3, "--batch-size", 64, check=True)
    assert "val_top1" in proc.stdout and "4 configs trained" in proc.stdout
    with open(tmp_path / "s" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    vals = [float(r["val_top1"]) for r in rows]
    assert len(rows) == 4 and vals == sorted(vals, reverse=True)
    assert {"head", "lr", "weight_decay", "best_epoch", "val_top1", "group_seconds"} <= set(rows[0])
    assert len(json.loads((tmp_path / "s" / "results.json").read_text())) == 4
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((tmp_path / "s" / "best" / "metrics.json").read_text())
    assert best["val"]["top1"] == pytest.approx(vals[0]) and "test" in best
    raw = torch.load(tmp_path / "s" / "best" / "head.pt", weights_only=True)
    assert raw["head"]["kind"] == rows[0]["head"]


def test_sweep_cli_usage_errors(synthetic, tmp_path):
    for args in (["--lr", "-0.1"], ["--head", "transformer"], ["--lr", "fast"], ["--max-memory", "lots"]):
        proc = run_cli("sweep", "--cache", synthetic, "--out", tmp_path / "s", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)


# ------------------------------------------------------------------------------------------------ baselines
def test_batched_logreg_agrees_with_sklearn(synthetic):
    train, test = cache.load(synthetic, "train", "cls"), cache.load(synthetic, "test", "cls")
    cs = [1e-4, 1e-2, 1.0, 100.0]
    mean, std = train["cls"].mean(0), train["cls"].std(0)
    x_tr, x_te = (train["cls"] - mean) / std, (test["cls"] - mean) / std
    w, b, _ = fit_logreg_batched(torch.tensor(x_tr), torch.tensor(train["label"]), 6, cs)
    ws, bs = fit_logreg_sklearn(x_tr, train["label"], cs)
    xt, yt = torch.tensor(x_te), torch.tensor(test["label"])
    ours = ((xt @ w.transpose(1, 2) + b[:, None]).argmax(-1) == yt).float().mean(1)
    reference = ((xt @ ws.transpose(1, 2) + bs[:, None]).argmax(-1) == yt).float().mean(1)
    assert (ours - reference).abs().max() <= 0.002  # within 0.2 accuracy points, every C


def test_logreg_protocol_picks_c_on_val_and_refits(data):
    fit = logreg_protocol(data, cs=(1e-6, 1e-3, 1.0))
    assert fit["best_c"] == [1e-6, 1e-3, 1.0][int(np.argmax(fit["val_accuracy_per_c"]))]
    assert fit["best_c"] != 1e-6 and fit["weight"].shape == (6, 32)


def test_logreg_cli_gives_a_head_that_predict_format_accepts(synthetic, tmp_path):
    proc = run_cli("logreg", "--cache", synthetic, "--out", tmp_path / "l", "--c-grid", "0.01,1", check=True)
    assert "best C" in proc.stdout
    metrics = json.loads((tmp_path / "l" / "metrics.json").read_text())
    assert {"val", "test", "best_c", "val_accuracy_per_c"} <= set(metrics) and 0 < metrics["test"]["top1"] <= 1
    from dinoprobe.runs import load_head_file

    assert load_head_file(tmp_path / "l").spec.kind == "linear"


def test_knn_matches_sklearn_weighted_neighbours(synthetic):
    from sklearn.neighbors import KNeighborsClassifier

    train, val = cache.load(synthetic, "train", "cls"), cache.load(synthetic, "val", "cls")
    scores = knn_scores(torch.tensor(train["cls"]), torch.tensor(train["label"]), torch.tensor(val["cls"]), 6,
                        ks=(10, 20), max_block=1000)  # tiny blocks: the chunked path is what is tested
    for k in (10, 20):
        reference = KNeighborsClassifier(n_neighbors=k, metric="cosine",
                                         weights=lambda d: np.exp((1 - d) / 0.07)).fit(train["cls"], train["label"])
        np.testing.assert_array_equal(scores[k].argmax(1).numpy(), reference.predict(val["cls"]))


def test_knn_cli(synthetic, tmp_path):
    proc = run_cli("knn", "--cache", synthetic, "--out", tmp_path / "k", "--k", "5,10,1000", check=True)
    metrics = json.loads((tmp_path / "k" / "metrics.json").read_text())
    assert metrics["k"] in (5, 10, 600) and set(metrics["top1_per_k"]["val"]) == {"5", "10", "600"}
    assert "chosen k" in proc.stdout
    assert_clean_error(run_cli("knn", "--cache", tmp_path / "nope", "--out", tmp_path / "k"), "does not exist")
