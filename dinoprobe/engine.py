"""The head-training engine: N >= 1 heads trained side by side on one stream of mini-batches.

A `probe` is a grid of one. Heads that see the same mini-batches (same normalisation, batch size, epochs,
warm-up, seed, and train source) and share a shape and an optimiser kind are stacked into one parameter vector:
each mini-batch goes through all of them in one GEMM per layer, and one update covers them all, with each
head's own learning rate, weight decay, momentum, label smoothing and dropout. Every head also keeps its own
best-on-val state and early stop, so it ends exactly where it would have ended alone (tested).

The gradients are computed in closed form (softmax cross-entropy and its two small layers), and the update is
torch's SGD / Adam / AdamW written once over the stacked parameters (`HeadwiseOptimizer`): per-head learning
rates do not fit torch's one-lr-per-param-group optimisers, and for heads this small the per-call bookkeeping
of autograd and `Optimizer.step` costs more than the arithmetic. Tests hold every step to a plain PyTorch loop
(`nn.Linear`, `torch.optim`, `F.cross_entropy`, `loss.backward()`).

Read top to bottom: config -> schedule -> parameters and gradients -> update -> batches -> the loop.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from dinoprobe.batches import BatchStream, TrainSource
from dinoprobe.errors import DinoprobeError
from dinoprobe.heads import HEAD_KINDS, NORMALIZATIONS, HeadSpec, Normalizer, init_head_state
from dinoprobe.losses import smoothed_eye, soft_targets, softmax_cross_entropy

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """One head's training recipe. Defaults: the original script's MLP head and Adam 1e-3."""

    head: str = "mlp"
    hidden: int = 256
    dropout: float = 0.1
    normalize: str = "none"
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW only
    eps: float = 1e-8  # Adam/AdamW only
    batch_size: int = 256
    epochs: int = 100
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    patience: int | None = None  # epochs without a better val accuracy before this head stops; None = never

    def __post_init__(self):
        checks = [
            (self.head in HEAD_KINDS, f"head must be one of {HEAD_KINDS}, got {self.head!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.normalize in NORMALIZATIONS, f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (not self.nesterov or self.momentum > 0, "nesterov needs momentum > 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two values in [0, 1), "
                                                                           f"got {self.betas}"),
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (0 <= self.warmup_epochs < self.epochs, f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.hidden >= 1, f"hidden must be >= 1, got {self.hidden}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1 or None, got {self.patience}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise DinoprobeError("; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def head_spec(self, in_dim: int, num_classes: int) -> HeadSpec:
        return HeadSpec(self.head, in_dim, num_classes, self.hidden, self.dropout)

    @property
    def stream_key(self) -> tuple:
        """Heads with equal keys see the same normalised features in the same mini-batch order."""
        return (self.normalize, self.batch_size, self.epochs, self.warmup_epochs, self.seed)

    @property
    def shape_key(self) -> tuple:
        """Heads stacked into one parameter vector need one shape and one update rule."""
        return (self.head, self.hidden if self.head == "mlp" else 0, self.optimizer, self.nesterov, self.betas,
                self.eps)


@dataclass
class TrainResult:
    """One head's outcome: its best-on-val state (build_head's state-dict keys) and the per-epoch record."""

    config: TrainConfig
    best_state: dict
    normalizer: Normalizer
    best_epoch: int = 0
    best_val_acc: float = -1.0
    history: list[dict] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    group: int = 0
    group_size: int = 1

    @property
    def epochs_run(self) -> int:
        return len(self.history)


# ----------------------------------------------------------------------------------------------- schedule
def lr_factors(epochs: int, warmup_epochs: int, steps_per_epoch: int) -> list[float]:
    """The learning-rate multiplier of every step: linear warm-up from 1e-3, then cosine decay to 0, per step.

    The closed form of torch's SequentialLR(LinearLR(start_factor=1e-3), CosineAnnealingLR) (tested against it).
    """
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    span = max(1, total - warmup)
    return [1e-3 + (1 - 1e-3) * t / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / span))
            for t in range(total)]


# ----------------------------------------------------------------------------------- parameters, gradients
class StackedHeads:
    """N heads of one shape as one flat parameter vector (all first-layer weights, then biases, ...), each
    layer a (N, out, in) view into it, so one update covers every head and every layer.

    `step` computes the batch loss of every head and the gradients into one flat vector in closed form:
    d(loss)/d(logits) = (softmax - soft target) / B, then the layers' chain rule. Linear logits are batch-first
    (B, N, C), the layout of the first GEMM's output; MLP logits are head-first (N, B, C), that of `bmm`.
    """

    def __init__(self, configs: list[TrainConfig], dim: int, num_classes: int, device):
        self.kind, self.n = configs[0].head, len(configs)
        specs = [c.head_spec(dim, num_classes) for c in configs]
        states = [init_head_state(spec, c.seed) for spec, c in zip(specs, configs)]  # as each head alone
        self.names = list(states[0])  # "0.weight", "0.bias"[, "3.weight", "3.bias"]
        shapes = [(self.n, *states[0][name].shape) for name in self.names]
        sizes = [math.prod(s) for s in shapes]
        self.theta = torch.cat([torch.stack([s[name] for s in states]).reshape(-1) for name in self.names]).to(device)
        self.grad = torch.zeros_like(self.theta)
        self.layers = dict(zip(self.names, self._views(self.theta, shapes, sizes)))
        self.grads = dict(zip(self.names, self._views(self.grad, shapes, sizes)))
        self.head_index = torch.cat([torch.arange(self.n, device=device).repeat_interleave(size // self.n)
                                     for size in sizes])  # which head each entry of theta belongs to
        if self.kind == "mlp":
            self.p = torch.tensor([c.dropout for c in configs], device=device).view(1, -1, 1)
            self.keep_scale = 1.0 / (1.0 - self.p)
            self.dropout = bool((self.p > 0).any())
            # one draw per step from the group's seed: what SeededDropout draws for each head alone
            self.mask_generator = torch.Generator(device=device).manual_seed(configs[0].seed)

    @staticmethod
    def _views(flat, shapes, sizes):
        return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]

    def logits(self, x: torch.Tensor, train: bool = False):
        """Forward of every head; (logits, what the backward pass needs).

        x: (B, D), one batch for all heads (batch-first: one GEMM for every head's first layer), or (N, B, D),
        each head its own rows (few-shot tries; head-first, `bmm`)."""
        n = self.n
        w1, b1 = self.layers["0.weight"], self.layers["0.bias"]
        out = w1.shape[1]
        if x.dim() == 2:
            h = torch.addmm(b1.reshape(-1), x, w1.reshape(n * out, -1).t()).view(x.shape[0], n, out)  # (B, N, out)
        else:
            h = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))  # (N, B, out)
        if self.kind == "linear":
            return h, None
        gate = h > 0  # ReLU's derivative
        h = h.relu_()
        if train and self.dropout:
            batch = x.shape[-2]
            r = torch.rand((batch, out), generator=self.mask_generator, device=x.device)
            p, scale = self.p, self.keep_scale  # (1, N, 1): batch-first
            if x.dim() == 3:
                p, scale = p.view(-1, 1, 1), scale.view(-1, 1, 1)  # (N, 1, 1): head-first
            mask = ((r.unsqueeze(1) if x.dim() == 2 else r) >= p) * scale
            h, gate = h * mask, gate * mask
        if x.dim() == 2:
            h, gate = h.transpose(0, 1), gate.transpose(0, 1)  # head-first for the second layer
        w2, b2 = self.layers["3.weight"], self.layers["3.bias"]
        logits = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))  # (N, B, C)
        return logits, (h, gate)

    @torch.no_grad()
    def step(self, x: torch.Tensor, soft: torch.Tensor):
        """One forward and backward of every head: gradients into self.grad; returns the negative loss summed
        over the batch per head, (N,) (or a scalar for one head), and the predictions (B, N).

        x: (B, D) shared by all heads, with soft targets (B, N or 1, C); or (N, B, D), each head its own rows, with
        soft targets (N, B, C). Each torch call costs microseconds of dispatch, about what a head this small costs
        in arithmetic, so the step makes as few calls as it can."""
        n, shared = self.n, x.dim() == 2
        b = x.shape[-2]
        logits, saved = self.logits(x, train=True)
        head_first = not shared or self.kind == "mlp"  # logits (N, B, C), else batch-first (B, N, C)
        if head_first and shared:
            soft = soft.transpose(0, 1).expand_as(logits)
        pred = logits.argmax(-1)
        batch_dim = 1 if head_first else 0
        if n == 1:  # drop the head dimension: softmax_cross_entropy's single-dot-product path
            logits, soft, batch_dim = logits.reshape(b, -1), soft.reshape(b, -1), 0
        neg_loss, g = softmax_cross_entropy(logits, soft, batch_dim)
        if not head_first:
            torch.mm(g.view(b, -1).t(), x, out=self.grads["0.weight"].view(-1, x.shape[1]))
            torch.sum(g.view(b, n, -1), 0, out=self.grads["0.bias"])
            return neg_loss, pred.view(b, n)
        g = g.view(n, b, -1)
        if self.kind == "linear":  # each head its own rows
            torch.bmm(g.transpose(1, 2), x, out=self.grads["0.weight"])
            torch.sum(g, 1, out=self.grads["0.bias"])
            return neg_loss, pred.view(n, b).t()
        h, gate = saved
        torch.bmm(g.transpose(1, 2), h, out=self.grads["3.weight"])
        torch.sum(g, 1, out=self.grads["3.bias"])
        dh = torch.bmm(g, self.layers["3.weight"]).mul_(gate)  # (N, B, H)
        if shared:
            dh = dh.transpose(0, 1)  # (B, N, H): the first layer's GEMM covers every head at once
            torch.mm(dh.reshape(b, -1).t(), x, out=self.grads["0.weight"].view(-1, x.shape[1]))
            torch.sum(dh, 0, out=self.grads["0.bias"])
        else:
            torch.bmm(dh.transpose(1, 2), x, out=self.grads["0.weight"])
            torch.sum(dh, 1, out=self.grads["0.bias"])
        return neg_loss, pred.view(n, b).t()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Eval-mode predictions of every head, (rows, N)."""
        preds = []
        for part in x.split(chunk):
            logits, _ = self.logits(part)  # shared rows: batch-first for linear heads, head-first for MLPs
            preds.append(logits.argmax(-1) if self.kind == "linear" else logits.argmax(-1).t())
        return torch.cat(preds) if preds else torch.zeros(0, self.n, dtype=torch.long, device=x.device)

    def head_state(self, i: int, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        source = self.layers if flat is None else dict(zip(self.names, self._views(
            flat, [v.shape for v in self.layers.values()], [v.numel() for v in self.layers.values()])))
        return {name: source[name][i].detach().clone().cpu() for name in self.names}


# -------------------------------------------------------------------------------------------------- update
class HeadwiseOptimizer:
    """torch's SGD (momentum, nesterov) / Adam / AdamW update rules, once, over stacked heads: per-head
    learning rate, weight decay and momentum as per-entry vectors (scalars when every head agrees, the usual
    case and the fast path). The formulas and operation order are those of torch.optim's single-tensor code;
    tests hold them to torch.optim step by step."""

    def __init__(self, heads: StackedHeads, configs: list[TrainConfig]):
        first = configs[0]
        self.kind, self.theta, self.grad = first.optimizer, heads.theta, heads.grad
        self.lr, self.wd, self.momentum = (self._per_entry([getattr(c, k) for c in configs], heads)
                                           for k in ("lr", "weight_decay", "momentum"))
        self.nesterov, (self.beta1, self.beta2), self.eps = first.nesterov, first.betas, first.eps
        self.steps = 0
        self.buf = torch.zeros_like(self.theta)  # SGD momentum / Adam first moment
        self.sq = torch.zeros_like(self.theta) if self.kind != "sgd" else None  # Adam second moment

    @staticmethod
    def _per_entry(values: list[float], heads: StackedHeads):
        if len(set(values)) == 1:
            return float(values[0])
        return torch.tensor(values, dtype=heads.theta.dtype, device=heads.theta.device)[heads.head_index]

    @torch.no_grad()
    def step(self, factor: float) -> None:
        """One update with every head's learning rate multiplied by the schedule's `factor`."""
        self.steps += 1
        p, g, lr, wd = self.theta, self.grad, self.lr, self.wd
        if self.kind != "adamw" and (not isinstance(wd, float) or wd):
            g = g.add(p * wd)  # L2 penalty folded into the gradient (torch's SGD and Adam)
        if self.kind == "sgd":
            if not isinstance(self.momentum, float) or self.momentum:
                self.buf.mul_(self.momentum).add_(g)  # torch's first step clones g: the same, from zeros
                g = g.add(self.buf * self.momentum) if self.nesterov else self.buf
            p.sub_(g * lr, alpha=factor) if not isinstance(lr, float) else p.add_(g, alpha=-lr * factor)
            return
        if self.kind == "adamw" and (not isinstance(wd, float) or wd):
            p.mul_(1 - lr * factor * wd)
        self.buf.lerp_(g, 1 - self.beta1)
        self.sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bias1, bias2 = 1 - self.beta1 ** self.steps, 1 - self.beta2 ** self.steps
        denom = self.sq.sqrt().div_(math.sqrt(bias2)).add_(self.eps)
        if isinstance(lr, float):
            p.addcdiv_(self.buf, denom, value=-lr * factor / bias1)
        else:
            p.addcdiv_(self.buf * lr, denom, value=-factor / bias1)


# ------------------------------------------------------------------------------------------------ the loop
def plan_groups(configs: list[TrainConfig], dim: int, num_classes: int, max_memory: int | None = None,
                rows: list | None = None) -> list[list[int]]:
    """Indices of configs trained together: same stream and shape, split to fit the memory budget. With training
    rows per config (few-shot tries), heads side by side also need as many rows, and, when they standardise
    features with their own rows' statistics, the same rows."""
    buckets: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        subset = () if rows is None else (len(rows[i]),) + (
            (tuple(rows[i].tolist()),) if cfg.normalize == "standardize" else ())
        buckets.setdefault((cfg.stream_key, cfg.shape_key, subset), []).append(i)
    groups = []
    for members in buckets.values():
        chunk, used = [], 0
        for i in members:
            need = head_bytes(configs[i], dim, num_classes)
            if chunk and max_memory and used + need > max_memory:
                groups.append(chunk)
                chunk, used = [], 0
            chunk.append(i)
            used += need
        groups.append(chunk)
    return groups


def head_bytes(cfg: TrainConfig, dim: int, num_classes: int) -> int:
    """Rough float32 footprint of one head in a group: parameters, gradient, best copy, two optimiser states,
    per-entry hyperparameters, and a batch's activations."""
    width = cfg.hidden if cfg.head == "mlp" else 0
    params = (dim * width + width + width * num_classes + num_classes) if width else dim * num_classes + num_classes
    activations = cfg.batch_size * (3 * width + 3 * num_classes)
    return 4 * (8 * params + activations)


def train_heads(configs: list[TrainConfig], train: TrainSource, y_train: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor, num_classes: int, max_memory: int | None = None, progress: bool = False,
                desc: str = "train", order_fn=None, rows: list | None = None) -> list[TrainResult]:
    """Train every config, side by side where they share a stream and a shape; one TrainResult per config.

    `train` is an (N, D) tensor, augmented views or a streamed split (batches.py). `order_fn(n, generator)`
    replaces the epoch's random permutation of in-memory features (tests follow a streamed run's order with it).
    `rows`, one index tensor per config, trains each head on its own rows of an in-memory `train` (few-shot
    tries): each head then sees exactly the batches it would see trained alone on train[rows].
    """
    if not configs:
        raise DinoprobeError("no configurations to train")
    if len(x_val) == 0:
        raise DinoprobeError("the best epoch is chosen on validation data, and the validation set is empty")
    if rows is not None and (len(rows) != len(configs) or not isinstance(train, torch.Tensor)):
        raise DinoprobeError("training rows per head need one index tensor per config and in-memory features")
    dim = train.shape[-1]
    groups = plan_groups(configs, dim, num_classes, max_memory, rows)
    results: list[TrainResult | None] = [None] * len(configs)
    total = sum(configs[g[0]].epochs for g in groups)
    label = desc if len(configs) == 1 else f"{desc}: {len(configs)} heads in {len(groups)} group(s)"
    with tqdm(total=total, desc=label, unit="epoch", disable=not progress, dynamic_ncols=True) as bar:
        for number, members in enumerate(groups):
            group_rows = None if rows is None else torch.stack([torch.as_tensor(rows[i]) for i in members])
            group_results = _train_group([configs[i] for i in members], train, y_train, x_val, y_val, num_classes,
                                         bar, order_fn, group_rows)
            for i, res in zip(members, group_results):
                res.group, res.group_size = number, len(members)
                results[i] = res
    return results  # type: ignore[return-value]


def _train_group(configs: list[TrainConfig], train: TrainSource, y_train: torch.Tensor, x_val: torch.Tensor,
                 y_val: torch.Tensor, num_classes: int, bar: tqdm, order_fn, rows=None) -> list[TrainResult]:
    first = configs[0]
    device = y_train.device
    rows = None if rows is None else rows.to(device)
    # train statistics, from clean features (and from the head's own rows, which plan_groups made one set)
    normalizer = Normalizer.fit(first.normalize, train if rows is None else train[rows[0]]).to(device)
    heads = StackedHeads(configs, train.shape[-1], num_classes, device)
    optimizer = HeadwiseOptimizer(heads, configs)
    n_train, n = len(y_train) if rows is None else rows.shape[1], len(configs)
    factors = lr_factors(first.epochs, first.warmup_epochs, -(-n_train // first.batch_size))
    base_lrs = [c.lr for c in configs]
    smoothing = [c.label_smoothing for c in configs]
    eye = smoothed_eye(num_classes, smoothing if len(set(smoothing)) > 1 else smoothing[0], device)
    batches = BatchStream(train, y_train, normalizer, first.batch_size, first.seed, order_fn, rows)
    x_val = normalizer(x_val)
    results = [TrainResult(c, heads.head_state(i), normalizer) for i, c in enumerate(configs)]
    best = heads.theta.clone()
    stale, active = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
    start, step = time.perf_counter(), 0
    for epoch in range(1, first.epochs + 1):
        epoch_lrs = [lr * factors[step] for lr in base_lrs]
        neg_losses, sizes, preds, targets = [], [], [], []
        for features, target in batches.epoch():
            neg_loss, pred = heads.step(features, soft_targets(eye, target))  # target (B,) or (B, N)
            optimizer.step(factors[step])
            step += 1
            neg_losses.append(neg_loss)
            sizes.append(len(target))
            preds.append(pred)
            targets.append(target)
        # the epoch's bookkeeping in a few calls rather than a few per step
        step_losses = -torch.stack(neg_losses).reshape(len(sizes), n).cpu().double() \
            / torch.tensor(sizes, dtype=torch.float64)[:, None]  # (steps, N)
        seen = torch.cat(targets)  # (rows,) shared by every head, or (rows, N) with rows per head
        hits = (torch.cat(preds) == (seen[:, None] if seen.dim() == 1 else seen)).sum(0).tolist()
        train_acc = [h / n_train for h in hits]
        val_acc = [h / len(y_val) for h in (heads.predict(x_val) == y_val[:, None]).sum(0).tolist()]
        improved = torch.tensor([a > r.best_val_acc for a, r in zip(val_acc, results)]) & active
        if improved.any():
            keep = improved.to(device)[heads.head_index]
            best = torch.where(keep, heads.theta, best)
        for i in range(n):
            if not active[i]:  # a stopped head: later updates are never recorded or returned
                continue
            res = results[i]
            res.step_losses += step_losses[:, i].tolist()
            res.history.append({"epoch": epoch, "lr": epoch_lrs[i], "train_loss": step_losses[:, i].mean().item(),
                                "train_acc": train_acc[i], "val_acc": val_acc[i]})
            if improved[i]:
                res.best_val_acc, res.best_epoch, stale[i] = val_acc[i], epoch, 0
            else:
                stale[i] += 1
                if configs[i].patience and stale[i] >= configs[i].patience:
                    active[i] = False
        bar.update(1)
        if n == 1:
            bar.set_postfix(loss=f"{results[0].history[-1]['train_loss']:.4f}",
                            val_acc=f"{val_acc[0]:.4f}", best=f"{results[0].best_val_acc:.4f}")
        if not active.any():
            bar.update(first.epochs - epoch)
            break
    seconds = time.perf_counter() - start
    for i, res in enumerate(results):
        res.best_state, res.seconds = heads.head_state(i, best), seconds
    return results
