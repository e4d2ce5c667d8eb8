"""Label new images with a trained head: rebuild the exact backbone + transform from the head file, run top-k.
Also `export`: backbone + head as one self-contained, weights_only-loadable file."""
from __future__ import annotations

from pathlib import Path

import torch

from dinoprobe.cache.specs import blocks_needed, parse_feature, select, width
from dinoprobe.device import autocast, default_workers, resolve_device, resolve_precision
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.backbone import Backbone, build_backbone, check_forward_fits
from dinoprobe.extract.datasets import DecodingLoader, ImageFileDataset
from dinoprobe.extract.decode import TorchvisionDecode
from dinoprobe.extract.transforms import DataConfig, Preprocess
from dinoprobe.imagefiles import expand_inputs
from dinoprobe.progress import progress_bar
from dinoprobe.runs.labelling import check_threshold, collected, labelled
from dinoprobe.settings import DEFAULT_MAX_PIXELS
from dinoprobe.train.headfile import HeadFile


def backbone_for_head(head_file: HeadFile, weights: str | None = None, allow_weights_mismatch: bool = False,
                      log=print, processes: int = 1) -> Backbone:
    """The backbone the head was trained on: same model, same weights (checked by sha256), same transform."""
    fp = head_file.fingerprint
    if not fp:
        raise DinoprobeError("this head was saved from features without a dinoprobe cache, so it records no backbone "
                             "or transform; save it with `estimator.save(path, cache=load_cache(...))` to predict")
    if weights is None:
        source = fp["weights"]["source"]
        weights = source if source in ("hub", "random") else head_file.weights_location
        if source not in ("hub", "random") and not Path(weights).exists():
            raise DinoprobeError(f"the head was trained with weights from '{weights}', which is not here; "
                                 "pass --weights PATH to the same checkpoint")
    backbone = build_backbone(fp["model"], weights, fp["transform"]["image_size"], log=log, processes=processes)
    if backbone.weights.sha256 != fp["weights"]["sha256"] and not allow_weights_mismatch:
        raise DinoprobeError(f"weights '{weights}' (sha256 {backbone.weights.sha256[:12]}…) differ from those the head "
                             f"was trained on (sha256 {fp['weights']['sha256'][:12]}…); pass the same checkpoint, or "
                             "--allow-weights-mismatch to use them anyway")
    parts = parse_feature(head_file.feature)
    if width(parts, backbone.feature_dim) != head_file.spec.in_dim:
        raise DinoprobeError(f"the head expects {head_file.spec.in_dim}-wide '{head_file.feature}' features but "
                             f"{fp['model']} gives {width(parts, backbone.feature_dim)}")
    backbone.last_blocks = blocks_needed(parts)
    transform = dict(fp["transform"])
    backbone.data_config = DataConfig(**{**transform, "mean": tuple(transform["mean"]), "std": tuple(transform["std"])})
    return backbone


def prediction_dataset(head_file: HeadFile, files: list[str], config: DataConfig,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFileDataset:
    """New images decoded the way the head's training cache was (`features --decoder`)."""
    decoder = head_file.fingerprint.get("decoder") or {"name": "pil"}
    decode = TorchvisionDecode(config, max_pixels) if decoder["name"] == "torchvision" else None
    return ImageFileDataset([(f, -1) for f in files], config, max_pixels, decode=decode)


def predict(head_file: HeadFile, backbone: Backbone, paths, topk: int = 5, batch_size: int = 32,
            workers: int | None = None, device: str = "auto", precision: str = "auto",
            max_pixels: int = DEFAULT_MAX_PIXELS, threshold: float | None = None):
    """Returns ([{path, labels, probabilities}], [(path, reason)]) in input order. workers: as `features`. A
    multi-label head reports every class at or over its threshold (`threshold`: one for all), see labelling.py."""
    files, errors = expand_inputs(paths)
    return collected(iter_predictions(head_file, backbone, files, topk, batch_size, workers, device, precision,
                                      max_pixels, threshold), errors)


def iter_predictions(head_file: HeadFile, backbone: Backbone, files: list[str], topk: int = 5, batch_size: int = 32,
                     workers: int | None = None, device: str = "auto", precision: str = "auto",
                     max_pixels: int = DEFAULT_MAX_PIXELS, threshold: float | None = None, progress: bool = False):
    """One entry per file, in input order, as soon as it and every file before it are done: {path, labels,
    probabilities} (see `predict`), or {path, skipped: reason} for an input that could not be read. Only the
    batches in flight are held, so a folder of millions of images streams out (`dinoprobe predict`)."""
    threshold = check_threshold(threshold, head_file.multilabel)
    dev = resolve_device(device)
    check_forward_fits(backbone, batch_size, dev)
    workers = default_workers(dev) if workers is None else workers
    precision = resolve_precision(precision, dev)
    model, preprocess = backbone.to(dev), Preprocess(backbone.data_config).to(dev)
    head, normalizer = head_file.head.to(dev), head_file.normalizer.to(dev)
    dataset = prediction_dataset(head_file, files, backbone.data_config, max_pixels)
    loader = DecodingLoader(dataset, batch_size, workers, dataset.input_bytes)

    def entries():  # checked and built above, before the first entry is asked for; images are read as entries are
        done, following = {}, 0  # entries finished ahead of an earlier file, and the next file to hand out
        with loader.explaining_failures(), progress_bar(len(files), "predict", "img", enabled=progress) as bar:
            for pixels, _, idx, skipped, _ in loader:
                done.update({i: {"path": files[i], "skipped": reason} for i, reason in skipped})
                if pixels is not None:
                    with torch.inference_mode():  # only around the batch: the caller runs between entries
                        with autocast(dev, precision):
                            feats = model(preprocess(pixels.to(dev)))
                        logits = head(normalizer(select(feats, parse_feature(head_file.feature))))
                        probs = head_file.probabilities(logits).float().cpu().numpy()
                    for row, i in enumerate(idx.tolist()):
                        done[i] = labelled(files[i], probs[row], head_file.class_names, topk, head_file.thresholds,
                                           threshold)
                bar.update(len(idx) + len(skipped))
                while following in done:
                    yield done.pop(following)
                    following += 1
            for i in sorted(done):  # none, unless the loader skipped a file without naming it
                yield done.pop(i)

    return entries()
