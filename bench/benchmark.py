"""`make bench` (`python -m bench.benchmark`): what this machine can do and how close dinoprobe gets, every
comparison a ratio from one run.

Sections: (1) roofline — matmul throughput and FLOPs/image; (2) bare backbone forward; (3) the `features`
pipeline on JPEGs and on CIFAR-style arrays, interleaved with bare forwards for a same-moment ratio; (4) the
original method (backbone every epoch) vs features + probe; (5) heads on 50k cached features, the sweep
side by side vs one after another, the 45-C logistic regression vs scikit-learn; (6) the transformers route of
the original second script. Each figure is a median over repeats after a warm-up.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

SCALES = {
    # small: the whole run in under ~3 minutes on 2 CPU cores
    "small": dict(image_size=224, batch_size=8, batch_sizes=(8,), repeats=3, pipeline_images=40, array_images=40,
                  worker_processes=False, process_images=16,
                  original_size=64, original_images=4, original_epochs=(5, 100), original_workers=0,
                  head_rows=50_000, head_epochs=100, reference_epochs=10, mlp_epochs=5, large_batch=True,
                  sweep_configs=32, sweep_rows=5_000, sweep_epochs=10, logreg_rows=1_500,
                  metrics_rows=20_000, metrics_classes=2_000, multilabel_rows=10_000, multilabel_classes=500,
                  transformers_images=8),
    "full": dict(image_size=224, batch_size=8, batch_sizes=(1, 8, 16, 32, 64), repeats=5, pipeline_images=256,
                 array_images=256, worker_processes=True, process_images=256,
                 original_size=224, original_images=70, original_epochs=(5, 100), original_workers=2,
                 head_rows=50_000, head_epochs=100, reference_epochs=100, mlp_epochs=100, large_batch=True,
                 sweep_configs=32, sweep_rows=50_000, sweep_epochs=100, logreg_rows=50_000, transformers_images=32,
                 metrics_rows=50_000, metrics_classes=5_000, multilabel_rows=20_000, multilabel_classes=1_000),
    # smoke: every section at toy sizes in well under a minute; checks that the benchmark runs (tests use it),
    # its figures mean nothing
    "smoke": dict(image_size=32, batch_size=4, batch_sizes=(4,), repeats=1, pipeline_images=8, array_images=8,
                  worker_processes=False, process_images=4,
                  original_size=32, original_images=4, original_epochs=(1, 2), original_workers=0,
                  head_rows=1_000, head_epochs=2, reference_epochs=1, mlp_epochs=1, large_batch=True,
                  sweep_configs=4, sweep_rows=500, sweep_epochs=2, logreg_rows=300, transformers_images=2,
                  target_rows=300, preset_epoch_length=2, metrics_rows=200, metrics_classes=50,
                  multilabel_rows=200, multilabel_classes=20),
}
# On CUDA the CPU sizes would measure launch overhead: issue 4's GPU goal is at 256 px with large batches, and
# enough images that a pipeline run lasts seconds (first run on an H200: bench/results-h200.json).
GPU_OVERRIDES = {
    "small": dict(image_size=256, batch_size=256, batch_sizes=(256,), pipeline_images=4096, array_images=4096,
                  process_images=2048, target_rows=50_000, decode_images=512),
    "full": dict(image_size=256, batch_size=256, batch_sizes=(64, 128, 256, 512), pipeline_images=16384,
                 array_images=16384, process_images=8192),
}


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_info() -> dict:
    from dinoprobe.device import environment

    env = environment()  # the versions run.json and the manifest record, read the same way
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": env["python"], "torch": env["packages"]["torch"], "timm": env["packages"]["timm"]}


# --------------------------------------------------------------------------------------------- 1. roofline
def gemm_flops(device: torch.device, repeats: int) -> float:
    n = 4096 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def run():
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 / median_time(run, repeats)


# ------------------------------------------------------------------------------------------------ 2. forward
def forward_rate(backbone, batch: int, size: int, device, precision: str, repeats: int) -> float:
    from dinoprobe.device import autocast

    x = torch.randn(batch, 3, size, size, device=device)

    def run():
        with torch.inference_mode(), autocast(device, precision):
            backbone(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch / median_time(run, repeats)


# ----------------------------------------------------------------------------------------------- 3. pipeline
def jpeg_folder(root: Path, sources: list[Path], count: int) -> Path:
    """`count` real JPEGs (the given ones, cycled) in ROOT/train/<class>/ + a small val split."""
    for i in range(count):
        src = sources[i % len(sources)]
        dst = root / "train" / f"class{i % 2}" / f"{i:05d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    for c in range(2):
        (root / "val" / f"class{c}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[c], root / "val" / f"class{c}" / f"v{c}{sources[c].suffix}")
    return root


def array_source(count: int, seed: int = 0):
    """CIFAR-format data (uint8 32x32x3 arrays) through the same path `--data cifar10` takes."""
    from dinoprobe.extract.datasource import DataSource

    rng = np.random.default_rng(seed)
    arrays = {"train": rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
              "val": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)}
    splits = {s: [(f"bench:{s}:{i}", i % 10) for i in range(len(a))] for s, a in arrays.items()}
    return DataSource("cifar10", "bench-arrays", [str(i) for i in range(10)], splits, None, arrays)


def pipeline_rate(backbone, source, tmp: Path, batch: int, workers: int, device: str, decoder: str = "pil",
                  last_blocks: int = 4, compile: bool = False, decode_on_device: bool | None = None) -> float:
    from dinoprobe.extract.run import extract

    cache_dir = tmp / f"cache-{time.perf_counter_ns()}"
    summary = extract(backbone, source, cache_dir, batch_size=batch, workers=workers, device=device,
                      progress=False, decoder=decoder, last_blocks=last_blocks, compile=compile,
                      decode_on_device=decode_on_device)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return summary.images_per_second


def decode_rates(paths: list[str], config, repeats: int) -> dict:
    """Decode + resize + crop alone (no backbone), images/s: PIL's reference path vs --decoder torchvision."""
    from dinoprobe.extract.decode import TorchvisionDecode
    from dinoprobe.extract.transforms import worker_transform
    from dinoprobe.imagefiles import load_rgb

    pil, tv = worker_transform(config), TorchvisionDecode(config)
    decoders = {"pil": lambda p: pil(load_rgb(p)), "torchvision": tv}
    times = {name: [] for name in decoders}
    for _ in range(repeats):  # interleaved
        for name, decode in decoders.items():
            start = time.perf_counter()
            for path in paths:
                decode(path)
            times[name].append(time.perf_counter() - start)
    return {f"{name}_images_per_s": len(paths) / statistics.median(t) for name, t in times.items()}


