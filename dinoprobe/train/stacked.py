"""N heads of one shape stacked side by side, their forward pass and their gradients in closed form.

One tensor layout throughout: head-first. A layer is a weight (N, out, in) and a bias (N, out); activations and
logits are (N, B, ·). Rows shared by every head come as x (B, D); rows of each head's own (few-shot tries) as
(N, B, D). The layers are named once, here, by position (`layers[0]`, `layers[1]`); nn.Sequential's `0.*`/`3.*` keys
appear only when a head is built or saved (heads.py).

Each torch call costs microseconds of dispatch, about what a head this small costs in arithmetic, so a step makes
as few calls as it can: shared rows go through every head's first layer in one GEMM (`affine`).
"""
from __future__ import annotations

import math

import torch

from dinoprobe.settings import VAL_CHUNK_BYTES, VAL_CHUNK_ROWS
from dinoprobe.train.config import TrainConfig
from dinoprobe.train.heads import init_layers


def affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, D) shared by the heads, or (N, B, D) each head its own, through weight (N, out, D) -> (N, B, out)."""
    if x.dim() == 2:  # one GEMM for every head; its (B, N, out) result seen head-first without a copy
        n, out = weight.shape[:2]
        flat = torch.addmm(bias.reshape(-1), x, weight.reshape(n * out, -1).t())
        return flat.view(len(x), n, out).transpose(0, 1)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def affine_backward(x: torch.Tensor, g: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> None:
    """Gradients of `affine` for the output gradient g (N, B, out), written into grad_weight / grad_bias."""
    if x.dim() == 2:
        torch.mm(g.transpose(0, 1).reshape(len(x), -1).t(), x, out=grad_weight.view(-1, x.shape[1]))
    else:
        torch.bmm(g.transpose(1, 2), x, out=grad_weight)
    torch.sum(g, 1, out=grad_bias)


class StackedHeads:
    """N heads of one shape as one flat parameter vector (layer by layer: all weights, then all biases), each
    layer's weight and bias a view into it, so one update covers every head and every layer."""

    def __init__(self, configs: list[TrainConfig], dim: int, num_classes: int, device):
        self.kind, self.n = configs[0].head, len(configs)
        inits = [init_layers(c.head, dim, num_classes, c.hidden, c.seed, c.init) for c in configs]  # as each head alone
        tensors = [torch.stack([init[i][j] for init in inits]) for i in range(len(inits[0])) for j in (0, 1)]
        self.theta = torch.cat([t.reshape(-1) for t in tensors]).to(device)
        self.grad = torch.zeros_like(self.theta)
        self.shapes = [t.shape for t in tensors]
        self.layers = self._layers(self.theta)
        self.grads = self._layers(self.grad)
        self.head_index = torch.cat([torch.arange(self.n, device=device).repeat_interleave(math.prod(s[1:]))
                                     for s in self.shapes])  # which head each entry of theta belongs to
        self.dropout = False
        if self.kind == "mlp":
            self.p = torch.tensor([c.dropout for c in configs], device=device).view(-1, 1, 1)
            self.keep_scale = 1.0 / (1.0 - self.p)
            self.dropout = bool((self.p > 0).any())
            # one draw per step from the group's seed, shared by the heads: what each head alone draws
            self.mask_generator = torch.Generator(device=device).manual_seed(configs[0].seed)

    def _layers(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = [p.view(s) for p, s in zip(flat.split([math.prod(s) for s in self.shapes]), self.shapes)]
        return list(zip(parts[0::2], parts[1::2]))

    def forward(self, x: torch.Tensor, train: bool = False):
        """Logits (N, B, C) of every head, and what the backward pass needs."""
        h = affine(x, *self.layers[0])
        if self.kind == "linear":
            return h, None
        gate = h > 0  # ReLU's derivative
        h = h.relu()
        if train and self.dropout:  # inverted dropout, as F.dropout: kept values scaled by 1 / (1 - p)
            r = torch.rand(h.shape[1:], generator=self.mask_generator, device=x.device)
            mask = (r >= self.p) * self.keep_scale  # (N, B, hidden)
            h, gate = h * mask, gate * mask
        return affine(h, *self.layers[1]), (h, gate)

    @torch.no_grad()
    def step(self, x: torch.Tensor, loss):
        """One forward and backward of every head, gradients into self.grad. `loss(logits)` gives each head's negative
        loss summed over the batch (N,) and the gradient of its batch loss w.r.t. the logits (N, B, C) (losses.py).
        Returns the negative losses and the logits."""
        logits, saved = self.forward(x, train=True)
        neg_loss, g = loss(logits)
        if self.kind == "mlp":
            h, gate = saved
            affine_backward(h, g, *self.grads[1])
            g = torch.bmm(g, self.layers[1][0]).mul_(gate)  # (N, B, hidden)
        affine_backward(x, g, *self.grads[0])
        return neg_loss, logits

    def _chunk(self) -> int:
        # rows evaluated at once: VAL_CHUNK_ROWS for one head, fewer side by side, so N heads' hidden activations on val
        # stay near a training batch's (what plan_groups budgets), not N x 8,192 rows; and fewer with many classes,
        # so that their logits and hidden activations stay within VAL_CHUNK_BYTES
        per_row = 4 * self.n * sum(shape[1] for shape in self.shapes[1::2])  # each layer's outputs: its bias
        return max(1, min(max(256, VAL_CHUNK_ROWS // self.n), VAL_CHUNK_BYTES // per_row))

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits of every head on shared rows, (N, rows, C)."""
        return torch.cat([self.forward(part)[0] for part in x.split(self._chunk())], 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode predictions of every head on shared rows, (N, rows)."""
        preds = [self.forward(part)[0].argmax(-1) for part in x.split(self._chunk())]
        return torch.cat(preds, 1) if preds else torch.zeros(self.n, 0, dtype=torch.long, device=x.device)

    def finite(self) -> torch.Tensor:
        """(N,) on the CPU: whether each head's parameters are all finite."""
        bad = torch.zeros(self.n, device=self.theta.device).index_add_(0, self.head_index,
                                                                        (~self.theta.isfinite()).float())
        return (bad == 0).cpu()

    def head_layers(self, i: int, flat: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Head i's layers [(weight, bias), ...] on the CPU, from the live parameters or a saved flat copy."""
        layers = self.layers if flat is None else self._layers(flat)
        return [(w[i].detach().clone().cpu(), b[i].detach().clone().cpu()) for w, b in layers]
