"""Run an exported ONNX classifier with ONNX Runtime, numpy and PIL only: no torch, no timm, no dinoprobe run dir.

The preprocessing comes from the model's metadata (written by `dinoprobe export --format onnx`): resize the shorter
side to `resize_size` and centre-crop `image_size` (or, for the square transform, resize to image_size x
image_size), as PIL does for timm's transform; pixels as float32 RGB in [0, 1]; the graph normalises them.
For `--transform dinov3` and `square` caches dinoprobe resized uint8 tensors with torchvision, which PIL matches
to within an intensity level; for timm's transform (the default) the pixels are the same.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dinoprobe import documents
from dinoprobe.errors import DinoprobeError
from dinoprobe.imagefiles import SkippedInput, check_encoded_size, expand_inputs, load_rgb, to_rgb
from dinoprobe.runs.labelling import check_threshold, collected, labelled
from dinoprobe.settings import DEFAULT_MAX_PIXELS

ONNX_FORMAT = "dinoprobe-onnx/1"
RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS"}


def onnx_runtime():
    try:
        import onnxruntime
    except ImportError:
        raise DinoprobeError("running ONNX models needs the optional extra: pip install 'dinoprobe[onnx]' "
                             "(onnxruntime)") from None
    return onnxruntime


class OnnxClassifier:
    """An exported dinoprobe classifier: `predict(paths)` gives what `dinoprobe predict` gives, from the file alone."""

    def __init__(self, path: str | Path):
        ort = onnx_runtime()
        path = Path(path)
        if not path.is_file():
            raise DinoprobeError(f"ONNX model '{path}' does not exist; write one with `dinoprobe export --format onnx`")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:
            raise DinoprobeError(f"ONNX Runtime cannot load '{path}' ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:160]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("dinoprobe.format") != ONNX_FORMAT:
            raise DinoprobeError(f"'{path}' is not a dinoprobe ONNX export ({ONNX_FORMAT} metadata missing)")
        what, fix = f"'{path}'s dinoprobe metadata", "export it again"
        missing = [k for k in ("class_names", "transform", "feature") if k not in meta]
        if missing:
            raise DinoprobeError(f"{what} lacks {', '.join(missing)}; {fix}")
        self.feature = meta["feature"]
        # multi-label exports: sigmoid probabilities and each class's threshold
        self.class_names, self.transform, self.thresholds = (
            documents.parse(meta[field], f"{what}: {field}", fix) if field in meta else None
            for field in ("class_names", "transform", "thresholds"))
        for field, definition in (("class_names", "class_names"), ("transform", "transform"),
                                  ("thresholds", "thresholds")):
            if field != "thresholds" or self.thresholds is not None:
                documents.check(getattr(self, field), definition, what, fix, field)
        if self.thresholds is not None and len(self.thresholds) != len(self.class_names):
            raise DinoprobeError(f"{what} has {len(self.thresholds)} thresholds for {len(self.class_names)} classes; "
                                 f"{fix}")
        self.size = int(self.transform["image_size"])

    def preprocess(self, image) -> np.ndarray:
        """A path or PIL image -> (3, S, S) float32 RGB in [0, 1], as the metadata's transform says. A path is
        opened as `dinoprobe predict --run` opens it: the same size guards (SkippedInput names the reason), the
        same conversion of 16-bit, palette and CMYK images to RGB."""
        from PIL import Image

        cfg, size = self.transform, self.size
        if isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            check_encoded_size(os.path.getsize(image), DEFAULT_MAX_PIXELS)
            image = load_rgb(image, DEFAULT_MAX_PIXELS, resize_to=int(cfg["resize_size"]))
        resample = getattr(Image.Resampling, RESAMPLE.get(cfg.get("interpolation", "bicubic"), "BICUBIC"))
        if cfg.get("name") == "square":
            image = image.resize((size, size), resample)
        else:
            width, height = image.size  # torchvision's Resize(int) on PIL images, then CenterCrop
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = cfg["resize_size"], int(cfg["resize_size"] * long / short)
            new = (new_short, new_long) if width <= height else (new_long, new_short)
            image = image.resize(new, resample)
            left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, classes), features (N, D)) for pixels (N, 3, S, S) float32 in [0, 1]."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.size, self.size):
            raise DinoprobeError(f"pixels must be (N, 3, {self.size}, {self.size}) for this model, got "
                                 f"{tuple(pixels.shape)}; use preprocess() (or resize to {self.size} px)")
        probabilities, features = self.session.run(["probabilities", "features"], {"pixels": pixels})
        return probabilities, features

    def predict(self, paths, topk: int = 5, batch_size: int = 32, threshold: float | None = None):
        """([{path, labels, probabilities}], [(path, reason)]) in input order, as `dinoprobe predict`."""
        files, errors = expand_inputs(paths)
        return collected(self.iter_predictions(files, topk, batch_size, threshold), errors)

    def iter_predictions(self, files: list[str], topk: int = 5, batch_size: int = 32, threshold: float | None = None):
        """One entry per file in input order, a batch at a time: {path, labels, probabilities}, or {path, skipped:
        reason} for an input that could not be read."""
        threshold = check_threshold(threshold, self.thresholds is not None)  # refused before any image is read
        return self._entries(files, topk, batch_size, threshold)

    def _entries(self, files, topk, batch_size, threshold):
        for start in range(0, len(files), batch_size):
            batch, entries = [], []
            for file in files[start:start + batch_size]:
                try:
                    batch.append(self.preprocess(file))
                    entries.append(None)
                except SkippedInput as err:  # unreadable, truncated, not an image, past a size guard
                    entries.append({"path": file, "skipped": str(err)})
                except Exception as err:  # a file gone since it was listed: a reason, not a crash
                    entries.append({"path": file, "skipped": f"{type(err).__name__}: {str(err)[:160]}"})
            rows = iter(self.run(np.stack(batch))[0] if batch else ())
            for file, entry in zip(files[start:start + batch_size], entries):
                yield entry or labelled(file, next(rows), self.class_names, topk, self.thresholds, threshold)