def processes_section(folder: Path, size: int, batch: int) -> dict:
    """`features` images/s as reported by the CLI, one process vs `torchrun` with 2 (on one GPU they share it)."""
    import re
    import subprocess
    import sys

    rates = {}
    for n in (1, 2):
        cache_dir = folder.parent / f"procs-{n}"
        args = ["-m", "dinoprobe", "features", "--data", str(folder), "--weights", "random", "--image-size",
                str(size), "--batch-size", str(batch), "--cache", str(cache_dir)]
        cmd = [sys.executable, *args] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800).stdout
        found = re.search(r"\(([0-9.]+) images/s\)", out)
        rates[str(n)] = float(found.group(1)) if found else float("nan")
        shutil.rmtree(cache_dir, ignore_errors=True)
    return rates


# ----------------------------------------------------------------------------------- 4. original vs cached
def original_vs_cached(data_root: Path, size: int, epochs_list, tmp: Path, device: str, workers: int) -> list[dict]:
    from bench.reference import train_backbone_in_loop
    from dinoprobe import Probe
    from dinoprobe.cache.arrays import load_cache
    from dinoprobe.extract.backbone import build_backbone
    from dinoprobe.extract.run import extract
    from dinoprobe.extract.sources import open_source
    from dinoprobe.train.loop import TrainConfig

    backbone = build_backbone(weights="random", image_size=size, log=lambda *_: None)
    source = open_source(str(data_root))
    rows = []
    for epochs in epochs_list:
        # the original script: MLP head, Adam 1e-3, backbone over every image every epoch
        cfg = TrainConfig(head="mlp", optimizer="adam", lr=1e-3, batch_size=32, epochs=epochs)
        _, original = train_backbone_in_loop(backbone, source.splits["train"], source.splits["val"],
                                             len(source.classes), cfg, workers=workers)
        start = time.perf_counter()
        cache_dir = tmp / f"orig-cache-{epochs}"
        extract(backbone, source, cache_dir, batch_size=8, device=device, progress=False)
        extract_s = time.perf_counter() - start
        data = load_cache(cache_dir, "cls", device)
        probe = Probe(head="mlp", batch_size=32, epochs=epochs, device=device)
        probe.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
        total = time.perf_counter() - start
        shutil.rmtree(cache_dir, ignore_errors=True)
        rows.append({"epochs": epochs, "images": len(source.splits["train"]) + len(source.splits["val"]), "workers": workers,
                     "image_size": size, "original_s": original.seconds, "features_s": extract_s,
                     "probe_s": probe.train_seconds_, "dinoprobe_s": total, "speedup": original.seconds / total})
    return rows


