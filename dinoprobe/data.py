"""Data sources (an image folder or CIFAR-10/100), their splits, and the deterministic evaluation transform.

Workers decode and resize to uint8 tensors; normalisation (and, for CIFAR's small arrays, the resize itself)
runs batched on the extraction device (`Preprocess`), which moves 4x fewer bytes between processes.
"""
from __future__ import annotations

import hashlib
import io
import os
import socket
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, PILToTensor, Resize

from dinoprobe.backbone import DataConfig
from dinoprobe.errors import DinoprobeError
from dinoprobe.splitting import carve_val

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ 9459 x 9459)


@dataclass
class DataSource:
    """What to extract: per split, an ordered list of (path, label). The position in the list is `index`."""

    kind: str  # folder | csv | hf | webdataset | cifar10 | cifar100
    root: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]  # (key: a file path, or a source's key such as tar#name), label
    val_split: dict | None = None  # how val was carved from train, when it was
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # CIFAR pixels per split
    reader: object | None = field(default=None, repr=False)  # key -> encoded bytes, for keys that are not files
    content_id: str = ""  # what identifies the content beyond the keys (sources.py)

    def file_list_sha256(self) -> str:
        """Identifies the inputs: every split's keys, labels and sizes (of files, or of their encoded bytes as
        the reader knows them), in order."""
        digest = hashlib.sha256(self.content_id.encode())
        for split in sorted(self.splits):
            for path, label in self.splits[split]:
                if self.reader is not None:
                    size = self.reader.size(path)
                else:
                    size = os.path.getsize(path) if self.kind in ("folder", "csv") and os.path.exists(path) else -1
                digest.update(f"{split}\t{label}\t{path}\t{size}\n".encode())
        return digest.hexdigest()

    @property
    def encoded(self) -> bool:
        """Whether the inputs are encoded images (files or bytes) rather than decoded arrays."""
        return not self.arrays

    def dataset(self, split: str, config: DataConfig, max_pixels: int = DEFAULT_MAX_PIXELS, views=None, decode=None):
        """decode: encoded image -> uint8 tensor, replacing PIL (see decode.py); arrays need none."""
        if self.encoded:
            return ImageFileDataset(self.splits[split], config, max_pixels, views, decode, self.reader)
        return ArrayDataset(self.arrays[split], self.splits[split], views)


def open_source(data: str, data_dir: str = "data", val_fraction: float = 0.1, seed: int = 0,
                image_column: str | None = None, label_column: str | None = None) -> DataSource:
    """--data: an ImageFolder tree, cifar10/cifar100, a .csv/.tsv file list, a Hugging Face dataset (save_to_disk
    folder, Parquet folder, hf:OWNER/NAME[:CONFIG]) or WebDataset tar shards (sources.py)."""
    from dinoprobe import sources

    if data.lower() in CIFAR:
        return _cifar_source(data.lower(), data_dir, val_fraction, seed)
    path = Path(data)
    if path.suffix.lower() in (".csv", ".tsv"):
        if not path.is_file():
            raise DinoprobeError(f"--data '{data}': no such file list")
        return sources.csv_source(path, val_fraction, seed)
    if data.startswith("hf:") or sources.is_hf_folder(path):
        return sources.hf_source(data, val_fraction, seed, image_column, label_column)
    if sources.is_webdataset(data):
        return sources.webdataset_source(data, val_fraction, seed, label_column)
    return _folder_source(path, val_fraction, seed)


# ------------------------------------------------------------------------------------------- image folders
def _list_images(class_dir: Path) -> list[str]:
    files = []
    # followlinks=False: a symlink loop in the data folder can never recurse forever
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(files)


