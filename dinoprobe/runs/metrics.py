"""Evaluation numbers (scikit-learn) and the plots a run leaves behind (matplotlib, imported when drawing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

# Up to this many classes metrics.json holds the whole confusion matrix and the run draws confusion.png; beyond
# (iNaturalist's 10,000 species: 10^8 cells, a 1.4 GB metrics.json), only its nonzero cells, at most one per row.
CONFUSION_MATRIX_MAX_CLASSES = 1000
TICK_LABELS_MAX_CLASSES = 100  # class names along confusion.png's axes; beyond, class indices


def classification_metrics(logits: torch.Tensor | np.ndarray, labels, class_names: list[str]) -> dict:
    """top1 / top5 / balanced accuracy / per-class accuracy / confusion matrix, accuracies as fractions.

    Only the scores are rows x classes: the counts come from bincounts over the rows, and top-5 from comparing each
    row's scores with its true class's score. scikit-learn's balanced_accuracy_score and top_k_accuracy_score give
    the same numbers (tested) but allocate a classes x classes matrix and sort every row, which at 10,000 classes
    takes gigabytes and minutes."""
    scores = logits.detach().float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    y = (labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)).astype(np.int64)
    return ranked_metrics(scores.argmax(1), top_k_hits(scores, y, 5) if len(class_names) > 5 else None, y,
                          class_names)


def ranked_metrics(pred: np.ndarray, top5: np.ndarray | None, y: np.ndarray, class_names: list[str]) -> dict:
    """classification_metrics from what it keeps of each row: its prediction and whether its class is among its 5
    best scores (None with 5 or fewer classes), so scores can be ranked a block of rows at a time."""
    y = np.asarray(y, dtype=np.int64)
    n = len(class_names)
    support = np.bincount(y, minlength=n)
    correct = np.bincount(y[pred == y], minlength=n)
    seen = support > 0
    out = {
        "n": int(len(y)),
        "top1": float(accuracy_score(y, pred)) if len(y) else 0.0,
        "balanced_accuracy": float(np.mean(correct[seen] / support[seen])) if len(y) else 0.0,
        "per_class_accuracy": {name: (float(correct[i] / support[i]) if support[i] else None)
                               for i, name in enumerate(class_names)},
    }
    cells, counts = np.unique(y * n + pred, return_counts=True)
    if n <= CONFUSION_MATRIX_MAX_CLASSES:
        matrix = np.zeros((n, n), dtype=np.int64)
        matrix[cells // n, cells % n] = counts
        out["confusion_matrix"] = matrix.tolist()
    else:
        out["confusion_cells"] = np.stack([cells // n, cells % n, counts], 1).tolist()  # [true, predicted, count]
    if top5 is not None:  # with 5 or fewer classes top-5 is always 1.0
        out["top5"] = float(np.mean(top5)) if len(y) else 0.0
    return out


def top_k_hits(scores: np.ndarray, y: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Whether each row's true class is among its k best scores, ties ranked as scikit-learn's top_k_accuracy_score
    ranks them (a stable sort, reversed: of equal scores the higher class index comes first). Rows in chunks, so
    the temporaries stay small."""
    hits = np.empty(len(y), dtype=bool)
    index = np.arange(scores.shape[1])
    for start in range(0, len(y), chunk):
        block, truth = scores[start:start + chunk], y[start:start + chunk]
        true_score = block[np.arange(len(truth)), truth][:, None]
        rank = (block > true_score).sum(1) + ((block == true_score) & (index > truth[:, None])).sum(1)
        hits[start:start + chunk] = rank < k
    return hits


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
    if n <= TICK_LABELS_MAX_CLASSES:
        ax.set_xticks(range(n), class_names, rotation=90 if n > 6 else 0, fontsize=max(4, 10 - n // 15))
        ax.set_yticks(range(n), class_names, fontsize=max(4, 10 - n // 15))
    ax.set_xlabel("predicted" if n <= TICK_LABELS_MAX_CLASSES else "predicted class (index)")
    ax.set_ylabel("true" if n <= TICK_LABELS_MAX_CLASSES else "true class (index)")
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
