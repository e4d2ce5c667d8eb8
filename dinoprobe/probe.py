"""`dinoprobe probe`: cache -> tensors -> one trained head -> a run directory."""
from __future__ import annotations

from pathlib import Path

from dinoprobe.device import resolve_device
from dinoprobe.runs import write_run
from dinoprobe.tensors import load_feature_splits
from dinoprobe.train import TrainConfig, train_head


def run_probe(cache_dir, out, cfg: TrainConfig, device: str = "auto", progress: bool = True,
              max_memory: int | None = None) -> dict:
    data = load_feature_splits(cache_dir, cfg.feature, resolve_device(device), views=cfg.views, max_memory=max_memory)
    head, normalizer, result = train_head(data, cfg, progress=progress)
    spec = cfg.head_spec(data.dim, data.num_classes)
    return write_run(Path(out), head, spec, normalizer, data, result, cfg.to_dict(), {"cache": str(cache_dir)})
