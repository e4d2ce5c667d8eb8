"""`dinoprobe sweep`, `logreg` and `knn` from the command line, and the solvers behind them."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoprobe import Sweep
from dinoprobe.cache import store as cache
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.knn import knn_scores
from dinoprobe.estimators.logreg import fit_logreg_batched, fit_logreg_sklearn
from dinoprobe.settings import DINOV3_LINEAR_LRS

from conftest import assert_clean_error, make_synthetic_cache, run_cli


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache")


def test_sweep_cli_writes_table_plot_and_a_best_run(synthetic, tmp_path):
    proc = run_cli("sweep", "--cache", synthetic, "--out", tmp_path / "s", "--head", "linear,mlp",
                   "--lr", "1e-3,1e-2", "--epochs", 3, "--batch-size", 64, "--feature", "cls,cls+patch_mean",
                   check=True)
    assert "val_top1" in proc.stdout and "8 configs trained" in proc.stdout
    with open(tmp_path / "s" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    vals = [float(r["val_top1"]) for r in rows]
    assert len(rows) == 8 and vals == sorted(vals, reverse=True)
    assert {"feature", "head", "lr", "weight_decay", "epochs", "best_epoch", "val_top1", "group_seconds"} <= set(rows[0])
    assert {r["feature"] for r in rows} == {"cls", "cls+patch_mean"}
    assert len(json.loads((tmp_path / "s" / "results.json").read_text())) == 8
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((tmp_path / "s" / "best" / "metrics.json").read_text())
    assert best["val"]["top1"] == pytest.approx(vals[0]) and "test" in best
    raw = torch.load(tmp_path / "s" / "best" / "head.pt", weights_only=True)
    assert raw["head"]["kind"] == rows[0]["head"] and raw["feature"] == rows[0]["feature"]
    assert_clean_error(run_cli("sweep", "--cache", synthetic, "--out", tmp_path / "s", "--lr", "1e-3"),
                       "already exists")


# The reference code's defaults, read off the files named (the test holds dinoprobe's protocols to them)
REFERENCE = {
    "dinov3-linear": {  # facebookresearch/dinov3 dinov3/eval/linear.py
        "lrs": (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1),  # _DEFAULT_LR_LIST
        "batch_size": 128, "epochs": 10, "epoch_length": 1250,  # TrainConfig
        "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0,  # OptimizerType.SGD.get_optimizer
        "init": "normal",  # LinearClassifier: weight.normal_(0, 0.01), bias.zero_()
        "select": "last",  # heads evaluated after the last iteration; best on val
        "warmup_epochs": 0,  # CosineAnnealingLR(optimizer, max_iter, eta_min=0)
        "features": ("cls+patch_mean",),  # n_last_blocks_list=(1,), `for avgpool in [True]`
    },
    "dinov2-linear": {  # facebookresearch/dinov2 dinov2/eval/linear.py
        "lrs": (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1),
        "batch_size": 128, "epochs": 10, "epoch_length": 1250, "optimizer": "sgd", "momentum": 0.9,
        "weight_decay": 0.0, "init": "normal", "select": "last", "warmup_epochs": 0,
        "features": ("cls", "cls+patch_mean", "cls4", "cls4+patch_mean"),  # n in [1, 4] x avgpool in [False, True]
    },
    "dinov3-logreg": {"normalize": "none", "tol": 1e-12, "max_iter": 1000, "val_carve": 0.1,  # log_regression.py
                      "val_carve_few_shot": 0.01},
    "dinov3-knn": {"ks": (10, 20, 100, 200), "temperature": 0.07},  # dinov3/eval/knn.py
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_each_protocol_is_its_reference_codes_defaults(name):
    from dinoprobe.settings import PROTOCOLS

    assert {k: PROTOCOLS[name][k] for k in REFERENCE[name]} == REFERENCE[name]
    assert PROTOCOLS[name]["source"].split()[-1].startswith(("dinov3/eval/", "dinov2/eval/"))
    if name.endswith("linear"):  # and the sweep the preset builds is exactly that
        grid = Sweep(preset=name).grid()
        fixed = {k: grid[k] for k in ("batch_size", "epochs", "epoch_length", "optimizer", "momentum",
                                      "weight_decay", "init", "select", "warmup_epochs")}
        assert fixed == {k: [REFERENCE[name][k]] for k in fixed} and grid["head"] == ["linear"]
        assert grid["lr"] == pytest.approx([lr * 128 / 256 for lr in REFERENCE[name]["lrs"]])


def test_dinov3_logreg_c_grid_is_dinov3s_float32_grid():
    from dinoprobe.estimators.logreg import DINOV3_C_GRID

    # float32 values, as log_regression.py's 10 ** torch.linspace(-6, 5, 45) gives them: checked independently of
    # torch, against numpy's float64 grid rounded to float32 (equal to within float32's own rounding)
    grid64 = 10 ** np.linspace(-6, 5, 45)
    assert len(DINOV3_C_GRID) == 45 and DINOV3_C_GRID[0] == float(np.float32(1e-6)) != 1e-6
    np.testing.assert_allclose(DINOV3_C_GRID, grid64.astype(np.float32), rtol=1e-6)
    assert all(float(np.float32(c)) == c for c in DINOV3_C_GRID)  # every value is a float32


def test_dinov3_preset_scales_its_13_lrs_by_the_batch_it_is_given():
    search = Sweep(preset="dinov3-linear", param_grid={"batch_size": [1024], "weight_decay": [0, 1e-4]})
    grid = search.grid()
    assert grid["head"] == ["linear"] and grid["optimizer"] == ["sgd"] and grid["momentum"] == [0.9]
    assert len(grid["lr"]) == 13 and grid["lr"][0] == pytest.approx(DINOV3_LINEAR_LRS[0] * 4)
    assert grid["lr"][-1] == pytest.approx(0.4) and len(search.configurations()) == 26


def test_preset_from_the_cli(synthetic, tmp_path):
    """On a cache without per-block CLS tokens: the preset's 13 learning rates on the features asked for, and
    the preset's own feature grid refused with the option that adds what it needs."""
    run_cli("sweep", "--cache", synthetic, "--out", tmp_path / "p", "--preset", "dinov3-linear", "--epochs", 2,
            "--epoch-length", 20, check=True)
    rows = json.loads((tmp_path / "p" / "results.json").read_text())
    assert len(rows) == 13 and {r["optimizer"] for r in rows} == {"sgd"} and {r["group"] for r in rows} == {0}
    assert {r["feature"] for r in rows} == {"cls+patch_mean"} and {r["epoch_length"] for r in rows} == {20}
    assert {r["best_epoch"] for r in rows} == {2}  # the final iteration's heads
    assert_clean_error(run_cli("sweep", "--cache", synthetic, "--out", tmp_path / "q", "--preset", "dinov2-linear"),
                       "--last-blocks 4")


