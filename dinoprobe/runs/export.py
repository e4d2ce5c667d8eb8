"""`dinoprobe export`: backbone, feature selection, normalisation and head as one self-contained file."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from dinoprobe import documents
from dinoprobe.atomic import atomic_file, atomic_path, leftovers
from dinoprobe.cache.specs import blocks_needed, parse_feature, select
from dinoprobe.device import environment
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.backbone import (
    Backbone,
    check_fits,
    check_host_holds,
    create_model,
    load_strict,
    meta_model,
    token_features,
    weights_bytes,
)
from dinoprobe.extract.transforms import DataConfig, Preprocess, worker_transform
from dinoprobe.imagefiles import load_rgb
from dinoprobe.torchfiles import check_torch_file
from dinoprobe.train.headfile import HeadFile
from dinoprobe.train.heads import HeadSpec, Normalizer, build_head, check_head_weights

EXPORT_FORMAT = "dinoprobe-export/1"


class ExportedClassifier(nn.Module):
    """Backbone + feature selection + normalisation + head: normalised pixels (B,3,S,S) -> logits."""

    def __init__(self, backbone_model: nn.Module, num_prefix_tokens: int, feature: str, normalizer: Normalizer,
                 head: nn.Module, class_names: list[str], data_config: DataConfig, thresholds=None):
        super().__init__()
        self.backbone, self.normalizer, self.head = backbone_model, normalizer, head
        self.num_prefix_tokens, self.feature = num_prefix_tokens, feature
        self.class_names, self.data_config = class_names, data_config
        self.thresholds = thresholds  # multi-label: sigmoid per class, each class's threshold

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The head's input features (before its normalisation) of normalised pixels."""
        parts = parse_feature(self.feature)
        return select(token_features(self.backbone, pixels, self.num_prefix_tokens, blocks_needed(parts)), parts)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.normalizer(self.features(pixels)))

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
    if head_file.holds(out):
        raise DinoprobeError(f"--out '{out}' is inside the run directory {head_file.run_dir}, whose files belong "
                             "to the run; write the export somewhere else")
    for stale in leftovers(out):  # the temporary file of an export to `out` that was killed: as large as the export
        stale.unlink(missing_ok=True)
    return out


def exported_classifier(head_file: HeadFile, backbone: Backbone) -> ExportedClassifier:
    return ExportedClassifier(backbone.model, backbone.num_prefix_tokens, head_file.feature, head_file.normalizer,
                              head_file.head, head_file.class_names, backbone.data_config,
                              head_file.thresholds).eval().requires_grad_(False)


class OnnxGraph(nn.Module):
    """What goes into the ONNX file: pixels (N, 3, S, S), float32 RGB in [0, 1] after the transform's resize and
    crop -> normalisation (mean/std) -> backbone -> feature spec -> head normalisation -> head -> softmax or sigmoid.
    Outputs: probabilities (N, classes) and features (N, D), the head's input."""

    def __init__(self, classifier: ExportedClassifier):
        super().__init__()
        self.classifier = classifier
        cfg = classifier.data_config
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor):
        features = self.classifier.features((pixels - self.mean) / self.std)
        logits = self.classifier.head(self.classifier.normalizer(features))
        return (logits.sigmoid() if self.classifier.thresholds is not None else logits.softmax(-1)), features


ONNX_FORMAT = "dinoprobe-onnx/1"
# protobuf's limit for one message: an ONNX file that holds its own weights (torch's exporter would move larger
# weights into a second file, which a one-file export cannot be)
ONNX_MAX_BYTES = 2**31 - 1
# the most an export's probabilities may differ from PyTorch's on its check pixels: ViT-S/16 measured 1.2e-7 (float32)
# and 2.6e-4 (float16 weights); an exporter that gets an op wrong is off by tenths
ONNX_TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


# ops kept in float32 when the weights are stored as float16: the head's GEMMs, softmax and the normalisations,
# where float16 rounding would show in the probabilities (with them in float32: within 3e-4 of the fp32 file)
FP16_KEEP_FLOAT32 = ["Gemm", "Softmax", "ReduceMean", "LayerNormalization", "Pow", "Sqrt", "Div", "Sub"]


