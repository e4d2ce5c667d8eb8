"""The feature cache: values against a reference, round trip, resume after SIGKILL, fingerprints, verify."""
import json
import os

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dinoprobe.cache import store as cache
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.backbone import build_backbone
from dinoprobe.extract.run import extract
from dinoprobe.extract.sources import open_source

import processes
from conftest import MODEL, SIZE, assert_clean_error, features_cmd, make_folder, run_cli


def _extract(backbone, root, cache_dir, **kw):
    kw = {"batch_size": 4, "workers": 0, "dtype": "float32", "shard_size": 5, "progress": False, **kw}
    return extract(backbone, open_source(str(root)), cache_dir, **kw)


def test_cached_features_equal_an_independent_timm_reference(backbone, photos, tmp_path):
    summary = _extract(backbone, photos, tmp_path / "c", shard_size=16, batch_size=8)
    assert summary.rows == {"train": 50, "val": 20}
    val = cache.load(tmp_path / "c", "val", features=("cls", "patch_mean"))
    reference_model = timm.create_model(MODEL, pretrained=False, num_classes=0, global_pool="token", img_size=SIZE)
    reference_model.load_state_dict(backbone.model.state_dict())
    reference_model.eval()
    transform = timm.data.create_transform(input_size=(3, SIZE, SIZE), interpolation="bicubic", crop_pct=1.0,
                                           mean=backbone.data_config.mean, std=backbone.data_config.std)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in val["path"]])
    with torch.inference_mode():
        expected = reference_model(pixels)  # timm with global_pool='token' = the normed CLS token
    assert np.abs(val["cls"] - expected.numpy()).max() < 1e-4
    assert list(val["index"]) == list(range(20))
    assert list(val["label"]) == [0] * 10 + [1] * 10


def test_shard_and_manifest_round_trip(backbone, tmp_path):
    root = make_folder(tmp_path / "d", per_class=6)
    _extract(backbone, root, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog"] and manifest["feature_dim"] == 384
    assert manifest["environment"]["packages"]["torch"] == torch.__version__  # the run that made the features
    assert manifest["environment"]["device"].startswith("cpu (")
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == [
        "train/shard-00000.h5", "train/shard-00001.h5", "train/shard-00002.h5"]
    with h5py.File(tmp_path / "c" / "train" / "shard-00001.h5") as fh:
        assert fh["cls"].shape == (5, 384) and fh["cls"].dtype == np.float32
        assert list(fh["index"][...]) == [5, 6, 7, 8, 9]
        assert fh["path"].asstr()[0].endswith("dog/005.png") or fh["path"].asstr()[0].endswith("cat/005.png")
    train = cache.load(tmp_path / "c", "train", features="cls")
    assert train["cls"].shape == (12, 384) and list(train["index"]) == list(range(12))
    assert cache.verify(tmp_path / "c") == []


def test_float16_storage_is_the_default_and_close(backbone, tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    _extract(backbone, root, tmp_path / "c32")  # this module's helper asks for float32
    extract(backbone, open_source(str(root)), tmp_path / "c16", batch_size=4, workers=0, progress=False)  # default
    a, b = cache.load(tmp_path / "c32", "train"), cache.load(tmp_path / "c16", "train")
    assert b["cls"].dtype == np.float16
    assert np.abs(a["cls"] - b["cls"].astype(np.float32)).max() < 1e-2


def test_rerun_resumes_and_another_request_is_refused(backbone, tmp_path):
    root = make_folder(tmp_path / "d", per_class=4)
    _extract(backbone, root, tmp_path / "c")
    assert _extract(backbone, root, tmp_path / "c").computed == 0  # everything was already there
    other = build_backbone(MODEL, "random", 48, log=lambda *_: None)
    with pytest.raises(DinoprobeError, match="image_size: cache has 32, requested 48"):
        _extract(other, root, tmp_path / "c")
    assert _extract(other, root, tmp_path / "c", overwrite=True).rows["train"] == 8


def test_batches_never_straddle_shards_so_a_recomputed_shard_has_its_first_runs_batches():
    """Matrix kernels that block by batch size round a row differently among other rows (seen on an Intel Xeon:
    a shard recomputed alone differed in the last bit of float16); batches within shards make resume exact."""
    from dinoprobe.extract.run import shard_batches

    # shards 0 and 2 of size 8 pending (the last one short): positions count along their rows
    assert shard_batches([(0, 0, 8), (2, 16, 21)], 3) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10], [11, 12]]
    assert shard_batches([(5, 40, 44)], 64) == [[0, 1, 2, 3]]


