"""Few-shot evaluation: K images per class per try, several tries side by side, mean ± std in metrics.json."""
import json

import numpy as np
import pytest
import torch

from dinoprobe import KNN, LogReg, Probe, Sweep, load_cache
from dinoprobe.errors import DinoprobeError
from dinoprobe.splits import parse_shots, sample_shots

from conftest import make_synthetic_cache, run_cli


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("fs") / "cache")


def test_tries_hold_exactly_k_per_class_differ_and_reproduce():
    labels = np.repeat(np.arange(4), [30, 30, 30, 3])
    draws = [sample_shots(labels, 5, seed) for seed in range(3)]
    for rows, short in draws:
        counts = np.bincount(labels[rows], minlength=4)
        assert counts.tolist() == [5, 5, 5, 3] and short == {3: 3}  # a short class keeps all it has
        assert len(set(rows.tolist())) == len(rows)
    assert not np.array_equal(draws[0][0], draws[1][0]) and not np.array_equal(draws[1][0], draws[2][0])
    np.testing.assert_array_equal(sample_shots(labels, 5, 1)[0], draws[1][0])
    rows, _ = sample_shots(labels, "10%", 0)
    assert np.bincount(labels[rows]).tolist() == [3, 3, 3, 1]
    for bad in ("0", "abc", "150%", -2):
        with pytest.raises(DinoprobeError):
            parse_shots(bad)


def test_probe_tries_train_side_by_side_and_equal_each_try_alone(synthetic):
    d = load_cache(synthetic)
    probe = Probe(head="linear", epochs=5, batch_size=16, shots=4, tries=3).fit(d.X_train, d.y_train,
                                                                                 X_val=d.X_val, y_val=d.y_val)
    assert len(probe.tries_) == 3 and probe.few_shot_["tries"] == 3
    for record, fitted in zip(probe.tries_, probe.try_estimators_):
        index = record["train_index"]
        assert np.bincount(d.y_train.numpy()[index]).tolist() == [4] * 6
        alone = Probe(head="linear", epochs=5, batch_size=16).fit(d.X_train[index], d.y_train[index],
                                                                  X_val=d.X_val, y_val=d.y_val)
        np.testing.assert_allclose(fitted.step_losses_, alone.step_losses_, atol=1e-5)
        assert fitted.best_score_ == alone.best_score_ == record["val_score"]
    assert (probe.predict(d.X_test) == probe.try_estimators_[0].predict(d.X_test)).all()
    assert len({tuple(r["train_index"]) for r in probe.tries_}) == 3


@pytest.mark.parametrize("estimator", [LogReg(Cs=[0.1, 1.0], shots=3, tries=2), KNN(ks=(1, 3), shots=3, tries=2),
                                       Sweep(Probe(head="linear", epochs=3, shots=3, tries=2),
                                             param_grid={"lr": [1e-3, 1e-2]})],
                         ids=lambda e: type(e).__name__)
def test_every_estimator_takes_shots_and_tries(synthetic, estimator):
    d = load_cache(synthetic)
    estimator.fit(d.X_train, d.y_train, X_val=d.X_val, y_val=d.y_val)
    tries = estimator.best_estimator_.tries_ if isinstance(estimator, Sweep) else estimator.tries_
    assert [t["seed"] for t in tries] == [0, 1] and all(len(t["train_index"]) == 18 for t in tries)
    if isinstance(estimator, Sweep):
        assert {r["tries"] for r in estimator.results_} == {2} and "val_top1_std" in estimator.results_[0]
        assert estimator.results_[0]["group_size"] == 4  # 2 configurations x 2 tries side by side
        return
    for record, fitted in zip(tries, estimator.try_estimators_):  # each try is the estimator fitted on its rows alone
        index = record["train_index"]
        alone = type(estimator)(**{**estimator.get_params(), "shots": None, "tries": 1}).fit(
            d.X_train[index], d.y_train[index], X_val=d.X_val, y_val=d.y_val)
        if isinstance(estimator, LogReg):
            np.testing.assert_allclose(fitted.selection_coef_, alone.selection_coef_, atol=1e-6)
            assert fitted.val_score_per_C_ == alone.val_score_per_C_
            # DINOv3: a few-shot model is never refit on validation labels (`alone`, without shots, is)
            assert not fitted.refit_ and alone.refit_
            np.testing.assert_allclose(fitted.coef_, alone.selection_coef_, atol=1e-6)
        else:
            assert len(fitted.bank_y_) == len(index) and fitted.val_score_per_k_ == alone.val_score_per_k_


