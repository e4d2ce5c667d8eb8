"""Softmax cross-entropy and its gradient in closed form, for the engine's heads and the logistic regression's
L-BFGS: d(mean loss)/d(logits) = (softmax - target) / B, what autograd gives, without building a graph.

One layout throughout: logits (N, B, C), N heads (or problems) side by side, B rows, C classes."""
from __future__ import annotations

import torch


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: torch.Tensor | None = None,
                          weights: torch.Tensor | None = None, denom: torch.Tensor | float | None = None):
    """(sum over the batch of sum_c q_c log p_c, per head (N,); gradient of each head's batch loss w.r.t. its
    logits (N, B, C)), for logits (N, B, C) and labels (B,) shared by every head or (N, B), each head its own.

    q are torch's targets: label-smoothed, (1 - s) [c = y] + s / C with `smoothing` s (1,) shared or (N,) one per
    head, and with class `weights` (C,) each column times its class's weight. The first value is the negative
    summed loss: divide by -denom for the mean (callers do it once per epoch, not per step). The gradient is that
    of sum / denom, (softmax x sum_c q_c - q) / denom; `denom` defaults to B, torch's unweighted mean and
    scikit-learn's weighted one; torch's weighted mean divides by the batch's summed w_y. The targets are never
    built: gathers and a scatter into the gradient, no C x C table (1.9 GB at ImageNet-21k's 21,843 classes)
    and no one-hot of the data. `logits` is left untouched."""
    n, rows, classes = logits.shape
    target = target.view(1, -1) if target.dim() == 1 else target
    index = target.unsqueeze(-1).expand(n, rows, 1)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, index).squeeze(-1)  # (N, B): log p of each row's label
    w_y = None if weights is None else weights[target]  # (1 or N, B)
    neg_loss = (picked if w_y is None else picked * w_y).sum(-1)
    hit = logits.new_full((), -1.0) if w_y is None else -w_y.unsqueeze(-1)  # what the scatter adds at each label
    if smoothing is not None:
        keep, spread = (1 - smoothing).view(-1, 1, 1), (smoothing / classes).view(-1, 1, 1)
        every = logp.sum(-1) if weights is None else logp @ weights  # (N, B): sum_c w_c log p_c
        neg_loss = keep.view(-1) * neg_loss + spread.view(-1) * every.sum(-1)
        hit = hit * keep
    grad = logp.exp_()
    if weights is not None:  # each row's targets sum to its (smoothed) weight, not to 1
        row_sum = w_y if smoothing is None else keep[..., 0] * w_y + spread[..., 0] * weights.sum()
        grad.mul_(row_sum.unsqueeze(-1))
    if smoothing is not None:
        grad.sub_(spread if weights is None else spread * weights)
    grad.scatter_add_(-1, index, hit.expand(n, rows, 1))
    return neg_loss, grad.div_(rows if denom is None else denom)


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
