"""Cache -> in-memory float32 tensors for head training: one verified read, then only index permutations.

This is the estimators' cache loader::

    from dinoprobe import Probe, load_cache
    data = load_cache("cache/cifar10-...", feature="cls")
    probe = Probe(head="linear").fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
    probe.score(data.X_test, data.y_test)  # a clear error if the cache has no test split
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dinoprobe import settings
from dinoprobe.cache import store as cache
from dinoprobe.cache.specs import blocks_needed, columns, parse_feature, width
from dinoprobe.cache.stream import StreamedTrainSplit, check_finite, no_epoch_length
from dinoprobe.device import memory_available, resolve_device
from dinoprobe.errors import DinoprobeError


def shuffled_batches(x: torch.Tensor, order: torch.Tensor, batch_size: int):
    """One epoch of (x[rows], rows) batches, rows taken from `order` in turn."""
    for idx in order.to(x.device, non_blocking=True).split(batch_size):
        yield x.index_select(0, idx), idx


def endless_batches(n: int, batch_size: int, generator: torch.Generator, order=None):
    """DINOv3's infinite sampler with drop_last (dinov3/data/samplers.py): consecutive `batch_size` positions of an
    endless stream made of one shuffled permutation of 0..n-1 after another."""
    order = order or (lambda size, gen: torch.randperm(size, generator=gen))
    pending = torch.zeros(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, order(n, generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


class AugmentedViews:
    """K cached augmented views per train image, (N, K, D), and the clean features (N, D) that normalisation
    statistics come from. A training source (train.sources.TrainSource): each epoch samples one view per image
    (generator seed + 1), then batches in the order an in-memory source would use (generator seed), so adding
    views leaves the order unchanged."""

    def __init__(self, views: torch.Tensor, clean: torch.Tensor):
        if views.dim() != 3 or clean.dim() != 2 or views.shape[0] != clean.shape[0] \
                or views.shape[2] != clean.shape[1]:
            raise DinoprobeError(f"views {tuple(views.shape)} do not fit clean features {tuple(clean.shape)}; "
                                 "expected (N, K, D) and (N, D)")
        self.views, self.clean = views, clean
        self.shape = tuple(clean.shape)

    def __len__(self) -> int:
        return len(self.clean)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clean.mean(0), self.clean.std(0)

    def to(self, device) -> AugmentedViews:
        return AugmentedViews(self.views.to(device), self.clean.to(device))

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One augmented view per image, uniformly at random: (N, D)."""
        n, k = self.views.shape[:2]
        choice = torch.randint(k, (n,), generator=generator).to(self.views.device)
        return self.views[torch.arange(n, device=self.views.device), choice]

    def epochs(self, normalizer, batch_size: int, seed: int, epoch_length: int | None = None):
        no_epoch_length("augmented views", epoch_length)
        order, pick = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
        while True:
            x = normalizer(self.sample(pick))
            yield shuffled_batches(x, torch.randperm(len(x), generator=order), batch_size)


