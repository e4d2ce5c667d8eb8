"""The JSON dinoprobe reads back — a cache's manifest and shard sidecars, the fingerprint in a head file — is checked
against documents.schema.json before any field is used: what dinoprobe writes fits the schema (checked by jsonschema
itself), and a hand-edited or foreign document is one line naming the field, never a traceback from deep inside."""
import json
import shutil

import jsonschema
import pytest
import torch

from dinoprobe.cache import store as cache

from conftest import SIZE, assert_clean_error, make_folder, make_synthetic_cache, run_cli

SCHEMA = json.loads((cache.Path(cache.__file__).parents[1] / "documents.schema.json").read_text())


def fits(document, definition):
    jsonschema.validate(document, {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{definition}"},
                        cls=jsonschema.Draft202012Validator)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("docs") / "cache", n=(60, 30, 30), dim=8, num_classes=3)


def test_the_schema_fits_what_features_and_probe_write(tmp_path):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    root = make_folder(tmp_path / "data", per_class=3)
    run_cli("features", "--data", root, "--weights", "random", "--image-size", SIZE, "--cache", tmp_path / "c",
            "--workers", 0, "--views", 2, "--shard-size", 2, check=True)
    run_cli("probe", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--epochs", 1, check=True)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    fits(manifest, "manifest")
    sidecars = sorted((tmp_path / "c").glob("*/shard-*.json"))
    assert len(sidecars) == 6
    for sidecar in sidecars:
        fits(json.loads(sidecar.read_text()), "shard")
    head = torch.load(tmp_path / "r" / "head.pt", weights_only=True)
    fits(head["fingerprint"], "fingerprint")
    fits(head["class_names"], "class_names")
    fits(json.loads((tmp_path / "r" / "run.json").read_text()), "run")
    with pytest.raises(jsonschema.ValidationError):  # and the schema is not one that fits anything
        fits({**manifest, "classes": "cat"}, "manifest")


EDITS = {
    "classes": (lambda m: m.update(classes=None), "$.classes: None is not of type 'array'"),
    "last_blocks": (lambda m: m.update(last_blocks="x"), "$.last_blocks: 'x' is not of type 'integer'"),
    "a split": (lambda m: m["splits"].update(train=[]), "$.splits.train: [] is not of type 'object'"),
    "a split name": (lambda m: m["splits"].update(extra=m["splits"]["val"]), "$.splits: 'extra' is not one of"),
    "a shard's file": (lambda m: m["splits"]["val"]["shards"][0].update(file=123),
                       "$.splits.val.shards[0].file: 123 is not of type 'string'"),
    "a shard's rows": (lambda m: m["splits"]["val"]["shards"][0].update(rows=-1),
                       "$.splits.val.shards[0].rows: -1 is less than the minimum of 0"),
    "a skipped input": (lambda m: m["splits"]["val"]["shards"][0].update(skipped=[{"index": 0}]),
                        "$.splits.val.shards[0].skipped[0]: 'path' is a required property"),
    "the image size": (lambda m: m["fingerprint"]["transform"].update(image_size=10**6),
                       "$.fingerprint.transform.image_size: 1000000 is greater than the maximum of 4096"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_hand_edited_manifest_is_one_line_naming_the_field(tiny, tmp_path, edit):
    change, message = EDITS[edit]
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert [p for p in cache.verify(copy) if message in p and "rebuild the cache" in p], cache.verify(copy)
    assert_clean_error(run_cli("knn", "--cache", copy, "--out", tmp_path / "r", "--k", 1), message)
    assert_clean_error(run_cli("cache", "skipped", copy), message)


def test_json_nested_deeper_than_python_recurses_is_refused(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    (copy / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    proc = run_cli("cache", "verify", copy)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "not valid JSON (nested too deeply)" in proc.stderr
    assert_clean_error(run_cli("knn", "--cache", copy, "--out", tmp_path / "r", "--k", 1), "nested too deeply")


def test_a_sidecar_that_does_not_fit_is_never_adopted(tiny, tmp_path):
    """A shard is adopted from its sidecar (a run killed before its manifest update); a sidecar whose fields do not fit
    would have put a string where rows are counted into the manifest."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["splits"]["val"]["shards"].pop()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert cache.adopt_finished_shards(copy, json.loads((copy / "manifest.json").read_text())) == 1
    (copy / "val" / "shard-00000.json").write_text(json.dumps({**entry, "start": "0"}))
    assert cache.adopt_finished_shards(copy, manifest) == 0
    assert any("shard not in the manifest" in p for p in cache.verify(copy))


HEAD_EDITS = {
    "image size": (lambda f: f["transform"].update(image_size=10**6),
                   "fingerprint.transform.image_size: 1000000 is greater than the maximum of 4096"),
    "extra transform field": (lambda f: f["transform"].update(evil=1), "fingerprint.transform: Additional properties"),
    "interpolation": (lambda f: f["transform"].update(interpolation="evil"), "fingerprint.transform.interpolation"),
    "std": (lambda f: f["transform"].update(std=[0, 0, 0]), "fingerprint.transform.std"),
    "decoder": (lambda f: f.update(decoder="torchvision"), "fingerprint.decoder: 'torchvision' is not of type 'object'"),
    "weights": (lambda f: f.update(weights=None), "fingerprint.weights: None is not of type 'object'"),
}


@pytest.mark.parametrize("edit", list(HEAD_EDITS))
def test_a_head_files_fingerprint_is_checked_before_predict_uses_it(tiny, tmp_path, edit):
    """predict rebuilds the backbone and transform from the head's fingerprint: a field edited there was a KeyError,
    a TypeError or a 10^6 px model."""
    change, message = HEAD_EDITS[edit]
    run_cli("probe", "--cache", tiny, "--out", tmp_path / "r", "--epochs", 1, "--head", "linear", check=True)
    raw = torch.load(tmp_path / "r" / "head.pt", weights_only=True)
    change(raw["fingerprint"])
    torch.save(raw, tmp_path / "r" / "head.pt")
    image = make_folder(tmp_path / "img", per_class=1, splits=("val",)) / "val" / "cat" / "000.png"
    assert_clean_error(run_cli("predict", "--run", tmp_path / "r", image), "damaged at " + message,
                       "train it again")
