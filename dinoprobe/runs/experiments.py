"""A cache in, a run directory out: what `dinoprobe probe`, `sweep`, `logreg` and `knn` do, as functions.

Each loads the cache, fits its estimator, and writes the run directory atomically (rundir.py): head.pt (except
k-NN, which has no head), metrics.json, run.json and the plots. The CLI only parses options and prints; Python
users get exactly the files the CLI writes.

    from dinoprobe import LogReg, run_logreg
    metrics = run_logreg("cache/demo", "runs/logreg", LogReg(), feature="cls")
"""
from __future__ import annotations

import time
from pathlib import Path

from sklearn.base import clone

from dinoprobe import __version__
from dinoprobe.atomic import write_json
from dinoprobe.cache.arrays import load_cache, load_features
from dinoprobe.cache.store import split_rows
from dinoprobe.device import environment, resolve_device
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.knn import KNN, SEARCH_BYTES, as_ks, neighbour_bytes
from dinoprobe.estimators.logreg import LogReg, problem_bytes
from dinoprobe.estimators.probe import Probe
from dinoprobe.estimators.sweep import Sweep
from dinoprobe.runs.reports import (
    evaluate,
    few_shot_metrics,
    full_scores,
    ranked_blocks,
    split_metrics,
    write_probe_run,
    write_run_files,
)
from dinoprobe.runs.rundir import check_run_dir, run_directory
from dinoprobe.runs.sweep_table import RESULT_FIELDS, plot_sweep, ranked, write_results
from dinoprobe.settings import VAL_CHUNK_BYTES, VAL_CHUNK_ROWS
from dinoprobe.splits import parse_shots

__all__ = ["run_probe", "run_sweep", "run_logreg", "run_knn"]

# What each method holds beside the features it loads, for the up-front memory check (arrays.memory_needed)


def knn_working(knn: KNN) -> dict:
    """k-NN: the L2-normalised bank (one float32-sized copy), a block of similarities, and val's nearest max(ks)
    (at most the train rows) kept from fit."""
    def search_bytes(manifest: dict, width: int) -> int:
        rows = split_rows(manifest)
        return SEARCH_BYTES + neighbour_bytes(rows.get("val", 0), min(max(as_ks(knn.ks), default=0), rows.get("train", 0)))
    return {"working_copies": 1, "working_bytes": search_bytes}


def logreg_working(logreg: LogReg) -> dict:
    """Logistic regression: train and val normalised in the solver's float64 (two float32-sized copies), and one C
    value's L-BFGS working set (rows x classes in float64, `problem_bytes`) on the rows it fits at once: train + val
    for the refit, a try's draw in few-shot."""
    def solver_bytes(manifest: dict, width: int) -> int:
        rows = split_rows(manifest)
        classes = len(manifest["classes"])
        fitted = rows.get("train", 0) + rows.get("val", 0)
        if logreg.shots is not None:
            kind, amount = parse_shots(logreg.shots)
            drawn = amount * classes if kind == "count" else rows.get("train", 0) * amount / 100 + classes
            fitted = min(int(drawn), rows.get("train", 0))
        return problem_bytes(fitted, width, classes)
    return {"working_copies": 2, "working_bytes": solver_bytes}


def heads_working(configs) -> dict:
    """Probe and sweep: a normalised copy of train and val while a head that normalises trains, and each epoch's
    evaluation of val, a chunk of rows at a time (their logits and hidden activations, at most VAL_CHUNK_BYTES)."""
    configs = list(configs)
    hidden = max((c.hidden for c in configs if c.head == "mlp"), default=0)

    def val_chunk_bytes(manifest: dict, width: int) -> int:
        val = split_rows(manifest).get("val", 0)
        return min(VAL_CHUNK_BYTES, min(val, VAL_CHUNK_ROWS) * 4 * (len(manifest["classes"]) + hidden))
    return {"working_copies": int(any(c.normalize != "none" for c in configs)), "working_bytes": val_chunk_bytes}


def _check(cache_dir, out, overwrite: bool, estimator, kind, command: str) -> None:
    """Refuse a bad request before the cache is read: a wrong estimator type, an --out that is taken (or is not
    ours to replace, or overlaps the cache), a cache path that is not a folder."""
    if not isinstance(estimator, kind):
        raise DinoprobeError(f"expected a {kind.__name__}, got {type(estimator).__name__}")
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise DinoprobeError(f"--cache '{cache_dir}' is a file; pass the cache folder that `dinoprobe features` "
                             "wrote (the one holding manifest.json)")
    check_run_dir(Path(out), overwrite, command, protect=[cache_dir])


