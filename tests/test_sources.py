"""Data where users keep it: CSV file lists, Hugging Face datasets (save_to_disk, Parquet) and WebDataset tar
shards give the features and labels of the same images in an ImageFolder, skip bad images, and resume."""
import io
import json
import os
import tarfile
import time

import numpy as np
import pytest

from dinoprobe.cache import store as cache
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.filelists import expand_braces
from dinoprobe.extract.run import extract
from dinoprobe.extract.sources import open_source

from conftest import SIZE, assert_clean_error, kill_during_extraction, make_folder, run_cli

datasets = pytest.importorskip("datasets")  # the `hf` extra; the dev extras include it


def _samples(root):
    source = open_source(str(root))
    return {split: [(path, source.classes[label]) for path, label in rows] for split, rows in source.splits.items()}


def write_csv(root, samples, out):
    lines = ["path,label,split"]
    for split, rows in samples.items():
        lines += [f"{'../' + str(p.relative_to(root.parent)) if p.is_relative_to(root.parent) else p},{name},{split}"
                  for p, name in ((__import__('pathlib').Path(p), name) for p, name in rows)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def hf_splits(samples, classes, corrupt=None):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    out = {}
    for split, rows in samples.items():
        images = [{"bytes": open(p, "rb").read(), "path": None} for p, _ in rows]
        if corrupt and split == "train":
            images[corrupt]["bytes"] = b"not an image at all"
        out["validation" if split == "val" else split] = datasets.Dataset.from_dict(
            {"image": images, "label": [classes.index(n) for _, n in rows]}, features=features)
    return datasets.DatasetDict(out)


def write_tars(samples, folder, corrupt=None, per_shard=5, labels="json"):
    """Shards of `{key}.{png|jpg}` + `{key}.json` ({"label": class name}) or `{key}.cls` (the class index)."""
    classes = sorted({name for rows in samples.values() for _, name in rows})
    for split, rows in samples.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for start in range(0, len(rows), per_shard):
            with tarfile.open(folder / split / f"shard-{start // per_shard:03d}.tar", "w") as tar:
                for i, (path, name) in enumerate(rows[start:start + per_shard], start):
                    data = b"garbage" if (split == "train" and i == corrupt) else open(path, "rb").read()
                    label = ((f"{i:05d}.json", json.dumps({"label": name}).encode()) if labels == "json"
                             else (f"{i:05d}.cls", str(classes.index(name)).encode()))
                    for member, payload in ((f"{i:05d}{os.path.splitext(path)[1]}", data), label):
                        info = tarfile.TarInfo(member)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    root = make_folder(base / "folder", per_class=6)
    samples = _samples(root)
    classes = sorted({name for rows in samples.values() for _, name in rows})
    made = {"folder": root, "csv": write_csv(root, samples, base / "lists" / "files.csv")}
    hf_splits(samples, classes).save_to_disk(str(base / "saved"))
    made["saved"] = base / "saved"
    parquet = base / "parquet" / "data"
    parquet.mkdir(parents=True)
    for split, table in hf_splits(samples, classes).items():
        table.to_parquet(str(parquet / f"{split}-00000-of-00001.parquet"))
    made["parquet"] = base / "parquet"
    made["tars"] = write_tars(samples, base / "tars")
    return base, samples, classes, made


def test_every_source_gives_the_features_and_labels_of_the_image_folder(sources, backbone):
    base, _, classes, made = sources
    kw = dict(batch_size=4, workers=0, dtype="float32", progress=False, last_blocks=0)
    extract(backbone, open_source(str(made["folder"])), base / "c-folder", **kw)
    reference = {s: cache.load(base / "c-folder", s, "cls") for s in ("train", "val")}
    for kind in ("csv", "saved", "parquet", "tars"):
        source = open_source(str(made[kind]))
        assert source.classes == classes, kind
        extract(backbone, source, base / f"c-{kind}", **kw)
        for split in ("train", "val"):
            got = cache.load(base / f"c-{kind}", split, "cls")
            np.testing.assert_array_equal(got["cls"], reference[split]["cls"], err_msg=kind)
            np.testing.assert_array_equal(got["label"], reference[split]["label"], err_msg=kind)
        proc = run_cli("probe", "--cache", base / f"c-{kind}", "--out", base / f"run-{kind}", "--epochs", 2)
        assert proc.returncode == 0, proc.stderr
    keys = cache.load(base / "c-tars", "train", "cls")["path"]
    assert keys[0].endswith("shard-000.tar#00000")


def test_the_fingerprint_follows_the_content(sources, tmp_path):
    _, samples, classes, made = sources
    first = open_source(str(made["tars"])).file_list_sha256()
    assert open_source(str(made["tars"])).file_list_sha256() == first  # the same shards: the same fingerprint
    changed = write_tars(samples, tmp_path / "tars", corrupt=0)
    assert open_source(str(changed)).file_list_sha256() != first  # not the same: a different member size
    saved = open_source(str(made["saved"])).file_list_sha256()
    hf_splits(samples, classes).save_to_disk(str(tmp_path / "same"))
    hf_splits(samples, classes, corrupt=2).save_to_disk(str(tmp_path / "other"))
    assert open_source(str(tmp_path / "same")).file_list_sha256() != saved  # another folder: another source
    again = open_source(str(tmp_path / "same")).file_list_sha256()
    assert open_source(str(tmp_path / "same")).file_list_sha256() == again
    assert open_source(str(tmp_path / "other")).file_list_sha256() != again  # one image changed: its data file


@pytest.mark.parametrize("kind", ["parquet", "tars"])
def test_a_corrupt_image_inside_the_source_is_skipped_and_listed(sources, backbone, tmp_path, kind):
    _, samples, classes, _ = sources
    if kind == "tars":  # labels from .cls members here (json elsewhere)
        data = write_tars(samples, tmp_path / "tars", corrupt=3, labels="cls")
        assert open_source(str(data)).classes == [str(i) for i in range(len(classes))]
    else:
        data = tmp_path / "pq"
        (data / "data").mkdir(parents=True)
        for split, table in hf_splits(samples, classes, corrupt=3).items():
            table.to_parquet(str(data / "data" / f"{split}-00000-of-00001.parquet"))
    summary = extract(backbone, open_source(str(data)), tmp_path / "c", batch_size=4, workers=0, progress=False,
                      last_blocks=0)
    assert summary.skipped["train"] == 1 and summary.rows["train"] == 11
    skipped = cache.skipped_inputs(cache.read_manifest(tmp_path / "c"))
    assert len(skipped) == 1 and skipped[0]["index"] == 3
    assert skipped[0]["path"].endswith("#00003" if kind == "tars" else ":train:3") and skipped[0]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "tars"])
