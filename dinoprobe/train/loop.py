"""The head-training loop: N >= 1 heads trained side by side on one stream of mini-batches.

Labels are (rows,) class indices (softmax heads) or an (rows, classes) 0/1 matrix (multi-label: sigmoid heads,
chosen on validation macro mAP). A `probe` is a group of one. Heads that see the same mini-batches (same
normalisation, batch size, epochs, warm-up, seed, and train source) and share a shape and an optimiser kind are
stacked (stacked.py): each mini-batch goes through all of them at once, and one update (update.py) covers them
all, with each head's own learning rate, weight decay, momentum, label smoothing and dropout. Every head also keeps
its own best-on-val state and early stop, so it ends exactly where it would have ended alone (tested against a
plain PyTorch loop).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from dinoprobe.device import memory_available
from dinoprobe.errors import DinoprobeError
from dinoprobe.progress import progress_bar
from dinoprobe.train.config import TrainConfig
from dinoprobe.train.graphed import GRAPHS_BY_DEFAULT, StaticEpochs
from dinoprobe.train.heads import Normalizer
from dinoprobe.train.losses import sigmoid_cross_entropy, softmax_cross_entropy
from dinoprobe.train.ranking import mean_average_precision
from dinoprobe.train.sources import InMemory, PerHeadRows, TrainSource, as_train_source
from dinoprobe.train.stacked import StackedHeads
from dinoprobe.train.update import HeadwiseOptimizer, lr_factors

__all__ = ["TrainConfig", "TrainResult", "train_heads", "plan_groups"]

# An epoch's mean cross-entropy above this (the true class given probability below e^-1e6), or a non-finite one,
# is divergence: no head that learns gets there, and its weights only grow from it.
DIVERGED_LOSS = 1e6


@dataclass
class TrainResult:
    """One head's outcome: its best-on-val layers [(weight, bias), ...] and the per-epoch record."""

    config: TrainConfig
    best_layers: list
    normalizer: Normalizer
    best_epoch: int = 0
    best_val_acc: float = -1.0  # the selection score: val accuracy, or macro mAP for multi-label heads
    history: list[dict] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    group: int = 0
    group_size: int = 1
    diverged_epoch: int | None = None  # the epoch whose loss went to NaN or infinity; the head stopped there
    cuda_graph: bool = False  # its epochs after the first were replayed from one CUDA graph (graphed.py)

    @property
    def epochs_run(self) -> int:
        return len(self.history)


@dataclass
class EpochRecord:
    """What an epoch's steps leave for its bookkeeping, on the device, in buffers made once per epoch: per step the
    heads' negative summed losses and weighted denominators (steps, N), per head the training hits (N,), and per
    step the batch size. Tensors kept step by step, a few bytes each, would sit between the steps' freed batches
    and fragment the host's heap: on 200,000 rows it grew by the size of the features every epoch."""

    neg_losses: torch.Tensor
    hits: torch.Tensor
    denoms: torch.Tensor | None = None
    sizes: list = field(default_factory=list)

    @classmethod
    def empty(cls, steps: int, heads: int, device, weighted: bool) -> EpochRecord:
        return cls(torch.zeros(steps, heads, device=device), torch.zeros(heads, dtype=torch.long, device=device),
                   torch.zeros(steps, heads, device=device) if weighted else None)

    @property
    def steps(self) -> int:
        return len(self.sizes)


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
            need = head_bytes(configs[i], dim, num_classes, None if rows is None else len(rows[i]))
            if chunk and max_memory and used + need > max_memory:
                groups.append(chunk)
                chunk, used = [], 0
            chunk.append(i)
            used += need
        groups.append(chunk)
    return groups


def head_bytes(cfg: TrainConfig, dim: int, num_classes: int, rows: int | None = None) -> int:
    """The peak footprint of one head in a group, in float32s per parameter: parameters, gradient, best copy, two
    optimiser states, per-entry learning rate and weight decay, the int64 head index (2), and the update's and the
    epoch's temporaries (about 5) — 14, rounded up to 16 — plus a batch's activations. (A 90,000-head MLP grid
    on a 2-core CPU with a 10.8 GB budget peaked at 18.5 GB resident when this said 8, at 11.2 GB with 16.)"""
    width = cfg.hidden if cfg.head == "mlp" else 0
    params = (dim * width + width + width * num_classes + num_classes) if width else dim * num_classes + num_classes
    batch = cfg.batch_size if rows is None else min(cfg.batch_size, max(rows, 1))  # a batch is at most the rows
    activations = batch * (3 * width + 3 * num_classes)
    return 4 * (16 * params + activations)


def check_heads_fit(configs: list[TrainConfig], dim: int, num_classes: int, rows: int, available: int | None,
                    device) -> None:
    """Refuse a head that alone needs more memory than there is (a --hidden of 10^8): torch's allocator would refuse
    it, or, where Linux lets it overcommit, its OOM killer would end the run without a word once the weights are
    touched. Groups of heads are sized by plan_groups; one head cannot be split."""
    if available is None:
        return
    largest = max(configs, key=lambda c: head_bytes(c, dim, num_classes, rows))
    need = head_bytes(largest, dim, num_classes, rows)
    if need > available:
        what = f"an MLP head {largest.hidden} wide" if largest.head == "mlp" else "a linear head"
        raise DinoprobeError(f"{what} on {dim}-wide features with {num_classes} classes needs about "
                             f"{need / 2**30:.1f} GiB while it trains (weights, gradients, optimiser state, a batch's "
                             f"activations) and {available / 2**30:.1f} GiB are available on {torch.device(device)}; "
                             "use a smaller --hidden or --batch-size")


