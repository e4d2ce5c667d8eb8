"""Average precision in torch, for choosing multi-label heads on validation every epoch: many heads and classes
at once, on the device (scikit-learn's `average_precision_score` is the reference: tested equal, ties included)."""
from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision (..., C) of scores (..., V, C) against 0/1 targets (V, C): the sum over score
    thresholds of (recall gain) x precision, as scikit-learn computes it, tied scores forming one threshold. NaN for
    a class without positives (its AP is undefined)."""
    scores, order = scores.float().transpose(-1, -2).sort(dim=-1, descending=True, stable=True)  # (..., C, V)
    hits = targets.t().float().expand(*scores.shape[:-2], -1, -1).gather(-1, order)
    true_pos = hits.cumsum(-1)
    rank = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=true_pos.dtype)
    # a threshold is the last position of each run of equal scores
    last = torch.ones_like(scores, dtype=torch.bool)
    last[..., :-1] = scores[..., :-1] != scores[..., 1:]
    at_last = torch.where(last, true_pos, torch.zeros_like(true_pos))
    before = torch.nn.functional.pad(at_last.cummax(-1).values[..., :-1], (1, 0))  # true positives at the previous threshold
    gain = torch.where(last, true_pos - before, torch.zeros_like(true_pos))
    positives = true_pos[..., -1]
    return (gain * true_pos / rank).sum(-1) / positives.where(positives > 0, torch.nan)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Macro mAP (...,): the mean AP over the classes with at least one positive in `targets`."""
    return average_precision(scores, targets).nanmean(-1)
