"""`--decoder torchvision`: JPEGs decoded by torchvision.io.decode_jpeg and resized as uint8 tensors, instead of
PIL. In the loader workers when extracting on a CPU; batched on the GPU (nvJPEG) when extracting on CUDA, so
the workers only read file bytes.

Why: decode + resize is faster this way (`make bench`, "decode + resize + crop only" row), and on a GPU it
leaves the loader workers nothing to do but read files. The decoded pixels are identical on a CPU (Pillow and
torchvision both use libjpeg-turbo); the tensor bicubic resize differs from PIL's by a level or two of 255 on a
few pixels (tests bound it), so caches record the decoder in their fingerprint. Anything that is not a plain
RGB/greyscale JPEG (PNG, CMYK, ...) takes the PIL path; so does a JPEG that torchvision cannot decode, which
then fails (and is skipped) with PIL's reason.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from dinoprobe.extract.transforms import DataConfig, resize_crop, worker_transform
from dinoprobe.settings import DEFAULT_MAX_PIXELS


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


def load_rgb(source, max_pixels: int = DEFAULT_MAX_PIXELS, resize_to: int | None = None) -> Image.Image:
    """Open any common image, a file path or its encoded bytes, as 8-bit RGB, EXIF rotation applied; raise
    SkippedInput with a reason otherwise (unreadable, or past the size guards of `check_size`)."""
    try:
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


def jpeg_orientation(source, max_pixels: int, resize_to: int | None = None) -> int | None:
    """The EXIF orientation (1 = upright) of a file torchvision can take — a baseline/progressive JPEG in RGB or
    greyscale, within the pixel guard — else None. Reads the header only; problems are left to PIL's path,
    which reports them."""
    try:
        if len(source) == 0 if isinstance(source, bytes) else os.path.getsize(source) == 0:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                width, height = image.size
                if image.format != "JPEG" or image.mode not in ("RGB", "L") or width * height > max_pixels \
                        or resized_pixels(width, height, resize_to or 1) > max_pixels:
                    return None  # PIL's path reports it
                return int(image.getexif().get(0x0112, 1))
    except Exception:
        return None


class TorchvisionDecode:
    """Worker side: a file path or encoded bytes -> uint8 (3, S, S) at the model's size, or (encoded=True) the
    JPEG's bytes as a 1-D uint8 tensor for the device to decode. Other images, and JPEGs torchvision refuses, go
    through PIL."""

    def __init__(self, config: DataConfig, max_pixels: int = DEFAULT_MAX_PIXELS, encoded: bool = False):
        self.config, self.max_pixels, self.encoded = config, max_pixels, encoded
        self.pil_transform = worker_transform(config)

    def pil(self, source) -> torch.Tensor:
        # raises SkippedInput with the reason
        return self.pil_transform(load_rgb(source, self.max_pixels, self.config.resize_size))

    def __call__(self, source) -> torch.Tensor:
        orientation = jpeg_orientation(source, self.max_pixels, self.config.resize_size)
        if orientation is None:
            return self.pil(source)
        if not isinstance(source, bytes):
            with open(source, "rb") as f:
                source = f.read()
        data = torch.frombuffer(bytearray(source), dtype=torch.uint8)
        if self.encoded and orientation == 1:  # nvJPEG ignores EXIF orientation: rotated photos decode here
            return data
        try:
            image = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            return self.pil(source)
        return resize_crop(image, self.config)


class DeviceDecoder:
    """Main-process side of encoded=True: decodes a batch's JPEG bytes in one call on the device, resizes and
    crops each image there, and stacks them with the items the workers already decoded (non-JPEGs)."""

    def __init__(self, config: DataConfig, device: torch.device, fallback: TorchvisionDecode):
        self.config, self.device, self.fallback = config, device, fallback

    def _decode(self, encoded: list[torch.Tensor]) -> list:
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except RuntimeError:  # one bad file fails the batch call: decode one at a time
            images = []
            for data in encoded:
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device,
                                              apply_exif_orientation=True))
                except RuntimeError:
                    images.append(data.numpy().tobytes())  # decoded by PIL below, or skipped with PIL's reason
            return images

    def __call__(self, items: list[torch.Tensor]):
        """-> (uint8 (B', 3, S, S) on the device or None, positions kept, [(position, reason)] skipped)."""
        jpeg = [i for i, t in enumerate(items) if t.dim() == 1]
        decoded = dict(zip(jpeg, self._decode([items[i] for i in jpeg]))) if jpeg else {}
        ready, skipped, same_size = {}, [], {}
        for i, item in enumerate(items):
            image = decoded.get(i, item)
            if isinstance(image, bytes):
                try:
                    ready[i] = self.fallback.pil(image).to(self.device, non_blocking=True)
                except SkippedInput as err:
                    skipped.append((i, str(err)))
            elif i in decoded:
                same_size.setdefault(tuple(image.shape), []).append(i)
            else:  # decoded in a worker (PNGs, rotated JPEGs)
                ready[i] = item.to(self.device, non_blocking=True)
        # photos often share a size (a camera's, a dataset's): one resize per size, not per image
        for positions in same_size.values():
            group = torch.stack([decoded[i] for i in positions]) if len(positions) > 1 else decoded[positions[0]][None]
            ready.update(zip(positions, resize_crop(group, self.config)))
        kept = sorted(ready)
        return (torch.stack([ready[i] for i in kept]) if kept else None), kept, skipped
