"""`--decoder torchvision`: pixels against PIL's reference transform, device decoding (run here on the CPU,
the code path CUDA takes) against worker decoding, broken and non-JPEG files, and the cache fingerprint."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dinoprobe.cache import store as cache
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.datasets import collate
from dinoprobe.extract.decode import DeviceDecoder, TorchvisionDecode
from dinoprobe.extract.run import extract
from dinoprobe.extract.sources import open_source
from dinoprobe.extract.transforms import worker_transform
from dinoprobe.imagefiles import SkippedInput, load_rgb

from conftest import SIZE, assert_clean_error, run_cli, write_image


@pytest.fixture(scope="module")
def jpegs(photos):
    return sorted(str(p) for p in photos.rglob("*.jpg"))[:24]


def test_torchvision_pixels_match_pils_reference_transform(backbone, jpegs):
    """Same decoder library (libjpeg-turbo); only the bicubic resize differs, by a level or two at most."""
    config = backbone.data_config
    pil, tv = worker_transform(config), TorchvisionDecode(config)
    diffs = [(pil(load_rgb(p)).float() - tv(p).float()).abs() for p in jpegs]
    assert all(d.shape == (3, SIZE, SIZE) for d in diffs)
    assert max(d.max().item() for d in diffs) <= 3
    assert np.mean([d.mean().item() for d in diffs]) < 0.25


def test_device_decoding_equals_worker_decoding(backbone, jpegs, tmp_path):
    """The batch path CUDA takes (bytes from the workers, one decode call on the device), run on the CPU."""
    config = backbone.data_config
    png = str(write_image(tmp_path / "x.png", 0, size=(50, 40)))
    same_size = tmp_path / "same-size.jpg"  # other pixels at jpegs[1]'s size: resized as one group with it
    Image.open(jpegs[4]).resize(Image.open(jpegs[1]).size).save(same_size)
    paths = jpegs[:5] + [png, jpegs[0], str(same_size)]
    encoded = TorchvisionDecode(config, encoded=True)
    items = [encoded(p) for p in paths]
    assert [t.dim() for t in items] == [1] * 5 + [3, 1, 1]  # JPEG bytes; the PNG decoded by PIL in the worker
    pixels, labels, index, skipped, _ = collate([(t, 0, i, None, None) for i, t in enumerate(items)])
    assert isinstance(pixels, list) and not skipped
    decoded, kept, failed = DeviceDecoder(config, torch.device("cpu"), encoded)(pixels)
    assert kept == list(range(8)) and failed == []
    reference = TorchvisionDecode(config)
    torch.testing.assert_close(decoded, torch.stack([reference(p) for p in paths]), atol=0, rtol=0)


def test_broken_and_unusual_files_fall_back_or_are_skipped(backbone, jpegs, tmp_path):
    config = backbone.data_config
    truncated = tmp_path / "truncated.jpg"
    data = open(jpegs[0], "rb").read()
    truncated.write_bytes(data[:len(data) // 2])  # a whole header, half the scan
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(jpegs[1]).convert("CMYK").save(cmyk)
    rotated, upright = tmp_path / "rotated.jpg", tmp_path / "upright.jpg"
    image = Image.open(jpegs[3])
    image.save(upright)
    exif = image.getexif()
    exif[0x0112] = 6  # the same pixels, shown rotated 90° clockwise
    image.save(rotated, exif=exif)
    encoded = TorchvisionDecode(config, encoded=True)
    assert encoded(str(cmyk)).dim() == 3  # not a plain JPEG: PIL decodes it in the worker
    # nvJPEG would ignore the EXIF rotation, so the worker decodes (and rotates) it, as --decoder pil would
    pil_pixels = worker_transform(config)(load_rgb(str(rotated)))
    torch.testing.assert_close(encoded(str(rotated)), pil_pixels, atol=3, rtol=0)
    upright_pixels = TorchvisionDecode(config)(str(upright))
    def mean_diff(a, b):
        return (a.float() - b.float()).abs().mean().item()
    assert mean_diff(encoded(str(rotated)), torch.rot90(upright_pixels, -1, (1, 2))) < 0.5  # resize rounding only
    assert mean_diff(encoded(str(rotated)), upright_pixels) > 5
    assert encoded(str(truncated)).dim() == 1  # the header is fine; the device finds out
    paths = [str(truncated), jpegs[2]]
    decoded, kept, failed = DeviceDecoder(config, torch.device("cpu"), encoded)([encoded(p) for p in paths])
    assert kept == [1] and decoded.shape == (1, 3, SIZE, SIZE)
    assert failed[0][0] == 0 and "truncated" in failed[0][1].lower()  # PIL's reason, as with --decoder pil
    with pytest.raises(SkippedInput, match="0 bytes"):  # what the worker hands on as a skip reason
        empty = tmp_path / "empty.jpg"
        empty.touch()
        encoded(str(empty))


@pytest.mark.parametrize("on_device", [False, True])
def test_extract_with_the_torchvision_decoder(backbone, jpegs, tmp_path, on_device, monkeypatch):
    root = tmp_path / "data"
    for i, path in enumerate(jpegs[:12]):
        split, label = ("train" if i < 8 else "val"), ("a" if i % 2 else "b")
        (root / split / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / split / label / f"{i}.jpg")
    write_image(root / "train" / "a" / "z.png", 1)
    data = open(jpegs[0], "rb").read()
    (root / "train" / "b" / "broken.jpg").write_bytes(data[:len(data) // 2])
    source = open_source(str(root))
    kwargs = dict(batch_size=4, workers=0, dtype="float32", progress=False)
    extract(backbone, source, tmp_path / "pil", **kwargs)
    device_batches = []
    decode_batch = DeviceDecoder.__call__
    monkeypatch.setattr(DeviceDecoder, "__call__",
                        lambda self, *a: device_batches.append(1) or decode_batch(self, *a))
    extract(backbone, source, tmp_path / "tv", decoder="torchvision", decode_on_device=on_device, **kwargs)
    assert bool(device_batches) == on_device  # the batch path CUDA takes really ran (or really did not)
    manifest = cache.read_manifest(tmp_path / "tv")
    assert manifest["fingerprint"]["decoder"] == {"name": "torchvision", "device": "cpu"}
    skipped = [s["path"] for sh in manifest["splits"]["train"]["shards"] for s in sh.get("skipped", [])]
    assert skipped == [str(root / "train" / "b" / "broken.jpg")]
    for split in ("train", "val"):
        pil, tv = (cache.load(tmp_path / name, split) for name in ("pil", "tv"))
        assert list(pil["path"]) == list(tv["path"])
        a, b = torch.as_tensor(pil["cls"]), torch.as_tensor(tv["cls"])
        if split == "train":
            assert not torch.equal(a, b)  # a resize a level apart on a few pixels: torchvision really decoded
        cosine = torch.nn.functional.cosine_similarity(a, b)
        assert cosine.min() > 0.9999, cosine  # a resize a level or two apart: the same features, nearly


def test_decoder_is_part_of_the_fingerprint_and_refused_for_arrays(backbone, photos, tmp_path):
    args = ["features", "--data", str(photos), "--weights", "random", "--image-size", str(SIZE),
            "--cache", str(tmp_path / "c"), "--batch-size", "16"]
    assert run_cli(*args).returncode == 0
    assert_clean_error(run_cli(*args, "--decoder", "torchvision"), "decoder", "--overwrite")
    from bench.benchmark import array_source

    source = array_source(8)  # CIFAR-format arrays, as `--data cifar10` gives
    with pytest.raises(DinoprobeError, match="leave --decoder at pil"):
        extract(backbone, source, tmp_path / "arrays", decoder="torchvision", progress=False)


def test_predict_decodes_new_images_the_way_the_cache_was_built(backbone, jpegs):
    from types import SimpleNamespace

    from dinoprobe.runs.predict import prediction_dataset

    config = backbone.data_config
    for decoder, reference in (({"name": "torchvision", "device": "cpu"}, TorchvisionDecode(config)),
                               ({"name": "pil", "device": None}, lambda p: worker_transform(config)(load_rgb(p))),
                               (None, lambda p: worker_transform(config)(load_rgb(p)))):  # a cache from before
        head_file = SimpleNamespace(fingerprint={"decoder": decoder} if decoder else {})
        dataset = prediction_dataset(head_file, jpegs[:3], config)
        for i, path in enumerate(jpegs[:3]):
            torch.testing.assert_close(dataset[i][0], reference(path), atol=0, rtol=0)


def test_decode_on_chooses_where_torchvision_decodes(photos, tmp_path, monkeypatch):
    """`--decode-on device` takes the batched device path even on a CPU, `workers` keeps decoding in the loader;
    PIL cannot decode on the device, and says which decoder can."""
    args = ["features", "--data", str(photos), "--weights", "random", "--image-size", str(SIZE), "--batch-size", "16"]
    # refused before any weights load (these do not exist)
    refused = [a if a != "random" else str(tmp_path / "missing.pth") for a in args]
    assert_clean_error(run_cli(*refused, "--cache", str(tmp_path / "p"), "--decode-on", "device"), "--decoder torchvision")
    device_batches = []
    decode_batch = DeviceDecoder.__call__
    monkeypatch.setattr(DeviceDecoder, "__call__", lambda self, *a: device_batches.append(1) or decode_batch(self, *a))
    for where in ("workers", "device"):
        before = len(device_batches)
        run_cli(*args, "--cache", str(tmp_path / where), "--decoder", "torchvision", "--decode-on", where, check=True)
        assert (len(device_batches) > before) == (where == "device"), where
    a, b = (cache.load(tmp_path / where, "train") for where in ("workers", "device"))
    np.testing.assert_array_equal(a["cls"], b["cls"])  # the same pixels either way on a CPU
