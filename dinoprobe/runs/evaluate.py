"""`dinoprobe evaluate`: a protocol suite on one or more caches, one results table, the way a paper's table reads.

For each cache: the linear protocol (the preset's sweep, its best head on val), DINOv3's logistic regression,
DINO's k-NN (test top-1 for every k) and, when asked, few-shot logistic regression (K images per class, T tries,
mean ± sample std), and the linear protocol's head scored on further test caches (DINOv3's `test_datasets`:
ImageNet-V2, -R, ... for an ImageNet head). Each protocol writes its normal run directory under OUT/<cache>/; a run
directory that exists is a finished protocol (they appear atomically), so an interrupted evaluate resumes where it
stopped. The table is written as results.csv, results.json and results.md.
"""
from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from pathlib import Path

from dinoprobe import documents
from dinoprobe.atomic import write_json, write_text
from dinoprobe.cache.arrays import check_holds, check_scorable_split, check_trainable, memory_shortfall
from dinoprobe.cache.specs import parse_feature
from dinoprobe.cache.store import FolderLock, open_manifest
from dinoprobe.device import environment, resolve_device
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.knn import KNN
from dinoprobe.estimators.logreg import LogReg
from dinoprobe.estimators.probe import Probe
from dinoprobe.estimators.sweep import Sweep
from dinoprobe.paths import resolved
from dinoprobe.runs.experiments import heads_working, knn_working, logreg_working, run_knn, run_logreg, run_sweep
from dinoprobe.runs.rundir import run_command
from dinoprobe.runs.score import check_evaluation_set, score_run
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
    record = {"cache": str(resolved(cache_dir)), "content": content_id(manifest)}
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


def cache_names(caches) -> list[str]:
    """Each cache's name in the table and under OUT: its folder's, numbered from -2 when taken."""
    names = []
    for cache_dir in caches:
        name, n = resolved(cache_dir).name, 2
        unique = name
        while unique in names:
            unique, n = f"{name}-{n}", n + 1
        names.append(unique)
    return names


def evaluate(caches, out, *, protocol: str = "dinov3", shots=(), tries: int = 5, device: str = "auto",
             linear_overrides: dict | None = None, test_caches=(), restrict_classes: bool = False,
             log=lambda message: None, progress: bool = False) -> list[dict]:
    """Run the suite on every cache into OUT/<cache>/<protocol>/, reusing finished protocol runs; write and return
    the table (one row per cache). linear_overrides (e.g. {"epochs": 2}) replace the linear preset's settings,
    for a quick look: the numbers are then not the protocol's, and the table says which were changed.
    test_caches: "PATH" (with one cache) or "CACHE=PATH" (CACHE: a cache's name in the table) — evaluation sets
    the linear protocol's best head is scored on, each a column named after its folder; `restrict_classes`: scored
    over each test cache's own classes (ImageNet-R/-A's 200). `progress`: each protocol's bars on stderr (the
    command line's)."""
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
        a, b = resolved(out), resolved(cache_dir)
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
    names = cache_names(caches)
    preset = SUITES[protocol]
    overrides = {k: [v] for k, v in (linear_overrides or {}).items()}
    linear_configs = [c for _, c in Sweep(Probe(device=device), preset=preset, param_grid=overrides).configurations()]
    for cache_dir, manifest in zip(caches, manifests):  # and whether each protocol's features fit in memory
        check_protocols_fit(cache_dir, manifest, resolve_device(device), (
            ("linear", PROTOCOLS[preset]["features"], heads_working(linear_configs)),
            ("logistic regression", ["cls"], logreg_working(LogReg.dinov3())), ("k-NN", ["cls"], knn_working(KNN()))))
    tests = [check_test_caches(paired, cache_dir, manifest, out, PROTOCOLS[preset]["features"], resolve_device(device))
             for paired, cache_dir, manifest in zip(pair_test_caches(test_caches, names), caches, manifests)]
    out.mkdir(parents=True, exist_ok=True)
    # one evaluation per folder at a time: a second one (a job submitted twice) would race the first for the same
    # protocol runs; the lock makes it one line naming the first's pid
    with FolderLock(out, what="evaluation"):
        bases = []
        for cache_dir, manifest, name in zip(caches, manifests, names):
            claim(out / name, cache_dir, manifest)
            bases.append(out / name)
        rows = []
        for cache_dir, manifest, base, scored_on in zip(caches, manifests, bases, tests):
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
            for test_dir, (test_name, split) in scored_on.items():  # recomputed each time: seconds, never stale
                log(f"{name}: the linear head on {test_name}")
                test = score_run(base / "linear", test_dir, split, restrict_classes=restrict_classes and not multilabel,
                                 out=base / f"linear-{test_name}", overwrite=True, device=device)
                row[f"linear_{test_name}_{metric}"] = test[split].get(score)
            if scored_on:
                row["restrict_classes"] = restrict_classes and not multilabel
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
        test_record = {name: {test_name: {"cache": str(test_dir), "split": split}
                              for test_dir, (test_name, split) in scored_on.items()}
                       for name, scored_on in zip(names, tests) if scored_on}
        write_table(out, rows, protocol, resolve_device(device), test_record)
        return rows


