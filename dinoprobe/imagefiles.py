"""Which files are images, the one walk that finds them in a folder, and the one way an image is opened: the size
guards, then 8-bit RGB. PIL and numpy only (no torch), so the ONNX predictor (runs/onnx_predict.py) shares them
without PyTorch installed."""
from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dinoprobe.settings import DEFAULT_MAX_PIXELS

# torchvision.datasets.folder.IMG_EXTENSIONS (a test holds them equal), .gif, and .avif (phones and the web write
# it; Pillow decodes it since 11.3)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif", ".avif")


def list_images(folder: Path, ignored: Counter | None = None) -> list[str]:
    """Image files under `folder`, recursively, sorted; hidden files and folders skipped. The walk never follows a
    symlinked folder (torchvision's make_dataset does: a link loop would recurse forever, and a link could lead
    out of the data folder), so it is written here. `ignored` counts the other files by extension (an iPhone's
    .heic photos are not read: the caller says so rather than dropping them without a word)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(dirpath, name))
            elif ignored is not None:
                ignored[os.path.splitext(name)[1].lower() or "(no extension)"] += 1
    return sorted(files)


def describe_ignored(ignored: Counter) -> str:
    """'13 files not read (.heic 12, .txt 1): not an image extension (.jpg, .jpeg, .png, ...)'."""
    kinds = ", ".join(f"{ext} {n:,}" for ext, n in ignored.most_common(5)) + (", ..." if len(ignored) > 5 else "")
    return (f"{sum(ignored.values()):,} file(s) not read ({kinds}): not an image extension "
            f"({', '.join(IMAGE_EXTENSIONS)}); convert them to JPEG or PNG to include them")


def expand_inputs(paths, ignored: Counter | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Files as given, folders recursively (image extensions only; `ignored` counts the others, see list_images);
    missing paths reported, not fatal."""
    files, errors = [], []
    for raw in paths:
        path = Path(raw)
        if "://" in str(raw) and not path.exists():
            errors.append((str(raw), "a URL: only local files are read; download it first (e.g. `curl -O URL`)"))
        elif path.is_dir():
            files += list_images(path, ignored)
        elif path.is_file():
            files.append(str(path))
        else:  # missing, or a device, a pipe or a socket, which would be read forever or block: not an image file
            errors.append((str(path), not_a_file(str(path))))
    return files, errors


class SkippedInput(Exception):
    """An input that cannot be used; its message is the reason recorded in the manifest."""


def resized_pixels(width: int, height: int, resize_to: int) -> int:
    """Pixels after resizing the shorter side to `resize_to` (the eval transform's first step; a bound for the
    square resize, which makes resize_to x resize_to)."""
    short, long = sorted((max(width, 1), max(height, 1)))
    return resize_to * max(resize_to, round(long * resize_to / short))


def check_size(width: int, height: int, max_pixels: int, resize_to: int | None) -> None:
    """The decompression-bomb guards: the decoded image, and what the resize would make of it (a 3 KB PNG of
    1,000,000 x 1 pixels passes the first and would resize to 224,000,000 x 224)."""
    if width * height > max_pixels:
        raise SkippedInput(f"{width}x{height} image exceeds the {max_pixels:,}-pixel guard "
                           "(decompression bomb?); raise --max-pixels to accept it")
    if resize_to and resized_pixels(width, height, resize_to) > max_pixels:
        raise SkippedInput(f"{width}x{height} image: resizing its shorter side to {resize_to} would make "
                           f"{resized_pixels(width, height, resize_to):,} pixels, over the {max_pixels:,}-pixel guard "
                           "(an extreme aspect ratio)")


def max_encoded_bytes(max_pixels: int) -> int:
    """The most bytes an encoded image within the pixel guard can need: 8 a pixel (16-bit RGBA stored
    uncompressed, the largest common layout) and 16 MiB of metadata (EXIF, ICC profiles, embedded previews)."""
    return 8 * max_pixels + (16 << 20)


def check_encoded_size(nbytes: int, max_pixels: int) -> None:
    """The guard on what an input holds before it is read whole (tar members, bytes for torchvision's decoder): a
    file or member larger than any image within the pixel guard is skipped, not read (a header of 1 x 1 pixels
    followed by gigabytes would otherwise be). Applied to every encoded input, so the decoder and the source
    never change which inputs are skipped."""
    if nbytes > max_encoded_bytes(max_pixels):
        raise SkippedInput(f"{nbytes:,} bytes: more than any image within the {max_pixels:,}-pixel guard can hold "
                           f"({max_encoded_bytes(max_pixels):,} bytes); raise --max-pixels to accept it")


def not_a_file(path: str) -> str:
    """Why a path that is not a regular file is not read: missing (a file list's typo, a link to nothing, a link
    loop: the system's reason), or a pipe, device, socket or folder, which would block or never end."""
    try:
        os.stat(path)
    except OSError as err:
        return f"{(err.strerror or type(err).__name__).lower()}{' (a symbolic link)' if os.path.islink(path) else ''}"
    return "not a regular file (a pipe, device, socket or folder): not read"


def load_rgb(source, max_pixels: int = DEFAULT_MAX_PIXELS, resize_to: int | None = None) -> Image.Image:
    """Open any common image, a file path or its encoded bytes, as 8-bit RGB, EXIF rotation applied; raise
    SkippedInput with a reason otherwise (unreadable, or past the size guards of `check_size`)."""
    try:
        if not isinstance(source, bytes) and not os.path.isfile(source):  # a pipe would block, a device never end
            raise SkippedInput(not_a_file(source))
        if len(source) == 0 if isinstance(source, bytes) else os.path.getsize(source) == 0:
            raise SkippedInput("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own, clearer limit
            try:
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            except Image.DecompressionBombError as err:  # over twice PIL's own limit: PIL refuses to open it
                raise SkippedInput(f"PIL refuses to open it ({err}); exceeds the --max-pixels guard too") from None
            check_size(*image.size, max_pixels, resize_to)
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
