"""The deterministic evaluation transform and its pieces: resize the shorter side, centre crop, normalise.

Workers decode and resize to uint8 tensors; normalisation (and, for CIFAR's small arrays, the resize itself) runs
batched on the extraction device (`Preprocess`), which moves 4x fewer bytes between processes. Augmented views
(`Views`) are timm's or a light training transform, reproducible per image and view.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode, PILToTensor

from dinoprobe.errors import DinoprobeError
from dinoprobe.settings import AUGMENTATIONS, DEFAULT_IMAGE_SIZE, TRANSFORMS

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """The deterministic evaluation transform: resize shorter side, centre crop, normalise. `name`: timm (the
    model's timm data config, PIL resize) or dinov3 (DINOv3's classification eval transform, tensor resize)."""

    image_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    name: str = "timm"

    def to_dict(self) -> dict:
        return asdict(self)


DINOV3_CROP_PCT = 224 / 256  # DINOv3's classification eval transform: resize 256, crop 224


def dinov3_data_config(image_size: int, crop_pct: float | None = None) -> DataConfig:
    """DINOv3's evaluation transform (dinov3/data/transforms.py `make_classification_eval_transform`): shorter side
    to round(size / crop_pct), bicubic and antialiased, centre crop to size, ImageNet mean and std. crop_pct
    224/256 by default (256 -> 224 at 224 px); 1.0 is its logistic regression's (224 -> 224)."""
    crop_pct = DINOV3_CROP_PCT if crop_pct is None else crop_pct
    resize = round(image_size / crop_pct)
    return DataConfig(image_size, resize, "bicubic", IMAGENET_MEAN, IMAGENET_STD, image_size / resize, "dinov3")


def square_data_config(image_size: int) -> DataConfig:
    """A square resize to size x size, no crop (aspect not kept), bilinear and antialiased, ImageNet mean and std:
    the DINOv3 README's `make_transform` (v2.Resize((256, 256))) and the Hugging Face DINOv3 image processor (224 x
    224, bilinear)."""
    return DataConfig(image_size, image_size, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 1.0, "square")


def resolve_data_config(model: torch.nn.Module, image_size: int | None = None, transform: str = "timm",
                        crop_pct: float | None = None) -> DataConfig:
    """The transform for `model` at `image_size` (DEFAULT_IMAGE_SIZE when None): timm's data config for the model
    (its mean, std, interpolation and crop_pct), DINOv3's eval transform, or a square resize. `crop_pct` (size /
    resize) overrides the crop of timm's and DINOv3's transforms."""
    import timm.data

    if transform not in TRANSFORMS:
        raise DinoprobeError(f"unknown transform '{transform}'; choose one of {', '.join(TRANSFORMS)}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise DinoprobeError(f"crop_pct must be in (0, 1] (crop size / resize size), got {crop_pct}")
    size = int(image_size or DEFAULT_IMAGE_SIZE)
    if transform == "dinov3":
        return dinov3_data_config(size, crop_pct)
    if transform == "square":
        if crop_pct not in (None, 1.0):
            raise DinoprobeError("--transform square resizes to the full size and crops nothing; drop --crop-pct")
        return square_data_config(size)
    cfg = timm.data.resolve_model_data_config(model)
    crop_pct = float(crop_pct or cfg.get("crop_pct") or 1.0)
    return DataConfig(
        image_size=size,
        resize_size=int(size / crop_pct),  # timm's eval transform: floor(size / crop_pct)
        interpolation=str(cfg.get("interpolation", "bicubic")),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        crop_pct=crop_pct,
    )


def resize_crop(image: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """The eval transform's geometry on a uint8 (3, H, W) tensor: shorter side to resize_size (antialiased),
    centre crop to image_size, with torchvision's tensor kernels (transforms.v2)."""
    import torchvision.transforms.v2.functional as TF

    if config.name == "square":
        return TF.resize(image, [config.image_size, config.image_size],
                         interpolation=InterpolationMode(config.interpolation), antialias=True)
    image = TF.resize(image, [config.resize_size], interpolation=InterpolationMode(config.interpolation),
                      antialias=True)
    return TF.center_crop(image, [config.image_size])


class TensorResizeCrop:
    """resize_crop as a transform step (a class, so loader workers can pickle it)."""

    def __init__(self, config: DataConfig):
        self.config = config

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return resize_crop(image, self.config)


def worker_transform(config: DataConfig):
    """The eval transform up to (not including) normalisation, producing uint8 CHW: timm's own (PIL resize, centre
    crop; `create_transform(use_prefetcher=True)` stops before normalising) for `transform timm`, or DINOv3's (the
    resize on uint8 tensors, as torchvision's v2.Resize does) for `dinov3`."""
    if config.name in ("dinov3", "square"):
        return Compose([PILToTensor(), TensorResizeCrop(config)])
    import timm.data

    return timm.data.create_transform(input_size=(3, config.image_size, config.image_size),
                                      interpolation=config.interpolation, crop_pct=config.crop_pct,
                                      use_prefetcher=True)




def augment_transform(config: DataConfig, kind: str):
    """Training-time views as uint8 CHW: timm's training transform (random resized crop, flip, colour jitter)
    without its ToTensor/Normalize, or `light` = random resized crop + flip only."""
    from torchvision.transforms import RandomHorizontalFlip, RandomResizedCrop

    if kind == "light":
        steps = [RandomResizedCrop(config.image_size, scale=(0.08, 1.0),
                                   interpolation=InterpolationMode(config.interpolation), antialias=True),
                 RandomHorizontalFlip()]
    elif kind == "timm":
        import timm

        full = timm.data.create_transform(input_size=(3, config.image_size, config.image_size), is_training=True,
                                          interpolation=config.interpolation, mean=config.mean, std=config.std)
        steps = [t for t in full.transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
    else:
        raise DinoprobeError(f"unknown --augment '{kind}'; choose one of {', '.join(AUGMENTATIONS)}")
    return Compose([*steps, PILToTensor()])


class Views:
    """K augmented views of an image, reproducible per (image index, view): a resumed run recomputes the same."""

    def __init__(self, config: DataConfig, count: int, kind: str, seed: int = 0):
        self.count, self.seed, self.transform = count, seed, augment_transform(config, kind)

    def __call__(self, image: Image.Image, index: int) -> torch.Tensor:
        import random

        # timm's crop draws from `random`, torchvision's from torch: seed both per view for reproducible views,
        # and put both generators back afterwards, as a library should
        views, state = [], random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                for view in range(self.count):
                    view_seed = (self.seed * 1_000_003 + index) * 1009 + view
                    random.seed(view_seed)
                    torch.manual_seed(view_seed)
                    views.append(self.transform(image))
        finally:
            random.setstate(state)
        return torch.stack(views)


class Preprocess(torch.nn.Module):
    """uint8 (B,3,H,W) -> normalised float; resizes + centre-crops when the input is not yet at size."""

    def __init__(self, config: DataConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float()
        size = self.config.image_size
        if x.shape[-2:] != (size, size) and self.config.name == "square":
            x = F.interpolate(x, size=(size, size), mode=self.config.interpolation, align_corners=False,
                              antialias=True).clamp_(0, 255)
        elif x.shape[-2:] != (size, size):
            h, w = x.shape[-2:]
            scale = self.config.resize_size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
            x = F.interpolate(x, size=new, mode=self.config.interpolation, align_corners=False,
                              antialias=True).clamp_(0, 255)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            x = x[..., top:top + size, left:left + size]
        return (x - self.mean) / self.std
