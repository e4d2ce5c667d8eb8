"""The original scripts' method, kept as a baseline: the frozen backbone runs over every image in every epoch.

Same head, optimiser, schedule, seed and batch order as `train.train_head`, so the two can be compared step by
step (the equivalence test) and timed against each other (`dinoprobe bench`). Its bugs are not reproduced:
the backbone stays in eval mode and the features are the CLS token.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from dinoprobe.backbone import Backbone
from dinoprobe.data import ImageFileDataset, Preprocess, collate
from dinoprobe.errors import DinoprobeError
from dinoprobe.heads import build_head
from dinoprobe.tensors import select_tensor
from dinoprobe.train import TrainConfig, TrainResult, batch_order, make_optimizer, make_scheduler


def _features(backbone: Backbone, preprocess: Preprocess, pixels: torch.Tensor, feature: str) -> torch.Tensor:
    with torch.no_grad():
        return select_tensor(backbone(preprocess(pixels)), feature)


def train_backbone_in_loop(backbone: Backbone, train: list[tuple[str, int]], val: list[tuple[str, int]],
                           num_classes: int, cfg: TrainConfig, workers: int = 0) -> tuple[nn.Module, TrainResult]:
    if cfg.normalize != "none":
        raise DinoprobeError("the original method has no feature normalisation; use normalize='none'")
    preprocess = Preprocess(backbone.data_config)
    train_set = ImageFileDataset(train, backbone.data_config)
    val_loader = torch.utils.data.DataLoader(ImageFileDataset(val, backbone.data_config), batch_size=cfg.batch_size,
                                             collate_fn=collate, num_workers=workers,
                                             generator=torch.Generator())  # never draw from the global RNG
    in_dim = backbone.feature_dim * len(cfg.feature.split("+"))
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head_spec(in_dim, num_classes), cfg.seed)
    optimizer = make_optimizer(head.parameters(), cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    scheduler = make_scheduler(optimizer, cfg, -(-len(train) // cfg.batch_size))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    result = TrainResult(best_state={}, best_epoch=0, best_val_acc=-1.0)
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        batches = [b.tolist() for b in batch_order(len(train), cfg.batch_size, generator)]
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=collate,
                                             num_workers=workers, generator=torch.Generator())
        head.train()
        backbone.eval()
        losses, correct, seen = [], 0, 0
        for pixels, labels, _, _, _ in loader:
            logits = head(_features(backbone, preprocess, pixels, cfg.feature))
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
        head.eval()
        hits = total = 0
        with torch.no_grad():
            for pixels, labels, _, _, _ in val_loader:
                hits += (head(_features(backbone, preprocess, pixels, cfg.feature)).argmax(1) == labels).sum().item()
                total += len(labels)
        val_acc = hits / max(total, 1)
        result.step_losses += losses
        result.history.append({"epoch": epoch, "lr": scheduler.get_last_lr()[0], "train_loss": sum(losses) / len(losses),
                               "train_acc": correct / max(seen, 1), "val_acc": val_acc})
        if val_acc > result.best_val_acc:
            result.best_val_acc, result.best_epoch = val_acc, epoch
            result.best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    result.seconds = time.perf_counter() - start
    head.load_state_dict(result.best_state)
    return head.eval(), result