@dataclass
class FeatureSplits:
    """Features (N, D) and labels (N,) per split (multi-label: (N, classes) 0/1 floats), plus what a head file needs
    to remember about the cache.

    `X_train` is what training reads: the train features, their augmented views (views=True) or a streamed split
    (max_memory exceeded). `x["train"]` is the plain tensor, or None when streamed."""

    x: dict[str, torch.Tensor | None]
    y: dict[str, torch.Tensor]
    classes: list[str]
    feature: str
    manifest: dict = field(repr=False)
    train_views: torch.Tensor | None = None  # (N, K, D) augmented views of the train split, when loaded
    stream: StreamedTrainSplit | None = None  # when the train features exceed the memory budget
    cache_dir: str = ""
    index: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # each row's `index` in the cache

    @property
    def device(self) -> torch.device:
        return self.y["train"].device  # labels are always in memory, where the features are

    @property
    def X_train(self):
        if self.stream is not None:
            return self.stream
        if self.train_views is not None:
            return AugmentedViews(self.train_views, self.x["train"])
        return self.x["train"]

    @property
    def y_train(self) -> torch.Tensor:
        return self.y["train"]

    def split(self, name: str, labels: bool = False):
        """A split's features (or labels); a clear error when the cache has no such split."""
        values = (self.y if labels else self.x).get(name)
        if values is None:
            raise DinoprobeError(f"cache {self.cache_dir} has no {name} split (it has {', '.join(self.y)}); "
                                 f"{'score on val instead, or ' if name == 'test' else ''}build the cache from data "
                                 f"with a {name}/ folder (or {name} rows)")
        return values

    X_val = property(lambda self: self.split("val"))
    y_val = property(lambda self: self.split("val", labels=True))
    X_test = property(lambda self: self.split("test"))
    y_test = property(lambda self: self.split("test", labels=True))

    @property
    def dim(self) -> int:
        return int(self.stream.dim if self.stream is not None else self.x["train"].shape[1])

    @property
    def n_train(self) -> int:
        return len(self.y["train"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        return self.y["train"].dim() == 2


def check_labels(cache_dir, classes: list[str], y: dict[str, torch.Tensor]) -> None:
    """Before any training: every label names a class of the cache, train holds at least two classes, and val
    and test hold none that train lacks (a head can never predict those: model selection and balanced accuracy
    would be silently wrong). Multi-label caches: see check_label_sets."""
    check_label_values(cache_dir, classes, y)
    if y["train"].dim() == 2:
        return check_label_sets(cache_dir, classes, y)
    present = sorted(set(y["train"].tolist()))
    if len(present) < 2:
        raise DinoprobeError(f"cache {cache_dir}: train holds only class {[classes[i] for i in present]}; a "
                             "classifier needs at least 2 classes in train")
    for split in ("val", "test"):
        unseen = sorted(set(y.get(split, torch.zeros(0)).tolist()) - set(present))
        if unseen:
            names = [classes[int(i)] for i in unseen]
            raise DinoprobeError(f"cache {cache_dir}: {split} holds class(es) {names[:5]} that are not in train; a "
                                 "head cannot predict them — add training images of those classes, or drop them "
                                 f"from {split}")


def check_label_values(cache_dir, classes: list[str], y: dict[str, torch.Tensor]) -> None:
    """Every label names a class of the cache: a class index (single-label), or one 0/1 column per class."""
    damaged = "the cache is damaged — rebuild it with --overwrite"
    for split, labels in y.items():
        if labels.dim() == 1:
            outside = sorted({int(v) for v in labels.tolist() if not 0 <= v < len(classes)})
            if outside:
                raise DinoprobeError(f"cache {cache_dir}: {split} holds label {outside[0]}"
                                     f"{f' (and {len(outside) - 1} more)' if len(outside) > 1 else ''}, outside its "
                                     f"{len(classes)} classes; {damaged}")
        elif labels.shape[1] != len(classes):
            raise DinoprobeError(f"cache {cache_dir}: {split} labels have {labels.shape[1]} columns for "
                                 f"{len(classes)} classes; {damaged}")
        elif ((labels != 0) & (labels != 1)).any():
            raise DinoprobeError(f"cache {cache_dir}: {split} labels hold values other than 0 and 1 (one column per "
                                 f"class, 1 where the image has it); {damaged}")


def check_label_sets(cache_dir, classes: list[str], y: dict[str, torch.Tensor]) -> None:
    """Multi-label caches: train has positives; a class without positive training rows (its head learns "never")
    or without positive validation rows (left out of the val mAP) is named in a warning."""
    if not y["train"].any():
        raise DinoprobeError(f"cache {cache_dir}: no train image has any label; nothing to learn")
    for split, what in (("train", "its head can only learn to say no"), ("val", "left out of the val mAP")):
        if split in y and len(y[split]):
            absent = [classes[i] for i in (y[split].sum(0) == 0).nonzero().flatten().tolist()]
            if absent:
                warnings.warn(f"cache {cache_dir}: {len(absent)} class(es) have no positive {split} image ({what}): "
                              f"{', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}", stacklevel=3)


# bytes a method works in beside its features: a number, or one computed from the manifest and the widest feature's
# width (a solver whose working set grows with the cache's rows and classes)
WorkingBytes = int | Callable[[dict, int], int]


def load_cache(cache_dir, feature: str = "cls", device="cpu", require_val: bool = True, views: bool = False,
               max_memory: int | None = None, working_copies: int = 0, working_bytes: WorkingBytes = 0,
               streamable: bool = True) -> FeatureSplits:
    """Read and validate a cache for training: a train split with >= 2 classes, a non-empty val split."""
    return load_features(cache_dir, (feature,), device, require_val, views, max_memory, working_copies,
                         working_bytes, streamable)[feature]


ROW_EXTRAS = 128  # bytes per row besides features: label, index, and its path as a Python string


def memory_needed(manifest: dict, wanted: dict, views: bool = False, working_copies: int = 0,
                  working_bytes: WorkingBytes = 0, device=torch.device("cpu")) -> tuple[int, int]:
    """(host, device) bytes that loading `wanted` ({feature: parts}) and training on it take at their peak.

    Loading holds each feature choice's float32 features (built shard by shard: the stored columns are never held
    whole), each row's label, index and path, and a shard in flight four times over (its bytes as they are hashed,
    its columns, and their float32 selection, twice the size of float16 columns); a GPU holds the float32 features.
    Augmented views are read as stored, then made float32. Training, once the load is done, works on one feature
    choice at a time, and where it runs (`device`) adds `working_copies` float32-sized copies of its train and val
    rows (a normalised copy: 1; logistic regression's float64 copy: 2), `working_bytes` more (k-NN's similarity
    blocks; or a function of the manifest and the widest feature's width, for a working set that grows with the
    cache, such as logistic regression's solver), and with views each epoch's pick of one view per train image.
    After training, on the host, the run's metrics score its largest val or test split (`scoring_bytes`)."""
    dim = manifest.get("feature_dim", 0)
    stored_size = 2 if manifest.get("dtype", "float16") == "float16" else 4
    shards = [s for info in manifest["splits"].values() for s in info["shards"]]
    rows = cache.split_rows(manifest)
    total, train = sum(rows.values()), rows.get("train", 0)
    features = sum(width(parts, dim) for parts in wanted.values()) * 4
    widest = max(width(parts, dim) for parts in wanted.values()) * 4
    if callable(working_bytes):
        working_bytes = working_bytes(manifest, widest // 4)
    view_count = manifest["fingerprint"].get("views", {}).get("count", 0) if views else 0
    view_stored = sum(dim for c in columns(tuple(p for ps in wanted.values() for p in ps)) if c != "cls_blocks")
    held = total * features + train * view_count * features
    in_flight = 4 * max((s["bytes"] for s in shards), default=0)
    working = working_copies * (train + rows.get("val", 0)) * widest + bool(view_count) * train * widest + \
        working_bytes
    on_cpu = torch.device(device).type == "cpu"
    host = held + total * ROW_EXTRAS + train * view_count * view_stored * stored_size + \
        max(in_flight, working if on_cpu else 0, scoring_bytes(manifest))
    return host, held + (0 if on_cpu else working)


def scoring_bytes(manifest: dict) -> int:
    """What scoring a run's largest val or test split holds at its peak: a block of single-label rows (at most
    settings.SCORING_BYTES), or a whole multi-label split, whose average precision ranks all of its rows."""
    rows = cache.split_rows(manifest)
    scored = max(rows.get("val", 0), rows.get("test", 0))
    classes = len(manifest["classes"])
    if manifest.get("task") == "multilabel":
        return scored * classes * settings.MULTILABEL_SCORE_CELL_BYTES
    return min(scored, settings.scoring_rows(classes)) * classes * settings.SCORE_CELL_BYTES


def memory_shortfall(manifest: dict, wanted: dict, views: bool, device: torch.device, working_copies: int = 0,
                     working_bytes: WorkingBytes = 0) -> tuple[int, int, str] | None:
    """(bytes needed, bytes available, "cpu" or "cuda") where memory_needed exceeds what is available, or None."""
    host, on_device = memory_needed(manifest, wanted, views, working_copies, working_bytes, device)
    for where in dict.fromkeys([torch.device("cpu"), device]):
        need = host if where.type == "cpu" else on_device
        available = memory_available(where)
        if available is not None and need > available:
            return need, available, where.type
    return None


def check_memory(cache_dir, manifest: dict, wanted: dict, views: bool, device: torch.device,
                 working_copies: int = 0, working_bytes: WorkingBytes = 0, streamable: bool = True) -> None:
    """Refuse, naming the fix, features that cannot fit where they would be held and trained on (memory_needed):
    past the available memory the system would kill the process mid-run (Linux overcommits, then its OOM killer
    strikes), with no message. `streamable`: the caller can stream the train split (probe, sweep: --max-memory)."""
    short = memory_shortfall(manifest, wanted, views, device, working_copies, working_bytes)
    if short is None:
        return
    need, available, where = short
    half = available // 2  # a budget that leaves the rest of the run room
    budget = next(f"{half // scale}{unit}" for scale, unit in ((2**30, "GB"), (2**20, "MB"), (2**10, "KB"), (1, "B"))
                  if half >= 10 * scale or scale == 1)  # two digits at least: 2338KB, not 2MB
    stream = (f"give probe or sweep --max-memory {budget} to stream the train split from disk (its batch order then "
              "differs from in-memory training), " if streamable else
              "fit on fewer rows (--shots; this method holds the train split in memory), ")
    raise DinoprobeError(f"cache {cache_dir}: its features, and training on them, need about {need / 2**30:.1f} GiB "
                         f"in {where} memory and {available / 2**30:.1f} GiB are available; {stream}choose a narrower "
                         "--feature, or use a machine with more memory")


def check_holds(cache_dir, manifest: dict, features, parts: tuple[str, ...]) -> None:
    """Refuse feature choices whose stored columns, or last blocks' CLS tokens, the cache lacks, naming the fix."""
    stored = manifest.get("features", list(cache.FEATURE_KINDS))
    lacking = [c for c in columns(parts) if c not in stored and c != "cls_blocks"]
    if lacking:
        raise DinoprobeError(f"cache {cache_dir} has no {lacking} features (it has {stored}); pick another --feature")
    have_blocks = int(manifest.get("last_blocks", 0))
    if blocks_needed(parts) > have_blocks:
        raise DinoprobeError(f"--feature {'/'.join(features)} needs the CLS tokens of the last {blocks_needed(parts)} "
                             f"blocks, and cache {cache_dir} holds {have_blocks}; rebuild it with `dinoprobe features "
                             f"--last-blocks {blocks_needed(parts)}` (into another --cache, or with --overwrite)")


def check_trainable(cache_dir, manifest: dict) -> None:
    """Refuse an evaluation set's cache (only val or test images) for training, naming what it serves."""
    if "train" not in manifest["splits"]:
        rows = ", ".join(f"{split} {n} rows" for split, n in cache.split_rows(manifest).items())
        raise DinoprobeError(f"cache {cache_dir} has no train split: it is an evaluation set ({rows}); train on "
                             "another cache, then score the head on this one with `dinoprobe score --run RUN "
                             f"--cache {cache_dir}`")


@dataclass
class LabelledSplit:
    """One split of a cache, for scoring a trained head: features (N, width) float32, labels (N,) or (N, classes),
    each row's `index` and input path, and the cache's manifest."""

    x: torch.Tensor
    y: torch.Tensor
    index: np.ndarray
    path: np.ndarray
    manifest: dict = field(repr=False)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def multilabel(self) -> bool:
        return self.manifest.get("task") == "multilabel"


def check_scorable_split(cache_dir, manifest: dict, split: str, feature: str, device: torch.device) -> None:
    """Refuse a split with no rows to score, or whose features, and scoring them, do not fit in memory."""
    if cache.split_rows(manifest)[split] == 0:
        raise DinoprobeError(f"cache {cache_dir}: its {split} split holds no rows, so there is nothing to score (the "
                             f"inputs `features` skipped, with their reasons: dinoprobe cache skipped {cache_dir})")
    # the split alone, keyed as a test split: scoring_bytes counts what scoring a val or test split holds
    scored = {**manifest, "splits": {"test": manifest["splits"][split]}}
    short = memory_shortfall(scored, {feature: parse_feature(feature)}, False, device)
    if short is not None:
        need, available, where = short
        raise DinoprobeError(f"cache {cache_dir}: its {split} split's features, and scoring them, need about "
                             f"{need / 2**30:.1f} GiB in {where} memory and {available / 2**30:.1f} GiB are available; "
                             "use a machine with more memory, or split the images into several caches")


def load_split(cache_dir, split: str, feature: str, device="cpu") -> LabelledSplit:
    """Read and verify one split of a cache with one feature choice, for scoring (no train split needed: an
    evaluation set's cache has none). Refused up front when the split's features, and scoring them, do not fit
    (memory_needed, counted for this split alone)."""
    device = resolve_device(device)
    parts = parse_feature(feature)
    manifest = cache.open_manifest(cache_dir)
    if split not in manifest["splits"]:
        raise DinoprobeError(f"cache {cache_dir} has no {split} split (it has {', '.join(manifest['splits'])}); "
                             f"pass --split {next(s for s in ('test', 'val', 'train') if s in manifest['splits'])}"
                             f", or build the cache with a {split}/ "
                             f"folder (or {split} rows)")
    check_holds(cache_dir, manifest, [feature], parts)
    check_scorable_split(cache_dir, manifest, split, feature, device)
    read = cache.load(cache_dir, split, columns(parts), manifest=manifest, selections={feature: parts})
    label = cache.label_column(manifest)
    x = torch.from_numpy(read[feature]).to(device)
    check_finite(cache_dir, split, x, read["path"])
    y = torch.from_numpy(read[label].astype(np.float32 if label == "labels" else np.int64))
    check_label_values(cache_dir, manifest["classes"], {split: y})
    return LabelledSplit(x, y, read["index"], read["path"], manifest)


def load_features(cache_dir, features, device="cpu", require_val: bool = True, views: bool = False,
                  max_memory: int | None = None, working_copies: int = 0, working_bytes: WorkingBytes = 0,
                  streamable: bool = True) -> dict[str, FeatureSplits]:
    """`load_cache` for several feature choices at once (a sweep's): every shard is read and verified once.
    `working_copies`: float32-sized copies of the train and val features that training will make (a normalised
    copy: 1), and `working_bytes` more it takes, which the memory check counts."""
    device = resolve_device(device)
    wanted = {f: parse_feature(f) for f in features}
    parts = tuple(dict.fromkeys(p for ps in wanted.values() for p in ps))
    manifest = cache.open_manifest(cache_dir)
    check_holds(cache_dir, manifest, features, parts)
    check_trainable(cache_dir, manifest)
    if views and "cls_blocks" in columns(parts):
        raise DinoprobeError("augmented views hold cls and patch_mean only; use --views with those features")
    reader = cache.ShardReader(cache_dir)
    train_rows = cache.split_rows(manifest).get("train", 0)
    widest = max(width(ps, manifest.get("feature_dim", 0)) for ps in wanted.values())
    streamed = bool(max_memory) and train_rows * widest * 4 > max_memory
    if streamed and views:
        raise DinoprobeError("--views needs the train views in memory; raise --max-memory or drop --views")
    if not streamed:
        check_memory(cache_dir, manifest, wanted, views, device, working_copies, working_bytes, streamable)
    rows, y = {}, {}
    for split in manifest["splits"]:
        in_memory = not (split == "train" and streamed)
        rows[split] = cache.load(cache_dir, split, columns(parts) if in_memory else (), manifest=manifest,
                                 reader=reader, selections=wanted if in_memory else None)
        label = cache.label_column(manifest)
        y[split] = torch.from_numpy(rows[split][label].astype(np.float32 if label == "labels" else np.int64))
    classes = manifest["classes"]
    if len(y["train"]) == 0:
        raise DinoprobeError(f"cache {cache_dir} has an empty train split; nothing to train on")
    check_labels(cache_dir, classes, y)
    if require_val and len(y.get("val", ())) == 0:
        raise DinoprobeError(f"cache {cache_dir} has an empty val split; the best epoch is chosen on val — rebuild "
                             "the cache with a val/ folder or --val-fraction")
    splits = [s for s in y if len(y[s])]  # e.g. an empty test split: simply not evaluated
    view_rows = None
    if views:
        view_rows = cache.load(cache_dir, "train", tuple(f"{c}_views" for c in columns(parts)), manifest=manifest,
                               reader=reader)
    out = {}
    for feature, feature_part in wanted.items():
        x = {s: None if s == "train" and streamed else torch.from_numpy(rows[s][feature]).to(device) for s in splits}
        for s in x:
            if x[s] is not None:
                check_finite(cache_dir, s, x[s], rows[s]["path"])
        train_views = None
        if view_rows is not None:
            train_views = torch.from_numpy(np.concatenate(
                [view_rows[f"{p}_views"].astype(np.float32) for p in feature_part], axis=2)).to(device)
            check_finite(cache_dir, "train view", train_views, view_rows["path"])
        stream = (StreamedTrainSplit(reader, manifest, feature_part, max_memory, device) if streamed
                  else None)
        out[feature] = FeatureSplits(x, {s: y[s].to(device) for s in splits}, classes, feature, manifest,
                                     train_views, stream, str(cache_dir), {s: rows[s]["index"] for s in splits})
    return out


