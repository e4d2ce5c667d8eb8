"""Head training on the cache: equivalence with the original method, run artefacts, predict, export, bad input."""
import csv
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from bench.reference import train_backbone_in_loop
from dinoprobe import Probe
from dinoprobe.cache import store as cache
from dinoprobe.cache.arrays import load_cache
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.run import extract
from dinoprobe.extract.sources import open_source
from dinoprobe.train.headfile import load_head_file
from dinoprobe.train.loop import TrainConfig

import processes
from conftest import MODEL, SIZE, assert_clean_error, make_folder, make_synthetic_cache, run_cli


def run_probe(cache_dir, out, *args, overwrite=False, **options):
    """`dinoprobe probe` with these options; returns metrics.json's content."""
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    run_cli("probe", "--cache", cache_dir, "--out", out, *flags, *args, *(["--overwrite"] if overwrite else []),
            check=True)
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache")


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory, backbone):
    root = make_folder(tmp_path_factory.mktemp("img") / "data", per_class=6)
    # val/ has fewer images than train/
    for path in sorted((root / "val").rglob("*.png"))[::2]:
        path.unlink()
    cache_dir = root.parent / "cache"
    extract(backbone, open_source(str(root)), cache_dir, batch_size=5, workers=0, dtype="float32", progress=False)
    return root, cache_dir


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_cached_training_equals_the_original_backbone_in_the_loop(backbone, image_cache, head):
    """The proof that caching changes speed, not results: same losses per step and the same final head."""
    root, cache_dir = image_cache
    cfg = TrainConfig(head=head, batch_size=4, epochs=3, lr=1e-3, seed=3, warmup_epochs=1)
    data = load_cache(cache_dir, "cls")
    cached = Probe(**{k: v for k, v in cfg.to_dict().items() if k in Probe().get_params()})
    cached.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
    source = open_source(str(root))
    original_head, original = train_backbone_in_loop(backbone, source.splits["train"], source.splits["val"], 2, cfg)
    assert len(cached.step_losses_) == len(original.step_losses) == 9
    np.testing.assert_allclose(cached.step_losses_, original.step_losses, atol=1e-4, rtol=0)
    assert [h["val_acc"] for h in cached.history_] == [h["val_acc"] for h in original.history]
    assert cached.best_epoch_ == original.best_epoch
    for key, value in cached.head_.state_dict().items():
        torch.testing.assert_close(value, original_head.state_dict()[key], atol=1e-4, rtol=0)
    assert len(set(np.round(cached.step_losses_, 6))) > 1  # features vary, so the comparison means something


def test_linear_probe_lands_near_sklearn_logistic_regression(synthetic, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    metrics = run_probe(synthetic, tmp_path / "run", head="linear", normalize="standardize", lr=1e-2, epochs=60,
                        batch_size=64)
    train, test = cache.load(synthetic, "train", "cls"), cache.load(synthetic, "test", "cls")
    scaler = StandardScaler().fit(train["cls"])
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(train["cls"]), train["label"])
    ref_acc = reference.score(scaler.transform(test["cls"]), test["label"])
    assert 0.6 < ref_acc < 0.995  # the fixture is neither trivial nor hopeless
    assert abs(metrics["test"]["top1"] - ref_acc) <= 0.02


