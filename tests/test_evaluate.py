"""`dinoprobe evaluate`: every protocol on every cache, one table holding the numbers the single commands give, and
an interrupted run resumed without recomputing finished protocols."""
import json

import pytest

from dinoprobe.runs import evaluate as evaluate_module

from conftest import assert_clean_error, make_synthetic_cache, run_cli

QUICK = ["--epochs", 1, "--epoch-length", 5]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    return [make_synthetic_cache(base / name, n=(150, 60, 60), dim=8, num_classes=3, seed=seed)
            for seed, name in enumerate(("alpha", "beta"))]


def test_the_table_holds_what_the_single_commands_give(caches, tmp_path):
    proc = run_cli("evaluate", "--cache", caches[0], "--cache", caches[1], "--out", tmp_path / "e", "--shots", "2",
                   "--tries", 2, *QUICK, check=True)
    assert "| cache |" in proc.stdout
    for bar in ("sweep: 13 heads", "logreg: 45 C values", "k-NN: val", "logreg: refit on train"):  # their progress
        assert f"\n{bar}" in proc.stderr, proc.stderr
    table = json.loads((tmp_path / "e" / "results.json").read_text())
    assert table["protocol"] == "dinov3" and [r["cache"] for r in table["rows"]] == ["alpha", "beta"]
    import dinoprobe

    assert table["environment"]["packages"]["dinoprobe"] == dinoprobe.__version__  # what produced the table
    assert (tmp_path / "e" / "results.csv").read_text().startswith("cache,model,weights")
    cache, row = caches[1], table["rows"][1]  # one row: every row is computed by the same code
    alone = tmp_path / f"alone-{cache.name}"
    run_cli("sweep", "--cache", cache, "--out", alone / "linear", "--preset", "dinov3-linear", *QUICK, check=True)
    run_cli("logreg", "--cache", cache, "--out", alone / "logreg", "--protocol", "dinov3", check=True)
    run_cli("knn", "--cache", cache, "--out", alone / "knn", check=True)
    run_cli("logreg", "--cache", cache, "--out", alone / "few", "--protocol", "dinov3", "--shots", 2, "--tries", 2,
            check=True)
    linear = json.loads((alone / "linear" / "best" / "metrics.json").read_text())
    logreg = json.loads((alone / "logreg" / "metrics.json").read_text())
    knn = json.loads((alone / "knn" / "metrics.json").read_text())
    few = json.loads((alone / "few" / "metrics.json").read_text())["few_shot"]["test"]
    assert row["linear_test_top1"] == linear["test"]["top1"] and row["linear_val_top1"] == linear["val"]["top1"]
    assert row["logreg_test_top1"] == logreg["test"]["top1"] and row["logreg_C"] == logreg["best_c"]
    assert {k: row[f"knn_test_top1_k{k}"] for k in knn["top1_per_k"]["test"]} == knn["top1_per_k"]["test"]
    assert (row["fewshot_2_test_top1_mean"], row["fewshot_2_test_top1_std"]) == (few["top1_mean"], few["top1_std"])
    assert row["linear_overrides"] == json.dumps({"epoch_length": 5, "epochs": 1})
    assert row["transform"] == "timm" and row["weights"] == "random"


def test_further_test_caches_are_scored_by_the_linear_protocols_best_head(caches, tmp_path):
    """DINOv3's test_datasets: the best head (chosen on val) scored on each test cache, a column per cache named
    after its folder; --restrict-classes scores a cache of fewer classes (ImageNet-R's 200) over its own. The
    reference is the best head's tensors applied by hand to the test features (DINOv3's linear input: the CLS token
    and the patch mean, concatenated) and scikit-learn's accuracy."""
    import numpy as np
    import torch
    from sklearn.metrics import accuracy_score

    from dinoprobe.cache import store

    from conftest import make_synthetic_cache

    shifted = make_synthetic_cache(tmp_path / "shifted", n=(80,), dim=8, num_classes=3, splits=("test",), seed=7)
    fewer = make_synthetic_cache(tmp_path / "fewer", n=(80,), dim=8, num_classes=2, splits=("val",), seed=8)
    out = tmp_path / "e"
    proc = run_cli("evaluate", "--cache", caches[0], "--out", out, "--test-cache", shifted, "--test-cache",
                   f"alpha={fewer}", "--restrict-classes", *QUICK, check=True)
    assert "alpha: the linear head on fewer" in proc.stderr
    table = json.loads((out / "results.json").read_text())
    row = table["rows"][0]
    assert table["test_caches"]["alpha"] == {"shifted": {"cache": str(shifted), "split": "test"},
                                             "fewer": {"cache": str(fewer), "split": "val"}}
    state = torch.load(out / "alpha" / "linear" / "best" / "head.pt", weights_only=True)["classifier_state_dict"]
    for cache_dir, split, classes in ((shifted, "test", 3), (fewer, "val", 2)):
        rows = store.load(cache_dir, split, features=("cls", "patch_mean"))
        x = np.concatenate([rows["cls"], rows["patch_mean"]], 1).astype(np.float64)
        logits = x @ state["0.weight"].double().numpy().T + state["0.bias"].double().numpy()
        expected = accuracy_score(rows["label"], logits[:, :classes].argmax(1))
        assert row[f"linear_{cache_dir.name}_top1"] == pytest.approx(expected), cache_dir.name
        assert (out / "alpha" / f"linear-{cache_dir.name}" / "predictions.csv").is_file()
    assert row["restrict_classes"] is True