def export_onnx(head_file: HeadFile, backbone: Backbone, out: str | Path, overwrite: bool = False,
                opset: int = 18, fp16: bool = False) -> Path:
    """The classifier as one ONNX graph (torch.onnx's dynamo exporter: TorchScript export is deprecated in torch),
    one input `pixels` with a dynamic batch axis, outputs `probabilities` and `features`; class names, transform,
    feature spec and fingerprint in the model's metadata, so a consumer can preprocess without dinoprobe. Written
    atomically, like every file dinoprobe writes."""
    import json

    try:
        import onnx
    except ImportError:
        raise DinoprobeError("ONNX export needs the optional extra: pip install 'dinoprobe[onnx]' (onnx, "
                             "onnxruntime, onnxscript)") from None
    from dinoprobe import __version__

    out = check_export_target(out, head_file, overwrite)
    graph = OnnxGraph(exported_classifier(head_file, backbone)).eval()
    # refused before minutes of tracing: ViT-H+ holds 3.4 GB of float32 weights, ViT-7B 27 GB
    check_onnx_size(weights_bytes(graph) // (2 if fp16 else 1), backbone.model_name, fp16)  # float32 as built
    size = backbone.data_config.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # the caller's RNG untouched
    metadata = {"dinoprobe.format": ONNX_FORMAT, "class_names": json.dumps(head_file.class_names),
                "transform": json.dumps(backbone.data_config.to_dict()), "feature": head_file.feature,
                "pixels": "float32 RGB in [0, 1], (N, 3, image_size, image_size), after the transform's resize and "
                          "crop; the mean/std normalisation is in the graph",
                "fingerprint": json.dumps(head_file.fingerprint), "dinoprobe_version": __version__,
                "environment": json.dumps(environment())}
    if head_file.multilabel:  # probabilities are then each class's sigmoid
        metadata.update(task="multilabel", thresholds=json.dumps(head_file.thresholds))
    with conversion_notes_silenced():
        try:  # built in memory (no file argument): torch writes nothing, so nothing of it can be left on disk
            model = torch.onnx.export(graph, (example,), None, input_names=["pixels"],
                                      output_names=["probabilities", "features"],
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                                      opset_version=opset, verbose=False).model_proto
        except MemoryError:
            raise  # the machine's limit, not the model's fault: the CLI names the fixes
        except Exception as err:
            raise DinoprobeError(f"ONNX export of {backbone.model_name} failed at opset {opset} "
                                 f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); export the .pt format "
                                 "instead, or report the model") from None
        if fp16:  # float16 weights (half the file); inputs and outputs stay float32
            try:
                from onnxconverter_common import float16
            except ImportError:
                raise DinoprobeError("--fp16 needs onnxconverter-common: pip install 'dinoprobe[onnx]'") from None
            # torch's exporter records every value's type, so the converter's shape inference (which serializes
            # the float32 model: past 2 GiB, ViT-H+, it fails) is not needed; the result is the same file
            model = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                                     op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST,
                                                                    *FP16_KEEP_FLOAT32])
            metadata["weights"] = "float16"
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    check_onnx_size(model.ByteSize(), backbone.model_name, fp16)  # the file as it will be written
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
        check_onnx_agrees(tmp, graph, example, backbone.model_name, fp16)
    return out


def check_onnx_agrees(path: Path, graph: OnnxGraph, pixels: torch.Tensor, model_name: str, fp16: bool) -> None:
    """The file about to be installed, run by ONNX Runtime, against the torch graph it was traced from: an exporter
    or float16 conversion that changed the model is an error before anyone ships the file."""
    from dinoprobe.runs.onnx_predict import onnx_runtime

    ort = onnx_runtime()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(["probabilities"], {"pixels": pixels.numpy()})[0]
    except MemoryError:
        raise
    except Exception as err:  # the exporter wrote a graph ONNX Runtime cannot run: its fault, said in one line
        raise DinoprobeError(f"ONNX Runtime cannot run the exported {model_name} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]}); no file written. Export --format pt, and report "
                             "the model") from None
    with torch.inference_mode():
        want = graph(pixels)[0].numpy()
    gap, tolerance = float(abs(got - want).max()), ONNX_TOLERANCE["float16" if fp16 else "float32"]
    if not gap <= tolerance:  # NaN included
        raise DinoprobeError(f"the ONNX file's probabilities differ from PyTorch's by {gap:.2g} on test pixels (at "
                             f"most {tolerance:g} expected); no file written. Export {model_name} --format pt"
                             f"{', or without --fp16' if fp16 else ''}, and report the model")