def pair_test_caches(specs, names: list[str]) -> list[list[Path]]:
    """Each --test-cache with the cache whose linear head it tests: "CACHE=PATH" names it (CACHE as in the table);
    a bare PATH belongs to the only cache."""
    paired = [[] for _ in names]
    for spec in map(str, specs):
        name, sep, path = spec.partition("=")
        if sep and name in names:
            paired[names.index(name)].append(Path(path))
        elif len(names) == 1:
            paired[0].append(Path(spec))
        else:
            raise DinoprobeError(f"--test-cache {spec}: with several caches, name the one whose head it tests, as "
                                 f"CACHE=PATH with CACHE one of: {', '.join(names)}")
    return paired


def evaluation_split(cache_dir, manifest: dict) -> str:
    """The split of a test cache that is scored: its test split, or the only split of an evaluation set."""
    splits = list(manifest["splits"])
    if "test" in splits:
        return "test"
    if splits == ["val"]:
        return "val"
    raise DinoprobeError(f"test cache {cache_dir} has no test split (it has {', '.join(splits)}); build it from a "
                         "folder of test/ images (or val/ alone), a file list with test rows, or a test split")


def check_test_caches(paths: list[Path], cache_dir, manifest: dict, out: Path, features, device) -> dict:
    """{test cache: (its column name, the split scored)} for one cache, each checked as `score` would check it
    against that cache's head — before anything trains."""
    checked, names = {}, {}
    for path in paths:
        a, b = resolved(out), resolved(path)
        if a == b or b in a.parents or a in b.parents:
            raise DinoprobeError(f"--out '{out}' overlaps the test cache {path}; write the evaluation elsewhere")
        if b == resolved(cache_dir):
            raise DinoprobeError(f"test cache {path} is the cache {cache_dir} itself, whose test split the table "
                                 "already reports; pass another cache")
        name = b.name
        if name in ("val", "test"):  # linear_val_top1 and linear_test_top1 are the evaluated cache's own columns
            raise DinoprobeError(f"test cache {path} is a folder named '{name}', and its column would be the "
                                 f"evaluated cache's own linear_{name}_ one; give the test cache another folder name")
        if name in names:
            raise DinoprobeError(f"test caches {names[name]} and {path} of {cache_dir} are both named '{name}', the "
                                 "name of their column; give them folders of different names")
        names[name] = path
        test = open_manifest(path)
        split = evaluation_split(path, test)
        check_evaluation_set(manifest["fingerprint"], manifest["classes"], manifest.get("task") == "multilabel", test,
                             path)
        for feature in features:
            check_holds(path, test, [feature], parse_feature(feature))
            check_scorable_split(path, test, split, feature, device)
        checked[path] = (name, split)
    return checked


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


def write_table(out: Path, rows: list[dict], protocol: str, device=None, test_caches: dict | None = None) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", buffer.getvalue())
    document = {"protocol": protocol, "rows": rows}
    if test_caches:  # {cache: {column name: {"cache": path, "split": split}}}
        document["test_caches"] = test_caches
    write_json(out / "results.json", {**document, "environment": environment(device)})
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