def test_a_killed_run_resumes_with_exactly_the_uninterrupted_rows(sources, tmp_path, kind):
    base, _, _, made = sources
    data = made[kind]
    run_cli("features", "--data", data, "--weights", "random", "--image-size", SIZE, "--cache", tmp_path / "whole",
            "--batch-size", 2, "--workers", 0, "--shard-size", 4, "--dtype", "float32", check=True)
    assert kill_during_extraction(data, tmp_path / "c", after_shards=2)
    run_cli("features", "--data", data, "--weights", "random", "--image-size", SIZE, "--cache", tmp_path / "c",
            "--batch-size", 2, "--workers", 0, "--shard-size", 4, "--dtype", "float32", check=True)
    for split in ("train", "val"):
        a, b = cache.load(tmp_path / "whole", split), cache.load(tmp_path / "c", split)
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["cls"], b["cls"])


def test_torchvision_decoder_on_tar_shards_gives_the_pil_features(photos, backbone, tmp_path, monkeypatch):
    """JPEG members decoded by the batch-on-the-device path (run on the CPU) give the features of the PIL path.
    (Two torchrun ranks splitting tar shards: test_multilabel.)"""
    import torch

    from dinoprobe.extract.decode import DeviceDecoder

    jpeg_tars = write_tars(_samples(photos), tmp_path / "jpeg-tars", per_shard=20)
    kw = dict(batch_size=4, workers=0, dtype="float32", progress=False, last_blocks=0)
    extract(backbone, open_source(str(jpeg_tars)), tmp_path / "pil", **kw)
    decoded = []
    decode_batch = DeviceDecoder.__call__
    monkeypatch.setattr(DeviceDecoder, "__call__", lambda self, items: decoded.append(
        sum(t.dim() == 1 for t in items)) or decode_batch(self, items))
    extract(backbone, open_source(str(jpeg_tars)), tmp_path / "tv", decoder="torchvision", decode_on_device=True,
            **kw)
    assert sum(decoded) == 70  # every JPEG member reached the device decoder as bytes
    for split in ("train", "val"):
        a, b = (torch.as_tensor(cache.load(tmp_path / n, split, "cls")["cls"]) for n in ("pil", "tv"))
        assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_csv_details_and_errors(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=5, splits=("train",))
    files = sorted(root.rglob("*.png"))
    (tmp_path / "list.tsv").write_text("path\tlabel\n" + "".join(f"{p}\t{p.parent.name}\n" for p in files))
    source = open_source(str(tmp_path / "list.tsv"))  # no split column: val carved from train
    assert source.val_split["from"] == "train" and len(source.splits["val"]) == 2
    (tmp_path / "bad.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(DinoprobeError, match="columns path and label"):
        open_source(str(tmp_path / "bad.csv"))
    (tmp_path / "missing.csv").write_text("path,label,split\nnope.png,cat,train\nalso.png,dog,train\n"
                                          f"{files[0]},cat,val\n{files[-1]},dog,val\n")
    proc = run_cli("features", "--data", tmp_path / "missing.csv", "--weights", "random", "--image-size", SIZE,
                   "--cache", tmp_path / "c", check=True)  # missing files are listed with their reason, not fatal
    assert "train 0, val 2 rows; 2 skipped input(s)" in proc.stdout
    # a split of which nothing was read is said with its reasons (relative paths written for another folder)
    assert ("WARNING: every input of train was skipped: no such file or directory (2). `dinoprobe cache skipped "
            f"{tmp_path / 'c'}` lists them (a CSV's relative paths resolve against the CSV's folder)") in proc.stderr
    assert "input of val" not in proc.stderr


def test_csv_paths_are_the_files_real_paths_as_pathlib_resolves_them(tmp_path, monkeypatch):
    """Each folder is resolved once (a path walk per row dominated reading long lists): the paths recorded must still
    be pathlib's resolve() of each row, through symlinked folders and files, '..', '.', absolute and missing paths."""
    real = make_folder(tmp_path / "real", per_class=2, splits=("train",))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "linked").symlink_to(real)  # a symlinked folder
    cat = sorted((real / "train" / "cat").iterdir())
    (real / "train" / "dog" / "alias.png").symlink_to(cat[0])  # a symlinked file, in a folder also holding files
    rows = ["linked/train/cat/000.png", "linked/train/dog/alias.png", "linked/train/dog/000.png",
            "../real/train/./cat/001.png", "linked/train/cat/../dog/001.png", f"{cat[1]}", "linked//train/cat/nope.png",
            "linked/train/cat/.", "linked/train/dog/.."]
    (tmp_path / "lists" / "files.csv").write_text("path,label\n" + "".join(f"{r},{i % 2}\n" for i, r in enumerate(rows)))
    monkeypatch.chdir(real)  # the list's folder, not the working directory, anchors relative rows
    source = open_source(str(tmp_path / "lists" / "files.csv"))
    expected = [str((tmp_path / "lists" / r).resolve()) for r in rows]
    assert sorted(path for split in source.splits.values() for path, _ in split) == sorted(expected)
    assert str(cat[0]) in expected and str(real / "train" / "dog" / "alias.png") not in expected  # the link's target


