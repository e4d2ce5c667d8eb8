"""Ranking numbers of multi-label scores in torch, as scikit-learn computes them (its `average_precision_score` and
`precision_recall_curve` are the references: tested equal, ties included): average precision for choosing heads on
validation every epoch (many heads and classes at once, on the device) and for a run's metrics (float64, and
micro-averaged over every (image, class) pair), and the F1-best threshold of each class.

Each class's scores are sorted once; a block of classes at a time, a chunk of sorted positions at a time, so the
temporaries stay near RANKED_PAIRS_PER_BLOCK entries whatever the heads, classes and rows (a sweep's 32 heads x
1,000 classes x 10,000 validation rows would otherwise sort and cumulate 320 million at once)."""
from __future__ import annotations

import torch

RANKED_PAIRS_PER_BLOCK = 1 << 22


def _sorted_blocks(scores: torch.Tensor, targets: torch.Tensor):
    """(first row, scores sorted in descending order (R, V), their 0/1 targets in that order (R, V) bool) for
    blocks of the rows of (M, V) scores against (M or 1 x C..., V) targets: `targets` (C, V) serves rows whose
    index modulo C is its class (heads stacked class-major on a leading axis)."""
    rows, length = scores.shape
    per_block = max(1, RANKED_PAIRS_PER_BLOCK // max(length, 1))
    for start in range(0, rows, per_block):
        block, order = scores[start:start + per_block].sort(dim=-1, descending=True, stable=True)
        classes = torch.arange(start, start + len(block), device=scores.device) % targets.shape[0]
        yield start, block, targets[classes].gather(-1, order)


def _run_ends(ranked: torch.Tensor, next_first: torch.Tensor | None) -> torch.Tensor:
    """Whether each sorted position is the last of its run of equal scores (a threshold); `next_first` is the
    first score after this chunk (None at the end of the rows)."""
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:, :-1] = ranked[:, :-1] != ranked[:, 1:]
    if next_first is not None:
        last[:, -1] = ranked[:, -1] != next_first
    return last


def _average_precision_sorted(ranked: torch.Tensor, hits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """AP of each row of descending scores with their 0/1 hits: the sum over thresholds of (recall gain) x
    precision, a chunk of positions at a time with the counts carried over. NaN for a row without positives."""
    rows, length = ranked.shape
    chunk = max(1, RANKED_PAIRS_PER_BLOCK // max(rows, 1))
    total = torch.zeros(rows, dtype=dtype, device=ranked.device)
    seen = torch.zeros(rows, dtype=dtype, device=ranked.device)  # true positives before the chunk
    at_threshold = torch.zeros(rows, dtype=dtype, device=ranked.device)  # ... at the last threshold before it
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        last = _run_ends(ranked[:, start:stop], ranked[:, stop] if stop < length else None)
        true_pos = hits[:, start:stop].to(dtype).cumsum(-1).add_(seen[:, None])
        at_last = torch.where(last, true_pos, torch.zeros_like(true_pos))
        # true positives at the previous threshold: the running maximum of those at thresholds (they only grow)
        before = torch.cat([at_threshold[:, None], at_last[:, :-1]], -1).cummax(-1).values
        rank = torch.arange(start + 1, stop + 1, device=ranked.device, dtype=dtype)
        total += torch.where(last, (true_pos - before) * true_pos / rank, torch.zeros_like(true_pos)).sum(-1)
        at_threshold = torch.maximum(at_threshold, at_last.amax(-1))
        seen = true_pos[:, -1]
    return total / seen.where(seen > 0, torch.nan)


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision (..., C) of scores (..., V, C) against 0/1 targets (V, C): the sum over score
    thresholds of (recall gain) x precision, as scikit-learn computes it, tied scores forming one threshold. NaN for
    a class without positives (its AP is undefined). float64 scores are ranked in float64, others in float32."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    *lead, length, classes = scores.shape
    flat = scores.to(dtype).transpose(-1, -2).reshape(-1, length)  # one row per (head, class)
    truth = targets.t().bool()
    out = torch.empty(flat.shape[0], dtype=dtype, device=scores.device)
    for start, ranked, hits in _sorted_blocks(flat, truth):
        out[start:start + len(ranked)] = _average_precision_sorted(ranked, hits, dtype)
    return out.view(*lead, classes)


def micro_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """scikit-learn's average_precision_score(average="micro"): every (row, class) pair of (V, C) scores ranked as
    one list. Memory: the sort of V x C pairs (16 bytes each), chunked after that."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    ranked, order = scores.to(dtype).reshape(1, -1).sort(dim=-1, descending=True, stable=True)
    return float(_average_precision_sorted(ranked, targets.bool().reshape(1, -1).gather(-1, order), dtype)[0])


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Macro mAP (...,): the mean AP over the classes with at least one positive in `targets`."""
    return average_precision(scores, targets).nanmean(-1)


def f1_thresholds(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per class, the score threshold (predict s >= t) with the best F1 on (V, C) scores and 0/1 targets: of the
    thresholds scikit-learn's precision_recall_curve gives (each distinct score), the lowest of those with the
    highest F1 = 2 TP / (TP + FP + positives); 0.5 for a class without positives."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    flat = scores.to(dtype).t().contiguous()
    truth = targets.t().bool()
    out = torch.full((flat.shape[0],), 0.5, dtype=dtype)
    if flat.shape[1] == 0:  # no rows: no class has a positive
        return out
    for start, ranked, hits in _sorted_blocks(flat, truth):
        true_pos = hits.to(dtype).cumsum(-1)
        rank = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=dtype)
        f1 = 2 * true_pos / (rank + true_pos[:, -1:])  # TP + FP = rank; FN = positives - TP
        f1 = torch.where(_run_ends(ranked, None), f1, torch.full_like(f1, -1.0))
        # the highest F1, at the lowest threshold that reaches it: the last such position in descending order
        best = f1.shape[1] - 1 - f1.flip(-1).argmax(-1)
        chosen = ranked.gather(-1, best[:, None])[:, 0].cpu()
        has = (true_pos[:, -1] > 0).cpu()
        out[start:start + len(ranked)] = torch.where(has, chosen, out[start:start + len(ranked)])
    return out
