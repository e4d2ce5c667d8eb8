"""Data sources beyond ImageFolder trees and CIFAR: CSV/TSV file lists, Hugging Face datasets (a save_to_disk
folder, hub-layout Parquet files, or `hf:OWNER/NAME[:CONFIG]`) and WebDataset tar shards.

Every source becomes a `DataSource`: per split an ordered list of (key, label), where the position is the cache's
`index`. Keys that are not files are read through the source's reader (key -> encoded bytes), so extraction,
resume (shards are fixed row ranges of that list), torchrun (ranks take shards) and skipping bad images work the
same for all of them, and the keys name the rows in the cache and in the skipped-inputs list.

How rows that are not files are read, in order, without loading everything into memory:
- Hugging Face datasets are Arrow tables, memory-mapped from disk: a row's image bytes are read when that row is
  extracted (Parquet files are first converted to Arrow by `datasets`, once, into its cache).
- Tar shards are indexed once with the standard library's `tarfile` (member names, byte offsets and sizes; labels
  from the small `cls`/`json` members); an image is then one seek and one read. The `webdataset` package reads
  shards as streams, which serves neither resuming at an arbitrary row nor ranks taking arbitrary shard ranges;
  an offset index serves both.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import socket
import tarfile
from pathlib import Path

from dinoprobe.data import DataSource, carve_val
from dinoprobe.errors import DinoprobeError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_COLUMNS = ("image", "img", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "category")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
HF_EXTRA = "pip install 'dinoprobe[hf]'  (Hugging Face's `datasets`)"


def _with_val(kind, root, classes, splits, val_fraction, seed, reader=None, content_id="") -> DataSource:
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


# ----------------------------------------------------------------------------------------------------- CSV
def csv_source(path: Path, val_fraction: float, seed: int) -> DataSource:
    """`path,label[,split]` rows (a header line names the columns); relative paths resolve against the file's
    folder; labels are class names; split is train, val (or validation) or test, train when absent."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter=delimiter))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DinoprobeError(f"{path}: expected a header with columns path,label (and optionally split), got "
                             f"{list(rows[0]) if rows else 'an empty file'}")
    classes = sorted({r["label"] for r in rows})
    if len(classes) < 2:
        raise DinoprobeError(f"{path}: {len(classes)} class(es) in the label column; a classifier needs at least 2")
    label_of = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list] = {}
    for number, row in enumerate(rows, start=2):
        split = SPLIT_NAMES.get((row.get("split") or "train").strip().lower())
        if split is None:
            raise DinoprobeError(f"{path}:{number}: split {row['split']!r} is not train, val or test")
        file = Path(row["path"])
        file = file if file.is_absolute() else path.parent / file
        splits.setdefault(split, []).append((str(file.resolve()), label_of[row["label"]]))
    return _with_val("csv", str(path.resolve()), classes, splits, val_fraction, seed)


# --------------------------------------------------------------------------------------- Hugging Face
def _datasets():
    try:
        import datasets
    except ImportError:
        raise DinoprobeError(f"reading Hugging Face datasets needs the optional extra: {HF_EXTRA}") from None
    return datasets


class HFReader:
    """hf:<name>:<split>:<row> -> the row's encoded image bytes, from memory-mapped Arrow tables."""

    def __init__(self, tables: dict, image_column: str):
        self.tables, self.image_column = tables, image_column

    def _cell(self, key: str) -> dict:
        _, split, row = key.rsplit(":", 2)
        return self.tables[split][int(row)][self.image_column]

    def read(self, key: str) -> bytes:
        cell = self._cell(key)
        if cell.get("bytes") is not None:
            return cell["bytes"]
        if cell.get("path") and os.path.isfile(cell["path"]):
            with open(cell["path"], "rb") as fh:
                return fh.read()
        return b""  # skipped as an empty image

    def size(self, key: str) -> int:
        return -1  # content is identified by the tables' files (content_id), not by reading every row


