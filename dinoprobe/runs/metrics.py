"""Evaluation numbers (scikit-learn) and the plots a run leaves behind (matplotlib, imported when drawing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    top_k_accuracy_score,
)


def classification_metrics(logits: torch.Tensor | np.ndarray, labels, class_names: list[str]) -> dict:
    """top1 / top5 / balanced accuracy / per-class accuracy / confusion matrix, accuracies as fractions."""
    scores = logits.detach().float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    all_labels = np.arange(len(class_names))
    pred = scores.argmax(1)
    matrix = confusion_matrix(y, pred, labels=all_labels)
    support = matrix.sum(1)
    out = {
        "n": int(len(y)),
        "top1": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(y) else 0.0,
        "per_class_accuracy": {name: (float(matrix[i, i] / support[i]) if support[i] else None)
                               for i, name in enumerate(class_names)},
        "confusion_matrix": matrix.tolist(),
    }
    if len(class_names) > 5:  # with 5 or fewer classes top-5 is always 1.0
        out["top5"] = float(top_k_accuracy_score(y, scores, k=5, labels=all_labels))
    return out


def multilabel_metrics(probabilities, targets, class_names: list[str], thresholds) -> dict:
    """Multi-label numbers, all scikit-learn's: mAP (macro: the mean of each class's average precision over the
    classes with a positive in this split; micro: every (image, class) pair pooled), per-class AP, F1 at the tuned
    thresholds (micro; macro over the classes with positives; samples, where an image with no labels and none
    predicted counts as right) and subset accuracy (every label of an image right)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = (targets.cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)).astype(np.int64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    pred = (p >= thresholds).astype(np.int64)
    present = np.flatnonzero(y.sum(0) > 0)
    per_class = {name: (float(average_precision_score(y[:, c], p[:, c])) if c in present else None)
                 for c, name in enumerate(class_names)}
    return {
        "n": int(len(y)),
        "task": "multilabel",
        "map_macro": float(np.mean([per_class[class_names[c]] for c in present])) if len(present) else None,
        "map_micro": float(average_precision_score(y, p, average="micro")) if len(present) else None,
        "f1_micro": float(f1_score(y, pred, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(y, pred, average="macro", labels=present, zero_division=0)) if len(present) else None,
        "f1_samples": float(f1_score(y, pred, average="samples", zero_division=1.0)) if len(y) else None,
        "subset_accuracy": float(accuracy_score(y, pred)) if len(y) else None,
        "per_class_ap": per_class,
        "classes_without_positives": [class_names[c] for c in range(len(class_names)) if c not in present],
        "thresholds": {name: float(t) for name, t in zip(class_names, thresholds)},
    }


def plot_average_precision(per_class_ap: dict, path: Path, title: str = "") -> None:
    """Each class's average precision as a horizontal bar, best first; classes without positives are left out."""
    items = sorted(((ap, name) for name, ap in per_class_ap.items() if ap is not None), reverse=True)
    fig, ax = figure(8, min(3 + 0.25 * len(items), 40))
    ax.barh(range(len(items)), [ap for ap, _ in items], color="tab:blue")
    ax.set_yticks(range(len(items)), [name for _, name in items], fontsize=max(4, 9 - len(items) // 30))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    ax.set_title(title or "per-class average precision")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def figure(width: float, height: float, columns: int = 1):
    """A matplotlib Figure drawn without pyplot: no global backend or figure registry is touched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, columns)
    return fig, axes


def plot_confusion(matrix, class_names: list[str], path: Path, title: str = "") -> None:
    matrix = np.asarray(matrix)
    n = len(class_names)
    size = min(4 + 0.35 * n, 30)
    fig, ax = figure(size, size * 0.85)
    normed = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(normed, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_xticks(range(n), class_names, rotation=90 if n > 6 else 0, fontsize=max(4, 10 - n // 15))
    ax.set_yticks(range(n), class_names, fontsize=max(4, 10 - n // 15))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if normed[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None, title: str = ""):
    """Loss and accuracy per epoch, the best epoch marked, titled with the run; returns the figure."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = figure(10, 4, columns=2)
    if title:
        fig.suptitle(title)
    left.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    labels = {"train_acc": "train accuracy", "val_acc": "val accuracy", "val_map": "val mAP (macro)"}
    for key, label in labels.items():
        if key in history[0]:
            right.plot(epochs, [h[key] for h in history], label=label)
    if best_epoch:
        right.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    right.set_xlabel("epoch")
    right.set_ylabel("mAP" if "val_map" in history[0] else "accuracy")
    right.set_ylim(0, 1.02)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
