"""The CUDA paths (`make test-gpu`, or `bash bench/gpu.sh` for the whole GPU run). Skipped without a GPU; their
CPU counterparts run everywhere else in the suite."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dinoprobe import KNN, LogReg, Probe, Sweep, load_cache
from dinoprobe.cache import store as cache
from dinoprobe.train.loop import TrainConfig, train_heads

from conftest import REPO, make_synthetic_cache, run_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")]


def features(data, out, *args):
    run_cli("features", "--data", data, "--weights", "random", "--image-size", 64, "--cache", out, "--dtype",
            "float32", "--last-blocks", 2, *args, check=True)
    return {s: cache.load(out, s, ("cls", "patch_mean", "cls_blocks")) for s in ("train", "val")}


def cosine(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()


def test_features_on_jpegs_every_decoder_and_bf16_against_fp32(photos, tmp_path):
    reference = features(photos, tmp_path / "cpu", "--device", "cpu", "--precision", "fp32")
    # batches of 2: many batches in flight one after another, each read back from pinned memory after its event
    runs = {"fp32": ("--precision", "fp32", "--batch-size", 2), "bf16": ("--precision", "bf16"),
            "nvjpeg": ("--precision", "bf16", "--decoder", "torchvision", "--batch-size", 3)}
    for name, args in runs.items():
        got = features(photos, tmp_path / name, "--device", "cuda", *args)
        fingerprint = cache.read_manifest(tmp_path / name)["fingerprint"]
        if name == "nvjpeg":
            assert fingerprint["decoder"] == {"name": "torchvision", "device": "cuda"}
        for split in reference:
            np.testing.assert_array_equal(got[split]["index"], reference[split]["index"])
            for kind in ("cls", "patch_mean", "cls_blocks"):
                # nvJPEG's IDCT and the tensor resize add to bf16's rounding (measured on an H200: 0.99887 for
                # patch_mean at 64 px with random weights, where bf16 with PIL decoding stays over 0.999)
                floor = {"fp32": 0.9999, "bf16": 0.999, "nvjpeg": 0.998}[name]
                assert cosine(got[split][kind], reference[split][kind]) >= floor, \
                    (name, split, kind)


def test_augmented_views_on_cuda_equal_the_cpus(photos, tmp_path):
    """--views on CUDA (K views per image through the same forward, features in flight with the clean ones): the
    views are drawn on the CPU per image, so CUDA's features are the CPU's."""
    views = {}
    for device in ("cpu", "cuda"):
        run_cli("features", "--data", photos, "--weights", "random", "--image-size", 64, "--cache", tmp_path / device,
                "--dtype", "float32", "--precision", "fp32", "--device", device, "--views", 2, "--batch-size", 8,
                check=True)
        views[device] = cache.load(tmp_path / device, "train", ("cls_views", "patch_mean_views"))
    for kind in ("cls_views", "patch_mean_views"):
        assert views["cuda"][kind].shape == views["cpu"][kind].shape == (50, 2, 384)
        assert cosine(views["cuda"][kind].reshape(-1, 384), views["cpu"][kind].reshape(-1, 384)) >= 0.9999


def test_features_on_cifar_format_arrays(tmp_path):
    from bench.benchmark import array_source
    from dinoprobe.extract.backbone import build_backbone
    from dinoprobe.extract.run import extract

    backbone = build_backbone(weights="random", image_size=64, log=lambda *_: None)
    source = array_source(40)
    extract(backbone, source, tmp_path / "cpu", device="cpu", precision="fp32", dtype="float32", progress=False)
    extract(backbone, source, tmp_path / "gpu", device="cuda", precision="bf16", dtype="float32", progress=False)
    a, b = cache.load(tmp_path / "cpu", "train", "cls"), cache.load(tmp_path / "gpu", "train", "cls")
    assert cosine(a["cls"], b["cls"]) >= 0.999


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("gpu") / "cache", n=(2000, 400, 400), dim=64)


# dropout 0: dropout masks come from the training device's generator, and CUDA's draws differ from the CPU's
# (as F.dropout's do), so an MLP with dropout trains to a different head on each (measured on an H200: up to 0.008
# in probability after 10 epochs; 0.13 for a multi-label MLP at lr 1e-2)
@pytest.mark.parametrize("estimator", [Probe(head="linear", epochs=10), Probe(epochs=10, hidden=32, dropout=0.0),
                                       Sweep(Probe(epochs=5, dropout=0.0),
                                             param_grid={"lr": [1e-3, 1e-2], "head": ["linear", "mlp"]}),
                                       LogReg(Cs=[0.01, 1.0]), KNN(ks=(5, 20))], ids=lambda e: type(e).__name__)
def test_heads_on_cuda_give_the_cpu_results(synthetic, estimator):
    from sklearn.base import clone

    results = {}
    for device in ("cpu", "cuda"):
        d = load_cache(synthetic, device=device)
        where = {"estimator__device" if isinstance(estimator, Sweep) else "device": device}
        fitted = clone(estimator).set_params(**where).fit(d.X_train, d.y_train, X_val=d.X_val, y_val=d.y_val)
        results[device] = (fitted.predict_proba(d.X_test.cpu()), getattr(fitted, "best_score_", None))
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], atol=2e-3)
    assert results["cuda"][1] == pytest.approx(results["cpu"][1], abs=0.01)


def _clusters(n=3000, dim=48, classes=6):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(n, dim, generator=gen) + 1.5 * torch.randn(classes, dim, generator=gen)[y]
    return [t.cuda() for t in (x[:2500], y[:2500], x[2500:], y[2500:])]


GRAPH_CASES = {
    "linear-adam": ([TrainConfig(head="linear", epochs=5, batch_size=128, warmup_epochs=1)], {}),
    "sgd-nesterov-two-lrs": ([TrainConfig(head="linear", optimizer="sgd", nesterov=True, lr=lr, weight_decay=1e-3,
                                          epochs=4, batch_size=256) for lr in (0.01, 0.1)], {}),
    "mlp-adamw": ([TrainConfig(head="mlp", hidden=32, dropout=0.0, optimizer="adamw", weight_decay=0.05, epochs=4,
                               batch_size=200)], {}),
    # dropout masks from the heads' generator, registered with the graph: replay k draws eager epoch k's masks
    "mlp-dropout-two-heads": ([TrainConfig(head="mlp", hidden=32, dropout=p, epochs=4, batch_size=128)
                               for p in (0.1, 0.5)], {}),
    "class-weights": ([TrainConfig(head="linear", epochs=4, label_smoothing=0.1)],
                      {"class_weights": torch.tensor([0.5, 2.0, 1.0, 1.0, 3.0, 0.7])}),
    "dinov3-epoch-length": ([TrainConfig(head="linear", optimizer="sgd", momentum=0.9, lr=0.05, batch_size=128,
                                         epochs=3, epoch_length=30, init="normal", select="last")], {}),
    "multilabel": ([TrainConfig(head="linear", epochs=4, batch_size=128)], {"multilabel": True}),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_cuda_graph_epochs_equal_the_same_epochs_step_by_step(case):
    """With static_epochs=True the engine runs its first epoch eagerly on CUDA, captures the second as a CUDA graph
    and replays it for the rest (train/graphed.py); launched step by step (static_epochs=False) the same training
    gives the same losses, choices and heads. When these pass on a GPU, graphed.GRAPHS_BY_DEFAULT can be True."""
    import warnings

    configs, kwargs = GRAPH_CASES[case]
    x, y, xv, yv = _clusters()
    if kwargs.pop("multilabel", False):
        y, yv = (torch.nn.functional.one_hot(t, 6).float() for t in (y, yv))
        y[::3, 0] = 1.0  # some rows with two labels
    runs = {}
    for static in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and trains on: here it fails
            runs[static] = train_heads(configs, x, y, xv, yv, 6, static_epochs=static, **kwargs)
    assert all(r.cuda_graph for r in runs[True]) and not any(r.cuda_graph for r in runs[False])
    for graphed, eager in zip(runs[True], runs[False], strict=True):
        np.testing.assert_allclose(graphed.step_losses, eager.step_losses, atol=1e-5, rtol=0)
        assert graphed.best_epoch == eager.best_epoch
        for a, b in zip(graphed.best_layers, eager.best_layers, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert len(set(np.round(runs[True][0].step_losses, 4))) > 5  # training moved: the comparison means something


def test_evaluate_on_cuda_gives_the_cpus_table(tmp_path):
    """`evaluate` on CUDA (the linear preset's 13 heads side by side as CUDA graphs, logreg's batched L-BFGS, k-NN):
    the CPU's accuracies, up to a few rows' predictions flipping between devices (or a tie on val choosing
    another learning rate)."""
    import json

    data = make_synthetic_cache(tmp_path / "c", n=(400, 120, 120), dim=16, num_classes=4)
    rows = {}
    for device in ("cpu", "cuda"):
        run_cli("evaluate", "--cache", data, "--out", tmp_path / device, "--epochs", 3, "--epoch-length", 10,
                "--device", device, check=True)
        rows[device] = json.loads((tmp_path / device / "results.json").read_text())["rows"][0]
    top1 = [k for k, v in rows["cpu"].items() if "top1" in k and isinstance(v, float)]
    assert {"linear_test_top1", "logreg_test_top1"} <= set(top1)
    for key in top1:
        assert rows["cuda"][key] == pytest.approx(rows["cpu"][key], abs=0.05), key


@pytest.mark.parametrize("make", [lambda d: Probe(head="linear", epochs=10, device=d),
                                  lambda d: Sweep(Probe(epochs=5, dropout=0.0, device=d), param_grid={"lr": [1e-3, 1e-2]}),
                                  lambda d: LogReg(Cs=[0.01, 1.0], device=d), lambda d: KNN(ks=(5, 20), device=d)],
                         ids=["Probe", "Sweep", "LogReg", "KNN"])
def test_multilabel_heads_on_cuda_give_the_cpu_results(make):
    """Sigmoid heads, average precision on the device, one-vs-rest L-BFGS and per-class votes, on CUDA tensors."""
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(1500, 5, generator=gen) < 0.3).float()
    x = torch.randn(1500, 32, generator=gen) + 1.5 * y @ torch.randn(5, 32, generator=gen)
    results = {}
    for device in ("cpu", "cuda"):
        fitted = make(device).fit(x[:1200].to(device), y[:1200].to(device), X_val=x[1200:1350].to(device),
                                  y_val=y[1200:1350].to(device))
        results[device] = (fitted.predict_proba(x[1350:]), fitted.best_score_)
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], atol=2e-3)
    assert results["cuda"][1] == pytest.approx(results["cpu"][1], abs=0.01)


def test_streaming_on_cuda_equals_in_memory_training_in_the_same_order(tmp_path):
    """Streamed from disk on CUDA, and in memory on CUDA following the streamed order: the same losses."""
    from dinoprobe.train.config import TrainConfig
    from dinoprobe.train.loop import train_heads
    from dinoprobe.train.sources import InMemory

    sharded = make_synthetic_cache(tmp_path / "c", n=(600, 200, 200), shard_rows=70)
    streamed = load_cache(sharded, "cls", device="cuda", max_memory=150 * 32 * 4)
    in_memory = load_cache(sharded, "cls", device="cuda")
    assert streamed.stream is not None and in_memory.stream is None

    class InStreamOrder(InMemory):
        def order(self, n, generator):
            return streamed.stream.order(n, generator)

    cfg = TrainConfig(head="mlp", normalize="standardize", epochs=3, batch_size=64, lr=1e-2)
    a, = train_heads([cfg], streamed.X_train, streamed.y_train, streamed.X_val, streamed.y_val, 6)
    b, = train_heads([cfg], InStreamOrder(in_memory.X_train), in_memory.y_train, in_memory.X_val, in_memory.y_val, 6)
    np.testing.assert_allclose(a.step_losses, b.step_losses, atol=1e-4)
    assert [h["val_acc"] for h in a.history] == [h["val_acc"] for h in b.history]


def test_probe_predict_export_on_cuda(photos, tmp_path):
    features(photos, tmp_path / "c", "--device", "cuda")
    run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "run", "--device", "cuda", "--epochs", 5,
            "--feature", "cls2+patch_mean", check=True)
    from dinoprobe.train.graphed import GRAPHS_BY_DEFAULT

    assert json.loads((tmp_path / "run" / "run.json").read_text())["cuda_graph"] is GRAPHS_BY_DEFAULT  # MLP, dropout
    on_gpu = json.loads(run_cli("predict", "--run", tmp_path / "run", "--device", "cuda", "--format", "json",
                                photos / "val", check=True).stdout)
    on_cpu = json.loads(run_cli("predict", "--run", tmp_path / "run", "--device", "cpu", "--format", "json",
                                photos / "val", check=True).stdout)
    assert [r["labels"][0] for r in on_gpu] == [r["labels"][0] for r in on_cpu]
    run_cli("export", "--run", tmp_path / "run", "--out", tmp_path / "model.pt", check=True)
    from dinoprobe.runs.export import load_exported

    model = load_exported(tmp_path / "model.pt").cuda()
    image = sorted((photos / "val" / "ants").iterdir())[0]
    with torch.inference_mode():
        probs = model(model.preprocess(image)[None].cuda()).softmax(-1)[0].cpu()
    expected = next(r for r in on_cpu if r["path"] == str(image))
    assert float(probs.max()) == pytest.approx(expected["probabilities"][0], abs=2e-3)


def test_torchrun_on_cuda_resumes_across_world_sizes(photos, tmp_path):
    """Two ranks on CUDA (a real process group; on one GPU they share it) resume a cache a single process was killed
    in: the rows and features of one process."""
    from conftest import cache_rows, features_cmd, kill_during_extraction

    subprocess.run(features_cmd(photos, tmp_path / "one"), check=True, capture_output=True, cwd=REPO)
    reference = cache_rows(tmp_path / "one")
    assert kill_during_extraction(photos, tmp_path / "c", after_shards=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dinoprobe",
           *features_cmd(photos, tmp_path / "c")[3:]]  # device auto = cuda, as the run it resumes
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = cache_rows(tmp_path / "c")
    for split in reference:
        np.testing.assert_array_equal(got[split]["index"], reference[split]["index"])
        assert cosine(got[split]["cls"], reference[split]["cls"]) >= 0.9999


# last: compiling takes a minute or more, and a GPU lease that ends early should have run the others
def test_compiled_extraction_matches_eager(photos, tmp_path):
    eager = features(photos, tmp_path / "eager", "--device", "cuda", "--precision", "bf16")
    compiled = features(photos, tmp_path / "compiled", "--device", "cuda", "--precision", "bf16", "--compile")
    for split in eager:
        assert cosine(eager[split]["cls"], compiled[split]["cls"]) >= 0.999
