"""Build a frozen backbone from any weight source users hold, and turn images into `cls` / `patch_mean` features.

Weight sources: ``hub`` (timm's Hugging Face copy), ``random`` (seeded init, for offline tests), or a path to
a Meta ``.pth``, a timm ``.safetensors``/``.pth``, or a Hugging Face ``DINOv3ViTModel`` folder. Every file is
read with ``weights_only=True`` / safetensors (no unpickling) and loaded strictly.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from dinoprobe import documents
from dinoprobe.cache.store import sha256_file as file_sha256
from dinoprobe.device import memory_available
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.transforms import DataConfig, resolve_data_config
from dinoprobe.network import hub_endpoint, reachable
from dinoprobe.paths import resolved
from dinoprobe.settings import DEFAULT_MODEL
from dinoprobe.torchfiles import check_torch_file

RANDOM_SEED = 0
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # hub | random | meta | timm | hf
    location: str  # hub repo id, file/folder path, or "seed=0"
    sha256: str


def token_features(model: nn.Module, pixels: torch.Tensor, num_prefix_tokens: int, last_blocks: int = 0
                   ) -> dict[str, torch.Tensor]:
    """{'cls': (B, D) normed CLS token, 'patch_mean': (B, D) mean of the patch tokens (registers excluded)}, and
    with last_blocks = N > 0 'cls_blocks': (B, N, D), the CLS token of each of the last N blocks after the final
    norm, earliest first (timm's forward_intermediates(norm=True); DINOv3's get_intermediate_layers)."""
    if last_blocks:
        tokens, per_block = model.forward_intermediates(pixels, indices=last_blocks, return_prefix_tokens=True,
                                                        norm=True, output_fmt="NLC")
        blocks = torch.stack([prefix[:, 0] for _, prefix in per_block], dim=1)
    else:
        tokens = model.forward_features(pixels)  # (B, T, D), final norm applied
    out = {"cls": tokens[:, 0], "patch_mean": tokens[:, num_prefix_tokens:].mean(dim=1)}
    if last_blocks:
        out["cls_blocks"] = blocks
    return out


class Backbone(nn.Module):
    """A frozen timm ViT that returns the normed CLS token and the mean of patch tokens (registers excluded), and
    the CLS tokens of the last `last_blocks` blocks when asked (see token_features)."""

    def __init__(self, model: nn.Module, model_name: str, weights: WeightsInfo, data_config: DataConfig,
                 last_blocks: int = 0):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name
        self.weights = weights
        self.data_config = data_config
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.feature_dim = int(model.num_features)
        self.depth = len(getattr(model, "blocks", ()))
        self.last_blocks = last_blocks

    def train(self, mode: bool = True):  # the backbone is frozen: never let a caller flip it to train mode
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return token_features(self.model, pixels, self.num_prefix_tokens, self.last_blocks)


# ----------------------------------------------------------------------------------------------- building
def create_model(model_name: str, image_size: int | None = None) -> nn.Module:
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('.')[0].split('_')[0]}*")[:8] or timm.list_models("*dinov3*")[:8]
        raise DinoprobeError(f"unknown model '{model_name}'. Any timm model name works, e.g. {', '.join(close)}")
    kwargs = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except TypeError:  # models without an img_size argument (convnets) take any size as is
        kwargs.pop("img_size", None)
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    if getattr(model, "cls_token", None) is None:
        raise DinoprobeError(f"model '{model_name}' has no CLS token; dinoprobe needs a ViT with a class token")
    patch = patch_size(model) if hasattr(model, "patch_embed") else None
    if image_size and patch and image_size % patch:
        lower, upper = image_size - image_size % patch, image_size - image_size % patch + patch
        raise DinoprobeError(f"--image-size {image_size} is not a multiple of {model_name}'s patch size {patch}; "
                             f"use {max(lower, patch)} or {upper}")
    return model


def weights_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers as they are stored (float32 as built; on the meta device too)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def meta_model(model_name: str, image_size: int | None = None) -> nn.Module:
    """The model's shapes without storage (PyTorch's meta device): checked and counted before anything is built.
    A copy of one built once per model and size (timm's weight init runs even on the meta device: 0.2-0.5 s for
    ViT-S/16 on 2 cores, against 40 ms for the copy), so callers may change what they get."""
    return copy.deepcopy(_meta_model(model_name, image_size))


@functools.lru_cache(maxsize=8)
def _meta_model(model_name: str, image_size: int | None) -> nn.Module:
    with torch.device("meta"):
        return create_model(model_name, image_size)


def check_host_holds(skeleton: nn.Module, model_name: str, copies: int, processes: int = 1) -> None:
    """Refuse, before any of it is allocated, a model the host cannot hold: ViT-7B/16 is 27 GB of float32 weights,
    and Linux lets the build start, then its OOM killer ends the process without a word. `skeleton`: the model on
    the meta device; `copies`: the model, and the checkpoint read whole beside it while it loads; `processes`: the
    torchrun ranks of this machine, each loading its own at the same time."""
    weights = weights_bytes(skeleton)
    need, available = processes * copies * weights, memory_available(torch.device("cpu"))
    if available is not None and need > available:
        beside = ", and as many again for the checkpoint read beside them" if copies > 1 else ""
        ranks = f" in each of {processes} processes" if processes > 1 else ""
        fewer = " or fewer processes per machine" if processes > 1 else ""
        raise DinoprobeError(f"{model_name} needs about {need / 2**30:.3g} GiB of host memory to load (its weights"
                             f"{ranks}, {weights / 2**30:.3g} GiB in float32{beside}) and {available / 2**30:.3g} GiB "
                             f"are available; choose a smaller --model{fewer} or use a machine with more memory")


def build_backbone(model_name: str = DEFAULT_MODEL, weights: str = "hub", image_size: int | None = None,
                   log=print, transform: str = "timm", crop_pct: float | None = None, processes: int = 1) -> Backbone:
    """The one factory: model + weights + data config, frozen. `processes`: torchrun ranks on this machine, each
    building one at once (for the memory check)."""
    check_host_holds(meta_model(model_name, image_size), model_name, copies=1 if weights == "random" else 2,
                     processes=processes)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = create_model(model_name, image_size)
        _unit_layer_scale(model)
        info = WeightsInfo("random", f"seed={RANDOM_SEED}", _state_dict_sha256(model.state_dict()))
        log(f"WARNING: --weights random: {model_name} with RANDOM weights (seed {RANDOM_SEED}). "
            "Features are only good for testing the pipeline.")
    else:
        model = create_model(model_name, image_size)
        info = load_hub_weights(model, model_name) if weights == "hub" else load_weights_from_path(model, weights)
    return Backbone(model, model_name, info, resolve_data_config(model, image_size, transform, crop_pct))


# host memory a CPU forward pass takes beyond the weights, in float32 numbers per token per unit of (width + MLP
# width), at the first pass's peak (it allocates what later passes reuse): 3.8-7.4 measured for ViT-S/16, S+/16,
# B/16, L/16 and H+/16 at 224-448 px, batches of 8-64, varying run to run (fused attention: no tokens x tokens matrix)
FORWARD_FLOATS_PER_TOKEN_WIDTH = 10


def patch_size(model: nn.Module) -> int:
    patch = model.patch_embed.patch_size
    return patch[0] if isinstance(patch, (tuple, list)) else patch


def forward_bytes(backbone: Backbone, batch_size: int) -> int:
    """Host bytes a CPU forward pass of `batch_size` images takes beyond the weights: its activations, and the
    batch's pixels as float32, before and after normalisation."""
    size = backbone.data_config.image_size
    tokens = (size // patch_size(backbone.model)) ** 2 + backbone.num_prefix_tokens
    mlp = backbone.model.blocks[0].mlp  # its layers' outputs: the hidden width(s) and the model width
    widths = sum(m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))
    return batch_size * (4 * FORWARD_FLOATS_PER_TOKEN_WIDTH * tokens * widths + 2 * 4 * 3 * size * size)


