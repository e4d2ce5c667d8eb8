"""The single pass: frozen backbone over every split, features into the cache, resumable shard by shard."""
from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

from dinoprobe import __version__
from dinoprobe.atomic import write_json
from dinoprobe.cache.store import (
    MANIFEST,
    FolderLock,
    adopt_finished_shards,
    fingerprint_differences,
    new_manifest,
    now,
    read_manifest,
    shard_path,
    verify,
    write_shard,
)
from dinoprobe.device import (
    autocast,
    default_workers,
    environment,
    local_processes,
    resolve_device,
    resolve_precision,
    usable_cores,
)
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.backbone import Backbone, check_forward_fits, token_features
from dinoprobe.extract.datasets import DecodingLoader
from dinoprobe.extract.datasource import DataSource, indicator
from dinoprobe.extract.decode import DeviceDecoder, TorchvisionDecode
from dinoprobe.extract.transforms import Preprocess, Views
from dinoprobe.progress import progress_bar
from dinoprobe.settings import DECODERS, DEFAULT_MAX_PIXELS


def make_fingerprint(backbone: Backbone, source: DataSource, dtype: str, precision: str, views: int = 0,
                     augment: str | None = None, decoder: str = "pil", decode_device: str | None = None,
                     last_blocks: int = 0) -> dict:
    """Everything that changes the stored numbers. A cache is reused only when all of it matches."""
    fingerprint = {
        "model": backbone.model_name,
        "weights": {"source": backbone.weights.source, "sha256": backbone.weights.sha256},
        "transform": backbone.data_config.to_dict(),
        # torchvision's resize differs from PIL's by a level or two; nvJPEG may differ from libjpeg-turbo
        "decoder": {"name": decoder, "device": decode_device if decoder != "pil" else None},
        "dtype": dtype,
        "precision": precision,
        "data": {"kind": source.kind, "root": source.root, "file_list_sha256": source.file_list_sha256(),
                 "val_split": source.val_split},
        "views": {"count": views, "augment": augment if views else None, "split": "train" if views else None},
        "last_blocks": last_blocks,
        "dinoprobe_version": __version__,
    }
    if source.multilabel:  # single-label fingerprints stay as they were, so their caches resume unchanged
        fingerprint.update(task="multilabel", classes=list(source.classes))
    return json.loads(json.dumps(fingerprint))  # compare like with like: what the manifest will hold


@dataclass
class ExtractionSummary:
    rows: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    computed: int = 0  # inputs run through the backbone in this invocation (not resumed ones)
    repaired: list[str] = field(default_factory=list)  # recorded shards found missing or truncated, recomputed
    seconds: float = 0.0
    read_only: bool = False  # a complete cache in a folder this process cannot write: nothing to do, nothing locked

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else 0.0


