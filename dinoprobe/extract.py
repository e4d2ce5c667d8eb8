"""The single pass: frozen backbone over every split, features into the cache, resumable shard by shard."""
from __future__ import annotations

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
from tqdm import tqdm

from dinoprobe import __version__
from dinoprobe.backbone import Backbone
from dinoprobe.cache import (MANIFEST, CacheLock, adopt_finished_shards, fingerprint_differences, new_manifest, now,
                             read_manifest, write_json_atomic, write_shard)
from dinoprobe.data import DEFAULT_MAX_PIXELS, DataSource, Preprocess, Views, collate
from dinoprobe.decode import DECODERS, DeviceDecoder, TorchvisionDecode
from dinoprobe.device import autocast, default_workers, resolve_device, resolve_precision
from dinoprobe.errors import DinoprobeError


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
    return json.loads(json.dumps(fingerprint))  # compare like with like: what the manifest will hold


@dataclass
class ExtractionSummary:
    rows: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    computed: int = 0  # inputs run through the backbone in this invocation (not resumed ones)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else 0.0


class ShardWriter:
    """Writes finished shards on a background thread so HDF5 + sha256 overlap the next forward passes.

    It is also the only mutator of the manifest while extraction runs, so updates need no lock.
    """

    def __init__(self, cache_dir: Path, manifest: dict, dtype: str, update_manifest: bool = True):
        self.cache_dir, self.manifest, self.dtype = cache_dir, manifest, dtype
        self.update_manifest = update_manifest  # torchrun ranks only write shards; rank 0 merges at the end
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
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
                entry = write_shard(self.cache_dir, split, number, start, stop, rows, self.dtype, skipped)
                if not self.update_manifest:
                    continue
                shards = self.manifest["splits"][split]["shards"]
                shards[:] = sorted([s for s in shards if s["start"] != start] + [entry], key=lambda s: s["start"])
                self.manifest["updated"] = now()
                write_json_atomic(self.cache_dir / MANIFEST, self.manifest)
            except BaseException as err:  # noqa: BLE001 - reported in the main thread
                self.error = err


def prepare_manifest(cache_dir: Path, fingerprint: dict, source: DataSource, shard_size: int, overwrite: bool,
                     extra: dict) -> dict:
    existing = read_manifest(cache_dir) if not overwrite else None
    if existing is not None:
        # caches written before these were recorded: PIL decoding, timm's transform, no per-block CLS tokens
        existing["fingerprint"].setdefault("decoder", {"name": "pil", "device": None})
        existing["fingerprint"].setdefault("last_blocks", 0)
        existing["fingerprint"]["transform"].setdefault("name", "timm")
        diffs = fingerprint_differences(existing["fingerprint"], fingerprint)
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
    write_json_atomic(cache_dir / MANIFEST, manifest)
    return manifest


def extract(backbone: Backbone, source: DataSource, cache_dir: str | Path, *, batch_size: int = 64,
            workers: int | None = None, device: str = "auto", precision: str = "auto", dtype: str = "float16",
            shard_size: int = 4096, strict: bool = False, overwrite: bool = False,
            max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True, compile: bool = False, views: int = 0,
            augment: str = "light", decoder: str = "pil", decode_on_device: bool | None = None,
            last_blocks: int = 4) -> ExtractionSummary:
    """decoder: "pil" (timm's reference transform) or "torchvision" (decode.py); with torchvision, JPEGs are
    decoded on the extraction device when `decode_on_device` (default: on CUDA), else in the loader workers.
    last_blocks: also store the CLS token of each of the last N blocks (`cls_blocks`; 4 covers DINOv3's linear
    evaluation, 0 stores none)."""
    if not 0 <= last_blocks <= backbone.depth:
        raise DinoprobeError(f"--last-blocks must be in [0, {backbone.depth}] for {backbone.model_name} "
                             f"({backbone.depth} blocks), got {last_blocks}")
    previous, backbone.last_blocks = backbone.last_blocks, last_blocks
    try:
        return _extract(backbone, source, Path(cache_dir), batch_size, workers, device, precision, dtype, shard_size,
                        strict, overwrite, max_pixels, progress, compile, views, augment, decoder, decode_on_device,
                        last_blocks)
    finally:
        backbone.last_blocks = previous  # the caller's backbone is left as it was


