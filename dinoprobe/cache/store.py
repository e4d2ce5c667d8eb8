"""The feature cache: HDF5 shards per split plus a JSON manifest that fingerprints how they were made.

Layout (the contract every later stage and users' own scripts read)::

    CACHE/manifest.json            fingerprint, classes, per-split shards (rows, sha256) and skipped inputs
    CACHE/<split>/shard-NNNNN.h5   cls (N,D), patch_mean (N,D), label (N,), index (N,), path (N,) utf-8

A multi-label cache (manifest "task": "multilabel") holds `labels` (N, classes) uint8, 1 where the image has the
class, instead of `label`; single-label caches keep the format above.

Shard NNNNN covers inputs [NNNNN*shard_size, (NNNNN+1)*shard_size) of its split's file list, so what a shard
holds does not depend on who computed it. A shard is written under a temporary name and renamed when complete,
then recorded in the manifest (itself replaced atomically): a crash loses at most the shards in flight.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from dinoprobe import documents
from dinoprobe.atomic import write_bytes, write_json
from dinoprobe.cache.specs import select, width
from dinoprobe.errors import DinoprobeError
from dinoprobe.paths import resolved

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT_VERSION = 1
FEATURE_KINDS = ("cls", "patch_mean")
BLOCK_KINDS = ("cls_blocks",)  # (N, B, D): the CLS token of each of the last B blocks (--last-blocks B)
VIEW_KINDS = ("cls_views", "patch_mean_views")  # (N, K, D): K augmented views per train image (--views K)


def split_rows(manifest: dict) -> dict[str, int]:
    """Rows stored per split, from the manifest's shard entries."""
    return {split: sum(s["rows"] for s in info["shards"]) for split, info in manifest["splits"].items()}


def label_column(manifest: dict) -> str:
    """The shards' label dataset: `label` (N,) class indices, or `labels` (N, classes) 0/1 for multi-label caches."""
    return "labels" if manifest.get("task") == "multilabel" else "label"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def shard_file(split: str, number: int) -> str:
    return f"{split}/shard-{number:05d}.h5"


SHARD_FILE = re.compile(r"(train|val|test)/shard-\d{5}\.h5")


