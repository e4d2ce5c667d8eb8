"""Augmented multi-view caches: distinct, reproducible views; fingerprinted; sampled uniformly in training."""
import numpy as np
import pytest
import torch

from dinoprobe.cache import store as cache
from dinoprobe.cache.arrays import AugmentedViews, load_cache
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.run import extract
from dinoprobe.extract.sources import open_source
from dinoprobe.train.loop import TrainConfig, train_heads

from conftest import make_folder


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, backbone):
    root = make_folder(tmp_path_factory.mktemp("views") / "data", per_class=5)
    kw = dict(batch_size=4, workers=0, dtype="float32", progress=False, shard_size=4, views=3, augment="timm")
    extract(backbone, open_source(str(root)), root.parent / "a", **kw)
    extract(backbone, open_source(str(root)), root.parent / "b", **kw)
    return root, root.parent / "a", root.parent / "b", kw


def test_views_differ_from_each_other_and_from_the_clean_view(view_cache):
    _, a, _, _ = view_cache
    train = cache.load(a, "train", ("cls", "cls_views", "patch_mean_views"))
    views, clean = train["cls_views"], train["cls"]
    assert views.shape == (10, 3, 384) and train["patch_mean_views"].shape == (10, 3, 384)
    for i in range(len(clean)):
        assert np.abs(views[i, 0] - views[i, 1]).max() > 1e-3 and np.abs(views[i, 1] - views[i, 2]).max() > 1e-3
        assert min(np.abs(views[i, v] - clean[i]).max() for v in range(3)) > 1e-3
    with pytest.raises(DinoprobeError, match="no augmented views for 'val'"):
        cache.load(a, "val", "cls_views")


def test_views_are_reproducible_so_resumed_runs_match(view_cache):
    _, a, b, _ = view_cache
    np.testing.assert_array_equal(cache.load(a, "train", "cls_views")["cls_views"],
                                  cache.load(b, "train", "cls_views")["cls_views"])


def test_fingerprint_holds_view_count_and_augmentation(view_cache, backbone):
    root, a, _, kw = view_cache
    assert cache.read_manifest(a)["fingerprint"]["views"] == {"count": 3, "augment": "timm", "split": "train"}
    with pytest.raises(DinoprobeError, match="views.count: cache has 3, requested 2"):
        extract(backbone, open_source(str(root)), a, **{**kw, "views": 2})
    with pytest.raises(DinoprobeError, match="views.augment"):
        extract(backbone, open_source(str(root)), a, **{**kw, "augment": "light"})


def test_training_samples_one_view_per_image_uniformly():
    views = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 4, 1)  # value encodes (image, view)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(20):
        picked = AugmentedViews(views, views[:, 0]).sample(generator)[:, 0].long()
        assert torch.equal(picked // 4, torch.arange(1000))  # exactly one view of every image
        counts += torch.bincount(picked % 4, minlength=4)
    expected = 20 * 1000 / 4
    assert ((counts - expected).abs() / expected).max() < 0.05


def test_probe_and_sweep_with_views_agree_and_need_a_view_cache(view_cache, tmp_path):
    _, a, _, _ = view_cache
    data = load_cache(a, "cls", views=True)
    configs = [TrainConfig(head="linear", lr=lr, epochs=3, batch_size=4) for lr in (1e-3, 1e-2)]
    together = train_heads(configs, data.X_train, data.y_train, data.X_val, data.y_val, 2)
    assert together[0].group_size == 2
    for cfg, batched in zip(configs, together):
        alone, = train_heads([cfg], data.X_train, data.y_train, data.X_val, data.y_val, 2)
        np.testing.assert_allclose(batched.step_losses, alone.step_losses, atol=1e-4)
    plain, = train_heads(configs[:1], data.x["train"], data.y_train, data.X_val, data.y_val, 2)
    assert not np.allclose(plain.step_losses, together[0].step_losses)  # views really were used
    from conftest import make_synthetic_cache

    with pytest.raises(DinoprobeError, match="features --views K"):
        load_cache(make_synthetic_cache(tmp_path / "plain"), "cls", views=True)


def test_view_forwards_take_at_most_a_batch_and_give_each_views_features(view_cache, backbone, tmp_path,
                                                                         monkeypatch):
    """K views per image go through the backbone in forwards of at most --batch-size images (memory follows the
    batch size, not K), and each view's stored features are the backbone's on that view alone."""
    import dinoprobe.extract.run as run_module
    from dinoprobe.extract.backbone import token_features

    root, _, _, kw = view_cache
    sizes = []
    monkeypatch.setattr(run_module, "token_features", lambda model, pixels, *a: sizes.append(len(pixels)) or
                        token_features(model, pixels, *a))
    extract(backbone, open_source(str(root)), tmp_path / "c", **kw)
    assert max(sizes) == kw["batch_size"] and sum(sizes) > 3 * 10  # views ran, never more than a batch at once
    # independent of the batching: one image's views regenerated (they are seeded per image and view) and run
    # through timm's model one at a time
    from torchvision.transforms.v2.functional import normalize

    from dinoprobe.extract.transforms import Views
    from dinoprobe.imagefiles import load_rgb

    data = cache.load(tmp_path / "c", "train", "cls_views")
    views = Views(backbone.data_config, 3, kw["augment"])(load_rgb(data["path"][0]), int(data["index"][0]))
    cfg = backbone.data_config
    with torch.inference_mode():
        alone = [backbone.model.forward_features(normalize(v[None].float() / 255, cfg.mean, cfg.std))[0, 0]
                 for v in views]
    np.testing.assert_allclose(data["cls_views"][0], torch.stack(alone).numpy(), atol=1e-4)
