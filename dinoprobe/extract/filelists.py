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
import os
import re
import tarfile
import warnings
from pathlib import Path

from dinoprobe import documents
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.datasource import SPLIT_NAMES, SPLITS, DataSource, detect_task, with_val
from dinoprobe.imagefiles import SkippedInput
from dinoprobe.network import hub_endpoint, reachable
from dinoprobe.paths import resolved

IMAGE_COLUMNS = ("image", "img", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "category")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
HF_EXTRA = "pip install 'dinoprobe[hf]'  (Hugging Face's `datasets`)"


# ----------------------------------------------------------------------------------------------------- CSV
def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV/TSV file as spreadsheets write them: UTF-8 (with or without a byte-order mark) or,
    failing that, Latin-1; the delimiter that csv.Sniffer finds among , ; tab and | (tab for .tsv when in doubt)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # every byte is a Latin-1 character: the file reads, names may look odd
    fallback = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        delimiter = csv.Sniffer().sniff(text[:65536], delimiters=",;\t|").delimiter
    except csv.Error:
        delimiter = fallback
    try:
        table = [row for row in csv.reader(text.splitlines(), delimiter=delimiter) if any(c.strip() for c in row)]
    except csv.Error as err:  # e.g. a cell over the csv module's 128 KiB field limit: not a file list
        raise DinoprobeError(f"{path}: not a readable CSV/TSV file list ({err}); expected path,label[,split] "
                             "rows") from None
    if not table:
        raise DinoprobeError(f"{path}: an empty file; expected a header line naming path and label columns")
    return [cell.strip() for cell in table[0]], table[1:]


def csv_source(path: Path, val_fraction: float, seed: int, task: str = "auto", label_sep: str | None = None
               ) -> DataSource:
    """`path,label[,split]` rows (a header line names the columns, in any case); relative paths resolve against the
    file's folder; labels are class names; split is train, val (or valid, validation) or test, train when empty.

    Multi-label: with `label_sep` a label cell holds several names (`cat|dog`) and an empty cell is an image with
    no label; the task is multilabel when asked, or (task auto) when some row has other than one label."""
    header, table = read_table(path)
    columns = {name.lower(): i for i, name in enumerate(header)}
    if not {"path", "label"} <= set(columns):
        raise DinoprobeError(f"{path}: expected a header with columns path and label (and optionally split), got "
                             f"{header}; rename the columns in the first line")
    if not table:
        raise DinoprobeError(f"{path}: the header has no rows under it; list one image per line")
    if label_sep is not None and (not label_sep or label_sep.strip() != label_sep or label_sep == ","):
        raise DinoprobeError(f"--label-sep {label_sep!r}: use one visible character that is not the file's "
                             "delimiter, e.g. '|' or ';'")
    rows = []
    for number, cells in enumerate(table, start=2):
        if len(cells) != len(header):
            raise DinoprobeError(f"{path}:{number}: {len(cells)} cell(s) where the header has {len(header)} "
                                 f"({', '.join(header)}); fix that line")
        row = {name: cells[i].strip() for name, i in columns.items()}
        if not row["path"]:
            raise DinoprobeError(f"{path}:{number}: a row without a path; every image needs one")
        cell = row["label"]
        names = [n.strip() for n in cell.split(label_sep)] if label_sep else [cell]
        rows.append((number, row, tuple(dict.fromkeys(n for n in names if n))))
    if label_sep and not any(label_sep in row["label"] for _, row, _ in rows):
        warnings.warn(f"{path}: --label-sep {label_sep!r} never occurs in the label column; every image has at most "
                      "one label", stacklevel=2)
    unlabelled = next((number for number, _, names in rows if not names), None)
    if unlabelled is not None and task != "multilabel" and not label_sep:
        raise DinoprobeError(f"{path}:{unlabelled}: a row without a label; every image needs one (for multi-label "
                             "data, where an image may have none, pass --task multilabel and --label-sep)")
    task = detect_task([(names, f"line {number}") for number, _, names in rows], task, str(path))
    classes = sorted({name for _, _, names in rows for name in names})
    if len(classes) < 2:
        raise DinoprobeError(f"{path}: the label column holds only {classes}; a classifier needs at least 2 classes")
    label_of = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list] = {}
    resolve, folder = FileResolver(), str(path.parent)
    for number, row, names in rows:
        split = SPLIT_NAMES.get((row.get("split") or "train").lower())
        if split is None:
            raise DinoprobeError(f"{path}:{number}: split {row['split']!r} is not train, val or test")
        label = tuple(sorted(label_of[n] for n in names)) if task == "multilabel" else label_of[names[0]]
        # an absolute path replaces the folder in the join
        splits.setdefault(split, []).append((resolve(os.path.join(folder, row["path"])), label))
    return with_val("csv", str(resolved(path)), classes, splits, val_fraction, seed, task=task)


