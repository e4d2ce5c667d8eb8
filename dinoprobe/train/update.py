"""How a group of stacked heads moves: the learning-rate schedule and the update rule.

The update is torch's SGD / Adam / AdamW written once over the stacked parameters: per-head learning rates, weight
decays and momenta do not fit torch's one-lr-per-param-group optimisers, and for heads this small the per-call
bookkeeping of `Optimizer.step` costs more than the arithmetic. Tests hold every step to torch.optim and the
schedule to torch's own schedulers.
"""
from __future__ import annotations

import math

import torch

from dinoprobe.train.config import TrainConfig


def lr_factors(epochs: int, warmup_epochs: int, steps_per_epoch: int) -> list[float]:
    """The learning-rate multiplier of every step: linear warm-up from 1e-3, then cosine decay to 0, per step.

    The closed form of torch's SequentialLR(LinearLR(start_factor=1e-3), CosineAnnealingLR) (tested against it).
    """
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    span = max(1, total - warmup)
    return [1e-3 + (1 - 1e-3) * t / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / span))
            for t in range(total)]


class HeadwiseOptimizer:
    """torch's SGD (momentum, nesterov) / Adam / AdamW update rules, once, over stacked heads: per-head
    learning rate, weight decay and momentum as per-entry vectors (scalars when every head agrees, the usual
    case and the fast path). The formulas and operation order are those of torch.optim's single-tensor code;
    tests hold them to torch.optim step by step."""

    def __init__(self, heads, configs: list[TrainConfig]):
        first = configs[0]
        self.kind, self.theta, self.grad = first.optimizer, heads.theta, heads.grad
        self.lr, self.wd, self.momentum = (self._per_entry([getattr(c, k) for c in configs], heads)
                                           for k in ("lr", "weight_decay", "momentum"))
        self.nesterov, (self.beta1, self.beta2), self.eps = first.nesterov, first.betas, first.eps
        self.steps = 0
        self.buf = torch.zeros_like(self.theta)  # SGD momentum / Adam first moment
        self.sq = torch.zeros_like(self.theta) if self.kind != "sgd" else None  # Adam second moment

    @staticmethod
    def _per_entry(values: list[float], heads):
        if len(set(values)) == 1:
            return float(values[0])
        return torch.tensor(values, dtype=heads.theta.dtype, device=heads.theta.device)[heads.head_index]

    def scalars(self, factor: float) -> tuple[float, float, float]:
        """The next update's step-dependent numbers: (factor, factor / Adam's first bias correction, the square root
        of its second). Counts the step. A CUDA graph gets them for a whole epoch ahead, as device tensors."""
        self.steps += 1
        if self.kind == "sgd":
            return factor, factor, 1.0
        return factor, factor / (1 - self.beta1 ** self.steps), math.sqrt(1 - self.beta2 ** self.steps)

    @torch.no_grad()
    def apply(self, factor, factor_over_bias1, root_bias2) -> None:
        """One update, every head's learning rate multiplied by the schedule's factor, from `scalars(factor)`:
        Python floats, or 0-d device tensors (inside a CUDA graph, where each replay reads them from memory)."""
        p, g, lr, wd = self.theta, self.grad, self.lr, self.wd
        if self.kind != "adamw" and (not isinstance(wd, float) or wd):
            g = g.add(p * wd)  # L2 penalty folded into the gradient (torch's SGD and Adam)
        if self.kind == "sgd":
            if not isinstance(self.momentum, float) or self.momentum:
                self.buf.mul_(self.momentum).add_(g)  # torch's first step clones g: the same, from zeros
                g = g.add(self.buf * self.momentum) if self.nesterov else self.buf
            step = lr * factor
            p.add_(g, alpha=-step) if isinstance(step, float) else p.sub_(g * step)
            return
        if self.kind == "adamw" and (not isinstance(wd, float) or wd):
            p.mul_(1 - lr * factor * wd)
        self.buf.lerp_(g, 1 - self.beta1)
        self.sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        denom = self.sq.sqrt().div_(root_bias2).add_(self.eps)
        step = lr * factor_over_bias1
        p.addcdiv_(self.buf, denom, value=-step) if isinstance(step, float) else p.addcdiv_(self.buf * step, denom,
                                                                                             value=-1)