def test_an_interrupted_evaluate_resumes_without_recomputing_finished_protocols(caches, tmp_path, monkeypatch):
    run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK, check=True)
    before = json.loads((tmp_path / "e" / "results.json").read_text())
    # a kill before k-NN finished: its run directory never appeared, and no table was written
    import shutil

    shutil.rmtree(tmp_path / "e" / "alpha" / "knn")
    for name in ("results.csv", "results.json", "results.md"):
        (tmp_path / "e" / name).unlink()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished protocol was computed again")

    monkeypatch.setattr(evaluate_module, "run_sweep", must_not_run)
    monkeypatch.setattr(evaluate_module, "run_logreg", must_not_run)
    run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK, check=True)
    after = json.loads((tmp_path / "e" / "results.json").read_text())
    assert after["rows"] == before["rows"] and after["protocol"] == before["protocol"]


def test_a_finished_run_damaged_since_is_named_on_resume(caches, tmp_path):
    """A resume reads the finished protocols' metrics back: edited or damaged since, they were a KeyError."""
    run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK, check=True)
    metrics = tmp_path / "e" / "alpha" / "logreg" / "metrics.json"
    good = metrics.read_text()
    for damaged in ('{"val": {}}', "[1, 2]", "[" * 200_000 + "]" * 200_000):
        metrics.write_text(damaged)
        proc = run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK)
        assert_clean_error(proc, "alpha/logreg", "rerun the same `dinoprobe evaluate`")
    metrics.write_text(good)
    run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK, check=True)


def test_evaluate_refuses_a_bad_request_before_training(caches, tmp_path):
    proc = run_cli("evaluate", "--cache", tmp_path / "nope", "--out", tmp_path / "e")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", "--protocol", "imagenet").returncode == 2
    assert run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", "--shots", "zero").returncode == 1
    proc = run_cli("evaluate", "--cache", caches[0], "--out", caches[0] / "eval")
    assert proc.returncode == 1 and "overlaps the cache" in proc.stderr and not (caches[0] / "eval").exists()


def test_a_second_evaluate_on_the_same_out_waits_for_none_and_names_the_first(caches, tmp_path):
    """A job submitted twice: the second would race the first for the same protocol runs. The lock is taken as
    another process would (flock locks an open file, so this process's second open conflicts too)."""
    import os

    from dinoprobe.cache.store import FolderLock

    with FolderLock(tmp_path / "e", what="evaluation"):
        proc = run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK)
        assert_clean_error(proc, f"another dinoprobe process (pid {os.getpid()}) is writing")
        assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [".lock"]  # nothing trained
    run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK, check=True)
    assert not (tmp_path / "e" / ".lock").exists()


def test_runs_of_another_cache_are_never_reused(caches, tmp_path):
    """Resuming into an OUT that holds another cache's runs under the same name is refused, not mixed in."""
    import shutil

    run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK, check=True)
    other = tmp_path / "elsewhere" / "alpha"  # same folder name, different content
    shutil.copytree(caches[1], other)
    proc = run_cli("evaluate", "--cache", other, "--out", tmp_path / "e", *QUICK)
    assert proc.returncode == 1 and "runs of another cache" in proc.stderr and "Traceback" not in proc.stderr


def test_every_cache_is_checked_before_any_cache_is_trained(caches, tmp_path, monkeypatch):
    """The suite takes hours per cache: a broken, repeated or multi-label (with --shots) cache given last is refused
    before the first one is trained, and nothing is written."""
    from conftest import make_synthetic_cache

    def must_not_run(*args, **kwargs):
        raise AssertionError("trained before every cache was checked")

    monkeypatch.setattr(evaluate_module, "run_sweep", must_not_run)
    broken = make_synthetic_cache(tmp_path / "broken", n=(30, 12, 12), dim=8, num_classes=3)
    next(broken.glob("val/shard-*.h5")).unlink()
    tags = make_synthetic_cache(tmp_path / "tags", n=(30, 12, 12), dim=8, num_classes=3)
    manifest = json.loads((tags / "manifest.json").read_text())
    (tags / "manifest.json").write_text(json.dumps({**manifest, "task": "multilabel"}))  # all the check reads
    for last, message in [(broken, "failed verification"), (caches[0], "given twice"), (tags, "multi-label")]:
        out = tmp_path / f"e-{last.name}"
        proc = run_cli("evaluate", "--cache", caches[0], "--cache", last, "--out", out, "--shots", "2", *QUICK)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()