def test_bad_images_are_skipped_listed_and_counted(backbone, tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    (root / "train" / "cat" / "zero.jpg").write_bytes(b"")
    (root / "train" / "dog" / "text.jpg").write_text("hello")
    summary = _extract(backbone, root, tmp_path / "c")
    assert summary.skipped["train"] == 2 and summary.rows["train"] == 6
    manifest = cache.read_manifest(tmp_path / "c")
    reasons = {os.path.basename(s["path"]): s["reason"] for s in cache.skipped_inputs(manifest)}
    assert set(reasons) == {"zero.jpg", "text.jpg"} and "0 bytes" in reasons["zero.jpg"]
    assert cache.verify(tmp_path / "c") == []
    with pytest.raises(DinoprobeError, match="--strict"):
        _extract(backbone, root, tmp_path / "strict", strict=True)


def test_verify_catches_truncated_edited_missing_and_extra_shards(backbone, tmp_path):
    root = make_folder(tmp_path / "d", per_class=6)
    _extract(backbone, root, tmp_path / "c")
    shard0, shard1 = tmp_path / "c" / "train" / "shard-00000.h5", tmp_path / "c" / "train" / "shard-00001.h5"
    data = shard0.read_bytes()
    shard0.write_bytes(data[: len(data) // 2])
    with h5py.File(shard1, "r+") as fh:  # a well-formed HDF5 edit: only the hash can tell
        fh["cls"][0, 0] = 123.0
    (tmp_path / "c" / "val" / "shard-00001.h5").unlink()
    (tmp_path / "c" / "val" / "shard-00099.h5").write_bytes(b"x")
    problems = "\n".join(cache.verify(tmp_path / "c"))
    assert "shard-00000.h5: size" in problems and "truncated" in problems
    assert "train/shard-00001.h5: sha256 differs" in problems
    assert "val/shard-00001.h5: missing" in problems
    assert "val/shard-00099.h5: shard not in the manifest" in problems
    with pytest.raises(DinoprobeError, match="failed verification"):
        cache.load(tmp_path / "c", "train")
    proc = run_cli("cache", "verify", tmp_path / "c")
    assert_clean_error(proc, "problem")
    assert proc.stderr.count("problem:") == 4


def test_shards_finished_after_the_last_manifest_write_are_named_as_adoptable(backbone, tmp_path):
    """A run killed between manifest writes leaves finished shards that only their sidecars record: verify says the
    rerun adopts them (not "remove it"), and the rerun does, computing nothing again."""
    root = make_folder(tmp_path / "d", per_class=6)
    _extract(backbone, root, tmp_path / "c")
    manifest = cache.read_manifest(tmp_path / "c")
    manifest["splits"]["train"]["shards"] = manifest["splits"]["train"]["shards"][:1]  # the manifest lagged
    manifest["splits"]["train"]["complete"] = False
    cache.write_json(tmp_path / "c" / "manifest.json", manifest)
    (tmp_path / "c" / "train" / "shard-00002.json").write_text("{}")  # a sidecar that does not match: a stray
    problems = cache.verify(tmp_path / "c")
    assert "train/shard-00001.h5: finished, but not yet in the manifest (the run that wrote it stopped first); " \
           "rerunning the same `dinoprobe features` command adopts it" in problems
    assert "train/shard-00002.h5: shard not in the manifest (left by another run?); remove it or rebuild with " \
           "--overwrite" in problems
    (tmp_path / "c" / "train" / "shard-00002.h5").unlink()
    summary = _extract(backbone, root, tmp_path / "c")
    assert summary.computed == 2 and cache.verify(tmp_path / "c") == []  # shard 1 adopted; shard 2 (2 rows) redone


def test_manifest_edited_to_another_row_count_is_caught(backbone, tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    _extract(backbone, root, tmp_path / "c")
    manifest = cache.read_manifest(tmp_path / "c")
    manifest["splits"]["train"]["shards"][0]["rows"] = 4
    cache.write_json(tmp_path / "c" / "manifest.json", manifest)
    assert any("row counts" in p for p in cache.verify(tmp_path / "c"))


def test_second_writer_is_refused_and_stale_lock_recovered(tmp_path):
    (tmp_path / "c").mkdir()
    with cache.FolderLock(tmp_path / "c"):
        lock = (tmp_path / "c" / ".lock").read_text()
        assert lock == str(os.getpid())
        child = processes.run(["-c", "import sys; from dinoprobe.cache.store import FolderLock\n"
                                f"with FolderLock({str(tmp_path / 'c')!r}): pass"])
        assert child.returncode != 0 and f"pid {os.getpid()}" in child.stderr
    dead = processes.Process(["-c", "pass"])
    dead.wait()
    (tmp_path / "c" / ".lock").write_text(str(dead.pid))
    with cache.FolderLock(tmp_path / "c"):
        pass
    assert not (tmp_path / "c" / ".lock").exists()


@pytest.mark.slow
def test_features_end_to_end_on_real_jpegs(photos, tmp_path):
    proc = run_cli("features", "--data", photos, "--weights", "random", "--image-size", SIZE,
                   "--cache", tmp_path / "c", "--batch-size", 8, check=True, in_process=False)
    assert "train 50, val 20 rows; 0 skipped" in proc.stdout
    assert "RANDOM weights" in proc.stderr
    assert run_cli("cache", "verify", tmp_path / "c", check=True).stdout.startswith("ok:")
    manifest = cache.read_manifest(tmp_path / "c")
    assert manifest["fingerprint"]["weights"]["source"] == "random"
    assert manifest["fingerprint"]["data"]["file_list_sha256"]


def test_features_cli_errors(tmp_path):
    # one real process: the message a user sees, with nothing else on stderr
    assert_clean_error(run_cli("features", "--data", tmp_path / "nope", "--weights", "random", in_process=False),
                       "not a folder")
    root = make_folder(tmp_path / "d", per_class=2)
    assert_clean_error(run_cli("features", "--data", root, "--model", "resnet_nope"), "unknown model")
    (tmp_path / "w.pth").write_bytes(b"\x80garbage")
    assert_clean_error(run_cli("features", "--data", root, "--weights", tmp_path / "w.pth"), "cannot read weights")
    proc = run_cli("features", "--data", root, "--batch-size", 0)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_compiled_forward_sees_one_batch_shape_and_gives_the_eager_features(backbone):
    """--compile: the last short batch and B x K view batches are chunked/padded, never a new shape."""
    from dinoprobe.extract.run import FixedBatchForward

    shapes = []

    def recording_backend(graph_module, example_inputs):
        shapes.append(tuple(example_inputs[0].shape) if example_inputs else None)
        return graph_module.forward

    import torch._dynamo

    torch._dynamo.reset()
    forward = FixedBatchForward(backbone, batch_size=4, backend=recording_backend)
    with torch.inference_mode():  # as in extraction, where inputs are made under inference_mode
        x = torch.randn(11, 3, SIZE, SIZE)  # 4 + 4 + 3 (padded): like views of a batch, or a split's last batch
        got, expected = forward(x), backbone(x)
        forward(x[:7])  # another size: still the same compiled shape
    assert {k: v.shape for k, v in got.items()} == {"cls": (11, 384), "patch_mean": (11, 384)}
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4)
    assert len(shapes) == 1  # compiled once, for the (4, 3, S, S) shape only


def test_a_shard_stays_readable_while_a_process_forked_during_its_write_lives(tmp_path, monkeypatch):
    """DataLoader workers forked while the writer thread has a shard open inherit its descriptor (the next split's
    workers start while the last shard of this one is written); an HDF5 file lock would go with it and make the
    finished shard unreadable ('unable to lock file') for as long as they live."""
    real_file = h5py.File
    read_end, write_end = os.pipe()
    children = []

    def file_then_fork(name, mode="r", *args, **kwargs):
        handle = real_file(name, mode, *args, **kwargs)
        if mode == "w":
            pid = os.fork()
            if pid == 0:  # the "worker": holds what it inherited until told to go
                os.read(read_end, 1)
                os._exit(0)
            children.append(pid)
        return handle

    monkeypatch.setattr(h5py, "File", file_then_fork)
    rows = {"cls": np.ones((3, 4), np.float32), "patch_mean": np.zeros((3, 4), np.float32),
            "label": np.array([0, 1, 0]), "index": np.arange(3), "path": ["a", "b", "c"]}
    (tmp_path / "train").mkdir()
    try:
        entry = cache.write_shard(tmp_path, "train", 0, 0, 3, rows, "float32", [])
        assert children  # the child is alive, holding the written file's descriptor
        got = cache.read_shard(tmp_path / entry["file"], ("cls", "label"))
        np.testing.assert_array_equal(got["cls"], rows["cls"])
    finally:
        os.write(write_end, b"x" * len(children))
        for pid in children:
            os.waitpid(pid, 0)


def test_readers_do_not_depend_on_file_locks_and_a_lockless_filesystem_is_named(backbone, tmp_path, monkeypatch):
    """Shards are immutable once renamed in, so reading them takes no HDF5 file lock: a shard stays readable while
    something holds a lock on it, and on filesystems without flock (NFS without a lock daemon, Lustre without
    -o flock), where HDF5's locking reads fail. The writer's own lock there is refused in one line naming the fix."""
    import errno
    import fcntl

    root = make_folder(tmp_path / "d", per_class=6)
    _extract(backbone, root, tmp_path / "c")
    shard = tmp_path / "c" / "train" / "shard-00000.h5"
    with open(shard, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cache.verify(tmp_path / "c") == []
        assert len(cache.load(tmp_path / "c", "train", features="cls")["cls"]) == 12

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    proc = run_cli(*features_cmd(root, tmp_path / "c2")[3:])
    assert_clean_error(proc, "does not support file locks", "local disk")


def test_the_manifest_is_rewritten_every_few_seconds_not_after_every_shard(tmp_path, monkeypatch):
    """20,000 small shards rewriting an ever-longer manifest after each one took minutes of the writer's time."""
    import dinoprobe.extract.run as run_module

    writes = []
    real_write_json = run_module.write_json
    monkeypatch.setattr(run_module, "write_json", lambda path, data: (writes.append(path), real_write_json(path,
                                                                                                           data)))
    tmp_path.joinpath("train").mkdir()
    manifest = cache.new_manifest({"test": 1}, ["a"], {"train": 60}, shard_size=1)
    writer = run_module.ShardWriter(tmp_path, manifest, "float32")
    row = lambda i: {"cls": np.full((1, 4), i, np.float32), "label": np.zeros(1), "index": np.array([i]),  # noqa: E731
                     "path": [f"{i}.png"]}
    for i in [*range(60), 0]:  # shard 0 (in the manifest since the first write) recomputed: its entry is replaced
        writer.submit("train", i, i, i + 1, row(i), [])
    writer.close()
    assert writes.count(tmp_path / cache.MANIFEST) <= 3  # the first shard, perhaps one a few seconds later, the end
    written = json.loads((tmp_path / cache.MANIFEST).read_text())["splits"]["train"]["shards"]
    assert [s["start"] for s in written] == list(range(60)) and written == manifest["splits"]["train"]["shards"]
    assert len(list(tmp_path.glob("train/shard-*.json"))) == 60  # every shard recorded beside it at once
    assert [cache.read_shard(tmp_path / s["file"], ("cls",))["cls"][0, 0] for s in written] == list(range(60))
