"""DINOv3's evaluation protocol: last-block CLS features, its transform, the linear-eval preset, fp16 advice."""
import json

import numpy as np
import pytest
import torch

from dinoprobe import load_cache
from dinoprobe.cache import store as cache
from dinoprobe.cache.specs import parse_feature
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.backbone import build_backbone
from dinoprobe.extract.run import extract
from dinoprobe.extract.sources import open_source

from conftest import MODEL, SIZE, assert_clean_error, hf_reference_model, make_folder, make_synthetic_cache, run_cli


def test_cls_blocks_equal_transformers_hidden_states_after_the_final_norm(tmp_path):
    hf = hf_reference_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = build_backbone(MODEL, str(tmp_path / "hf"), 48, log=lambda *_: None)
    ours.last_blocks = 4
    pixels = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        out = hf(pixel_values=pixels, output_hidden_states=True)
        expected = torch.stack([hf.norm(h)[:, 0] for h in out.hidden_states[-4:]], dim=1)  # earliest first
        got = ours(pixels)
    assert got["cls_blocks"].shape == (2, 4, 384)
    assert (got["cls_blocks"] - expected).abs().max().item() <= 1e-4
    assert torch.equal(got["cls_blocks"][:, -1], got["cls"])
    assert (got["cls_blocks"][:, 0] - got["cls_blocks"][:, -1]).abs().max() > 1e-2  # blocks really differ


@pytest.fixture(scope="module")
def block_cache(tmp_path_factory, backbone):
    root = make_folder(tmp_path_factory.mktemp("blocks") / "data", per_class=5)
    cache_dir = root.parent / "cache"
    extract(backbone, open_source(str(root)), cache_dir, batch_size=4, workers=0, dtype="float32", progress=False,
            last_blocks=4)
    assert backbone.last_blocks == 0  # extraction leaves the caller's backbone as it was
    return cache_dir


def test_features_store_the_last_blocks_and_feature_specs_read_them(block_cache):
    train = cache.load(block_cache, "train", ("cls", "patch_mean", "cls_blocks"))
    assert train["cls_blocks"].shape == (10, 4, 384)
    np.testing.assert_array_equal(train["cls_blocks"][:, -1], train["cls"])
    manifest = cache.read_manifest(block_cache)
    assert manifest["fingerprint"]["last_blocks"] == 4 and manifest["last_blocks"] == 4
    data = load_cache(block_cache, "cls4+patch_mean")
    expected = np.concatenate([train["cls_blocks"].reshape(10, -1), train["patch_mean"]], axis=1)
    np.testing.assert_array_equal(data.X_train.numpy(), expected)
    assert load_cache(block_cache, "cls2").X_train.shape == (10, 768)
    torch.testing.assert_close(load_cache(block_cache, "cls1").X_train, load_cache(block_cache, "cls").X_train)


def test_a_part_the_cache_lacks_is_refused_with_the_option_that_adds_it(tmp_path, block_cache):
    old = make_synthetic_cache(tmp_path / "old")  # a cache from before --last-blocks: still loads
    assert load_cache(old, "cls+patch_mean").X_train.shape[1] == 64
    with pytest.raises(DinoprobeError, match="--last-blocks 4"):
        load_cache(old, "cls4+patch_mean")
    with pytest.raises(DinoprobeError, match="--last-blocks 8"):
        load_cache(block_cache, "cls8")
    for bad in ("cls0", "tokens", "cls+cls1", "patch_mean+"):
        with pytest.raises(DinoprobeError):
            parse_feature(bad)
    proc = run_cli("probe", "--cache", old, "--out", tmp_path / "r", "--feature", "cls4+mean")
    assert proc.returncode == 2 and "clsN" in proc.stderr
    assert_clean_error(run_cli("probe", "--cache", old, "--out", tmp_path / "r", "--feature", "cls4"),
                       "--last-blocks 4")


def test_dinov2_preset_searches_blocks_patch_mean_and_13_learning_rates(block_cache, tmp_path):
    run_cli("sweep", "--cache", block_cache, "--out", tmp_path / "p", "--preset", "dinov2-linear", "--epochs", 2,
            "--epoch-length", 5, "--batch-size", 4, check=True)
    rows = json.loads((tmp_path / "p" / "results.json").read_text())
    assert len(rows) == 4 * 13
    assert {r["feature"] for r in rows} == {"cls", "cls4", "cls+patch_mean", "cls4+patch_mean"}
    assert {r["optimizer"] for r in rows} == {"sgd"} and len({r["lr"] for r in rows}) == 13
    assert {r["group_size"] for r in rows} == {13}  # each feature's 13 heads trained side by side
    head = torch.load(tmp_path / "p" / "best" / "head.pt", weights_only=True)
    assert head["feature"] == rows[0]["feature"]
    # DINOv3's own: the last block's CLS + mean patch token only (n = 4 by asking for its feature)
    run_cli("sweep", "--cache", block_cache, "--out", tmp_path / "v3", "--preset", "dinov3-linear", "--epochs", 1,
            "--epoch-length", 5, "--batch-size", 4, check=True)
    assert {r["feature"] for r in json.loads((tmp_path / "v3" / "results.json").read_text())} == {"cls+patch_mean"}


