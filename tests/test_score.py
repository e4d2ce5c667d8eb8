"""`dinoprobe score`: a trained head scored on another cache (an evaluation set), against scikit-learn's metrics on
logits computed from the head file's tensors by hand; evaluation-only caches; the refusals."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, top_k_accuracy_score

from conftest import SIZE, assert_clean_error, make_folder, make_synthetic_cache, run_cli


def hand_logits(run, x: np.ndarray) -> np.ndarray:
    """A linear head's logits from head.pt's tensors, without dinoprobe's head code."""
    state = torch.load(run / "head.pt", weights_only=True)["classifier_state_dict"]
    return x @ state["0.weight"].numpy().T + state["0.bias"].numpy()


def split_of(cache_dir, split: str):
    from dinoprobe.cache import store

    rows = store.load(cache_dir, split, features="cls")
    return rows["cls"].astype(np.float64), rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A linear head trained on a 6-class synthetic cache."""
    root = tmp_path_factory.mktemp("score")
    train = make_synthetic_cache(root / "train-cache", n=(300, 100, 100))
    run_cli("probe", "--cache", train, "--out", root / "run", "--head", "linear", "--epochs", 5, "--lr", "1e-2",
            check=True)
    return root, train, root / "run"


def test_score_on_an_evaluation_set_is_scikit_learns_metrics_of_the_heads_logits(trained):
    root, _, run = trained
    shifted = make_synthetic_cache(root / "shifted", n=(120,), splits=("test",), seed=7, separation=0.6)
    out = root / "scored"
    proc = run_cli("score", "--run", run, "--cache", shifted, "--out", out, check=True)
    assert "test: top-1" in proc.stdout and "predicted among the head's 6 classes" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    x, rows = split_of(shifted, "test")
    logits, y = hand_logits(run, x), rows["label"]
    assert metrics["n"] == 120
    assert metrics["top1"] == pytest.approx(accuracy_score(y, logits.argmax(1)))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, logits.argmax(1)))
    assert metrics["top5"] == pytest.approx(top_k_accuracy_score(y, logits, k=5, labels=range(6)))
    with open(out / "predictions.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["path"] for r in table] == list(rows["path"])
    assert [r["predicted"] for r in table] == [f"class_{c}" for c in logits.argmax(1)]
    assert [r["label"] for r in table] == [f"class_{c}" for c in y]
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    assert np.allclose([float(r["probability"]) for r in table], softmax.max(1), atol=1e-5)
    assert {p.name for p in out.iterdir()} == {"metrics.json", "run.json", "predictions.csv", "confusion.png"}
    assert json.loads((out / "run.json").read_text())["command"] == "score"
    run_cli("score", "--run", run, "--cache", shifted, "--out", out, "--overwrite", check=True)  # a score run's files


def test_score_on_the_training_caches_test_split_equals_the_runs_own_test_metrics(trained):
    _, train, run = trained
    proc = run_cli("score", "--run", run, "--cache", train, check=True)
    own = json.loads((run / "metrics.json").read_text())["test"]
    assert f"test: top-1 {own['top1']:.4f}" in proc.stdout
    from dinoprobe import score_run

    scored = score_run(run, train)["test"]
    assert scored == own


def test_a_subset_of_the_heads_classes_is_matched_by_name_and_restricted_on_request(trained):
    root, _, run = trained
    subset = make_synthetic_cache(root / "subset", n=(90,), splits=("test",), num_classes=3, seed=3)  # class_0..2
    x, rows = split_of(subset, "test")
    logits, y = hand_logits(run, x), rows["label"]
    from dinoprobe.runs.score import score_run

    every = score_run(run, subset)["test"]
    assert every["top1"] == pytest.approx(accuracy_score(y, logits.argmax(1)))  # any of the 6 classes predicted
    assert list(every["per_class_accuracy"]) == [f"class_{i}" for i in range(6)]
    assert every["per_class_accuracy"]["class_5"] is None
    restricted = score_run(run, subset, restrict_classes=True)["test"]
    assert restricted["top1"] == pytest.approx(accuracy_score(y, logits[:, :3].argmax(1)))
    assert list(restricted["per_class_accuracy"]) == ["class_0", "class_1", "class_2"]
    assert restricted["top1"] >= every["top1"]
    proc = run_cli("score", "--run", run, "--cache", subset, "--restrict-classes", check=True)
    assert "predicted among its 3 classes" in proc.stdout


def test_classes_in_another_order_are_matched_by_name_end_to_end(tmp_path):
    """A real backbone: the head knows cat, dog, emu; the evaluation folder holds emu and cat (test/ only)."""
    data = make_folder(tmp_path / "data", classes=("cat", "dog", "emu"), per_class=4)
    evaluation = make_folder(tmp_path / "eval", classes=("emu", "cat"), per_class=3, splits=("test",), seed=50)
    common = ["--weights", "random", "--image-size", SIZE, "--workers", 0]
    run_cli("features", "--data", data, "--cache", tmp_path / "c", *common, check=True)
    proc = run_cli("features", "--data", evaluation, "--cache", tmp_path / "e", *common, check=True)
    assert "test 6 rows;" in proc.stdout
    run = tmp_path / "run"
    run_cli("probe", "--cache", tmp_path / "c", "--out", run, "--head", "linear", "--epochs", 3, check=True)
    out = tmp_path / "scored"
    run_cli("score", "--run", run, "--cache", tmp_path / "e", "--out", out, check=True)
    x, rows = split_of(tmp_path / "e", "test")
    names = ["cat", "emu"]  # the evaluation cache's classes, sorted
    truth = [names[c] for c in rows["label"]]
    head_names = ["cat", "dog", "emu"]
    predicted = [head_names[c] for c in hand_logits(run, x).argmax(1)]
    with open(out / "predictions.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["label"] for r in table] == truth and [r["predicted"] for r in table] == predicted
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert metrics["top1"] == pytest.approx(np.mean(np.array(truth) == np.array(predicted)))


def test_a_multilabel_head_is_scored_on_the_caches_classes_at_its_thresholds(tmp_path):
    train = make_synthetic_cache(tmp_path / "tags", n=(300, 100, 100), multilabel=True)
    run = tmp_path / "run"
    run_cli("probe", "--cache", train, "--out", run, "--head", "linear", "--epochs", 5, "--lr", "1e-2", check=True)
    subset = make_synthetic_cache(tmp_path / "subset", n=(80,), splits=("test",), num_classes=4, seed=5,
                                  multilabel=True)
    out = tmp_path / "scored"
    run_cli("score", "--run", run, "--cache", subset, "--out", out, check=True)
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    x, rows = split_of(subset, "test")
    probabilities = 1 / (1 + np.exp(-hand_logits(run, x)[:, :4]))
    thresholds = np.asarray(torch.load(run / "head.pt", weights_only=True)["thresholds"])[:4]
    for c in range(4):
        assert metrics["per_class_ap"][f"class_{c}"] == pytest.approx(
            average_precision_score(rows["labels"][:, c], probabilities[:, c]), abs=1e-6)
    with open(out / "predictions.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["predicted"] for r in table] == ["|".join(f"class_{c}" for c in np.flatnonzero(p >= thresholds))
                                               for p in probabilities]
    assert [r["label"] for r in table] == ["|".join(f"class_{c}" for c in np.flatnonzero(t))
                                           for t in rows["labels"]]
    assert_clean_error(run_cli("score", "--run", run, "--cache", subset, "--restrict-classes"), "single-label heads")


def test_score_refuses_what_it_cannot_score(trained, tmp_path):
    root, train, run = trained
    other = make_synthetic_cache(tmp_path / "other", n=(20,), splits=("test",),
                                 fingerprint_changes={"transform": {"image_size": 64, "resize_size": 64,
                                                                    "interpolation": "bicubic",
                                                                    "mean": [0.485, 0.456, 0.406],
                                                                    "std": [0.229, 0.224, 0.225], "crop_pct": 1.0}})
    assert_clean_error(run_cli("score", "--run", run, "--cache", other), "another backbone or transform",
                       "image_size 64 (the head's: 32)", "--image-size 32")
    weights = make_synthetic_cache(tmp_path / "weights", n=(20,), splits=("test",),
                                   fingerprint_changes={"weights": {"source": "hub", "sha256": "f" * 64}})
    assert_clean_error(run_cli("score", "--run", run, "--cache", weights), "weights hub")
    extra = make_synthetic_cache(tmp_path / "extra", n=(40,), splits=("test",), num_classes=8)
    assert_clean_error(run_cli("score", "--run", run, "--cache", extra), "not trained on: class_6, class_7")
    empty = make_synthetic_cache(tmp_path / "empty", n=(0,), splits=("test",))
    assert_clean_error(run_cli("score", "--run", run, "--cache", empty), "holds no rows", "cache skipped")
    no_test = make_synthetic_cache(tmp_path / "no-test", n=(20, 20), splits=("train", "val"))
    assert_clean_error(run_cli("score", "--run", run, "--cache", no_test), "no test split", "--split val")
    assert_clean_error(run_cli("score", "--run", run, "--cache", train, "--out", train / "scored"), "overlaps")
    assert_clean_error(run_cli("score", "--run", run, "--cache", train, "--out", run / "scored"),
                       "overlaps the run")
    (tmp_path / "thesis").mkdir()
    assert_clean_error(run_cli("score", "--run", run, "--cache", train, "--out", tmp_path / "thesis"),
                       "already exists")
    assert_clean_error(run_cli("score", "--run", run, "--cache", train, "--out", tmp_path / "thesis", "--overwrite"),
                       "replaces only a `score` run")
    from dinoprobe import Probe

    x, y = np.random.default_rng(0).normal(size=(40, 32)), np.arange(40) % 6
    Probe(head="linear", epochs=2).fit(x, y).save(tmp_path / "arrays.pt", class_names=[f"class_{i}" for i in range(6)])
    assert_clean_error(run_cli("score", "--run", tmp_path / "arrays.pt", "--cache", train), "records no backbone")


def test_a_split_that_does_not_fit_in_memory_is_refused_before_it_is_read(trained, monkeypatch):
    from dinoprobe.cache import arrays, store

    _, train, run = trained
    monkeypatch.setattr(arrays, "memory_available", lambda device: 100_000)  # 100 test rows x 32 floats: 12.8 KB
    monkeypatch.setattr(store, "load", lambda *a, **k: pytest.fail("read a split that cannot fit"))
    assert_clean_error(run_cli("score", "--run", run, "--cache", train), "test split's features, and scoring them",
                       "use a machine with more memory")


def test_scoring_the_split_a_head_was_chosen_on_is_flagged(trained):
    _, train, run = trained
    proc = run_cli("score", "--run", run, "--cache", train, "--split", "val", check=True)
    assert "Warning: this is the val split of the cache the head was trained on" in proc.stderr


def test_an_evaluation_set_cache_comes_from_a_folder_or_file_list_and_trains_nothing(tmp_path):
    evaluation = make_folder(tmp_path / "eval", classes=("cat", "dog"), per_class=3, splits=("test",))
    common = ["--weights", "random", "--image-size", SIZE, "--workers", 0]
    proc = run_cli("features", "--data", evaluation, "--cache", tmp_path / "e", *common, check=True)
    assert proc.stdout.split(": ", 1)[1].startswith("test 6 rows;")  # no val carved, no train
    assert "no train split: an evaluation set" in proc.stderr
    listed = tmp_path / "list.csv"
    listed.write_text("path,label,split\n" + "".join(f"eval/test/{c}/{i:03d}.png,{c},test\n"
                                                     for c in ("cat", "dog") for i in range(3)))
    run_cli("features", "--data", listed, "--cache", tmp_path / "l", *common, check=True)
    for cache_dir in (tmp_path / "e", tmp_path / "l"):
        rows = run_cli("cache", "verify", cache_dir, check=True).stdout
        assert "test 6 rows" in rows and "train" not in rows
        for command in ("probe", "knn", "logreg", "sweep"):
            assert_clean_error(run_cli(command, "--cache", cache_dir, "--out", tmp_path / f"r-{command}"),
                               "no train split: it is an evaluation set (test 6 rows)", "dinoprobe score")
    assert_clean_error(run_cli("evaluate", "--cache", tmp_path / "e", "--out", tmp_path / "ev"),
                       "evaluation set")
    assert not (tmp_path / "ev").exists()


def test_a_sweep_run_directory_means_its_best_head_and_keeps_its_files(trained, tmp_path):
    from dinoprobe import score_run

    _, train, _ = trained
    sweep = tmp_path / "sweep"
    run_cli("sweep", "--cache", train, "--out", sweep, "--head", "linear", "--lr", "1e-3,1e-2", "--epochs", 2,
            check=True)
    assert score_run(sweep, train)["test"] == score_run(sweep / "best", train)["test"]
    assert_clean_error(run_cli("score", "--run", sweep, "--cache", train, "--out", sweep / "scores"), "overlaps the run")
    for target in (sweep / "model.pt", sweep / "exports" / "model.pt"):
        assert_clean_error(run_cli("export", "--run", sweep / "best", "--out", target),
                           f"inside the run directory {sweep}")


def test_a_single_label_head_on_images_with_several_labels_scores_any_match_accuracy(trained, tmp_path):
    """ImageNet-ReaL's accuracy: the prediction is one of the image's labels; images without labels left out."""
    _, _, run = trained
    real = make_synthetic_cache(tmp_path / "real", n=(150,), splits=("test",), num_classes=6, seed=11,
                                multilabel=True, unlabelled=7)
    x, rows = split_of(real, "test")
    logits, labels = hand_logits(run, x), rows["labels"].astype(bool)
    kept = labels.any(1)
    assert (~kept).sum() == 7
    expected_top1 = labels[np.arange(len(x)), logits.argmax(1)][kept].mean()
    expected_top5 = np.array([labels[i, np.argsort(-logits[i])[:5]].any() for i in range(len(x))])[kept].mean()
    out = tmp_path / "scored"
    proc = run_cli("score", "--run", run, "--cache", real, "--out", out, check=True)
    assert "any-match" in proc.stdout and "7 image(s) without a label left out" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert metrics["task"] == "any_match" and metrics["n"] == 143 and metrics["unlabelled"] == 7
    assert metrics["top1"] == pytest.approx(expected_top1) and metrics["top5"] == pytest.approx(expected_top5)
    with open(out / "predictions.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["label"] for r in table] == ["|".join(f"class_{c}" for c in np.flatnonzero(t)) for t in labels]
    assert [r["predicted"] for r in table] == [f"class_{c}" for c in logits.argmax(1)]
    assert {p.name for p in out.iterdir()} == {"metrics.json", "run.json", "predictions.csv"}
    subset = make_synthetic_cache(tmp_path / "subset", n=(60,), splits=("test",), num_classes=3, seed=12,
                                  multilabel=True)
    x, rows = split_of(subset, "test")
    from dinoprobe import score_run

    restricted = score_run(run, subset, restrict_classes=True)["test"]
    truth, logits = rows["labels"].astype(bool), hand_logits(run, x)
    assert restricted["top1"] == pytest.approx(truth[np.arange(len(x)), logits[:, :3].argmax(1)].mean())
    every = score_run(run, subset)["test"]  # a prediction of class_3..5 is never one of these images' labels
    spread = np.zeros((len(x), 6), dtype=bool)
    spread[:, :3] = truth
    assert every["top1"] == pytest.approx(spread[np.arange(len(x)), logits.argmax(1)].mean())


def test_features_like_a_run_caches_its_heads_features_for_score(tmp_path):
    """--like takes the head's model, weights, image size, transform (crop included) and decoder, and stores the
    last blocks its feature reads (6 here, past the default 4): the evaluation cache's fingerprint then agrees with
    the training cache's, and score runs without a warning."""
    data = make_folder(tmp_path / "data", per_class=4)
    evaluation = make_folder(tmp_path / "eval", per_class=3, splits=("test",), seed=70)
    run_cli("features", "--data", data, "--cache", tmp_path / "c", "--weights", "random", "--image-size", 48,
            "--transform", "dinov3", "--crop-pct", "0.75", "--decoder", "torchvision", "--last-blocks", 6, "--workers", 0,
            check=True)
    run = tmp_path / "run"
    run_cli("probe", "--cache", tmp_path / "c", "--out", run, "--head", "linear", "--epochs", 2,
            "--feature", "cls6+patch_mean", check=True)
    proc = run_cli("features", "--data", evaluation, "--like", run, "--cache", tmp_path / "e", "--workers", 0,
                   check=True)
    assert f"score --run {run} --cache {tmp_path / 'e'}" in proc.stderr
    trained, made = (json.loads((tmp_path / c / "manifest.json").read_text())["fingerprint"] for c in ("c", "e"))
    for key in ("model", "weights", "transform", "decoder"):
        assert made[key] == trained[key], key
    proc = run_cli("score", "--run", run, "--cache", tmp_path / "e", check=True)
    assert "Warning" not in proc.stderr and "test: top-1" in proc.stdout
    for option in (["--image-size", 64], ["--transform", "timm"], ["--model", "vit_base_patch16_dinov3"]):
        proc = run_cli("features", "--data", evaluation, "--like", run, *option, "--cache", tmp_path / "x")
        assert proc.returncode == 2 and f"--like takes {option[0]}" in proc.stderr
    proc = run_cli("features", "--data", evaluation, "--like", run, "--last-blocks", 2, "--cache", tmp_path / "x")
    assert proc.returncode == 2 and "--last-blocks 6" in proc.stderr
    assert not (tmp_path / "x").exists()