def by_class_index(class_weight, data):
    """class_weight as the user names it — "balanced", or {class name: weight} — for the estimator, whose classes
    are the cache's label indices."""
    if not isinstance(class_weight, dict):
        return class_weight
    index = {name: i for i, name in enumerate(data.classes)}
    unknown = [k for k in class_weight if k not in index and k not in range(len(data.classes))]
    if unknown:
        raise DinoprobeError(f"--class-weight names {unknown[:5]}, which are not classes of the cache "
                             f"({', '.join(data.classes[:10])})")
    return {index.get(k, k): v for k, v in class_weight.items()}


def train_mode(data, max_memory: int | None) -> dict:
    """How training read its features: in memory, as augmented views, or streamed from disk (which visits rows in
    a buffered order, so its results differ from in-memory training's)."""
    if data.stream is not None:
        return {"mode": "streamed", "shards": len(data.stream.rows), "shards_per_buffer": data.stream.buffer_shards,
                "max_memory": max_memory}
    return {"mode": "views" if data.train_views is not None else "in memory", "max_memory": max_memory}


def run_probe(cache_dir, out, probe: Probe, *, feature: str = "cls", views: bool = False,
              max_memory: int | None = None, overwrite: bool = False) -> dict:
    """Fit `probe` on a cache's train split (best epoch on val) and write its run directory; returns metrics."""
    _check(cache_dir, out, overwrite, probe, Probe, "probe")
    config = probe.train_config()  # bad settings fail here, before the cache is read
    data = load_cache(cache_dir, feature, resolve_device(probe.device), views=views, max_memory=max_memory,
                      **heads_working([config]))
    probe.set_params(class_weight=by_class_index(probe.class_weight, data))
    probe.fit(data.X_train, data.y_train, X_val=data.x.get("val"), y_val=data.y.get("val"))
    mode = train_mode(data, max_memory)
    with run_directory(out, overwrite, "probe", [cache_dir]) as tmp:
        metrics = write_probe_run(tmp, probe, data, {"command": "probe", "train_features": mode})
    return {**metrics, "train_features": mode}


def run_sweep(cache_dir, out, sweep: Sweep, *, features=("cls",), views: bool = False,
              max_memory: int | None = None, overwrite: bool = False) -> tuple[list[dict], dict]:
    """Fit `sweep` once per feature spec (each shard read once for all of them), rank every configuration of every
    feature on val, and write results.csv/json, sweep.png and the best head's run in best/. Returns (ranked rows,
    the best run's metrics)."""
    _check(cache_dir, out, overwrite, sweep, Sweep, "sweep")
    if isinstance(features, str) or not features:
        raise DinoprobeError("features must be a non-empty list of feature specs, e.g. ['cls', 'cls4+patch_mean']")
    configs = sweep.configurations()  # a bad grid fails here, before the cache is read
    device = resolve_device(sweep.base_estimator().device)
    loaded = load_features(cache_dir, list(features), device, views=views, max_memory=max_memory,
                           **heads_working(c for _, c in configs))
    rows, best = [], None
    for name, data in loaded.items():
        search = clone(sweep)
        base = search.base_estimator()
        search.set_params(estimator=base.set_params(class_weight=by_class_index(base.class_weight, data)))
        search.fit(data.X_train, data.y_train, X_val=data.x.get("val"), y_val=data.y.get("val"))
        rows += [{"feature": name, **cfg.to_dict(), **{k: r[k] for k in RESULT_FIELDS if k in r}}
                 for cfg, r in zip(search.configs_, search.results_)]
        if best is None or search.best_score_ > best[0].best_score_:
            best = (search, data)
    rows = ranked(rows)
    with run_directory(out, overwrite, "sweep", [cache_dir]) as tmp:
        write_results(tmp, rows)
        plot_sweep(rows, tmp / "sweep.png", title=f"sweep on {Path(cache_dir).name} ({Path(out).name})")
        (tmp / "best").mkdir()
        mode = train_mode(best[1], max_memory)
        metrics = write_probe_run(tmp / "best", best[0].best_estimator_, best[1],
                                  {"command": "probe", "sweep": str(out), "train_features": mode})
        write_json(tmp / "run.json", {"command": "sweep", "cache": str(cache_dir), "features": list(features),
                                      "configurations": len(rows), "train_features": mode,
                                      "dinoprobe_version": __version__, "environment": environment(best[1].device)})
    return rows, {**metrics, "train_features": mode}


