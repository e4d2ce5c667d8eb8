"""`DataSource`: what to extract, from any kind of input. Per split an ordered list of (key, label), where the
position is the cache's `index`; keys that are not files are read through the source's reader (key -> encoded
bytes). Also the pieces every source kind shares: split names, the validation carve, the image-file walk."""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.transforms import DataConfig
from dinoprobe.imagefiles import describe_ignored
from dinoprobe.paths import resolved
from dinoprobe.settings import DEFAULT_MAX_PIXELS, TASKS
from dinoprobe.splits import carve_val

SPLITS = ("train", "val", "test")
MAX_CLASSES = 100_000
# names a split may go by, in every source kind (folders, CSV, Hugging Face, tar shards)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


@dataclass
class DataSource:
    """What to extract: per split, an ordered list of (path, label). The position in the list is `index`."""

    kind: str  # folder | csv | hf | webdataset | cifar10 | cifar100
    root: str
    classes: list[str]
    # (key: a file path, or a source's key such as tar#name, label); multi-label: label is a tuple of class indices
    splits: dict[str, list[tuple[str, int | tuple[int, ...]]]]
    val_split: dict | None = None  # how val was carved from train, when it was
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # CIFAR pixels per split
    reader: object | None = field(default=None, repr=False)  # key -> encoded bytes, for keys that are not files
    content_id: str = ""  # what identifies the content beyond the keys (sources.py)
    task: str = "single"  # single | multilabel
    ignored: Counter = field(default_factory=Counter)  # files in a data folder not read, by extension

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def check_cache_place(self, cache_dir) -> None:
        """A cache inside an image folder becomes part of it: the rerun that resumes it would list the cache as a
        split or class folder and refuse (or, inside train/, learn a class of shards). Refused before anything is
        written."""
        if self.kind != "folder":
            return
        root, cache = resolved(self.root), resolved(cache_dir)
        if cache == root or root in cache.parents:
            raise DinoprobeError(f"--cache {cache_dir} is inside the data folder {self.root}, where a rerun would read "
                                 f"it as data; put the cache outside it, e.g. --cache cache/{root.name}")

    def notes(self) -> list[str]:
        """What to know before hours of extraction: files a data folder holds but dinoprobe does not read, and class
        names that differ only in case or spacing ('Ant' and 'ant' from a spreadsheet become two classes)."""
        notes = [describe_ignored(self.ignored)] if self.ignored else []
        alike: dict[str, list[str]] = {}
        for name in self.classes:
            alike.setdefault(" ".join(name.split()).casefold(), []).append(name)
        notes += [f"classes {names} differ only in case or spacing: if they are one class, make their labels agree"
                  for names in alike.values() if len(names) > 1]
        return notes

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

        samples = self.splits[split]
        if self.multilabel:  # the loader carries class indices only; the shard writer reads label sets by index
            samples = [(key, -1) for key, _ in samples]
        if self.encoded:
            return ImageFileDataset(samples, config, max_pixels, views, decode, self.reader)
        return ArrayDataset(self.arrays[split], self.splits[split], views, config.image_size)


def with_val(kind, root, classes, splits, val_fraction, seed, reader=None, content_id="",
             task: str = "single") -> DataSource:
    """A DataSource, with val carved (seeded; stratified for single-label rows) from train when the source has none.
    A source with only val or test rows is an evaluation set: nothing is carved, and its cache serves `dinoprobe
    score` (a head trained elsewhere, scored on these labelled images)."""
    if not any(splits.get(s) for s in SPLITS):
        raise DinoprobeError(f"{root}: no labelled rows found; the source needs a train split (or, for a set to "
                             "score a trained head on with `dinoprobe score`, a val or test split)")
    if len(classes) < (2 if splits.get("train") else 1):
        raise DinoprobeError(f"{root}: the labels name {len(classes)} class(es) {list(classes)[:2]}; a classifier "
                             "needs at least 2")
    if len(classes) > MAX_CLASSES:  # every cached row holds a label per class (multi-label) and every head a logit
        raise DinoprobeError(f"{root}: the labels name {len(classes):,} classes, more than {MAX_CLASSES:,}; check "
                             "the label column (a free-text or ID column?) or --label-sep")
    val_split = None
    if splits.get("train") and not splits.get("val"):
        splits["train"], splits["val"] = carve_val(splits["train"], val_fraction, seed)
        val_split = {"from": "train", "fraction": val_fraction, "seed": seed, "stratified": task != "multilabel"}
    order = [s for s in ("train", "val", "test") if splits.get(s)]
    return DataSource(kind, root, classes, {s: splits[s] for s in order}, val_split, reader=reader,
                      content_id=content_id, task=task)


def detect_task(rows: list, task: str, where: str) -> str:
    """The task of labelled rows [(label tuple, row name)]: multilabel when asked, or (auto) when any row holds
    several labels or none; single-label otherwise. Refuses --task single for rows that are not one label each."""
    if task not in TASKS:
        raise DinoprobeError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    odd = next(((labels, name) for labels, name in rows if len(labels) != 1), None)
    if task == "single" and odd is not None:
        raise DinoprobeError(f"{where}: {odd[1]} has {len(odd[0])} labels {list(odd[0])[:5]}, and --task single "
                             "takes exactly one per image; use --task multilabel (or auto)")
    return "multilabel" if task == "multilabel" or (task == "auto" and odd is not None) else "single"


def indicator(label_tuples: list, num_classes: int) -> np.ndarray:
    """(rows, classes) uint8, 1 where a row has the class: the cache's multi-label `labels`."""
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer(classes=list(range(num_classes)))
    return binarizer.fit_transform(label_tuples).astype(np.uint8).reshape(len(label_tuples), num_classes)