def _pick(names, wanted, preferred, what, option, available):
    if wanted is not None:
        if wanted not in available:
            raise DinoprobeError(f"no column {wanted!r} for {what} (columns: {sorted(available)}); fix {option}")
        return wanted
    for name in [*names, *preferred]:
        if name in available:
            return name
    raise DinoprobeError(f"cannot tell which column holds the {what} (columns: {sorted(available)}); "
                         f"name it with {option}")


def hf_source(spec: str, val_fraction: float, seed: int, image_column: str | None = None,
              label_column: str | None = None) -> DataSource:
    """A save_to_disk folder, a folder of hub-layout Parquet files, or hf:OWNER/NAME[:CONFIG] from the hub."""
    datasets = _datasets()
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        _hub_or_fail(name)
        try:
            loaded = datasets.load_dataset(name, config or None)
        except Exception as err:
            raise DinoprobeError(f"loading '{name}' from the Hugging Face Hub failed ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200]}); for a gated dataset accept its terms and run "
                                 "`hf auth login` (or set HF_TOKEN)") from None
        root, files = spec, []
    else:
        folder = Path(spec)
        parquet = sorted(folder.rglob("*.parquet"))
        if parquet:
            data_files: dict[str, list[str]] = {}
            for file in parquet:
                split = SPLIT_NAMES.get(re.split(r"[-_.]", file.name)[0].lower())
                if split:
                    data_files.setdefault({"val": "validation"}.get(split, split), []).append(str(file))
            if not data_files:
                raise DinoprobeError(f"{folder}: Parquet files must be named like the hub's, train-*.parquet, "
                                     "validation-*.parquet, test-*.parquet")
            loaded = datasets.load_dataset("parquet", data_files=data_files)
            files = parquet
        else:
            loaded = datasets.load_from_disk(str(folder))
            files = sorted(p for p in folder.rglob("*.arrow"))
        root = str(folder.resolve())
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    tables = {}
    for split_name, table in loaded.items():
        split = SPLIT_NAMES.get(split_name.lower())
        if split is None:
            continue  # e.g. "unsupervised": not a labelled split
        tables[split] = table
    if "train" not in tables:
        raise DinoprobeError(f"{spec}: no train split (splits: {sorted(loaded)})")
    features = tables["train"].features
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    image_column = _pick(images, image_column, IMAGE_COLUMNS, "images", "--image-column", features)
    label_column = _pick(labels, label_column, LABEL_COLUMNS, "labels", "--label-column", features)
    feature = features[label_column]
    values = {split: table[label_column] for split, table in tables.items()}
    if isinstance(feature, datasets.ClassLabel):
        classes, to_index = list(feature.names), int
    else:
        classes = sorted({str(v) for vs in values.values() for v in vs})
        position = {name: i for i, name in enumerate(classes)}
        to_index = lambda v: position[str(v)]  # noqa: E731
    splits = {split: [(f"hf:{root}:{split}:{row}", to_index(v)) for row, v in enumerate(vs)]
              for split, vs in values.items()}
    tables = {split: t.cast_column(image_column, datasets.Image(decode=False)).select_columns([image_column])
              for split, t in tables.items()}
    content = hashlib.sha256()
    for file in files:  # the data files' names and sizes identify the content, as file sizes do for folders
        content.update(f"{Path(file).name}\t{Path(file).stat().st_size}\n".encode())
    content.update(f"{spec}\t{image_column}\t{label_column}\t{getattr(loaded, '_fingerprint', '')}".encode())
    return _with_val("hf", root, classes, splits, val_fraction, seed, HFReader(tables, image_column),
                     content.hexdigest())


def _hub_or_fail(name: str, timeout: float = 3.0) -> None:
    """Offline, fail within seconds with advice rather than after the hub client's retries."""
    from huggingface_hub import constants

    host = re.sub(r"^https?://", "", constants.ENDPOINT).split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        raise DinoprobeError(f"cannot reach the Hugging Face Hub to download '{name}' (offline?); on a connected "
                             f"machine run datasets.load_dataset('{name}').save_to_disk('FOLDER') and pass "
                             "--data FOLDER") from None