def run_logreg(cache_dir, out, logreg: LogReg, *, feature: str = "cls", overwrite: bool = False) -> dict:
    """DINOv3's logistic-regression protocol on a cache: C chosen on val, refit on train + val, scored on test.
    The val metrics are the train-only model's at the chosen C (the refit has seen val)."""
    _check(cache_dir, out, overwrite, logreg, LogReg, "logreg")
    data = load_cache(cache_dir, feature, resolve_device(logreg.device), require_val=False, streamable=False,
                      **logreg_working(logreg))
    logreg.set_params(class_weight=by_class_index(logreg.class_weight, data))
    start = time.perf_counter()
    logreg.fit(data.X_train, data.y_train, X_val=data.x.get("val"), y_val=data.y.get("val"))
    seconds = time.perf_counter() - start

    # val is scored by the train-only model at the chosen C (selection_predict_proba): the refit has seen val
    metrics = {**evaluate(logreg, data, ("val",), logreg.selection_predict_proba), **evaluate(logreg, data, ("test",))}
    few_shot = few_shot_metrics(logreg, data, lambda fitted: fitted.selection_predict_proba)
    if few_shot:
        metrics["few_shot"] = few_shot
    metrics.update({"best_c": logreg.best_C_, "c_grid": logreg.Cs_,
                    ("val_map_per_c" if data.multilabel else "val_accuracy_per_c"): logreg.val_score_per_C_})
    config = {"method": "logreg", "feature": feature, "normalize": logreg.normalize, "solver": logreg.solver,
              "max_iter": logreg.max_iter}
    with run_directory(out, overwrite, "logreg", [cache_dir]) as tmp:
        logreg.save(tmp / "head.pt", data, data.classes)
        write_run_files(tmp, metrics, data, config, {"command": "logreg", "fit_seconds": round(seconds, 3)})
    return metrics


def run_knn(cache_dir, out, knn: KNN, *, feature: str = "cls", overwrite: bool = False) -> dict:
    """DINO's weighted k-NN on a cache: k chosen on val; top-1 for every k on val and test. No head.pt: k-NN
    predicts from the training features themselves."""
    _check(cache_dir, out, overwrite, knn, KNN, "knn")
    data = load_cache(cache_dir, feature, resolve_device(knn.device), streamable=False, **knn_working(knn))
    knn.fit(data.X_train, data.y_train, X_val=data.x.get("val"), y_val=data.y.get("val"))
    per_k, x_val = {"val": knn.val_score_per_k_}, data.x["val"]
    # val at the chosen k from the neighbours fit found: val is searched once
    if data.multilabel:
        metrics = {"val": split_metrics(knn, full_scores(knn, x_val, data.num_classes, knn.val_proba()), data, "val")}
    else:
        metrics = {"val": ranked_blocks(data, "val", lambda x, rows: [(None, full_scores(
            knn, x, data.num_classes, knn.val_proba(rows)))])[None]}
    if data.x.get("test") is not None:  # one neighbour search gives every k's test score and the chosen k's metrics
        with knn.searching(len(data.x["test"]), "k-NN: test"):
            if data.multilabel:  # average precision ranks every row: whole probabilities, one k at a time
                by_k = {k: split_metrics(knn, full_scores(knn, data.x["test"], data.num_classes, p), data, "test")
                        for k, p in knn.iter_proba_per_k(data.x["test"])}
            else:  # a block of rows at a time, every k from the block's one search
                by_k = ranked_blocks(data, "test", lambda x, rows: ((k, full_scores(knn, x, data.num_classes, p))
                                                                    for k, p in knn.iter_proba_per_k(x)))
        metrics["test"] = by_k[knn.best_k_]
        per_k["test"] = {k: m["map_macro" if data.multilabel else "top1"] for k, m in by_k.items()}
    metrics.update({"k": knn.best_k_, "temperature": knn.temperature,
                    ("map_per_k" if data.multilabel else "top1_per_k"): per_k})
    few_shot = few_shot_metrics(knn, data)
    if few_shot:
        metrics["few_shot"] = few_shot
    with run_directory(out, overwrite, "knn", [cache_dir]) as tmp:
        write_run_files(tmp, metrics, data, {"method": "knn", "feature": feature, "k": list(knn.ks),
                                             "temperature": knn.temperature}, {"command": "knn"})
    return metrics
