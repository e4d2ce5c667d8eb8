"""`dinoprobe score`: a trained head's metrics on labelled images it was not trained on, read from their cache.

A shifted test set (ImageNet-V2 or -Sketch; ImageNet-R and -A, whose 200 classes are a subset of ImageNet's, with
`restrict_classes`, as DINOv3's linear evaluation maps them), or newly labelled images for a classifier in service.
The cache must hold the head's features: the same model, weights and transform. Its classes are matched to the
head's by name, so an evaluation set may hold some of the head's classes, in any order.

    from dinoprobe import score_run
    metrics = score_run("runs/ants", "cache/ants-new", split="test", out="runs/ants-new")
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from dinoprobe import __version__, settings
from dinoprobe.atomic import write_json
from dinoprobe.cache.arrays import LabelledSplit, load_split
from dinoprobe.cache.specs import parse_feature, width
from dinoprobe.device import environment, resolve_device
from dinoprobe.errors import DinoprobeError
from dinoprobe.paths import resolved
from dinoprobe.runs.metrics import (
    CONFUSION_MATRIX_MAX_CLASSES,
    multilabel_metrics,
    plot_average_precision,
    plot_confusion,
    ranked_metrics,
    top_k_hits,
)
from dinoprobe.runs.rundir import check_run_dir, run_directory
from dinoprobe.train.headfile import HeadFile, load_head_file

# fingerprint entries that change the features by rounding only (bf16 or fp32, float16 storage, PIL or
# torchvision's resize); model, weights and transform change what they are (feature_differences)
NOTED = ("decoder", "precision", "dtype")
PREDICTION_FIELDS = ("index", "path", "label", "predicted", "probability")


def feature_differences(head: dict, cache: dict) -> list[str]:
    """What the cache's features were made with that the head's were not: model, weights (by sha256) and every
    transform setting."""
    out = []
    if head.get("model") != cache.get("model"):
        out.append(f"model {cache.get('model')} (the head's: {head.get('model')})")
    theirs, ours = cache.get("weights", {}), head.get("weights", {})
    if theirs.get("sha256") != ours.get("sha256"):
        out.append(f"weights {theirs.get('source')} sha256 {str(theirs.get('sha256'))[:12]}… (the head's: "
                   f"{ours.get('source')} sha256 {str(ours.get('sha256'))[:12]}…)")
    theirs, ours = cache.get("transform", {}), head.get("transform", {})
    out += [f"transform {key} {theirs.get(key)} (the head's: {ours.get(key)})"
            for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
    return out


def check_scorable(head_file: HeadFile, split: LabelledSplit, cache_dir) -> list[int]:
    """Refuse a cache whose features or labels the head cannot be scored on; returns each cache class's position
    among the head's classes (matched by name)."""
    mapping = check_evaluation_set(head_file.fingerprint, head_file.class_names, head_file.multilabel,
                                   split.manifest, cache_dir)
    if width(parse_feature(head_file.feature), split.manifest.get("feature_dim", 0)) != head_file.spec.in_dim:
        raise DinoprobeError(f"the head expects {head_file.spec.in_dim}-wide '{head_file.feature}' features and cache "
                             f"{cache_dir} gives {split.x.shape[1]}")
    return mapping


def check_evaluation_set(fingerprint: dict, class_names: list[str], multilabel: bool, manifest: dict,
                         cache_dir) -> list[int]:
    """What a head trained on a cache of `fingerprint` and `class_names` needs of a cache it is scored on, from the
    manifests alone (so `evaluate` checks it before any head is trained): the same backbone and transform, labels
    it can score, and no class it was not trained on. Returns each cache class's position among the head's."""
    differences = feature_differences(fingerprint, manifest["fingerprint"])
    if differences:
        t = fingerprint["transform"]
        raise DinoprobeError(f"cache {cache_dir} holds features of another backbone or transform than the head's: "
                             f"{'; '.join(differences)}. Build it as the head's cache was: dinoprobe features "
                             f"--model {fingerprint['model']} --weights ... --image-size {t.get('image_size')}"
                             f" --transform {t.get('name', 'timm')} --data ... --cache ...")
    if multilabel and manifest.get("task") != "multilabel":
        raise DinoprobeError(f"cache {cache_dir} is single-label and the head is multi-label; score it with a "
                             "single-label head")
    position = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in manifest["classes"] if name not in position]
    if unknown:
        raise DinoprobeError(f"cache {cache_dir} has class(es) the head was not trained on: "
                             f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} (the head's "
                             f"{len(position)}: {', '.join(class_names[:10])}"
                             f"{' ...' if len(position) > 10 else ''}); a head cannot predict them — build the cache "
                             "from images of the head's classes only")
    return [position[name] for name in manifest["classes"]]


