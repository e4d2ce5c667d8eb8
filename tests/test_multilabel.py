"""Multi-label classification end to end: the sigmoid engine against plain PyTorch, one-vs-rest LogReg against
scikit-learn, k-NN against a direct computation, the metrics against sklearn.metrics, and every data source from
files to predictions."""
import csv
import json
import tarfile
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.utils.class_weight import compute_class_weight

from bench.reference import train_on_tensors
from dinoprobe import KNN, LogReg, Probe, Sweep
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.base import label_weights
from dinoprobe.runs.metrics import multilabel_metrics
from dinoprobe.train.config import TrainConfig
from dinoprobe.train.loop import train_heads
from dinoprobe.train.ranking import average_precision
from dinoprobe.train.ranking import f1_thresholds as torch_f1_thresholds

from conftest import SIZE, assert_clean_error, make_folder, run_cli, write_image


def tagged(n=600, dim=16, classes=4, seed=0):
    """Rows with 0..3 tags each: a tag adds its own direction to the features."""
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, classes, generator=gen) < torch.tensor([0.5, 0.3, 0.2, 0.08])[:classes]).float()
    x = torch.randn(n, dim, generator=gen) + 1.5 * y @ torch.randn(classes, dim, generator=gen)
    return x[:450], y[:450], x[450:], y[450:]


DATA = tagged()


