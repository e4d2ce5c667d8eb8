"""Train one head on in-memory features: index permutations over tensors, torch optimisers and schedulers,
best-on-val selection and early stopping. No Dataset/DataLoader and no backbone in the loop."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from dinoprobe.errors import DinoprobeError
from dinoprobe.heads import HEAD_KINDS, NORMALIZATIONS, HeadSpec, Normalizer, build_head
from dinoprobe.steps import AutogradStep, DirectUpdate, head_step
from dinoprobe.stream import iterate_batches
from dinoprobe.tensors import FEATURE_CHOICES, FeatureSplits, sample_views

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    head: str = "mlp"
    hidden: int = 256
    dropout: float = 0.1
    feature: str = "cls"
    normalize: str = "none"
    optimizer: str = "adam"
    lr: float = 1e-3  # the original script's Adam learning rate
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 256
    epochs: int = 100
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    patience: int | None = None  # epochs without a better val accuracy before stopping; None = never
    views: bool = False  # train on one cached augmented view per image per epoch

    def __post_init__(self):
        checks = [
            (self.head in HEAD_KINDS, f"head must be one of {HEAD_KINDS}, got {self.head!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.normalize in NORMALIZATIONS, f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}"),
            (self.feature in FEATURE_CHOICES, f"feature must be one of {FEATURE_CHOICES}, got {self.feature!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (0 <= self.warmup_epochs < self.epochs, f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.hidden >= 1, f"hidden must be >= 1, got {self.hidden}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise DinoprobeError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    def head_spec(self, in_dim: int, num_classes: int) -> HeadSpec:
        return HeadSpec(self.head, in_dim, num_classes, self.hidden, self.dropout)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch's optimisers with their fused kernels: on this class of CPU, 3x less time per step than foreach
    (it matters for heads this small, and for sweeps with one param group per head)."""
    if cfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.momentum}
    else:
        cls, kwargs = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam), {}
    params = list(params)
    try:
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or dtype without fused kernels
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step cosine decay, after an optional linear warm-up."""
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if not warmup:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's mini-batches: a permutation from the run's own generator, cut into batches (the same order
    `stream.iterate_batches` gives in memory; the original-method baseline uses it to match)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


@dataclass
class TrainResult:
    best_state: dict
    best_epoch: int
    best_val_acc: float
    history: list[dict] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        return len(self.history)


@torch.no_grad()
def predict_logits(head: nn.Module, normalizer: Normalizer, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    was_training = head.training
    head.eval()
    out = torch.cat([head(normalizer(part)) for part in x.split(chunk)]) if len(x) else torch.zeros(0)
    head.train(was_training)
    return out


def train_head(data: FeatureSplits, cfg: TrainConfig, progress: bool = True, desc: str = "probe",
               order_fn=None, fast_step: bool = True) -> tuple[nn.Module, Normalizer, TrainResult]:
    """Train, keep the head with the best val accuracy, and return it loaded with that state.

    Train features come from memory, or stream from disk when `data.stream` is set; `order_fn(n, generator)`
    replaces the epoch's random permutation (tests use it to follow a streamed run's order in memory).
    `fast_step=False` trains with autograd and `Optimizer.step()` for every head: the plain torch loop that
    tests and the benchmark hold the fast step (steps.py) to.
    """
    if cfg.feature != data.feature:
        raise DinoprobeError(f"config feature {cfg.feature!r} but data holds {data.feature!r}")
    device = data.y["train"].device
    x_train, y_train, x_val, y_val = data.x["train"], data.y["train"], data.x["val"], data.y["val"]
    n_train = data.n_train
    normalizer = Normalizer.fit(cfg.normalize, x_train, data.stream).to(device)
    torch.manual_seed(cfg.seed)  # head init (dropout has its own generator)
    head = build_head(cfg.head_spec(data.dim, data.num_classes), cfg.seed).to(device)
    optimizer = make_optimizer(head.parameters(), cfg)
    generator = torch.Generator().manual_seed(cfg.seed)  # batch order, independent of everything else
    steps_per_epoch = -(-n_train // cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    if fast_step:  # see steps.py
        step, update = head_step(head, cfg.label_smoothing), DirectUpdate(optimizer)
    else:
        step, update = AutogradStep(head, cfg.label_smoothing), optimizer.step
    result = TrainResult(best_state={}, best_epoch=0, best_val_acc=-1.0)
    start, stale = time.perf_counter(), 0
    view_generator = torch.Generator().manual_seed(cfg.seed + 1)  # its own stream: batch order is unchanged
    if cfg.views and data.train_views is None:
        raise DinoprobeError("views requested but the data holds no augmented views; load the cache with views")
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        head.train()
        if cfg.views:
            x_train = sample_views(data.train_views, view_generator)
        lr = optimizer.param_groups[0]["lr"]
        losses, correct = [], torch.zeros((), device=device)
        batches = (data.stream.iterate_batches(cfg.batch_size, generator) if data.stream is not None
                   else iterate_batches(x_train, y_train, cfg.batch_size, generator, order_fn))
        for features, target in batches:
            loss, logits = step(normalizer(features), target)
            update()
            scheduler.step()
            losses.append(loss)
            correct += (logits.argmax(1) == target).sum()
        epoch_losses = torch.stack(losses).cpu()
        result.step_losses += epoch_losses.tolist()
        val_acc = (predict_logits(head, normalizer, x_val).argmax(1) == y_val).sum().item() / len(y_val)
        row = {"epoch": epoch, "lr": lr, "train_loss": epoch_losses.mean().item(),
               "train_acc": correct.item() / n_train, "val_acc": val_acc}
        result.history.append(row)
        if val_acc > result.best_val_acc:
            result.best_val_acc, result.best_epoch, stale = val_acc, epoch, 0
            result.best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            stale += 1
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_acc=f"{val_acc:.4f}", best=f"{result.best_val_acc:.4f}")
        if cfg.patience and stale >= cfg.patience:
            break
    bar.close()
    result.seconds = time.perf_counter() - start
    head.load_state_dict(result.best_state)
    return head.eval(), normalizer, result
