"""Run directories and head files.

A run directory holds head.pt (weights_only-loadable), metrics.json, run.json, history.csv and plots. It is
written into a temporary sibling and renamed into place when complete, so a crash or Ctrl-C leaves the previous
run whole or the new one whole, never a mix; an existing run is replaced only when asked (--overwrite).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinoprobe import __version__
from dinoprobe.errors import DinoprobeError
from dinoprobe.heads import HeadSpec, Normalizer, build_head

HEAD_FORMAT = "dinoprobe-head/1"
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_acc")


# ----------------------------------------------------------------------------------------------- head files
@dataclass
class HeadFile:
    """A trained head plus everything needed to rebuild its backbone, transform and normalisation."""

    head: nn.Module
    spec: HeadSpec
    normalizer: Normalizer
    class_names: list[str]
    feature: str
    fingerprint: dict
    weights_location: str
    raw: dict

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.normalizer(features))


def head_payload(head: nn.Module, spec: HeadSpec, normalizer: Normalizer, class_names: list[str], cache=None,
                 train_config: dict | None = None) -> dict:
    """The head file's content. `cache` (a FeatureSplits from load_cache) supplies the backbone fingerprint and
    feature that predict and export rebuild; without it the head serves Python use only."""
    fingerprint = cache.manifest["fingerprint"] if cache is not None else {}
    return {
        "format": HEAD_FORMAT,
        # the original script's keys, with the real class count
        "classifier_state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "num_classes": spec.num_classes,
        "feature_dim": spec.in_dim,
        "training_config": {"model_name": fingerprint.get("model"),
                            "input_size": fingerprint.get("transform", {}).get("image_size"), **(train_config or {})},
        # what predict/export need to rebuild exactly the same pipeline
        "class_names": list(class_names),
        "head": spec.to_dict(),
        "feature": cache.feature if cache is not None else "",
        "normalization": normalizer.to_dict(),
        "fingerprint": fingerprint,
        "weights_location": cache.manifest.get("weights_location", "") if cache is not None else "",
        "dinoprobe_version": __version__,
    }


def save_head(path, head, spec, normalizer, class_names, cache=None, train_config=None) -> Path:
    """Write a head file atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(head_payload(head, spec, normalizer, class_names, cache, train_config), tmp)
    os.replace(tmp, path)
    return path


def load_head_file(path: str | Path) -> HeadFile:
    path = Path(path)
    if path.is_dir():
        path = path / "head.pt"
    if not path.is_file():
        raise DinoprobeError(f"head file '{path}' does not exist; train one with `dinoprobe probe --out RUN_DIR`")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DinoprobeError(f"cannot read head file '{path}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                             "only dinoprobe head files are accepted (loaded with weights_only=True)") from None
    if not isinstance(raw, dict) or raw.get("format") != HEAD_FORMAT:
        raise DinoprobeError(f"'{path}' is not a dinoprobe head file (format {HEAD_FORMAT})")
    spec = HeadSpec(**raw["head"])
    if spec.num_classes != raw["num_classes"] or len(raw["class_names"]) != spec.num_classes:
        raise DinoprobeError(f"'{path}' is inconsistent: {spec.num_classes} classes in the head spec, "
                             f"{raw['num_classes']} in num_classes, {len(raw['class_names'])} class names")
    head = build_head(spec)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in raw["classifier_state_dict"].items()}
    if expected != got:
        raise DinoprobeError(f"'{path}': classifier weights {got} do not match its head spec {expected}")
    head.load_state_dict(raw["classifier_state_dict"])
    return HeadFile(head.eval(), spec, Normalizer.from_dict(raw["normalization"]), list(raw["class_names"]),
                    raw["feature"], raw["fingerprint"], raw.get("weights_location", ""), raw)


