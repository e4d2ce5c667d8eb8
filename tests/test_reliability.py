"""Attacks on run directories, caches and inputs: nothing lost, nothing silently wrong, one `Error:` line."""
import json
import os

import numpy as np
import pytest

from dinoprobe.cache import store as cache

import processes
from conftest import assert_clean_error, make_synthetic_cache, run_cli

DEAD_PID = 4_194_999  # above Linux's largest pid: no process can hold it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("rel") / "cache", n=(120, 60, 60), dim=8, num_classes=3)


def knn(cache_dir, out, *extra):
    return run_cli("knn", "--cache", cache_dir, "--out", out, "--k", "1", *extra)


def test_overwrite_never_deletes_what_is_not_its_own_run(tiny, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("years of work")
    assert_clean_error(knn(tiny, thesis, "--overwrite"), "not a dinoprobe run directory")
    assert (thesis / "thesis.txt").read_text() == "years of work"
    for out in (tiny, tiny / "runs"):  # the cache being trained on, or a folder inside it
        assert_clean_error(knn(tiny, out, "--overwrite"), "overlaps the cache")
    assert cache.verify(tiny) == []
    run = tmp_path / "knn"
    knn(tiny, run).check_returncode()
    proc = run_cli("probe", "--cache", tiny, "--out", run, "--overwrite", "--epochs", 1, "--head", "linear")
    assert_clean_error(proc, "a `knn` run")
    (run / "notes.txt").write_text("mine")
    assert_clean_error(knn(tiny, run, "--overwrite"), "not a dinoprobe run directory")
    (run / "notes.txt").unlink()
    assert knn(tiny, run, "--overwrite").returncode == 0  # the same command's run: replaced
    for out in ("/", ".", str(tmp_path / "x" / "..")):
        assert_clean_error(knn(tiny, out, "--overwrite"), "not a run directory name")


def test_a_kill_between_the_renames_of_overwrite_is_repaired(tiny, tmp_path):
    run = tmp_path / "run"
    knn(tiny, run).check_returncode()
    before = (run / "metrics.json").read_text()
    # the state a SIGKILL between "move the old run aside" and "move the new one in" leaves behind
    os.replace(run, tmp_path / f".run.old-{DEAD_PID}-a1b2")
    (tmp_path / f".run.tmp-{DEAD_PID}-c3d4").mkdir()
    assert_clean_error(knn(tiny, run), "already exists")  # the previous run is back in place
    assert (run / "metrics.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # and the leftovers are gone


def test_a_cache_path_that_is_a_file_and_an_unwritable_out_fail_before_training(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_clean_error(knn(tmp_path / "file", tmp_path / "r"), "is a file")
    assert_clean_error(knn(tiny, tmp_path / "file" / "run"), "cannot write")  # under a file: no folder can be made


def test_shard_paths_outside_the_cache_are_refused(tiny, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert any("shards[0].file: '../../etc/passwd' is not SPLIT/shard-NNNNN.h5 inside the cache" in p
               for p in cache.verify(copy))
    assert_clean_error(knn(copy, tmp_path / "r"), "inside the cache")
    manifest["splits"]["train"]["shards"][0]["file"] = "train/shard-00000.h5"  # the right name, a folder linked out
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.move(copy / "train", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", copy / "train")
    assert any("points outside the cache" in p for p in cache.verify(copy))
    assert_clean_error(knn(copy, tmp_path / "r"), "outside the cache")


def test_validation_and_test_labels_outside_the_training_classes_are_refused(tmp_path):
    """Model selection on a class no head can predict is silently wrong: refused before training, naming it."""
    lacking = make_synthetic_cache(tmp_path / "c", n=(90, 30, 30), dim=8, num_classes=3, train_classes=2)
    proc = run_cli("probe", "--cache", lacking, "--out", tmp_path / "r", "--epochs", 1, "--head", "linear")
    assert_clean_error(proc, "class_2", "not in train")
    from dinoprobe import Probe, load_cache

    data = load_cache(make_synthetic_cache(tmp_path / "ok", n=(90, 30, 30), dim=8, num_classes=3), "cls")
    keep = (data.y_train != 2).numpy()
    with pytest.raises(ValueError, match="y_val holds 1 label"):
        Probe(head="linear", epochs=1).fit(data.X_train[keep], data.y_train[keep], X_val=data.X_val,
                                          y_val=data.y_val)


def test_a_class_no_split_holds_leaves_every_prediction_on_its_own_class(tmp_path):
    """A class in the cache's list with no rows anywhere (a Hugging Face ClassLabel name or a tar .cls index that
    no image uses) is not refused; the heads know only the classes train holds, and a run's metrics put each
    prediction back on the cache's class ids: its top-1 is scikit-learn's accuracy of the estimator's predict."""
    import numpy as np
    from sklearn.metrics import accuracy_score

    from dinoprobe import KNN, LogReg, Probe, load_cache
    from dinoprobe.runs.experiments import run_knn, run_logreg, run_probe

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(300, 100, 100), dim=8, num_classes=4, separation=1.0,
                                     absent=1)
    data = load_cache(cache_dir, "cls")
    y_test = data.y["test"].numpy()
    assert 1 not in set(data.y_train.tolist()) | set(y_test.tolist())
    for run, estimator in ((run_probe, Probe(head="linear", epochs=3)), (run_logreg, LogReg(Cs=[0.1])),
                           (run_knn, KNN(ks=[3]))):
        test = run(cache_dir, tmp_path / run.__name__, estimator)["test"]
        assert estimator.classes_.tolist() == [0, 2, 3]
        assert test["top1"] == accuracy_score(y_test, estimator.predict(data.x["test"].numpy())) < 1
        assert test["per_class_accuracy"]["class_1"] is None
        assert np.array(test["confusion_matrix"])[:, 1].sum() == 0  # nothing predicted as the absent class


def test_a_label_outside_the_class_list_fails_before_training(tmp_path):
    bad = make_synthetic_cache(tmp_path / "c", n=(90, 30, 30), dim=8, num_classes=3, test_label=99)
    for command, extra in (("probe", ["--epochs", 1]), ("logreg", ["--c-grid", "1"]), ("knn", ["--k", "1"])):
        assert_clean_error(run_cli(command, "--cache", bad, "--out", tmp_path / command, *extra), "label 99")
        assert not (tmp_path / command).exists()


def test_a_diverging_run_is_stopped_and_never_saved(tiny, tmp_path):
    """lr 1e8 on unnormalised features sends the loss to infinity: one clear line, no head.pt with NaNs."""
    for args in (["--max-memory", "1KB"], []):  # streamed and in memory
        proc = run_cli("probe", "--cache", tiny, "--out", tmp_path / "r", "--head", "linear", "--optimizer", "sgd",
                       "--lr", "1e30", "--epochs", 3, "--batch-size", 16, *args)
        assert_clean_error(proc, "diverged", "lower the learning rate")
        assert not (tmp_path / "r").exists()
    # diverging after a good epoch: that epoch's head is kept, and the run says what happened
    proc = run_cli("probe", "--cache", tiny, "--out", tmp_path / "late", "--head", "linear", "--optimizer", "sgd",
                   "--lr", "1e30", "--epochs", 3, check=True)
    assert "diverged in epoch 2" in proc.stderr
    assert json.loads((tmp_path / "late" / "metrics.json").read_text())["diverged_epoch"] == 2
    for lr in ("inf", "nan", "1e300"):
        assert run_cli("probe", "--cache", tiny, "--out", tmp_path / "r", "--lr", lr).returncode == 2
    from dinoprobe import Probe, Sweep, load_cache

    data = load_cache(tiny, "cls")
    search = Sweep(Probe(head="linear", optimizer="sgd", epochs=2, batch_size=16), param_grid={"lr": [1e-2, 1e30]})
    search.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
    assert search.best_params_ == {"lr": 1e-2} and search.results_[1]["diverged_epoch"] == 1


def test_a_head_file_with_nan_weights_or_missing_fields_is_refused(tiny, tmp_path):
    import torch

    run_cli("probe", "--cache", tiny, "--out", tmp_path / "r", "--head", "linear", "--epochs", 1, check=True)
    raw = torch.load(tmp_path / "r" / "head.pt", weights_only=True)
    raw["classifier_state_dict"]["0.weight"][0, 0] = float("nan")
    torch.save(raw, tmp_path / "nan.pt")
    assert_clean_error(run_cli("predict", "--run", tmp_path / "nan.pt", tmp_path), "non-finite")
    for field in ("head", "normalization", "class_names", "classifier_state_dict"):
        broken = torch.load(tmp_path / "r" / "head.pt", weights_only=True)
        del broken[field]
        torch.save(broken, tmp_path / f"no-{field}.pt")
        assert_clean_error(run_cli("predict", "--run", tmp_path / f"no-{field}.pt", tmp_path), "damaged head file")
    # nor written: a head whose weights went non-finite after fit (edited in Python) is not saved
    from dinoprobe import Probe, load_cache
    from dinoprobe.errors import DinoprobeError

    data = load_cache(tiny, "cls")
    probe = Probe(head="linear", epochs=1).fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
    with torch.no_grad():
        probe.head_[0].weight[0, 0] = float("inf")
    with pytest.raises(DinoprobeError, match="not all finite"):
        probe.save(tmp_path / "inf.pt")
    assert not (tmp_path / "inf.pt").exists()


def test_torch_files_are_never_read_for_more_memory_than_they_hold(tiny, tmp_path, monkeypatch, backbone):
    """Head files, exports and checkpoints come from others too. torch.load inflates deflated zip records (a 195 KB
    file loaded 200 MB of zeros), and a spec or model name larger than the tensors would be built before the
    shapes were compared."""
    import zipfile

    import torch

    from dinoprobe.errors import DinoprobeError
    from dinoprobe.extract.backbone import read_state_dict
    from dinoprobe.runs import export as export_module
    from dinoprobe.train import headfile

    run_cli("probe", "--cache", tiny, "--out", tmp_path / "r", "--head", "linear", "--epochs", 1, check=True)
    head = tmp_path / "r" / "head.pt"
    with zipfile.ZipFile(head) as plain, zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as out:
        for record in plain.infolist():
            out.writestr(record.filename, plain.read(record.filename))
    torch.save(torch.load(head, weights_only=True), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.load(tmp_path / "deflated.pt", weights_only=True)["format"]  # torch itself would read both
    assert_clean_error(run_cli("predict", "--run", tmp_path / "deflated.pt", tmp_path), "compressed")
    assert_clean_error(run_cli("predict", "--run", tmp_path / "legacy.pt", tmp_path), "re-save it")
    with pytest.raises(DinoprobeError, match="compressed"):
        read_state_dict(tmp_path / "deflated.pt")  # --weights: the same check

    raw = torch.load(head, weights_only=True)
    raw["head"]["num_classes"] = raw["num_classes"] = 2**16  # 8 KB of weights claiming a 2**16-class head
    raw["class_names"] = [str(i) for i in range(2**16)]
    torch.save(raw, tmp_path / "huge.pt")
    built = []
    monkeypatch.setattr(headfile, "build_head", lambda *a, **k: built.append(1))
    with pytest.raises(DinoprobeError, match="do not match its head spec"):
        headfile.load_head_file(tmp_path / "huge.pt")
    assert built == []  # refused from the shapes alone
    monkeypatch.undo()

    export_module.export(headfile.load_head_file(head), backbone, tmp_path / "model.pt")
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    raw["model_name"] = "vit_7b_patch16_dinov3.lvd1689m"  # 27 GB of parameters, from ViT-S's 88 MB of tensors
    torch.save(raw, tmp_path / "7b.pt")
    from dinoprobe.extract import backbone as backbone_module

    devices, real = [], export_module.create_model
    backbone_module._meta_model.cache_clear()  # the skeleton is built once per process: here, now
    for module in (export_module, backbone_module):  # every model built, on the meta device or for real
        monkeypatch.setattr(module, "create_model", lambda *a: devices.append(torch.empty(0).device.type) or real(*a))
    with pytest.raises(DinoprobeError, match="do not fit"):
        export_module.load_exported(tmp_path / "7b.pt")
    assert devices == ["meta"]
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    raw["data_config"]["image_size"] = 10**6  # a 62,500 x 62,500 patch grid for RoPE, even on meta
    torch.save(raw, tmp_path / "huge-size.pt")
    with pytest.raises(DinoprobeError, match="data_config.image_size: 1000000 is greater than the maximum"):
        export_module.load_exported(tmp_path / "huge-size.pt")
    assert devices == ["meta"]  # refused before any model was created
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    raw["head"]["num_classes"] = 2**16
    raw["class_names"] = [str(i) for i in range(2**16)]
    torch.save(raw, tmp_path / "huge-head.pt")
    monkeypatch.setattr(export_module, "build_head", lambda *a, **k: built.append(1))
    with pytest.raises(DinoprobeError, match="do not match its head spec"):
        export_module.load_exported(tmp_path / "huge-head.pt")
    assert built == []
    devices.clear()  # a real export on a host too small for a second copy of its backbone
    backbone_module._meta_model.cache_clear()
    monkeypatch.setattr(backbone_module, "memory_available", lambda device: 50 * 2**20)
    with pytest.raises(DinoprobeError, match=r"needs about 0\.08\d* GiB of host memory .* 0\.0488 GiB are available"):
        export_module.load_exported(tmp_path / "model.pt")
    assert devices == ["meta"]


def test_the_cache_lock_is_held_by_one_process_at_a_time(tmp_path):
    """Eight processes race for the lock, each holding it briefly; a marker file created exclusively while held
    proves no two ever hold it at once (the takeover used to be check-then-act)."""

    code = ("import os, sys, time\nfrom dinoprobe.cache.store import FolderLock\nfrom dinoprobe.errors import "
            "DinoprobeError\nfor _ in range(40):\n    try:\n        with FolderLock(sys.argv[1]):\n"
            "            fd = os.open(os.path.join(sys.argv[1], 'held'), os.O_CREAT | os.O_EXCL)\n"
            "            time.sleep(0.01)\n            os.close(fd)\n            os.unlink(os.path.join(sys.argv[1], "
            "'held'))\n        # what a killed writer leaves: a lock file naming a dead pid, for the others to take over\n"
            f"        open(os.path.join(sys.argv[1], '.lock'), 'w').write('{DEAD_PID}')\n"
            "    except DinoprobeError:\n        time.sleep(0.002)\n")
    procs = [processes.Process(["-c", code, str(tmp_path)])
             for _ in range(8)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors  # FileExistsError on 'held' would mean two holders


def test_a_cache_changing_under_a_streamed_run_stops_it(tiny, tmp_path):
    import shutil

    from dinoprobe.cache.arrays import load_cache
    from dinoprobe.errors import DinoprobeError

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    data = load_cache(copy, "cls", max_memory=1)  # streamed: one shard at a time
    stream = data.stream
    stream._read(0)  # hashed and remembered
    shard = copy / stream.entries[0]["file"]
    replacement = tmp_path / "same-bytes.h5"
    shutil.copy(shard, replacement)
    os.replace(replacement, shard)  # `features --overwrite` replaces files: same bytes, another file
    with pytest.raises(DinoprobeError, match="changed while it was being read"):
        stream._read(0)
    shard.unlink()
    with pytest.raises(DinoprobeError, match="disappeared while it was being read"):
        stream._read(0)


@pytest.mark.parametrize("kind", ["compressed", "unwritten"])
def test_a_shard_that_decodes_to_far_more_than_it_holds_is_refused_unread(tmp_path, kind):
    """A shared cache is input too: 1,000,000 rows in a shard of a few hundred kilobytes (gzip of zeros, or chunks
    never written, which read as the fill value), with a manifest that agrees — rows, bytes and sha256 — so only
    the shard's own layout gives it away. dinoprobe writes every dataset whole and unfiltered."""
    import hashlib

    import h5py
    import numpy as np

    from dinoprobe.errors import DinoprobeError

    cache_dir = make_synthetic_cache(tmp_path / "c", n=(60, 30), dim=8, num_classes=3, splits=("train", "val"))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    entry, n = manifest["splits"]["train"]["shards"][0], 1_000_000
    shard = cache_dir / entry["file"]
    shard.unlink()
    with h5py.File(shard, "w") as fh:
        for name, shape, dtype in (("cls", (n, 8), "float32"), ("patch_mean", (n, 8), "float32"),
                                   ("label", (n,), "int64")):
            if kind == "compressed":
                fh.create_dataset(name, data=np.zeros(shape, dtype), compression="gzip")
            else:
                fh.create_dataset(name, shape=shape, dtype=dtype, chunks=True)
        fh.create_dataset("index", data=np.arange(n))  # in range, stored whole: verify's own checks pass
        fh.create_dataset("path", data=np.array(["x"] * n, dtype=object), dtype=h5py.string_dtype("utf-8"))
    data = shard.read_bytes()
    entry.update(rows=n, stop=n, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["splits"]["train"]["num_inputs"] = n
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    problems = cache.verify(cache_dir)
    assert len(problems) == 1 and "'cls'" in problems[0] and "dinoprobe never writes" in problems[0], problems
    with pytest.raises(DinoprobeError, match="'cls' .*dinoprobe never writes"):  # a reader that skips verify
        cache.load(cache_dir, "train", verify_cache=False)
    assert_clean_error(knn(cache_dir, tmp_path / "run"), "failed verification", "dinoprobe never writes")


def test_verify_reports_a_manifest_entry_without_its_hash(tiny, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["splits"]["val"]["shards"][0]["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert any("shards[0]: 'sha256' is a required property" in p for p in cache.verify(copy))
    proc = run_cli("cache", "verify", copy)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "'sha256' is a required" in proc.stderr


def test_temporary_files_never_follow_a_planted_symlink(tmp_path):
    """The old temporary name was predictable (.NAME.tmp-PID): a link planted there redirected the write."""
    from dinoprobe.atomic import write_json
    from dinoprobe.cache.store import FolderLock
    from dinoprobe.errors import DinoprobeError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / f".manifest.json.tmp-{os.getpid()}")
    write_json(tmp_path / "manifest.json", {"a": 1})
    assert victim.read_text() == "precious" and json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}
    os.symlink(victim, tmp_path / ".lock")
    with pytest.raises(DinoprobeError, match="not a link"):
        with FolderLock(tmp_path):
            pass
    assert victim.read_text() == "precious"


def test_a_link_planted_at_the_very_temporary_name_drawn_is_passed_over(tmp_path, monkeypatch):
    """Names are random, but one drawn could exist (a link someone guessed): it is never opened, a new one is."""
    from dinoprobe import atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = tmp_path / f".manifest.json.tmp-{os.getpid()}-guessed"
    os.symlink(victim, planted)
    draws = iter(["guessed", "free"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(draws))
    atomic.write_json(tmp_path / "manifest.json", {"a": 1})
    assert victim.read_text() == "precious" and json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}
    assert planted.is_symlink()  # not ours: left where it was


def test_what_dinoprobe_writes_is_as_readable_as_the_umask_says(tmp_path):
    """A cache, a run and an export are read by colleagues and by services running as other users: their modes
    follow the umask, as any program's files do. They were 0600 (folders 0700) whatever the umask, as mkstemp
    makes them, so a colleague's `probe` on a shared cache failed with 'Permission denied'."""
    from conftest import SIZE, make_folder

    root = make_folder(tmp_path / "data", per_class=2)
    previous = os.umask(0o027)  # group may read, others nothing: neither mkstemp's 0600 nor a fixed 0644
    try:
        run_cli("features", "--data", root, "--weights", "random", "--image-size", SIZE, "--cache", tmp_path / "c",
                "--workers", 0, check=True)
        run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--epochs", 1, check=True)
        run_cli("export", "--run", tmp_path / "r", "--out", tmp_path / "model.pt", check=True)
    finally:
        os.umask(previous)
    written = [tmp_path / "c", *(tmp_path / "c").rglob("*"), tmp_path / "r", *(tmp_path / "r").iterdir(),
               tmp_path / "model.pt"]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    expected = {name: oct(0o750 if (tmp_path / name).is_dir() else 0o640) for name in modes}
    assert modes == expected
    from dinoprobe.atomic import temporary_name, write_json

    previous = os.umask(0o277)  # even a umask that denies the owner writing: the writer reopens its file by name
    try:
        write_json(tmp_path / "odd" / "manifest.json", {"a": 1})
        folder = temporary_name(tmp_path / "odd" / "run", directory=True)
    finally:
        os.umask(previous)
    assert oct((tmp_path / "odd" / "manifest.json").stat().st_mode & 0o777) == oct(0o600)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)


@pytest.mark.parametrize("size,message", [(50, "not a multiple of"), (17, "use 16 or 32")])
def test_an_image_size_off_the_patch_grid_fails_before_the_cache_is_made(tmp_path, size, message):
    from conftest import make_folder

    root = make_folder(tmp_path / "d", per_class=1)
    proc = run_cli("features", "--data", root, "--weights", "random", "--image-size", size, "--cache", tmp_path / "c")
    assert_clean_error(proc, message)
    assert not (tmp_path / "c").exists()
    assert run_cli("features", "--data", root, "--image-size", 5000).returncode == 2  # past the 4096 bound


def test_mixed_label_types_are_a_value_error_naming_them():
    from dinoprobe import KNN

    with pytest.raises(ValueError, match="mixes label types"):
        KNN().fit([[0.0, 1.0]] * 4, ["cat", 1, "dog", None])


def test_ctrl_c_or_sigterm_during_training_is_one_line_and_leaves_no_run(tiny, tmp_path, monkeypatch):
    import dinoprobe.estimators.sweep as sweep_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "train_heads", interrupted)
    proc = run_cli("sweep", "--cache", tiny, "--out", tmp_path / "s", "--lr", "1e-3,1e-2", "--epochs", 1)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr and "Interrupted" in proc.stderr
    assert list(tmp_path.iterdir()) == []
    # SIGTERM (kill, docker stop, a preempted job) the same way, exit code 143; the command's handler is put back
    import os
    import signal

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sweep_module, "train_heads", terminated)
    proc = run_cli("sweep", "--cache", tiny, "--out", tmp_path / "s", "--lr", "1e-3,1e-2", "--epochs", 1)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr and "Terminated" in proc.stderr
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before


def test_a_damaged_export_is_refused_naming_it(tiny, tmp_path):
    import torch

    from dinoprobe.errors import DinoprobeError
    from dinoprobe.runs.export import EXPORT_FORMAT, load_exported

    torch.save({"format": EXPORT_FORMAT, "model_name": "vit_small_patch16_dinov3.lvd1689m"}, tmp_path / "x.pt")
    with pytest.raises(DinoprobeError, match="damaged dinoprobe export"):
        load_exported(tmp_path / "x.pt")
    with pytest.raises(DinoprobeError, match="cannot read exported model .*No such file"):
        load_exported(tmp_path / "missing.pt")


@pytest.mark.slow
def test_a_full_disk_under_torch_save_is_the_systems_reason(tiny, tmp_path):
    """head.pt (45 KB here) is the run's first file past 16 KiB: its write fails with EFBIG, which torch.save
    reports as 'unexpected pos 2752 vs 2646' unless the file under it keeps the system's error."""
    proc = processes.run(["-m", "dinoprobe", "probe", "--cache", tiny, "--out", tmp_path / "run", "--head", "mlp",
                          "--hidden", 1024, "--epochs", 2], file_size_kib=16, timeout=120)
    assert_clean_error(proc, "writing the run directory", "File too large")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_or_full_disk_at_the_run_directory_is_one_line_and_keeps_the_old_run(tiny, tmp_path, monkeypatch):
    import errno

    from dinoprobe.runs import rundir

    run = tmp_path / "run"
    knn(tiny, run).check_returncode()
    before = (run / "metrics.json").read_text()

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rundir, "temporary_name", refuse)  # the folder cannot take the new run at all
    assert_clean_error(knn(tiny, run, "--overwrite"), "Read-only file system")
    monkeypatch.undo()
    real_fsync = rundir.fsync_file

    def full(path):  # the new run's files were written, and the disk filled before they reached it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "fsync_file", full)
    assert_clean_error(knn(tiny, run, "--overwrite"), "No space left on device")
    monkeypatch.setattr(rundir, "fsync_file", real_fsync)
    assert (run / "metrics.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


SHARD_EDITS = {
    "integer features": (lambda c: c.update(cls=(c["cls"] * 100).astype(np.int64)), "'cls' holds int64, not floats"),
    "narrow features": (lambda c: c.update(cls=c["cls"][:, :7]), "'cls' has shape (120, 7), not (rows, 8)"),
    "one feature per row": (lambda c: c.update(patch_mean=c["patch_mean"][:, 0]), "'patch_mean' has shape (120,)"),
    "float labels": (lambda c: c.update(label=c["label"] + 0.5), "'label' holds float64, not integers"),
    "2-D labels": (lambda c: c.update(label=np.stack([c["label"]] * 2, 1)), "'label' has shape (120, 2), not (rows,)"),
    "integer paths": (lambda c: c.update(path=np.arange(len(c["path"]))), "'path' holds int64, not strings"),
    "a row twice": (lambda c: c["index"].__setitem__(1, 0), "are not each input of [0, 120) once"),
    "a row also skipped": (lambda c: c.update({k: np.delete(v, 7, axis=0) for k, v in c.items()},
                                              _skipped=[{"index": 3, "path": "x", "reason": "y"}]),
                           "its 119 rows and 1 skipped inputs are not each input of [0, 120) once"),
}


def rewritten(cache_dir, copy, changes: dict):
    """A copy of the cache whose first shard of each split in `changes` has its columns changed by changes[split],
    under a manifest that agrees with it (rows, bytes, sha256): what a cache from other hands can hold."""
    import hashlib
    import shutil

    import h5py

    shutil.copytree(cache_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for split, change in changes.items():
        shard = copy / split / "shard-00000.h5"
        with h5py.File(shard) as fh:
            columns = {name: fh[name][...] for name in fh}
        change(columns)
        skipped = columns.pop("_skipped", None)  # the manifest's skipped inputs for the shard, when given
        with h5py.File(shard, "w") as fh:
            for name, values in columns.items():
                strings = values.dtype.kind == "O"
                fh.create_dataset(name, data=values, **({"dtype": h5py.string_dtype("utf-8")} if strings else {}))
        data = shard.read_bytes()
        entry = manifest["splits"][split]["shards"][0]
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), rows=len(columns["index"]))
        if skipped is not None:
            entry["skipped"] = skipped
        shard.with_suffix(".json").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit", list(SHARD_EDITS))
def test_a_shard_whose_datasets_are_not_what_features_writes_is_refused(tiny, tmp_path, edit):
    """A shard from other hands, under a manifest whose rows, bytes and sha256 agree: integer features or float
    labels trained silently (labels truncated), the wrong width or a 1-D column failed deep inside numpy."""
    change, message = SHARD_EDITS[edit]
    copy = rewritten(tiny, tmp_path / "copy", {"train": change})
    assert [p for p in cache.verify(copy) if message in p and "delete it and rerun" in p], cache.verify(copy)
    assert_clean_error(knn(copy, tmp_path / "run"), "failed verification", message)


def test_features_that_are_not_finite_are_refused_naming_rows_and_causes(tiny, tmp_path):
    """NaN or infinity in a cache (damaged, or a backbone run in fp16, where DINOv3 overflows) stops training
    before it starts, in memory and streamed, naming the rows — not 'X contains NaN' from the estimator."""
    def poison(columns):
        columns["cls"][[3, 5], 0] = [np.nan, np.inf]

    copy = rewritten(tiny, tmp_path / "copy", {"val": poison})
    assert cache.verify(copy) == []  # a float is a float: only training can tell
    train = ["probe", "--head", "linear", "--epochs", 1, "--out", tmp_path / "r"]
    assert_clean_error(run_cli(*train, "--cache", copy), "2 val row(s) hold NaN or infinite features",
                       "(the first: synthetic:val:3)", "--precision bf16")
    copy = rewritten(tiny, tmp_path / "copy2", {"train": poison})
    assert_clean_error(run_cli(*train, "--cache", copy, "--max-memory", 1),  # streamed
                       "2 train/shard-00000.h5 row(s) hold NaN or infinite features", "--precision bf16")


def test_multilabel_targets_other_than_0_and_1_are_refused():
    import torch

    from dinoprobe.cache.arrays import check_labels
    from dinoprobe.errors import DinoprobeError

    labels = torch.tensor([[1, 0], [0, 1], [1, 1]])
    check_labels("c", ["a", "b"], {"train": labels, "val": labels})
    with pytest.raises(DinoprobeError, match="values other than 0 and 1"):
        check_labels("c", ["a", "b"], {"train": labels, "val": labels * 2})


def _cgroup(folder, limit, usage, inactive, v1=False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(f"{limit}\n")
    (folder / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"anon 4096\n{'total_' if v1 else ''}inactive_file {inactive}\n")


def test_a_containers_memory_limit_bounds_the_memory_available(tiny, tmp_path, monkeypatch):
    """Docker's --memory, a Kubernetes limit, a SLURM job: /proc/meminfo is the whole machine's, and past the
    container's limit the OOM killer ends the process without a word — so the up-front memory checks use the
    least of the two. Like `docker stats`, inactive page cache counts as free; an ancestor's limit applies too."""
    import torch

    from dinoprobe import device

    gib, proc = 2**30, tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")  # cgroup v2: a limited job, an unlimited step inside it
    _cgroup(tmp_path / "v2" / "job", 4 * gib, 3 * gib, gib // 2)
    _cgroup(tmp_path / "v2" / "job" / "step", "max", gib, 0)
    assert device.cgroup_memory_left(proc, tmp_path / "v2") == 1.5 * gib
    proc.write_text("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n")  # v1, with an unlimited parent
    _cgroup(tmp_path / "v1" / "memory", 9223372036854771712, 5 * gib, 0, v1=True)
    _cgroup(tmp_path / "v1" / "memory" / "docker" / "abc", 2 * gib, 2 * gib, gib // 4, v1=True)
    assert device.cgroup_memory_left(proc, tmp_path / "v1") == gib // 4
    proc.write_text("0::/kubepods/pod1/ctr\n")  # a cgroup namespace: the container's own cgroup is the mount
    _cgroup(tmp_path / "ns", gib, 0, 0)
    assert device.cgroup_memory_left(proc, tmp_path / "ns") == gib
    proc.write_text("0::/\n")
    _cgroup(tmp_path / "none", "max", gib, 0)
    assert device.cgroup_memory_left(proc, tmp_path / "none") is None
    assert device.cgroup_memory_left(tmp_path / "no-such-file", tmp_path / "v2") is None

    monkeypatch.setattr(device, "cgroup_memory_left", lambda: 123 * 2**20)
    assert device.memory_available(torch.device("cpu")) == 123 * 2**20
    monkeypatch.setattr(device, "cgroup_memory_left", lambda: 4096)  # features that do not fit the container
    assert_clean_error(run_cli("probe", "--cache", tiny, "--out", tmp_path / "r", "--epochs", 1), "--max-memory")


def test_a_head_larger_than_memory_is_refused_before_it_is_built(tiny, tmp_path, monkeypatch):
    """--hidden 10^9: torch's allocator refused it with a traceback, and a head a little larger than the memory
    (which Linux lets a process overcommit) would have been killed by the OOM killer once its weights were touched.
    Refused up front naming the fix, for probe and sweep; a batch is counted at most as large as the rows."""
    import dinoprobe.train.loop as loop_module

    built = []
    monkeypatch.setattr(loop_module, "StackedHeads", lambda *a, **k: built.append(1))
    for command, extra in (("probe", ()), ("sweep", ("--lr", "0.1,0.2"))):
        proc = run_cli(command, "--cache", tiny, "--out", tmp_path / command, "--hidden", 10**9, "--epochs", 1, *extra)
        assert_clean_error(proc, "an MLP head 1000000000 wide on 8-wide features with 3 classes needs about",
                           "use a smaller --hidden")
        assert not (tmp_path / command).exists()
    assert built == []
    monkeypatch.undo()
    run_cli("probe", "--cache", tiny, "--out", tmp_path / "big-batch", "--batch-size", 10**9, "--epochs", 1, check=True)


def test_a_complete_cache_this_process_cannot_write_is_used_without_a_lock(tmp_path, monkeypatch):
    """A team's cache on a read-only mount, or a colleague's folder: rerunning the pipeline's `features` step failed
    at the lock although nothing was left to compute. It now says so and succeeds; a request the cache does not
    hold still fails at the lock, naming the read-only folder."""
    import dinoprobe.extract.run as run_module
    from dinoprobe.errors import DinoprobeError

    from conftest import SIZE, make_folder

    root = make_folder(tmp_path / "data", per_class=2)
    args = ["features", "--data", root, "--weights", "random", "--image-size", SIZE, "--workers", 0, "--cache",
            tmp_path / "c"]
    run_cli(*args, check=True)
    real_access = os.access
    monkeypatch.setattr(run_module.os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))

    def no_lock(folder, what="cache"):  # what a read-only filesystem answers
        raise DinoprobeError(f"cannot create the lock file {folder}/.lock (Read-only file system)")

    monkeypatch.setattr(run_module, "FolderLock", no_lock)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "read-only here, and already complete for this request: nothing to compute" in proc.stdout
    assert "train 4, val 4 rows; 0 skipped input(s); 0 computed" in proc.stdout
    assert_clean_error(run_cli(*args[:-4], "--image-size", 48, *args[-4:]), "Read-only file system")
    assert_clean_error(run_cli(*args, "--overwrite"), "Read-only file system")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["splits"]["val"]["complete"] = False  # left unfinished by whoever could write it
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run_cli(*args), "Read-only file system")


def test_the_next_export_removes_what_a_killed_export_left(tmp_path):
    """An export killed while it writes leaves `.model.pt.tmp-PID-*` beside the target, as large as the export
    (ViT-H+: 3.4 GB); the next export to that file removes it, and leaves a running export's own alone."""
    from conftest import SIZE, make_folder

    root = make_folder(tmp_path / "data", per_class=2)
    run_cli("features", "--data", root, "--weights", "random", "--image-size", SIZE, "--cache", tmp_path / "c",
            "--workers", 0, check=True)
    run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--epochs", 1, check=True)
    out = tmp_path / "shipped"
    out.mkdir()
    killed, running = out / f".model.pt.tmp-{DEAD_PID}-k1ll3d00", out / f".model.pt.tmp-{os.getpid()}-4l1v3000"
    killed.write_bytes(b"half an export")
    running.write_bytes(b"another export, still writing")
    run_cli("export", "--run", tmp_path / "r", "--out", out / "model.pt", check=True)
    assert sorted(p.name for p in out.iterdir()) == [running.name, "model.pt"]


def test_a_symbolic_link_loop_given_as_any_path_is_one_line(tmp_path):
    """A link to itself given as a cache, an output or a data folder: Python 3.11's pathlib raises RuntimeError
    resolving it (a traceback from every command that compares paths); it is the system's ELOOP, in one line."""
    from conftest import make_folder

    cache = make_synthetic_cache(tmp_path / "cache", n=(60, 20, 20), dim=8, num_classes=3)
    run_cli("probe", "--cache", cache, "--out", tmp_path / "run", "--head", "linear", "--epochs", 1, check=True)
    data = make_folder(tmp_path / "data", per_class=2)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for args in (["probe", "--cache", loop, "--out", tmp_path / "o"], ["knn", "--cache", cache, "--out", loop],
                 ["score", "--run", tmp_path / "run", "--cache", cache, "--out", loop],
                 ["export", "--run", tmp_path / "run", "--out", loop],
                 ["evaluate", "--cache", cache, "--out", loop], ["evaluate", "--cache", loop, "--out", tmp_path / "e"],
                 ["evaluate", "--cache", cache, "--test-cache", loop, "--out", tmp_path / "e"],
                 ["features", "--data", data, "--weights", "random", "--image-size", 32, "--cache", loop]):
        assert_clean_error(run_cli(*args), "too many levels of symbolic links")