def score_head(head_file: HeadFile, split: LabelledSplit, mapping: list[int], restrict_classes: bool = False,
               predictions=None) -> dict:
    """The split's metrics under the head. Single-label: over the head's classes, or with `restrict_classes` over
    the cache's only (the head's logits of the other classes dropped before the softmax, DINOv3's class mapping);
    scored a block of rows at a time. Multi-label head: each of the cache's classes at the head's threshold (the
    cache says nothing of the others). A single-label head on a multi-label cache: any-match accuracy (`any_match`).
    `predictions(start, scores, names)`: called with each block's scores, for predictions.csv."""
    if split.multilabel and not head_file.multilabel:
        return any_match(head_file, split, mapping, restrict_classes, predictions)
    device = split.x.device
    columns = torch.tensor(mapping, dtype=torch.long, device=device)
    names = split.classes if restrict_classes or split.multilabel else head_file.class_names
    y = split.y if restrict_classes or split.multilabel else columns.cpu()[split.y]
    rows = max(len(split.x), 1) if split.multilabel else settings.scoring_rows(len(names))
    preds, hits, probabilities = [], [], []
    for start, scores in _scored_blocks(head_file, split, columns, restrict_classes, rows):
        truth = y[start:start + len(scores)].numpy()
        if split.multilabel:
            probabilities.append(scores)
        else:
            preds.append(scores.argmax(1))
            hits.append(top_k_hits(scores, truth, 5))
        if predictions is not None:
            predictions(start, scores, names)
    if split.multilabel:
        thresholds = np.asarray(head_file.thresholds)[mapping]
        return multilabel_metrics(np.concatenate(probabilities), split.y, names, thresholds)
    return ranked_metrics(np.concatenate(preds), np.concatenate(hits) if len(names) > 5 else None, y.numpy(), names)


def any_match(head_file: HeadFile, split: LabelledSplit, mapping: list[int], restrict_classes: bool = False,
              predictions=None) -> dict:
    """A single-label head on images with several true labels (ImageNet-ReaL's relabelled validation set): top-1
    counts a prediction that is any of the image's labels, top-5 any of them among the 5 best scores; images without
    a label are left out (`unlabelled`), as DINOv2's ImageNetReaLAccuracy (and DINOv3's any-match accuracy) does."""
    names = split.classes if restrict_classes else head_file.class_names
    labels = split.y.numpy().astype(bool)
    if not restrict_classes:  # each image's labels as columns of the head's classes
        spread = np.zeros((len(labels), len(names)), dtype=bool)
        spread[:, mapping] = labels
        labels = spread
    columns = torch.tensor(mapping, dtype=torch.long, device=split.x.device)
    top1, top5 = [], []
    for start, scores in _scored_blocks(head_file, split, columns, restrict_classes,
                                        settings.scoring_rows(len(names))):
        truth = labels[start:start + len(scores)]
        top1.append(truth[np.arange(len(scores)), scores.argmax(1)])
        best5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        top5.append(np.take_along_axis(truth, best5, axis=1).any(1))
        if predictions is not None:
            predictions(start, scores, names)
    labelled = labels.any(1)
    out = {"task": "any_match", "n": int(labelled.sum()), "unlabelled": int((~labelled).sum()),
           "top1": float(np.concatenate(top1)[labelled].mean()) if labelled.any() else 0.0}
    if len(names) > 5:
        out["top5"] = float(np.concatenate(top5)[labelled].mean()) if labelled.any() else 0.0
    return out


def _scored_blocks(head_file: HeadFile, split: LabelledSplit, columns: torch.Tensor, restrict_classes: bool,
                   rows: int):
    """(first row, scores) for each block of `rows` rows, as float64 numpy: softmax over the head's classes (over
    the cache's, `restrict_classes`), or a multi-label head's sigmoids of the cache's classes."""
    head, normalizer = head_file.head.to(split.x.device), head_file.normalizer.to(split.x.device)
    for start in range(0, max(len(split.x), 1), rows):
        with torch.inference_mode():
            logits = head(normalizer(split.x[start:start + rows]))
            if head_file.multilabel:
                scores = logits.float().sigmoid()[:, columns]
            else:
                scores = (logits[:, columns] if restrict_classes else logits).float().softmax(-1)
        yield start, scores.double().cpu().numpy()