def test_csv_files_from_spreadsheets(tmp_path):
    """Capitalised headers, ';' separators, a UTF-8 byte-order mark, Latin-1 names: read as the same list."""
    root = make_folder(tmp_path / "imgs", per_class=5, splits=("train",))
    files = sorted(root.rglob("*.png"))
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    reference = open_source(str(plain)).splits
    spreadsheet = tmp_path / "excel.csv"
    spreadsheet.write_bytes(b"\xef\xbb\xbfPath;Label\r\n" + "".join(f"{f};{f.parent.name}\r\n" for f in files).encode())
    assert open_source(str(spreadsheet)).splits == reference
    latin = tmp_path / "latin.csv"
    latin.write_bytes(("PATH,LABEL\n" + "".join(f"{f},{f.parent.name}\u00e9\n" for f in files)).encode("latin-1"))
    source = open_source(str(latin))
    assert source.classes == ["cat\u00e9", "dog\u00e9"] and source.splits == reference


def test_labels_that_differ_only_in_case_or_spacing_are_pointed_out(tmp_path):
    """'Ant' and 'ant' in a spreadsheet's label column became two classes without a word."""
    from conftest import SIZE

    root = make_folder(tmp_path / "imgs", per_class=3, splits=("train",))
    files = sorted(root.rglob("*.png"))
    labels = ["Golden Retriever", "golden  retriever", "golden retriever", "cat", "cat", "Cat"]
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{f},{lab}\n" for f, lab in zip(files, labels)))
    source = open_source(str(tmp_path / "list.csv"))
    assert source.notes() == [
        "classes ['Cat', 'cat'] differ only in case or spacing: if they are one class, make their labels agree",
        "classes ['Golden Retriever', 'golden  retriever', 'golden retriever'] differ only in case or spacing: if "
        "they are one class, make their labels agree"]
    proc = run_cli("features", "--data", tmp_path / "list.csv", "--weights", "random", "--image-size", SIZE,
                   "--cache", tmp_path / "c", "--workers", 0, "--val-fraction", 0.34, check=True)
    assert "WARNING: classes ['Cat', 'cat'] differ only in case" in proc.stderr
    assert open_source(str(root)).notes() == []  # cat/ and dog/: nothing to say