def check_forward_fits(backbone: Backbone, batch_size: int, device: torch.device, processes: int = 1) -> None:
    """Refuse, naming a batch size that fits, a CPU forward pass the host cannot hold: ViT-H+/16 at 512 px is
    counted at 29 GiB for a batch of 64, and Linux's OOM killer would end the run without a word. (A GPU that runs
    out raises OutOfMemoryError, which the commands report.) `processes`: torchrun ranks on this machine, each
    running a forward of its own at the same time."""
    if torch.device(device).type != "cpu":
        return
    need, available = processes * forward_bytes(backbone, batch_size), memory_available(torch.device("cpu"))
    if available is None or need <= available:
        return
    fits = batch_size * available // need
    fix = f"use --batch-size {fits} or less" if fits >= 1 else "use a smaller --image-size or --model"
    each = f" in each of {processes} processes" if processes > 1 else ""
    raise DinoprobeError(f"a batch of {batch_size} images at {backbone.data_config.image_size} px through "
                         f"{backbone.model_name}{each} needs about {need / 2**30:.3g} GiB of host memory and "
                         f"{available / 2**30:.3g} GiB are available; {fix}")


def architecture(model_name: str = DEFAULT_MODEL, image_size: int | None = None) -> Backbone:
    """The model's shapes without weights, on the meta device: what `info` reports, for ViT-7B/16 (27 GB of
    weights) at once and in no memory."""
    model = meta_model(model_name, image_size)
    return Backbone(model, model_name, WeightsInfo("none", "architecture only", ""),
                    resolve_data_config(model, image_size))


