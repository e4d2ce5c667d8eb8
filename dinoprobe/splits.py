"""How training rows are split and sampled, shared by extraction and the estimators.

- the stratified, seeded validation split carved from training data when there is no val split (`features`, and
  the estimators' fit without X_val);
- few-shot training sets: K images per class (or a percentage of each class), drawn once per try, each try t with
  its own generator seeded by t, so a try reproduces whatever else runs; a class with fewer than K training images
  keeps all of them (the caller reports it). Validation and test splits are never sampled.
"""
from __future__ import annotations

import re

import numpy as np

from dinoprobe.errors import DinoprobeError


def carve_indices(labels, fraction: float, seed: int, stratified: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, val), each ascending: DINOv3's carve (dinov3/eval/data.py `split_train_val_datasets`).
    The rows are shuffled with torch's generator seeded by `seed`; then each class gives its first
    max(1, floor(fraction x its rows)) shuffled rows to val, or none when it has a single row (it stays in train).
    stratified=False (multi-label rows, which belong to several classes): the first max(1, floor(fraction x rows))
    shuffled rows."""
    import torch

    if not 0 < fraction < 1:
        raise DinoprobeError(f"the validation fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    if not stratified:
        if len(labels) < 2:
            raise DinoprobeError("cannot carve a validation split from a single training row; provide validation data")
        take = max(1, int(fraction * len(labels)))
        return np.sort(order[take:]), np.sort(order[:take])
    labels = np.asarray(labels)
    shuffled = labels[order]
    val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(shuffled):
        members = np.flatnonzero(shuffled == label)  # in shuffled order
        take = max(1, int(fraction * len(members))) if len(members) > 1 else 0
        val[members[:take]] = True
    if not val.any():
        raise DinoprobeError("cannot carve a validation split: every class has a single training image; provide "
                             "validation data (a val/ folder, val rows, or X_val and y_val)")
    return np.sort(order[~val]), np.sort(order[val])


def carve_val(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """`carve_indices` on (item, label) pairs: both parts keep the original order. Multi-label rows (label tuples)
    are carved unstratified."""
    labels = [label for _, label in samples]
    multilabel = any(isinstance(label, tuple) for label in labels)
    train, val = carve_indices(np.zeros(len(labels)) if multilabel else labels, fraction, seed, not multilabel)
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


def shot_count(kind: str, amount: float, rows: int) -> int:
    """Images drawn from a class of `rows`: K, or DINOv3's max(floor(rows x P / 100), 1) for a percentage."""
    return int(amount) if kind == "count" else max(int(rows * amount / 100), 1)


def sample_shots(labels: np.ndarray, shots, seed: int) -> tuple[np.ndarray, dict]:
    """(positions of the drawn rows in ascending order, {label: rows available} for classes with fewer than asked).

    DINOv3's draw (dinov3/eval/data.py `_subset_dataset_per_class`): one torch generator seeded by the try, the
    classes in ascending label order, each class's rows in their order, the first n of a torch.randperm."""
    import torch

    kind, amount = parse_shots(shots)
    labels = np.asarray(labels)
    generator = torch.Generator().manual_seed(seed)
    chosen, short = [], {}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        want = shot_count(kind, amount, len(members))
        if len(members) < want:
            short[label.item() if hasattr(label, "item") else label] = len(members)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:want].numpy()])
    return np.sort(np.concatenate(chosen)), short