@contextlib.contextmanager
def conversion_notes_silenced():
    """onnxscript's optimiser logs a warning per attention block ("Skipping constant folding for op Split") and the
    float16 converter warns for each weight under 1e-7 it rounds: ~100 lines for a ViT-S export, none a user can act
    on, and check_onnx_agrees tests the result. Quiet for the export only: the logger's level is put back."""
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the float32 number .* will be truncated", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def check_onnx_size(nbytes: int, model_name: str, fp16: bool) -> None:
    """An ONNX file holds at most 2 GB; past it, name what fits instead of protobuf's 'Failed to serialize'."""
    if nbytes <= ONNX_MAX_BYTES:
        return
    fix = "add --fp16 (half the bytes), or export" if not fp16 and nbytes // 2 <= ONNX_MAX_BYTES else "export"
    raise DinoprobeError(f"{model_name} as ONNX is {nbytes / 2**30:.3g} GiB{' in float16' if fp16 else ''}; one "
                         f"ONNX file holds at most {ONNX_MAX_BYTES / 2**30:.3g} GiB (protobuf's limit): {fix} "
                         "--format pt, which has none")


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
        "environment": environment(),  # what wrote this file, for whoever ships it
        **({"thresholds": head_file.thresholds} if head_file.multilabel else {}),
    }
    with atomic_file(out) as fh:
        torch.save(payload, fh)
    return out


def load_exported(path: str | Path) -> ExportedClassifier:
    """Rebuild an exported classifier without unpickling code: `load_exported('model.pt')(pixels)` -> logits."""
    check_torch_file(path, "exported model")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DinoprobeError(f"cannot read exported model '{path}': {type(err).__name__}") from None
    if not isinstance(raw, dict) or raw.get("format") != EXPORT_FORMAT:
        raise DinoprobeError(f"'{path}' is not a dinoprobe export ({EXPORT_FORMAT})")
    try:
        checked = {"data_config": "transform", "fingerprint": "fingerprint", "class_names": "class_names",
                   **({"thresholds": "thresholds"} if "thresholds" in raw else {})}  # multi-label exports only
        for field, definition in checked.items():
            documents.check(raw[field], definition, f"exported model '{path}'", "export it again from its run", field)
        cfg = raw["data_config"]
        data_config = DataConfig(**{**cfg, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])})
        # the named model's shapes first: a file naming a larger model than its tensors
        skeleton = meta_model(raw["model_name"], data_config.image_size)
        check_fits(skeleton, raw["backbone_state_dict"], path)
        check_host_holds(skeleton, raw["model_name"], copies=1)  # the file's tensors are already read
        model = create_model(raw["model_name"], data_config.image_size)
        load_strict(model, raw["backbone_state_dict"], path)
        spec, state = HeadSpec(**raw["head"]), raw["classifier_state_dict"]
        check_head_weights(spec, state, path)
        counts = {"class names": len(raw["class_names"]), **({"thresholds": len(raw["thresholds"])}
                                                             if "thresholds" in raw else {})}
        if set(counts.values()) != {spec.num_classes}:
            raise DinoprobeError(f"'{path}' is inconsistent: a {spec.num_classes}-class head, "
                                 + ", ".join(f"{n} {what}" for what, n in counts.items()))
        head = build_head(spec)
        head.load_state_dict(state)
        parse_feature(raw["feature"])
        thresholds = [float(t) for t in raw["thresholds"]] if "thresholds" in raw else None
        return ExportedClassifier(model, int(raw["num_prefix_tokens"]), raw["feature"],
                                  Normalizer.from_dict(raw["normalization"]), head, list(raw["class_names"]),
                                  data_config, thresholds).eval().requires_grad_(False)
    except DinoprobeError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise DinoprobeError(f"'{path}' is a damaged dinoprobe export ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160]}); export it again from its run") from None