# -------------------------------------------------------------------------------------------------- 5. heads
def synthetic_features(rows: int, dim: int = 384, classes: int = 10, seed: int = 0, device="cpu"):
    """(x_train, y_train, x_val, y_val): Gaussian class clusters, separable but not trivially."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 0.15

    def split(n):
        y = torch.randint(0, classes, (n,), generator=gen)
        return (centres[y] + torch.randn(n, dim, generator=gen)).to(device), y.to(device)
    return (*split(rows), *split(max(1000, rows // 10)))


def heads_section(cfg: dict, device) -> dict:
    from bench.reference import train_on_tensors
    from dinoprobe import Probe, Sweep
    from dinoprobe.estimators.logreg import fit_logreg_batched, fit_logreg_sklearn
    from dinoprobe.settings import DEFAULT_C_GRID
    from dinoprobe.train.loop import TrainConfig

    out = {}
    x, y, xv, yv = synthetic_features(cfg["head_rows"], device=device)

    def probe_s(head, epochs, batch):
        return Probe(head=head, epochs=epochs, batch_size=batch, device=device).fit(x, y, X_val=xv, y_val=yv) \
            .train_seconds_

    # Probe(head="linear") against the plain PyTorch loop (nn.Linear, torch.optim.Adam, F.cross_entropy,
    # backward, a permutation per epoch, a val pass per epoch), same epochs, interleaved: the machine drifts
    epochs = cfg["reference_epochs"]
    reference = TrainConfig(head="linear", epochs=epochs, batch_size=256)
    plain, ours = [], []
    train_on_tensors(reference, x, y, xv, yv, 10), probe_s("linear", epochs, 256)  # warm-up: first calls pay setup
    for _ in range(3):
        plain.append(train_on_tensors(reference, x, y, xv, yv, 10)[1].seconds)
        ours.append(probe_s("linear", epochs, 256))
    out.update({"reference_epochs": epochs, "linear_plain_s": statistics.median(plain),
                "linear_same_epochs_s": statistics.median(ours)})
    out["linear_vs_plain"] = out["linear_plain_s"] / out["linear_same_epochs_s"]
    runs = [("linear", "linear", cfg["head_epochs"], 256), ("mlp", "mlp", cfg["mlp_epochs"], 256)]
    if cfg["large_batch"]:
        runs.append(("linear_b1024", "linear", cfg["head_epochs"], 1024))
    for name, head, n_epochs, batch in runs:
        out[f"{name}_s"], out[f"{name}_epochs"], out[f"{name}_batch"] = probe_s(head, n_epochs, batch), n_epochs, batch
    # a Sweep of linear configurations against as many separate Probe fits on the same data; then the same for
    # multi-label heads (sigmoid + BCE, chosen on val mAP) on the same features, each row its class plus random tags
    xs, ys, xsv, ysv = synthetic_features(cfg["sweep_rows"], device=device)
    lrs = [float(v) for v in np.logspace(-4, -1, cfg["sweep_configs"])]
    common = dict(head="linear", epochs=cfg["sweep_epochs"], batch_size=256, device=device)

    def tags(y):
        gen = torch.Generator().manual_seed(len(y))
        extra = (torch.rand(len(y), 10, generator=gen) < 0.1).to(y.device)
        return (torch.nn.functional.one_hot(y, 10).bool() | extra).float()

    for prefix, train_y, val_y in (("sweep", ys, ysv), ("multilabel_sweep", tags(ys), tags(ysv))):
        sides, sequentials = [], []
        Sweep(Probe(**common), param_grid={"lr": lrs[:2]}).fit(xs, train_y, X_val=xsv, y_val=val_y)  # warm-up
        for _ in range(3):  # interleaved, medians: the machine drifts by tens of % between seconds
            start = time.perf_counter()
            Sweep(Probe(**common), param_grid={"lr": lrs}).fit(xs, train_y, X_val=xsv, y_val=val_y)
            sides.append(time.perf_counter() - start)
            start = time.perf_counter()
            for lr in lrs:
                Probe(lr=lr, **common).fit(xs, train_y, X_val=xsv, y_val=val_y)
            sequentials.append(time.perf_counter() - start)
        side, sequential = statistics.median(sides), statistics.median(sequentials)
        out.update({f"{prefix}_side_by_side_s": side, f"{prefix}_one_after_another_s": sequential,
                    f"{prefix}_speedup": sequential / side})
    out.update({"sweep_configs": len(lrs), "sweep_rows": cfg["sweep_rows"], "sweep_epochs": cfg["sweep_epochs"]})
    lx, ly, _, _ = synthetic_features(cfg["logreg_rows"], device=device)
    lx = (lx - lx.mean(0)) / lx.std(0)
    start = time.perf_counter()
    fit_logreg_batched(lx, ly, 10, DEFAULT_C_GRID)
    torch_s = time.perf_counter() - start
    start = time.perf_counter()
    fit_logreg_sklearn(lx.cpu().numpy(), ly.cpu().numpy(), DEFAULT_C_GRID)
    sklearn_s = time.perf_counter() - start
    out.update({"logreg_rows": cfg["logreg_rows"], "logreg_cs": len(DEFAULT_C_GRID), "logreg_torch_s": torch_s,
                "logreg_sklearn_s": sklearn_s, "logreg_speedup": sklearn_s / torch_s})
    out.update(metrics_section(cfg["metrics_rows"], cfg["metrics_classes"]))
    out.update(multilabel_metrics_section(cfg["multilabel_rows"], cfg["multilabel_classes"]))
    if cfg.get("target_rows"):  # the GPU issue's head-training targets, at their sizes
        out.update(target_section(cfg, device))
    return out


def metrics_section(rows: int, classes: int) -> dict:
    """A run's metrics at many classes (iNaturalist-like): dinoprobe's classification_metrics against the
    scikit-learn calls it replaced (confusion_matrix, balanced_accuracy_score, top_k_accuracy_score), same scores;
    the numbers must agree."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, top_k_accuracy_score

    from dinoprobe.runs.metrics import classification_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, rows)
    scores = rng.random((rows, classes))
    scores[np.arange(rows), y] += rng.random(rows) * 0.01  # some rows right, most wrong
    names, labels = [f"class_{i}" for i in range(classes)], np.arange(classes)

    def scikit_learn():
        pred = scores.argmax(1)
        confusion_matrix(y, pred, labels=labels)
        return {"balanced_accuracy": balanced_accuracy_score(y, pred),
                "top5": top_k_accuracy_score(y, scores, k=5, labels=labels)}

    ours_times, sklearn_times = [], []
    for _ in range(3):  # interleaved, medians: the machine drifts
        start = time.perf_counter()
        ours = classification_metrics(scores, y, names)
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = scikit_learn()
        sklearn_times.append(time.perf_counter() - start)
    ours_s, sklearn_s = statistics.median(ours_times), statistics.median(sklearn_times)
    for key, value in reference.items():
        if abs(ours[key] - value) > 1e-12:
            raise AssertionError(f"classification_metrics {key} {ours[key]} != scikit-learn's {value}")
    return {"metrics_rows": rows, "metrics_classes": classes, "metrics_s": ours_s, "metrics_sklearn_s": sklearn_s,
            "metrics_speedup": sklearn_s / ours_s}


