"""Few-shot evaluation: K images per class per try, several tries side by side, mean ± std in metrics.json."""
import json

import numpy as np
import pytest

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
    assert few["test"]["top1_std"] == pytest.approx(np.std(tops))
    assert "±" in proc.stdout
