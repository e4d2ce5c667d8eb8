"""The references the engine is held to (tests) and timed against (`dinoprobe bench`). Not a training path.

`plain_torch_training` is the loop practitioners write: an nn.Module head, a torch.optim optimiser and
schedulers, F.cross_entropy and loss.backward(). Fed tensors it is the plain PyTorch loop on cached features;
fed a backbone (`train_backbone_in_loop`) it is the original scripts' method, the frozen backbone run over every
image in every epoch. Both use the engine's head initialisation, batch order and dropout masks, so their
per-step losses can be compared with the engine's. The original scripts' bugs are not reproduced: the backbone
stays in eval mode and the features are the CLS token.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from dinoprobe.train.config import TrainConfig
from dinoprobe.train.heads import Normalizer, init_layers
from dinoprobe.train.loop import TrainResult


class SeededDropout(nn.Module):
    """F.dropout's inverted dropout (zero with probability p, keep x / (1 - p)) drawing its masks from its own
    generator, seeded as the engine seeds a head, so the reference and the engine drop the same units."""

    def __init__(self, p: float, seed: int = 0):
        super().__init__()
        self.p, self.seed, self.generator = float(p), int(seed), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.generator is None or self.generator.device != x.device:
            self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1 - self.p)


def reference_head(cfg: TrainConfig, dim: int, num_classes: int) -> nn.Sequential:
    """The practitioner's head: nn.Linear layers (started from the engine's initial weights), ReLU, dropout."""
    layers = init_layers(cfg.head, dim, num_classes, cfg.hidden, cfg.seed, cfg.init)
    linears = [nn.Linear(w.shape[1], w.shape[0]) for w, _ in layers]
    with torch.no_grad():
        for linear, (w, b) in zip(linears, layers):
            linear.weight.copy_(w)
            linear.bias.copy_(b)
    if cfg.head == "linear":
        return nn.Sequential(*linears)
    return nn.Sequential(linears[0], nn.ReLU(), SeededDropout(cfg.dropout, cfg.seed), linears[1])


def linear_layers(head: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight.detach().clone(), m.bias.detach().clone()) for m in head if isinstance(m, nn.Linear)]


def torch_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def torch_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step cosine decay after an optional linear warm-up, from torch's own schedulers."""
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if not warmup:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def plain_torch_training(cfg: TrainConfig, dim: int, num_classes: int, n_train: int, train_batches, val_batches,
                         device="cpu", class_weights=None) -> tuple[nn.Module, TrainResult]:
    """train_batches(generator) yields one epoch of (features, labels); val_batches() the validation set's.
    Labels (B, C) 0/1 floats are multi-label: F.binary_cross_entropy_with_logits (class_weights (2, C): each class's
    weight on positives and negatives, as weight=neg, pos_weight=pos/neg), chosen on scikit-learn's macro AP."""
    head = reference_head(cfg, dim, num_classes).to(device)
    optimizer = torch_optimizer(head.parameters(), cfg)
    scheduler = torch_scheduler(optimizer, cfg, -(-n_train // cfg.batch_size))
    generator = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult(cfg, [], Normalizer())
    start, stale = time.perf_counter(), 0
    for epoch in range(1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        head.train()
        losses, correct = [], 0
        for x, y in train_batches(generator):
            logits = head(x)
            if y.dim() == 2:
                weight, pos_weight = (None, None) if class_weights is None else (class_weights[1],
                                                                                 class_weights[0] / class_weights[1])
                loss = F.binary_cross_entropy_with_logits(logits, y, weight=weight, pos_weight=pos_weight)
            else:
                loss = F.cross_entropy(logits, y, weight=class_weights, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            correct += (logits.argmax(1) == y).sum().item() if y.dim() == 1 else 0
        head.eval()
        hits = total = 0
        multilabel = False
        with torch.no_grad():
            for x, y in val_batches():
                if y.dim() == 2:  # the mean of scikit-learn's per-class AP over classes with val positives
                    from sklearn.metrics import average_precision_score

                    multilabel, scores = True, head(x).cpu().numpy()
                    aps = [average_precision_score(y[:, c].cpu().numpy(), scores[:, c]) for c in range(y.shape[1])
                           if y[:, c].any()]
                    hits, total = sum(aps), len(aps)
                    continue
                right = (head(x).argmax(1) == y).float()
                w = torch.ones(len(y), device=y.device) if class_weights is None else class_weights[y]  # weighted
                hits += (right * w).sum().item()
                total += w.sum().item()
        val_acc = hits / max(total, 1)
        result.step_losses += losses
        result.history.append({"epoch": epoch, "lr": lr, "train_loss": sum(losses) / len(losses),
                               **({"val_map": val_acc} if multilabel else
                                  {"train_acc": correct / n_train, "val_acc": val_acc})})
        if val_acc > result.best_val_acc:
            result.best_val_acc, result.best_epoch, stale = val_acc, epoch, 0
            result.best_layers = linear_layers(head)
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
    result.seconds = time.perf_counter() - start
    if cfg.select == "last":  # the final iteration's head, as DINOv3's linear evaluation reports
        result.best_layers, result.best_epoch = linear_layers(head), result.history[-1]["epoch"]
        result.best_val_acc = val_acc
    with torch.no_grad():
        for m, (w, b) in zip([m for m in head if isinstance(m, nn.Linear)], result.best_layers):
            m.weight.copy_(w)
            m.bias.copy_(b)
    return head.eval(), result


def train_on_tensors(cfg: TrainConfig, x_train, y_train, x_val, y_val, num_classes: int, order_fn=None,
                     class_weights=None):
    """The plain PyTorch loop on cached features: a random permutation per epoch, cut into batches; or, with
    cfg.epoch_length, DINOv3's loader: an infinite sampler (one permutation after another) batched with drop_last,
    `epoch_length` batches an epoch."""
    stream = None
    if cfg.epoch_length:
        def infinite(generator):
            while True:
                yield from torch.randperm(len(x_train), generator=generator).tolist()

    def train_batches(generator):
        nonlocal stream
        if cfg.epoch_length:
            stream = stream or infinite(generator)
            for _ in range(cfg.epoch_length):
                idx = torch.tensor([next(stream) for _ in range(cfg.batch_size)])
                yield x_train[idx], y_train[idx]
            return
        order = order_fn(len(x_train), generator) if order_fn else torch.randperm(len(x_train), generator=generator)
        for idx in order.split(cfg.batch_size):
            yield x_train[idx], y_train[idx]

    steps = cfg.epoch_length * cfg.batch_size if cfg.epoch_length else len(x_train)
    return plain_torch_training(cfg, x_train.shape[1], num_classes, steps, train_batches,
                                lambda: [(x_val, y_val)], x_train.device, class_weights)


def train_backbone_in_loop(backbone, train: list[tuple[str, int]], val: list[tuple[str, int]], num_classes: int,
                           cfg: TrainConfig, feature: str = "cls", workers: int = 0):
    """The original method: every batch's images decoded and run through the frozen backbone, every epoch."""
    from dinoprobe.cache.specs import parse_feature, select, width
    from dinoprobe.extract.datasets import ImageFileDataset, collate
    from dinoprobe.extract.transforms import Preprocess

    preprocess = Preprocess(backbone.data_config)
    train_set = ImageFileDataset(train, backbone.data_config)
    val_set = ImageFileDataset(val, backbone.data_config)

    @torch.no_grad()
    def features(pixels):
        return select(backbone(preprocess(pixels)), parse_feature(feature))

    def batches(dataset, batch_sampler):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                                             num_workers=workers, generator=torch.Generator())
        backbone.eval()
        for pixels, labels, _, _, _ in loader:
            yield features(pixels), labels

    def train_batches(generator):
        order = torch.randperm(len(train), generator=generator)
        yield from batches(train_set, [b.tolist() for b in order.split(cfg.batch_size)])

    def val_batches():
        return batches(val_set, [list(range(i, min(i + cfg.batch_size, len(val))))
                                 for i in range(0, len(val), cfg.batch_size)])

    dim = width(parse_feature(feature), backbone.feature_dim)
    return plain_torch_training(cfg, dim, num_classes, len(train), train_batches, val_batches)
