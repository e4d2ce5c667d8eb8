"""`dinoprobe export`: backbone, feature selection, normalisation and head as one self-contained file."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dinoprobe.atomic import atomic_path
from dinoprobe.cache.specs import blocks_needed, parse_feature, select
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.backbone import Backbone, create_model, load_strict, token_features
from dinoprobe.extract.decode import load_rgb
from dinoprobe.extract.transforms import DataConfig, Preprocess, worker_transform
from dinoprobe.train.headfile import HeadFile
from dinoprobe.train.heads import HeadSpec, Normalizer, build_head

EXPORT_FORMAT = "dinoprobe-export/1"


class ExportedClassifier(nn.Module):
    """Backbone + feature selection + normalisation + head: normalised pixels (B,3,S,S) -> logits."""

    def __init__(self, backbone_model: nn.Module, num_prefix_tokens: int, feature: str, normalizer: Normalizer,
                 head: nn.Module, class_names: list[str], data_config: DataConfig):
        super().__init__()
        self.backbone, self.normalizer, self.head = backbone_model, normalizer, head
        self.num_prefix_tokens, self.feature = num_prefix_tokens, feature
        self.class_names, self.data_config = class_names, data_config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        parts = parse_feature(self.feature)
        feats = token_features(self.backbone, pixels, self.num_prefix_tokens, blocks_needed(parts))
        return self.head(self.normalizer(select(feats, parts)))

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image or a path -> the (3,S,S) normalised tensor forward() expects."""
        image = load_rgb(str(image)) if isinstance(image, (str, Path)) else image.convert("RGB")
        return Preprocess(self.data_config)(worker_transform(self.data_config)(image)[None])[0]


def check_export_target(out: str | Path, head_file: HeadFile, overwrite: bool = False) -> Path:
    """Refuse, before any work, a target that exists (unless overwrite), is a folder, or lies inside the run
    directory the head came from (its files belong to the run)."""
    out = Path(out)
    if out.is_dir():
        raise DinoprobeError(f"--out '{out}' is a folder; name a file, e.g. {out / 'model.pt'}")
    if out.exists() and not overwrite:
        raise DinoprobeError(f"'{out}' already exists; pass --overwrite to replace it, or choose another --out")
    if head_file.path is not None and out.resolve().parent == head_file.path.resolve().parent:
        raise DinoprobeError(f"--out '{out}' is inside the run directory {head_file.path.parent}, whose files belong "
                             "to the run; write the export somewhere else")
    return out


def export(head_file: HeadFile, backbone: Backbone, out: str | Path, overwrite: bool = False) -> Path:
    """Backbone + head as one weights_only-loadable file, written atomically: a crash leaves the previous file
    whole (or none), never a partial one."""
    out = check_export_target(out, head_file, overwrite)
    payload = {
        "format": EXPORT_FORMAT,
        "model_name": backbone.model_name,
        "backbone_state_dict": {k: v.cpu() for k, v in backbone.model.state_dict().items()},
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "data_config": backbone.data_config.to_dict(),
        "head": head_file.spec.to_dict(),
        "classifier_state_dict": head_file.raw["classifier_state_dict"],
        "normalization": head_file.raw["normalization"],
        "feature": head_file.feature,
        "class_names": head_file.class_names,
        "fingerprint": head_file.fingerprint,
    }
    with atomic_path(out) as tmp:
        torch.save(payload, tmp)
    return out


def load_exported(path: str | Path) -> ExportedClassifier:
    """Rebuild an exported classifier without unpickling code: `load_exported('model.pt')(pixels)` -> logits."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DinoprobeError(f"cannot read exported model '{path}': {type(err).__name__}") from None
    if not isinstance(raw, dict) or raw.get("format") != EXPORT_FORMAT:
        raise DinoprobeError(f"'{path}' is not a dinoprobe export ({EXPORT_FORMAT})")
    try:
        cfg = raw["data_config"]
        data_config = DataConfig(**{**cfg, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])})
        model = create_model(raw["model_name"], data_config.image_size)
        load_strict(model, raw["backbone_state_dict"], path)
        head = build_head(HeadSpec(**raw["head"]))
        head.load_state_dict(raw["classifier_state_dict"])
        parse_feature(raw["feature"])
        return ExportedClassifier(model, int(raw["num_prefix_tokens"]), raw["feature"],
                                  Normalizer.from_dict(raw["normalization"]), head, list(raw["class_names"]),
                                  data_config).eval().requires_grad_(False)
    except DinoprobeError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise DinoprobeError(f"'{path}' is a damaged dinoprobe export ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160]}); export it again from its run") from None

