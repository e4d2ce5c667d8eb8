"""One training step of a head, with as little per-step overhead as eager torch allows.

A linear head over cached features is so small (384 x 10) that a step's cost is mostly bookkeeping, not
arithmetic: in torch.profiler, autograd's graph and `Optimizer.step`'s per-call work (hooks, a profiler record,
re-collecting its state) outweighed the two GEMMs. So linear heads get softmax cross-entropy's gradient in
closed form, and every head's update calls torch's own update function (`torch.optim.adam.adam`,
`torch.optim.sgd.sgd`: the code `Optimizer.step` runs, fused kernels included) directly on the optimiser's
state. Tests hold both to autograd and `Optimizer.step`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd


def smoothed_eye(classes: int, smoothing, device=None) -> torch.Tensor:
    """Rows of torch's label-smoothed targets, (1 - s) * one_hot + s / C: (C, C), or (N, C, C) for one smoothing
    per head. Indexing these rows by label gives a batch's soft targets without F.one_hot's per-call range check
    (a device sync, and 2x the time of the lookup)."""
    s = torch.as_tensor(smoothing, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    eye = torch.eye(classes, device=device)
    out = (1 - s) * eye + s / classes
    return out[0] if torch.as_tensor(smoothing).dim() == 0 else out


def soft_targets(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch-first soft targets: (B, C) from a (C, C) smoothed_eye, (B, N, C) from an (N, C, C) one."""
    rows = eye.index_select(-2, target)
    return rows if eye.dim() == 2 else rows.transpose(0, 1)


def soft_cross_entropy(logp: torch.Tensor, soft_target: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """Mean over the batch of -sum(target * log p): torch's cross-entropy, label smoothing included when the
    targets come from smoothed_eye. Other leading dimensions (a sweep's heads) are kept."""
    return -(logp * soft_target).sum(-1).mean(batch_dim)


def softmax_cross_entropy(logits: torch.Tensor, soft_target: torch.Tensor):
    """The batch-mean cross-entropy and its gradient w.r.t. the logits in closed form, (softmax - target) / B:
    what autograd gives, without building a graph.

    logits (B, C), or (B, N, C) for N independent heads (a sweep's); soft_target broadcastable to it.
    Returns (loss: a scalar, or (N,) per head; gradient shaped like logits).
    """
    logp = torch.log_softmax(logits, dim=-1)
    loss = soft_cross_entropy(logp, soft_target)
    return loss, logp.exp_().sub_(soft_target).div_(logits.shape[0])


class LinearStep:
    """Forward and gradients of a linear head (nn.Sequential(nn.Linear)) without autograd: two GEMMs."""

    def __init__(self, head: nn.Sequential, label_smoothing: float):
        self.linear = head[0]
        w = self.linear.weight
        self.eye = smoothed_eye(w.shape[0], label_smoothing, w.device).to(w.dtype)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        w, b = self.linear.weight, self.linear.bias
        logits = torch.addmm(b, x, w.t())
        loss, grad = softmax_cross_entropy(logits, soft_targets(self.eye, target))
        w.grad = grad.t() @ x
        b.grad = grad.sum(0)
        return loss, logits


class AutogradStep:
    """Forward and backward of any head through autograd."""

    def __init__(self, head: nn.Module, label_smoothing: float):
        self.head, self.loss_fn = head, nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        logits = self.head(x)
        loss = self.loss_fn(logits, target)
        self.head.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), logits.detach()


def head_step(head: nn.Sequential, label_smoothing: float):
    is_linear = len(head) == 1 and isinstance(head[0], nn.Linear)
    return (LinearStep if is_linear else AutogradStep)(head, label_smoothing)


class DirectUpdate:
    """`optimizer.step()` for a one-group torch SGD / Adam / AdamW, calling torch's update function on the
    optimiser's own state and hyper-parameters; the learning rate is read every step, so schedulers work. The
    first call goes through `optimizer.step()`, which creates the state; any other optimiser always does."""

    KINDS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.update = optimizer, None

    def _bind(self) -> None:
        """After the first step: the state tensors and constant hyper-parameters, fixed for the run."""
        opt = self.optimizer
        if type(opt) not in self.KINDS or len(opt.param_groups) != 1 or opt.param_groups[0].get("amsgrad"):
            return
        group = opt.param_groups[0]
        self.group, self.params = group, list(group["params"])
        states = [opt.state[p] for p in self.params]
        hyper = {k: group[k] for k in ("weight_decay", "maximize", "foreach", "fused")}
        if isinstance(opt, torch.optim.SGD):
            buffers = [s.get("momentum_buffer") for s in states]
            hyper.update({k: group[k] for k in ("momentum", "dampening", "nesterov")})
            self.update = lambda grads, lr: sgd(self.params, grads, buffers, lr=lr, **hyper)
        else:
            try:
                state = [[s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "step")]
            except KeyError:  # a parameter without state (no gradient yet): keep using optimizer.step()
                return
            hyper.update({k: group[k] for k in ("eps", "capturable", "differentiable", "decoupled_weight_decay")})
            beta1, beta2 = group["betas"]
            self.update = lambda grads, lr: adam(self.params, grads, state[0], state[1], [], state[2], lr=lr,
                                                 amsgrad=False, beta1=beta1, beta2=beta2, **hyper)

    @torch.no_grad()
    def __call__(self) -> None:
        if self.update is not None:
            grads = [p.grad for p in self.params]
            if all(g is not None for g in grads):
                self.update(grads, self.group["lr"])
                return
        self.optimizer.step()
        if self.update is None:
            self._bind()