def test_dinov3_transform_gives_torchvision_v2_pixels(photos):
    from torchvision.transforms import v2

    from dinoprobe.extract.transforms import worker_transform
    from dinoprobe.imagefiles import load_rgb

    backbone = build_backbone(MODEL, "random", 224, log=lambda *_: None, transform="dinov3")
    config = backbone.data_config
    assert (config.name, config.resize_size, config.image_size, config.interpolation) == ("dinov3", 256, 224, "bicubic")
    assert config.mean == (0.485, 0.456, 0.406) and config.std == (0.229, 0.224, 0.225)
    reference = v2.Compose([v2.PILToTensor(), v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(224)])
    for path in sorted(photos.rglob("*.jpg"))[:4]:
        image = load_rgb(str(path))
        assert torch.equal(worker_transform(config)(image), reference(image))
    small = build_backbone(MODEL, "random", 64, log=lambda *_: None, transform="dinov3").data_config
    assert (small.resize_size, small.image_size) == (73, 64)  # round(64 * 256 / 224)


def test_dinov3_transform_at_crop_pct_1_is_its_logistic_regressions(photos):
    from torchvision.transforms import v2

    from dinoprobe.extract.transforms import worker_transform
    from dinoprobe.imagefiles import load_rgb

    config = build_backbone(MODEL, "random", 224, log=lambda *_: None, transform="dinov3", crop_pct=1.0).data_config
    assert (config.resize_size, config.image_size, config.crop_pct) == (224, 224, 1.0)
    reference = v2.Compose([v2.PILToTensor(), v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(224)])  # make_classification_eval_transform(resize_size=224, crop_size=224)
    for path in sorted(photos.rglob("*.jpg"))[:3]:
        image = load_rgb(str(path))
        assert torch.equal(worker_transform(config)(image), reference(image))


@pytest.mark.parametrize("size", [224, 256])
def test_square_transform_is_the_readmes_make_transform_and_the_hugging_face_processor(photos, size):
    """At 256: the DINOv3 README's make_transform (v2.Resize((256, 256)), bilinear); at 224: transformers'
    DINOv3 image processor. Exactly torchvision's uint8 pixels; the processor's within one intensity level."""
    from torchvision.transforms import v2
    from transformers import DINOv3ViTImageProcessor

    from dinoprobe.extract.transforms import Preprocess, worker_transform
    from dinoprobe.imagefiles import load_rgb

    config = build_backbone(MODEL, "random", size, log=lambda *_: None, transform="square").data_config
    assert (config.name, config.resize_size, config.crop_pct, config.interpolation) == ("square", size, 1.0, "bilinear")
    readme = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
    processor = DINOv3ViTImageProcessor(size={"height": size, "width": size})
    for path in sorted(photos.rglob("*.jpg"))[:3]:
        image = load_rgb(str(path))
        ours = worker_transform(config)(image)
        assert torch.equal(ours, readme(image))
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        # the processor keeps the resized pixels as floats, torchvision (and dinoprobe) round them to uint8: at
        # most one intensity level apart, i.e. 1 / (255 x std) after normalisation
        diff = (Preprocess(config)(ours[None])[0] - theirs).abs()
        assert diff.max() <= 1.0001 / (255 * min(config.std)) and diff.mean() < 0.006  # rounding: about half a level


def test_transform_is_fingerprinted_and_rebuilt_by_predict(tmp_path, photos):
    common = ["features", "--data", photos, "--weights", "random", "--image-size", SIZE, "--last-blocks", 0]
    run_cli(*common, "--cache", tmp_path / "c", "--transform", "dinov3", check=True)
    assert cache.read_manifest(tmp_path / "c")["fingerprint"]["transform"]["name"] == "dinov3"
    proc = run_cli(*common, "--cache", tmp_path / "c")  # the same cache with timm's transform: refused
    assert_clean_error(proc, "transform.name")
    run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--epochs", 2, check=True)
    from dinoprobe.runs.predict import backbone_for_head
    from dinoprobe.train.headfile import load_head_file

    rebuilt = backbone_for_head(load_head_file(tmp_path / "r"), log=lambda *_: None)
    assert rebuilt.data_config.name == "dinov3" and rebuilt.data_config.resize_size == round(SIZE * 256 / 224)


def test_fp16_on_dinov3_warns_and_advises_bf16(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    proc = run_cli("features", "--data", root, "--weights", "random", "--image-size", SIZE, "--precision", "fp16",
                   "--cache", tmp_path / "c", "--device", "cpu")
    assert "does not support fp16" in proc.stderr and "bf16" in proc.stderr
