"""Head files: a trained head plus everything needed to rebuild its backbone, transform and normalisation.

Saved with torch.save and read with `weights_only=True` (no pickled code). The classifier's state dict keeps the
original script's nn.Sequential keys (`0.weight`[, `3.weight`]) and its `num_classes`, `feature_dim` and
`training_config`, so scripts written for the original checkpoint read it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dinoprobe import __version__, documents
from dinoprobe.atomic import atomic_file
from dinoprobe.errors import DinoprobeError
from dinoprobe.paths import resolved
from dinoprobe.torchfiles import check_torch_file
from dinoprobe.train.heads import HeadSpec, Normalizer, build_head, check_head_weights

HEAD_FORMAT = "dinoprobe-head/1"


@dataclass
class HeadFile:
    """A trained head plus everything needed to rebuild its backbone, transform and normalisation."""

    head: nn.Module
    spec: HeadSpec
    normalizer: Normalizer
    class_names: list[str]
    feature: str
    fingerprint: dict
    weights_location: str
    raw: dict
    path: Path | None = None  # the file it was read from
    thresholds: list[float] | None = None  # multi-label heads: each class's decision threshold on its probability

    @property
    def run_dir(self) -> Path | None:
        """The run directory the head file belongs to: its folder, or the sweep whose best/ that folder is."""
        if self.path is None:
            return None
        folder = self.path.parent
        return folder.parent if folder.name == "best" and _command_of(folder.parent) == "sweep" else folder

    def holds(self, out: str | Path) -> bool:
        """Whether `out` is or lies inside the head's run directory, whose files belong to the run."""
        run_dir, out = self.run_dir, resolved(out)
        return run_dir is not None and (out == resolved(run_dir) or resolved(run_dir) in out.parents)

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes, or each class's sigmoid for a multi-label head."""
        return logits.float().sigmoid() if self.multilabel else logits.float().softmax(-1)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.normalizer(features))


def head_payload(head: nn.Module, spec: HeadSpec, normalizer: Normalizer, class_names: list[str], cache=None,
                 train_config: dict | None = None, thresholds=None) -> dict:
    """The head file's content. `cache` (a FeatureSplits from load_cache) supplies the backbone fingerprint and
    feature that predict and export rebuild; without it the head serves Python use only. `thresholds` (one per
    class) make it a multi-label head: sigmoid probabilities, every class over its threshold predicted."""
    fingerprint = cache.manifest["fingerprint"] if cache is not None else {}
    return {
        "format": HEAD_FORMAT,
        # the original script's keys, with the real class count
        "classifier_state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "num_classes": spec.num_classes,
        "feature_dim": spec.in_dim,
        "training_config": {"model_name": fingerprint.get("model"),
                            "input_size": fingerprint.get("transform", {}).get("image_size"), **(train_config or {})},
        # what predict/export need to rebuild exactly the same pipeline
        "class_names": list(class_names),
        "head": spec.to_dict(),
        "feature": cache.feature if cache is not None else "",
        "normalization": normalizer.to_dict(),
        "fingerprint": fingerprint,
        "weights_location": cache.manifest.get("weights_location", "") if cache is not None else "",
        "dinoprobe_version": __version__,
        "task": "multilabel" if thresholds is not None else "single",
        **({"thresholds": [float(t) for t in thresholds]} if thresholds is not None else {}),
    }


def save_head(path, head, spec, normalizer, class_names, cache=None, train_config=None, thresholds=None) -> Path:
    """Write a head file atomically (dinoprobe.atomic)."""
    path = Path(path)
    payload = head_payload(head, spec, normalizer, class_names, cache, train_config, thresholds)
    if not all(torch.isfinite(v).all() for v in payload["classifier_state_dict"].values()):
        raise DinoprobeError("the head's weights are not all finite (training diverged); not saved — lower the "
                             "learning rate and train again")
    with atomic_file(path) as fh:
        torch.save(payload, fh)
    return path


def load_head_file(path: str | Path) -> HeadFile:
    path = Path(path)
    if path.is_dir():  # a run directory; a sweep's holds its best head in best/
        path = path / ("best/head.pt" if _command_of(path) == "sweep" else "head.pt")
    if not path.is_file():
        if _command_of(path.parent) == "knn":
            raise DinoprobeError(f"'{path.parent}' is a k-NN run, which has no head file: k-NN predicts from the "
                                 "cached training features themselves; predict with a probe, sweep or logreg run")
        raise DinoprobeError(f"head file '{path}' does not exist; train one with `dinoprobe probe --out RUN_DIR`")
    check_torch_file(path, "head file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DinoprobeError(f"cannot read head file '{path}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                             "only dinoprobe head files are accepted (loaded with weights_only=True)") from None
    if not isinstance(raw, dict) or raw.get("format") != HEAD_FORMAT:
        raise DinoprobeError(f"'{path}' is not a dinoprobe head file (format {HEAD_FORMAT})")
    try:
        spec = HeadSpec(**raw["head"])
        state = raw["classifier_state_dict"]
        normalizer = Normalizer.from_dict(raw["normalization"])
        names, feature, fingerprint = list(raw["class_names"]), str(raw["feature"]), dict(raw["fingerprint"])
        for field, definition in (("fingerprint", "fingerprint"), ("class_names", "class_names")):
            if raw[field] or field != "fingerprint":  # an estimator fitted on arrays records no fingerprint
                documents.check(raw[field], definition, f"head file '{path}'", "train it again or use another --run",
                                field)
        if spec.num_classes != raw["num_classes"] or len(names) != spec.num_classes:
            raise DinoprobeError(f"'{path}' is inconsistent: {spec.num_classes} classes in the head spec, "
                                 f"{raw['num_classes']} in num_classes, {len(names)} class names")
        check_head_weights(spec, state, path)
        head = build_head(spec)
        if not all(torch.isfinite(v).all() for v in state.values()):
            raise DinoprobeError(f"'{path}' holds non-finite weights (NaN or infinity); its predictions would be "
                                 "meaningless — train the head again")
        head.load_state_dict(state)
        thresholds = raw.get("thresholds") if raw.get("task", "single") == "multilabel" else None
        if raw.get("task", "single") == "multilabel":
            thresholds = [float(t) for t in thresholds]
            if len(thresholds) != spec.num_classes or not all(0 <= t <= 1 for t in thresholds):
                raise DinoprobeError(f"'{path}': a multi-label head needs one threshold in [0, 1] per class "
                                     f"({spec.num_classes}), got {len(thresholds)}")
    except DinoprobeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise DinoprobeError(f"'{path}' is a damaged head file ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160] if str(err) else 'a field is missing'}); train it "
                             "again or use another --run") from None
    return HeadFile(head.eval(), spec, normalizer, names, feature, fingerprint, raw.get("weights_location", ""), raw,
                    path, thresholds)


def _command_of(run_dir: Path) -> str | None:
    """The command recorded in a run directory's run.json, for messages; None when there is none."""
    info = documents.run_info(run_dir)
    return info.get("command") if info else None
