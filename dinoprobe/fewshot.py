"""Few-shot training sets: K images per class (or a percentage of each class), drawn once per try.

Each try t draws with its own generator seeded by t, so a try reproduces whatever else runs; a class with fewer
than K training images keeps all of them (the caller reports it). Validation and test splits are never sampled.
"""
from __future__ import annotations

import math
import re

import numpy as np

from dinoprobe.errors import DinoprobeError


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