def test_unknown_grid_option_and_bad_values():
    with pytest.raises(DinoprobeError, match="unknown grid parameters"):
        Sweep(param_grid={"colour": ["red"]}).configurations()
    with pytest.raises(DinoprobeError, match="lr must be > 0"):
        Sweep(param_grid={"lr": [-1.0]}).configurations()


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
    ws, bs, _ = fit_logreg_sklearn(x_tr, train["label"], cs)
    xt, yt = torch.tensor(x_te), torch.tensor(test["label"])
    ours = ((xt @ w.transpose(1, 2) + b[:, None]).argmax(-1) == yt).float().mean(1)
    reference = ((xt @ ws.transpose(1, 2) + bs[:, None]).argmax(-1) == yt).float().mean(1)
    assert (ours - reference).abs().max() <= 0.002  # within 0.2 accuracy points, every C
    # the same solution, not just the same accuracy: scikit-learn's objective, C * sum CE + ||W||^2 / 2, and the
    # model's probabilities (softmax is blind to a shift of all intercepts, so compare what it gives)
    x, y = torch.tensor(x_tr, dtype=torch.float64), torch.tensor(train["label"])

    def objective(w, b, c):
        logits = x @ w.double().t() + b.double()
        return c * F.cross_entropy(logits, y, reduction="sum").item() + 0.5 * (w.double() ** 2).sum().item()

    for i, c in enumerate(cs):
        assert objective(w[i], b[i], c) == pytest.approx(objective(ws[i], bs[i], c), rel=1e-4)
        torch.testing.assert_close((xt @ w[i].t() + b[i]).softmax(1), (xt @ ws[i].t() + bs[i]).softmax(1),
                                   atol=2e-3, rtol=0)


