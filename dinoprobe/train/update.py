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
    case and the fast path). The formulas and operation order are those of torch.optim's single-tensor code (Adam's
    `capturable` form when the heads share a learning rate: its step-dependent numbers are then folded on the host,
    so a CUDA graph's step is two kernels shorter); tests hold them to torch.optim step by step."""

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
        """The next update's step-dependent numbers, from the schedule's factor; counts the step. A CUDA graph gets
        them for a whole epoch ahead, as device tensors, so everything that can be computed here is: with one
        learning rate for every head (the usual case) they are (lr x factor, and for Adam the two numbers of torch's
        `capturable` form below), so the update spends no kernels on them; with per-head learning rates, (factor,
        factor / Adam's first bias correction, the square root of its second)."""
        self.steps += 1
        sgd = self.kind == "sgd"
        bias1 = 1.0 if sgd else 1 - self.beta1 ** self.steps
        root_bias2 = 1.0 if sgd else math.sqrt(1 - self.beta2 ** self.steps)
        if not isinstance(self.lr, float):
            return factor, factor / bias1, root_bias2
        lr = self.lr * factor
        if sgd:
            return lr, 0.0, 0.0
        # torch's capturable Adam: p += m / (sqrt(v) / (root_bias2 * s) + eps / s), s = -lr / bias1; lr = 0: no move
        s = -lr / bias1
        return (lr, root_bias2 * s, self.eps / s) if s else (lr, math.inf, math.inf)

    @torch.no_grad()
    def apply(self, *numbers) -> None:
        """One update with `scalars`' numbers: Python floats, or 0-d device tensors (inside a CUDA graph, where each
        replay reads them from memory)."""
        p, g, wd, momentum = self.theta, self.grad, self.wd, self.momentum
        common_lr = isinstance(self.lr, float)
        lr = numbers[0] if common_lr else self.lr * numbers[0]  # this step's learning rate(s)
        if self.kind != "adamw" and (not isinstance(wd, float) or wd):  # L2 folded into the gradient (SGD, Adam)
            g = g.add(p, alpha=wd) if isinstance(wd, float) else g.add(p * wd)
        if self.kind == "sgd":
            if not isinstance(momentum, float) or momentum:
                self.buf.mul_(momentum).add_(g)  # torch's first step clones g: the same, from zeros
                if not self.nesterov:
                    g = self.buf
                else:
                    g = g.add(self.buf, alpha=momentum) if isinstance(momentum, float) else g.add(self.buf * momentum)
            if isinstance(lr, float):
                p.add_(g, alpha=-lr)
            else:
                p.addcmul_(g, lr, value=-1)
            return
        if self.kind == "adamw" and (not isinstance(wd, float) or wd):
            p.mul_(1 - lr * wd)
        self.buf.lerp_(g, 1 - self.beta1)
        self.sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        if common_lr:
            p.addcdiv_(self.buf, self.sq.sqrt().div_(numbers[1]).add_(numbers[2]))
        else:  # torch's default form, the learning rate a vector over the entries
            _, factor_over_bias1, root_bias2 = numbers
            denom = self.sq.sqrt().div_(root_bias2).add_(self.eps)
            p.addcdiv_(self.buf * (self.lr * factor_over_bias1), denom, value=-1)