def multilabel_metrics_section(rows: int, classes: int) -> dict:
    """A multi-label run's scoring at many classes: the F1-best threshold of every class and the metrics
    (ranking.f1_thresholds + multilabel_metrics) against the scikit-learn calls they replaced (precision_recall_curve
    per class; average_precision_score per class and micro; f1_score micro, macro and samples; accuracy_score), same
    probabilities, interleaved medians of 3; the numbers must agree."""
    import torch
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_recall_curve

    from dinoprobe.runs.metrics import multilabel_metrics
    from dinoprobe.train.ranking import f1_thresholds

    rng = np.random.default_rng(0)
    y = (rng.random((rows, classes)) < 3 / classes).astype(np.int64)  # about 3 labels an image
    y[0] = 1  # every class has a positive
    p = np.clip(y * 0.3 + rng.random((rows, classes)) * 0.7, 0, 1)
    names = [f"class_{i}" for i in range(classes)]

    def ours():
        thresholds = f1_thresholds(torch.from_numpy(p), torch.from_numpy(y)).numpy()
        return thresholds, multilabel_metrics(p, y, names, thresholds)

    def scikit_learn(thresholds):
        best_f1 = []
        for c in range(classes):
            precision, recall, _ = precision_recall_curve(y[:, c], p[:, c])
            best_f1.append(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12)))
        pred = (p >= thresholds).astype(np.int64)
        return best_f1, {"map_macro": np.mean([average_precision_score(y[:, c], p[:, c]) for c in range(classes)]),
                         "map_micro": average_precision_score(y, p, average="micro"),
                         "f1_micro": f1_score(y, pred, average="micro"), "f1_macro": f1_score(y, pred, average="macro"),
                         "f1_samples": f1_score(y, pred, average="samples", zero_division=1.0),
                         "subset_accuracy": accuracy_score(y, pred)}

    ours_times, sklearn_times = [], []
    for _ in range(3):  # interleaved, medians: the machine drifts
        start = time.perf_counter()
        thresholds, metrics = ours()
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        best_f1, reference = scikit_learn(thresholds)
        sklearn_times.append(time.perf_counter() - start)
    for key, value in reference.items():
        if abs(metrics[key] - value) > 1e-9:
            raise AssertionError(f"multilabel_metrics {key} {metrics[key]} != scikit-learn's {value}")
    reached = [f1_score(y[:, c], p[:, c] >= thresholds[c]) for c in range(classes)]
    if not np.allclose(reached, best_f1, rtol=0, atol=1e-9):
        raise AssertionError("f1_thresholds does not reach each class's best F1 on precision_recall_curve")
    ours_s, sklearn_s = statistics.median(ours_times), statistics.median(sklearn_times)
    return {"multilabel_rows": rows, "multilabel_classes": classes, "multilabel_s": ours_s,
            "multilabel_sklearn_s": sklearn_s, "multilabel_speedup": sklearn_s / ours_s}


def target_section(cfg: dict, device) -> dict:
    """The 45-C logistic-regression grid on target_rows x 384, and DINOv3's linear preset (13 heads side by side,
    10 epochs of 1,250 iterations at batch 128) on target_rows cached cls4+patch_mean features (5 x 384 wide)."""
    from dinoprobe import Probe, Sweep
    from dinoprobe.estimators.logreg import fit_logreg_batched
    from dinoprobe.settings import DEFAULT_C_GRID
    from dinoprobe.train.loop import TrainConfig, train_heads

    rows = cfg["target_rows"]
    x, y, xv, yv = synthetic_features(rows, device=device)
    # 100 linear epochs at batch 256 as CUDA graphs (static_epochs=True: one replay per epoch, graphed.py) against
    # the same epochs launched step by step (static_epochs=False), interleaved
    linear = TrainConfig(head="linear", epochs=cfg["head_epochs"], batch_size=256)
    runs = {True: [], False: []}
    for _ in range(2):
        for static, results in runs.items():
            results += train_heads([linear], x, y, xv, yv, 10, static_epochs=static)
    out = {"graph_epochs": cfg["head_epochs"], "graph_used": runs[True][-1].cuda_graph,
           **{key: statistics.median(r.seconds for r in runs[static])
              for key, static in (("graph_s", True), ("graph_eager_s", False))}}
    x = (x - x.mean(0)) / x.std(0)
    fit_logreg_batched(x[:1000], y[:1000], 10, DEFAULT_C_GRID[:2])  # warm-up
    start = time.perf_counter()
    fit_logreg_batched(x, y, 10, DEFAULT_C_GRID)
    logreg_s = time.perf_counter() - start
    x, y, xv, yv = synthetic_features(rows, dim=5 * 384, device=device)
    overrides = {"epoch_length": [cfg["preset_epoch_length"]]} if cfg.get("preset_epoch_length") else {}
    start = time.perf_counter()
    search = Sweep(Probe(device=device), preset="dinov3-linear", param_grid=overrides).fit(x, y, X_val=xv, y_val=yv)
    preset_s = time.perf_counter() - start
    return {**out, "target_rows": rows, "target_logreg_s": logreg_s, "target_preset_s": preset_s,
            "target_preset_heads": len(search.results_), "target_preset_steps": 10 * (cfg.get("preset_epoch_length")
                                                                                   or 1250)}