def test_logreg_cli_gives_a_head_that_predict_format_accepts(synthetic, tmp_path):
    proc = run_cli("logreg", "--cache", synthetic, "--out", tmp_path / "l", "--c-grid", "1e-6,0.01,1", check=True)
    assert "best C" in proc.stdout
    metrics = json.loads((tmp_path / "l" / "metrics.json").read_text())
    assert {"val", "test", "best_c", "val_accuracy_per_c"} <= set(metrics) and 0 < metrics["test"]["top1"] <= 1
    assert metrics["best_c"] == [1e-6, 0.01, 1][int(np.argmax(metrics["val_accuracy_per_c"]))] != 1e-6
    from dinoprobe.train.headfile import load_head_file

    assert load_head_file(tmp_path / "l").spec.kind == "linear"


def test_knn_scores_match_sklearn_weighted_neighbours(synthetic):
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
    assert set(metrics["top1_per_k"]["test"]) == {"5", "10", "600"} and "chosen k" in proc.stdout
    assert_clean_error(run_cli("knn", "--cache", tmp_path / "nope", "--out", tmp_path / "k2"), "does not exist")
    for command in (["predict", "--run", tmp_path / "k", "photo.jpg"], ["export", "--run", tmp_path / "k", "--out",
                                                                        tmp_path / "k.pt"]):
        assert_clean_error(run_cli(*command), "is a k-NN run", "predict with a probe, sweep or logreg run")


def test_knn_run_searches_each_split_once_and_reports_what_the_estimator_scores(synthetic, tmp_path, monkeypatch):
    """run_knn: one neighbour search per split (fit's on val, whose neighbours also give the chosen k's val metrics;
    one on test giving every k), and the metrics it writes are those of the fitted KNN's own predict_proba (a search
    of its own, here) and score_per_k."""
    from dinoprobe.cache.arrays import load_cache
    from dinoprobe.estimators import knn as knn_module
    from dinoprobe.runs.experiments import run_knn
    from dinoprobe.runs.reports import evaluate

    searches = []
    real = knn_module.knn_neighbours  # every search goes through it (knn_scores and fit's included)
    monkeypatch.setattr(knn_module, "knn_neighbours", lambda bank_x, query_x, *a, **kw: searches.append(
        len(query_x)) or real(bank_x, query_x, *a, **kw))
    from dinoprobe import settings

    monkeypatch.setattr(settings, "SCORING_ROWS_PER_BLOCK", 48)  # each split scored in blocks
    estimator = knn_module.KNN(ks=(5, 10, 1000))
    metrics = run_knn(synthetic, tmp_path / "k", estimator)
    data = load_cache(synthetic, "cls", "cpu")
    assert searches == [48, 48, 48, 48, 8] * 2  # val's blocks (fit), test's: each row searched once
    monkeypatch.setattr(knn_module, "knn_neighbours", real)
    assert metrics["val"] == evaluate(estimator, data, splits=("val",))["val"]  # val searched again, the same
    assert metrics["test"] == evaluate(estimator, data, splits=("test",))["test"]
    assert metrics["top1_per_k"]["test"] == pytest.approx(estimator.score_per_k(data.x["test"], data.y["test"]))
    assert metrics["top1_per_k"]["val"] == pytest.approx(estimator.score_per_k(data.x["val"], data.y["val"]))


def test_a_multilabel_knn_run_searches_val_once_and_tunes_what_a_new_search_would(tmp_path, monkeypatch):
    """Multi-label k-NN: fit's one search of val gives the chosen k, the thresholds (F1 on val) and the val
    metrics — each equal to what a new search of val gives (it searched val three times)."""
    from dinoprobe.cache.arrays import load_cache
    from dinoprobe.estimators import knn as knn_module
    from dinoprobe.runs.experiments import run_knn
    from dinoprobe.runs.reports import evaluate
    from dinoprobe.train.ranking import f1_thresholds

    cache = make_synthetic_cache(tmp_path / "tags", n=(300, 100, 100), dim=8, num_classes=5, multilabel=True)
    searches, real = [], knn_module.knn_neighbours
    monkeypatch.setattr(knn_module, "knn_neighbours", lambda bank_x, query_x, *a, **kw: searches.append(
        len(query_x)) or real(bank_x, query_x, *a, **kw))
    estimator = knn_module.KNN(ks=(5, 20))
    metrics = run_knn(cache, tmp_path / "k", estimator)
    assert searches == [100, 100]  # val (fit), test
    monkeypatch.setattr(knn_module, "knn_neighbours", real)
    data = load_cache(cache, "cls", "cpu")
    fresh = estimator.predict_proba(data.x["val"])  # a search of its own
    assert np.array_equal(estimator.val_proba(), fresh)
    assert np.array_equal(estimator.thresholds_, f1_thresholds(torch.from_numpy(fresh), data.y["val"]).numpy())
    assert metrics["val"] == evaluate(estimator, data, splits=("val",))["val"]