def train_heads(configs: list[TrainConfig], train, y_train: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor, num_classes: int, max_memory: int | None = None, progress: bool = False,
                desc: str = "train", rows: list | None = None,
                class_weights: torch.Tensor | None = None, static_epochs: bool | None = None) -> list[TrainResult]:
    """Train every config, side by side where they share a stream and a shape; one TrainResult per config.

    `train` is an (N, D) tensor or any TrainSource (sources.py): augmented views, a streamed split.
    `y_train`/`y_val`: (rows,) class indices, or (rows, classes) 0/1 floats for multi-label heads.
    `class_weights` (C,) weights each training row's loss by its class, as F.cross_entropy(weight=...) does; for
    multi-label heads (2, C) weights each class's positive and negative targets (sigmoid_cross_entropy).
    `rows`, one index tensor per config, trains each head on its own rows of an in-memory `train` (few-shot
    tries): each head then sees exactly the batches it would see trained alone on train[rows].
    `max_memory` (bytes) bounds the heads trained at once (plan_groups); by default half of what the device has
    available, so a large grid trains group after group instead of exhausting memory (the results are the same:
    a head trains exactly as it would alone).
    `static_epochs`: run each epoch over fixed buffers, captured once as a CUDA graph and replayed (graphed.py),
    for in-memory features on CUDA; True elsewhere runs the same buffers without a graph (tests hold it to the usual
    path). None (default): graphed.GRAPHS_BY_DEFAULT on CUDA.
    """
    if not configs:
        raise DinoprobeError("no configurations to train")
    if len(x_val) == 0:
        raise DinoprobeError("the best epoch is chosen on validation data, and the validation set is empty")
    if rows is not None and (len(rows) != len(configs) or not isinstance(train, torch.Tensor)):
        raise DinoprobeError("training rows per head need one index tensor per config and in-memory features")
    source = train if rows is not None else as_train_source(train)
    dim = train.shape[-1]
    available = memory_available(y_train.device)
    check_heads_fit(configs, dim, num_classes, len(y_train), available, y_train.device)
    if max_memory is None and len(configs) > 1:  # a grid of thousands of heads must not take the machine down
        max_memory = available // 2 if available else None
    groups = plan_groups(configs, dim, num_classes, max_memory, rows)
    results: list[TrainResult | None] = [None] * len(configs)
    total = sum(configs[g[0]].epochs for g in groups)
    label = desc if len(configs) == 1 else f"{desc}: {len(configs)} heads in {len(groups)} group(s)"
    with progress_bar(total, label, "epoch", enabled=progress) as bar:
        for number, members in enumerate(groups):
            group_rows = None if rows is None else torch.stack([torch.as_tensor(rows[i]) for i in members])
            group_source = source if rows is None else PerHeadRows(train, group_rows)
            group_results = _train_group([configs[i] for i in members], group_source, y_train, x_val, y_val,
                                         num_classes, bar, class_weights, static_epochs)
            for i, res in zip(members, group_results):
                res.group, res.group_size = number, len(members)
                results[i] = res
    return results  # type: ignore[return-value]