def shard_path(cache_dir: str | Path, file: str) -> Path:
    """The shard a manifest entry names, refused unless it is `<split>/shard-NNNNN.h5` inside the cache itself (a
    hand-edited manifest could point anywhere: ../other/..., /etc/passwd, or a symlink out of the cache)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / str(file)
    if not isinstance(file, str) or not SHARD_FILE.fullmatch(file) or \
            not resolved(path).is_relative_to(resolved(cache_dir)):
        raise DinoprobeError(f"cache {cache_dir}: manifest entry {file!r} points outside the cache (shards are "
                             "<split>/shard-NNNNN.h5 inside it); the manifest was edited — rebuild with --overwrite")
    return path


def fingerprint_sha256(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def fingerprint_differences(have: dict, want: dict, prefix: str = "") -> list[str]:
    """Human-readable list of the fields in which two fingerprints differ."""
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            short = lambda v: (v[:12] + "…") if isinstance(v, str) and len(v) > 40 else v  # noqa: E731
            out.append(f"{prefix}{key}: cache has {short(a)!r}, requested {short(b)!r}")
    return out


# --------------------------------------------------------------------------------------------- manifest io
def read_manifest(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    fix = "rebuild the cache with `dinoprobe features ... --overwrite`"
    try:
        text = path.read_bytes()
    except OSError as err:
        raise DinoprobeError(f"{path} is unreadable ({err}); {fix}") from None
    manifest = documents.parse(text, str(path), fix)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise DinoprobeError(f"{path} is not a dinoprobe v{FORMAT_VERSION} manifest; {fix}")
    documents.check(manifest, "manifest", str(path), fix)
    return manifest


def new_manifest(fingerprint: dict, classes: list[str], splits: dict[str, int], shard_size: int,
                 extra: dict | None = None) -> dict:
    return {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_sha256": fingerprint_sha256(fingerprint),
        "classes": list(classes),
        "shard_size": int(shard_size),
        "splits": {name: {"num_inputs": int(n), "complete": False, "shards": []} for name, n in splits.items()},
        "created": now(),
        "updated": now(),
        **(extra or {}),
    }


# ------------------------------------------------------------------------------------------------- shards
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_shard(cache_dir: Path, split: str, number: int, start: int, stop: int, rows: dict[str, np.ndarray],
                dtype: str, skipped: list[dict]) -> dict:
    """Write one complete shard atomically and return its manifest entry."""
    final = Path(cache_dir) / shard_file(split, number)
    image = shard_image(split, start, stop, rows, dtype)
    # HDF5 builds the file in memory and Python's own writes put it on disk: HDF5 writing a file itself meets a full
    # disk inside its C library (h5py then prints errors it cannot raise and the process may segfault at exit),
    # while a plain write raises OSError — one clear line, and the partial temporary file is removed
    write_bytes(final, image)
    entry = {"file": shard_file(split, number), "start": start, "stop": stop, "rows": len(rows["index"]),
             "bytes": len(image), "sha256": hashlib.sha256(image).hexdigest(), "skipped": skipped}
    # the entry also lives beside the shard, so a shard finished by any process (another torchrun rank, or a run
    # killed between this rename and its manifest update) can be adopted into the manifest later
    write_json(final.with_suffix(".json"), entry)
    return entry


def shard_image(split: str, start: int, stop: int, rows: dict[str, np.ndarray], dtype: str) -> memoryview:
    """The bytes of one shard's HDF5 file."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as fh:
        for kind in (*FEATURE_KINDS, *BLOCK_KINDS, *VIEW_KINDS):
            if kind in rows:
                fh.create_dataset(kind, data=rows[kind].astype(dtype, copy=False))
        if "labels" in rows:  # multi-label: (N, classes) 0/1
            fh.create_dataset("labels", data=rows["labels"].astype(np.uint8, copy=False))
        else:
            fh.create_dataset("label", data=rows["label"].astype(np.int64, copy=False))
        fh.create_dataset("index", data=rows["index"].astype(np.int64, copy=False))
        fh.create_dataset("path", data=np.asarray(rows["path"], dtype=object), dtype=h5py.string_dtype("utf-8"))
        fh.attrs.update({"split": split, "start": start, "stop": stop, "format": FORMAT_VERSION})
    return buffer.getbuffer()


def adopt_finished_shards(cache_dir: Path, manifest: dict) -> int:
    """Record in the manifest every finished shard (h5 + matching sidecar entry) it does not list yet."""
    adopted = 0
    for split, info in manifest["splits"].items():
        known = {s["file"] for s in info["shards"]}
        for sidecar in sorted((Path(cache_dir) / split).glob("shard-*.json")):
            if f"{split}/{sidecar.with_suffix('.h5').name}" in known:
                continue
            entry = finished_entry(Path(cache_dir), sidecar.with_suffix(".h5"))
            if entry is not None:
                info["shards"].append(entry)
                adopted += 1
        info["shards"].sort(key=lambda s: s["start"])
    return adopted


def finished_entry(cache_dir: Path, shard: Path, check_hash: bool = True) -> dict | None:
    """The sidecar entry of a finished shard (its file, size and sha256 as the entry records them), else None."""
    entry_file = f"{shard.parent.name}/{shard.name}"
    try:
        entry = documents.parse(shard.with_suffix(".json").read_bytes(), "sidecar", "")
        size = shard.stat().st_size
    except (OSError, DinoprobeError):
        return None
    if documents.problem(entry, "shard") or entry["file"] != entry_file or size != entry["bytes"]:
        return None
    return entry if not check_hash or sha256_file(shard) == entry.get("sha256") else None