def _extract(backbone, source, cache_dir, batch_size, workers, device, precision, dtype, shard_size, strict, overwrite,
             max_pixels, progress, compile, views, augment, decoder, decode_on_device, last_blocks):
    dev = resolve_device(device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    precision = resolve_precision(precision, dev)
    workers = default_workers(dev) if workers is None else workers
    if decoder not in DECODERS:
        raise DinoprobeError(f"unknown decoder '{decoder}'; choose one of {', '.join(DECODERS)}")
    if decoder != "pil" and not source.encoded:
        raise DinoprobeError(f"--decoder {decoder} decodes encoded images; {source.kind} comes as decoded arrays, "
                             "so leave --decoder at pil")
    on_device = decoder != "pil" and (dev.type == "cuda" if decode_on_device is None else decode_on_device)
    decode = TorchvisionDecode(backbone.data_config, max_pixels, encoded=on_device) if decoder != "pil" else None
    fingerprint = make_fingerprint(backbone, source, dtype, precision, views, augment, decoder,
                                   dev.type if on_device else "cpu", last_blocks)
    view_maker = Views(backbone.data_config, views, augment) if views else None
    extra = {"feature_dim": backbone.feature_dim, "dtype": dtype, "last_blocks": last_blocks,
             "features": ["cls", "patch_mean"] + (["cls_blocks"] if last_blocks else []),
             "weights_location": backbone.weights.location, "val_split": source.val_split}
    summary = ExtractionSummary()
    rank, world = distributed_context(dev)
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            stack.enter_context(CacheLock(cache_dir))
            try:
                manifest = prepare_manifest(cache_dir, fingerprint, source, shard_size, overwrite, extra)
                for stale in glob.glob(str(cache_dir / "*" / ".shard-*.tmp-*")):
                    os.unlink(stale)  # half-written shards of a killed run
                if adopt_finished_shards(cache_dir, manifest):
                    write_json_atomic(cache_dir / MANIFEST, manifest)
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
        model = backbone.to(dev)
        forward = FixedBatchForward(model, batch_size) if compile else model
        preprocess = Preprocess(backbone.data_config).to(dev)
        device_decoder = DeviceDecoder(backbone.data_config, dev, decode) if on_device else None
        writer = ShardWriter(cache_dir, manifest, dtype, update_manifest=world == 1)
        start_time = time.perf_counter()
        try:
            for split in source.splits:
                summary.computed += _extract_split(split, source, model, forward, preprocess, writer, manifest,
                                                   shard_size, dev, precision, batch_size, workers, strict,
                                                   max_pixels, progress and rank == 0, rank, world,
                                                   view_maker if split == "train" else None, decode,
                                                   device_decoder)
        finally:
            writer.close()
        if world > 1:
            counts = torch.tensor([summary.computed], dtype=torch.long)
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
            write_json_atomic(cache_dir / MANIFEST, manifest)
        if world > 1:
            torch.distributed.barrier()  # the manifest is final before any rank returns
        summary.seconds = time.perf_counter() - start_time
    return summary


def distributed_context(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: gloo on CPU, nccl on GPUs,
    one GPU per rank, and splits the CPU cores between the ranks of a machine."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class FixedBatchForward:
    """A torch.compile'd backbone that only ever sees one batch shape: inputs are cut into chunks of
    `batch_size` and a short last chunk is zero-padded, so neither the last batch of a split nor the B x K
    augmented views of a batch trigger a recompile (which costs about as much as the first compile)."""

    def __init__(self, model: Backbone, batch_size: int, backend: str = "inductor"):
        self.compiled, self.batch_size = torch.compile(model, backend=backend), batch_size

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = []
        for chunk in x.split(self.batch_size):
            n = chunk.shape[0]
            if n < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - n, *chunk.shape[1:])])
            outputs.append({k: v[:n] for k, v in self.compiled(chunk).items()})
        return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}


