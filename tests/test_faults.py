"""Reliability: kills at random moments, Ctrl-C, failing writes, concurrent writers, hostile inputs and files."""
import errno
import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dinoprobe.cache import store as cache
from dinoprobe.cli import main
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.run import extract
from dinoprobe.extract.sources import open_source

import processes
from conftest import (
    REPO,
    assert_clean_error,
    cache_rows,
    features_cmd,
    finished_shards,
    make_folder,
    run_cli,
    with_file_size_limit,
    write_image,
)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("faults") / "data", per_class=10)


@pytest.fixture(scope="module")
def reference(small_folder):
    clean = small_folder.parent / "clean"
    run_cli(*features_cmd(small_folder, clean)[3:], check=True)  # in-process: the same code, one start less
    return cache_rows(clean)


def _assert_same_rows(expected, cache_dir):
    got = cache_rows(cache_dir)
    for split in ("train", "val"):
        for key in expected[split]:
            np.testing.assert_array_equal(expected[split][key], got[split][key], err_msg=f"{split}/{key}")


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_or_doubles_rows(small_folder, reference, tmp_path, backbone):
    """6 seeded trials: kill -9 at a random point of the run (start-up included), resume, compare with a
    clean run. The resume runs in-process: the same code path and fingerprint, one interpreter start less."""
    from conftest import kill_during_extraction

    rng = random.Random(1234)
    total_shards = 2 * 5  # 20 train + 20 val inputs in shards of 4
    interrupted = 0
    for trial in range(6):
        cache_dir = tmp_path / f"trial{trial}"
        interrupted += kill_during_extraction(small_folder, cache_dir, after_shards=rng.randint(0, total_shards - 1),
                                              jitter=rng.uniform(0, 0.05))
        extract(backbone, open_source(str(small_folder)), cache_dir, batch_size=2, workers=0, shard_size=4,
                dtype="float32", progress=False)
        assert cache.verify(cache_dir) == []
        _assert_same_rows(reference, cache_dir)
    assert interrupted >= 5  # the trials really interrupted runs


