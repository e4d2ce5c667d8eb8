"""ImageFolder trees (ROOT/train/<class>/*, optional val/ and test/) and CIFAR-10/100."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.datasource import SPLIT_NAMES, SPLITS, DataSource, with_val
from dinoprobe.imagefiles import describe_ignored, list_images
from dinoprobe.network import reachable
from dinoprobe.paths import resolved
from dinoprobe.splits import carve_val

CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _classes_of(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def split_folders(root: Path) -> dict[str, Path]:
    """{split: folder} for ROOT's split folders, by any of the names SPLIT_NAMES accepts (val/, valid/,
    validation/, ...). Any other folder is refused rather than silently ignored."""
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        split = SPLIT_NAMES.get(entry.name.lower())
        if split is None:
            raise DinoprobeError(f"'{entry}' is not a split folder; ROOT holds train/ and optionally val/ (or "
                                 f"valid/, validation/) and test/; move or rename '{entry.name}'")
        if split in found:
            raise DinoprobeError(f"'{root}' has two {split} folders, {found[split].name}/ and {entry.name}/; keep one")
        found[split] = entry
    return found


def folder_source(root: Path, val_fraction: float, seed: int) -> DataSource:
    if not root.is_dir():
        raise DinoprobeError(f"--data '{root}' is not a folder (expected ROOT/train/<class>/*.jpg), a .csv/.tsv "
                             "file list, hf:OWNER/NAME, tar shards, nor one of: cifar10, cifar100")
    folders = split_folders(root)
    if not folders:
        raise DinoprobeError(f"'{root}' has no train/ folder; expected ROOT/train/<class>/*, optional ROOT/val/ "
                             "and ROOT/test/ (a set to score a trained head on: ROOT/test/<class>/* alone)")
    first = next(folders[s] for s in SPLITS if s in folders)  # train/, or an evaluation set's val/ or test/
    classes = _classes_of(first)
    if len(classes) < (2 if "train" in folders else 1):
        raise DinoprobeError(f"'{first}' has {len(classes)} class folder(s); a classifier needs at "
                             "least 2 (one sub-folder of images per class)")
    splits: dict[str, list[tuple[str, int]]] = {}
    ignored = Counter()
    for split in SPLITS:
        split_dir = folders.get(split)
        if split_dir is None:
            continue
        found = _classes_of(split_dir)
        if found != classes:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise DinoprobeError(f"classes in {split_dir.name}/ differ from {first.name}/: "
                                 + "; ".join(p for p in (f"only in {split_dir.name}/: {extra}" if extra else "",
                                                         f"missing from {split_dir.name}/: {missing}" if missing
                                                         else "") if p))
        splits[split] = [(os.path.abspath(p), label)
                         for label, name in enumerate(classes) for p in list_images(split_dir / name, ignored)]
        if split == "train":
            present = {label for _, label in splits[split]}
            empty = [name for label, name in enumerate(classes) if label not in present]
            if empty:
                raise DinoprobeError(f"train/ classes with no images: {empty}; add images to them or remove those "
                                     f"folders{f' ({describe_ignored(ignored)})' if ignored else ''}")
    source = with_val("folder", str(resolved(root)), classes, splits, val_fraction, seed)
    source.ignored.update(ignored)
    return source


# -------------------------------------------------------------------------------------------------- CIFAR
def cifar_source(name: str, data_dir: str, val_fraction: float, seed: int) -> DataSource:
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
    return DataSource(name, str(resolved(data_dir)), classes, splits, val_split, arrays)


def _download_cifar(cls, name: str, data_dir: str, train: bool):
    hint = (f"on an offline machine copy the python-version archive (e.g. cifar-10-python.tar.gz) into "
            f"'{data_dir}' or pass --data-dir")
    problem = reachable(cls.url)  # torchvision's download has no timeout
    if problem:
        raise DinoprobeError(f"{name} is not in '{data_dir}' and {problem}; {hint}") from None
    try:
        return cls(data_dir, train=train, download=True)
    except Exception as err:
        raise DinoprobeError(f"{name} is not in '{data_dir}' and downloading it failed ({type(err).__name__}: "
                             f"{str(err)[:120]}); {hint}") from None
