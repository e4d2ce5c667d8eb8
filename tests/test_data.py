"""Sources, splits, decoding of odd images, and the evaluation transform against timm's."""
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.datasets import ImageFileDataset
from dinoprobe.extract.sources import open_source
from dinoprobe.extract.transforms import Preprocess, worker_transform
from dinoprobe.imagefiles import SkippedInput, load_rgb
from dinoprobe.splits import carve_val

from conftest import make_folder, write_image


def test_transform_equals_timms_eval_transform(backbone, photos):
    cfg = backbone.data_config
    reference = timm.data.create_transform(input_size=(3, cfg.image_size, cfg.image_size), interpolation=cfg.interpolation,
                                           mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct, is_training=False)
    path = sorted((photos / "train" / "ants").iterdir())[0]
    ours = Preprocess(cfg)(worker_transform(cfg)(load_rgb(str(path)))[None])[0]
    torch.testing.assert_close(ours, reference(Image.open(path).convert("RGB")), atol=1e-5, rtol=0)


def test_small_arrays_are_resized_in_batches_like_a_tensor_resize(backbone):
    from torchvision.transforms.v2 import functional as TF

    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    cfg = backbone.data_config
    expected = TF.resize(pixels.float(), [cfg.image_size] * 2, interpolation=TF.InterpolationMode.BICUBIC,
                         antialias=True).clamp(0, 255)
    expected = (expected / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(Preprocess(cfg)(pixels), expected, atol=1e-4, rtol=0)


def test_folder_layout_classes_and_order(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    source = open_source(str(root))
    assert source.classes == ["cat", "dog"]
    assert [label for _, label in source.splits["train"]] == [0, 0, 0, 1, 1, 1]
    assert source.val_split is None


def test_classes_must_agree_across_splits(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    write_image(root / "val" / "bird" / "x.png", 1)
    with pytest.raises(DinoprobeError, match=r"only in val/: \['bird'\]"):
        open_source(str(root))


def test_a_train_class_folder_without_images_is_named_with_the_fix(tmp_path):
    root = make_folder(tmp_path / "d", classes=("cat", "dog", "emu", "owl"), per_class=2, splits=("train",))
    for name in ("emu", "owl"):
        for image in (root / "train" / name).iterdir():
            image.unlink()
    (root / "train" / "owl" / "notes.txt").write_text("not an image")
    with pytest.raises(DinoprobeError, match=r"train/ classes with no images: \['emu', 'owl'\]; add images to them "
                                             r"or remove those folders \(1 file\(s\) not read \(\.txt 1\)"):
        open_source(str(root))


def test_files_that_are_not_read_are_counted_and_named_not_dropped_in_silence(tmp_path):
    """An iPhone's .heic photos among the JPEGs were left out of the cache without a word, and `predict` on a
    folder of them printed nothing and exited 0."""
    from conftest import SIZE, assert_clean_error, run_cli

    root = make_folder(tmp_path / "d", per_class=2)
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "labels.txt", ".DS_Store"):  # hidden files are not counted
        (root / "train" / "cat" / name).write_bytes(b"\0" * 10)
    (root / "val" / "dog" / "README").write_text("no extension")
    Image.open(root / "train" / "dog" / "000.png").save(root / "train" / "dog" / "phone.AVIF")  # read, not ignored
    source = open_source(str(root))
    assert dict(source.ignored) == {".heic": 2, ".txt": 1, "(no extension)": 1}
    assert len(source.splits["train"]) == 5  # the images, the AVIF among them
    proc = run_cli("features", "--data", root, "--weights", "random", "--image-size", SIZE, "--cache",
                   tmp_path / "c", "--workers", 0, check=True)
    assert ("WARNING: 4 file(s) not read (.heic 2, .txt 1, (no extension) 1): not an image extension (.jpg, "
            in proc.stderr), proc.stderr
    assert "train 5, val 4 rows; 0 skipped" in proc.stdout  # Pillow decoded the AVIF
    phone = tmp_path / "phone"
    phone.mkdir()
    (phone / "IMG_0003.HEIC").write_bytes(b"\0" * 10)
    run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--epochs", 1, check=True)
    proc = run_cli("predict", "--run", tmp_path / "r", phone)
    assert_clean_error(proc, "no image files in")
    assert "WARNING: 1 file(s) not read (.heic 1)" in proc.stderr
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("predict", "--run", tmp_path / "r", tmp_path / "empty"), "no image files in")


@pytest.mark.parametrize("name", ["val", "valid", "validation", "Validation"])
def test_every_validation_folder_name_is_used_and_unknown_folders_are_refused(tmp_path, name):
    root = make_folder(tmp_path / "d", per_class=3, splits=("train", name))
    source = open_source(str(root))
    assert source.val_split is None and len(source.splits["val"]) == 6  # the folder's images, nothing carved
    assert all(f"/{name}/" in path for path, _ in source.splits["val"])
    make_folder(root, per_class=1, splits=("extra",))
    with pytest.raises(DinoprobeError, match="'extra'"):
        open_source(str(root))


def test_missing_val_is_carved_stratified_and_reproducibly(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10, splits=("train",))
    a, b = open_source(str(root), val_fraction=0.2), open_source(str(root), val_fraction=0.2)
    assert a.splits == b.splits
    assert sorted(label for _, label in a.splits["val"]) == [0, 0, 1, 1]
    assert len(a.splits["train"]) == 16
    assert not set(a.splits["train"]) & set(a.splits["val"])
    assert a.val_split == {"from": "train", "fraction": 0.2, "seed": 0, "stratified": True}


def test_val_carving_refuses_impossible_fractions():
    with pytest.raises(DinoprobeError, match="validation fraction must be in"):
        carve_val([("a", 0)] * 4, 1.5, 0)
    train, val = carve_val([("a", 0)] * 4 + [("b", 1)], 0.1, 0)  # scikit-learn said "test_size ... Got 0" here
    assert ("b", 1) in train and [label for _, label in val] == [0]  # DINOv3: a 1-image class stays in train
    with pytest.raises(DinoprobeError, match="every class has a single training image"):
        carve_val([("a", 0), ("b", 1)], 0.1, 0)


def test_missing_data_and_missing_train_are_clear(tmp_path):
    with pytest.raises(DinoprobeError, match="not a folder"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DinoprobeError, match="no train/ folder"):
        open_source(str(tmp_path / "empty"))


def test_cifar_offline_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(DinoprobeError, match="cifar10 is not in"):
        open_source("cifar10", str(tmp_path))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_odd_image_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16)).save(path)
    elif mode == "P":
        image = Image.new("P", (8, 8), 3)
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
        image.save(path, transparency=0)
    else:
        write_image(path, 0, (8, 8), mode)
    image = load_rgb(str(path))
    assert image.mode == "RGB" and image.size == (8, 8)
    if mode == "I;16":  # rescaled, not clipped to white
        assert 120 <= np.asarray(image)[0, 0, 0] <= 135


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(str(tmp_path / "r.jpg")).size == (10, 20)