class ShardWriter:
    """Writes finished shards on a background thread so HDF5 + sha256 overlap the next forward passes.

    It is also the only mutator of the manifest while extraction runs, so updates need no lock. Each shard's
    sidecar records it the moment it is written (a resumed run adopts those); the manifest, which holds every
    entry, is rewritten at most every MANIFEST_EVERY_S seconds and when the writer closes — after every shard, a
    run of 20,000 small shards would spend minutes rewriting an ever-longer file.
    """

    MANIFEST_EVERY_S = 2.0

    def __init__(self, cache_dir: Path, manifest: dict, dtype: str, update_manifest: bool = True):
        self.cache_dir, self.manifest, self.dtype = cache_dir, manifest, dtype
        self.update_manifest = update_manifest  # torchrun ranks only write shards; rank 0 merges at the end
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self._unrecorded: dict[str, dict[int, dict]] = {}  # split -> start -> entry, not in the manifest yet
        self._manifest_written = -float("inf")
        self.thread = threading.Thread(target=self._run, name="dinoprobe-shard-writer", daemon=True)
        self.thread.start()

    def submit(self, split: str, number: int, start: int, stop: int, rows: dict, skipped: list[dict]) -> None:
        self._raise_if_failed()
        self.jobs.put((split, number, start, stop, rows, skipped))

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self):
        if self.error is not None:
            err, self.error = self.error, None
            raise DinoprobeError(f"writing the cache failed ({type(err).__name__}: {err}); shards already written "
                                 "are intact — fix the cause (disk space, permissions) and rerun to resume") from err

    def _run(self):
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure; the main thread will raise
            split, number, start, stop, rows, skipped = job
            try:
                with record_function("dinoprobe.write_shard"):
                    entry = write_shard(self.cache_dir, split, number, start, stop, rows, self.dtype, skipped)
                if self.update_manifest:
                    self._unrecorded.setdefault(split, {})[start] = entry
                    if time.monotonic() - self._manifest_written >= self.MANIFEST_EVERY_S:
                        self._write_manifest()
            except BaseException as err:  # noqa: BLE001 - reported in the main thread
                self.error = err
        if self._unrecorded and self.error is None:
            try:
                self._write_manifest()  # the manifest is whole before close() returns, also after Ctrl-C
            except BaseException as err:  # noqa: BLE001 - reported in the main thread
                self.error = err

    def _write_manifest(self) -> None:
        for split, entries in self._unrecorded.items():
            shards = self.manifest["splits"][split]["shards"]  # a recomputed shard replaces its old entry
            shards[:] = sorted([s for s in shards if s["start"] not in entries] + list(entries.values()),
                               key=lambda s: s["start"])
        self._unrecorded = {}
        self.manifest["updated"] = now()
        write_json(self.cache_dir / MANIFEST, self.manifest)
        self._manifest_written = time.monotonic()


def drop_broken_shards(cache_dir: Path, manifest: dict) -> list[str]:
    """Forget every recorded shard that is missing or whose size is not the recorded one (deleted or truncated,
    e.g. on `cache verify`'s advice), with its sidecar, so this run computes it again; returns their names.
    (A shard whose bytes changed at the same size is caught by its sha256 when read, and `cache verify` says to
    delete it: then it is missing, and recomputed here.)"""
    dropped = []
    for info in manifest["splits"].values():
        keep = []
        for shard in info["shards"]:
            path = shard_path(cache_dir, shard["file"])
            if path.is_file() and path.stat().st_size == shard.get("bytes"):
                keep.append(shard)
                continue
            dropped.append(shard["file"])
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
        if len(keep) != len(info["shards"]):
            info["shards"], info["complete"] = keep, False
    if dropped:
        write_json(cache_dir / MANIFEST, manifest)
    return dropped


def request_differences(manifest: dict, fingerprint: dict) -> list[str]:
    """How a cache's fingerprint differs from the one requested (fingerprint_differences), reading the caches written
    before these were recorded as they were made: PIL decoding, timm's transform, no per-block CLS tokens."""
    manifest["fingerprint"].setdefault("decoder", {"name": "pil", "device": None})
    manifest["fingerprint"].setdefault("last_blocks", 0)
    manifest["fingerprint"]["transform"].setdefault("name", "timm")
    return fingerprint_differences(manifest["fingerprint"], fingerprint)


def finished_read_only(cache_dir: Path, fingerprint: dict) -> ExtractionSummary | None:
    """The summary of a cache this process cannot write (a read-only mount, a colleague's folder) that is already
    complete, sound and built from this very request: there is nothing to compute, and no lock can or need be taken
    (nobody can write it through a read-only mount). None otherwise: then the lock's own error says what is wrong."""
    if not cache_dir.is_dir() or os.access(cache_dir, os.W_OK):
        return None
    try:
        manifest = read_manifest(cache_dir)
        if manifest is None or request_differences(manifest, fingerprint) or verify(cache_dir, check_hashes=False):
            return None
    except DinoprobeError:
        return None  # verify's problems include a split not yet complete
    return ExtractionSummary(rows={s: sum(e["rows"] for e in info["shards"]) for s, info in manifest["splits"].items()},
                             skipped={s: sum(len(e.get("skipped", [])) for e in info["shards"])
                                      for s, info in manifest["splits"].items()}, read_only=True)


