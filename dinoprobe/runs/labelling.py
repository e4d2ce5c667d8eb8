"""From one image's probabilities to what `predict` reports, the same for a head file and an ONNX export (numpy
only, so the ONNX path stays torch-free): the top-k classes, or, for a multi-label head, every class whose
probability reaches its threshold."""
from __future__ import annotations

import numpy as np

from dinoprobe.errors import DinoprobeError


def check_threshold(threshold, multilabel: bool) -> float | None:
    """--threshold: one decision threshold for every class of a multi-label head, in [0, 1]; refused, before any
    image is read, for a head that picks one class per image."""
    if threshold is None:
        return None
    if not multilabel:
        raise DinoprobeError("--threshold applies to multi-label heads; this head picks one class per image "
                             "(use --top-k)")
    if not 0 <= float(threshold) <= 1:
        raise DinoprobeError(f"--threshold must be a probability in [0, 1], got {threshold}")
    return float(threshold)


def labelled(path: str, probabilities: np.ndarray, class_names: list[str], topk: int, thresholds=None,
             threshold: float | None = None) -> dict:
    """{path, labels, probabilities}: the top-k classes best first; for a multi-label head (thresholds, one per
    class, or `threshold` for all), the classes at or over their threshold, best first, with every class's
    probability under `all_probabilities`."""
    p = np.asarray(probabilities, dtype=np.float64)
    if thresholds is None:
        order = np.argsort(-p, kind="stable")[:min(topk, len(class_names))]
        return {"path": path, "labels": [class_names[i] for i in order],
                "probabilities": [round(float(p[i]), 6) for i in order]}
    cut = np.full(len(p), threshold) if threshold is not None else np.asarray(thresholds, dtype=np.float64)
    chosen = [i for i in np.argsort(-p, kind="stable") if p[i] >= cut[i]]
    return {"path": path, "labels": [class_names[i] for i in chosen],
            "probabilities": [round(float(p[i]), 6) for i in chosen],
            "all_probabilities": {name: round(float(v), 6) for name, v in zip(class_names, p)}}


def collected(entries, errors: list) -> tuple[list[dict], list]:
    """`predict()`'s return value from the entries `iter_predictions` yields: (results, errors), with each skipped
    input's (path, reason) added to the errors the listing of the inputs already found."""
    results = []
    for entry in entries:
        if "skipped" in entry:
            errors.append((entry["path"], entry["skipped"]))
        else:
            results.append(entry)
    return results, errors