# ------------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])  # static: graphed.py's buffers
@pytest.mark.parametrize("head,optimizer", [("linear", "adam"), ("linear", "sgd"), ("mlp", "adamw")])
def test_multilabel_engine_follows_plain_pytorch_step_by_step(head, optimizer, static):
    """nn.Linear + torch.optim + BCEWithLogitsLoss + backward: the same per-step losses, the same val mAP per epoch
    (theirs from scikit-learn's average_precision_score), best epoch and final head."""
    cfg = TrainConfig(head=head, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, weight_decay=1e-3,
                      batch_size=64, epochs=4, warmup_epochs=1, dropout=0.2, hidden=16)
    ours, = train_heads([cfg], *DATA, 4, static_epochs=static)
    _, plain = train_on_tensors(cfg, *DATA, 4)
    assert len(ours.step_losses) == len(plain.step_losses) == 4 * 8
    np.testing.assert_allclose(ours.step_losses, plain.step_losses, atol=1e-5, rtol=0)
    np.testing.assert_allclose([h["val_map"] for h in ours.history], [h["val_map"] for h in plain.history],
                               atol=1e-6)
    assert ours.best_epoch == plain.best_epoch
    for mine, theirs in zip(ours.best_layers, plain.best_layers, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    assert len(set(np.round(ours.step_losses, 5))) > 10


def test_balanced_weights_are_each_class_binary_balanced_weights_and_train_as_bce_pos_weight():
    """"balanced" = scikit-learn's compute_class_weight on each class's own 0/1 column; training with them equals
    BCEWithLogitsLoss(weight=negative, pos_weight=positive / negative) step by step."""
    y = DATA[1].numpy()
    weights = label_weights("balanced", np.arange(4), y)
    for c in range(4):
        negative, positive = compute_class_weight("balanced", classes=np.array([0.0, 1.0]), y=y[:, c])
        assert weights[0, c].item() == pytest.approx(positive) and weights[1, c].item() == pytest.approx(negative)
    cfg = TrainConfig(head="linear", lr=3e-3, batch_size=64, epochs=3)
    ours, = train_heads([cfg], *DATA, 4, class_weights=weights, static_epochs=True)
    _, plain = train_on_tensors(cfg, *DATA, 4, class_weights=weights)
    np.testing.assert_allclose(ours.step_losses, plain.step_losses, atol=1e-5, rtol=0)
    unweighted, = train_heads([cfg], *DATA, 4)
    assert not np.allclose(ours.step_losses, unweighted.step_losses, atol=1e-3)  # the weights do something
    # a dict is BCEWithLogitsLoss's pos_weight
    pos = label_weights({1: 3.0}, np.arange(4), y)
    assert pos.tolist() == [[1.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]


def test_multilabel_heads_side_by_side_equal_each_head_alone():
    configs = [TrainConfig(head="mlp", hidden=8, lr=lr, batch_size=50, epochs=3, seed=1) for lr in (1e-3, 5e-3, 2e-2)]
    together = train_heads(configs, *DATA, 4)
    assert {r.group_size for r in together} == {3}
    for cfg, res in zip(configs, together):
        alone, = train_heads([cfg], *DATA, 4)
        assert res.step_losses == pytest.approx(alone.step_losses, abs=1e-6)
        assert res.best_epoch == alone.best_epoch
        for a, b in zip(res.best_layers, alone.best_layers):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_label_smoothing_is_refused_for_multilabel_heads():
    with pytest.raises(DinoprobeError, match="label smoothing applies to single-label"):
        train_heads([TrainConfig(head="linear", label_smoothing=0.1, epochs=1)], *DATA, 4)


# ------------------------------------------------------------------------------------------------ metrics
@pytest.fixture(params=["whole", "blocks"])
def ranking_blocks(request, monkeypatch):
    """Rankings whole, or a few pairs at a time (blocks of classes, chunks of sorted positions; ties straddling
    chunk boundaries) with every count carried over, and metrics a few rows at a time."""
    if request.param == "blocks":
        from dinoprobe.runs import metrics
        from dinoprobe.train import ranking

        monkeypatch.setattr(ranking, "RANKED_PAIRS_PER_BLOCK", 7)
        monkeypatch.setattr(metrics, "SCORING_ROWS_PER_BLOCK", 9)
    return request.param


@pytest.mark.parametrize("tied", [False, True])
def test_average_precision_equals_scikit_learns(tied, ranking_blocks):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (3, 80, 5), generator=gen).float() if tied else torch.randn(3, 80, 5, generator=gen)
    targets = (torch.rand(80, 5, generator=gen) < 0.3).float()
    targets[:, 4] = 0  # a class without positives: undefined, NaN
    ours = average_precision(scores, targets)
    for h in range(3):
        for c in range(4):
            assert ours[h, c].item() == pytest.approx(average_precision_score(targets[:, c], scores[h, :, c]),
                                                      abs=1e-6)
    assert torch.isnan(ours[:, 4]).all()


@pytest.mark.parametrize("tied", [False, True])
def test_multilabel_metrics_are_scikit_learns(tied, ranking_blocks):
    def approx(value):  # float64 throughout: equal to the last bits that summing in another order moves
        return pytest.approx(value, rel=1e-12, abs=1e-12)

    gen = np.random.default_rng(0)
    y = (gen.random((60, 4)) < 0.35).astype(int)
    y[:, 3] = 0
    y[:5] = 0  # images without labels: samples F1 counts those with none predicted as right
    p = np.clip(y * 0.4 + gen.random((60, 4)) * 0.6, 0, 1)
    p = np.round(p * 4) / 4 if tied else p
    p[:3], p[3] = 0.1, 0.995  # three of them with nothing predicted, one with everything
    t = np.array([0.5, 0.4, 0.6, 0.99])
    names = ["a", "b", "c", "d"]
    m = multilabel_metrics(p, y, names, t)
    pred = (p >= t).astype(int)
    assert (pred[:5].sum(1) == 0).any() and (pred[:5].sum(1) > 0).any()
    assert m["map_macro"] == approx(np.mean([average_precision_score(y[:, c], p[:, c]) for c in range(3)]))
    assert m["map_micro"] == approx(average_precision_score(y, p, average="micro"))
    assert m["per_class_ap"]["b"] == approx(average_precision_score(y[:, 1], p[:, 1]))
    assert m["per_class_ap"]["d"] is None and m["classes_without_positives"] == ["d"]
    assert m["f1_micro"] == approx(f1_score(y, pred, average="micro"))
    assert m["f1_macro"] == approx(f1_score(y[:, :3], pred[:, :3], average="macro"))
    assert m["f1_samples"] == approx(f1_score(y, pred, average="samples", zero_division=1.0))
    assert m["subset_accuracy"] == approx(accuracy_score(y, pred))
    assert m["n"] == 60 and m["thresholds"]["c"] == 0.6


def f1_thresholds(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return torch_f1_thresholds(torch.from_numpy(p), torch.from_numpy(y)).numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_thresholds_maximise_each_classes_f1(tied, ranking_blocks):
    """The threshold of the highest F1 among scikit-learn's precision_recall_curve thresholds, the lowest of equals."""
    from sklearn.metrics import precision_recall_curve

    gen = np.random.default_rng(1)
    y = (gen.random((80, 3)) < 0.4).astype(int)
    p = np.clip(y * 0.3 + gen.random((80, 3)) * 0.7, 0, 1)
    p = np.round(p * 8) / 8 if tied else p
    t = f1_thresholds(p, y)
    for c in range(3):
        precision, recall, cuts = precision_recall_curve(y[:, c], p[:, c])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        assert t[c] == cuts[np.flatnonzero(np.isclose(f1, f1.max(), rtol=1e-12, atol=0))[0]]
        assert f1_score(y[:, c], p[:, c] >= t[c]) == pytest.approx(f1.max())
    assert f1_thresholds(p, np.zeros_like(y)).tolist() == [0.5, 0.5, 0.5]  # no positives: 0.5
    assert f1_thresholds(p[:0], y[:0]).tolist() == [0.5, 0.5, 0.5]  # no rows
    # F1 2/3 at 0.9 (1 of 1 right) and at 0.6 (2 of 4): the lower, precision_recall_curve's first maximum
    assert f1_thresholds(np.array([[0.9], [0.8], [0.7], [0.6]]), np.array([[1], [0], [0], [1]])).tolist() == [0.6]


def test_ap_plot_names_each_class_up_to_100_and_draws_one_curve_beyond(tmp_path):
    from dinoprobe.runs.metrics import plot_average_precision

    few = plot_average_precision({"b": 0.5, "a": 0.9, "none": None}, tmp_path / "few.png").axes[0]
    assert [t.get_text() for t in few.get_yticklabels()] == ["a", "b"] and len(few.patches) == 2
    many = plot_average_precision({f"c{i}": i / 150 for i in range(150)}, tmp_path / "many.png").axes[0]
    assert len(many.patches) == 0 and len(many.collections) == 1  # no 150 bars and names: one filled curve
    assert "150 classes" in many.get_xlabel() and (tmp_path / "many.png").stat().st_size > 0


def test_micro_average_precision_in_chunks_is_scikit_learns(monkeypatch):
    from dinoprobe.train import ranking

    gen = np.random.default_rng(5)
    y = (gen.random((50, 6)) < 0.3).astype(int)
    p = np.round(np.clip(y * 0.3 + gen.random((50, 6)) * 0.7, 0, 1) * 10) / 10  # ties across the chunks
    expected = average_precision_score(y, p, average="micro")
    for pairs in (1 << 22, 13, 1):
        monkeypatch.setattr(ranking, "RANKED_PAIRS_PER_BLOCK", pairs)
        assert ranking.micro_average_precision(torch.from_numpy(p), torch.from_numpy(y)) == pytest.approx(expected)


def test_predictions_label_what_the_metrics_count_at_the_tuned_thresholds():
    """Each tuned threshold is a validation row's own probability: predict's labels (p >= t, best first) are the
    metrics' positives for every row, that one included."""
    from dinoprobe.runs.labelling import labelled

    gen = np.random.default_rng(2)
    y = (gen.random((60, 4)) < 0.4).astype(int)
    p = np.clip(y * 0.3 + gen.random((60, 4)) * 0.7, 0, 1)
    t, names = f1_thresholds(p, y), ["a", "b", "c", "d"]
    assert all(t[c] in p[:, c] for c in range(4))
    for row in p:
        got = labelled("x", row, names, 5, thresholds=t)["labels"]
        assert got == [names[c] for c in np.argsort(-row, kind="stable") if row[c] >= t[c]]
        assert set(got) == {names[c] for c in np.flatnonzero(row >= t)}


# --------------------------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_one_vs_rest_logreg_equals_scikit_learns(class_weight):
    """Coefficients and probabilities of OneVsRestClassifier(LogisticRegression(C)) at the chosen C, with and without
    balanced weights; C chosen on validation macro mAP, each C's from scikit-learn's average_precision_score."""
    x, y = DATA[0].numpy().astype(np.float64), DATA[1].numpy().astype(int)
    model = LogReg(Cs=[0.05, 0.5], normalize="none", tol=1e-10, refit=False, class_weight=class_weight)
    model.fit(x, y, X_val=DATA[2], y_val=DATA[3])

    def reference(c):
        return OneVsRestClassifier(LogisticRegression(C=c, tol=1e-10, max_iter=5000, class_weight=class_weight)).fit(x, y)

    ref = reference(model.best_C_)
    np.testing.assert_allclose(model.coef_.numpy(), np.concatenate([e.coef_ for e in ref.estimators_]), atol=1e-4)
    np.testing.assert_allclose(model.intercept_.numpy(), np.concatenate([e.intercept_ for e in ref.estimators_]),
                               atol=1e-4)
    np.testing.assert_allclose(model.predict_proba(DATA[2]), ref.predict_proba(DATA[2].numpy()), atol=1e-5)
    for c, score in zip(model.Cs_, model.val_score_per_C_):
        probs = reference(c).predict_proba(DATA[2].numpy())
        assert score == pytest.approx(np.mean([average_precision_score(DATA[3][:, j], probs[:, j])
                                               for j in range(4)]), abs=1e-5)


def test_knn_votes_are_each_classes_share_of_the_neighbours_weight():
    x_train, y_train, x_val, y_val = (t.numpy() for t in DATA)
    knn = KNN(ks=(7,), temperature=0.1).fit(x_train, y_train, X_val=x_val, y_val=y_val)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(x_val) @ unit(x_train).T
    for row in range(5):
        near = np.argsort(-sims[row])[:7]
        w = np.exp(sims[row, near] / 0.1)
        expected = (w[:, None] * y_train[near]).sum(0) / w.sum()
        np.testing.assert_allclose(knn.predict_proba(x_val[row:row + 1])[0], expected, rtol=1e-5)
    # k is chosen on validation macro mAP of those votes (float32 shares: unanimous neighbours give exactly 1, so
    # such images tie), scikit-learn's average precision per class
    near = np.argsort(-sims, axis=1)[:, :7]
    w = np.exp(np.take_along_axis(sims, near, 1).astype(np.float64) / 0.1)
    votes = ((w[:, :, None] * y_train[near]).sum(1) / w.sum(1, keepdims=True)).astype(np.float32)
    expected_map = np.mean([average_precision_score(y_val[:, c], votes[:, c]) for c in range(4) if y_val[:, c].any()])
    assert knn.val_score_per_k_[7] == pytest.approx(expected_map, abs=1e-5)


def test_multilabel_votes_gather_at_most_a_scoring_block_of_label_sets(monkeypatch):
    """A multi-label vote gathers each query's k neighbours' label sets, (queries, k, classes): 8,192 queries at k =
    200 and 1,000 classes would be 20 GB at once. They are gathered at most settings.SCORING_BYTES at a time, with
    the same votes."""
    from dinoprobe import settings

    x_train, y_train, x_val, y_val = (t.numpy() for t in DATA)
    whole = KNN(ks=(7,), temperature=0.1).fit(x_train, y_train, X_val=x_val, y_val=y_val)
    monkeypatch.setattr(settings, "SCORING_BYTES", 12 * 7 * y_train.shape[1] * 3)  # three queries' label sets
    gathered, einsum = [], torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda equation, *operands: (
        gathered.append(operands[1].shape[0]) if equation == "qk,qkc->qc" else None) or einsum(equation, *operands))
    blocks = KNN(ks=(7,), temperature=0.1).fit(x_train, y_train, X_val=x_val, y_val=y_val)
    # fit's votes on val to choose k, then at that k for the thresholds: three rows at a time
    assert max(gathered) == 3 and sum(gathered) == 2 * len(x_val)
    assert blocks.val_score_per_k_ == whole.val_score_per_k_
    np.testing.assert_array_equal(blocks.predict_proba(x_val), whole.predict_proba(x_val))


@pytest.mark.parametrize("make", [lambda: Probe(head="linear", epochs=20, lr=1e-2), lambda: LogReg(),
                                  lambda: KNN(ks=(5, 10)),
                                  lambda: Sweep(Probe(head="linear", epochs=10), param_grid={"lr": [1e-3, 1e-2]})])
def test_estimators_take_an_indicator_matrix_as_scikit_learn_does(make):
    x, y = DATA[0].numpy(), DATA[1].numpy().astype(np.int64)
    model = make().fit(x, y)
    pred, proba = model.predict(DATA[2].numpy()), model.predict_proba(DATA[2].numpy())
    assert pred.shape == proba.shape == (150, 4) and pred.dtype == np.int64 and set(np.unique(pred)) <= {0, 1}
    assert ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_array_equal(pred, (proba >= model.thresholds_).astype(np.int64))
    assert model.classes_.tolist() == [0, 1, 2, 3] and model.__sklearn_tags__().classifier_tags.multi_label
    assert model.score(DATA[2].numpy(), DATA[3].numpy()) == accuracy_score(DATA[3].numpy(), pred)
    assert model.best_score_ > 0.5  # macro mAP on the carved validation rows: the tags are learnable


def test_multilabel_refusals_name_the_fix():
    x, y = DATA[0].numpy(), DATA[1].numpy()
    with pytest.raises(DinoprobeError, match="few-shot training draws K images per class"):
        Probe(epochs=1, shots=2).fit(x, y)
    with pytest.raises(DinoprobeError, match="not a 0/1 indicator"):
        Probe(epochs=1).fit(x, y * 2)
    with pytest.raises(DinoprobeError, match="y_val must be an indicator matrix with y's 4 columns"):
        Probe(epochs=1).fit(x, y, X_val=x[:5], y_val=y[:5, :3])
    with pytest.raises(DinoprobeError, match="no positive label at all"):
        Probe(epochs=1).fit(x, 0 * y)


def test_a_single_label_refit_drops_the_multilabel_thresholds():
    model = Probe(head="linear", epochs=2).fit(DATA[0], DATA[1])
    assert hasattr(model, "thresholds_")
    model.fit(DATA[0], DATA[1][:, 0].long())
    assert not hasattr(model, "thresholds_") and model.predict(DATA[2][:3]).shape == (3,)


# ------------------------------------------------------------------------------------------- data sources
NAMES = ["cat", "dog", "car"]


def tag_rows(n=30, seed=0):
    """Image files with 0..3 tags each (the 5th of each ten has none), for every source kind."""
    gen = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        tags = [t for t in NAMES if gen.random() < 0.45] if i % 10 != 4 else []
        rows.append((f"{i:03d}", tags, "test" if i >= n - 6 else "train"))
    return rows


@pytest.fixture(scope="module")
def tagged_sources(tmp_path_factory):
    """The same images and tags as a CSV file list, a Hugging Face save_to_disk folder and tar shards."""
    root = tmp_path_factory.mktemp("multilabel")
    rows = tag_rows()
    for key, _, _ in rows:
        write_image(root / "img" / f"{key}.png", int(key), size=(40, 36))
    with open(root / "list.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for key, tags, split in rows:
            writer.writerow([f"img/{key}.png", "|".join(tags), split])
    for split in ("train", "test"):
        (root / "tars" / split).mkdir(parents=True)
        with tarfile.open(root / "tars" / split / "shard-000.tar", "w") as tar:
            for key, tags, s in rows:
                if s == split:
                    tar.add(root / "img" / f"{key}.png", arcname=f"{key}.png")
                    record = root / f"{key}.json"
                    record.write_text(json.dumps({"label": tags}))
                    tar.add(record, arcname=f"{key}.json")
    sources = {"csv": root / "list.csv", "tar": root / "tars"}
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.Sequence(datasets.ClassLabel(
        names=sorted(NAMES)))})
    parts = {}
    for split in ("train", "test"):
        chosen = [(k, t) for k, t, s in rows if s == split]
        parts[split] = datasets.Dataset.from_dict(
            {"image": [str(root / "img" / f"{k}.png") for k, _ in chosen],
             "labels": [[sorted(NAMES).index(t) for t in tags] for _, tags in chosen]}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(root / "hf"))
    sources["hf"] = root / "hf"
    return root, sources, rows


