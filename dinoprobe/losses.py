"""Softmax cross-entropy and its gradient in closed form, for the engine's heads and the logistic regression's
L-BFGS: d(mean loss)/d(logits) = (softmax - target) / B, what autograd gives, without building a graph."""
from __future__ import annotations

import torch


def smoothed_eye(classes: int, smoothing, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rows of torch's label-smoothed targets, (1 - s) * one_hot + s / C: (C, C), or (N, C, C) for one smoothing
    per head. Indexing them by label gives a batch's soft targets without F.one_hot's range check (a sync)."""
    s = torch.as_tensor(smoothing, dtype=dtype, device=device).reshape(-1, 1, 1)
    out = (1 - s) * torch.eye(classes, device=device, dtype=dtype) + s / classes
    return out[0] if torch.as_tensor(smoothing).dim() == 0 else out


def soft_targets(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft targets from a (C, C) or (N, C, C) smoothed_eye: batch-first (B, N or 1, C) for targets (B,) shared by
    the heads; head-first (N, B, C) for targets (B, N), each head its own rows."""
    if target.dim() == 2:
        if eye.dim() == 2:
            return eye[target.t()]
        return eye[torch.arange(eye.shape[0], device=eye.device)[:, None], target.t()]
    rows = eye.index_select(-2, target)
    return rows[:, None] if eye.dim() == 2 else rows.transpose(0, 1)


def softmax_cross_entropy(logits: torch.Tensor, soft: torch.Tensor, batch_dim: int):
    """(sum over the batch of sum(target * log p), per head; gradient of the batch-mean loss w.r.t. the logits).

    The first is the negative summed loss: divide by -B for torch's cross_entropy (callers do it once per epoch,
    not per step). Classes are the last dimension; other dimensions are independent heads or problems. `logits`
    is left untouched; `soft` broadcasts to it."""
    logp = torch.log_softmax(logits, dim=-1)
    if logits.dim() == 2:  # one head: a single dot product
        neg_loss = torch.dot(logp.reshape(-1), soft.expand_as(logp).reshape(-1))
    else:
        neg_loss = (logp * soft).sum((-1, batch_dim))
    return neg_loss, logp.exp_().sub_(soft).div_(logits.shape[batch_dim])