def test_logreg_shows_its_progress_and_refuses_non_finite_cs(synthetic, capsys):
    """A long logreg run shows a bar per L-BFGS iteration with the C values still running; bad Cs are refused."""
    from dinoprobe import LogReg, load_cache

    d = load_cache(synthetic, "cls")
    LogReg(Cs=[0.01, 1.0, 100.0], progress=True).fit(d.X_train, d.y_train, X_val=d.X_val, y_val=d.y_val)
    err = capsys.readouterr().err
    assert "logreg: 3 C values" in err and "running=" in err and "/3 C" in err and "refit on train + val" in err
    for cs in ([float("nan")], [float("inf")], [-1.0], []):
        with pytest.raises(ValueError, match="Cs must be positive finite"):
            LogReg(Cs=cs).fit(d.X_train, d.y_train, X_val=d.X_val, y_val=d.y_val)


def test_sweep_plot_keeps_identical_curves_apart_and_marks_the_best(tmp_path):
    from dinoprobe.runs.sweep_table import plot_sweep, ranked

    rows = ranked([{"lr": lr, "head": head, "weight_decay": wd, "val_top1": 0.5 + (lr == 1e-2 and head == "mlp") / 4}
                   for lr in (1e-3, 1e-2) for head in ("linear", "mlp") for wd in (0, 1e-4)])
    fig = plot_sweep(rows, tmp_path / "sweep.png", title="sweep demo")
    ax = fig.axes[0]
    lines = [line for line in ax.lines if line.get_label() != "_nolegend_"]
    assert len(lines) == 4 and len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 4
    heights = [tuple(line.get_ydata()) for line in lines]
    assert len(set(heights)) == 4  # identical curves (weight decay changes nothing here) are nudged apart
    best = [c for c in ax.collections if "best" in c.get_label()]
    assert best and tuple(best[0].get_offsets()[0]) == (1e-2, 0.75)
    assert ax.get_title().startswith("sweep demo")