def extract(source, cache, *extra):
    return run_cli("features", "--data", source, "--weights", "random", "--image-size", SIZE, "--cache", cache,
                   "--workers", 0, "--shard-size", 8, *extra, check=True)


def test_every_source_gives_the_same_multilabel_cache_and_predictions(tagged_sources):
    """CSV (--label-sep), a Hugging Face List(ClassLabel) column and tar JSON label lists: the same features and
    the same (N, classes) labels; then probe -> predict on each."""
    from dinoprobe.cache import store

    root, sources, rows = tagged_sources
    loaded = {}
    for kind, source in sources.items():
        extra = ("--label-sep", "|") if kind == "csv" else ()
        proc = extract(source, root / f"cache-{kind}", *extra)
        assert "(multi-label)" in proc.stderr
        manifest = store.read_manifest(root / f"cache-{kind}")
        assert manifest["task"] == manifest["fingerprint"]["task"] == "multilabel"
        assert manifest["classes"] == manifest["fingerprint"]["classes"] == sorted(NAMES)
        assert store.verify(root / f"cache-{kind}") == []
        loaded[kind] = {split: store.load(root / f"cache-{kind}", split, "cls") for split in ("train", "val", "test")}
    expected = {key: [int(n in tags) for n in sorted(NAMES)] for key, tags, _ in rows}
    for kind, splits in loaded.items():
        for split, data in splits.items():
            assert data["labels"].dtype == np.uint8 and data["labels"].shape[1] == 3 and "label" not in data
            if kind != "hf":  # files and tar members are named by key (hf rows by position: compared below)
                keys = [p.split("#")[-1].rsplit("/", 1)[-1].split(".")[0] for p in data["path"]]
                assert data["labels"].tolist() == [expected[k] for k in keys], (kind, split)
            np.testing.assert_array_equal(data["labels"], loaded["csv"][split]["labels"])
            np.testing.assert_allclose(data["cls"], loaded["csv"][split]["cls"], atol=1e-6)
    assert (loaded["csv"]["train"]["labels"].sum(1) == 0).any()  # images without a tag are kept, all-zero rows
    for kind in sources:
        run = root / f"run-{kind}"
        run_cli("probe", "--cache", root / f"cache-{kind}", "--out", run, "--head", "linear", "--epochs", 3, check=True)
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics["test"]) >= {"map_macro", "map_micro", "per_class_ap", "f1_micro", "f1_macro",
                                        "f1_samples", "subset_accuracy", "thresholds"}
        assert (run / "ap.png").is_file() and not (run / "confusion.png").exists()
        assert "val_map" in (run / "history.csv").read_text().splitlines()[0]
        if kind == "csv":  # every file it writes is a run file: --overwrite replaces it
            run_cli("probe", "--cache", root / f"cache-{kind}", "--out", run, "--head", "linear", "--epochs", 3,
                    "--overwrite", check=True)
        predicted = json.loads(run_cli("predict", "--run", run, "--format", "json", root / "img", check=True).stdout)
        thresholds = json.loads((run / "metrics.json").read_text())["test"]["thresholds"]
        for r in predicted:
            assert r["labels"] == [n for n in sorted(r["all_probabilities"], key=lambda n: -r["all_probabilities"][n])
                                   if r["all_probabilities"][n] >= thresholds[n]]


