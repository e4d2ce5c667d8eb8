"""A grid of heads trained side by side, the way DINOv3's AllClassifiers trains its linear heads.

Configurations that share the data stream (feature, normalisation, batch size, epochs, warm-up, seed -> the
same mini-batches) and the head shape form one batched model: every mini-batch goes through all of their heads
in one matmul (first layers concatenated, second layers `bmm`). Each head keeps its own parameters, optimiser
state, learning rate, weight decay, dropout generator, best-on-val epoch and early stop, so it trains
exactly as it would alone in `probe`: the update rules are torch's (see HeadwiseOptimizer), and a test holds
every head to a separate `probe` run.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dinoprobe.errors import DinoprobeError
from dinoprobe.heads import Normalizer, build_head
from dinoprobe.steps import smoothed_eye, soft_cross_entropy, soft_targets, softmax_cross_entropy
from dinoprobe.stream import iterate_batches
from dinoprobe.tensors import sample_views
from dinoprobe.train import TrainConfig, TrainResult, make_scheduler

GRID_FIELDS = ("head", "lr", "weight_decay", "hidden", "dropout", "optimizer", "label_smoothing", "feature",
               "normalize", "epochs", "batch_size", "seed")
# DINOv3's linear evaluation: 13 learning rates, SGD with momentum 0.9, cosine schedule, lr scaled by batch/256
DINOV3_LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def expand_grid(grid: dict[str, list], base: TrainConfig | None = None) -> list[TrainConfig]:
    """The product of the option lists, in order; a linear head ignores hidden/dropout, so duplicates collapse."""
    base = base or TrainConfig()
    unknown = set(grid) - set(GRID_FIELDS)
    if unknown:
        raise DinoprobeError(f"unknown grid options {sorted(unknown)}; grid options are {', '.join(GRID_FIELDS)}")
    keys = list(grid)
    configs, seen = [], set()
    for values in itertools.product(*(grid[k] for k in keys)):
        cfg = replace(base, **dict(zip(keys, values)))
        if cfg.head == "linear":
            cfg = replace(cfg, hidden=base.hidden, dropout=base.dropout)
        if cfg not in seen:
            seen.add(cfg)
            configs.append(cfg)
    return configs


def dinov3_linear_grid(batch_size: int) -> dict[str, list]:
    return {"head": ["linear"], "optimizer": ["sgd"], "lr": [lr * batch_size / 256 for lr in DINOV3_LINEAR_LRS]}


def stream_key(cfg: TrainConfig) -> tuple:
    """Configs with the same key see the same features in the same mini-batch order."""
    return (cfg.feature, cfg.normalize, cfg.batch_size, cfg.epochs, cfg.warmup_epochs, cfg.seed, cfg.views)


def shape_key(cfg: TrainConfig) -> tuple:
    """Heads stacked into one tensor per layer need one shape and one optimiser rule."""
    return (cfg.head, cfg.hidden if cfg.head == "mlp" else 0, cfg.optimizer)


def head_bytes(cfg: TrainConfig, dim: int, num_classes: int, n_val: int) -> int:
    """Rough float32 footprint of one head in a batched group: weights, grads, two optimiser states, activations."""
    width = cfg.hidden if cfg.head == "mlp" else 0
    params = (dim * width + width + width * num_classes + num_classes) if width else dim * num_classes + num_classes
    activations = cfg.batch_size * (width * 3 + num_classes * 3) + n_val * (width + num_classes)
    return 4 * (4 * params + activations)


def plan_groups(configs: list[TrainConfig], dim: int, num_classes: int, n_val: int,
                max_memory: int | None) -> list[list[int]]:
    """Indices of configs trained together: same stream and shape, split to fit the memory budget."""
    buckets: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        buckets.setdefault((stream_key(cfg), shape_key(cfg)), []).append(i)
    groups = []
    for members in buckets.values():
        chunk, used = [], 0
        for i in members:
            need = head_bytes(configs[i], dim, num_classes, n_val)
            if chunk and max_memory and used + need > max_memory:
                groups.append(chunk)
                chunk, used = [], 0
            chunk.append(i)
            used += need
        groups.append(chunk)
    return groups


@dataclass
class SweepOutcome:
    config: TrainConfig
    result: TrainResult
    group: int
    group_size: int
    group_seconds: float
    normalizer: Normalizer = field(repr=False)


class BatchedHeads(torch.nn.Module):
    """N heads of one shape as stacked parameters (one tensor per layer); forward gives logits (N, B, C)."""

    def __init__(self, configs: list[TrainConfig], dim: int, num_classes: int, device):
        super().__init__()
        self.kind = configs[0].head
        heads = []
        for cfg in configs:  # exactly probe's initialisation for each seed
            torch.manual_seed(cfg.seed)
            heads.append(build_head(cfg.head_spec(dim, num_classes), cfg.seed))
        layers = (0,) if self.kind == "linear" else (0, 3)
        self.names = [f"{i}.{w}" for i in layers for w in ("weight", "bias")]  # build_head's state-dict keys
        self.stacked = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([h.state_dict()[n] for h in heads]).to(device)) for n in self.names])
        self.dropouts = [h[2] for h in heads] if self.kind == "mlp" else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1 = self.stacked[0], self.stacked[1]
        n, out = w1.shape[:2]
        # one GEMM for every head's first layer: (B, D) @ (D, N*out)
        h = torch.addmm(b1.reshape(-1), x, w1.reshape(n * out, -1).t()).view(x.shape[0], n, out).transpose(0, 1)
        if self.kind == "linear":
            return h
        h = h.relu()
        if self.training and any(d.p > 0 for d in self.dropouts):
            h = h * torch.stack([d.mask(h.shape[1:], h.device) if d.p > 0 else torch.ones(h.shape[1:], device=h.device)
                                 for d in self.dropouts])
        w2, b2 = self.stacked[2], self.stacked[3]
        return torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))

    @torch.no_grad()
    def linear_step(self, x: torch.Tensor, soft_target: torch.Tensor):
        """Linear heads only, soft targets (B, N or 1, C): each head's loss (N,), logits (B, N, C), and the
        gradients in closed form (no
        autograd, see steps.py). Both GEMMs cover every head at once, in the batch-first layout the forward GEMM
        produces, so nothing is transposed or copied in between."""
        w, b = self.stacked[0], self.stacked[1]
        n, classes = w.shape[:2]
        logits = torch.addmm(b.reshape(-1), x, w.reshape(n * classes, -1).t()).view(x.shape[0], n, classes)
        loss, grad = softmax_cross_entropy(logits, soft_target)
        w.grad = (grad.view(x.shape[0], -1).t() @ x).view_as(w)
        b.grad = grad.sum(0)
        return loss, logits

    def head_state(self, i: int) -> dict[str, torch.Tensor]:
        return {name: p[i].detach().clone() for name, p in zip(self.names, self.stacked)}


class HeadwiseOptimizer:
    """torch's SGD / Adam / AdamW update rules on stacked parameters, with one learning rate, weight decay and
    momentum per head (torch optimisers take one lr per param group, and 32 groups cost more than the model).
    The per-step lr factor comes from torch's own scheduler; tests hold the result to separate torch runs."""

    def __init__(self, params, configs: list[TrainConfig], steps_per_epoch: int):
        self.params, self.kind = list(params), configs[0].optimizer
        device = self.params[0].device
        self.lr = torch.tensor([c.lr for c in configs], device=device)
        self.wd = torch.tensor([c.weight_decay for c in configs], device=device)
        self.momentum = torch.tensor([c.momentum for c in configs], device=device)
        self.state = [{} for _ in self.params]
        self.steps = 0
        self._unit = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # carries the schedule
        self.scheduler = make_scheduler(self._unit, configs[0], steps_per_epoch)

    def factor(self) -> float:
        return self._unit.param_groups[0]["lr"]

    def head_lrs(self) -> list[float]:
        return (self.lr * self.factor()).tolist()

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for p, state in zip(self.params, self.state):
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd, mom = (t.view(shape) for t in (self.lr * self.factor(), self.wd, self.momentum))
            g = p.grad
            if self.kind == "sgd":
                g = g + wd * p
                buf = state.get("buf")
                state["buf"] = g.clone() if buf is None else buf.mul_(mom).add_(g)
                p.sub_(lr * state["buf"])
                continue
            if self.kind == "adamw":
                p.mul_(1 - lr * wd)
            else:
                g = g + wd * p
            m = state.setdefault("m", torch.zeros_like(p)).mul_(0.9).add_(g, alpha=0.1)
            v = state.setdefault("v", torch.zeros_like(p)).mul_(0.999).addcmul_(g, g, value=0.001)
            bias1, bias2 = 1 - 0.9 ** self.steps, 1 - 0.999 ** self.steps
            p.sub_((lr / bias1) * m / (v.sqrt() / bias2 ** 0.5 + 1e-8))
        self._unit.step()  # no gradients: a no-op that keeps torch's scheduler bookkeeping in order
        self.scheduler.step()