def read_shard(path: Path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as fh:
        return _columns(fh, path, columns)


def _columns(fh: h5py.File, path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for col in columns:
        if col not in fh:
            raise DinoprobeError(f"{path} has no '{col}' dataset (has {sorted(fh)})")
        if problem := not_stored_in_full(fh[col]):
            raise DinoprobeError(f"{path}: '{col}' {problem}; rebuild the cache with `dinoprobe features`")
        out[col] = fh[col].asstr()[...] if col == "path" else fh[col][...]
    return out


def layout_problem(fh: h5py.File, manifest: dict, split: str) -> str | None:
    """How a shard's datasets depart from what `features` writes for this manifest — each present, one row per
    input, features (rows, D) floats, labels integers, paths strings — or None. A shard from other hands with
    integer features, float labels or the wrong width would otherwise train silently or fail deep inside numpy."""
    dim = manifest.get("feature_dim")
    if dim is None and "cls" in fh and len(fh["cls"].shape) == 2:  # caches from before feature_dim was recorded
        dim = fh["cls"].shape[1]
    label, classes = label_column(manifest), len(manifest["classes"])
    view_info = manifest["fingerprint"].get("views", {})
    blocks = manifest.get("last_blocks", 0)
    views = view_info.get("count", 0) if view_info.get("split") == split else 0  # views of the train split only
    want = {"cls": ("floats", (dim,)), "patch_mean": ("floats", (dim,)),
            label: ("integers", (classes,) if label == "labels" else ()), "index": ("integers", ()),
            "path": ("strings", ()),
            **({"cls_blocks": ("floats", (blocks, dim))} if blocks else {}),
            **({k: ("floats", (views, dim)) for k in VIEW_KINDS} if views else {})}
    rows = None
    for name, (kind, tail) in want.items():
        if name not in fh:
            return f"no '{name}' dataset (a {'multi' if label == 'labels' else 'single'}-label cache of {classes} classes)"
        data = fh[name]
        if not isinstance(data, h5py.Dataset):
            return f"'{name}' is not a dataset"
        fits = {"floats": data.dtype.kind == "f", "integers": data.dtype.kind in "iub",
                "strings": h5py.check_string_dtype(data.dtype) is not None}[kind]
        if not fits:
            return f"'{name}' holds {data.dtype}, not {kind}"
        rows = data.shape[0] if rows is None and data.ndim else rows
        if data.shape != (rows, *tail):
            shape = ", ".join(["rows", *map(str, tail)])
            return f"'{name}' has shape {data.shape}, not ({shape}{',' if not tail else ''}) with rows = {rows}"
    return None


def not_stored_in_full(dataset: h5py.Dataset) -> str | None:
    """Why reading `dataset` could take more memory than the file holds, or None. dinoprobe writes every dataset
    whole and unfiltered; a compressed one, or one whose chunks were never written (they read as the fill value),
    can make a shard of a few megabytes decode to gigabytes, and the manifest's row counts come from the same
    hands as the shard."""
    logical = dataset.size * dataset.dtype.itemsize
    if dataset.id.get_create_plist().get_nfilters():
        return f"is compressed or filtered ({logical:,} bytes when read), which dinoprobe never writes"
    if dataset.id.get_storage_size() < logical:
        return (f"holds {dataset.id.get_storage_size():,} bytes for {logical:,} when read (not written in full), "
                "which dinoprobe never writes")
    return None


class ShardReader:
    """Reads shards, checking each one's sha256 against the manifest the first time it is read, on the bytes
    being read: one pass over the disk, no separate hashing pass. Later reads of a checked shard (a streamed
    epoch) read only the columns they need."""

    def __init__(self, cache_dir: str | Path, check_hashes: bool = True):
        self.cache_dir, self.check_hashes = Path(cache_dir), check_hashes
        self.checked: dict[str, tuple] = {}  # file -> (inode, size, mtime) when its hash was checked

    def read(self, entry: dict, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
        path = shard_path(self.cache_dir, entry["file"])
        try:
            if not self.check_hashes:
                return read_shard(path, columns)
            if entry["file"] in self.checked:
                # a later read (a streamed epoch): the file must still be the one whose hash was checked, or the
                # cache was rewritten under this run (features --overwrite) and its rows would silently mix
                if _identity(path) != self.checked[entry["file"]]:
                    raise DinoprobeError(f"cache {self.cache_dir} changed while it was being read ({entry['file']} "
                                         "was rewritten); rerun once the cache is no longer being written")
                return read_shard(path, columns)
            before = _identity(path)
            data = path.read_bytes()
        except FileNotFoundError:
            raise DinoprobeError(f"cache {self.cache_dir}: {entry['file']} disappeared while it was being read; "
                                 "rerun the same `dinoprobe features` command to recompute it, then train again") from None
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise DinoprobeError(f"cache {self.cache_dir} failed verification: {entry['file']}: sha256 differs from "
                                 "the manifest (edited or corrupt); delete it and rerun the same `dinoprobe "
                                 "features` command to recompute it")
        self.checked[entry["file"]] = before
        with h5py.File(io.BytesIO(data), "r", locking=False) as fh:
            return _columns(fh, path, columns)


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------------------------- verify
def verify(cache_dir: str | Path, check_hashes: bool = True) -> list[str]:
    """Every problem that makes the cache untrustworthy, each with what to do; [] when it is sound."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return [f"{cache_dir} does not exist; create it with `dinoprobe features --cache {cache_dir}`"]
    try:
        manifest = read_manifest(cache_dir)
    except DinoprobeError as err:
        return [str(err)]
    if manifest is None:
        return [f"{cache_dir} has no {MANIFEST}; create it with `dinoprobe features --cache {cache_dir}`"]
    fix = "rerun the same `dinoprobe features` command to recompute it"
    problems = []
    if manifest.get("fingerprint_sha256") != fingerprint_sha256(manifest.get("fingerprint", {})):
        problems.append(f"{MANIFEST}: fingerprint was edited; rebuild with --overwrite")
    known = set()
    for split, info in manifest["splits"].items():
        if not info.get("complete"):
            problems.append(f"split '{split}' is incomplete ({len(info['shards'])} shards done); {fix}")
        for shard in info["shards"]:
            try:
                path = shard_path(cache_dir, shard["file"])
            except DinoprobeError as err:
                problems.append(str(err))
                continue
            known.add(resolved(path))
            if not path.is_file():
                problems.append(f"{shard['file']}: missing; {fix}")
                continue
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{shard['file']}: size {path.stat().st_size} != {shard['bytes']} recorded "
                                f"(truncated?); delete it and {fix}")
                continue
            if check_hashes and sha256_file(path) != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 differs from the manifest (edited or corrupt); delete "
                                f"it and {fix}")
                continue
            try:
                with h5py.File(path, "r", locking=False) as fh:
                    lengths = {k: len(fh[k]) for k in (*FEATURE_KINDS, *BLOCK_KINDS, *VIEW_KINDS, "label", "labels",
                                                       "index", "path") if k in fh}
                    bombs = [f"'{k}' {problem}" for k in lengths if (problem := not_stored_in_full(fh[k]))]
                    if bombs:
                        more = f" (and {len(bombs) - 1} more datasets)" if len(bombs) > 1 else ""
                        problems.append(f"{shard['file']}: {bombs[0]}{more}; delete it and {fix}")
                        continue
                    if layout := layout_problem(fh, manifest, split):
                        problems.append(f"{shard['file']}: {layout}; delete it and {fix}")
                        continue
                    index = fh["index"][...]
            except Exception as err:
                problems.append(f"{shard['file']}: unreadable HDF5 ({err}); delete it and {fix}")
                continue
            if set(lengths.values()) != {shard["rows"]}:
                problems.append(f"{shard['file']}: row counts {lengths} != {shard['rows']} in the manifest; {fix}")
            elif len(index) and (index.min() < shard["start"] or index.max() >= shard["stop"]):
                problems.append(f"{shard['file']}: indices outside [{shard['start']}, {shard['stop']}); {fix}")
            elif not np.array_equal(np.sort(np.concatenate([index, np.array(
                    [s["index"] for s in shard.get("skipped", [])], np.int64)])), np.arange(shard["start"], shard["stop"])):
                problems.append(f"{shard['file']}: its {shard['rows']} rows and {len(shard.get('skipped', []))} "
                                f"skipped inputs are not each input of [{shard['start']}, {shard['stop']}) once; "
                                f"delete it and {fix}")
    for path in sorted(cache_dir.glob("*/shard-*.h5")):
        if resolved(path) in known:
            continue
        if finished_entry(cache_dir, path, check_hashes) is not None:  # the manifest catches up every few seconds
            problems.append(f"{path.relative_to(cache_dir)}: finished, but not yet in the manifest (the run that "
                            "wrote it stopped first); rerunning the same `dinoprobe features` command adopts it")
        else:
            problems.append(f"{path.relative_to(cache_dir)}: shard not in the manifest (left by another run?); "
                            "remove it or rebuild with --overwrite")
    return problems


def open_manifest(cache_dir: str | Path, verify_cache: bool = True) -> dict:
    """The manifest of a cache whose structure passed verification (complete splits, shard sizes, row counts, no
    strays); a DinoprobeError naming the problems otherwise. Shard hashes are checked by ShardReader as the shards
    are read, and all at once by `dinoprobe cache verify`."""
    if verify_cache:
        problems = verify(cache_dir, check_hashes=False)
        if problems:
            more = f" (+{len(problems) - 3} more; run `dinoprobe cache verify {cache_dir}`)" if len(problems) > 3 else ""
            raise DinoprobeError(f"cache {cache_dir} failed verification: {'; '.join(problems[:3])}{more}")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise DinoprobeError(f"{cache_dir} is not a dinoprobe cache (no {MANIFEST})")
    return manifest


# ------------------------------------------------------------------------------------------------- reader
def load(cache_dir: str | Path, split: str, features: tuple[str, ...] | str = FEATURE_KINDS,
         verify_cache: bool = True, manifest: dict | None = None, reader: ShardReader | None = None,
         selections: dict[str, tuple[str, ...]] | None = None) -> dict[str, np.ndarray]:
    """Read one split into memory: ``{feature: (N, D), 'label': (N,), 'index': (N,), 'path': (N,)}``, with
    ``'labels': (N, classes)`` 0/1 in place of 'label' for a multi-label cache. With `selections` ({name: parts},
    see specs.py), each name's (N, width) float32 features (specs.select) take the place of the stored columns
    `features` they are read from, built shard by shard so the stored columns are never held whole.

    Rows come in `index` order; every shard's sha256 is checked as it is read (unless verify_cache=False).
    This is the public API for reading caches in your own code::

        from dinoprobe.cache import store as cache
        train = cache.load("cache/my-cache", "train", features="cls")
        X, y = train["cls"], train["label"]
    """
    features = (features,) if isinstance(features, str) else tuple(features)
    manifest = manifest or open_manifest(cache_dir, verify_cache)
    if split not in manifest["splits"]:
        raise DinoprobeError(f"cache {cache_dir} has no '{split}' split (has {sorted(manifest['splits'])})")
    unknown = [f for f in features if f not in FEATURE_KINDS + BLOCK_KINDS + VIEW_KINDS]
    if unknown:
        raise DinoprobeError(f"unknown feature {unknown}; caches hold {list(FEATURE_KINDS + BLOCK_KINDS)}")
    if "cls_blocks" in features and not manifest.get("last_blocks"):
        raise DinoprobeError(f"cache {cache_dir} holds no per-block CLS tokens; build it with `dinoprobe features "
                             "--last-blocks N`")
    if any(f in VIEW_KINDS for f in features) and not manifest["fingerprint"].get("views", {}).get("count") \
            or (any(f in VIEW_KINDS for f in features) and split != "train"):
        raise DinoprobeError(f"cache {cache_dir} has no augmented views for '{split}'; build it with "
                             "`dinoprobe features --views K`")
    label = label_column(manifest)
    columns = (*features, label, "index", "path")
    reader = reader or ShardReader(cache_dir, check_hashes=verify_cache)
    entries = sorted(manifest["splits"][split]["shards"], key=lambda s: s["start"])
    kept = (*(selections or features), label, "index", "path")
    if not entries:
        dim = manifest.get("feature_dim", 0)
        empty = np.zeros((0, len(manifest["classes"])), np.uint8) if label == "labels" else np.zeros(0, np.int64)
        widths = {name: width(parts, dim) for name, parts in selections.items()} if selections else {}
        return {**{f: np.zeros((0, widths.get(f, dim)), np.float32) for f in kept[:-3]}, label: empty,
                "index": np.zeros(0, np.int64), "path": np.zeros(0, object)}
    # each column allocated once and filled shard by shard: at most one shard more than the result is held (a
    # list of parts and their concatenation would hold the split twice)
    out, at, total = None, 0, sum(s["rows"] for s in entries)
    for entry in entries:
        part = reader.read(entry, columns)
        rows = len(part["index"])
        if selections:
            part = {**{name: select(part, parts) for name, parts in selections.items()},
                    **{col: part[col] for col in kept[-3:]}}
        if out is None:
            out = {col: np.empty((total, *part[col].shape[1:]), part[col].dtype) for col in kept}
        if rows != entry["rows"] or any(part[col].shape != (rows, *out[col].shape[1:]) for col in kept):
            raise DinoprobeError(f"cache {cache_dir}: {entry['file']} holds {rows} rows shaped unlike its manifest "
                                 f"entry or the other shards; run `dinoprobe cache verify {cache_dir}`")
        for col in kept:
            out[col][at:at + rows] = part[col]
        at += rows
    return out


def skipped_inputs(manifest: dict, split: str | None = None) -> list[dict]:
    splits = [split] if split else list(manifest["splits"])
    return [dict(s, split=name) for name in splits for shard in manifest["splits"][name]["shards"]
            for s in shard.get("skipped", [])]


# --------------------------------------------------------------------------------------------------- lock
class FolderLock:
    """One writer per folder (a cache, an evaluation's --out): an exclusive `flock` on FOLDER/.lock. The kernel grants
    it to one process at a time and releases it when the holder exits or dies, so there is no stale lock to take
    over and no check-then-act race. The file records the holder's pid for the message and is removed on exit; a
    process that locked a file just removed (its inode no longer at the path) tries again, so two writers can never
    hold two different files. `what` names the folder in messages."""

    def __init__(self, folder: str | Path, what: str = "cache"):
        self.path, self.what = Path(folder) / LOCK, what
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        for _ in range(100):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise DinoprobeError(f"cannot create the lock file {self.path} ({err.strerror}); check that the "
                                     f"{self.what} folder is writable, has free space and that .lock is not a "
                                     "link") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise DinoprobeError(f"another dinoprobe process (pid {holder}) is writing {self.path.parent}; "
                                     "wait for it to finish (the lock is released when it exits)") from None
            except OSError as err:  # ENOLCK, ENOSYS, EOPNOTSUPP: a filesystem without flock
                os.close(fd)
                raise DinoprobeError(f"the filesystem of {self.path.parent} does not support file locks (flock: "
                                     f"{err.strerror}), which keep two writers off one {self.what} — common on NFS "
                                     "without a lock daemon and on Lustre mounted without -o flock; put the "
                                     f"{self.what} on a local disk or a filesystem with locks, and copy it where you "
                                     "need it") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and our lock
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
            except OSError:
                pass  # a full disk may refuse the pid; the lock itself is held all the same
            self.fd = fd
            return self
        raise DinoprobeError(f"could not take the lock {self.path}; another process keeps replacing it")

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter then sees a new inode and retries
            os.close(self.fd)  # closing releases the flock
            self.fd = None