def test_bad_files_are_skipped_with_a_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    write_image(tmp_path / "good.jpg", 0, (64, 64))
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    os.mkfifo(tmp_path / "pipe.jpg")  # opened, it would block until a writer came
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # read, it would never end
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    reasons = {}
    for name in ("empty.jpg", "text.jpg", "truncated.jpg", "pipe.jpg", "zero.png", "gone.jpg", "dangling.jpg",
                 "loop.jpg"):
        with pytest.raises(SkippedInput) as err:
            load_rgb(str(tmp_path / name))
        reasons[name] = str(err.value)
    assert "0 bytes" in reasons["empty.jpg"] and "truncated" in reasons["truncated.jpg"].lower()
    assert "not a regular file" in reasons["pipe.jpg"] and "not a regular file" in reasons["zero.png"]
    # a file list naming a missing file, a link to nothing, a link loop: the system's reason, not "a pipe"
    assert reasons["gone.jpg"] == "no such file or directory"
    assert reasons["dangling.jpg"] == "no such file or directory (a symbolic link)"
    assert reasons["loop.jpg"] == "too many levels of symbolic links (a symbolic link)"
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(SkippedInput, match="pixel guard"):
        load_rgb(str(tmp_path / "big.png"), max_pixels=300 * 299)


def test_dataset_returns_a_reason_instead_of_raising(tmp_path, backbone):
    (tmp_path / "bad.jpg").write_bytes(b"")
    write_image(tmp_path / "ok.png", 1)
    ds = ImageFileDataset([(str(tmp_path / "bad.jpg"), 0), (str(tmp_path / "ok.png"), 1)], backbone.data_config)
    assert ds[0][0] is None and "0 bytes" in ds[0][3]
    assert ds[1][0].shape == (3, 32, 32) and ds[1][0].dtype == torch.uint8