def _train_group(configs: list[TrainConfig], source: TrainSource, y_train: torch.Tensor, x_val: torch.Tensor,
                 y_val: torch.Tensor, num_classes: int, bar,
                 class_weights: torch.Tensor | None = None, static_epochs: bool | None = None) -> list[TrainResult]:
    first, n = configs[0], len(configs)
    device = y_train.device
    normalizer = Normalizer.fit(first.normalize, source).to(device)  # statistics of the clean train features
    heads = StackedHeads(configs, source.shape[-1], num_classes, device)
    optimizer = HeadwiseOptimizer(heads, configs)
    n_train = len(source)
    steps_per_epoch = first.epoch_length or -(-n_train // first.batch_size)
    factors = lr_factors(first.epochs, first.warmup_epochs, steps_per_epoch)
    base_lrs = [c.lr for c in configs]
    multilabel = y_train.dim() == 2
    smoothing = [c.label_smoothing for c in configs]
    if multilabel and any(smoothing):
        raise DinoprobeError("label smoothing applies to single-label (softmax) heads; use label_smoothing=0 for "
                             "multi-label data")
    weights = None if class_weights is None else class_weights.to(device, torch.float32)
    # one smoothing shared by every head (1,), or one per head (N,); None when no head smooths
    smoothing = None if not any(smoothing) else torch.tensor(smoothing if len(set(smoothing)) > 1 else smoothing[:1],
                                                             dtype=torch.float32, device=device)
    x_val = normalizer(x_val)
    results = [TrainResult(c, heads.head_layers(i), normalizer) for i, c in enumerate(configs)]
    best = heads.theta.clone()
    stale, active = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)

    def train_batches(batches, step_numbers) -> EpochRecord:
        """One epoch's steps: every head forward and backward on each batch, one update. `step_numbers` are the
        optimizer's (HeadwiseOptimizer.scalars) per step. What the epoch's bookkeeping needs stays on the device."""
        record = EpochRecord.empty(steps_per_epoch, n, device, weighted=weights is not None and not multilabel)
        for step, ((features, rows), numbers) in enumerate(zip(batches, step_numbers)):
            # (B,) or (N, B) labels; multi-label (B, C) or (N, B, C)
            target = y_train.index_select(0, rows) if rows.dim() == 1 else y_train[rows]
            if multilabel:
                neg_loss, _ = heads.step(features, partial(sigmoid_cross_entropy, targets=target, weights=weights))
                record.sizes.append(target.shape[-2])
            else:
                denom = None if weights is None else weights[target].sum(-1).view(-1, 1, 1)  # (1 or N, 1, 1)
                neg_loss, logits = heads.step(features, partial(softmax_cross_entropy, target=target,
                                                                smoothing=smoothing, weights=weights, denom=denom))
                record.sizes.append(target.shape[-1])
                if denom is not None:
                    record.denoms[step] = denom.view(-1)
                record.hits += (logits.argmax(-1) == target.view(-1, target.shape[-1])).sum(-1)
            optimizer.apply(*numbers)
            record.neg_losses[step] = neg_loss
        return record

    use_static = static_epochs if static_epochs is not None else device.type == "cuda" and GRAPHS_BY_DEFAULT
    static = StaticEpochs(source, normalizer, first, steps_per_epoch, optimizer, factors, train_batches,
                          capture=device.type == "cuda", generator=heads.mask_generator if heads.dropout else None) \
        if use_static and isinstance(source, InMemory) else None  # on CUDA: an epoch is one graph replay
    batches = source.epochs(normalizer, first.batch_size, first.seed, first.epoch_length) if static is None else None
    start, step = time.perf_counter(), 0
    for epoch in range(1, first.epochs + 1):
        epoch_lrs = [lr * factors[step] for lr in base_lrs]
        record = static.run(step) if static is not None else train_batches(
            next(batches), (optimizer.scalars(factors[s]) for s in itertools.count(step)))
        step += record.steps
        # the epoch's bookkeeping in a few calls rather than a few per step
        step_losses = -record.neg_losses[:record.steps].cpu().double() / (  # (steps, N): each step's (weighted) mean
            record.denoms[:record.steps].cpu().double() if record.denoms is not None
            else torch.tensor(record.sizes, dtype=torch.float64)[:, None])
        if multilabel:  # macro mean average precision on val, every head at once
            val_acc = mean_average_precision(heads.scores(x_val), y_val).nan_to_num(0.0).tolist()
        else:
            train_acc = [h / sum(record.sizes) for h in record.hits.tolist()]
            correct = heads.predict(x_val) == y_val  # (N, rows)
            if weights is None:
                val_acc = [h / len(y_val) for h in correct.sum(1).tolist()]
            else:  # chosen by the same weights as the loss: with "balanced" weights, balanced accuracy
                val_weights = weights[y_val.clamp_min(0)] * (y_val >= 0)
                val_acc = ((correct.float() @ val_weights) / val_weights.sum()).tolist()
        # a head whose loss or weights left the finite numbers has diverged: it stops, and keeps its last finite best
        finite = torch.isfinite(step_losses).all(0) & (step_losses.mean(0) < DIVERGED_LOSS) & heads.finite()
        for i in torch.nonzero(active & ~finite).flatten().tolist():
            results[i].diverged_epoch = epoch
        active &= finite
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
                                **({"val_map": val_acc[i]} if multilabel else
                                   {"train_acc": train_acc[i], "val_acc": val_acc[i]})})
            if improved[i]:
                res.best_val_acc, res.best_epoch, stale[i] = val_acc[i], epoch, 0
            else:
                stale[i] += 1
                if configs[i].patience and stale[i] >= configs[i].patience:
                    active[i] = False
        if n == 1 and results[0].history:
            bar.set_postfix({"loss": f"{results[0].history[-1]['train_loss']:.4f}",
                             "val_map" if multilabel else "val_acc": f"{val_acc[0]:.4f}",
                             "best": f"{results[0].best_val_acc:.4f}"}, refresh=False)
        bar.update(1)
        if not active.any():
            bar.update(first.epochs - epoch)
            break
    seconds = time.perf_counter() - start
    for i, res in enumerate(results):
        res.best_layers, res.seconds = heads.head_layers(i, best), seconds
        res.cuda_graph = static is not None and static.graph is not None
        if configs[i].select == "last" and res.diverged_epoch is None and res.history:
            # the final iteration's head, scored on val as it is (DINOv3 reports these)
            res.best_layers, res.best_epoch = heads.head_layers(i), res.history[-1]["epoch"]
            res.best_val_acc = res.history[-1]["val_map" if multilabel else "val_acc"]
    return results
