"""ONNX export: one graph that ONNX Runtime runs without PyTorch, agreeing with `dinoprobe predict`."""
import json
import subprocess
import sys

import numpy as np
import pytest

import processes
from conftest import REPO, assert_clean_error, run_cli, traced_as

onnx = pytest.importorskip("onnx")  # the `onnx` extra; the dev extras include it
ort = pytest.importorskip("onnxruntime")


def scores(row: dict) -> list[float]:
    """What a predict row says of every class: a multi-label row's every probability, else its top-k ones."""
    return list(row["all_probabilities"].values()) if "all_probabilities" in row else row["probabilities"]


@pytest.mark.parametrize("name", ["linear32", "mlp48"])
def test_onnx_runtime_gives_predicts_probabilities(exports, photos, name):
    """The same labels (top-k, or for the multi-label mlp48 every class at or over its threshold) and
    probabilities from the ONNX file as from its run."""
    run, model = exports[name]
    ours = json.loads(run_cli("predict", "--run", run, "--format", "json", "--top-k", 2, photos / "val",
                              check=True).stdout)
    for batch in (1, 7):  # the batch axis is dynamic
        theirs = json.loads(run_cli("predict", "--model", model, "--format", "json", "--top-k", 2, "--batch-size",
                                    batch, photos / "val", check=True).stdout)
        assert [r["path"] for r in theirs] == [r["path"] for r in ours] and len(ours) == 20
        for a, b in zip(ours, theirs):
            assert a["labels"] == b["labels"]
            assert len(scores(a)) == 2 and ("all_probabilities" in a) == (name == "mlp48")
            np.testing.assert_allclose(scores(a), scores(b), atol=1e-4)


def test_a_multilabel_export_carries_its_thresholds_and_its_exporters_notes_stay_off_stderr(exports):
    """The graph ends in a sigmoid (the probabilities test) and carries the head's thresholds; onnxscript's notes
    (a warning per attention block, none a user can act on) are not shown: the export ran in a process of its own,
    so what it printed is what a user would see."""
    from dinoprobe.runs.onnx_predict import OnnxClassifier
    from dinoprobe.train.headfile import load_head_file

    run, model = exports["mlp48"]
    head = load_head_file(run)
    assert head.multilabel and OnnxClassifier(model).thresholds == pytest.approx(head.thresholds)
    stderr = model.with_name(model.name + ".stderr").read_text()
    assert [line for line in stderr.splitlines() if "RANDOM weights" not in line] == [], stderr