def _pending_ranges(n: int, shard_size: int, done: set[int]) -> list[tuple[int, int, int]]:
    return [(start // shard_size, start, min(start + shard_size, n))
            for start in range(0, n, shard_size) if start not in done]


def _extract_split(split, source, model, forward, preprocess, writer, manifest, shard_size, dev, precision, batch_size,
                   workers, strict, max_pixels, progress, rank=0, world=1, views=None, decode=None,
                   device_decoder=None) -> int:
    samples = source.splits[split]
    done = {s["start"] for s in manifest["splits"][split]["shards"]}
    pending = _pending_ranges(len(samples), shard_size, done)[rank::world]  # shards, not ranks, own rows
    if not pending:
        return 0
    indices = [i for _, start, stop in pending for i in range(start, stop)]
    dataset = torch.utils.data.Subset(source.dataset(split, model.data_config, max_pixels, views, decode),
                                      indices)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=dev.type == "cuda", prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False)
    by_start = {start: (number, stop) for number, start, stop in pending}
    open_shards: dict[int, dict] = {}  # shard start -> accumulated rows, skipped, count seen

    def shard_of(index: int) -> int:
        return index - index % shard_size

    bar = tqdm(total=len(indices), desc=f"features {split}", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for pixels, labels, idx, skipped, view_pixels in loader:
                if isinstance(pixels, list):  # JPEG bytes: decode on the device (decode.py)
                    pixels, kept, failed = device_decoder(pixels)
                    skipped = skipped + [(int(idx[i]), reason) for i, reason in failed]
                    keep = torch.tensor(kept, dtype=torch.long)
                    labels, idx = labels[keep], idx[keep]
                    view_pixels = view_pixels[keep] if view_pixels is not None else None
                for index, reason in skipped:
                    path = samples[index][0]
                    if strict:
                        raise DinoprobeError(f"unreadable input {path}: {reason} (--strict makes this fatal; drop "
                                             "--strict to skip and list such files in the manifest)")
                    acc = open_shards.setdefault(shard_of(index), _new_acc())
                    acc["skipped"].append({"index": int(index), "path": path, "reason": reason})
                    acc["seen"] += 1
                if pixels is not None:
                    x = preprocess(pixels.to(dev, non_blocking=True))
                    with autocast(dev, precision):
                        feats = forward(x)
                        if view_pixels is not None:  # (B, K, 3, S, S) -> features (B, K, D)
                            b, k = view_pixels.shape[:2]
                            vx = preprocess(view_pixels.flatten(0, 1).to(dev, non_blocking=True))
                            vf = forward(vx)
                            feats.update({f"{name}_views": vf[name].view(b, k, -1) for name in ("cls", "patch_mean")})
                    feats = {k: v.float().cpu().numpy() for k, v in feats.items()}
                    idx_np, labels_np = idx.numpy(), labels.numpy()
                    for start in np.unique(idx_np - idx_np % shard_size):
                        sel = (idx_np - idx_np % shard_size) == start
                        acc = open_shards.setdefault(int(start), _new_acc())
                        for kind in feats:
                            acc.setdefault(kind, []).append(feats[kind][sel])
                        acc["label"].append(labels_np[sel])
                        acc["index"].append(idx_np[sel])
                        acc["path"] += [samples[i][0] for i in idx_np[sel]]
                        acc["seen"] += int(sel.sum())
                for start in [s for s, acc in open_shards.items() if acc["seen"] == by_start[s][1] - s]:
                    acc = open_shards.pop(start)
                    number, stop = by_start[start]
                    writer.submit(split, number, start, stop, _finish(acc, model.feature_dim, views, model.last_blocks),
                                  acc["skipped"])
                bar.update(len(idx) + len(skipped))
    finally:
        bar.close()
    return len(indices)


def _new_acc() -> dict:
    return {"cls": [], "patch_mean": [], "label": [], "index": [], "path": [], "skipped": [], "seen": 0}


def _finish(acc: dict, dim: int, views=None, last_blocks: int = 0) -> dict:
    def cat(parts, shape, dtype):
        return np.concatenate(parts) if parts else np.zeros(shape, dtype)
    rows = {"cls": cat(acc["cls"], (0, dim), np.float32), "patch_mean": cat(acc["patch_mean"], (0, dim), np.float32),
            "label": cat(acc["label"], (0,), np.int64), "index": cat(acc["index"], (0,), np.int64),
            "path": acc["path"]}
    if last_blocks:
        rows["cls_blocks"] = cat(acc.get("cls_blocks", []), (0, last_blocks, dim), np.float32)
    if views is not None:
        for kind in ("cls_views", "patch_mean_views"):
            rows[kind] = cat(acc.get(kind, []), (0, views.count, dim), np.float32)
    return rows
