"""`DataSource`: what to extract, from any kind of input. Per split an ordered list of (key, label), where the
position is the cache's `index`; keys that are not files are read through the source's reader (key -> encoded
bytes). Also the pieces every source kind shares: split names, the validation carve, the image-file walk."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.transforms import DataConfig
from dinoprobe.settings import DEFAULT_MAX_PIXELS
from dinoprobe.splits import carve_val

SPLITS = ("train", "val", "test")
# names a split may go by, in every source kind (folders, CSV, Hugging Face, tar shards)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


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
        from dinoprobe.extract.datasets import ArrayDataset, ImageFileDataset

        if self.encoded:
            return ImageFileDataset(self.splits[split], config, max_pixels, views, decode, self.reader)
        return ArrayDataset(self.arrays[split], self.splits[split], views)


def with_val(kind, root, classes, splits, val_fraction, seed, reader=None, content_id="") -> DataSource:
    """A DataSource, with val carved (stratified, seeded) from train when the source has none."""
    if not splits.get("train"):
        raise DinoprobeError(f"{root}: no training rows found; the source needs a train split")
    val_split = None
    if not splits.get("val"):
        splits["train"], splits["val"] = carve_val(splits["train"], val_fraction, seed)
        val_split = {"from": "train", "fraction": val_fraction, "seed": seed, "stratified": True}
    order = [s for s in ("train", "val", "test") if splits.get(s)]
    return DataSource(kind, root, classes, {s: splits[s] for s in order}, val_split, reader=reader,
                      content_id=content_id)