def test_odd_and_hostile_images_are_opened_as_predict_opens_them(exports, tmp_path):
    """16-bit, palette + transparency and CMYK files give `predict --run`'s probabilities (ONNX's own PIL path
    clipped 16-bit to white), and a 3 KB 1,000,000 x 1 PNG is skipped with the same reason (ONNX's path resized it
    to 32,000,000 x 32 pixels here, 224,000,000 x 224 at 224 px: a memory bomb)."""
    from PIL import Image

    from conftest import write_image

    run, model = exports["linear32"]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65536, (40, 30), dtype=np.uint16)).save(tmp_path / "deep.png")
    palette = Image.fromarray(rng.integers(0, 4, (30, 40), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    palette.save(tmp_path / "palette.png", transparency=0)
    write_image(tmp_path / "cmyk.jpg", 1, (40, 30), "CMYK")
    Image.new("L", (1_000_000, 1)).save(tmp_path / "wide.png")
    ours = run_cli("predict", "--run", run, "--format", "json", "--top-k", 2, tmp_path, check=True)
    theirs = run_cli("predict", "--model", model, "--format", "json", "--top-k", 2, tmp_path, check=True)
    skipped = [line for line in theirs.stderr.splitlines() if line.startswith("skipped")]
    assert skipped == [line for line in ours.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "wide.png" in skipped[0] and "extreme aspect ratio" in skipped[0]
    ours, theirs = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert [r["path"] for r in theirs] == [r["path"] for r in ours] and len(ours) == 3
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-4, err_msg=a["path"])
    from dinoprobe.runs.onnx_predict import OnnxClassifier
    from dinoprobe.runs.predict import predict

    for results, errors in (OnnxClassifier(model).predict([tmp_path, tmp_path / "gone.png"]),  # the Python API
                            predict(*_export_inputs(run), [tmp_path, tmp_path / "gone.png"])):
        assert [r["path"] for r in results] == [r["path"] for r in ours]
        assert [path for path, _ in errors] == [str(tmp_path / "gone.png"), str(tmp_path / "wide.png")]
        assert "no such file" in errors[0][1] and "extreme aspect ratio" in errors[1][1]


def test_the_graph_has_one_input_and_its_metadata_round_trips(exports, photos):
    from dinoprobe.runs.onnx_predict import OnnxClassifier
    from dinoprobe.train.headfile import load_head_file

    run, path = exports["mlp48"]
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["pixels"]
    assert [o.name for o in model.graph.output] == ["probabilities", "features"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    head = load_head_file(run)
    clf = OnnxClassifier(path)
    assert clf.class_names == head.class_names and clf.feature == "cls4+patch_mean"
    assert clf.transform == head.fingerprint["transform"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["fingerprint"]) == head.fingerprint
    import torch as torch_module

    assert json.loads(meta["environment"])["packages"]["torch"] == torch_module.__version__  # what wrote the file
    # the features output is the head's input: what dinoprobe's own exported classifier computes
    import torch

    from dinoprobe.runs.export import exported_classifier
    from dinoprobe.runs.predict import backbone_for_head

    image = sorted((photos / "val" / "ants").iterdir())[0]
    pixels = clf.preprocess(image)[None]
    probabilities, features = clf.run(np.concatenate([pixels, pixels]))
    reference = exported_classifier(head, backbone_for_head(head, log=lambda *_: None))
    config = reference.data_config
    normalised = (torch.from_numpy(pixels) - torch.tensor(config.mean).view(1, 3, 1, 1)) / \
        torch.tensor(config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(features[:1], reference.features(normalised).numpy(), atol=1e-4)
        np.testing.assert_allclose(probabilities[:1], reference(normalised).sigmoid().numpy(), atol=1e-5)  # multi-label


def test_predict_with_an_onnx_model_never_imports_torch(exports, photos):
    _, path = exports["linear32"]
    image = sorted((photos / "val" / "bees").iterdir())[0]
    code = ("import sys; from dinoprobe.cli import main; "
            f"main(['predict', '--model', {str(path)!r}, {str(image)!r}], standalone_mode=False); "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "bees" in proc.stdout or "ants" in proc.stdout


def test_onnx_errors_name_the_fix(exports, tmp_path, monkeypatch):
    from dinoprobe.errors import DinoprobeError
    from dinoprobe.runs.onnx_predict import OnnxClassifier

    run, path = exports["linear32"]
    clf = OnnxClassifier(path)
    with pytest.raises(DinoprobeError, match=r"pixels must be \(N, 3, 32, 32\)"):
        clf.run(np.zeros((1, 3, 48, 48), np.float32))  # an image of the wrong size
    stripped = onnx.load(str(path))
    del stripped.metadata_props[:]
    onnx.save(stripped, str(tmp_path / "plain.onnx"))
    with pytest.raises(DinoprobeError, match="not a dinoprobe ONNX export"):
        OnnxClassifier(tmp_path / "plain.onnx")
    assert_clean_error(run_cli("predict", "--model", run / "head.pt", tmp_path), "cannot load")
    for key, value, message in (("transform", lambda v: json.dumps({**json.loads(v), "image_size": 10**6}),
                                 "transform.image_size: 1000000 is greater than the maximum"),
                                ("class_names", lambda v: "[" * 200_000 + "]" * 200_000, "nested too deeply"),
                                ("class_names", lambda v: json.dumps(["ants", 7]), r"class_names\[1\]: 7 is not of")):
        edited = onnx.load(str(path))  # metadata edited by hand, or written by another tool
        for prop in edited.metadata_props:
            prop.value = value(prop.value) if prop.key == key else prop.value
        onnx.save(edited, str(tmp_path / "edited.onnx"))
        with pytest.raises(DinoprobeError, match=message):
            OnnxClassifier(tmp_path / "edited.onnx")
    assert_clean_error(run_cli("predict", "--model", tmp_path / "edited.onnx", tmp_path), "class_names[1]")
    assert run_cli("predict", "--run", run, "--model", path, tmp_path).returncode == 2  # one of the two
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DinoprobeError, match=r"pip install 'dinoprobe\[onnx\]'"):
        OnnxClassifier(path)


def test_a_format_the_file_name_contradicts_is_refused(exports, tmp_path):
    run, _ = exports["linear32"]
    for fmt, name in (("pt", "model.onnx"), ("onnx", "model.pt")):
        proc = run_cli("export", "--run", run, "--out", tmp_path / name, "--format", fmt)
        assert proc.returncode == 2 and "does not match the file name" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_a_full_disk_under_an_export_is_one_line_and_leaves_nothing(exports, tmp_path, fmt):
    """Writes past 1 MiB fail with EFBIG, as on a full disk: torch.save reported it as 'unexpected pos' (a
    traceback), the ONNX exporter's OSError was blamed on the model. torch.onnx.export builds the graph in memory
    (dinoprobe writes the file), so the process's exporter hands back the shared export of the same head instead
    of tracing ViT-S again for 20-40 s; every write is the real one."""
    run, onnx_file = exports["linear32"]
    stand_in = ("import sys, torch\nsys.path.insert(0, 'tests')\nfrom conftest import traced_as\n"
                f"torch.onnx.export = traced_as({str(onnx_file)!r})\n"
                "from dinoprobe.cli import main\nmain(sys.argv[1:], prog_name='dinoprobe')")
    proc = processes.run(["-c", stand_in, "export", "--run", run, "--out", tmp_path / f"model.{fmt}"],
                         file_size_kib=1024)
    assert_clean_error(proc, "File too large", "free disk space")
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary left


def test_the_readmes_onnxruntime_example_runs_verbatim(exports, photos, tmp_path, monkeypatch):
    import re
    import shutil

    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(import json\nimport numpy as np\nimport onnxruntime.*?)```", text, re.S).group(1)
    assert "torch" not in code and "dinoprobe" not in code
    shutil.copy(exports["linear32"][1], tmp_path / "model.onnx")
    shutil.copy(sorted((photos / "val" / "bees").iterdir())[0], tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example


def test_fp16_weights_halve_the_file_and_keep_the_predictions(exports, photos, tmp_path, monkeypatch):
    """The float16 conversion of the shared export of the same head (the exporter's own run, and its notes kept
    off stderr, are tested on that export): half the file, the same labels, and none of the converter's per-weight
    warnings."""
    import warnings

    import torch

    from dinoprobe.runs.export import export_onnx

    run, fp32 = exports["mlp48"]
    head_file, backbone = _export_inputs(run)
    monkeypatch.setattr(torch.onnx, "export", traced_as(fp32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(head_file, backbone, tmp_path / "half.onnx", fp16=True)
    assert [str(w.message) for w in caught if "truncated" in str(w.message)] == []
    assert (tmp_path / "half.onnx").stat().st_size < 0.6 * fp32.stat().st_size
    full = json.loads(run_cli("predict", "--model", fp32, "--format", "json", photos / "val", check=True).stdout)
    half = json.loads(run_cli("predict", "--model", tmp_path / "half.onnx", "--format", "json", photos / "val",
                              check=True).stdout)
    assert [r["labels"] for r in half] == [r["labels"] for r in full] and len(full) == 20
    gap = max(abs(a - b) for x, y in zip(full, half) for a, b in zip(scores(x), scores(y)))
    assert gap < 1e-3  # measured 2.5e-4 on the demo photos at 64 px
    assert run_cli("export", "--run", run, "--out", tmp_path / "x.pt", "--fp16").returncode == 2


def _export_inputs(run):
    from dinoprobe.runs.predict import backbone_for_head
    from dinoprobe.train.headfile import load_head_file

    head_file = load_head_file(run)
    return head_file, backbone_for_head(head_file, None, False)


def test_a_model_past_onnxs_2_gb_is_refused_before_it_is_traced(exports, tmp_path, monkeypatch):
    """ViT-H+ holds 3.4 GB of float32 weights: the export traced it for 85 s, then protobuf's serializer failed with
    a traceback and torch left a 3.4 GB `.data` file beside the target. The limit is scaled down to ViT-S here:
    87 MB of float32 weights, 43 MB as float16."""
    import torch

    from dinoprobe.errors import DinoprobeError
    from dinoprobe.runs import export as export_module

    head_file, backbone = _export_inputs(exports["linear32"][0])
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("traced a model that cannot be written"))
    monkeypatch.setattr(export_module, "ONNX_MAX_BYTES", 60_000_000)
    with pytest.raises(DinoprobeError, match=r"as ONNX is 0\.08\d+ GiB; .* at most 0\.0559 GiB .*: add --fp16 .*--format pt"):
        export_module.export_onnx(head_file, backbone, tmp_path / "m.onnx")
    monkeypatch.setattr(export_module, "ONNX_MAX_BYTES", 30_000_000)  # not even as float16: only the .pt format
    with pytest.raises(DinoprobeError, match=r"0\.04\d+ GiB in float16; .*: export --format pt") as err:
        export_module.export_onnx(head_file, backbone, tmp_path / "m.onnx", fp16=True)
    assert "--fp16" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_the_file_is_checked_against_the_exact_limit_before_it_is_written(exports, tmp_path, monkeypatch):
    """The weights' count is an estimate (the graph and metadata add to it): the serialized model is checked too."""
    import torch

    from dinoprobe.errors import DinoprobeError
    from dinoprobe.runs import export as export_module

    head_file, backbone = _export_inputs(exports["linear32"][0])
    monkeypatch.setattr(torch.onnx, "export", traced_as(exports["linear32"][1]))
    numbers = sum(p.numel() for p in backbone.model.parameters()) + sum(p.numel() for p in head_file.head.parameters())
    monkeypatch.setattr(export_module, "ONNX_MAX_BYTES", 4 * numbers + 100_000)  # past the weights, not the file
    with pytest.raises(DinoprobeError, match="protobuf's limit"):
        export_module.export_onnx(head_file, backbone, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_changes_the_model_is_refused_and_the_old_file_kept(exports, tmp_path, monkeypatch):
    """The file is run by ONNX Runtime before it replaces the target: an exporter that got an op wrong (simulated:
    it hands back the graph with the head's bias shifted) would otherwise ship wrong probabilities without a word."""
    import torch

    from dinoprobe.errors import DinoprobeError
    from dinoprobe.runs import export as export_module

    head_file, backbone = _export_inputs(exports["linear32"][0])
    (tmp_path / "m.onnx").write_bytes(b"the previous export")

    from onnx import numpy_helper

    def shifted_bias(proto):  # the head's last layer's bias
        bias = next(t for t in proto.graph.initializer if t.name == "classifier.head.0.bias")
        values = numpy_helper.to_array(bias).copy()
        values[0] += 3.0
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))

    monkeypatch.setattr(torch.onnx, "export", traced_as(exports["linear32"][1], shifted_bias))
    with pytest.raises(DinoprobeError, match=r"differ from PyTorch's by 0\.\d+ on test pixels .*no file written"):
        export_module.export_onnx(head_file, backbone, tmp_path / "m.onnx", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"the previous export"
    monkeypatch.setattr(torch.onnx, "export", traced_as(exports["linear32"][1]))
    # a graph ONNX Runtime refuses to run: one line, and still nothing written
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad node")))
    with pytest.raises(DinoprobeError, match=r"ONNX Runtime cannot run the exported .*bad node.*no file written"):
        export_module.export_onnx(head_file, backbone, tmp_path / "m.onnx", overwrite=True)
    assert (tmp_path / "m.onnx").read_bytes() == b"the previous export"
