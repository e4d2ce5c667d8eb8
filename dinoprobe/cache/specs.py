"""Which cached features a head reads: a `+`-joined spec of parts, concatenated in the order given.

- `cls`: the normed CLS token of the last block;
- `patch_mean`: the mean of the last block's patch tokens (registers excluded);
- `clsN`: the normed CLS tokens of the last N blocks, earliest first (`cls1` is `cls`), from the cache's
  `cls_blocks` dataset (`dinoprobe features --last-blocks N`).

DINOv3's linear evaluation input is `cls4+patch_mean`. Plain Python on purpose: the CLI validates specs
without importing torch.
"""
from __future__ import annotations

import re

from dinoprobe.errors import DinoprobeError

PART = re.compile(r"cls(\d+)?|patch_mean")
EXAMPLES = "cls, patch_mean, cls+patch_mean, cls4, cls4+patch_mean"


def parse_feature(spec: str) -> tuple[str, ...]:
    """('cls', 'cls4', 'patch_mean', ...) from 'cls4+patch_mean'; cls1 becomes cls; a DinoprobeError otherwise."""
    parts = []
    for part in str(spec).split("+"):
        match = PART.fullmatch(part.strip())
        if not match or (match.group(1) is not None and int(match.group(1)) < 1):
            raise DinoprobeError(f"unknown feature part {part.strip()!r} in --feature {spec!r}; parts are cls, "
                                 f"patch_mean and clsN (the CLS tokens of the last N blocks), joined by '+', "
                                 f"e.g. {EXAMPLES}")
        parts.append("cls" if part.strip() == "cls1" else part.strip())
    if len(set(parts)) != len(parts):
        raise DinoprobeError(f"--feature {spec!r} names a part twice")
    return tuple(parts)


def blocks_needed(parts) -> int:
    """How many last blocks' CLS tokens the parts read (0 when only `cls` and `patch_mean`)."""
    return max([int(p[3:]) for p in parts if p.startswith("cls") and p != "cls"], default=0)


def columns(parts) -> tuple[str, ...]:
    """The cache datasets the parts are read from."""
    needed = {"cls_blocks" if p.startswith("cls") and p != "cls" else p for p in parts}
    return tuple(c for c in ("cls", "patch_mean", "cls_blocks") if c in needed)


def width(parts, dim: int) -> int:
    return sum(int(p[3:]) * dim if p.startswith("cls") and p != "cls" else dim for p in parts)


def select(rows: dict, parts):
    """The parts of `rows` ({'cls': (N, D), 'patch_mean': (N, D), 'cls_blocks': (N, B, D)}, numpy arrays or torch
    tensors) concatenated into (N, width) float32."""
    pieces = []
    for p in parts:
        if p.startswith("cls") and p != "cls":
            n = int(p[3:])
            blocks = rows["cls_blocks"]
            if blocks.shape[1] < n:
                raise DinoprobeError(f"feature {p} needs the CLS tokens of the last {n} blocks, but only "
                                     f"{blocks.shape[1]} are stored; rebuild with `dinoprobe features --last-blocks "
                                     f"{n}`")
            pieces.append(blocks[:, -n:].reshape(blocks.shape[0], -1))  # shape[0], not len(): a symbolic batch in ONNX
        else:
            pieces.append(rows[p])
    if hasattr(pieces[0], "numpy"):  # torch tensors
        import torch

        return torch.cat([x.float() for x in pieces], dim=1)
    import numpy as np

    if len(pieces) == 1 and pieces[0].dtype == np.float32:
        return np.ascontiguousarray(pieces[0])  # no copy of what is already the answer
    # one float32 result filled piece by piece: no float32 copy of each piece, then a second of their concatenation
    out = np.empty((pieces[0].shape[0], sum(x.shape[1] for x in pieces)), np.float32)
    at = 0
    for x in pieces:
        out[:, at:at + x.shape[1]] = x
        at += x.shape[1]
    return out
