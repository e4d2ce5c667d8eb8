"""Run directories: head.pt (weights_only-loadable), metrics.json, run.json, history.csv and plots."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dinoprobe import __version__
from dinoprobe.errors import DinoprobeError
from dinoprobe.heads import HeadSpec, Normalizer, build_head
from dinoprobe.metrics import classification_metrics, plot_confusion, plot_curves
from dinoprobe.train import TrainResult, predict_logits
from dinoprobe.tensors import FeatureSplits

HEAD_FORMAT = "dinoprobe-head/1"
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_acc")


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

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.head, self.normalizer, features)


def head_payload(head: nn.Module, spec: HeadSpec, normalizer: Normalizer, data: FeatureSplits,
                 train_config: dict) -> dict:
    fingerprint = data.manifest["fingerprint"]
    return {
        "format": HEAD_FORMAT,
        # the original script's keys, with the real class count
        "classifier_state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "num_classes": spec.num_classes,
        "feature_dim": spec.in_dim,
        "training_config": {"model_name": fingerprint["model"],
                            "input_size": fingerprint["transform"]["image_size"], **train_config},
        # what predict/export need to rebuild exactly the same pipeline
        "class_names": list(data.classes),
        "head": spec.to_dict(),
        "feature": data.feature,
        "normalization": normalizer.to_dict(),
        "fingerprint": fingerprint,
        "weights_location": data.manifest.get("weights_location", ""),
        "dinoprobe_version": __version__,
    }


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


def evaluate_splits(head: nn.Module, normalizer: Normalizer, data: FeatureSplits,
                    splits=("val", "test")) -> dict[str, dict]:
    return {split: classification_metrics(predict_logits(head, normalizer, data.x[split]), data.y[split], data.classes)
            for split in splits if split in data.x}


def write_run(out: Path, head: nn.Module, spec: HeadSpec, normalizer: Normalizer, data: FeatureSplits,
              result: TrainResult, train_config: dict, extra_run_info: dict | None = None) -> dict:
    """Evaluate the chosen head and leave every artefact of the run in `out`; returns metrics.json's content."""
    metrics = evaluate_splits(head, normalizer, data)
    # deterministic for a given seed on CPU (wall time lives in run.json), so runs can be diffed
    metrics.update({"best_epoch": result.best_epoch, "epochs_run": result.epochs_run})
    save_run(out, metrics, data, train_config, head_payload(head, spec, normalizer, data, train_config),
             {"train_seconds": round(result.seconds, 3), **(extra_run_info or {})})
    write_history(out / "history.csv", result.history)
    if result.history:
        plot_curves(result.history, out / "curves.png", result.best_epoch)
    return metrics


def save_run(out: Path, metrics: dict, data: FeatureSplits, config: dict, head: dict | None = None,
             run_info: dict | None = None) -> None:
    """metrics.json, run.json, confusion.png, and head.pt when there is a head (k-NN has none)."""
    out.mkdir(parents=True, exist_ok=True)
    if head is not None:
        torch.save(head, out / "head.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    info = {"config": config, "cache_fingerprint": data.manifest["fingerprint"], "dinoprobe_version": __version__,
            **(run_info or {})}
    (out / "run.json").write_text(json.dumps(info, indent=1))
    split = "test" if "test" in metrics else "val"
    plot_confusion(metrics[split]["confusion_matrix"], data.classes, out / "confusion.png",
                   f"{split} confusion (top-1 {metrics[split]['top1']:.3f})")


def write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in HISTORY_FIELDS})