@pytest.mark.parametrize("command,extra", [("probe", ["--head", "linear", "--epochs", 3]), ("logreg", ["--c-grid", "1"]),
                                           ("knn", ["--k", "1,3"]), ("sweep", ["--lr", "1e-3,1e-2", "--epochs", 2])])
def test_cli_writes_few_shot_metrics(synthetic, tmp_path, command, extra):
    proc = run_cli(command, "--cache", synthetic, "--out", tmp_path / "r", "--shots", 2, "--tries", 3, *extra,
                   check=True)
    run = tmp_path / "r" / ("best" if command == "sweep" else "")
    metrics = json.loads((run / "metrics.json").read_text())
    few = metrics["few_shot"]
    assert few["shots"] == "2" and few["tries"] == 3 and len(few["per_try"]) == 3
    from dinoprobe.cache import store as cache

    train = cache.load(synthetic, "train", "cls")
    label_of = dict(zip(train["index"].tolist(), train["label"].tolist()))
    for t, entry in enumerate(few["per_try"]):  # train_index: cache indices holding 2 images of each of 6 classes
        assert entry["seed"] == t
        assert np.bincount([label_of[i] for i in entry["train_index"]], minlength=6).tolist() == [2] * 6
        assert set(entry) >= {"val", "test"} and 0 <= entry["test"]["top1"] <= 1
    tops = [e["test"]["top1"] for e in few["per_try"]]
    assert few["test"]["top1_mean"] == pytest.approx(np.mean(tops))
    assert few["test"]["top1_std"] == pytest.approx(torch.tensor(tops).std().item())  # DINOv3: ddof 1
    assert "±" in proc.stdout


def test_percent_shots_and_the_carve_follow_dinov3s_formulas():
    """Per class: max(floor(n x p), 1) shots (DINOv3 floors; dinoprobe used to round up); the carve gives val
    max(1, floor(0.1 n)) rows of each class with more than one, and leaves a 1-image class in train."""
    from dinoprobe.splits import carve_indices

    sizes = [250, 150, 99, 40, 1]
    labels = np.repeat(np.arange(5), sizes)
    rows, _ = sample_shots(labels, "1%", seed=0)
    assert np.bincount(labels[rows], minlength=5).tolist() == [max(int(n * 0.01), 1) for n in sizes] == [2, 1, 1, 1, 1]
    rows, _ = sample_shots(labels, "5%", seed=0)
    assert np.bincount(labels[rows], minlength=5).tolist() == [12, 7, 4, 2, 1]
    train, val = carve_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[val], minlength=5).tolist() == [25, 15, 9, 4, 0]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    train, val = carve_indices(labels, 0.01, seed=0)  # few-shot: 1 %
    assert np.bincount(labels[val], minlength=5).tolist() == [2, 1, 1, 1, 0]


def test_few_shot_draws_are_dinov3s_draws():
    """The same images as dinov3/eval/data.py picks: one torch generator seeded by the try, classes in label order,
    each class's rows in order, the first n of a randperm (reimplemented here from that file's description)."""
    labels = np.repeat(np.arange(3), [30, 20, 10])[np.random.default_rng(0).permutation(60)]
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        expected = []
        sorted_labels, order = torch.sort(torch.from_numpy(labels), stable=True)
        for members in torch.split(order, torch.unique_consecutive(sorted_labels, return_counts=True)[1].tolist()):
            expected += members[torch.randperm(len(members), generator=generator)[:4]].tolist()
        assert sample_shots(labels, 4, seed)[0].tolist() == sorted(expected)
