"""`dinoprobe evaluate`: a protocol suite on one or more caches, one results table, the way a paper's table reads.

For each cache: the linear protocol (the preset's sweep, its best head on val), DINOv3's logistic regression,
DINO's k-NN (test top-1 for every k) and, when asked, few-shot logistic regression (K images per class, T tries,
mean ± sample std). Each protocol writes its normal run directory under OUT/<cache>/; a run directory that exists
is a finished protocol (they appear atomically), so an interrupted evaluate resumes where it stopped. The table is
written as results.csv, results.json and results.md.
"""
from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from pathlib import Path

from dinoprobe import documents
from dinoprobe.atomic import write_json, write_text
from dinoprobe.cache.arrays import check_trainable, memory_shortfall
from dinoprobe.cache.specs import parse_feature
from dinoprobe.cache.store import FolderLock, open_manifest
from dinoprobe.device import environment, resolve_device
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.knn import KNN
from dinoprobe.estimators.logreg import LogReg
from dinoprobe.estimators.probe import Probe
from dinoprobe.estimators.sweep import Sweep
from dinoprobe.runs.experiments import KNN_WORKING, heads_working, logreg_working, run_knn, run_logreg, run_sweep
from dinoprobe.runs.rundir import run_command
from dinoprobe.settings import EVAL_SUITES as SUITES
from dinoprobe.settings import PROTOCOLS
from dinoprobe.splits import parse_shots


def content_id(manifest: dict) -> str:
    """What a cache holds: its fingerprint and every shard's sha256 (a rebuilt or another cache differs)."""
    import hashlib

    shards = sorted(shard["sha256"] for split in manifest["splits"].values() for shard in split["shards"])
    return hashlib.sha256(json.dumps([manifest["fingerprint"], shards], sort_keys=True).encode()).hexdigest()


def claim(base: Path, cache_dir, manifest: dict) -> None:
    """OUT/<cache>/ belongs to one cache's content: recorded on first use, checked on every resume, so the runs of
    another cache (or of this one before it was rebuilt) are never reused or mixed in."""
    record = {"cache": str(Path(cache_dir).resolve()), "content": content_id(manifest)}
    path = base / "cache.json"
    if path.exists():
        try:
            known = documents.parse(path.read_bytes(), str(path), "")
        except DinoprobeError:
            known = {}
        known = known if isinstance(known, dict) else {}
        if known.get("content") != record["content"]:
            raise DinoprobeError(f"'{base}' holds the runs of another cache ({known.get('cache') or 'unknown'}), or of this one "
                                 "before it was rebuilt; evaluate into another --out, or remove that folder")
        return
    base.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def _finished(out: Path, command: str) -> dict | None:
    """The metrics of a protocol run that already finished in `out` (written by `command`), else None."""
    if out.is_dir() and run_command(out) == command:
        path = out / ("best" if command == "sweep" else "") / "metrics.json"
        with _reading(out):
            metrics = documents.parse(path.read_bytes(), str(path), REDO.format(out))
        if not isinstance(metrics, dict) or not metrics:
            raise DinoprobeError(f"{path} holds no metrics; {REDO.format(out)}")
        return metrics
    return None


REDO = "remove '{}' and rerun the same `dinoprobe evaluate` to compute it again"