def test_run_dir_holds_everything_a_user_relies_on(synthetic, tmp_path):
    run = tmp_path / "run"
    metrics = run_probe(synthetic, run, head="mlp", epochs=8, normalize="standardize", feature="cls+patch_mean")
    raw = torch.load(run / "head.pt", weights_only=True)
    assert raw["num_classes"] == 6 and raw["feature_dim"] == 64
    assert set(raw["classifier_state_dict"]) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # original's keys
    assert raw["training_config"]["model_name"] == MODEL and raw["training_config"]["input_size"] == SIZE
    assert raw["class_names"][0] == "class_0" and raw["feature"] == "cls+patch_mean"
    assert raw["normalization"]["kind"] == "standardize" and raw["normalization"]["mean"].shape == (64,)
    for split in ("val", "test"):
        m = metrics[split]
        assert 0 <= m["top1"] <= 1 and 0 <= m["top5"] <= 1 and m["top5"] >= m["top1"]
        assert set(m["per_class_accuracy"]) == {f"class_{i}" for i in range(6)}
        assert np.asarray(m["confusion_matrix"]).sum() == m["n"] == 200
    with open(run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "val_acc"] and len(rows) == 8
    best = max(range(8), key=lambda i: (float(rows[i]["val_acc"]), -i))
    assert metrics["best_epoch"] == best + 1
    assert metrics["val"]["top1"] == pytest.approx(float(rows[best]["val_acc"]))
    for png in ("curves.png", "confusion.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((run / "run.json").read_text())
    assert info["train_seconds"] > 0 and info["config"]["feature"] == "cls+patch_mean"
    assert info["cuda_graph"] is False  # on a CPU (on CUDA: graphed.GRAPHS_BY_DEFAULT, test_gpu)
    # what produced the numbers, for a paper's reproducibility section: versions as the packages report them
    import platform

    import sklearn

    env = info["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["scikit-learn"] == sklearn.__version__
    assert env["python"] == platform.python_version() and env["device"].startswith("cpu (")
    assert env["created"].endswith("+00:00")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left behind


def test_same_seed_gives_identical_metrics_json(synthetic, tmp_path):
    run_probe(synthetic, tmp_path / "a", head="mlp", epochs=4, seed=7)
    run_probe(synthetic, tmp_path / "b", head="mlp", epochs=4, seed=7)
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()


def test_patience_stops_early(synthetic, tmp_path):
    metrics = run_probe(synthetic, tmp_path / "r", epochs=200, patience=2, lr=0.05)
    assert metrics["epochs_run"] < 200 and metrics["epochs_run"] - metrics["best_epoch"] == 2


def test_an_existing_run_is_never_silently_replaced(synthetic, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = run_probe(synthetic, run, head="linear", epochs=3)
    head_bytes = (run / "head.pt").read_bytes()
    proc = run_cli("probe", "--cache", synthetic, "--out", run, "--head", "mlp", "--epochs", 2)
    assert_clean_error(proc, "already exists", "--overwrite")
    assert (run / "head.pt").read_bytes() == head_bytes
    # a crash while the new run is written leaves the previous run whole, and no partial folder
    from dinoprobe.runs import reports as runs

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "write_run_files", crash)
    proc = run_cli("probe", "--cache", synthetic, "--out", run, "--head", "mlp", "--epochs", 2, "--overwrite")
    assert proc.returncode != 0
    assert (run / "head.pt").read_bytes() == head_bytes and json.loads((run / "metrics.json").read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    second = run_probe(synthetic, run, "--head=mlp", epochs=2, overwrite=True)
    assert load_head_file(run).spec.kind == "mlp" and second["epochs_run"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["confusion.png", "curves.png", "head.pt", "history.csv",
                                                      "metrics.json", "run.json"]


def test_bad_training_configs_are_refused(synthetic, tmp_path):
    for bad in ({"lr": -1}, {"head": "transformer"}, {"epochs": 0}, {"warmup_epochs": 5, "epochs": 5}):
        with pytest.raises(DinoprobeError):
            TrainConfig(**bad)
    proc = run_cli("probe", "--cache", synthetic, "--out", tmp_path / "r", "--warmup-epochs", 5, "--epochs", 5)
    assert_clean_error(proc, "warmup_epochs must be in [0, epochs)")
    proc = run_cli("probe", "--cache", synthetic, "--out", tmp_path / "r", "--device", "gpu")
    assert proc.returncode == 2 and "cuda:N" in proc.stderr


def test_bad_caches_are_refused_with_clear_errors(tmp_path):
    one = make_synthetic_cache(tmp_path / "one", num_classes=1)
    with pytest.raises(DinoprobeError, match="at least 2"):
        load_cache(one)
    empty = make_synthetic_cache(tmp_path / "empty", n=(50, 0, 10))
    with pytest.raises(DinoprobeError, match="empty val split"):
        load_cache(empty)
    lacking = make_synthetic_cache(tmp_path / "lacking")
    manifest = cache.read_manifest(lacking)
    manifest["features"] = ["cls"]
    cache.write_json(lacking / "manifest.json", manifest)
    with pytest.raises(DinoprobeError, match="no \\['patch_mean'\\] features"):
        load_cache(lacking, "patch_mean")
    broken = make_synthetic_cache(tmp_path / "broken")
    with h5py.File(broken / "train" / "shard-00000.h5", "r+") as fh:
        fh["cls"][0, 0] += 1
    proc = run_cli("probe", "--cache", broken, "--out", tmp_path / "r")
    assert_clean_error(proc, "failed verification", "sha256")
    assert_clean_error(run_cli("probe", "--cache", one, "--out", tmp_path / "r"), "at least 2")
    proc = run_cli("probe", "--cache", one, "--out", tmp_path / "r", "--feature", "tokens")
    assert proc.returncode == 2 and "cls+patch_mean" in proc.stderr and "Traceback" not in proc.stderr


def test_head_files_that_do_not_fit_are_refused(synthetic, tmp_path, backbone):
    from dinoprobe.runs.predict import backbone_for_head

    run_probe(synthetic, tmp_path / "r", head="linear", epochs=1)
    head_file = load_head_file(tmp_path / "r")
    with pytest.raises(DinoprobeError, match="expects 32-wide 'cls' features but .* gives 384"):
        backbone_for_head(head_file, weights="random", allow_weights_mismatch=True, log=lambda *_: None)
    raw = torch.load(tmp_path / "r" / "head.pt", weights_only=True)
    raw["num_classes"] = 7
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(DinoprobeError, match="inconsistent"):
        load_head_file(tmp_path / "bad.pt")
    raw["num_classes"] = 6
    raw["classifier_state_dict"]["0.weight"] = torch.zeros(6, 16)
    torch.save(raw, tmp_path / "bad2.pt")
    with pytest.raises(DinoprobeError, match="do not match its head spec"):
        load_head_file(tmp_path / "bad2.pt")
    assert_clean_error(run_cli("predict", "--run", tmp_path / "bad2.pt", tmp_path), "do not match")


@pytest.mark.slow
def test_probe_predict_export_end_to_end(photos, backbone, tmp_path):
    extract(backbone, open_source(str(photos)), tmp_path / "c", batch_size=10, workers=0, progress=False)
    proc = run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "run", "--epochs", 20, check=True)
    assert "val: top-1" in proc.stdout
    (tmp_path / "bad.jpg").write_bytes(b"")
    proc = run_cli("predict", "--run", tmp_path / "run" / "head.pt", "--format", "json", "--top-k", 2,
                   photos / "val", tmp_path / "bad.jpg", check=True)
    results = json.loads(proc.stdout)
    assert len(results) == 20 and all(r["labels"][0] in ("ants", "bees") for r in results)
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 for r in results)
    assert "skipped" in proc.stderr and "bad.jpg" in proc.stderr
    assert re.search(r"^predict: 100% 21/21 \[.*img/s\]$", proc.stderr, re.M), proc.stderr  # its progress
    # a device (read forever), a missing path and a URL: each skipped with what it is, the rest predicted
    proc = run_cli("predict", "--run", tmp_path / "run", "/dev/zero", tmp_path / "gone.jpg", photos / "val" / "ants",
                   "https://example.com/cat.jpg", check=True)
    assert "/dev/zero: not a regular file" in proc.stderr and "gone.jpg: no such file" in proc.stderr
    assert "https://example.com/cat.jpg: a URL: only local files are read; download it first" in proc.stderr
    table = run_cli("predict", "--run", tmp_path / "run", "--format", "csv", photos / "val" / "ants", check=True)
    assert table.stdout.splitlines()[0] == "path,label_1,probability_1,label_2,probability_2"
    # weights the head was not trained on are refused unless explicitly allowed
    from safetensors.torch import save_file

    other = {k: v + 0.01 for k, v in backbone.model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "other.safetensors")
    proc = run_cli("predict", "--run", tmp_path / "run", "--weights", tmp_path / "other.safetensors", photos)
    assert_clean_error(proc, "--allow-weights-mismatch")
    run_cli("predict", "--run", tmp_path / "run", "--weights", tmp_path / "other.safetensors",
            "--allow-weights-mismatch", photos / "val" / "ants", check=True)
    # export: one file, weights_only, same logits as backbone + head
    run_cli("export", "--run", tmp_path / "run", "--out", tmp_path / "model.pt", check=True)
    from dinoprobe.runs.export import load_exported

    model = load_exported(tmp_path / "model.pt")
    written_by = torch.load(tmp_path / "model.pt", weights_only=True)["environment"]  # whoever ships it can tell
    assert written_by["packages"]["torch"] == torch.__version__ and written_by["python"]
    image = sorted((photos / "val" / "bees").iterdir())[0]
    probs = model(model.preprocess(image)[None]).softmax(-1)[0]
    expected = next(r for r in results if r["path"] == str(image))
    assert model.class_names[int(probs.argmax())] == expected["labels"][0]
    assert float(probs.max()) == pytest.approx(expected["probabilities"][0], abs=1e-4)
    # an export never replaces a file unasked, never writes into the run, and a crash mid-write loses nothing
    good = (tmp_path / "model.pt").read_bytes()
    assert_clean_error(run_cli("export", "--run", tmp_path / "run", "--out", tmp_path / "model.pt"),
                       "already exists", "--overwrite")
    for target in (tmp_path / "run" / "model.pt", tmp_path / "run" / "head.pt"):
        assert_clean_error(run_cli("export", "--run", tmp_path / "run", "--out", target, "--overwrite"),
                           "inside the run directory")
    from dinoprobe.runs import export as export_module

    def torn_write(obj, path):
        Path(path).write_bytes(b"half a model")
        raise KeyboardInterrupt

    real_save = export_module.torch.save
    export_module.torch.save = torn_write
    try:
        run_cli("export", "--run", tmp_path / "run", "--out", tmp_path / "model.pt", "--overwrite")
    finally:
        export_module.torch.save = real_save
    assert (tmp_path / "model.pt").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_probe_does_not_import_the_backbone_stack(synthetic, tmp_path):
    """Training on a cache needs torch, h5py and scikit-learn, not timm, torchvision or transformers."""
    import subprocess
    import sys

    code = ("import sys; from dinoprobe.cli import main; "
            f"main(['probe', '--cache', {str(synthetic)!r}, '--out', {str(tmp_path / 'r')!r}, '--epochs', '1'], "
            "standalone_mode=False); "
            "print(sorted(m for m in ('timm', 'torchvision', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_predictions_stream_out_in_input_order(photos, backbone, tmp_path):
    """A folder of millions of images must not wait for the last one to print the first (nor hold them all):
    entries come in input order, a skipped input at its place, each as soon as it and every earlier file are
    done; the command prints each line as it comes, so a pipe sees it while the run goes on."""

    from dinoprobe.runs.predict import iter_predictions
    from dinoprobe.train.headfile import load_head_file

    extract(backbone, open_source(str(photos)), tmp_path / "c", batch_size=10, workers=0, progress=False)
    run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "run", "--epochs", 2, check=True)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    files = sorted(str(p) for p in (photos / "val" / "ants").iterdir())[:5]
    files.insert(2, str(tmp_path / "bad.jpg"))
    forwards = []
    hook = backbone.register_forward_hook(lambda *_: forwards.append(1))
    try:
        entries = iter_predictions(load_head_file(tmp_path / "run"), backbone, files, batch_size=2, workers=0,
                                   device="cpu")
        first = next(entries)
        assert len(forwards) == 1  # one batch run, not all of them
        rest = list(entries)
    finally:
        hook.remove()
    assert [e["path"] for e in [first, *rest]] == files
    assert "skipped" in rest[1] and all("labels" in e for i, e in enumerate([first, *rest]) if i != 2)
    # the command: lines arrive as images are done (70 of them, one per batch), not all at once at the end
    import time

    out = tmp_path / "out.csv"
    proc = processes.Process(["-m", "dinoprobe", "predict", "--run", tmp_path / "run", "--batch-size", 1, "--workers",
                              0, "--format", "csv", photos], stdout=out, stderr=os.devnull,
                             env={"PYTHONUNBUFFERED": ""})  # stdout block-buffered, as Python buffers a pipe
    early, deadline = None, time.time() + 300
    try:
        while early is None and time.time() < deadline:  # the first image's line: was the run still going?
            lines = out.read_text().splitlines() if out.exists() and out.stat().st_size else []
            if len(lines) >= 2:
                early = (len(lines), proc.poll() is None)
            time.sleep(0.005)
        proc.wait(300)
    finally:
        proc.kill()
    lines = out.read_text().splitlines()
    assert proc.returncode == 0 and len(lines) == 71 and lines[0].startswith("path,label_1")
    assert early is not None and early[1] and early[0] < 71, early  # seen while the run went on, not at its end