# ------------------------------------------------------------------------------------------ run directories
def check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing run unless asked."""
    if out.exists() and not overwrite:
        raise DinoprobeError(f"'{out}' already exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise DinoprobeError(f"'{out}' exists and is not a folder; choose another --out")


@contextlib.contextmanager
def run_directory(out: str | Path, overwrite: bool = False):
    """Yields a temporary folder to write the run into; on success it replaces `out` in one rename (the old run,
    if any and if overwrite, is removed only after the new one is in place). On any error nothing changes."""
    out = Path(out)
    check_run_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_run_dir(out, overwrite)  # another process may have written it meanwhile
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def full_scores(estimator, X, num_classes: int) -> np.ndarray:
    """predict_proba's columns (estimator.classes_, cache label ids) placed in a (rows, num_classes) matrix, so
    metrics cover every class of the cache, including any the training split lacked."""
    out = np.zeros((len(X), num_classes))
    out[:, np.asarray(estimator.classes_, dtype=np.int64)] = estimator.predict_proba(X)
    return out


def evaluate(estimator, data, splits=("val", "test")) -> dict[str, dict]:
    from dinoprobe.metrics import classification_metrics

    return {split: classification_metrics(full_scores(estimator, data.x[split], data.num_classes), data.y[split],
                                          data.classes)
            for split in splits if data.x.get(split) is not None}


def few_shot_metrics(estimator, data, val_scores=None) -> dict | None:
    """metrics.json's `few_shot`: per try its seed, the cache `index` of its training rows and its val/test
    metrics, and mean and standard deviation over tries; None for an estimator fitted without shots.
    val_scores(try_estimator, X) overrides the val scores (LogReg's train-only selection model)."""
    if getattr(estimator, "tries_", None) is None:
        return None
    per_try, summary = [], {}
    for record, fitted in zip(estimator.tries_, estimator.try_estimators_):
        metrics = evaluate(fitted, data)
        if val_scores is not None and "val" in metrics:
            from dinoprobe.metrics import classification_metrics

            metrics["val"] = classification_metrics(val_scores(fitted, data), data.y["val"], data.classes)
        entry = {"seed": record["seed"], "train_index": data.index["train"][record["train_index"]].tolist()}
        for split, m in metrics.items():
            entry[split] = {k: m[k] for k in ("top1", "top5", "balanced_accuracy", "n") if k in m}
        per_try.append(entry)
    for split in ("val", "test"):
        top1 = [t[split]["top1"] for t in per_try if split in t]
        if top1:
            summary[split] = {"top1_mean": float(np.mean(top1)), "top1_std": float(np.std(top1))}
    return {**estimator.few_shot_, **summary, "per_try": per_try}


def write_run_files(out: Path, metrics: dict, data, config: dict, run_info: dict | None = None,
                    history: list[dict] | None = None, best_epoch: int | None = None) -> None:
    """metrics.json, run.json, confusion.png, and history.csv + curves.png when there is a history."""
    from dinoprobe.metrics import plot_confusion, plot_curves

    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    info = {"config": config, "cache": data.cache_dir, "cache_fingerprint": data.manifest["fingerprint"],
            "dinoprobe_version": __version__, **(run_info or {})}
    (out / "run.json").write_text(json.dumps(info, indent=1))
    split = "test" if "test" in metrics else "val"
    if split in metrics:
        plot_confusion(metrics[split]["confusion_matrix"], data.classes, out / "confusion.png",
                       f"{split} confusion (top-1 {metrics[split]['top1']:.3f})")
    if history:
        write_history(out / "history.csv", history)
        plot_curves(history, out / "curves.png", best_epoch)


def write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in HISTORY_FIELDS})


def write_probe_run(out: Path, probe, data, run_info: dict | None = None) -> dict:
    """A fitted Probe (or a Sweep's best_estimator_) on a cache -> the files of a run directory; returns metrics."""
    metrics = evaluate(probe, data)
    # deterministic for a given seed on CPU (wall time lives in run.json), so runs can be diffed
    metrics.update({"best_epoch": probe.best_epoch_, "epochs_run": len(probe.history_)})
    few_shot = few_shot_metrics(probe, data)
    if few_shot:
        metrics["few_shot"] = few_shot
    config = {"feature": data.feature, **probe.config_.to_dict()}
    probe.save(out / "head.pt", data, data.classes)
    write_run_files(out, metrics, data, config, {"train_seconds": round(probe.train_seconds_, 3), **(run_info or {})},
                    probe.history_, probe.best_epoch_)
    return metrics