@contextmanager
def _reading(run: Path):
    """What a finished protocol's files say, read back on a resume: a file edited or damaged since is one line naming
    the run to compute again, not a KeyError from the middle of the table."""
    try:
        yield
    except DinoprobeError:
        raise
    except (OSError, KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise DinoprobeError(f"'{run}' is a damaged run directory ({type(err).__name__}: {str(err)[:120]}); "
                             f"{REDO.format(run)}") from None


def cache_name(cache_dir, taken: set[str]) -> str:
    name, n = Path(cache_dir).resolve().name, 2
    unique = name
    while unique in taken:
        unique, n = f"{name}-{n}", n + 1
    return unique


def evaluate(caches, out, *, protocol: str = "dinov3", shots=(), tries: int = 5, device: str = "auto",
             linear_overrides: dict | None = None, log=lambda message: None, progress: bool = False) -> list[dict]:
    """Run the suite on every cache into OUT/<cache>/<protocol>/, reusing finished protocol runs; write and return
    the table (one row per cache). linear_overrides (e.g. {"epochs": 2}) replace the linear preset's settings,
    for a quick look: the numbers are then not the protocol's, and the table says which were changed. `progress`:
    each protocol's bars on stderr (the command line's)."""
    if protocol not in SUITES:
        raise DinoprobeError(f"unknown protocol {protocol!r}; protocols are {', '.join(SUITES)}")
    caches = [Path(c) for c in ([caches] if isinstance(caches, (str, Path)) else caches)]
    if not caches:
        raise DinoprobeError("no cache to evaluate; pass one or more --cache")
    out = Path(out)
    for shot in shots:
        parse_shots(shot)
    # Every cache is checked before anything is written or trained: the suite takes hours per cache, and a fault in
    # the last one must not wait for the others. OUT never lands inside a cache, nor a cache inside OUT.
    manifests, seen = [], {}
    for cache_dir in caches:
        a, b = out.resolve(), cache_dir.resolve()
        if a == b or b in a.parents or a in b.parents:
            raise DinoprobeError(f"--out '{out}' overlaps the cache {cache_dir}; write the evaluation elsewhere")
        if b in seen:
            raise DinoprobeError(f"cache {cache_dir} is given twice (also as {seen[b]}); pass each cache once")
        seen[b] = cache_dir
        manifest = open_manifest(cache_dir)  # a cache that is not sound fails here
        check_trainable(cache_dir, manifest)
        if manifest.get("task") == "multilabel" and shots:
            raise DinoprobeError(f"cache {cache_dir} is multi-label, and few-shot draws K images per class, which "
                                 "a multi-label image does not belong to one of; drop --shots, or evaluate that "
                                 "cache without it")
        manifests.append(manifest)
    preset = SUITES[protocol]
    overrides = {k: [v] for k, v in (linear_overrides or {}).items()}
    linear_configs = [c for _, c in Sweep(Probe(device=device), preset=preset, param_grid=overrides).configurations()]
    for cache_dir, manifest in zip(caches, manifests):  # and whether each protocol's features fit in memory
        check_protocols_fit(cache_dir, manifest, resolve_device(device), (
            ("linear", PROTOCOLS[preset]["features"], heads_working(linear_configs)),
            ("logistic regression", ["cls"], logreg_working(LogReg.dinov3())), ("k-NN", ["cls"], KNN_WORKING)))
    out.mkdir(parents=True, exist_ok=True)
    # one evaluation per folder at a time: a second one (a job submitted twice) would race the first for the same
    # protocol runs; the lock makes it one line naming the first's pid
    with FolderLock(out, what="evaluation"):
        bases, taken = [], set()
        for cache_dir, manifest in zip(caches, manifests):
            name = cache_name(cache_dir, taken)
            taken.add(name)
            claim(out / name, cache_dir, manifest)
            bases.append(out / name)
        rows = []
        for cache_dir, manifest, base in zip(caches, manifests, bases):
            name = base.name
            fp = manifest["fingerprint"]
            multilabel = manifest.get("task") == "multilabel"
            score, metric = ("map_macro", "map") if multilabel else ("top1", "top1")  # what each protocol reports
            transform = fp.get("transform", {})
            row = {"cache": name, "model": fp.get("model"), "weights": fp.get("weights", {}).get("source"),
                   "image_size": transform.get("image_size"), "transform": transform.get("name", "timm"),
                   "crop_pct": transform.get("crop_pct")}
            features = [f for f in PROTOCOLS[preset]["features"]]
            log(f"{name}: linear ({preset})")
            linear = _finished(base / "linear", "sweep")
            if linear is None:
                search = Sweep(Probe(device=device, progress=progress), preset=preset, param_grid=overrides)
                _, linear = run_sweep(cache_dir, base / "linear", search, features=features)
            with _reading(base / "linear"):
                best_run = base / "linear" / "best" / "run.json"
                best = documents.parse(best_run.read_bytes(), str(best_run), REDO.format(base / "linear"))["config"]
                row.update({f"linear_val_{metric}": linear.get("val", {}).get(score),
                            f"linear_test_{metric}": linear.get("test", {}).get(score),
                            "linear_best": f"{best['feature']} lr {best['lr']:g}"})
            log(f"{name}: logistic regression")
            logreg = _finished(base / "logreg", "logreg") or run_logreg(cache_dir, base / "logreg",
                                                                       LogReg.dinov3(device=device, progress=progress))
            with _reading(base / "logreg"):
                row.update({f"logreg_val_{metric}": logreg.get("val", {}).get(score),
                            f"logreg_test_{metric}": logreg.get("test", {}).get(score), "logreg_C": logreg["best_c"]})
            log(f"{name}: k-NN")
            knn = _finished(base / "knn", "knn") or run_knn(cache_dir, base / "knn", KNN(device=device, progress=progress))
            with _reading(base / "knn"):
                knn_scores = knn[f"{metric}_per_k"]
                per_k = knn_scores.get("test") or knn_scores["val"]
                row.update({f"knn_{'test' if 'test' in knn_scores else 'val'}_{metric}_k{k}": v
                            for k, v in per_k.items()})
                row["knn_val_best_k"] = knn["k"]
            for k in shots:
                log(f"{name}: few-shot logistic regression, {k} per class x {tries}")
                run = base / f"logreg-{k}shot"
                few = _finished(run, "logreg") or run_logreg(cache_dir, run,
                                                            LogReg.dinov3(shots=k, tries=tries, device=device,
                                                                          progress=progress))
                with _reading(run):
                    split = "test" if "test" in few["few_shot"] else "val"
                    row[f"fewshot_{k}_{split}_top1_mean"] = few["few_shot"][split]["top1_mean"]
                    row[f"fewshot_{k}_{split}_top1_std"] = few["few_shot"][split]["top1_std"]
            if linear_overrides:
                row["linear_overrides"] = json.dumps(linear_overrides, sort_keys=True)
            rows.append(row)
        write_table(out, rows, protocol, resolve_device(device))
        return rows


def check_protocols_fit(cache_dir, manifest: dict, device, protocols) -> None:
    """Refuse, before the first protocol trains, a cache whose features some protocol (name, feature specs, what it
    holds beside them) could not hold in memory: found when that protocol starts, hours of the others are done."""
    for name, features, working in protocols:
        short = memory_shortfall(manifest, {f: parse_feature(f) for f in features}, False, device, **working)
        if short is not None:
            need, available, where = short
            raise DinoprobeError(
                f"cache {cache_dir}: the {name} protocol needs about {need / 2**30:.1f} GiB in {where} memory and "
                f"{available / 2**30:.1f} GiB are available; evaluate holds each protocol's features in memory — use "
                "a machine with more memory, or run the protocols one at a time (`dinoprobe sweep --max-memory` "
                "streams the train split from disk)")


def write_table(out: Path, rows: list[dict], protocol: str, device=None) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", buffer.getvalue())
    write_json(out / "results.json", {"protocol": protocol, "rows": rows, "environment": environment(device)})
    write_text(out / "results.md", markdown(rows, protocol))


def markdown(rows: list[dict], protocol: str) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def cell(field: str, value) -> str:
        if isinstance(value, float) and ("top1" in field or "_map" in field):
            return f"{100 * value:.1f}"
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    lines = [f"Protocol `{protocol}` (top-1, or macro mAP for multi-label caches, in %; few-shot: mean ± sample std "
             "over tries)", "",
             "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(cell(f, r.get(f)) for f in fields) + " |" for r in rows]
    return "\n".join(lines) + "\n"