def test_curves_plot_is_titled_with_the_run(synthetic, tmp_path, monkeypatch):
    from dinoprobe.runs import reports

    titles, real = [], reports.plot_curves
    monkeypatch.setattr(reports, "plot_curves", lambda *a: titles.append(a[3]) or real(*a))
    run_cli("probe", "--cache", synthetic, "--out", tmp_path / "r", "--head", "linear", "--lr", "0.01", "--epochs", 2,
            check=True)
    assert titles == ["probe on cache: feature cls, head linear, optimizer adam, lr 0.01"]
    assert titles[0] in [t.get_text() for t in real([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_acc": 0.5}],
                                                     tmp_path / "c.png", 1, titles[0]).texts]


def test_logreg_chunks_the_c_grid_to_its_memory_budget_without_changing_a_result(synthetic):
    """1,000 classes on 1,000 rows once needed 8 GB for the 45 C values at once; chunks bound it, same solutions."""
    from dinoprobe.estimators.logreg import problem_bytes

    train = cache.load(synthetic, "train", "cls")
    x, y = torch.tensor(train["cls"], dtype=torch.float64), torch.tensor(train["label"])
    cs = [1e-3, 1e-1, 10.0]
    whole = fit_logreg_batched(x, y, 6, cs)
    one_at_a_time = fit_logreg_batched(x, y, 6, cs, max_bytes=problem_bytes(len(x), x.shape[1], 6))
    for a, b in zip(whole[:2], one_at_a_time[:2]):
        torch.testing.assert_close(a, b)
    assert whole[2] == one_at_a_time[2]
    assert problem_bytes(1000, 384, 1000) * 45 > 2 * 2**30  # the reported case: over the 2 GiB default, so chunked


@pytest.mark.parametrize("classes", [2, 5])
def test_dinov3_logreg_is_scikit_learns_logistic_regression_at_tol_1e12(classes):
    """The DINOv3 way on raw arrays: each C of (a stride of) DINOv3's grid fitted by scikit-learn with tol=1e-12,
    C chosen on val accuracy (the first best), refit on train + val: the same C, the same coefficients. Tolerance:
    both stop at a gradient of 1e-12 on a strictly convex problem, so they agree to far better than 1e-4 (the bound
    used) unless L-BFGS stops early, which the iteration cap of 1,000 makes visible in n_iter_."""
    from sklearn.linear_model import LogisticRegression

    from dinoprobe import LogReg
    from dinoprobe.estimators.logreg import DINOV3_C_GRID

    rng = np.random.default_rng(classes)
    centres = rng.normal(0, 1.0, (classes, 12))
    y = rng.integers(0, classes, 400)
    x = (centres[y] + rng.normal(0, 1.5, (400, 12))) * 3.0  # raw: not standardised
    xt, yt, xv, yv = x[:300], y[:300], x[300:], y[300:]
    cs = list(DINOV3_C_GRID[::6])
    ours = LogReg.dinov3(Cs=cs).fit(xt, yt, X_val=xv, y_val=yv)
    accs = [LogisticRegression(C=c, tol=1e-12, max_iter=1000).fit(xt, yt).score(xv, yv) for c in cs]
    best = cs[int(np.argmax(accs))]
    assert ours.best_C_ == best and ours.val_score_per_C_ == pytest.approx(accs)
    final = LogisticRegression(C=best, tol=1e-12, max_iter=1000).fit(np.concatenate([xt, xv]), np.concatenate([yt, yv]))
    coef = ours.coef_.double().numpy()
    if classes == 2:  # scikit-learn's single logit is our second row minus the first (held at zero)
        np.testing.assert_allclose(coef[1] - coef[0], final.coef_[0], atol=1e-4, rtol=1e-4)
    else:
        np.testing.assert_allclose(coef, final.coef_, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.predict_proba(xt), final.predict_proba(xt), atol=1e-4)


@pytest.mark.parametrize("class_weight", ["balanced", {0: 3.0, 2: 0.5}])
def test_class_weighted_logreg_is_scikit_learns(class_weight):
    """class_weight as scikit-learn's LogisticRegression takes it: the same C on val, the same coefficients."""
    from sklearn.linear_model import LogisticRegression

    from dinoprobe import LogReg

    rng = np.random.default_rng(7)
    y = rng.choice(3, 400, p=[0.7, 0.2, 0.1])  # imbalanced
    x = rng.normal(0, 1.0, (3, 10))[y] + rng.normal(0, 1.5, (400, 10))
    xt, yt, xv, yv = x[:300], y[:300], x[300:], y[300:]
    cs = [0.01, 0.1, 1.0, 10.0]
    ours = LogReg(Cs=cs, normalize="none", tol=1e-10, class_weight=class_weight).fit(xt, yt, X_val=xv, y_val=yv)
    accs = [LogisticRegression(C=c, tol=1e-10, max_iter=1000, class_weight=class_weight).fit(xt, yt).score(xv, yv)
            for c in cs]
    assert ours.best_C_ == cs[int(np.argmax(accs))]
    final = LogisticRegression(C=ours.best_C_, tol=1e-10, max_iter=1000, class_weight=class_weight).fit(
        np.concatenate([xt, xv]), np.concatenate([yt, yv]))
    np.testing.assert_allclose(ours.coef_.double().numpy(), final.coef_, atol=1e-4, rtol=1e-4)
    plain = LogReg(Cs=[ours.best_C_], normalize="none", tol=1e-10).fit(xt, yt, X_val=xv, y_val=yv)
    assert not np.allclose(plain.coef_, ours.coef_, atol=1e-3)  # the weights were used
    with pytest.raises(ValueError, match="not among the classes"):
        LogReg(class_weight={9: 1.0}).fit(xt, yt)


def test_class_weighted_probe_is_the_engines_weighted_loss_with_scikit_learns_weights(synthetic):
    from sklearn.utils.class_weight import compute_class_weight

    from dinoprobe import Probe, load_cache
    from dinoprobe.train.config import TrainConfig
    from dinoprobe.train.loop import train_heads

    d = load_cache(synthetic)
    probe = Probe(head="linear", epochs=3, class_weight="balanced").fit(d.X_train, d.y_train, X_val=d.X_val,
                                                                        y_val=d.y_val)
    w = torch.tensor(compute_class_weight("balanced", classes=np.arange(6), y=d.y_train.numpy()), dtype=torch.float32)
    direct, = train_heads([TrainConfig(head="linear", epochs=3)], d.X_train, d.y_train, d.X_val, d.y_val, 6,
                          class_weights=w)
    np.testing.assert_allclose(probe.step_losses_, direct.step_losses, atol=1e-6)


def test_class_weight_from_the_command_line(synthetic, tmp_path):
    for command, extra in (("probe", ["--epochs", 2, "--head", "linear"]), ("logreg", ["--c-grid", "1"]),
                           ("sweep", ["--epochs", 2, "--lr", "1e-3,1e-2"])):
        run_cli(command, "--cache", synthetic, "--out", tmp_path / command, "--class-weight", "class_0=3,class_5=0.5",
                *extra, check=True)
        run_cli(command, "--cache", synthetic, "--out", tmp_path / f"{command}-b", "--class-weight", "balanced",
                *extra, check=True)
        assert_clean_error(run_cli(command, "--cache", synthetic, "--out", tmp_path / f"{command}-x",
                                   "--class-weight", "zebra=2", *extra), "zebra")
    assert run_cli("probe", "--cache", synthetic, "--out", tmp_path / "y", "--class-weight", "a=-1").returncode == 2
    weighted = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    plain = run_cli("probe", "--cache", synthetic, "--out", tmp_path / "p", "--epochs", 2, "--head", "linear",
                    check=True)
    assert plain.returncode == 0 and json.loads((tmp_path / "p" / "metrics.json").read_text()) != weighted


def test_knn_holds_one_ks_probabilities_at_a_time(synthetic, tmp_path, monkeypatch):
    """At 10,000 classes and 100,000 queries one k's probabilities are 8 GB: run_knn scores each k and lets it go
    before the next is computed, from one neighbour search."""
    import weakref

    from dinoprobe.estimators import knn as knn_module
    from dinoprobe.runs.experiments import run_knn

    alive, most = [], []
    real = knn_module.KNN._probabilities

    def tracked(self, votes):
        most.append(sum(ref() is not None for ref in alive))  # earlier ks' arrays still held when this one starts
        result = real(self, votes)
        alive.append(weakref.ref(result))
        return result

    monkeypatch.setattr(knn_module.KNN, "_probabilities", tracked)
    run_knn(synthetic, tmp_path / "k", knn_module.KNN(ks=(1, 2, 5, 10, 20)))
    assert len(most) == 6 and max(most) <= 1, most  # val metrics at the chosen k, then test's five ks


def test_knn_scores_test_a_block_of_rows_at_a_time_with_the_numbers_of_the_whole(synthetic, tmp_path, monkeypatch):
    from dinoprobe.estimators import knn as knn_module
    from dinoprobe.runs.experiments import run_knn

    whole = run_knn(synthetic, tmp_path / "whole", knn_module.KNN(ks=(1, 5, 20)))
    rows, real = [], knn_module.KNN.iter_proba_per_k
    monkeypatch.setattr(knn_module.KNN, "iter_proba_per_k", lambda self, X: rows.append(len(X)) or real(self, X))
    from dinoprobe import settings

    monkeypatch.setattr(settings, "SCORING_ROWS_PER_BLOCK", 64)
    blocks = run_knn(synthetic, tmp_path / "blocks", knn_module.KNN(ks=(1, 5, 20)))
    assert blocks == whole
    assert rows and max(rows) == 64 and sum(rows) == 200  # the test split, 64 rows at a time


def test_knn_chooses_k_on_validation_blocks_with_the_numbers_of_the_whole(synthetic, monkeypatch):
    from dinoprobe.cache.arrays import load_cache
    from dinoprobe.estimators import knn as knn_module

    data = load_cache(synthetic, "cls", "cpu")
    fit = lambda: knn_module.KNN(ks=(1, 5, 20, 50)).fit(data.X_train, data.y_train, X_val=data.x["val"],  # noqa: E731
                                                        y_val=data.y["val"])
    whole = fit()
    expected = {k: float((s.argmax(1) == data.y["val"]).float().mean()) for k, s in knn_module.knn_scores(
        data.X_train, data.y_train, data.x["val"], 6, (1, 5, 20, 50)).items()}
    rows, real = [], knn_module.knn_neighbours
    monkeypatch.setattr(knn_module, "knn_neighbours", lambda bx, q, *a, **kw: rows.append(len(q)) or real(
        bx, q, *a, **kw))
    from dinoprobe import settings

    monkeypatch.setattr(settings, "SCORING_ROWS_PER_BLOCK", 48)
    blocks = fit()
    assert blocks.val_score_per_k_ == whole.val_score_per_k_ == pytest.approx(expected)
    assert blocks.best_k_ == whole.best_k_ and rows == [48, 48, 48, 48, 8]  # 200 validation rows