def test_predict_threshold_and_csv_output(tagged_sources):
    root, sources, _ = tagged_sources
    cache, run = root / "cache-thr", root / "run-thr"
    extract(sources["csv"], cache, "--label-sep", "|")
    run_cli("probe", "--cache", cache, "--out", run, "--head", "linear", "--epochs", 2, check=True)
    everything = run_cli("predict", "--run", run, "--threshold", 0, "--format", "csv", root / "img" / "001.png",
                         check=True).stdout.splitlines()
    assert everything[0] == "path,labels,probability_car,probability_cat,probability_dog"
    assert everything[1].split(",")[1].count("|") == 2  # threshold 0: every class
    nothing = run_cli("predict", "--run", run, "--threshold", 1, root / "img" / "001.png", check=True).stdout
    assert "(no label over its threshold)" in nothing


def test_label_separator_and_task_mistakes(tmp_path):
    for i in range(8):
        write_image(tmp_path / f"{i}.png", i)
    (tmp_path / "single.csv").write_text("path,label\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(8)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from dinoprobe.extract.sources import open_source

        source = open_source(str(tmp_path / "single.csv"), label_sep="|")
    assert any("never occurs" in str(w.message) for w in caught) and source.task == "single"
    assert open_source(str(tmp_path / "single.csv"), task="multilabel").splits["train"][0][1] in ((0,), (1,))
    (tmp_path / "multi.csv").write_text("path,label\n" + "".join(f"{i}.png,a|b\n" for i in range(8)))
    proc = run_cli("features", "--data", tmp_path / "multi.csv", "--label-sep", "|", "--task", "single", "--weights",
                   "random", "--cache", tmp_path / "c")
    assert_clean_error(proc, "has 2 labels", "--task multilabel")
    proc = run_cli("features", "--data", tmp_path, "--label-sep", "|", "--weights", "random", "--cache", tmp_path / "c")
    assert_clean_error(proc, "--label-sep splits the label cells of a CSV")
    (tmp_path / "gap.csv").write_text("path,label\n0.png,a\n1.png,\n2.png,b\n")
    assert_clean_error(run_cli("features", "--data", tmp_path / "gap.csv", "--weights", "random", "--cache",
                               tmp_path / "c"), "a row without a label", "--task multilabel")


def test_a_class_without_positive_training_images_is_named(tmp_path):
    """A tag seen only in test: training goes on (its head learns "no"), and the warning names it, one line."""
    for i in range(16):
        write_image(tmp_path / f"{i}.png", i)
    lines = [f"{i}.png,{'a|b' if i % 3 else 'a'},train" for i in range(12)] + [f"{i}.png,c,test" for i in range(12, 16)]
    (tmp_path / "list.csv").write_text("path,label,split\n" + "\n".join(lines) + "\n")
    extract(tmp_path / "list.csv", tmp_path / "cache", "--label-sep", "|")
    proc = run_cli("probe", "--cache", tmp_path / "cache", "--out", tmp_path / "run", "--head", "linear", "--epochs", 2,
                   check=True)
    warning = [line for line in proc.stderr.splitlines() if "no positive train image" in line]
    assert len(warning) == 1 and warning[0].startswith("Warning:") and warning[0].endswith(": c")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val"]["classes_without_positives"] == ["c"] and metrics["test"]["per_class_ap"]["c"] is not None


def test_resume_and_verify_keep_multilabel_shards(tagged_sources):
    """A shard lost after extraction is recomputed by rerunning the command, with the same labels."""
    from dinoprobe.cache import store

    root, sources, _ = tagged_sources
    cache = root / "cache-resume"
    extract(sources["csv"], cache, "--label-sep", "|")
    before = store.load(cache, "train", "cls")
    (cache / "train" / "shard-00001.h5").unlink()
    assert any("missing" in p for p in store.verify(cache))
    proc = extract(sources["csv"], cache, "--label-sep", "|")
    assert "recomputed 1 missing" in proc.stdout
    after = store.load(cache, "train", "cls")
    np.testing.assert_array_equal(before["labels"], after["labels"])
    np.testing.assert_array_equal(before["cls"], after["cls"])
    # the same file read another way (no separator: "cat|dog" is one class) is another request: refused
    proc = run_cli("features", "--data", sources["csv"], "--task", "multilabel", "--weights", "random", "--image-size",
                   SIZE, "--cache", cache, "--workers", 0, "--shard-size", 8)
    assert_clean_error(proc, "different request")


def test_threshold_applies_to_multilabel_heads_only():
    from dinoprobe.runs.labelling import check_threshold, labelled

    with pytest.raises(DinoprobeError, match="--threshold applies to multi-label heads"):
        check_threshold(0.5, multilabel=False)
    with pytest.raises(DinoprobeError, match=r"in \[0, 1\]"):
        check_threshold(1.5, multilabel=True)
    row = labelled("x.png", np.array([0.2, 0.8, 0.6]), ["a", "b", "c"], 1, [0.1, 0.9, 0.5])
    assert row["labels"] == ["c", "a"] and row["probabilities"] == [0.6, 0.2]  # best first, each its own threshold


def test_evaluate_reports_macro_map_for_a_multilabel_cache(tagged_sources, tmp_path):
    root, sources, _ = tagged_sources
    cache = root / "cache-evaluate"
    extract(sources["csv"], cache, "--label-sep", "|")
    import shutil

    copy = shutil.copytree(cache, tmp_path / "same-images")  # as a test cache: scored by `score`'s code
    proc = run_cli("evaluate", "--cache", cache, "--out", tmp_path / "ev", "--epochs", 1, "--epoch-length", 2,
                   "--test-cache", copy, check=True)
    row = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"][0]
    assert row["linear_same-images_map"] == pytest.approx(row["linear_test_map"])  # the best head's test mAP
    metrics = {run: json.loads((tmp_path / "ev" / "cache-evaluate" / run / "metrics.json").read_text())
               for run in ("logreg", "knn")}
    assert row["logreg_test_map"] == metrics["logreg"]["test"]["map_macro"]
    assert row["knn_test_map_k10"] == metrics["knn"]["map_per_k"]["test"]["10"]
    assert "linear_test_map" in row and not any("top1" in k for k in row)
    assert_clean_error(run_cli("evaluate", "--cache", cache, "--out", tmp_path / "ev2", "--shots", 1),
                       "multi-label", "drop --shots")
    assert "| linear_test_map |" in (tmp_path / "ev" / "results.md").read_text() and "results.md" in proc.stdout


def test_a_label_column_naming_too_many_classes_is_refused(tmp_path):
    """Every cached row holds one number per class: 100,001 distinct names (an ID column?) are refused up front, and
    a cell too large for a CSV field is an error, not a traceback."""
    (tmp_path / "ids.csv").write_text("path,label\n" + "".join(f"{i}.png,id{i}\n" for i in range(100_001)))
    proc = run_cli("features", "--data", tmp_path / "ids.csv", "--weights", "random", "--cache", tmp_path / "c")
    assert_clean_error(proc, "100,001 classes, more than 100,000")
    (tmp_path / "huge.csv").write_text("path,label\na.png," + "|".join(f"t{i}" for i in range(30_000)) + "\n")
    proc = run_cli("features", "--data", tmp_path / "huge.csv", "--label-sep", "|", "--weights", "random", "--cache",
                   tmp_path / "c")
    assert_clean_error(proc, "not a readable CSV/TSV file list", "field larger than field limit")
    assert not (tmp_path / "c").exists()


def test_a_head_file_with_bad_thresholds_is_refused(tagged_sources, tmp_path):
    from dinoprobe.train.headfile import load_head_file

    root, sources, _ = tagged_sources
    extract(sources["csv"], tmp_path / "cache", "--label-sep", "|")
    run_cli("probe", "--cache", tmp_path / "cache", "--out", tmp_path / "run", "--epochs", 1, check=True)
    raw = torch.load(tmp_path / "run" / "head.pt", weights_only=True)
    assert raw["task"] == "multilabel" and len(raw["thresholds"]) == 3
    for bad in ([0.5, 0.5], [0.5, float("nan"), 0.5], [0.5, 2.0, 0.5]):
        torch.save({**raw, "thresholds": bad}, tmp_path / "head.pt")
        with pytest.raises(DinoprobeError, match="one threshold in"):
            load_head_file(tmp_path / "head.pt")


def test_a_folder_read_as_multilabel_and_views_train_sigmoid_heads(tmp_path):
    """--task multilabel on a single-label folder: one label per image as an indicator row; augmented views and
    a streamed split train multi-label heads like in-memory features do."""
    from dinoprobe.cache import store

    root = make_folder(tmp_path / "data", classes=("cat", "dog", "owl"), per_class=4)
    run_cli("features", "--data", root, "--task", "multilabel", "--views", 2, "--weights", "random", "--image-size",
            SIZE, "--cache", tmp_path / "cache", "--workers", 0, check=True)
    train = store.load(tmp_path / "cache", "train", "cls")
    assert (train["labels"].sum(1) == 1).all() and train["labels"].shape == (12, 3)
    assert [["cat", "dog", "owl"][i] for i in train["labels"].argmax(1)] == [p.split("/")[-2] for p in train["path"]]
    for extra in (("--views",), ("--max-memory", "1KB")):
        out = tmp_path / f"run{len(extra)}"
        proc = run_cli("probe", "--cache", tmp_path / "cache", "--out", out, "--head", "linear", "--epochs", 2, *extra,
                       check=True)
        assert "mAP" in proc.stdout and json.loads((out / "run.json").read_text())["train_features"]["mode"] == \
            ("views" if extra == ("--views",) else "streamed")


def test_predict_refuses_threshold_for_a_single_label_head(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    extract(root, tmp_path / "cache")
    run_cli("probe", "--cache", tmp_path / "cache", "--out", tmp_path / "run", "--epochs", 1, check=True)
    proc = run_cli("predict", "--run", tmp_path / "run", "--threshold", 0.5, root / "val")
    assert_clean_error(proc, "--threshold applies to multi-label heads", "--top-k")


@pytest.mark.slow
def test_two_torchrun_processes_give_the_multilabel_rows_of_one(tagged_sources, tmp_path):
    """torchrun (2 gloo processes, each its own shards) on multi-label tar shards (JSON label lists): the features
    and the (N, classes) label rows of one process, whichever rank wrote which shard, and one report (rank 0's)."""
    import subprocess
    import sys

    from dinoprobe.cache import store

    from conftest import REPO

    root, sources, _ = tagged_sources
    args = ["features", "--data", sources["tar"], "--weights", "random", "--image-size", SIZE, "--workers", 0,
            "--batch-size", 2, "--shard-size", 4, "--dtype", "float32"]
    run_cli(*args, "--cache", tmp_path / "one", check=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dinoprobe", *map(str, args), "--cache", str(tmp_path / "two")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("cache ") == 1 and store.verify(tmp_path / "two") == []
    assert store.read_manifest(tmp_path / "two")["task"] == "multilabel"
    for split in ("train", "val", "test"):
        one, two = (store.load(tmp_path / c, split, "cls") for c in ("one", "two"))
        order_one, order_two = np.argsort(one["index"]), np.argsort(two["index"])
        assert two["labels"].dtype == np.uint8 and len(two["labels"]) == len(one["labels"]) > 0
        np.testing.assert_array_equal(two["labels"][order_two], one["labels"][order_one])
        np.testing.assert_array_equal(two["cls"][order_two], one["cls"][order_one])
        assert list(np.asarray(two["path"])[order_two]) == list(np.asarray(one["path"])[order_one])