# ------------------------------------------------------------------------------------------- WebDataset
def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: {000..099} (zero-padded ranges) and {a,b,c}, possibly several."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        width = len(rng.group(1))
        items = [str(i).zfill(width) for i in range(int(rng.group(1)), int(rng.group(2)) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for item in items for p in expand_braces(head + item + tail)]


class TarReader:
    """<tar path>#<key> -> the image member's bytes, by its offset in the tar: one seek, one read."""

    def __init__(self, index: dict[str, tuple[str, int, int]]):
        self.index = index

    def read(self, key: str) -> bytes:
        tar, offset, size = self.index[key]
        with open(tar, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def size(self, key: str) -> int:
        return self.index[key][2]


def _index_tar(path: str, label_field: str) -> list[tuple[str, tuple[str, int, int], object]]:
    """(key, (tar, offset, size) of its image, label) per sample, in the tar's order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, base = os.path.split(member.name)
            stem, _, ext = base.partition(".")
            key = os.path.join(directory, stem)
            entry = samples.setdefault(key, {})
            ext = ext.lower()
            if ext in TAR_IMAGE_EXTENSIONS:
                entry["image"] = (path, member.offset_data, member.size)
            elif ext == "cls":
                entry["label"] = int(tar.extractfile(member).read().decode().strip())
            elif ext == "json":
                record = json.loads(tar.extractfile(member).read())
                if label_field not in record:
                    raise DinoprobeError(f"{path}: {member.name} has no field {label_field!r}; name the label field "
                                         "with --label-column")
                entry["label"] = record[label_field]
    out = []
    for key, entry in samples.items():
        if "image" not in entry:
            continue  # a sample without an image member (jpg|jpeg|png|webp) is not an input
        if "label" not in entry:
            raise DinoprobeError(f"{path}: sample {key} has no label (a .cls member, or a .json member with "
                                 f"{label_field!r})")
        out.append((f"{path}#{key}", entry["image"], entry["label"]))
    return out


def webdataset_source(spec: str, val_fraction: float, seed: int, label_field: str | None = None) -> DataSource:
    """A folder whose train/, val/, test/ subfolders hold .tar shards, or `train=PATTERN;val=PATTERN` with
    brace patterns for shards elsewhere."""
    if Path(spec).is_dir():
        shards = {split: sorted(str(p.resolve()) for p in (Path(spec) / split).glob("*.tar"))
                  for split in ("train", "val", "test") if (Path(spec) / split).is_dir()}
        root = str(Path(spec).resolve())
    else:
        shards, root = {}, spec
        for part in spec.split(";"):
            split, _, pattern = part.partition("=")
            if SPLIT_NAMES.get(split.strip()) is None or not pattern:
                raise DinoprobeError(f"--data {spec!r}: expected train=PATTERN;val=PATTERN;test=PATTERN")
            shards[SPLIT_NAMES[split.strip()]] = [str(Path(p).resolve()) for p in expand_braces(pattern.strip())]
    missing = [p for files in shards.values() for p in files if not os.path.isfile(p)]
    if missing:
        raise DinoprobeError(f"tar shards not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    field = label_field or "label"
    indexed = {split: [s for tar in files for s in _index_tar(tar, field)] for split, files in shards.items()}
    names = sorted({str(label) for samples in indexed.values() for _, _, label in samples},
                   key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    if all(n.lstrip("-").isdigit() for n in names):  # integer labels: classes 0..max, as written
        classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
    else:
        classes = names
    position = {name: i for i, name in enumerate(classes)}
    splits = {split: [(key, position[str(label)]) for key, _, label in samples] for split, samples in indexed.items()}
    reader = TarReader({key: where for samples in indexed.values() for key, where, _ in samples})
    return _with_val("webdataset", root, classes, splits, val_fraction, seed, reader)


def is_webdataset(spec: str) -> bool:
    path = Path(spec)
    if path.is_dir():
        return any((path / split).is_dir() and any((path / split).glob("*.tar")) for split in ("train", "val", "test"))
    return "=" in spec and ".tar" in spec


def is_hf_folder(path: Path) -> bool:
    """A save_to_disk folder (dataset_dict.json or state.json), or hub-layout Parquet files (not in train/)."""
    if not path.is_dir():
        return False
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    return saved or (not (path / "train").is_dir() and any(path.rglob("*.parquet")))