def prepare_manifest(cache_dir: Path, fingerprint: dict, source: DataSource, shard_size: int, overwrite: bool,
                     extra: dict) -> dict:
    existing = read_manifest(cache_dir) if not overwrite else None
    if existing is not None:
        diffs = request_differences(existing, fingerprint)
        if diffs:
            raise DinoprobeError(f"cache {cache_dir} was built from a different request ({'; '.join(diffs[:4])}); "
                                 "use another --cache, or --overwrite to rebuild it")
        return existing
    if overwrite and cache_dir.exists():
        for path in [cache_dir / MANIFEST, *cache_dir.glob("*/shard-*.h5"), *cache_dir.glob("*/shard-*.json"),
                     *cache_dir.glob("*/.shard-*.tmp-*")]:
            path.unlink(missing_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(fingerprint, source.classes, {s: len(v) for s, v in source.splits.items()}, shard_size,
                            extra)
    write_json(cache_dir / MANIFEST, manifest)
    return manifest


@dataclass(frozen=True)
class ExtractOptions:
    """How `extract` runs; every field is a `dinoprobe features` option of the same name.

    decoder: "pil" (timm's reference transform) or "torchvision" (decode.py); with torchvision, JPEGs are decoded
    on the extraction device when `decode_on_device` (default: on CUDA), else in the loader workers. last_blocks:
    also store the CLS token of each of the last N blocks (`cls_blocks`; 4 covers DINOv3's linear evaluation, 0
    stores none). rank / world: this process's place in a torchrun job whose process group the caller started
    (the CLI does); shards, not ranks, own rows, so any world size resumes any other's cache."""

    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float16"
    shard_size: int = 4096
    strict: bool = False
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    compile: bool = False
    views: int = 0
    augment: str = "light"
    decoder: str = "pil"
    decode_on_device: bool | None = None
    last_blocks: int = 4
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        checks = [(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
                  (self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}"),
                  (self.workers is None or self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
                  (self.views >= 0, f"views must be >= 0, got {self.views}"),
                  (self.decoder in DECODERS, f"unknown decoder '{self.decoder}'; choose one of {', '.join(DECODERS)}"),
                  (self.dtype in ("float16", "float32"), f"dtype must be float16 or float32, got {self.dtype!r}"),
                  (not (self.decode_on_device and self.decoder == "pil"),
                   "PIL decodes in the loader workers; decoding on the device needs --decoder torchvision"),
                  (0 <= self.rank < self.world, f"rank {self.rank} is not in a world of {self.world}")]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise DinoprobeError("; ".join(problems))

    def check_source(self, source: DataSource) -> None:
        """What these options cannot do with `source` (the CLI asks before it loads any weights)."""
        if self.decoder != "pil" and not source.encoded:
            raise DinoprobeError(f"--decoder {self.decoder} decodes encoded images; {source.kind} comes as decoded "
                                 "arrays, so leave --decoder at pil")


class BlockFeatures(torch.nn.Module):
    """The backbone's features with the CLS tokens of its last `last_blocks` blocks, without touching the backbone."""

    def __init__(self, backbone: Backbone, last_blocks: int):
        super().__init__()
        self.backbone, self.last_blocks = backbone, last_blocks

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.backbone
        return token_features(b.model, pixels, b.num_prefix_tokens, self.last_blocks)


def extract(backbone: Backbone, source: DataSource, cache_dir: str | Path, options: ExtractOptions | None = None,
            **option_fields) -> ExtractionSummary:
    """Run `backbone` once over every split of `source` into the cache at `cache_dir` (resuming what is there),
    with `options` or the ExtractOptions fields given as keywords. The backbone is left as it was given."""
    options = options or ExtractOptions(**option_fields)
    if not 0 <= options.last_blocks <= backbone.depth:
        raise DinoprobeError(f"--last-blocks must be in [0, {backbone.depth}] for {backbone.model_name} "
                             f"({backbone.depth} blocks), got {options.last_blocks}")
    if options.world > 1 and not torch.distributed.is_initialized():
        raise DinoprobeError("world > 1 needs a process group: start one (torchrun + init_process_group) first")
    home = next(backbone.parameters()).device
    try:
        return _extract(backbone, source, Path(cache_dir), options)
    finally:
        backbone.to(home)  # moved to the extraction device only for the run


def _extract(backbone: Backbone, source: DataSource, cache_dir: Path, o: ExtractOptions) -> ExtractionSummary:
    dev = resolve_device(o.device)
    if dev.type == "cuda" and o.world > 1 and "LOCAL_RANK" in os.environ:  # torchrun: ranks dealt out over the GPUs
        # (more ranks than GPUs share them: each brings its own decoding workers to a GPU the forward leaves idle)
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    precision = resolve_precision(o.precision, dev)
    ranks = local_processes(o.world) if o.world > 1 else 1  # on this machine
    workers = default_workers(dev, ranks) if o.workers is None else o.workers
    o.check_source(source)
    source.check_cache_place(cache_dir)
    check_forward_fits(backbone, o.batch_size, dev, processes=ranks)
    on_device = o.decoder != "pil" and (dev.type == "cuda" if o.decode_on_device is None else o.decode_on_device)
    decode = TorchvisionDecode(backbone.data_config, o.max_pixels, encoded=on_device) if o.decoder != "pil" else None
    fingerprint = make_fingerprint(backbone, source, o.dtype, precision, o.views, o.augment, o.decoder,
                                   dev.type if on_device else "cpu", o.last_blocks)
    view_maker = Views(backbone.data_config, o.views, o.augment) if o.views else None
    extra = {"feature_dim": backbone.feature_dim, "dtype": o.dtype, "last_blocks": o.last_blocks,
             "features": ["cls", "patch_mean"] + (["cls_blocks"] if o.last_blocks else []),
             "weights_location": backbone.weights.location, "val_split": source.val_split,
             "environment": environment(dev),  # of the run that created the cache (a resumed one keeps it)
             **({"task": "multilabel"} if source.multilabel else {})}
    if not o.overwrite and (finished := finished_read_only(cache_dir, fingerprint)) is not None:
        return finished
    summary = ExtractionSummary()
    rank, world = o.rank, o.world
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            stack.enter_context(FolderLock(cache_dir))
            try:
                manifest = prepare_manifest(cache_dir, fingerprint, source, o.shard_size, o.overwrite, extra)
                summary.repaired = drop_broken_shards(cache_dir, manifest)
                for stale in glob.glob(str(cache_dir / "*" / ".shard-*.tmp-*")):
                    os.unlink(stale)  # half-written shards of a killed run
                if adopt_finished_shards(cache_dir, manifest):
                    write_json(cache_dir / MANIFEST, manifest)
            except DinoprobeError as err:
                error = str(err)
        if world > 1:  # every rank learns of rank 0's refusal instead of waiting at a barrier forever
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise DinoprobeError(error)
        if rank != 0:
            manifest = read_manifest(cache_dir)
        shard_size = manifest["shard_size"]  # a resumed cache keeps its own shard boundaries
        model = BlockFeatures(backbone.to(dev), o.last_blocks)
        run = SplitRun(model=model, forward=FixedBatchForward(model, o.batch_size) if o.compile else model,
                       preprocess=Preprocess(backbone.data_config).to(dev),
                       writer=ShardWriter(cache_dir, manifest, o.dtype, update_manifest=world == 1),
                       manifest=manifest, shard_size=shard_size, device=dev, precision=precision, workers=workers,
                       options=o, decode=decode,
                       device_decoder=DeviceDecoder(backbone.data_config, dev, decode) if on_device else None)
        start_time = time.perf_counter()
        try:
            for split in source.splits:
                summary.computed += run.split(source, split, view_maker if split == "train" else None)
        finally:
            run.writer.close()
        if world > 1:  # NCCL (a caller's own group) reduces device tensors only; gloo takes CPU ones
            on = dev if torch.distributed.get_backend() == "nccl" else "cpu"
            counts = torch.tensor([summary.computed], dtype=torch.long, device=on)
            torch.distributed.all_reduce(counts)
            summary.computed = int(counts.item())
            torch.distributed.barrier()  # every rank's shards are on disk
            if rank == 0:
                adopt_finished_shards(cache_dir, manifest)
        for split, info in manifest["splits"].items():
            info["complete"] = sum(s["stop"] - s["start"] for s in info["shards"]) == info["num_inputs"]
            summary.rows[split] = sum(s["rows"] for s in info["shards"])
            summary.skipped[split] = sum(len(s.get("skipped", [])) for s in info["shards"])
        if rank == 0:
            manifest["updated"] = now()
            write_json(cache_dir / MANIFEST, manifest)
        if world > 1:
            torch.distributed.barrier()  # the manifest is final before any rank returns
        summary.seconds = time.perf_counter() - start_time
    return summary


def distributed_context(device: torch.device) -> tuple[int, int]:
    """(rank, world size) for a command run under torchrun (WORLD_SIZE > 1): joins the process group and splits
    the CPU cores between the ranks of a machine. Called by the CLI, which also destroys the group
    (`end_distributed`); the library only takes rank and world.

    The group is gloo's on GPUs too: extraction's collectives are control messages (rank 0's refusal, a count,
    barriers), not tensors, and gloo carries them whatever the layout, including several ranks sharing a GPU, which
    NCCL refuses ('Duplicate GPU detected'), without NCCL's start-up and its buffers on every GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if device.type == "cpu":
        torch.set_num_threads(max(1, usable_cores() // local_processes(world)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def end_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class FixedBatchForward:
    """A torch.compile'd backbone that only ever sees one batch shape: inputs are cut into chunks of
    `batch_size` and a short last chunk is zero-padded, so neither the last batch of a split nor the B x K
    augmented views of a batch trigger a recompile (which costs about as much as the first compile)."""

    def __init__(self, model: torch.nn.Module, batch_size: int, backend: str = "inductor"):
        self.compiled, self.batch_size = torch.compile(model, backend=backend), batch_size

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = []
        for chunk in x.split(self.batch_size):
            n = chunk.shape[0]
            if n < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - n, *chunk.shape[1:])])
            outputs.append({k: v[:n] for k, v in self.compiled(chunk).items()})
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}


def shard_batches(pending: list[tuple[int, int, int]], batch_size: int) -> list[list[int]]:
    """Batches that never straddle two shards: each shard's rows in runs of `batch_size` from its start. A row's
    features then come from the same batch whether its shard is computed in one run, recomputed alone on resume,
    or by any torchrun rank — the same values to the last bit, where matrix kernels that block by batch size would
    otherwise round a row differently in a batch of other rows. Positions count along the pending shards' rows."""
    batches, offset = [], 0
    for _, start, stop in pending:
        batches += [list(range(offset + b, offset + min(b + batch_size, stop - start)))
                    for b in range(0, stop - start, batch_size)]
        offset += stop - start
    return batches


def _pending_ranges(n: int, shard_size: int, done: set[int]) -> list[tuple[int, int, int]]:
    return [(start // shard_size, start, min(start + shard_size, n))
            for start in range(0, n, shard_size) if start not in done]


class ShardBuffer:
    """The rows of one shard as they arrive (features, labels, indices, paths) and the inputs skipped in it; full
    once every position of its range was either computed or skipped."""

    def __init__(self, start: int, stop: int, dim: int, last_blocks: int, views: int, label_classes: int = 0):
        self.start, self.stop, self.dim, self.last_blocks, self.views = start, stop, dim, last_blocks, views
        self.label_classes = label_classes  # multi-label caches: `labels` (N, classes) instead of `label` (N,)
        self.parts: dict[str, list[np.ndarray]] = {}
        self.paths: list[str] = []
        self.skipped: list[dict] = []
        self.seen = 0

    def add(self, columns: dict[str, np.ndarray], paths: list[str]) -> None:
        for name, values in columns.items():
            self.parts.setdefault(name, []).append(values)
        self.paths += paths
        self.seen += len(paths)

    def skip(self, index: int, path: str, reason: str) -> None:
        self.skipped.append({"index": int(index), "path": path, "reason": reason})
        self.seen += 1

    @property
    def full(self) -> bool:
        return self.seen == self.stop - self.start

    def rows(self) -> dict:
        """The shard's columns, empty arrays of the right shape where every input was skipped."""
        shapes = {"cls": (0, self.dim), "patch_mean": (0, self.dim), "index": (0,)}
        shapes.update({"labels": (0, self.label_classes)} if self.label_classes else {"label": (0,)})
        if self.last_blocks:
            shapes["cls_blocks"] = (0, self.last_blocks, self.dim)
        if self.views:
            shapes.update({"cls_views": (0, self.views, self.dim), "patch_mean_views": (0, self.views, self.dim)})
        out = {}
        for name, shape in shapes.items():
            empty = np.zeros(shape, {"label": np.int64, "index": np.int64, "labels": np.uint8}.get(name, np.float32))
            out[name] = np.concatenate(self.parts[name]) if self.parts.get(name) else empty
        out["path"] = self.paths
        return out


@dataclass
class SplitRun:
    """What every split's extraction shares: the model, its forward and preprocessing, the shard writer."""

    model: BlockFeatures
    forward: object
    preprocess: Preprocess
    writer: ShardWriter
    manifest: dict
    shard_size: int
    device: torch.device
    precision: str
    workers: int
    options: ExtractOptions
    decode: object = None
    device_decoder: object = None

    def split(self, source: DataSource, split: str, views: Views | None) -> int:
        """Compute this rank's missing shards of one split; returns how many inputs it ran."""
        o, shard_size, dev = self.options, self.shard_size, self.device
        samples = source.splits[split]
        done = {s["start"] for s in self.manifest["splits"][split]["shards"]}
        pending = _pending_ranges(len(samples), shard_size, done)[o.rank::o.world]  # shards, not ranks, own rows
        if not pending:
            return 0
        indices = [i for _, start, stop in pending for i in range(start, stop)]
        config = self.model.backbone.data_config
        dataset = source.dataset(split, config, o.max_pixels, views, self.decode)
        loader = DecodingLoader(torch.utils.data.Subset(dataset, indices), o.batch_size, self.workers,
                                dataset.input_bytes, pin_memory=dev.type == "cuda", warn=o.rank == 0,
                                batches=shard_batches(pending, o.batch_size))
        by_start = {start: (number, stop) for number, start, stop in pending}
        buffers: dict[int, ShardBuffer] = {}

        def buffer(index: int) -> ShardBuffer:
            start = index - index % shard_size
            if start not in buffers:
                buffers[start] = ShardBuffer(start, by_start[start][1], self.model.backbone.feature_dim,
                                             o.last_blocks, views.count if views else 0,
                                             len(source.classes) if source.multilabel else 0)
            return buffers[start]

        @record_function("dinoprobe.store")
        def store(batch: InFlight) -> None:  # a finished forward's rows into their shard buffers
            feats, idx_np, labels_np = batch.features.result(), batch.index, batch.labels
            for start in np.unique(idx_np - idx_np % shard_size):
                sel = (idx_np - idx_np % shard_size) == start
                columns = {k: v[sel] for k, v in feats.items()}
                if source.multilabel:
                    columns.update(labels=indicator([samples[i][1] for i in idx_np[sel]], len(source.classes)),
                                   index=idx_np[sel])
                else:
                    columns.update(label=labels_np[sel], index=idx_np[sel])
                buffer(int(start)).add(columns, [samples[i][0] for i in idx_np[sel]])

        def submit_full() -> None:
            for start in [s for s, b in buffers.items() if b.full]:
                done_buffer = buffers.pop(start)
                self.writer.submit(split, by_start[start][0], start, done_buffer.stop, done_buffer.rows(),
                                   done_buffer.skipped)

        # One batch in flight: batch i's features are stored while batch i+1 runs on the device, so the host's
        # share (loading, device decoding, copies, shard buffers) overlaps the forward instead of following it.
        # The same code runs on a CPU, where the forward is synchronous and the lag only holds one batch longer.
        in_flight: collections.deque[InFlight] = collections.deque()
        bar = progress_bar(len(indices), f"features {split}", "img", enabled=o.progress and o.rank == 0)
        try:
            with torch.inference_mode(), loader.explaining_failures():
                for pixels, labels, idx, skipped, view_pixels in loader:
                    if isinstance(pixels, list):  # JPEG bytes: decode on the device (decode.py)
                        with record_function("dinoprobe.decode_on_device"):
                            pixels, kept, failed = self.device_decoder(pixels)
                        skipped = skipped + [(int(idx[i]), reason) for i, reason in failed]
                        keep = torch.tensor(kept, dtype=torch.long)
                        labels, idx = labels[keep], idx[keep]
                        view_pixels = view_pixels[keep] if view_pixels is not None else None
                    for index, reason in skipped:
                        path = samples[index][0]
                        if o.strict:
                            raise DinoprobeError(f"unreadable input {path}: {reason} (--strict makes this fatal; "
                                                 "drop --strict to skip and list such files in the manifest)")
                        buffer(index).skip(index, path, reason)
                    if pixels is not None:
                        with record_function("dinoprobe.forward"):
                            in_flight.append(InFlight(self._features(pixels, view_pixels), idx.numpy(),
                                                      labels.numpy()))
                    while len(in_flight) > 1:
                        store(in_flight.popleft())
                    submit_full()
                    bar.update(len(idx) + len(skipped))
                while in_flight:
                    store(in_flight.popleft())
                submit_full()
        finally:
            bar.close()
        return len(indices)

    def _features(self, pixels: torch.Tensor, view_pixels: torch.Tensor | None) -> Features:
        """Start the forward of one batch; its features arrive on the host through `Features.result()`."""
        dev = self.device
        x = self.preprocess(pixels.to(dev, non_blocking=True))
        with autocast(dev, self.precision):
            feats = self.forward(x)
            if view_pixels is not None:  # (B, K, 3, S, S) -> features (B, K, D)
                b, k = view_pixels.shape[:2]
                # B x K images in forwards of at most --batch-size, so memory follows the batch size, not K
                parts = [self.forward(self.preprocess(part.to(dev, non_blocking=True)))
                         for part in view_pixels.flatten(0, 1).split(self.options.batch_size)]
                feats.update({f"{name}_views": torch.cat([p[name] for p in parts]).view(b, k, -1)
                              for name in ("cls", "patch_mean")})
        return Features.copy_to_host({k: v.float() for k, v in feats.items()})


class Features:
    """A batch's features on their way to the host. On CUDA the copies go into pinned memory without blocking
    and an event marks their end, so the host waits only when it reads them (`result`), by which time the next
    batch is already queued on the device; elsewhere they are the tensors themselves."""

    def __init__(self, host: dict[str, torch.Tensor], done: torch.cuda.Event | None = None):
        self.host, self.done = host, done

    @classmethod
    def copy_to_host(cls, feats: dict[str, torch.Tensor]) -> Features:
        if not any(v.is_cuda for v in feats.values()):
            return cls({k: v.cpu() for k, v in feats.items()})
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                for k, v in feats.items()}
        done = torch.cuda.Event()
        done.record()
        return cls(host, done)

    @record_function("dinoprobe.wait_for_features")
    def result(self) -> dict[str, np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        return {k: v.numpy() for k, v in self.host.items()}


@dataclass
class InFlight:
    """One batch between its forward and its shard buffer: features (on their way to the host), dataset
    indices and labels."""

    features: Features
    index: np.ndarray
    labels: np.ndarray