def score_run(run, cache_dir, split: str = "test", *, restrict_classes: bool = False, out=None,
              overwrite: bool = False, device="auto") -> dict:
    """Score the head of `run` (a run directory or its head.pt) on `split` of the cache at `cache_dir`; with `out`,
    write a run directory: metrics.json, run.json, predictions.csv (each row's prediction) and confusion.png
    (ap.png for a multi-label head). Returns metrics.json's content."""
    head_file = load_head_file(run)
    if not head_file.fingerprint:
        raise DinoprobeError("this head was saved from features without a dinoprobe cache, so it records no backbone "
                             "to check the cache against; save it with `estimator.save(path, cache=load_cache(...))`")
    if out is not None:
        if head_file.holds(out) or resolved(out) in resolved(head_file.run_dir).parents:
            raise DinoprobeError(f"--out '{out}' overlaps the run {head_file.run_dir} it scores; write the scores "
                                 "elsewhere")
        check_run_dir(Path(out), overwrite, "score", protect=[cache_dir])
    if head_file.multilabel and restrict_classes:
        raise DinoprobeError("--restrict-classes is for single-label heads; a multi-label head is always scored on "
                             "the cache's classes, each at its own threshold")
    device = resolve_device(device)
    data = load_split(cache_dir, split, head_file.feature, device)
    mapping = check_scorable(head_file, data, cache_dir)
    notes = [f"the cache was built with {key} {_setting(data.manifest['fingerprint'].get(key))} and the head's "
             f"with {_setting(head_file.fingerprint.get(key))}: their features differ by rounding"
             for key in NOTED if data.manifest["fingerprint"].get(key) != head_file.fingerprint.get(key)]
    if data.manifest["fingerprint"].get("data") == head_file.fingerprint.get("data") and split in ("train", "val"):
        notes.append(f"this is the {split} split of the cache the head was trained on: the head was "
                     f"{'fitted' if split == 'train' else 'chosen'} on these images, so the numbers are optimistic")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    summary = {"split": split, "cache": str(cache_dir), "run": str(run), "restrict_classes": restrict_classes,
               "classes": len(data.classes), "head_classes": len(head_file.class_names)}
    if out is None:
        return {split: score_head(head_file, data, mapping, restrict_classes), "scored": summary}
    with run_directory(out, overwrite, "score", [cache_dir]) as tmp:
        with open(tmp / "predictions.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(PREDICTION_FIELDS)
            thresholds = np.asarray(head_file.thresholds)[mapping] if head_file.multilabel else None
            metrics = {split: score_head(head_file, data, mapping, restrict_classes,
                                         _prediction_rows(writer, data, thresholds))}
        metrics["scored"] = summary
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        write_json(tmp / "run.json", {"command": "score", "run": str(run), "cache": str(cache_dir), "split": split,
                                      "restrict_classes": restrict_classes, "feature": head_file.feature,
                                      "cache_fingerprint": data.manifest["fingerprint"],
                                      "head_fingerprint": head_file.fingerprint, "dinoprobe_version": __version__,
                                      "environment": environment(device)})
        _plot(metrics[split], tmp, split)
    return metrics


def _setting(value) -> str:
    """A fingerprint entry as a user names it: the decoder `torchvision (on cuda)`, a precision `bf16`."""
    if isinstance(value, dict):
        return f"{value.get('name')}" + (f" (on {value['device']})" if value.get("device") else "")
    return str(value)


def _prediction_rows(writer, data: LabelledSplit, thresholds):
    """predictions.csv, a block of rows at a time: the row's cache index, input, true label(s), predicted label(s)
    and the prediction's probability; multi-label (`thresholds`: one per cache class): every class at or over its
    threshold, joined by |, and no single probability."""
    truth = data.y.numpy()

    def write(start: int, scores: np.ndarray, names: list[str]) -> None:
        for row, p in enumerate(scores, start):
            label = "|".join(data.classes[c] for c in np.flatnonzero(truth[row])) if data.multilabel \
                else data.classes[int(truth[row])]
            if thresholds is not None:
                writer.writerow((int(data.index[row]), data.path[row], label,
                                 "|".join(names[c] for c in np.flatnonzero(p >= thresholds)), ""))
            else:
                best = int(p.argmax())
                writer.writerow((int(data.index[row]), data.path[row], label, names[best], f"{p[best]:.6g}"))
    return write


def _plot(metrics: dict, out: Path, split: str) -> None:
    if metrics.get("task") == "any_match":
        return  # no confusion matrix: an image has several true classes
    if metrics.get("task") == "multilabel":
        plot_average_precision(metrics["per_class_ap"], out / "ap.png",
                               f"{split} average precision per class (mAP {metrics['map_macro'] or 0:.3f}, "
                               f"n={metrics['n']})")
    elif len(metrics["per_class_accuracy"]) <= CONFUSION_MATRIX_MAX_CLASSES:
        plot_confusion(metrics["confusion_matrix"], list(metrics["per_class_accuracy"]), out / "confusion.png",
                       f"{split} confusion (top-1 {metrics['top1']:.3f})")
