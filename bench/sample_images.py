"""Photograph-like JPEGs made with PIL, for tests, `dinoprobe bench` and the GPU script on machines with no
dataset and no network: smooth colour fields with shapes, texture and sensor noise, at the sizes photos come in,
in an ImageFolder layout. Each class has its own palette, so a head can learn them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(seed: int, size: tuple[int, int], tint: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Image.Image:
    """One RGB image: a gradient background, a few blurred ellipses and polygons, fine noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)[..., None]
    base = rng.uniform(40, 200, 3) * np.asarray(tint) + ramp * rng.uniform(-60, 60, 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
        colour = tuple(int(c) for c in np.clip(rng.uniform(0, 255, 3) * np.asarray(tint), 0, 255))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.polygon([(x0 + rng.uniform(-w, w), y0 + rng.uniform(-h, h)) for _ in range(5)], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(width, height) / 150)))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


TINTS = [(1.2, 0.9, 0.7), (0.7, 0.9, 1.2), (0.8, 1.2, 0.8), (1.1, 1.1, 0.6)]


def make_jpeg_folder(root, classes=("ants", "bees"), counts=None, sizes=(300, 500), seed: int = 0,
                     quality: int = 90) -> Path:
    """ROOT/<split>/<class>/NNNNN.jpg for each split in `counts` ({split: images per class}), each image of a
    random width and height in `sizes`. Default: 25 train and 10 val images per class, like hymenoptera."""
    root = Path(root)
    counts = counts or {"train": 25, "val": 10}
    rng = np.random.default_rng(seed)
    for s, (split, per_class) in enumerate(counts.items()):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = tuple(int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
                image = photo(seed + 100_000 * s + 1000 * c + i, size, TINTS[c % len(TINTS)])
                image.save(folder / f"{i:05d}.jpg", quality=quality)
    return root


if __name__ == "__main__":  # python -m bench.sample_images FOLDER: demo photos when you have none at hand
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.sample_images",
                                     description="Write 70 photograph-like JPEGs (classes ants and bees, 50 train "
                                                 "and 20 val) into FOLDER/train and FOLDER/val.")
    parser.add_argument("folder", help="a new or empty folder")
    folder = Path(parser.parse_args().folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        sys.exit(f"{folder} exists and is not an empty folder; name a new one (nothing was written)")
    make_jpeg_folder(folder)
    print(f"wrote 70 JPEGs to {folder}/train and {folder}/val (classes ants, bees)")