class FileResolver:
    """`str(Path(file).resolve())`, with each folder resolved once. Resolving walks every component of the path with
    an lstat, which dominated reading a long file list (ImageNet's is 1.28 M rows); the folder's real path joined
    with the name is the same path unless the name itself is a symlink, which one lstat tells. Strings, not Path
    objects: pathlib's parsing per row cost as much again."""

    def __init__(self):
        self.folders: dict[str, str] = {}

    def __call__(self, file: str) -> str:
        folder, name = os.path.split(file)
        if name in ("", ".", "..") or os.path.islink(file):
            return os.path.realpath(file)
        real = self.folders.get(folder)
        if real is None:
            real = self.folders[folder] = os.path.realpath(folder or ".")
        return os.path.join(real, name)


# --------------------------------------------------------------------------------------- Hugging Face
def _datasets():
    try:
        import datasets
    except ImportError:
        raise DinoprobeError(f"reading Hugging Face datasets needs the optional extra: {HF_EXTRA}") from None
    return datasets


class HFReader:
    """hf:<name>:<split>:<row> -> the row's encoded image bytes, from memory-mapped Arrow tables."""

    def __init__(self, tables: dict, image_column: str, unlabelled: set[str] = frozenset()):
        self.tables, self.image_column, self.unlabelled = tables, image_column, set(unlabelled)

    def _cell(self, key: str) -> dict | None:
        _, split, row = key.rsplit(":", 2)
        return self.tables[split][int(row)][self.image_column]

    def read(self, key: str) -> bytes:
        if key in self.unlabelled:
            raise SkippedInput("unlabelled row (label -1): nothing to train or score on")
        cell = self._cell(key)
        if not cell:
            raise SkippedInput("the row has no image (None)")
        if cell.get("bytes") is not None:
            return cell["bytes"]
        if cell.get("path") and os.path.isfile(cell["path"]):
            with open(cell["path"], "rb") as fh:
                return fh.read()
        raise SkippedInput(f"the row's image has neither bytes nor a readable file ({cell.get('path')!r})")

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
              label_column: str | None = None, task: str = "auto") -> DataSource:
    """A save_to_disk folder, a folder of hub-layout Parquet files, or hf:OWNER/NAME[:CONFIG] from the hub. A label
    column of lists (Sequence/List of ClassLabel or of names) is multi-label data."""
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
        root = str(resolved(folder))
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    tables = {}
    for split_name, table in loaded.items():
        split = SPLIT_NAMES.get(split_name.lower())
        if split is None:
            continue  # e.g. "unsupervised": not a labelled split
        tables[split] = table
    if not tables:
        raise DinoprobeError(f"{spec}: no train, validation or test split (splits: {sorted(loaded)})")
    features = next(tables[s] for s in SPLITS if s in tables).features  # train's, or an evaluation set's
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)
              or isinstance(getattr(f, "feature", None), datasets.ClassLabel)]
    image_column = _pick(images, image_column, IMAGE_COLUMNS, "images", "--image-column", features)
    label_column = _pick(labels, label_column, LABEL_COLUMNS, "labels", "--label-column", features)
    if isinstance(features[image_column], datasets.Value):
        raise DinoprobeError(f"column {image_column!r} holds {features[image_column].dtype} values, not images; name "
                             f"the image column with --image-column (columns: {sorted(features)})")
    feature = features[label_column]
    values = {split: table[label_column] for split, table in tables.items()}
    # a list column (Sequence/List of ClassLabel or of names) is multi-label: each row a list of classes
    inner = getattr(feature, "feature", None) if not isinstance(feature, (datasets.ClassLabel, datasets.Value)) else None
    listed = inner is not None
    names_of = inner if listed else feature
    unlabelled = {f"hf:{root}:{split}:{row}" for split, vs in values.items() for row, v in enumerate(vs)
                  if v is None or (not listed and isinstance(feature, datasets.ClassLabel) and v == -1)}
    as_list = (lambda v: list(v)) if listed else (lambda v: [v])  # noqa: E731
    if isinstance(names_of, datasets.ClassLabel):
        classes, to_index = list(names_of.names), int
    else:
        classes = sorted({str(x) for vs in values.values() for v in vs if v is not None for x in as_list(v)})
        position = {name: i for i, name in enumerate(classes)}
        to_index = lambda v: position[str(v)]  # noqa: E731
    rows = [(tuple(as_list(v)), f"{split} row {row}") for split, vs in values.items() for row, v in enumerate(vs)
            if f"hf:{root}:{split}:{row}" not in unlabelled]
    if listed and any(x is None or (isinstance(names_of, datasets.ClassLabel) and not 0 <= x < len(classes))
                      for labels, _ in rows for x in labels):
        raise DinoprobeError(f"{spec}: column {label_column!r} holds a label outside its {len(classes)} class names "
                             "(or None); fix those rows")
    task = detect_task(rows, task, spec)

    def label(v):
        if task == "multilabel":
            return tuple(sorted({to_index(x) for x in as_list(v)}))
        return to_index(as_list(v)[0])

    # unlabelled rows keep their place (their `index`) and are skipped at extraction with the reason, as unreadable
    # images are; their placeholder class is never stored
    splits = {split: [(key, (() if task == "multilabel" else 0) if key in unlabelled else label(v))
                      for row, v in enumerate(vs) for key in [f"hf:{root}:{split}:{row}"]]
              for split, vs in values.items()}
    tables = {split: t.cast_column(image_column, datasets.Image(decode=False)).select_columns([image_column])
              for split, t in tables.items()}
    content = hashlib.sha256()
    for file in files:  # the data files' names and sizes identify the content, as file sizes do for folders
        content.update(f"{Path(file).name}\t{Path(file).stat().st_size}\n".encode())
    content.update(f"{spec}\t{image_column}\t{label_column}\t{getattr(loaded, '_fingerprint', '')}".encode())
    return with_val("hf", root, classes, splits, val_fraction, seed, HFReader(tables, image_column, unlabelled),
                    content.hexdigest(), task)