@pytest.mark.slow
@pytest.mark.parametrize("stop,code,word", [(signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_cleanly_and_says_how_to_resume(small_folder, reference, tmp_path, stop, code, word):
    """Ctrl-C, and SIGTERM (`kill`, `docker stop`, a scheduler preempting the job) the same way."""
    cache_dir = tmp_path / "c"
    proc = processes.Process(features_cmd(small_folder, cache_dir)[1:])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if finished_shards(cache_dir):
                break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert word in stderr and "Rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert not list(cache_dir.glob("*/.shard-*.tmp-*"))  # nothing half-written left behind
    assert not (cache_dir / ".lock").exists()
    problems = cache.verify(cache_dir)
    assert problems and all("incomplete" in p for p in problems)  # partial, never corrupt
    run_cli(*features_cmd(small_folder, cache_dir)[3:], check=True)
    _assert_same_rows(reference, cache_dir)


def test_a_failing_write_is_a_clear_error_and_the_cache_stays_valid(backbone, small_folder, tmp_path, monkeypatch):
    import dinoprobe.extract.run as extract_module

    real_write, calls = extract_module.write_shard, []

    def disk_full_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(extract_module, "write_shard", disk_full_after_two)
    kwargs = dict(batch_size=4, workers=0, dtype="float32", shard_size=4, progress=False)
    with pytest.raises(DinoprobeError, match="No space left on device.*intact.*rerun"):
        extract(backbone, open_source(str(small_folder)), tmp_path / "c", **kwargs)
    problems = cache.verify(tmp_path / "c")
    assert problems and all("incomplete" in p for p in problems)
    assert not (tmp_path / "c" / ".lock").exists()
    monkeypatch.setattr(extract_module, "write_shard", real_write)
    summary = extract(backbone, open_source(str(small_folder)), tmp_path / "c", **kwargs)
    assert summary.rows["train"] == 20 and cache.verify(tmp_path / "c") == []


@pytest.mark.slow
def test_a_write_failing_inside_hdf5_is_one_line_and_the_rerun_completes_the_cache(small_folder, reference, tmp_path):
    """A shard larger than the file-size limit: its write fails as on a full disk. HDF5 writing the file itself
    printed errors h5py could not raise and segfaulted at exit (found on a real full tmpfs); shards are now built in
    memory and written by Python."""
    cache_dir = tmp_path / "c"
    proc = subprocess.run(with_file_size_limit(features_cmd(small_folder, cache_dir), kib=8), capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1, proc.stderr  # not 139 (SIGSEGV)
    assert_clean_error(proc, "writing the cache failed", "File too large", "rerun")
    assert "Exception ignored" not in proc.stderr and "HDF5" not in proc.stderr, proc.stderr
    assert not list(cache_dir.glob("*/.shard-*"))  # the partial temporary file is removed
    problems = cache.verify(cache_dir)
    assert problems and all("incomplete" in p for p in problems)
    run_cli(*features_cmd(small_folder, cache_dir)[3:], check=True)
    _assert_same_rows(reference, cache_dir)


def kill_the_worker_at(monkeypatch, index: int, split: str | None = None):
    """Make the decoding worker that loads item `index` (of `split`'s dataset, or any) die by SIGKILL, as the OOM
    killer or a bus error stops it; returns the real __getitem__ (monkeypatch.undo() puts it back too)."""
    import dinoprobe.extract.datasets as datasets_module

    real = datasets_module.ImageFileDataset.__getitem__

    def killed(self, i):
        if i == index and (split is None or f"{os.sep}{split}{os.sep}" in self.samples[i][0]):
            os.kill(os.getpid(), signal.SIGKILL)  # in the worker process
        return real(self, i)

    monkeypatch.setattr(datasets_module.ImageFileDataset, "__getitem__", killed)
    return real


def test_a_decoding_worker_killed_by_the_system_is_a_clear_error_and_the_rerun_resumes(small_folder, reference,
                                                                                        tmp_path, monkeypatch,
                                                                                        backbone):
    """The kernel's OOM killer, or a bus error when /dev/shm fills (Docker's default is 64 MB), stops a DataLoader
    worker: one line naming the fix, not torch's traceback, and the shards written before it are kept."""
    import dinoprobe.extract.datasets as datasets_module

    real = kill_the_worker_at(monkeypatch, 12, "val")  # once the train split is done
    args = features_cmd(small_folder, tmp_path / "c")[3:]
    proc = run_cli(*args[:args.index("--workers")], "--workers", 2, *args[args.index("--workers") + 2:])
    assert_clean_error(proc, "decoding worker process died", "--workers", "resume")
    splits = json.loads((tmp_path / "c" / "manifest.json").read_text())["splits"]
    kept = splits["train"]["shards"] + splits["val"]["shards"]
    assert len(splits["train"]["shards"]) == 5  # written before the worker died, and not computed again below
    monkeypatch.setattr(datasets_module.ImageFileDataset, "__getitem__", real)
    summary = extract(backbone, open_source(str(small_folder)), tmp_path / "c", batch_size=2, workers=0,
                      shard_size=4, dtype="float32", progress=False)
    assert summary.computed == 40 - sum(s["rows"] for s in kept)
    _assert_same_rows(reference, tmp_path / "c")


def test_predict_with_a_killed_decoding_worker_is_a_clear_error(small_folder, tmp_path, monkeypatch, backbone):
    from dinoprobe import Probe
    from dinoprobe.runs.experiments import run_probe

    extract(backbone, open_source(str(small_folder)), tmp_path / "c", batch_size=4, workers=0, progress=False)
    run_probe(tmp_path / "c", tmp_path / "run", Probe(head="linear", epochs=1))
    kill_the_worker_at(monkeypatch, 3)
    proc = run_cli("predict", "--run", tmp_path / "run", "--workers", 2, "--batch-size", 2, small_folder / "val")
    assert_clean_error(proc, "decoding worker process died", "--workers 0")


def test_running_out_of_memory_is_a_clear_error_and_nothing_complete_is_lost(small_folder, reference, tmp_path,
                                                                             monkeypatch, backbone):
    """A GPU's OutOfMemoryError in the forward (--batch-size too large for the card) or the host's MemoryError in
    training: one line naming the fixes, not a traceback; a features rerun resumes to the reference rows, and a
    probe leaves no run directory."""
    import dinoprobe.extract.run as run_module
    import dinoprobe.runs.experiments as experiments_module

    real, calls = run_module.token_features, []

    def third_batch_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "token_features", third_batch_fails)
    proc = run_cli(*features_cmd(small_folder, tmp_path / "c")[3:])
    assert_clean_error(proc, "out of memory", "CUDA out of memory", "--batch-size")
    monkeypatch.setattr(run_module, "token_features", real)
    run_cli(*features_cmd(small_folder, tmp_path / "c")[3:], check=True)
    _assert_same_rows(reference, tmp_path / "c")

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(experiments_module, "load_cache", no_memory)
    proc = run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "run")
    assert_clean_error(proc, "out of memory (MemoryError)", "--max-memory")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(experiments_module, "load_cache", lambda *a, **k: torch.empty(2**50))  # torch's CPU allocator
    proc = run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "run")  # refused: a RuntimeError of its own
    assert_clean_error(proc, "out of memory (can't allocate memory: you tried to allocate 4503599627370496 bytes")
    monkeypatch.setattr(experiments_module, "load_cache", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    assert "Traceback" in run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "run").stderr  # only OOM


def test_shared_memory_bounds_the_batches_loader_workers_keep(monkeypatch):
    """Workers hold prefetch_factor batches each in /dev/shm: 4 where they fit, fewer where shared memory is small,
    and a warning that names the fix where not even one each fits."""
    from dinoprobe import device

    mb = 2**20
    monkeypatch.setattr(device, "shared_memory_free", lambda path=device.SHARED_MEMORY: 64 * mb)
    assert device.loader_prefetch(0, 10 * mb) == (None, None)  # in-process decoding keeps nothing there
    assert device.loader_prefetch(2, 8 * mb) == (4, None)  # 2 x 4 x 8 MB = 64 MB
    assert device.loader_prefetch(8, 2 * mb) == (4, None)
    assert device.loader_prefetch(8, 4 * mb) == (2, None)  # 8 x 2 x 4 MB = 64 MB
    prefetch, warning = device.loader_prefetch(8, 9 * mb)
    assert prefetch == 1 and "--workers" in warning and "--batch-size" in warning and "64 MB" in warning
    monkeypatch.setattr(device, "shared_memory_free", lambda path=device.SHARED_MEMORY: None)  # no /dev/shm
    assert device.loader_prefetch(8, 1024 * mb) == (4, None)


def test_no_worker_outlives_the_error_of_a_killed_one(small_folder, backbone, monkeypatch):
    """The error's traceback held torch's iterator, so the other workers lived as long as the error; when they exited
    later, torch's SIGCHLD handler raised its own error for the dead one wherever the CLI was by then — a traceback
    after the clear line (seen once in a full test run)."""
    import multiprocessing

    import dinoprobe.extract.datasets as datasets_module

    kill_the_worker_at(monkeypatch, 5)
    dataset = open_source(str(small_folder)).dataset("train", backbone.data_config)
    loader = datasets_module.DecodingLoader(dataset, 2, 2, dataset.input_bytes)
    with pytest.raises(DinoprobeError, match="decoding worker process died") as caught:
        with loader.explaining_failures():
            for _ in loader:
                pass
    assert caught.value.__context__ is not None  # the error and what it happened during are still alive here...
    assert multiprocessing.active_children() == []  # ...and no worker is


@pytest.mark.parametrize("broken", [EOFError(), ConnectionResetError(104, "Connection reset by peer"),
                                    ConnectionRefusedError(111, "Connection refused")], ids=type)
def test_a_worker_killed_while_handing_over_a_batch_is_the_same_clear_error(small_folder, backbone, broken):
    """Killed mid-handover, a worker can break the pipe or the socket its batch's shared memory comes through before
    torch notices it is gone: that EOFError or ConnectionError is the same one-line error, not click's "Aborted!" nor
    the disk-space advice of an OSError. Without workers nothing is handed over: such an error is not ours."""
    from dinoprobe.extract.datasets import DecodingLoader

    dataset = open_source(str(small_folder)).dataset("train", backbone.data_config)
    with pytest.raises(DinoprobeError, match=rf"a decoding worker process died \({type(broken).__name__} from a "
                                             r"worker's connection.*--workers"):
        with DecodingLoader(dataset, 2, 2, dataset.input_bytes).explaining_failures():
            raise broken
    with pytest.raises(type(broken)):
        with DecodingLoader(dataset, 2, 0, dataset.input_bytes).explaining_failures():
            raise broken


@pytest.mark.parametrize("first", [ConnectionResetError(104, "Connection reset by peer"),
                                   RuntimeError("DataLoader worker (pid 7) exited unexpectedly")], ids=type)
def test_torchs_handler_raising_while_the_workers_are_stopped_is_still_the_clear_error(small_folder, backbone,
                                                                                      monkeypatch, first):
    """torch's SIGCHLD handler raises "DataLoader worker ... is killed" wherever the main process is when the dead
    worker's signal arrives: once, in a full test run, inside the error handling itself, just before the handler was
    set aside (a traceback after all). Here it raises at that moment, twice."""
    from dinoprobe.extract.datasets import DecodingLoader

    real, raised = DecodingLoader._stop_workers, []

    def interrupted(self, err):
        if len(raised) < 2:
            raised.append(err)
            raise RuntimeError(f"DataLoader worker (pid {10 + len(raised)}) is killed by signal: Killed.")
        return real(self, err)

    monkeypatch.setattr(DecodingLoader, "_stop_workers", interrupted)
    dataset = open_source(str(small_folder)).dataset("train", backbone.data_config)
    with pytest.raises(DinoprobeError, match=r"a decoding worker process died .*--workers"):
        with DecodingLoader(dataset, 2, 2, dataset.input_bytes).explaining_failures():
            raise first
    assert len(raised) == 2


@pytest.mark.parametrize("kind", ["files", "files+views", "arrays", "arrays+views"])
def test_the_shared_memory_budget_counts_what_a_batch_really_holds(small_folder, backbone, kind):
    """DecodingLoader's budget uses each dataset's input_bytes: held to the bytes of a real collated batch (pixels
    and views), so stored arrays (CIFAR's 32 x 32) are not budgeted as model-size images, nor views forgotten."""
    from dinoprobe.extract.datasets import DecodingLoader
    from dinoprobe.extract.datasource import DataSource
    from dinoprobe.extract.transforms import Views

    views = Views(backbone.data_config, 2, "light") if kind.endswith("views") else None
    if kind.startswith("files"):
        source = open_source(str(small_folder))
    else:
        arrays = {"train": np.random.default_rng(0).integers(0, 256, (6, 48, 40, 3), dtype=np.uint8)}
        source = DataSource("cifar10", "t", ["a", "b"], {"train": [(f"t:{i}", i % 2) for i in range(6)]}, None, arrays)
    dataset = source.dataset("train", backbone.data_config, views=views)
    pixels, _, _, _, view_pixels = next(iter(DecodingLoader(dataset, 3, 0, dataset.input_bytes)))
    held = pixels.nbytes + (view_pixels.nbytes if view_pixels is not None else 0)
    assert dataset.input_bytes == held // 3 > 0


def test_features_with_little_shared_memory_warns_and_keeps_one_batch_per_worker(small_folder, reference, tmp_path,
                                                                                  monkeypatch):
    from dinoprobe import device

    monkeypatch.setattr(device, "shared_memory_free", lambda path=device.SHARED_MEMORY: 1024)  # 1 KB free
    built = []

    class Recorded(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Recorded)
    args = features_cmd(small_folder, tmp_path / "c")[3:]
    proc = run_cli(*args[:args.index("--workers")], "--workers", 2, *args[args.index("--workers") + 2:], check=True)
    assert "Warning: 2 loader workers x 1 batch" in proc.stderr and "--batch-size" in proc.stderr
    assert [kw["prefetch_factor"] for kw in built] == [1, 1]  # train and val
    _assert_same_rows(reference, tmp_path / "c")


@pytest.mark.slow
def test_a_second_writer_on_the_same_cache_is_refused_until_the_first_dies(small_folder, tmp_path):
    holder = processes.Process(["-c", "import sys, time\nfrom dinoprobe.cache.store import FolderLock\n"
                                f"with FolderLock({str(tmp_path / 'c')!r}):\n    print('locked', flush=True)\n"
                                "    time.sleep(300)"])
    deadline = time.time() + 120
    while holder.output("stdout") != "locked\n" and time.time() < deadline and holder.poll() is None:
        time.sleep(0.01)
    assert holder.output("stdout") == "locked\n", holder.output("stderr")
    second = run_cli(*features_cmd(small_folder, tmp_path / "c")[3:])
    assert second.returncode == 1 and f"pid {holder.pid}" in second.stderr and "Traceback" not in second.stderr
    holder.kill()  # its lock file stays behind, naming a dead pid
    holder.wait()
    assert (tmp_path / "c" / ".lock").exists()
    run_cli(*features_cmd(small_folder, tmp_path / "c")[3:], check=True)
    assert cache.verify(tmp_path / "c") == []


def test_hostile_and_odd_inputs_are_converted_or_skipped_with_reasons(backbone, tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "text.jpg").write_text("definitely not a jpeg")
    write_image(cat / "full.jpg", 3, (64, 64))
    (cat / "truncated.jpg").write_bytes((cat / "full.jpg").read_bytes()[:300])
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] * 128)
    palette.save(dog / "palette alpha.png", transparency=0)
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(dog / "sixteen bit.png")
    write_image(dog / "grey.png", 4, (20, 20), "L")
    write_image(dog / "cmyk.jpg", 5, (20, 20), "CMYK")
    rotated = Image.new("RGB", (30, 10), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 8
    rotated.save(dog / "exif rotated.jpg", exif=exif)
    write_image(dog / "chat noir é 猫.png", 6, (20, 20))
    Image.new("1", (12_000, 12_000)).save(cat / "bomb.png")  # 144 Mpx: above PIL's 89 Mpx guard
    Image.new("L", (1_000_000, 1)).save(cat / "thin.png")  # 1 Mpx that the resize would make 32,000,000 x 32
    os.symlink(cat, cat / "loop")  # a symlink loop must not recurse forever
    summary = extract(backbone, open_source(str(root)), tmp_path / "c", batch_size=4, workers=0, progress=False,
                      dtype="float32")
    manifest = cache.read_manifest(tmp_path / "c")
    reasons = {os.path.basename(s["path"]): s["reason"] for s in cache.skipped_inputs(manifest)}
    assert set(reasons) == {"zero.jpg", "text.jpg", "truncated.jpg", "bomb.png", "thin.png"}
    assert "0 bytes" in reasons["zero.jpg"] and "pixel guard" in reasons["bomb.png"]
    assert "aspect ratio" in reasons["thin.png"]
    listed = json.loads(run_cli("cache", "skipped", tmp_path / "c", "--format", "json", check=True).stdout)
    assert {os.path.basename(r["path"]): r["reason"] for r in listed} == reasons
    assert {r["split"] for r in listed} == {"train"}
    train = cache.load(tmp_path / "c", "train")
    names = {os.path.basename(p) for p in train["path"]}
    assert {"palette alpha.png", "sixteen bit.png", "grey.png", "cmyk.jpg", "exif rotated.jpg",
            "chat noir é 猫.png", "full.jpg"} <= names
    assert summary.rows["train"] == len(train["path"]) == 2 * 2 + 7
    assert np.isfinite(train["cls"]).all()


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_an_input_larger_than_any_image_within_the_guard_is_skipped_unread(backbone, tmp_path, decoder):
    """A 30 x 30 JPEG followed by 16 MB (sparse) decodes fine, but no image within a 5,000-pixel guard needs more
    than 8 bytes a pixel + 16 MiB: skipped before anything reads it whole, whichever the decoder."""
    from dinoprobe.extract.datasets import ImageFileDataset
    from dinoprobe.imagefiles import max_encoded_bytes

    root = make_folder(tmp_path / "d", per_class=2)
    padded = root / "train" / "cat" / "padded.jpg"
    write_image(padded, 3, (30, 30))
    with open(padded, "r+b") as f:
        f.truncate(max_encoded_bytes(5_000) + 1)
    extract(backbone, open_source(str(root)), tmp_path / "c", batch_size=4, workers=0, progress=False,
            max_pixels=5_000, decoder=decoder)
    skipped = cache.skipped_inputs(cache.read_manifest(tmp_path / "c"))
    assert [os.path.basename(s["path"]) for s in skipped] == ["padded.jpg"]
    assert "more than any image within the 5,000-pixel guard" in skipped[0]["reason"]

    class Member:  # a tar member or any source that knows sizes before reading: never read
        def size(self, key):
            return max_encoded_bytes(5_000) + 1

        def read(self, key):
            raise AssertionError("read whole")

    class Row(Member):  # Hugging Face rows: sizes known only once read
        def size(self, key):
            return -1

        def read(self, key):
            return padded.read_bytes()

    for reader in (Member(), Row()):
        item = ImageFileDataset([("k", 0)], backbone.data_config, 5_000, reader=reader)[0]
        assert item[0] is None and "pixel guard" in item[3]


def test_flipped_bytes_and_a_manifest_from_another_cache_are_caught(backbone, tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    kw = dict(batch_size=4, workers=0, progress=False, shard_size=4)
    extract(backbone, open_source(str(root)), tmp_path / "a", **kw)
    from dinoprobe.extract.backbone import build_backbone

    other = build_backbone(backbone.model_name, "random", 48, log=lambda *_: None)
    extract(other, open_source(str(root)), tmp_path / "b", **kw)
    shard = tmp_path / "a" / "train" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("sha256 differs" in p for p in cache.verify(tmp_path / "a"))
    (tmp_path / "b" / "manifest.json").write_text((tmp_path / "a" / "manifest.json").read_text())
    problems = cache.verify(tmp_path / "b")
    assert problems and all("features" in p or "--overwrite" in p for p in problems)
    with pytest.raises(DinoprobeError, match="different request.*image_size.*--overwrite"):
        extract(other, open_source(str(root)), tmp_path / "b", **kw)  # b now claims a's 32 px fingerprint
    # following the advice repairs the cache: delete the damaged shard (or leave a truncated one) and rerun
    before = cache.load(tmp_path / "a", "val", verify_cache=False)
    shard.unlink()
    val_shard = tmp_path / "a" / "val" / "shard-00000.h5"
    val_shard.write_bytes(val_shard.read_bytes()[:500])
    again = extract(backbone, open_source(str(root)), tmp_path / "a", **kw)
    assert sorted(again.repaired) == ["train/shard-00001.h5", "val/shard-00000.h5"] and again.computed == 2 + 4
    assert cache.verify(tmp_path / "a") == []
    after = cache.load(tmp_path / "a", "val")
    np.testing.assert_array_equal(after["index"], before["index"])


def test_a_head_file_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/dinoprobe-head-pwned",))

    torch.save({"format": "dinoprobe-head/1", "x": Evil()}, tmp_path / "head.pt")
    from dinoprobe.train.headfile import load_head_file

    with pytest.raises(DinoprobeError, match="weights_only"):
        load_head_file(tmp_path / "head.pt")
    assert not os.path.exists("/tmp/dinoprobe-head-pwned")


@pytest.mark.parametrize("args", [
    ["features", "--data", "x", "--batch-size", "0"],
    ["features", "--data", "x", "--workers", "-1"],
    ["features", "--data", "x", "--val-fraction", "1.5"],
    ["features", "--data", "x", "--shard-size", "zero"],
    ["features", "--data", "x", "--device", "tpu"],
    ["features", "--data", "x", "--image-size", "8"],
    ["probe", "--cache", "c", "--out", "o", "--lr", "0"],
    ["probe", "--cache", "c", "--out", "o", "--epochs", "0"],
    ["probe", "--cache", "c", "--out", "o", "--dropout", "1"],
    ["probe", "--cache", "c", "--out", "o", "--head", "transformer"],
    ["sweep", "--cache", "c", "--out", "o", "--lr", "1e-3,-1"],
    ["sweep", "--cache", "c", "--out", "o", "--batch-size", "0"],
    ["knn", "--cache", "c", "--out", "o", "--k", "0"],
    ["logreg", "--cache", "c", "--out", "o", "--c-grid", "-1"],
    ["predict", "--run", "h", "--top-k", "0", "x.jpg"],
    ["predict", "--run", "h", "--batch-size", "0", "x.jpg"],
])
def test_every_numeric_and_choice_option_is_validated(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output  # click's usage error, raised before any work starts
    assert "No such option" not in result.output and "Invalid value" in result.output  # the range check said no
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output


def test_unknown_choices_list_the_valid_ones():
    result = CliRunner().invoke(main, ["probe", "--cache", "c", "--out", "o", "--normalize", "zscore"])
    assert result.exit_code == 2 and "none, standardize, l2" in result.output
