"""The stratified, seeded validation split carved from training data when there is no val split (features, and
the estimators' fit without X_val)."""
from __future__ import annotations

import numpy as np

from dinoprobe.errors import DinoprobeError


def carve_indices(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, val), each in ascending order, stratified by label."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DinoprobeError(f"the validation fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    # at least one row of every class in each part, even when fraction * rows is smaller than the class count
    classes = len(np.unique(labels))
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