def _classes_of(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_source(root: Path, val_fraction: float, seed: int) -> DataSource:
    if not root.is_dir():
        raise DinoprobeError(f"--data '{root}' is not a folder (expected ROOT/train/<class>/*.jpg), a .csv/.tsv "
                             "file list, hf:OWNER/NAME, tar shards, nor one of: cifar10, cifar100")
    if not (root / "train").is_dir():
        raise DinoprobeError(f"'{root}' has no train/ folder; expected ROOT/train/<class>/*, optional ROOT/val/ "
                             "and ROOT/test/")
    classes = _classes_of(root / "train")
    if len(classes) < 2:
        raise DinoprobeError(f"'{root / 'train'}' has {len(classes)} class folder(s); a classifier needs at least 2")
    splits: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        found = _classes_of(split_dir)
        if found != classes:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise DinoprobeError(f"classes in {split}/ differ from train/: "
                                 + "; ".join(p for p in (f"only in {split}/: {extra}" if extra else "",
                                                         f"missing from {split}/: {missing}" if missing else "") if p))
        splits[split] = [(os.path.abspath(p), label)
                         for label, name in enumerate(classes) for p in _list_images(split_dir / name)]
        empty = [name for label, name in enumerate(classes) if not any(lb == label for _, lb in splits[split])]
        if split == "train" and empty:
            raise DinoprobeError(f"train/ classes with no images: {empty}")
    val_split = None
    if "val" not in splits:
        splits["train"], splits["val"] = carve_val(splits["train"], val_fraction, seed)
        val_split = {"from": "train", "fraction": val_fraction, "seed": seed, "stratified": True}
    return DataSource("folder", str(root.resolve()), classes, splits, val_split)


# -------------------------------------------------------------------------------------------------- CIFAR
def _cifar_source(name: str, data_dir: str, val_fraction: float, seed: int) -> DataSource:
    import torchvision

    cls = getattr(torchvision.datasets, CIFAR[name])
    sets = {}
    for split, train in (("train", True), ("test", False)):
        try:
            sets[split] = cls(data_dir, train=train, download=False)
        except RuntimeError:
            sets[split] = _download_cifar(cls, name, data_dir, train)
    classes = list(sets["train"].classes)
    splits = {split: [(f"{name}:{split}:{i}", int(t)) for i, t in enumerate(ds.targets)] for split, ds in sets.items()}
    arrays = {split: ds.data for split, ds in sets.items()}
    positions = [(i, label) for i, (_, label) in enumerate(splits["train"])]
    train_pos, val_pos = carve_val(positions, val_fraction, seed)
    train_pixels = sets["train"].data
    for split, chosen in (("train", train_pos), ("val", val_pos)):
        splits[split] = [(f"{name}:train:{i}", label) for i, label in chosen]
        arrays[split] = train_pixels[[i for i, _ in chosen]]
    val_split = {"from": "train", "fraction": val_fraction, "seed": seed, "stratified": True}
    return DataSource(name, str(Path(data_dir).resolve()), classes, splits, val_split, arrays)


def _download_cifar(cls, name: str, data_dir: str, train: bool):
    hint = (f"on an offline machine copy the python-version archive (e.g. cifar-10-python.tar.gz) into "
            f"'{data_dir}' or pass --data-dir")
    host = urllib.parse.urlparse(cls.url).hostname
    try:  # torchvision's download has no timeout: a 5 s probe makes an offline failure immediate
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise DinoprobeError(f"{name} is not in '{data_dir}' and {host} cannot be reached ({err}); {hint}") from None
    try:
        return cls(data_dir, train=train, download=True)
    except Exception as err:
        raise DinoprobeError(f"{name} is not in '{data_dir}' and downloading it failed ({type(err).__name__}: "
                             f"{str(err)[:120]}); {hint}") from None


# ------------------------------------------------------------------------------------------------ decoding
class SkippedInput(Exception):
    """An input that cannot be used; its message is the reason recorded in the manifest."""


def load_rgb(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open any common image, a file path or its encoded bytes, as 8-bit RGB, EXIF rotation applied; raise
    SkippedInput with a reason otherwise."""
    try:
        if len(source) == 0 if isinstance(source, bytes) else os.path.getsize(source) == 0:
            raise SkippedInput("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own, clearer limit
            try:
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            except Image.DecompressionBombError as err:  # over twice PIL's own limit: PIL refuses to open it
                raise SkippedInput(f"PIL refuses to open it ({err}); exceeds the --max-pixels guard too") from None
            width, height = image.size
            if width * height > max_pixels:
                raise SkippedInput(f"{width}x{height} image exceeds the {max_pixels:,}-pixel guard "
                                   "(decompression bomb?); raise --max-pixels to accept it")
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except SkippedInput:
        raise
    except Exception as err:  # unreadable, truncated, not an image: a reason, not a crash
        raise SkippedInput(f"{type(err).__name__}: {str(err)[:160]}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):  # 16-bit: rescale, PIL's convert would clip
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_crop(image: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """The eval transform's geometry on a uint8 (3, H, W) tensor: shorter side to resize_size (antialiased),
    centre crop to image_size, with torchvision's tensor kernels (transforms.v2)."""
    import torchvision.transforms.v2.functional as TF

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
    """The eval transform up to (not including) normalisation, producing uint8 CHW: timm's (PIL resize) for
    `transform timm`, or DINOv3's (the resize on uint8 tensors, as torchvision's v2.Resize does) for `dinov3`."""
    if config.name == "dinov3":
        return Compose([PILToTensor(), TensorResizeCrop(config)])
    return Compose([
        Resize(config.resize_size, interpolation=InterpolationMode(config.interpolation), antialias=True),
        CenterCrop(config.image_size),
        PILToTensor(),
    ])


AUGMENTATIONS = ("timm", "light")


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


class ImageFileDataset(torch.utils.data.Dataset):
    """Items (pixels, label, index, skip reason, views): pixels uint8 (3, S, S) from PIL and the eval transform,
    or whatever `decode(path)` returns (decode.py: the same from torchvision, or a JPEG's bytes)."""

    def __init__(self, samples: list[tuple[str, int]], config: DataConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
                 views: Views | None = None, decode=None, reader=None):
        self.samples, self.transform, self.max_pixels, self.views = samples, worker_transform(config), max_pixels, views
        self.decode, self.reader = decode, reader  # reader: key -> bytes, for sources whose keys are not files

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            source = path if self.reader is None else self.reader.read(path)
            if self.decode is None:
                image = load_rgb(source, self.max_pixels)
                pixels = self.transform(image)
            else:
                pixels = self.decode(source)
                image = load_rgb(source, self.max_pixels) if self.views else None  # augmentations work on PIL images
        except SkippedInput as err:
            return None, label, index, str(err), None
        return pixels, label, index, None, self.views(image, index) if self.views else None


class ArrayDataset(torch.utils.data.Dataset):
    """CIFAR-style uint8 HWC arrays; resizing happens batched on the device (`Preprocess`)."""

    def __init__(self, array: np.ndarray, samples: list[tuple[str, int]], views: Views | None = None):
        self.array, self.samples, self.views = array, samples, views

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        pixels = np.ascontiguousarray(self.array[index])
        views = self.views(Image.fromarray(pixels), index) if self.views else None
        return torch.from_numpy(pixels).permute(2, 0, 1), self.samples[index][1], index, None, views


def collate(batch):
    """Stack what decoded (and its augmented views, if any); hand back what did not with its reason."""
    good = [b for b in batch if b[3] is None]
    skipped = [(b[2], b[3]) for b in batch if b[3] is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped, None
    views = torch.stack([b[4] for b in good]) if good[0][4] is not None else None
    pixels = [b[0] for b in good]
    # encoded JPEGs, left for the device to decode (decode.py), cannot be stacked: they stay a list
    pixels = torch.stack(pixels) if all(p.dim() == 3 for p in pixels) else pixels
    return (pixels, torch.tensor([b[1] for b in good], dtype=torch.long),
            torch.tensor([b[2] for b in good], dtype=torch.long), skipped, views)


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
        if x.shape[-2:] != (size, size):
            h, w = x.shape[-2:]
            scale = self.config.resize_size / min(h, w)
            new = (max(size, round(h * scale)), max(size, round(w * scale)))
            x = F.interpolate(x, size=new, mode=self.config.interpolation, align_corners=False,
                              antialias=True).clamp_(0, 255)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            x = x[..., top:top + size, left:left + size]
        return (x - self.mean) / self.std