def _hub_or_fail(name: str) -> None:
    """Offline, fail within seconds with advice rather than after the hub client's retries."""
    problem = reachable(hub_endpoint())
    if problem:
        raise DinoprobeError(f"cannot reach the Hugging Face Hub to download '{name}': {problem} (offline?); on a connected "
                             f"machine run datasets.load_dataset('{name}').save_to_disk('FOLDER') and pass "
                             "--data FOLDER") from None


# ------------------------------------------------------------------------------------------- WebDataset
MAX_SHARDS = 100_000  # shard names one pattern may expand to


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: {000..099} (zero-padded ranges) and {a,b,c}, possibly several; refused when
    they would name more than MAX_SHARDS files (counted before any is built)."""
    groups = []
    for body in re.findall(r"\{([^{}]*)\}", pattern):
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        groups.append(max(0, int(rng.group(2)) - int(rng.group(1)) + 1) if rng else len(body.split(",")))
    total = 1
    for count in groups:
        total *= count
        if total > MAX_SHARDS:
            raise DinoprobeError(f"the pattern {pattern!r} names more than {MAX_SHARDS:,} shards; check its ranges")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
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
    return [p for item in items for p in _expand(head + item + tail)]


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
    """(key, (tar, offset, size) of its image, label) per sample, in the tar's order. A shard that is not an
    uncompressed tar, a truncated one, a key used twice, or a label that cannot be read is refused naming it."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                stem, _, ext = base.partition(".")
                key = os.path.join(directory, stem)
                entry = samples.setdefault(key, {})
                ext = ext.lower()
                kind = "image" if ext in TAR_IMAGE_EXTENSIONS else "label" if ext in ("cls", "json") else None
                if kind is None:
                    continue
                if kind in entry:
                    raise DinoprobeError(f"{path}: sample key {key!r} appears twice (a second {ext} member); "
                                         "every sample needs its own key — rename one of them")
                if kind == "image":
                    entry["image"] = (path, member.offset_data, member.size)
                elif member.size > 1 << 20:
                    raise DinoprobeError(f"{path}: {member.name} is {member.size:,} bytes; a label member is small")
                else:
                    entry["label"] = _read_label(path, member, tar.extractfile(member).read(), ext, label_field)
    except tarfile.ReadError as err:
        if "unexpected end of data" in str(err):
            raise DinoprobeError(f"{path}: truncated tar ({err}); copy the shard again") from None
        hint = " (gzip-compressed shards are not supported: decompress them)" if _is_gzip(path) else ""
        raise DinoprobeError(f"{path}: not a readable uncompressed tar ({err}){hint}") from None
    except (EOFError, OSError) as err:
        raise DinoprobeError(f"{path}: truncated or unreadable tar ({type(err).__name__}: {err}); copy the shard "
                             "again") from None
    out = []
    for key, entry in samples.items():
        if "image" not in entry:
            continue  # a sample without an image member (jpg|jpeg|png|webp) is not an input
        if "label" not in entry:
            raise DinoprobeError(f"{path}: sample {key} has no label (a .cls member, or a .json member with "
                                 f"{label_field!r})")
        out.append((f"{path}#{key}", entry["image"], entry["label"]))
    return out


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _read_label(path: str, member, data: bytes, ext: str, label_field: str):
    """A sample's label: a non-negative integer in a .cls member, or a field of a .json member (a class name or a
    non-negative integer)."""
    where = f"{path}: {member.name}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DinoprobeError(f"{where} is not UTF-8 text; a label member holds a class index or JSON") from None
    if ext == "cls":
        if not re.fullmatch(r"\s*\d+\s*", text):
            raise DinoprobeError(f"{where} holds {text.strip()[:40]!r}; a .cls member holds a non-negative class "
                                 "index (put class names in a .json member's label field)")
        return int(text)
    record = documents.parse(text, where, "a label member holds a class index or JSON")
    if not isinstance(record, dict) or label_field not in record:
        raise DinoprobeError(f"{where} has no field {label_field!r}; name the label field with --label-column")
    label = record[label_field]
    if isinstance(label, list):  # multi-label: a list of class names or indices (possibly empty)
        if len(label) > 100_000:
            raise DinoprobeError(f"{where}: {len(label):,} labels in one sample")
        return tuple(_check_label(where, v) for v in label)
    return _check_label(where, label)