def train_group(configs: list[TrainConfig], x_train, y_train, x_val, y_val, num_classes: int,
                bar: tqdm | None = None, train_views=None, stream=None) -> tuple[list[TrainResult], Normalizer]:
    """Train heads sharing a stream, a shape and an optimiser kind side by side (see the module docstring)."""
    base = configs[0]
    if len({stream_key(c) for c in configs}) > 1 or len({shape_key(c) for c in configs}) > 1:
        raise ValueError("train_group needs configs with one stream and one shape/optimiser; use plan_groups")
    device = y_train.device
    normalizer = Normalizer.fit(base.normalize, x_train, stream).to(device)  # clean train statistics, as in probe
    model = BatchedHeads(configs, stream.dim if stream is not None else x_train.shape[1], num_classes, device)
    n_train = len(y_train)
    steps = -(-n_train // base.batch_size)
    optimizer = HeadwiseOptimizer(model.parameters(), configs, steps)
    generator = torch.Generator().manual_seed(base.seed)  # the same batch order each head would see alone
    smoothing = [c.label_smoothing for c in configs]
    # soft targets per head, or one (C, C) table shared by all when their smoothing agrees (most grids)
    eye = smoothed_eye(num_classes, smoothing if len(set(smoothing)) > 1 else smoothing[0], device)
    n = len(configs)
    results = [TrainResult(best_state={}, best_epoch=0, best_val_acc=-1.0) for _ in configs]
    stale, active = [0] * n, [True] * n
    start = time.perf_counter()
    view_generator = torch.Generator().manual_seed(base.seed + 1)  # as in train_head
    for epoch in range(1, base.epochs + 1):
        model.train()
        if base.views:
            x_train = sample_views(train_views, view_generator)
        lrs = optimizer.head_lrs()
        losses, correct = [], torch.zeros(n, device=device)
        batches = (stream.iterate_batches(base.batch_size, generator) if stream is not None
                   else iterate_batches(x_train, y_train, base.batch_size, generator))
        for features, target in batches:
            soft = soft_targets(eye, target)
            soft = soft if soft.dim() == 3 else soft[:, None]  # batch-first (B, N or 1, C)
            if model.kind == "linear":
                loss, logits = model.linear_step(normalizer(features), soft)
                hits = (logits.argmax(-1) == target[:, None]).sum(0)  # batch-first logits (B, N, C)
            else:
                logits = model(normalizer(features))  # (N, B, C)
                loss = soft_cross_entropy(F.log_softmax(logits, dim=-1), soft.transpose(0, 1), batch_dim=1)
                model.zero_grad(set_to_none=True)
                loss.sum().backward()  # heads are independent: each gets the gradient of its own loss
                loss, hits = loss.detach(), (logits.detach().argmax(-1) == target).sum(1)
            optimizer.step()
            losses.append(loss)
            correct += hits
        epoch_losses = torch.stack(losses).cpu()  # (steps, N)
        model.eval()
        with torch.no_grad():
            val_pred = torch.cat([model(normalizer(part)) for part in x_val.split(65536)], dim=1).argmax(-1)
        val_hits = (val_pred == y_val).sum(1).tolist()
        correct_list = correct.tolist()
        for i in range(n):
            if not active[i]:  # an early-stopped head: its later updates are never recorded or returned
                continue
            val_acc = val_hits[i] / len(y_val)
            res = results[i]
            res.step_losses += epoch_losses[:, i].tolist()
            res.history.append({"epoch": epoch, "lr": lrs[i], "train_loss": epoch_losses[:, i].mean().item(),
                                "train_acc": correct_list[i] / n_train, "val_acc": val_acc})
            if val_acc > res.best_val_acc:
                res.best_val_acc, res.best_epoch, stale[i] = val_acc, epoch, 0
                res.best_state = model.head_state(i)
            else:
                stale[i] += 1
            if configs[i].patience and stale[i] >= configs[i].patience:
                active[i] = False
        if bar is not None:
            bar.update(1)
        if not any(active):
            if bar is not None:
                bar.update(base.epochs - epoch)
            break
    seconds = time.perf_counter() - start
    for res in results:
        res.seconds = seconds
    return results, normalizer


def run_sweep(configs: list[TrainConfig], data_by_feature, max_memory: int | None = None,
              progress: bool = True) -> list[SweepOutcome]:
    """Train every config (grouped, batched); `data_by_feature(feature)` returns the FeatureSplits to use."""
    outcomes: list[SweepOutcome | None] = [None] * len(configs)
    by_feature: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        by_feature.setdefault(cfg.feature, []).append(i)
    plans = []
    for feature, members in by_feature.items():
        data = data_by_feature(feature)
        sub = [configs[i] for i in members]
        for group in plan_groups(sub, data.dim, data.num_classes, len(data.y["val"]), max_memory):
            plans.append((data, [members[j] for j in group]))
    total = sum(configs[g[0]].epochs for _, g in plans)
    bar = tqdm(total=total, desc=f"sweep {len(configs)} configs in {len(plans)} group(s)", unit="epoch",
               disable=not progress, dynamic_ncols=True)
    for number, (data, group) in enumerate(plans):
        group_cfgs = [configs[i] for i in group]
        results, normalizer = train_group(group_cfgs, data.x["train"], data.y["train"], data.x["val"],
                                          data.y["val"], data.num_classes, bar, data.train_views, data.stream)
        for i, res in zip(group, results):
            outcomes[i] = SweepOutcome(configs[i], res, number, len(group), res.seconds, normalizer)
    bar.close()
    return outcomes  # type: ignore[return-value]


def results_table(outcomes: list[SweepOutcome]) -> list[dict]:
    rows = []
    for o in outcomes:
        row = {k: getattr(o.config, k) for k in (*GRID_FIELDS, "momentum", "warmup_epochs", "patience", "views")}
        row.update({"best_epoch": o.result.best_epoch, "epochs_run": o.result.epochs_run,
                    "val_top1": o.result.best_val_acc, "group": o.group, "group_size": o.group_size,
                    "group_seconds": round(o.group_seconds, 3)})
        rows.append(row)
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["val_top1"], i))  # ties: earlier in the grid wins
    return [rows[i] for i in order]


def write_results(out: Path, rows: list[dict]) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying = [k for k in GRID_FIELDS if k != "lr" and len({r[k] for r in rows}) > 1]
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault(tuple(r[k] for k in varying), []).append((r["lr"], r["val_top1"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, points in sorted(lines.items(), key=lambda kv: str(kv[0])):
        points.sort()
        label = ", ".join(f"{k}={v}" for k, v in zip(varying, key)) or "all"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best val top-1")
    ax.set_title(f"sweep: {len(rows)} configurations")
    if len(lines) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