@pytest.mark.parametrize("text,message", [("path,label\n", "no rows under it"),
                                          ("path,label\na.png,cat\nb.png\n", ":3: 1 cell"),
                                          ("path,label\na.png,cat\nb.png,\n", ":3: a row without a label"),
                                          ("path,label\na.png,cat\nb.png,cat\n", "only \\['cat'\\]"),
                                          ("", "an empty file")])
def test_malformed_csv_files_name_the_line_to_fix(tmp_path, text, message):
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(DinoprobeError, match=message):
        open_source(str(tmp_path / "list.csv"))


def extract_quiet(source, cache_dir):
    from dinoprobe.extract.backbone import build_backbone

    backbone = build_backbone(weights="random", image_size=SIZE, log=lambda *_: None)
    return extract(backbone, source, cache_dir, batch_size=2, workers=0, progress=False, last_blocks=0)


def test_brace_patterns_and_shards_elsewhere(sources):
    _, _, classes, made = sources
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    tars = made["tars"]
    spec = f"train={tars}/train/shard-{{000..002}}.tar;val={tars}/val/shard-{{000..002}}.tar"
    source = open_source(spec)
    assert source.classes == classes and len(source.splits["train"]) == 12 and len(source.splits["val"]) == 12


def test_hub_and_missing_extra_fail_fast_with_advice(monkeypatch, tmp_path):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    proc = run_cli("features", "--data", "hf:uoft-cs/cifar10", "--weights", "random", "--cache", tmp_path / "c")
    assert_clean_error(proc, "cannot reach the Hugging Face Hub", "save_to_disk")
    assert time.perf_counter() - start < 10
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    with pytest.raises(DinoprobeError, match=r"pip install 'dinoprobe\[hf\]'"):
        open_source(str(tmp_path / "saved"))