# -------------------------------------------------------------------------------------------- 6. ONNX Runtime
def onnx_section(images: list[Path], tmp: Path, size: int, batch: int) -> dict | None:
    """`predict --model model.onnx` (ONNX Runtime on the CPU, PIL preprocessing, no torch) against `predict --run`
    (torch) on the same images and head, interleaved, medians. None when the onnx extra is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    import contextlib
    import io

    from dinoprobe.cli import main

    folder = jpeg_folder(tmp / "onnx-images", images, len(images))
    commands = [["features", "--data", str(folder), "--weights", "random", "--image-size", str(size), "--last-blocks",
                 "0", "--cache", str(tmp / "onnx-cache"), "--workers", "0"],
                ["probe", "--cache", str(tmp / "onnx-cache"), "--out", str(tmp / "onnx-run"), "--head", "linear",
                 "--epochs", "2"],
                ["export", "--run", str(tmp / "onnx-run"), "--out", str(tmp / "model.onnx"), "--format", "onnx"]]
    for args in commands:  # the commands' own output is not the benchmark's
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(args, standalone_mode=False)
    from dinoprobe.runs.onnx_predict import OnnxClassifier
    from dinoprobe.runs.predict import backbone_for_head, predict
    from dinoprobe.train.headfile import load_head_file

    head = load_head_file(tmp / "onnx-run")
    backbone = backbone_for_head(head, log=lambda *_: None)
    onnx_model = OnnxClassifier(tmp / "model.onnx")
    files = [str(folder)]
    torch_s, onnx_s = [], []
    for _ in range(2):
        start = time.perf_counter()
        predict(head, backbone, files, batch_size=batch, workers=0, device="cpu")
        torch_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        onnx_model.predict(files, batch_size=batch)
        onnx_s.append(time.perf_counter() - start)
    n = len(images)
    return {"images": n, "image_size": size, "batch_size": batch,
            "predict_images_per_s": n / statistics.median(torch_s), "onnx_images_per_s": n / statistics.median(onnx_s),
            "onnx_vs_predict": statistics.median(torch_s) / statistics.median(onnx_s)}


# -------------------------------------------------------------------------------------------- 7. transformers
def transformers_route(images: list[Path], tmp: Path, batch: int) -> dict | None:
    try:
        import transformers
    except ImportError:
        return None
    from PIL import Image

    config = transformers.DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                          intermediate_size=1536, patch_size=16, num_register_tokens=4)
    folder = tmp / "dinov3-vits16-pretrain-lvd1689m"
    transformers.DINOv3ViTModel(config).save_pretrained(folder)
    transformers.DINOv3ViTImageProcessor().save_pretrained(folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    pils = [Image.open(p).convert("RGB") for p in images]

    def one_at_a_time():
        with torch.inference_mode():
            for image in pils:
                _ = model(**processor(images=image, return_tensors="pt")).pooler_output

    def batched():
        with torch.inference_mode():
            for i in range(0, len(pils), batch):
                _ = model(**processor(images=pils[i:i + batch], return_tensors="pt")).pooler_output
    return {"one_at_a_time_img_s": len(pils) / median_time(one_at_a_time, 2),
            "batched_img_s": len(pils) / median_time(batched, 2), "images": len(pils)}


# ------------------------------------------------------------------------------------------------------ run
def run(scale: str, out_dir: Path, data_root: Path | None, device: str = "auto", log=print,
        compile_section: bool = True) -> dict:
    from dinoprobe.device import resolve_device, resolve_precision
    from dinoprobe.extract.backbone import build_backbone, model_facts
    from dinoprobe.extract.sources import open_source

    dev = resolve_device(device)
    cfg = {**SCALES[scale], **(GPU_OVERRIDES.get(scale, {}) if dev.type == "cuda" else {})}
    gpu_rows = dev.type == "cuda" or scale == "smoke"  # the smoke run (a test) exercises the GPU-only rows too
    precision = resolve_precision("auto", dev)
    results: dict = {"scale": scale, "machine": machine_info(), "config": {k: list(v) if isinstance(v, tuple) else v
                                                                          for k, v in cfg.items()}}
    size, batch, reps = cfg["image_size"], cfg["batch_size"], cfg["repeats"]
    tmp = Path(tempfile.mkdtemp(prefix="dinoprobe-bench-"))
    marks: list[tuple[str, float]] = []

    def begin(name: str, message: str) -> None:  # wall time per section, so a slow run shows where it went
        marks.append((name, time.perf_counter()))
        out_dir.mkdir(parents=True, exist_ok=True)  # what is measured so far, in case the run is cut short
        (out_dir / "results.json").write_text(json.dumps({**results, "partial": True}, indent=1, default=str))
        log(message)
    try:
        backbone = build_backbone(weights="random", image_size=size, log=lambda *_: None)
        flops = model_facts(backbone)["flops_per_image"]
        backbone = backbone.to(dev)
        begin("roofline_forward",
              "1/6 roofline and 2/6 bare forward (interleaved: this machine's speed drifts by tens of %)")
        gemms, forwards = [], {b: [] for b in cfg["batch_sizes"]}
        forward_rate(backbone, batch, size, dev, precision, 1)  # warm-up
        for _ in range(reps):
            gemms.append(gemm_flops(dev, 3))
            for b in cfg["batch_sizes"]:
                forwards[b].append(forward_rate(backbone, b, size, dev, precision, 1))
        gemm = statistics.median(gemms)
        forward = {b: statistics.median(v) for b, v in forwards.items()}
        results["roofline"] = {"gemm_flops": gemm, "flops_per_image": flops, "images_per_s_limit": gemm / flops,
                               "precision": precision}
        results["forward"] = {"batch_size": batch, "images_per_s": forward[batch],
                              "fraction_of_roofline": forward[batch] / (gemm / flops),
                              "by_batch_size": {str(b): r for b, r in forward.items()}}
        begin("pipeline", "3/6 pipeline (features on JPEGs and CIFAR-format arrays, interleaved with bare forwards)")
        if data_root is None:  # no photos given: photograph-like JPEGs made here (sample_images.py)
            from bench.sample_images import make_jpeg_folder

            data_root = make_jpeg_folder(tmp / "generated", sizes=(300, 500))
            results["data"] = "generated: 70 JPEGs, 300-500 px (bench.sample_images)"
        else:
            results["data"] = str(data_root)
        jpegs = sorted(data_root.rglob("*.jp*g"))
        pipeline: dict = {}
        if jpegs:
            source = open_source(str(jpeg_folder(tmp / "jpegs", jpegs, cfg["pipeline_images"])))
            arrays = array_source(cfg["array_images"])
            from dinoprobe.device import default_workers, usable_cores

            workers = default_workers(dev)
            runs = {"jpeg": [], "jpeg_torchvision": [], "arrays": [], "arrays_no_blocks": [], "bare": []}
            if cfg["worker_processes"]:
                runs["jpeg_2_workers"] = []
            all_workers = max(1, usable_cores() - 1)  # on CUDA: is PIL decoding bound by the 8 default workers?
            if gpu_rows and all_workers > workers:
                runs["jpeg_all_workers"] = []
            if gpu_rows:  # torchvision decoding on the CPU cores instead of nvJPEG (--decode-on workers);
                # and a run 4x as long: what a short run's fixed costs (worker start, last shard's fsync) hide
                runs.update(jpeg_torchvision_workers=[], arrays_long=[])
                long_arrays = array_source(4 * cfg["array_images"])
            for _ in range(max(2, reps - 1)):
                runs["bare"].append(forward_rate(backbone, batch, size, dev, precision, 2))
                runs["jpeg"].append(pipeline_rate(backbone, source, tmp, batch, workers, device))
                runs["jpeg_torchvision"].append(pipeline_rate(backbone, source, tmp, batch, workers, device,
                                                              "torchvision"))
                if cfg["worker_processes"]:
                    runs["jpeg_2_workers"].append(pipeline_rate(backbone, source, tmp, batch, 2, device))
                if "jpeg_all_workers" in runs:
                    runs["jpeg_all_workers"].append(pipeline_rate(backbone, source, tmp, batch, all_workers, device))
                if "jpeg_torchvision_workers" in runs:
                    runs["jpeg_torchvision_workers"].append(pipeline_rate(
                        backbone, source, tmp, batch, all_workers, device, "torchvision", decode_on_device=False))
                    runs["arrays_long"].append(pipeline_rate(backbone, long_arrays, tmp, batch, workers, device))
                runs["arrays"].append(pipeline_rate(backbone, arrays, tmp, batch, workers, device))
                runs["arrays_no_blocks"].append(pipeline_rate(backbone, arrays, tmp, batch, workers, device,
                                                              last_blocks=0))
            bare = statistics.median(runs["bare"])
            pipeline = {"batch_size": batch, "workers": workers, "bare_forward_images_per_s": bare,
                        **{f"{name}_images_per_s": statistics.median(v) for name, v in runs.items() if name != "bare"}}
            # one process, so a few hundred images tell its rate (the 4,096 of a GPU run are 70 photos cycled)
            decode_paths = [p for p, _ in source.splits["train"]][:cfg.get("decode_images")]
            pipeline["decode_only"] = decode_rates(decode_paths, backbone.data_config, reps)
            # on one GPU the two ranks share it, each with its own decoding workers
            pipeline["processes"] = processes_section(jpeg_folder(tmp / "procs", jpegs, cfg["process_images"]),
                                                      size, batch)
            pipeline["process_images"] = cfg["process_images"]
            pipeline["jpeg_fraction_of_forward"] = pipeline["jpeg_images_per_s"] / bare
            pipeline["arrays_fraction_of_forward"] = pipeline["arrays_images_per_s"] / bare
        results["pipeline"] = pipeline
        begin("original_vs_dinoprobe", "4/6 original method vs features + probe")
        if data_root:
            subset = jpeg_folder(tmp / "original", jpegs, cfg["original_images"])
            results["original_vs_dinoprobe"] = original_vs_cached(subset, cfg["original_size"], cfg["original_epochs"],
                                                                  tmp, device, cfg["original_workers"])
        begin("heads", "5/6 heads, sweep, logreg")
        results["heads"] = heads_section(cfg, dev)
        begin("onnx", "6/7 ONNX Runtime vs predict")
        if jpegs:
            results["onnx"] = onnx_section(jpegs[: cfg["transformers_images"] * 2], tmp, cfg["image_size"], batch)
        begin("transformers", "7/7 transformers route")
        if jpegs:
            results["transformers"] = transformers_route(jpegs[: cfg["transformers_images"]], tmp, batch)
            if results["transformers"] and pipeline:
                results["transformers"]["dinoprobe_jpeg_images_per_s"] = pipeline["jpeg_images_per_s"]
        if dev.type == "cuda" and pipeline and compile_section:  # last: compiling costs a minute or more
            begin("compile", "8/8 features --compile (a first run compiles and is discarded; the second is timed)")
            for name, decoder in (("jpeg_compile", "pil"), ("jpeg_torchvision_compile", "torchvision")):
                try:
                    pipeline_rate(backbone, source, tmp, batch, workers, device, decoder, compile=True)
                    pipeline[f"{name}_images_per_s"] = pipeline_rate(backbone, source, tmp, batch, workers, device,
                                                                     decoder, compile=True)
                except Exception as err:  # a compiler failure is a finding, not the end of the run
                    pipeline[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                (out_dir / "results.json").write_text(json.dumps({**results, "partial": True}, indent=1, default=str))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marks.append(("end", time.perf_counter()))
    results["section_seconds"] = {a[0]: round(b[1] - a[1], 1) for a, b in zip(marks, marks[1:])}
    results["total_seconds"] = round(marks[-1][1] - marks[0][1], 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    m = r["machine"]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ", no GPU"
    lines = [f"`make bench BENCH_SCALE={r['scale']}` — {m['date']}; {m['cpu']} ({m['cores']} cores{gpu}); "
             f"Python {m['python']}, torch {m['torch']}, timm {m['timm']}."
             + (f" The run took {r['total_seconds'] / 60:.1f} min." if "total_seconds" in r else ""), "",
             "| measurement | result | compared with | ratio |", "|---|---|---|---|"]
    rf, fw = r["roofline"], r["forward"]
    size = r["config"]["image_size"]
    lines.append(f"| matmul throughput ({rf['precision']}) | {rf['gemm_flops'] / 1e9:.0f} GFLOP/s | "
                 f"{rf['flops_per_image'] / 1e9:.2f} GFLOP/image at {size} px | limit {rf['images_per_s_limit']:.1f} images/s |")
    lines.append(f"| bare backbone forward, batch {fw['batch_size']} | {fw['images_per_s']:.1f} images/s | roofline "
                 f"{rf['images_per_s_limit']:.1f} images/s | {fw['fraction_of_roofline']:.2f} |")
    for b, rate in fw["by_batch_size"].items():
        if int(b) != fw["batch_size"]:
            lines.append(f"| bare forward, batch {b} | {rate:.1f} images/s | batch {fw['batch_size']} | "
                         f"{rate / fw['images_per_s']:.2f} |")
    p = r.get("pipeline") or {}
    if p:
        lines.append(f"| `features` on JPEGs ({size} px, batch {p['batch_size']}, workers auto = {p['workers']}, HDF5 "
                     f"write) | "
                     f"{p['jpeg_images_per_s']:.1f} images/s | bare forward {p['bare_forward_images_per_s']:.1f} images/s "
                     f"| {p['jpeg_fraction_of_forward']:.2f} |")
        for key, label in (("jpeg_torchvision", "`features` on JPEGs, `--decoder torchvision`"),
                           ("jpeg_compile", "`features --compile` on JPEGs"),
                           ("jpeg_torchvision_compile", "`features --compile --decoder torchvision`"),
                           ("jpeg_2_workers", "`features` on JPEGs, 2 worker processes"),
                           ("jpeg_all_workers", "`features` on JPEGs, a worker per core but one"),
                           ("jpeg_torchvision_workers", "`features --decoder torchvision --decode-on workers`, a "
                                                        "worker per core but one")):
            if f"{key}_images_per_s" in p:
                rate = p[f"{key}_images_per_s"]
                lines.append(f"| {label} | {rate:.1f} images/s | bare forward | "
                             f"{rate / p['bare_forward_images_per_s']:.2f} |")
        d = p.get("decode_only")
        if d:
            lines.append(f"| JPEG decode + resize + crop only, `--decoder torchvision` | "
                         f"{d['torchvision_images_per_s']:.0f} images/s | PIL {d['pil_images_per_s']:.0f} images/s | "
                         f"**{d['torchvision_images_per_s'] / d['pil_images_per_s']:.1f}x** |")
        pr = p.get("processes")
        if pr:
            where = "processes sharing one GPU" if m["gpu"] else "CPU processes"
            lines.append(f"| `torchrun` 2 {where} (gloo), `features` on JPEGs | {pr['2']:.1f} images/s | "
                         f"1 process {pr['1']:.1f} images/s | {pr['2'] / pr['1']:.2f} |")
        lines.append(f"| `features` on CIFAR-format arrays (batched tensor resize) | {p['arrays_images_per_s']:.1f} "
                     f"images/s | bare forward | {p['arrays_fraction_of_forward']:.2f} |")
        if "arrays_long_images_per_s" in p:
            lines.append(f"| `features` on 4x as many arrays ({4 * r['config']['array_images']:,}) | "
                         f"{p['arrays_long_images_per_s']:.1f} images/s | {r['config']['array_images']:,} arrays "
                         f"{p['arrays_images_per_s']:.1f} images/s | "
                         f"{p['arrays_long_images_per_s'] / p['arrays_images_per_s']:.2f} |")
        if "arrays_no_blocks_images_per_s" in p:
            lines.append(f"| `features --last-blocks 4` (the default: 4 more CLS tokens per image), arrays | "
                         f"{p['arrays_images_per_s']:.1f} images/s | `--last-blocks 0` "
                         f"{p['arrays_no_blocks_images_per_s']:.1f} images/s | "
                         f"{p['arrays_images_per_s'] / p['arrays_no_blocks_images_per_s']:.2f} |")
    for row in r.get("original_vs_dinoprobe", []):
        lines.append(f"| original method, {row['epochs']} epochs ({row['images']} images, {row['image_size']} px, "
                     f"{row.get('workers', 2)} loader workers) | "
                     f"{row['original_s']:.1f} s | features + probe {row['dinoprobe_s']:.1f} s "
                     f"({row['features_s']:.1f} + {row['probe_s']:.2f}) | **{row['speedup']:.1f}x** |")
    h = r["heads"]
    rows = r["config"]["head_rows"]
    lines.append(f"| `Probe(head=\"linear\")`, {h['reference_epochs']} epochs, {rows:,} x 384, 10 classes, batch 256, "
                 f"Adam | {h['linear_same_epochs_s']:.2f} s | plain PyTorch loop {h['linear_plain_s']:.2f} s | "
                 f"**{h['linear_vs_plain']:.1f}x** |")
    lines.append(f"| `Probe(head=\"linear\")`, {h['linear_epochs']} epochs, batch {h['linear_batch']} | "
                 f"{h['linear_s']:.2f} s | per epoch {h['linear_s'] / h['linear_epochs']:.3f} s | |")
    if "linear_b1024_s" in h:
        lines.append(f"| `Probe(head=\"linear\")`, {h['linear_b1024_epochs']} epochs, batch {h['linear_b1024_batch']} | "
                     f"{h['linear_b1024_s']:.2f} s | batch {h['linear_batch']} | "
                     f"{h['linear_s'] / h['linear_b1024_s']:.1f}x |")
    lines.append(f"| `Probe()`: {h['mlp_epochs']} epochs MLP head (256 hidden), batch {h['mlp_batch']} | {h['mlp_s']:.2f} s | "
                 f"linear head, per epoch | {h['mlp_s'] / h['mlp_epochs'] / (h['linear_s'] / h['linear_epochs']):.2f} |")
    for prefix, what, fits in (
            ("sweep", f"`Sweep`: {h['sweep_configs']} linear configs side by side ({h['sweep_rows']:,} rows, "
                      f"{h['sweep_epochs']} epochs)", "`Probe` fits"),
            ("multilabel_sweep", f"multi-label `Sweep` (sigmoid heads, 10 classes, best on val mAP), same "
                                 f"{h['sweep_configs']} configs and rows", "multi-label `Probe` fits")):
        if f"{prefix}_speedup" in h:
            lines.append(f"| {what} | {h[f'{prefix}_side_by_side_s']:.2f} s | {h['sweep_configs']} separate {fits} "
                         f"{h[f'{prefix}_one_after_another_s']:.2f} s | **{h[f'{prefix}_speedup']:.1f}x** |")
    if "graph_s" in h:
        lines.append(f"| `Probe(head=\"linear\")`, {h['graph_epochs']} epochs, {h['target_rows']:,} x 384, batch 256"
                     f"{', one CUDA graph per epoch' if h['graph_used'] else ' (no CUDA graph on this device)'} | "
                     f"{h['graph_s']:.2f} s | step by step {h['graph_eager_s']:.2f} s | "
                     f"**{h['graph_eager_s'] / h['graph_s']:.1f}x** |")
    if "target_logreg_s" in h:
        lines.append(f"| logreg, {h['logreg_cs']} C values, batched torch L-BFGS ({h['target_rows']:,} x 384) | "
                     f"{h['target_logreg_s']:.1f} s | | |")
        lines.append(f"| DINOv3 linear preset: {h['target_preset_heads']} heads side by side, "
                     f"{h['target_preset_steps']:,} steps of 128, on {h['target_rows']:,} x 1,920 | "
                     f"{h['target_preset_s']:.1f} s | | |")
    lines.append(f"| logreg, {h['logreg_cs']} C values, batched torch L-BFGS ({h['logreg_rows']:,} x 384) | "
                 f"{h['logreg_torch_s']:.1f} s | scikit-learn looping over C {h['logreg_sklearn_s']:.1f} s | "
                 f"**{h['logreg_speedup']:.1f}x** |")
    if "metrics_s" in h:
        lines.append(f"| a run's metrics (top-1/5, balanced, confusion), {h['metrics_rows']:,} rows x "
                     f"{h['metrics_classes']:,} classes | {h['metrics_s']:.2f} s | scikit-learn's confusion_matrix, "
                     f"balanced_accuracy_score, top_k_accuracy_score {h['metrics_sklearn_s']:.2f} s | "
                     f"**{h['metrics_speedup']:.1f}x** |")
    if "multilabel_s" in h:
        lines.append(f"| a multi-label run's scoring (F1 thresholds, mAP, micro mAP, F1s, subset accuracy), "
                     f"{h['multilabel_rows']:,} rows x {h['multilabel_classes']:,} classes | {h['multilabel_s']:.2f} s | "
                     f"scikit-learn's precision_recall_curve, average_precision_score, f1_score, accuracy_score "
                     f"{h['multilabel_sklearn_s']:.2f} s | **{h['multilabel_speedup']:.1f}x** |")
    o = r.get("onnx")
    if o:
        lines.append(f"| `predict --model model.onnx` (ONNX Runtime, CPU, {o['image_size']} px, batch {o['batch_size']}) | "
                     f"{o['onnx_images_per_s']:.1f} images/s | `predict --run` (torch) {o['predict_images_per_s']:.1f} "
                     f"images/s | {o['onnx_vs_predict']:.2f} |")
    t = r.get("transformers")
    if t:
        dp = t["dinoprobe_jpeg_images_per_s"]
        lines.append(f"| transformers AutoModel + AutoImageProcessor, one image at a time | "
                     f"{t['one_at_a_time_img_s']:.1f} images/s | `features` on JPEGs {dp:.1f} images/s | "
                     f"{t['one_at_a_time_img_s'] / dp:.2f} |")
        lines.append(f"| transformers, batches of {r['forward']['batch_size']} | {t['batched_img_s']:.1f} images/s | "
                     f"`features` on JPEGs {dp:.1f} images/s | {t['batched_img_s'] / dp:.2f} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> None:
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    text = readme.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + table + end + rest.split(end, 1)[1])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scale", type=click.Choice(["small", "full", "smoke"]), default="small", show_default=True,
              help="small: under ~3 minutes on 2 CPU cores; full: the long measurements; smoke: seconds, toy "
                   "sizes, checks that the benchmark runs (its figures mean nothing)")
@click.option("--out", default="bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--data", "data_root", default=None, type=click.Path(),
              help="Folder of JPEGs in train/<class>/ [default: 70 photograph-like JPEGs generated for the run]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--readme", default=None, type=click.Path(dir_okay=False),
              help="Also replace the table between <!-- bench:start/end --> in this README")
@click.option("--no-compile", is_flag=True,
              help="Skip the `features --compile` rows on CUDA (a minute or more of compiling; for a short lease)")
def main(scale, out, data_root, device, readme, no_compile):
    """Measure this machine and dinoprobe on it: bench/results.json + a Markdown table."""
    results = run(scale, Path(out), Path(data_root) if data_root else None, device,
                  log=lambda message: click.echo(message, err=True), compile_section=not no_compile)
    table = markdown(results)
    click.echo(table)
    if readme:
        update_readme(Path(readme), table)
    click.echo(f"wrote {out}/results.json and {out}/results.md")


if __name__ == "__main__":
    main()
