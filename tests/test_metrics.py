"""Single-label metrics against scikit-learn's, at any number of classes."""
import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score, top_k_accuracy_score

from dinoprobe.runs import metrics as metrics_module
from dinoprobe.runs.metrics import classification_metrics

from conftest import make_synthetic_cache, run_cli


@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
def test_classification_metrics_are_scikit_learns(tied):
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(12)]
    y = rng.integers(0, 11, 500)  # class 11 never occurs, but is predicted: balanced accuracy leaves it out
    scores = rng.random((500, 12)) + np.eye(12)[y] * rng.random((500, 1))
    if tied:  # k-NN votes: most classes exactly 0, and equal votes
        scores = np.where(scores > 1.0, np.round(scores, 1), 0.0)
    m = classification_metrics(scores, y, classes)
    pred = scores.argmax(1)
    assert m["top1"] == pytest.approx(np.mean(pred == y))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=np.arange(12)))
    np.testing.assert_array_equal(m["confusion_matrix"], confusion_matrix(y, pred, labels=np.arange(12)))
    recall = recall_score(y, pred, labels=np.arange(11), average=None, zero_division=0)
    assert [m["per_class_accuracy"][c] for c in classes[:11]] == pytest.approx(recall)
    assert m["per_class_accuracy"]["c11"] is None


def test_past_the_matrix_limit_only_the_nonzero_cells_are_kept(monkeypatch):
    monkeypatch.setattr(metrics_module, "CONFUSION_MATRIX_MAX_CLASSES", 8)
    rng = np.random.default_rng(1)
    y, scores = rng.integers(0, 12, 300), rng.random((300, 12))
    m = classification_metrics(scores, y, [f"c{i}" for i in range(12)])
    dense = confusion_matrix(y, scores.argmax(1), labels=np.arange(12))
    assert "confusion_matrix" not in m
    assert m["confusion_cells"] == [[i, j, int(dense[i, j])] for i, j in zip(*np.nonzero(dense))]
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=np.arange(12)))


def test_a_run_with_many_classes_writes_cells_and_no_confusion_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_module, "CONFUSION_MATRIX_MAX_CLASSES", 5)
    cache = make_synthetic_cache(tmp_path / "cache", n=(120, 60, 60), dim=8, num_classes=6)
    run_cli("probe", "--cache", cache, "--out", tmp_path / "run", "--epochs", 2, "--head", "linear", check=True)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sum(count for _, _, count in metrics["test"]["confusion_cells"]) == metrics["test"]["n"] == 60
    assert not (tmp_path / "run" / "confusion.png").exists() and (tmp_path / "run" / "curves.png").exists()


def test_single_label_splits_are_scored_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """A run's metrics never hold a split's (rows x classes) probabilities whole (8 GB at iNaturalist 2021's size),
    and the blocks give exactly the numbers of the whole."""
    from dinoprobe import Probe
    from dinoprobe.cache.arrays import load_cache
    from dinoprobe.runs import reports

    data = load_cache(make_synthetic_cache(tmp_path / "c", n=(120, 50, 50), dim=8, num_classes=7), "cls", "cpu")
    probe = Probe(head="linear", epochs=3).fit(data.X_train, data.y_train)
    whole = {s: classification_metrics(probe.predict_proba(data.x[s]), data.y[s], data.classes) for s in ("val", "test")}
    rows, real = [], probe.predict_proba
    probe.predict_proba = lambda X: rows.append(len(X)) or real(X)
    from dinoprobe import settings

    monkeypatch.setattr(settings, "SCORING_ROWS_PER_BLOCK", 16)
    assert reports.evaluate(probe, data) == whole
    assert max(rows) == 16 and sum(rows) == 100


@pytest.mark.parametrize("shots", [None, "10"], ids=["full", "few-shot"])
def test_logreg_val_metrics_are_the_train_only_models(tmp_path, shots):
    """The refit model has seen val: run_logreg scores val with the model chosen on train alone at best C (in
    few-shot too, where refit=True makes the tries refit), and test with the refit one."""
    from dinoprobe import LogReg
    from dinoprobe.cache.arrays import load_cache
    from dinoprobe.runs.experiments import run_logreg

    cache = make_synthetic_cache(tmp_path / "c", n=(150, 150, 100), dim=32, num_classes=7, separation=0.25, seed=3)
    metrics = run_logreg(cache, tmp_path / "run", LogReg(Cs=[0.1, 100.0], refit=True, shots=shots, tries=2))
    data = load_cache(cache, "cls", "cpu")
    if shots is None:
        fitted = [metrics]
        train_only = [LogReg(Cs=[metrics["best_c"]], refit=False).fit(data.X_train, data.y_train, X_val=data.x["val"],
                                                                      y_val=data.y["val"])]
        refit = [LogReg(Cs=[metrics["best_c"]], refit=True).fit(data.X_train, data.y_train, X_val=data.x["val"],
                                                                y_val=data.y["val"])]
    else:
        fitted = metrics["few_shot"]["per_try"]
        rows = [np.searchsorted(data.index["train"], t["train_index"]) for t in fitted]
        train_only, refit = [], []
        for r in rows:
            for models, refit_it in ((train_only, False), (refit, True)):
                models.append(LogReg(Cs=[0.1, 100.0], refit=refit_it).fit(data.X_train[r], data.y_train[r],
                                                                           X_val=data.x["val"], y_val=data.y["val"]))
    for got, alone, seen in zip(fitted, train_only, refit):
        want = classification_metrics(alone.predict_proba(data.x["val"]), data.y["val"], data.classes)
        other = classification_metrics(seen.predict_proba(data.x["val"]), data.y["val"], data.classes)
        assert want["top1"] != other["top1"]  # the refit scores val differently: the test can tell them apart
        assert got["val"]["top1"] == want["top1"] and got["val"]["balanced_accuracy"] == want["balanced_accuracy"]
