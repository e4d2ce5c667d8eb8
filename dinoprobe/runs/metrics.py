"""Evaluation numbers (scikit-learn) and the plots a run leaves behind (matplotlib, imported when drawing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score

from dinoprobe.settings import SCORING_ROWS_PER_BLOCK
from dinoprobe.train.ranking import average_precision, micro_average_precision

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
    """Multi-label numbers, scikit-learn's (tested equal): mAP (macro: the mean of each class's average precision
    over the classes with a positive in this split; micro: every (image, class) pair pooled), per-class AP, F1 at
    the tuned thresholds (micro; macro over the classes with positives; samples, where an image with no labels and
    none predicted counts as right) and subset accuracy (every label of an image right).

    The F1s and subset accuracy come from counts of true and false positives per class and per image, a block of
    rows at a time, and the APs from ranking.py (one sort per class, bounded temporaries), not from scikit-learn's
    calls, which copy and sort every pair several times (19 s and 3 GB at 20,000 images x 1,000 classes)."""
    p = torch.as_tensor(np.asarray(probabilities, dtype=np.float64))
    y = (targets.cpu() if isinstance(targets, torch.Tensor) else torch.as_tensor(np.asarray(targets))).bool()
    thresholds = torch.as_tensor(np.asarray(thresholds, dtype=np.float64))
    rows, classes = y.shape
    true_pos, false_pos, positives = (torch.zeros(classes, dtype=torch.int64) for _ in range(3))
    samples_f1, exact = 0.0, 0
    for start in range(0, rows, SCORING_ROWS_PER_BLOCK):
        truth = y[start:start + SCORING_ROWS_PER_BLOCK]
        pred = p[start:start + SCORING_ROWS_PER_BLOCK] >= thresholds
        hit = pred & truth
        true_pos += hit.sum(0)
        false_pos += (pred & ~truth).sum(0)
        positives += truth.sum(0)
        row_hits, row_wrong = hit.sum(1), (pred ^ truth).sum(1)  # wrong: false positives + false negatives
        denominator = 2 * row_hits + row_wrong
        samples_f1 += float(torch.where(denominator > 0, 2 * row_hits.double() / denominator.clamp_min(1), 1.0).sum())
        exact += int((row_wrong == 0).sum())
    present = torch.nonzero(positives > 0).flatten().tolist()
    ap = average_precision(p, y).tolist()
    per_class = {name: (ap[c] if positives[c] > 0 else None) for c, name in enumerate(class_names)}
    false_neg = positives - true_pos
    class_f1 = 2 * true_pos.double() / (2 * true_pos + false_pos + false_neg).clamp_min(1)
    total = int(2 * true_pos.sum() + false_pos.sum() + false_neg.sum())
    return {
        "n": rows,
        "task": "multilabel",
        "map_macro": float(np.mean([ap[c] for c in present])) if present else None,
        "map_micro": micro_average_precision(p, y) if present else None,
        "f1_micro": 2 * int(true_pos.sum()) / total if total else 0.0,
        "f1_macro": float(class_f1[present].mean()) if present else None,
        "f1_samples": samples_f1 / rows if rows else None,
        "subset_accuracy": exact / rows if rows else None,
        "per_class_ap": per_class,
        "classes_without_positives": [class_names[c] for c in range(classes) if positives[c] == 0],
        "thresholds": {name: float(t) for name, t in zip(class_names, thresholds.tolist())},
    }


def plot_average_precision(per_class_ap: dict, path: Path, title: str = ""):
    """Each class's average precision, best first: a named bar per class up to TICK_LABELS_MAX_CLASSES classes;
    beyond, the sorted values as one filled curve over the class rank (thousands of bars and names take minutes
    to draw and cannot be read). Classes without positives are left out."""
    items = sorted(((ap, name) for name, ap in per_class_ap.items() if ap is not None), reverse=True)
    if len(items) <= TICK_LABELS_MAX_CLASSES:
        fig, ax = figure(8, 3 + 0.25 * len(items))
        ax.barh(range(len(items)), [ap for ap, _ in items], color="tab:blue")
        ax.set_yticks(range(len(items)), [name for _, name in items], fontsize=max(4, 9 - len(items) // 30))
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("average precision")
    else:
        fig, ax = figure(8, 5)
        values = [ap for ap, _ in items]
        ax.fill_between(range(1, len(values) + 1), values, step="mid", color="tab:blue", alpha=0.6)
        ax.set_xlim(1, len(values))
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"class, by average precision ({len(values):,} classes; per_class_ap in metrics.json)")
        ax.set_ylabel("average precision")
    ax.set_title(title or "per-class average precision")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


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