def _fake_cifar10(root, per_batch=20, n_test=30, seed=0):
    """A tiny CIFAR-10 in torchvision's on-disk format (pickled batches, as the real archive ships them)."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)


def test_cifar_source_end_to_end(tmp_path, backbone, monkeypatch):
    import torchvision

    from dinoprobe.cache import store as cache
    from dinoprobe.extract.run import extract
    from dinoprobe.extract.transforms import Preprocess

    _fake_cifar10(tmp_path / "data")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    source = open_source("cifar10", str(tmp_path / "data"))
    assert source.classes == [f"c{i}" for i in range(10)]
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 90, "val": 10, "test": 30}
    assert sorted(lab for _, lab in source.splits["val"]) == list(range(10))  # stratified
    rows = {p for p, _ in source.splits["train"]} | {p for p, _ in source.splits["val"]}
    assert rows == {f"cifar10:train:{i}" for i in range(100)}
    extract(backbone, source, tmp_path / "c", batch_size=16, workers=0, dtype="float32", progress=False)
    val = cache.load(tmp_path / "c", "val", "cls")
    original = int(val["path"][3].split(":")[-1])  # the 4th val row comes from this training image
    pixels = torch.from_numpy(source.arrays["val"][3]).permute(2, 0, 1)[None]
    raw = torchvision.datasets.CIFAR10(str(tmp_path / "data"), train=True).data[original]
    assert np.array_equal(source.arrays["val"][3], raw)  # arrays and paths agree after the carve
    with torch.inference_mode():
        expected = backbone(Preprocess(backbone.data_config)(pixels))["cls"][0].numpy()
    assert np.abs(val["cls"][3] - expected).max() < 1e-4
    assert val["label"][3] == source.splits["val"][3][1]


def test_features_runs_at_224_px_by_default_and_says_so(tmp_path):
    from dinoprobe.cache import store as cache

    from conftest import run_cli

    root = make_folder(tmp_path / "d", per_class=1)
    proc = run_cli("features", "--data", root, "--weights", "random", "--cache", tmp_path / "c", "--workers", 0,
                   "--last-blocks", 0, check=True)
    assert "transform timm: resize 224, centre crop 224 px (bicubic)" in proc.stderr
    assert cache.read_manifest(tmp_path / "c")["fingerprint"]["transform"]["image_size"] == 224
    from dinoprobe.cli import default_cache_dir

    assert default_cache_dir("data/demo", "m", 224, "random") == "cache/demo-m-224px-random"


def test_a_cache_inside_the_image_folder_is_refused_before_anything_is_written(tmp_path, backbone):
    """`--cache data/cache` worked once, then the rerun that resumes it refused 'cache' as an unknown split folder
    (inside train/, it would have been a class of shards)."""
    from dinoprobe.extract.run import extract

    from conftest import SIZE, assert_clean_error, run_cli

    root = make_folder(tmp_path / "data", per_class=2)
    for cache in (root / "cache", root, root / "train" / "cache"):
        proc = run_cli("features", "--data", root, "--weights", "random", "--image-size", SIZE, "--cache", cache)
        assert_clean_error(proc, "is inside the data folder", "--cache cache/data")
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    with pytest.raises(DinoprobeError, match="inside the data folder"):  # the Python API too
        extract(backbone, open_source(str(root)), root / "cache")
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    run_cli("features", "--data", root, "--weights", "random", "--image-size", SIZE, "--cache", tmp_path / "data-cache",
            "--workers", 0, check=True)  # beside it: fine
