"""Cache -> in-memory float32 tensors for head training: one read, then only index permutations."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dinoprobe import cache
from dinoprobe.errors import DinoprobeError

FEATURE_CHOICES = ("cls", "patch_mean", "cls+patch_mean")


@dataclass
class FeatureSplits:
    """Features (N, D) and labels (N,) per split, plus what a head file needs to remember about the cache."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    classes: list[str]
    feature: str
    manifest: dict = field(repr=False)
    train_views: torch.Tensor | None = None  # (N, K, D) augmented views of the train split, when loaded
    stream: object | None = None  # a StreamedTrainSplit when the train features exceed the memory budget

    @property
    def dim(self) -> int:
        return int(self.stream.dim if self.stream is not None else self.x["train"].shape[1])

    @property
    def n_train(self) -> int:
        return len(self.y["train"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device) -> "FeatureSplits":
        return FeatureSplits({k: v if v is None else v.to(device) for k, v in self.x.items()},
                             {k: v.to(device) for k, v in self.y.items()}, self.classes, self.feature, self.manifest,
                             None if self.train_views is None else self.train_views.to(device), self.stream)


def feature_parts(feature: str) -> tuple[str, ...]:
    if feature not in FEATURE_CHOICES:
        raise DinoprobeError(f"unknown --feature '{feature}'; choose one of {', '.join(FEATURE_CHOICES)}")
    return tuple(feature.split("+"))


def select_features(rows: dict[str, np.ndarray], feature: str) -> np.ndarray:
    return np.concatenate([rows[p].astype(np.float32) for p in feature_parts(feature)], axis=1)


def select_tensor(feats: dict[str, torch.Tensor], feature: str) -> torch.Tensor:
    """The same selection on a backbone's output: {'cls': (B,D), 'patch_mean': (B,D)} -> (B, D or 2D) float."""
    return torch.cat([feats[p].float() for p in feature_parts(feature)], dim=1)


def load_feature_splits(cache_dir, feature: str = "cls", device="cpu", require_val: bool = True,
                        views: bool = False, max_memory: int | None = None) -> FeatureSplits:
    """Read and validate a cache for training: a train split with >= 2 classes, a non-empty val split."""
    parts = feature_parts(feature)
    manifest = cache.open_manifest(cache_dir)
    stored = manifest.get("features", list(cache.FEATURE_KINDS))
    lacking = [p for p in parts if p not in stored]
    if lacking:
        raise DinoprobeError(f"cache {cache_dir} has no {lacking} features (it has {stored}); pick another --feature")
    train_rows = sum(s["rows"] for s in manifest["splits"].get("train", {}).get("shards", []))
    train_bytes = train_rows * manifest.get("feature_dim", 0) * len(parts) * 4
    streamed = bool(max_memory) and train_bytes > max_memory
    if streamed and views:
        raise DinoprobeError("--views needs the train views in memory; raise --max-memory or drop --views")
    x, y = {}, {}
    for split in manifest["splits"]:
        if split == "train" and streamed:  # labels only; features are read a buffer at a time while training
            rows = cache.load(cache_dir, split, (), manifest=manifest)
            x[split] = None
        else:
            rows = cache.load(cache_dir, split, parts, manifest=manifest)
            x[split] = torch.from_numpy(select_features(rows, feature))
        y[split] = torch.from_numpy(rows["label"].astype(np.int64))
    classes = manifest["classes"]
    if "train" not in y or len(y["train"]) == 0:
        raise DinoprobeError(f"cache {cache_dir} has an empty train split; nothing to train on")
    present = torch.unique(y["train"]).numel()
    if len(classes) < 2 or present < 2:
        raise DinoprobeError(f"cache {cache_dir} has {present} class(es) in train; a classifier needs at least 2")
    if require_val and ("val" not in x or len(x["val"]) == 0):
        raise DinoprobeError(f"cache {cache_dir} has an empty val split; the best epoch is chosen on val — rebuild "
                             "the cache with a val/ folder or --val-fraction")
    for split in [s for s in list(y) if len(y[s]) == 0]:
        del x[split], y[split]  # e.g. an empty test split: simply not evaluated
    train_views = None
    if views:
        rows = cache.load(cache_dir, "train", tuple(f"{p}_views" for p in parts), manifest=manifest)
        train_views = torch.from_numpy(np.concatenate([rows[f"{p}_views"].astype(np.float32) for p in parts], axis=2))
    stream = None
    if streamed:
        from dinoprobe.stream import StreamedTrainSplit

        stream = StreamedTrainSplit(cache_dir, manifest, feature, y["train"], max_memory, device)
    return FeatureSplits(x, y, classes, feature, manifest, train_views, stream).to(device)


def sample_views(train_views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One augmented view per image, uniformly at random: (N, K, D) -> (N, D) for one epoch."""
    n, k = train_views.shape[:2]
    choice = torch.randint(k, (n,), generator=generator).to(train_views.device)
    return train_views[torch.arange(n, device=train_views.device), choice]
