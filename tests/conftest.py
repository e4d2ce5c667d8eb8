"""Shared fixtures: the real ViT-S/16 DINOv3 architecture with random weights, tiny images, tiny folders."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import processes

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
MODEL = "vit_small_patch16_dinov3.lvd1689m"
SIZE = 32  # RoPE: any multiple of 16 works; 32 px keeps the real architecture fast on 2 cores


@pytest.fixture(scope="session")
def backbone():
    from dinoprobe.extract.backbone import build_backbone

    return build_backbone(MODEL, "random", SIZE, log=lambda *_: None)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """An ImageFolder of photograph-like JPEGs shaped like hymenoptera-mini (ants/bees, 25 train and 10 val per
    class), generated here so the suite needs nothing beside the repository; small sizes keep it fast."""
    from bench.sample_images import make_jpeg_folder

    return make_jpeg_folder(tmp_path_factory.mktemp("photos") / "hymenoptera", sizes=(40, 90))


@pytest.fixture(scope="session")
def exports(photos, tmp_path_factory):
    """The suite's two ONNX exports, shared by every module (each traces ViT-S for 20-40 s on 2 cores):
    {name: (run, model.onnx)}.
    - linear32: a linear head on CLS at 32 px, `--format onnx`;
    - mlp48: a multi-label MLP head on cls4+patch_mean at 48 px (each photo tagged with its folder's class, every
      third with the other one too), the format from the .onnx name, exported in a process of its own: what it
      printed on stderr, as a user sees it, is kept beside the model as `mlp48.onnx.stderr`."""
    import csv

    base = tmp_path_factory.mktemp("onnx")
    with open(base / "tags.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for i, image in enumerate(sorted(photos.rglob("*.jpg"))):
            split, name = image.parent.parent.name, image.parent.name
            tags = [name, *(["bees" if name == "ants" else "ants"] if i % 3 == 0 else [])]
            writer.writerow([image, "|".join(tags), split])
    run_cli("features", "--data", photos, "--weights", "random", "--image-size", 32, "--last-blocks", 0,
            "--cache", base / "c32", "--workers", 0, check=True)
    run_cli("features", "--data", base / "tags.csv", "--label-sep", "|", "--weights", "random", "--image-size", 48,
            "--last-blocks", 4, "--cache", base / "c48", "--workers", 0, check=True)
    made = {}
    for name, size, head, feature in (("linear32", 32, "linear", "cls"), ("mlp48", 48, "mlp", "cls4+patch_mean")):
        run_cli("probe", "--cache", base / f"c{size}", "--out", base / name, "--head", head, "--feature", feature,
                "--epochs", 5, "--hidden", 32, check=True)
        made[name] = (base / name, base / f"{name}.onnx")
    run_cli("export", "--run", base / "linear32", "--out", base / "linear32.onnx", "--format", "onnx", check=True)
    proc = run_cli("export", "--run", base / "mlp48", "--out", base / "mlp48.onnx", check=True, in_process=False)
    (base / "mlp48.onnx.stderr").write_text(proc.stderr)
    return made


def traced_as(onnx_file, change=None):
    """A stand-in for torch.onnx.export handing back an exported graph of the same head (tracing ViT-S again takes
    20-40 s), after `change(proto)`: what an exporter that got an op wrong would hand back."""
    import types

    import onnx

    def export(*args, **kwargs):
        proto = onnx.load(str(onnx_file))
        del proto.metadata_props[:]  # export_onnx adds its own
        if change is not None:
            change(proto)
        return types.SimpleNamespace(model_proto=proto)
    return export


def write_image(path: Path, seed: int, size=(40, 30), mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    # a class-dependent tint keeps classes learnable in tests that train on these
    Image.fromarray(array).convert(mode).save(path)
    return path


def make_folder(root: Path, classes=("cat", "dog"), per_class=6, splits=("train", "val"), seed=0) -> Path:
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / name / f"{i:03d}.png", seed + 1000 * s + 100 * c + i)
    return root


def run_cli(*args, check=False, env=None, timeout=300, in_process=True) -> subprocess.CompletedProcess:
    """Run the CLI with ARGS and return exit code, stdout and stderr.

    In-process (click's CliRunner) by default; an exception that escapes the CLI is reported as a traceback,
    exactly what a user would see. `in_process=False` runs `python -m dinoprobe` as a process of its own (a fork of
    the tests' process server, `processes`), for what needs one: signals, locks, what loggers print, end to end.
    """
    if in_process:
        from click.testing import CliRunner

        from dinoprobe.cli import main

        result = CliRunner().invoke(main, [str(a) for a in args], env=env)
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
        proc = subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"dinoprobe {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc
    proc = processes.run(["-m", "dinoprobe", *args], env={"PYTHONUNBUFFERED": "1", **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dinoprobe {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def with_file_size_limit(cmd: list[str], kib: int) -> list[str]:
    """`cmd` as a process whose writes fail with EFBIG past `kib` KiB per file — a full disk met by whatever library
    writes (HDF5, torch.save, ONNX), not a Python function a test swapped. bash's `ulimit -f` sets RLIMIT_FSIZE;
    SIGXFSZ ignored (it survives exec) makes the write fail instead of killing the process."""
    return ["bash", "-c", 'trap "" XFSZ; ulimit -f "$0"; exec "$@"', str(kib), *map(str, cmd)]


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit != 0, an 'Error:' line naming the problem, and no Python traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in error_lines[0].lower(), error_lines[0]


def make_synthetic_cache(cache_dir: Path, n=(600, 200, 200), dim=32, num_classes=6, separation=0.4, seed=0,
                         splits=("train", "val", "test"), shard_rows: int | None = None,
                         train_classes: int | None = None, test_label: int | None = None,
                         absent: int | None = None, dtype: str = "float32", multilabel: bool = False,
                         fingerprint_changes: dict | None = None, unlabelled: int = 0) -> Path:
    """A cache of Gaussian class clusters: separable but not trivially (a few % of errors), written through
    the real shard writer so readers see exactly what `features` produces. train_classes: train holds only the
    first ones; test_label: the first test row's label (e.g. one outside the class list); absent: a class of the
    list that no split holds; multilabel: each row also carries each other class with probability 0.05 (a
    multi-label cache, `labels` (N, classes)); fingerprint_changes: entries of the fingerprint replaced (another
    model, weights or transform); unlabelled: with multilabel, the first rows of each split carry no label."""
    from dinoprobe.cache import store as cache

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, separation, (num_classes, dim))
    fingerprint = {"model": MODEL, "weights": {"source": "random", "sha256": "synthetic"},
                   "transform": {"image_size": SIZE, "resize_size": SIZE, "interpolation": "bicubic",
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 1.0},
                   "dtype": dtype, "data": {"kind": "synthetic"}, **({"task": "multilabel"} if multilabel else {}),
                   **(fingerprint_changes or {})}
    counts = dict(zip(splits, n))
    manifest = cache.new_manifest(fingerprint, [f"class_{i}" for i in range(num_classes)], counts, shard_size=10**9,
                                  extra={"feature_dim": dim, "features": ["cls", "patch_mean"], "dtype": dtype,
                                         **({"task": "multilabel"} if multilabel else {})})
    for split, count in counts.items():
        labels = rng.integers(0, (train_classes or num_classes) if split == "train" else num_classes, count)
        if absent is not None:
            labels[labels == absent] = (absent + 1) % num_classes
        x = centres[labels % num_classes] + rng.normal(0, 1.0, (count, dim))
        if split == "test" and test_label is not None:
            labels[0] = test_label
        rows = {"cls": x.astype(np.float32), "patch_mean": (x + rng.normal(0, 1.0, x.shape)).astype(np.float32),
                "label": labels, "index": np.arange(count), "path": [f"synthetic:{split}:{i}" for i in range(count)]}
        if multilabel:
            tags = rng.random((count, num_classes)) < 0.05
            tags[np.arange(count), labels % num_classes] = True
            tags[:unlabelled] = False
            rows["labels"] = tags.astype(np.uint8)
            del rows["label"]
        step = shard_rows or max(count, 1)
        for number, start in enumerate(range(0, max(count, 1), step)):
            stop = min(start + step, count)
            part = {k: v[start:stop] for k, v in rows.items()}
            part["index"] = np.arange(start, stop)
            entry = cache.write_shard(cache_dir, split, number, start, stop, part, dtype, [])
            manifest["splits"][split]["shards"].append(entry)
        manifest["splits"][split]["complete"] = True
    cache.write_json(cache_dir / "manifest.json", manifest)
    return cache_dir


# ------------------------------------------------------------------------- helpers shared by test modules
def features_cmd(root, cache_dir):
    return [sys.executable, "-m", "dinoprobe", "features", "--data", str(root), "--weights", "random",
            "--image-size", str(SIZE), "--cache", str(cache_dir), "--batch-size", "2", "--workers", "0",
            "--shard-size", "4", "--dtype", "float32"]


def cache_rows(cache_dir):
    from dinoprobe.cache import store

    out = {}
    for split in ("train", "val"):
        data = store.load(cache_dir, split, features=("cls", "patch_mean"))
        order = np.argsort(data["index"])
        out[split] = {k: data[k][order] for k in ("cls", "patch_mean", "index", "label")}
    return out


def finished_shards(cache_dir) -> int:
    """Shards written so far by a running `features`: each gets its sidecar entry the moment it is renamed into
    place (the manifest catches up every few seconds)."""
    return len(list(Path(cache_dir).glob("*/shard-*.json")))


def kill_during_extraction(root, cache_dir, after_shards: int, timeout=120, jitter: float = 0.0) -> bool:
    """Start `features`, SIGKILL it once `after_shards` shards are recorded (0: during start-up, after
    `jitter` seconds); True if it was killed before finishing."""
    proc = processes.Process(features_cmd(root, cache_dir)[1:], stdout=os.devnull, stderr=os.devnull)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            if after_shards == 0 or finished_shards(cache_dir) >= after_shards:
                time.sleep(jitter)
                if proc.poll() is not None:
                    break
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.wait()
    return False


def hf_reference_model(register_tokens=4):
    transformers = pytest.importorskip("transformers")
    config = transformers.DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                          intermediate_size=1536, patch_size=16, num_register_tokens=register_tokens,
                                          layerscale_value=1e-5, rope_theta=100.0, image_size=224)
    torch.manual_seed(1)
    model = transformers.DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # random init leaves layer scale tiny; make every block matter
            if p.dim() == 1 and p.shape[0] == 384:
                p.add_(torch.randn_like(p) * 0.1)
        for layer in model.model.layer:  # the released ViT-S/16 has q and v biases of zero
            layer.attention.q_proj.bias.zero_()
            layer.attention.v_proj.bias.zero_()
    return model
