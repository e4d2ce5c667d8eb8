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

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from dinoprobe.extract.transforms import DataConfig, resize_crop, worker_transform
from dinoprobe.imagefiles import SkippedInput, load_rgb, resized_pixels
from dinoprobe.settings import DEFAULT_MAX_PIXELS


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
