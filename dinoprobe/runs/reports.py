"""What a run writes about its result: metrics.json, run.json, history.csv and the plots, from a fitted estimator
evaluated on a cache's splits."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from dinoprobe import __version__, settings
from dinoprobe.device import environment
from dinoprobe.estimators.base import sample_std
from dinoprobe.runs.metrics import (
    classification_metrics,
    multilabel_metrics,
    plot_average_precision,
    plot_confusion,
    plot_curves,
    ranked_metrics,
    top_k_hits,
)

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_acc", "val_map")


def full_scores(estimator, X, num_classes: int, probabilities: np.ndarray | None = None) -> np.ndarray:
    """predict_proba's columns (estimator.classes_, cache label ids) placed in a (rows, num_classes) matrix, so
    metrics cover every class of the cache, including any the training split lacked. `probabilities`: predict_proba's
    result on X when the caller already has it."""
    probabilities = estimator.predict_proba(X) if probabilities is None else probabilities
    columns = np.asarray(estimator.classes_, dtype=np.int64)
    if np.array_equal(columns, np.arange(num_classes)):
        return probabilities  # every class already has its column: no second (rows, classes) matrix
    out = np.zeros((len(X), num_classes))
    out[:, columns] = probabilities
    return out


def evaluate(estimator, data, splits=("val", "test"), proba=None) -> dict[str, dict]:
    """Each split's metrics from the estimator's predict_proba (or `proba`, another of its scorings, such as
    LogReg's selection model): single-label ones a block of rows at a time (`ranked_blocks`); multi-label ones
    whole, as average precision ranks every row of a class."""
    proba = proba or estimator.predict_proba
    out = {}
    for split in (s for s in splits if data.x.get(s) is not None):
        if data.multilabel:
            x = data.x[split]
            out[split] = split_metrics(estimator, full_scores(estimator, x, data.num_classes, proba(x)), data, split)
        else:
            out[split] = ranked_blocks(data, split, lambda x, rows: [(None, full_scores(estimator, x, data.num_classes,
                                                                                        proba(x)))])[None]
    return out


def ranked_blocks(data, split: str, probabilities) -> dict:
    """Single-label metrics of a split under one or more scorings, settings.scoring_rows(classes) rows at a time:
    a row's prediction and top-5 hit are all the metrics keep of it. `probabilities(block, rows)` gives (key,
    (rows, classes) probabilities) pairs for a block of rows (`rows`: its slice of the split) — one pair for an
    estimator, one per k for k-NN — and the result maps each key to its metrics."""
    x, y = data.x[split], data.y[split]
    y = y.cpu().numpy() if hasattr(y, "cpu") else np.asarray(y)
    preds, hits = {}, {}
    rows = settings.scoring_rows(data.num_classes)
    for start in range(0, max(len(x), 1), rows):
        for key, scores in probabilities(x[start:start + rows], slice(start, start + rows)):
            preds.setdefault(key, []).append(scores.argmax(1))
            hits.setdefault(key, []).append(top_k_hits(scores, y[start:start + rows], 5))
    return {key: ranked_metrics(np.concatenate(preds[key]), np.concatenate(hits[key]) if data.num_classes > 5
                                else None, y, data.classes) for key in preds}


def split_metrics(estimator, probabilities, data, split: str) -> dict:
    """A split's metrics from its probabilities: single-label, or multi-label at the estimator's thresholds."""
    if data.multilabel:
        return multilabel_metrics(probabilities, data.y[split], data.classes, estimator.thresholds_)
    return classification_metrics(probabilities, data.y[split], data.classes)


def few_shot_metrics(estimator, data, val_proba=None) -> dict | None:
    """metrics.json's `few_shot`: per try its seed, the cache `index` of its training rows and its val/test
    metrics, and mean and standard deviation over tries; None for an estimator fitted without shots.
    val_proba(try_estimator) gives the scoring of val (LogReg's train-only selection model) instead of predict_proba."""
    if getattr(estimator, "tries_", None) is None:
        return None
    per_try, summary = [], {}
    for record, fitted in zip(estimator.tries_, estimator.try_estimators_):
        metrics = {**evaluate(fitted, data, ("val",), val_proba(fitted) if val_proba else None),
                   **evaluate(fitted, data, ("test",))}
        entry = {"seed": record["seed"], "train_index": data.index["train"][record["train_index"]].tolist()}
        for split, m in metrics.items():
            entry[split] = {k: m[k] for k in ("top1", "top5", "balanced_accuracy", "n") if k in m}
        per_try.append(entry)
    for split in ("val", "test"):
        top1 = [t[split]["top1"] for t in per_try if split in t]
        if top1:
            summary[split] = {"top1_mean": float(np.mean(top1)), "top1_std": sample_std(top1)}
    return {**estimator.few_shot_, **summary, "per_try": per_try}


def write_run_files(out: Path, metrics: dict, data, config: dict, run_info: dict | None = None,
                    history: list[dict] | None = None, best_epoch: int | None = None) -> None:
    """metrics.json, run.json, confusion.png, and history.csv + curves.png when there is a history."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    info = {"config": config, "cache": data.cache_dir, "cache_fingerprint": data.manifest["fingerprint"],
            "dinoprobe_version": __version__, **(run_info or {}), "environment": environment(data.device)}
    (out / "run.json").write_text(json.dumps(info, indent=1))
    split = "test" if "test" in metrics else "val"
    if split in metrics and data.multilabel:
        m = metrics[split]
        plot_average_precision(m["per_class_ap"], out / "ap.png", f"{split} average precision per class "
                               f"(mAP {m['map_macro'] or 0:.3f}, n={m['n']})")
    elif split in metrics and "confusion_matrix" in metrics[split]:
        plot_confusion(metrics[split]["confusion_matrix"], data.classes, out / "confusion.png",
                       f"{split} confusion (top-1 {metrics[split]['top1']:.3f})")
    if history:
        write_history(out / "history.csv", history)
        what = ", ".join(f"{k} {config[k]}" for k in ("feature", "head", "optimizer", "lr") if k in config)
        title = f"{info.get('command', 'probe')} on {Path(data.cache_dir).name}: {what}"
        plot_curves(history, out / "curves.png", best_epoch, title)


def write_history(path: Path, history: list[dict]) -> None:
    fields = [k for k in HISTORY_FIELDS if k in history[0]]  # multi-label: val_map instead of the accuracies
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in fields})


def write_probe_run(out: Path, probe, data, run_info: dict | None = None) -> dict:
    """A fitted Probe (or a Sweep's best_estimator_) on a cache -> the files of a run directory; returns metrics."""
    metrics = evaluate(probe, data)
    # deterministic for a given seed on CPU (wall time lives in run.json), so runs can be diffed
    metrics.update({"best_epoch": probe.best_epoch_, "epochs_run": len(probe.history_)})
    if getattr(probe, "diverged_epoch_", None) is not None:
        metrics["diverged_epoch"] = probe.diverged_epoch_
    few_shot = few_shot_metrics(probe, data)
    if few_shot:
        metrics["few_shot"] = few_shot
    config = {"feature": data.feature, **probe.config_.to_dict()}
    probe.save(out / "head.pt", data, data.classes)
    timing = {"train_seconds": round(probe.train_seconds_, 3), "cuda_graph": getattr(probe, "cuda_graph_", False)}
    write_run_files(out, metrics, data, config, {**timing, **(run_info or {})},
                    probe.history_, probe.best_epoch_)
    return metrics
