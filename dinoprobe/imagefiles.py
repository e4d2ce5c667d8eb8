"""Which files are images, and the one walk that finds them in a folder. Plain Python (no torch), so the
ONNX predictor (runs/onnx_predict.py) can use it without PyTorch installed."""
from __future__ import annotations

import os
from pathlib import Path

# torchvision.datasets.folder.IMG_EXTENSIONS (a test holds them equal) and .gif
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def list_images(folder: Path) -> list[str]:
    """Image files under `folder`, recursively, sorted; hidden files and folders skipped. The walk never follows a
    symlinked folder (torchvision's make_dataset does: a link loop would recurse forever, and a link could lead
    out of the data folder), so it is written here."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def expand_inputs(paths) -> tuple[list[str], list[tuple[str, str]]]:
    """Files as given, folders recursively (image extensions only); missing paths reported, not fatal."""
    files, errors = [], []
    for raw in paths:
        path = Path(raw)
        if "://" in str(raw) and not path.exists():
            errors.append((str(raw), "a URL: only local files are read; download it first (e.g. `curl -O URL`)"))
        elif path.is_dir():
            files += list_images(path)
        elif path.is_file():
            files.append(str(path))
        else:  # a device, a pipe or a socket would be read forever or block: not an image file
            errors.append((str(path), "not a regular file or folder" if path.exists() else "no such file or folder"))
    return files, errors