def _unit_layer_scale(model: nn.Module) -> None:
    """timm initialises DINOv3's layer scale at 1e-5, which makes a random network's CLS token almost the same
    for every image (spread ~1e-5). Unit layer scale makes random features depend on the input, so offline
    tests and demos exercise the whole pipeline."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                param.fill_(1.0)


# -------------------------------------------------------------------------------------------- hub weights
def load_hub_weights(model: nn.Module, model_name: str) -> WeightsInfo:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = model.pretrained_cfg.get("hf_hub_id")
    if not repo or repo.endswith("/"):
        raise DinoprobeError(f"timm has no hub weights for '{model_name}'; pass --weights PATH or --weights random")
    for name in HUB_FILES:  # a previous download works offline
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return _load_file_into(model, Path(cached), source="hub", location=repo)
    hint = ("download the checkpoint by hand (Meta .pth, timm .safetensors or a Hugging Face folder) and pass "
            "--weights PATH, or use --weights random to test the pipeline offline")
    # huggingface_hub retries for ~45 s when offline; a 3 s probe makes the failure immediate
    problem = reachable(hub_endpoint())
    if problem:
        raise DinoprobeError(f"cannot reach the Hugging Face Hub to download '{repo}': {problem} (offline?); {hint}")
    try:
        path = hf_hub_download(repo, HUB_FILES[0])
    except Exception as err:  # gated repo, auth, network: all end in the same advice
        raise DinoprobeError(f"downloading '{repo}' failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                             f"if the repo is gated, accept its licence and run `hf auth login`; or {hint}") from None
    return _load_file_into(model, Path(path), source="hub", location=repo)


# ------------------------------------------------------------------------------------------- local weights
def load_weights_from_path(model: nn.Module, weights: str) -> WeightsInfo:
    path = Path(weights).expanduser()
    if not path.exists():
        raise DinoprobeError(f"--weights '{weights}' does not exist; expected 'hub', 'random', a .pth/.safetensors "
                             "file or a Hugging Face folder with config.json + model.safetensors")
    if path.is_dir():
        return _load_hf_folder(model, path)
    return _load_file_into(model, path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors without executing code, with timm's reader (safetensors, or torch.load(weights_only=True); the
    EMA / state_dict / model entry of a training checkpoint; `module.` prefixes removed). DINOv3's own training
    checkpoints add a `teacher` entry and a `backbone.` prefix, handled here."""
    from timm.models import load_state_dict

    if Path(path).suffix != ".safetensors":  # safetensors holds raw tensors: bounded by its size already
        check_torch_file(path, "weights")
    try:
        obj = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as err:
        raise DinoprobeError(f"cannot read weights '{path}': {type(err).__name__}: {str(err).splitlines()[0][:200]} "
                             "(only plain tensor checkpoints are accepted; code in pickles is never run)") from None
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        obj = obj["teacher"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DinoprobeError(f"'{path}' is not a state dict of tensors")
    for prefix in ("backbone.", "module."):  # DINOv3 training checkpoints prefix the backbone
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


# Checkpoint entries no inference path reads, each dropped only after the check that makes dropping it exact.
# Every other tensor must land in the model (load_strict), or loading is refused.
INERT_ENTRIES = {
    "mask_token": "the masked-patch embedding of pretraining; no forward pass without masks reads it",
    "rope periods": "RoPE periods: the model computes its own from its config; refused unless they are equal",
    "qkv.bias_mask": "which entries of qkv.bias DINOv3 applies; the bias is loaded multiplied by it",
    "k part of qkv.bias": "adds the same amount to every attention score of a query, which softmax cancels",
    "projectors.*, local_cls_norm.*": "distillation heads and the 7B model's local-crop norm, used only in training",
}


def audit_checkpoint(state: dict[str, torch.Tensor], model: nn.Module, source) -> dict[str, torch.Tensor]:
    """The checkpoint minus its INERT_ENTRIES, each checked first; qkv biases enter multiplied by their mask.
    A tensor the model cannot hold (a non-zero q/v bias on a model without q/v biases, RoPE periods other than
    the model's) refuses the load with the tensor's name and the fix."""
    has_qv_bias = any(k.endswith("attn.q_bias") for k in model.state_dict())
    out = {}
    for key, value in state.items():
        if key.endswith("mask_token") or key.startswith(("projectors.", "local_cls_norm")) \
                or key.endswith("qkv.bias_mask"):
            continue
        if "rope" in key and not key.endswith("freqs"):
            _check_rope(key, value, model, source)
            continue
        if key.endswith("attn.qkv.bias"):
            mask = state.get(key + "_mask")
            value = value * mask if mask is not None else value
            dim = value.shape[0] // 3
            if not has_qv_bias:
                if value[:dim].abs().max() > 0 or value[2 * dim:].abs().max() > 0:
                    raise DinoprobeError(f"weights '{source}': {key} has non-zero q/v biases, which "
                                         f"{type(model).__name__} without q/v biases cannot hold; use the '_qkvb' "
                                         "variant of the model name (e.g. vit_small_patch16_dinov3_qkvb)")
                continue  # zero q/v parts, and a k part softmax cancels
        out[key] = value
    return out


def _check_rope(key: str, value: torch.Tensor, model: nn.Module, source) -> None:
    buffers = {name: b for name, b in model.named_buffers() if name.endswith("periods")}
    if key.endswith("periods") and len(buffers) == 1:
        mine = next(iter(buffers.values()))
        if value.shape == mine.shape and torch.allclose(value.float(), mine.float(), rtol=1e-5, atol=0):
            return
        raise DinoprobeError(f"weights '{source}': {key} differs from the RoPE periods {type(model).__name__} "
                             "computes (another rope base or dimension); pick the --model the checkpoint was "
                             "trained as")
    raise DinoprobeError(f"weights '{source}': {key} is a RoPE tensor this model cannot check or hold; pick the "
                         "--model the checkpoint was trained as")


def _load_file_into(model: nn.Module, path: Path, source: str | None = None,
                    location: str | None = None) -> WeightsInfo:
    state = read_state_dict(path)
    if any(k.startswith("embeddings.") for k in state):
        kind, state = "hf", hf_to_timm(state, model, path)
    else:
        kind = "meta" if "storage_tokens" in state or any(".ls1.gamma" in k for k in state) else "timm"
        state = audit_checkpoint(state, model, path)
        converted = _timm_filter(state, model)
        # timm's converter renames, and splits qkv.bias into q_bias + v_bias; it must drop nothing else
        splits = sum(k.endswith("attn.qkv.bias") for k in state) if kind == "meta" else 0
        if len(converted) != len(state) + splits:
            raise DinoprobeError(f"weights '{path}': timm's converter for {type(model).__name__} kept "
                                 f"{len(converted)} of {len(state) + splits} tensors; pick the --model the checkpoint "
                                 "was trained as")
        state = converted
    load_strict(model, state, path)
    return WeightsInfo(source or kind, location or str(resolved(path)), file_sha256(path))


def _load_hf_folder(model: nn.Module, folder: Path) -> WeightsInfo:
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise DinoprobeError(f"'{folder}' is not a Hugging Face model folder: expected config.json and "
                             "model.safetensors (as written by save_pretrained)")
    config = documents.parse(config_path.read_bytes(), str(config_path), "save the model again with save_pretrained")
    if not isinstance(config, dict):
        raise DinoprobeError(f"{config_path} is not a model config (a JSON object); save the model again with "
                             "save_pretrained")
    expected = {"hidden_size": model.num_features, "num_hidden_layers": len(model.blocks),
                "num_register_tokens": model.num_prefix_tokens - 1}
    wrong = {k: (config.get(k), v) for k, v in expected.items() if config.get(k) is not None and config.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}={a} (model has {b})" for k, (a, b) in wrong.items())
        raise DinoprobeError(f"'{folder}' does not match --model: {detail}; pick the matching --model")
    _load_file_into(model, weights_path)
    return WeightsInfo("hf", str(resolved(folder)), file_sha256(weights_path))


def _timm_filter(state: dict, model: nn.Module) -> dict:
    """timm's own converter for the model's family (Meta DINOv3 names -> timm names for Eva; position-embedding
    resizing for other ViTs): the public `checkpoint_filter_fn` of the module that defines the model's class.
    (`pretrained_cfg_overlay=dict(file=...)` applies the same function, but inside the load, where the audit above
    and the count check after it could not see what it kept and dropped.)"""
    module = sys.modules[type(model).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn else state


def hf_to_timm(state: dict[str, torch.Tensor], model: nn.Module, source="") -> dict[str, torch.Tensor]:
    """transformers' DINOv3ViTModel names -> timm Eva names (q/k/v concatenated into attn.qkv); the same
    INERT_ENTRIES rule as audit_checkpoint (a k bias, if any, is the softmax-cancelled k part)."""
    renames = [("embeddings.patch_embeddings.", "patch_embed.proj."), ("embeddings.cls_token", "cls_token"),
               ("embeddings.register_tokens", "reg_token"),
               ("attention.o_proj.", "attn.proj."), ("layer_scale1.lambda1", "gamma_1"),
               ("layer_scale2.lambda1", "gamma_2"), ("mlp.up_proj.", "mlp.fc1."), ("mlp.down_proj.", "mlp.fc2.")]
    has_qv_bias = any(k.endswith("attn.q_bias") for k in model.state_dict())
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = re.sub(r"^(model\.)?layer\.", "blocks.", key)  # transformers saves with or without `model.`
        if key == "embeddings.mask_token":
            continue  # pretraining only
        if "rope" in key:
            _check_rope(key, value, model, source)
            continue
        if ".attention." in key and key.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
            block = key.split(".attention.")[0]
            qkv.setdefault(block, {})[key.split(".")[-2][0] + "_" + key.split(".")[-1]] = value
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    for block, parts in qkv.items():
        try:
            out[f"{block}.attn.qkv.weight"] = torch.cat([parts["q_weight"], parts["k_weight"], parts["v_weight"]])
        except KeyError as err:
            raise DinoprobeError(f"Hugging Face weights lack {block} attention weight {err}") from None
        for name in ("q", "v"):
            bias = parts.get(f"{name}_bias")
            if bias is None:
                continue
            if has_qv_bias:
                out[f"{block}.attn.{name}_bias"] = bias
            elif bias.abs().max() > 0:
                raise DinoprobeError(f"the weights have non-zero {name} biases but the model has none; use the "
                                     "'_qkvb' variant of the model name")
    return out


def load_strict(model: nn.Module, state: dict, source: Path | str) -> None:
    """Load all-or-nothing, naming the keys that do not line up."""
    check_fits(model, state, source)
    model.load_state_dict(state, strict=True)


def check_fits(model: nn.Module, state: dict, source: Path | str) -> None:
    """Every key of `model` in `state` with its shape, and nothing else; `model` may live on the meta device."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
              if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        def few(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {few(shapes)}" if shapes else ""]
        raise DinoprobeError(f"weights '{source}' do not fit {type(model).__name__} "
                             f"({'; '.join(p for p in parts if p)}); check --model matches the checkpoint")


# ------------------------------------------------------------------------------------------------ hashing
def _state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- model facts
def model_facts(backbone: Backbone) -> dict:
    """What the original transformers script printed, for any supported model, plus measured FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    model, size = backbone.model, backbone.data_config.image_size
    patch = patch_size(model)
    block = model.blocks[0]
    mlp_width = getattr(getattr(block.mlp, "fc1", None), "out_features", None) or getattr(
        getattr(block.mlp, "fc1_g", None), "out_features", None)
    n_patches = (size // patch) ** 2
    total = sum(p.numel() for p in model.parameters())
    # counted on the meta device (shapes, no work), where attention runs as matmuls the counter sees; a real CPU
    # forward runs a fused kernel it does not count (8.65 instead of 9.40 GFLOP for ViT-S/16 at 224 px)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        architecture(backbone.model_name, size)(torch.zeros(1, 3, size, size, device="meta"))
    return {
        "model": backbone.model_name,
        "weights": asdict(backbone.weights),
        "parameters": total,
        "weights_bytes_float32": weights_bytes(model),
        "trainable_parameters": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
        "width": backbone.feature_dim,
        "depth": len(model.blocks),
        "heads": getattr(block.attn, "num_heads", None),
        "mlp_width": mlp_width,
        "patch_size": patch,
        "register_tokens": backbone.num_prefix_tokens - 1,
        "image_size": size,
        "patch_tokens": n_patches,
        "tokens": n_patches + backbone.num_prefix_tokens,
        "flops_per_image": counter.get_total_flops(),
        "data_config": backbone.data_config.to_dict(),
    }
