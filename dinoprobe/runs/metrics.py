"""Evaluation numbers (scikit-learn) and the plots a run leaves behind (matplotlib, imported when drawing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, top_k_accuracy_score


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
    right.plot(epochs, [h["train_acc"] for h in history], label="train accuracy")
    right.plot(epochs, [h["val_acc"] for h in history], label="val accuracy")
    if best_epoch:
        right.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    right.set_ylim(0, 1.02)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