def _check_label(where: str, label):
    if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, int) and label < 0):
        raise DinoprobeError(f"{where}: label {label!r} is not a class name or a non-negative class index")
    return label


def webdataset_source(spec: str, val_fraction: float, seed: int, label_field: str | None = None,
                      task: str = "auto") -> DataSource:
    """A folder whose train/, val/, test/ subfolders hold .tar shards, or `train=PATTERN;val=PATTERN` with
    brace patterns for shards elsewhere. A .json label field holding a list makes the sample multi-label."""
    if Path(spec).is_dir():
        shards = {split: sorted(str(resolved(p)) for p in (Path(spec) / split).glob("*.tar"))
                  for split in ("train", "val", "test") if (Path(spec) / split).is_dir()}
        root = str(resolved(spec))
    else:
        shards, root = {}, spec
        for part in spec.split(";"):
            split, _, pattern = part.partition("=")
            if SPLIT_NAMES.get(split.strip()) is None or not pattern:
                raise DinoprobeError(f"--data {spec!r}: expected train=PATTERN;val=PATTERN;test=PATTERN")
            shards[SPLIT_NAMES[split.strip()]] = [str(resolved(p)) for p in expand_braces(pattern.strip())]
    missing = [p for files in shards.values() for p in files if not os.path.isfile(p)]
    if missing:
        raise DinoprobeError(f"tar shards not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    field = label_field or "label"
    indexed = {split: [s for tar in files for s in _index_tar(tar, field)] for split, files in shards.items()}
    as_tuple = lambda label: label if isinstance(label, tuple) else (label,)  # noqa: E731
    task = detect_task([(as_tuple(label), key) for samples in indexed.values() for key, _, label in samples], task,
                      spec)
    names = sorted({str(x) for samples in indexed.values() for _, _, label in samples for x in as_tuple(label)},
                   key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    rows = sum(len(samples) for samples in indexed.values())
    if names and all(n.isdigit() for n in names):  # integer labels: classes 0..max, as written
        top = max(int(n) for n in names)
        if top >= max(rows, 1) * 10:  # a class index far beyond the rows is a corrupt label, not a class list
            raise DinoprobeError(f"{spec}: class index {top} with only {rows} samples; the .cls members hold "
                                 "class indices 0..C-1 — check the shards' labels")
        classes = [str(i) for i in range(top + 1)]
    else:
        classes = names
    position = {name: i for i, name in enumerate(classes)}

    def encode(label):
        if task == "multilabel":
            return tuple(sorted({position[str(x)] for x in as_tuple(label)}))
        return position[str(as_tuple(label)[0])]

    splits = {split: [(key, encode(label)) for key, _, label in samples] for split, samples in indexed.items()}
    reader = TarReader({key: where for samples in indexed.values() for key, where, _ in samples})
    return with_val("webdataset", root, classes, splits, val_fraction, seed, reader, task=task)


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