def test_every_test_cache_is_checked_before_anything_trains(caches, tmp_path, monkeypatch):
    """A test cache the best head could not be scored on is refused before the hours of training, naming why."""
    from conftest import make_synthetic_cache

    def must_not_run(*args, **kwargs):
        raise AssertionError("trained before every test cache was checked")

    monkeypatch.setattr(evaluate_module, "run_sweep", must_not_run)

    def test_cache(name, **kwargs):
        return make_synthetic_cache(tmp_path / name, **{"n": (20,), "dim": 8, "num_classes": 3, "splits": ("test",),
                                                        **kwargs})

    other_weights = test_cache("other-weights", fingerprint_changes={"weights": {"source": "x", "sha256": "other"}})
    same_name = test_cache("a/shifted"), test_cache("b/shifted")
    cls_only = test_cache("cls-only")
    manifest = json.loads((cls_only / "manifest.json").read_text())
    (cls_only / "manifest.json").write_text(json.dumps({**manifest, "features": ["cls"]}))  # all the check reads
    for given, *message in [
        (["--test-cache", other_weights], "another backbone or transform"),
        (["--test-cache", test_cache("more-classes", num_classes=4)], "class(es) the head was not trained on: class_3"),
        (["--test-cache", test_cache("full", n=(20, 10, 10), splits=("train", "val"))], "has no test split"),
        (["--test-cache", test_cache("no-rows", n=(0,))], "holds no rows"),
        (["--test-cache", cls_only], "has no ['patch_mean'] features"),
        (["--test-cache", caches[0]], "is the cache", "itself"),
        (["--test-cache", same_name[0], "--test-cache", same_name[1]], "both named 'shifted'"),
        (["--test-cache", test_cache("c/test")], "its column would be the evaluated cache's own linear_test_"),
        (["--test-cache", tmp_path / "missing"], "does not exist"),
        (["--cache", caches[1], "--test-cache", same_name[0]], "CACHE=PATH with CACHE one of: alpha, beta"),
    ]:
        out = tmp_path / "e"
        proc = run_cli("evaluate", "--cache", caches[0], *given, "--out", out, *QUICK)
        assert_clean_error(proc, *message)
        assert not out.exists(), given


def test_a_protocol_that_cannot_fit_in_memory_is_refused_before_any_trains(caches, tmp_path, monkeypatch):
    """k-NN holds a similarity block beside its features; found short of memory when it starts, the linear sweep and
    logistic regression before it had already run (hours, on a real cache). Every protocol's need is checked with
    the caches, before OUT is written."""
    import dinoprobe.cache.arrays as arrays_module

    monkeypatch.setattr(arrays_module, "memory_available", lambda device: 1)
    proc = run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK)
    assert_clean_error(proc, "the linear protocol needs about", "run the protocols one at a time")
    assert not (tmp_path / "e").exists()
    # room for the linear sweep and logistic regression, not for k-NN's search: still nothing trains
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    dim = manifest["feature_dim"]
    rows = sum(s["rows"] for split in ("train", "val") for s in manifest["splits"][split]["shards"])
    loaded, _ = arrays_module.memory_needed(manifest, {"cls+patch_mean": ("cls", "patch_mean")})  # the preset's
    room = loaded + 8 * rows * dim * 4  # ample for copies of the features; far below k-NN's 128 MB block
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: room)
    proc = run_cli("evaluate", "--cache", caches[0], "--out", tmp_path / "e", *QUICK)
    assert_clean_error(proc, "the k-NN protocol needs about")
    assert not (tmp_path / "e").exists()


def test_logistic_regression_s_solver_is_counted_before_any_protocol_trains(tmp_path, monkeypatch):
    """With many classes, logistic regression's L-BFGS (rows x classes in float64) needs more than anything else
    evaluate runs; its own check refused it only after the linear sweep had run. Room for the linear sweep and
    k-NN's search, not for the solver: nothing trains, and the message names logistic regression."""
    import dinoprobe.cache.arrays as arrays_module
    from dinoprobe.estimators.knn import SEARCH_BYTES
    from dinoprobe.estimators.logreg import problem_bytes

    cache_dir = make_synthetic_cache(tmp_path / "many", n=(22_000, 4000), splits=("train", "val"), dim=8,
                                     num_classes=1000)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    loaded, _ = arrays_module.memory_needed(manifest, {"cls+patch_mean": ("cls", "patch_mean")})
    room = loaded + 8 * 26_000 * 16 * 4 + SEARCH_BYTES  # copies of the features, and k-NN's similarity block
    assert problem_bytes(26_000, 8, 1000) > 1.5 * room
    monkeypatch.setattr(arrays_module, "memory_available", lambda device: room)
    proc = run_cli("evaluate", "--cache", cache_dir, "--out", tmp_path / "e", *QUICK)
    assert_clean_error(proc, "the logistic regression protocol needs about")
    assert not (tmp_path / "e").exists()