def _tar(path, members, compress=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("members,message", [
    ([("a.jpg", b"x"), ("a.cls", b"cat")], "non-negative class index"),
    ([("a.jpg", b"x"), ("a.cls", b"-1")], "non-negative class index"),
    ([("a.jpg", b"x"), ("a.cls", b"\xff\xfe")], "not UTF-8"),
    ([("a.jpg", b"x"), ("a.json", b"{not json")], "not valid JSON"),
    ([("a.jpg", b"x"), ("a.json", b"[" * 200_000 + b"]" * 200_000)], r"not valid JSON \(nested too deeply\)"),
    ([("a.jpg", b"x"), ("a.json", b'{"label": null}')], "not a class name"),
    ([("a.jpg", b"x"), ("a.cls", b"0"), ("a.png", b"y")], "appears twice"),
    ([("a.jpg", b"x"), ("a.cls", b"100000000"), ("b.jpg", b"x"), ("b.cls", b"0")], "class index 100000000"),
])
def test_hostile_tar_shards_are_refused_naming_the_problem(tmp_path, members, message):
    _tar(tmp_path / "d" / "train" / "shard-000.tar", members)
    with pytest.raises(DinoprobeError, match=message):
        open_source(str(tmp_path / "d"))


def test_broken_tar_files_are_refused_naming_the_problem(tmp_path):
    good = [("a.jpg", b"x" * 5000), ("a.cls", b"0"), ("b.jpg", b"y" * 5000), ("b.cls", b"1")]
    gz = _tar(tmp_path / "gz" / "train" / "shard-000.tar", good, compress=True)
    with pytest.raises(DinoprobeError, match="gzip"):
        open_source(str(gz.parents[1]))
    (tmp_path / "junk" / "train").mkdir(parents=True)
    (tmp_path / "junk" / "train" / "shard-000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DinoprobeError, match="not a readable"):
        open_source(str(tmp_path / "junk"))
    cut = _tar(tmp_path / "cut" / "train" / "shard-000.tar", good)
    cut.write_bytes(cut.read_bytes()[:3000])
    with pytest.raises(DinoprobeError, match="truncated"):
        open_source(str(tmp_path / "cut"))
    with pytest.raises(DinoprobeError, match="more than 100,000 shards"):
        open_source("train=/data/x-{0000000..9999999}.tar")


def test_unlabelled_rows_and_rows_without_images_are_skipped_and_listed(photos, tmp_path, backbone):
    files = sorted(photos.rglob("*.jpg"))[:6]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ants", "bees"]),
                                  "caption": datasets.Value("string")})
    images = [{"bytes": f.read_bytes(), "path": None} for f in files]
    images[1] = None
    labels = [0, 1, 0, 1, -1, 1]
    table = datasets.Dataset.from_dict({"image": images, "label": labels, "caption": ["x"] * 6}, features=features)
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(tmp_path / "hf"))
    source = open_source(str(tmp_path / "hf"))
    assert source.classes == ["ants", "bees"]  # -1 never became a class
    summary = extract(backbone, source, tmp_path / "c", batch_size=2, workers=0, progress=False, last_blocks=0)
    assert summary.rows == {"train": 4, "val": 4} and summary.skipped == {"train": 2, "val": 2}
    reasons = {s["reason"] for s in cache.skipped_inputs(cache.read_manifest(tmp_path / "c"))}
    assert reasons == {"unlabelled row (label -1): nothing to train or score on", "the row has no image (None)"}
    with pytest.raises(DinoprobeError, match="not images"):
        open_source(str(tmp_path / "hf"), image_column="caption")


def test_every_source_with_only_a_test_split_is_an_evaluation_set(tmp_path):
    """Folder, CSV, Hugging Face (save_to_disk and Parquet) and tar shards holding only test images open as the same
    evaluation set, with nothing carved: the cache `dinoprobe score` reads."""
    root = make_folder(tmp_path / "folder", per_class=4, splits=("test",))
    samples = _samples(root)
    classes = sorted({name for rows in samples.values() for _, name in rows})
    made = {"folder": root, "csv": write_csv(root, samples, tmp_path / "lists" / "files.csv")}
    hf_splits(samples, classes).save_to_disk(str(tmp_path / "saved"))
    parquet = tmp_path / "parquet" / "data"
    parquet.mkdir(parents=True)
    hf_splits(samples, classes)["test"].to_parquet(str(parquet / "test-00000-of-00001.parquet"))
    made.update(saved=tmp_path / "saved", parquet=tmp_path / "parquet", tars=write_tars(samples, tmp_path / "tars"))
    for kind, spec in made.items():
        source = open_source(str(spec))
        assert list(source.splits) == ["test"] and source.val_split is None, kind
        assert source.classes == classes and [label for _, label in source.splits["test"]] == [0] * 4 + [1] * 4, kind
