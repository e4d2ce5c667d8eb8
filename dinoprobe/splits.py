"""How training rows are split and sampled, shared by extraction and the estimators.

- the stratified, seeded validation split carved from training data when there is no val split (`features`, and
  the estimators' fit without X_val);
- few-shot training sets: K images per class (or a percentage of each class), drawn once per try, each try t with
  its own generator seeded by t, so a try reproduces whatever else runs; a class with fewer than K training images
  keeps all of them (the caller reports it). Validation and test splits are never sampled.
"""
from __future__ import annotations

import math
import re

import numpy as np

from dinoprobe.errors import DinoprobeError


def carve_indices(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, val), each in ascending order, stratified by label."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DinoprobeError(f"the validation fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    names, counts = np.unique(labels, return_counts=True)
    lonely = [str(n) for n, c in zip(names, counts) if c < 2]
    if lonely:
        raise DinoprobeError(f"cannot carve a validation split: class(es) {lonely[:5]} have a single training image, "
                             "and a stratified split needs one in train and one in val; add images of those "
                             "classes, or provide validation data (a val/ folder, val rows, or X_val and y_val)")
    # at least one row of every class in each part, even when fraction * rows is smaller than the class count
    classes = len(names)
    size = min(max(int(np.ceil(fraction * len(labels))), classes), len(labels) - classes)
    try:
        train, val = train_test_split(np.arange(len(labels)), test_size=size, stratify=labels,
                                      random_state=seed)
    except ValueError as err:
        raise DinoprobeError(f"cannot carve a stratified validation split ({err}); provide validation data (a val/ "
                             "folder, or X_val and y_val) or change the validation fraction") from None
    return np.sort(train), np.sort(val)


def carve_val(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """`carve_indices` on (item, label) pairs: both parts keep the original order."""
    train, val = carve_indices([label for _, label in samples], fraction, seed)
    return [samples[i] for i in train], [samples[i] for i in val]



def parse_shots(shots) -> tuple[str, float]:
    """('count', K) from 5 or '5', ('percent', P) from '1%' or '0.5%'."""
    text = str(shots).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
    if match and 0 < float(match.group(1)) <= 100:
        return "percent", float(match.group(1))
    if re.fullmatch(r"\d+", text) and int(text) >= 1:
        return "count", int(text)
    raise DinoprobeError(f"shots must be a count of images per class (e.g. 5) or a percentage of each class "
                         f"(e.g. 1%), got {shots!r}")


def sample_shots(labels: np.ndarray, shots, seed: int) -> tuple[np.ndarray, dict]:
    """(positions of the drawn rows in ascending order, {label: rows available} for classes with fewer than asked)."""
    kind, amount = parse_shots(shots)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen, short = [], {}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        want = amount if kind == "count" else max(1, math.ceil(len(members) * amount / 100))
        if len(members) < want:
            short[label.item() if hasattr(label, "item") else label] = len(members)
        chosen.append(rng.choice(members, size=min(want, len(members)), replace=False))
    return np.sort(np.concatenate(chosen)), short
