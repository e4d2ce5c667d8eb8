"""Softmax cross-entropy and its gradient in closed form, for the engine's heads and the logistic regression's
L-BFGS: d(mean loss)/d(logits) = (softmax - target) / B, what autograd gives, without building a graph.

One layout throughout: logits (N, B, C), N heads (or problems) side by side, B rows, C classes."""
from __future__ import annotations

import torch


def smoothed_eye(classes: int, smoothing, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rows of torch's label-smoothed targets, (1 - s) * one_hot + s / C, as (1, C, C) for one smoothing shared by
    every head or (N, C, C) for one per head. Indexing them by label gives a batch's soft targets without
    F.one_hot's range check (a sync)."""
    s = torch.as_tensor(smoothing, dtype=dtype, device=device).reshape(-1, 1, 1)
    return (1 - s) * torch.eye(classes, device=device, dtype=dtype) + s / classes


def soft_targets(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N or 1, B, C) soft targets from a smoothed_eye (N or 1, C, C) and labels (B,) shared by every head or (N, B),
    each head its own rows."""
    target = target.view(1, -1) if target.dim() == 1 else target
    if eye.shape[0] == 1:
        return eye[0][target]
    return eye[torch.arange(eye.shape[0], device=eye.device)[:, None], target]


def softmax_cross_entropy(logits: torch.Tensor, soft: torch.Tensor, denom: torch.Tensor | None = None):
    """(sum over the batch of sum(target * log p), per head (N,); gradient of each head's batch loss w.r.t. its
    logits (N, B, C)), for logits (N, B, C) and soft targets that broadcast to them.

    The first is the negative summed loss: divide by -B (or -denom) for torch's cross_entropy (callers do it once
    per epoch, not per step). Targets whose rows sum to 1 give the batch mean's gradient, (softmax - target) / B.
    Class-weighted targets (target x weight of each class, rows not summing to 1) give the gradient of torch's
    weighted mean, sum_i loss_i / denom with denom = the batch's summed weights: (softmax x row sum - target) /
    denom. `logits` is left untouched."""
    logp = torch.log_softmax(logits, dim=-1)
    if logits.shape[0] == 1:  # one head: a single dot product, the cheapest reduction for a probe
        neg_loss = torch.dot(logp.reshape(-1), soft.expand_as(logp).reshape(-1)).view(1)
    else:
        neg_loss = (logp * soft).sum((-1, -2))
    if denom is None:
        return neg_loss, logp.exp_().sub_(soft).div_(logits.shape[-2])
    return neg_loss, logp.exp_().mul_(soft.sum(-1, keepdim=True)).sub_(soft).div_(denom)


def sigmoid_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None):
    """Multi-label heads: (sum over the batch of minus each row's mean binary cross-entropy over the classes, per
    head (N,); gradient of each head's batch mean w.r.t. its logits (N, B, C)), for logits (N, B, C) and 0/1
    targets that broadcast to them: torch's BCEWithLogitsLoss (mean over rows and classes), in closed form.

    weights (2, C), optional: each class's weight on a positive target and on a negative one, the loss per entry
    w_pos t softplus(-z) + w_neg (1 - t) softplus(z) = BCEWithLogitsLoss(weight=w_neg, pos_weight=w_pos / w_neg);
    its gradient is sigmoid(z) (w_pos t + w_neg (1 - t)) - w_pos t."""
    rows, classes = logits.shape[-2], logits.shape[-1]
    targets = targets.expand_as(logits)
    if weights is None:
        loss = torch.nn.functional.softplus(logits) - targets * logits
        grad = torch.sigmoid(logits).sub_(targets)
    else:
        positive, negative = weights[0] * targets, weights[1] * (1 - targets)
        loss = positive * torch.nn.functional.softplus(-logits) + negative * torch.nn.functional.softplus(logits)
        grad = torch.sigmoid(logits).mul_(positive + negative).sub_(positive)
    return -loss.sum((-1, -2)) / classes, grad.div_(rows * classes)
