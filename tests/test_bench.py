"""`dinoprobe bench` at toy sizes: every section runs and lands in results.json, the table and the README.

CI never runs `make bench` (it takes minutes); this keeps the benchmark from rotting between runs.
"""
import json
import math
import os
from pathlib import Path

from bench import benchmark as bench


def test_smoke_bench_runs_every_section_and_updates_the_readme(tmp_path, exports, monkeypatch):
    """With no photos given, the bench makes its own (as on a bare GPU machine). Its ONNX section runs the export
    command with the tracing (20-40 s of ViT-S here, tested in test_onnx) handed the suite's export of a linear head
    at the same size, and without the check that the file gives the run's probabilities (it is another run's head)."""
    import torch

    from dinoprobe.runs import export

    from conftest import traced_as

    monkeypatch.setattr(torch.onnx, "export", traced_as(exports["linear32"][1]))
    monkeypatch.setattr(export, "check_onnx_agrees", lambda *args: None)
    results = bench.run("smoke", tmp_path / "out", None, device="cpu", log=lambda *_: None)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["scale"] == "smoke" and set(saved["section_seconds"]) == {
        "roofline_forward", "pipeline", "original_vs_dinoprobe", "heads", "onnx", "transformers"}
    pipeline, heads = saved["pipeline"], saved["heads"]
    figures = [saved["forward"]["images_per_s"], pipeline["jpeg_images_per_s"],
               pipeline["jpeg_torchvision_images_per_s"], pipeline["arrays_images_per_s"],
               pipeline["decode_only"]["torchvision_images_per_s"], pipeline["processes"]["1"],
               pipeline["processes"]["2"], pipeline["jpeg_torchvision_workers_images_per_s"],
               pipeline["arrays_long_images_per_s"], heads["graph_s"], heads["graph_eager_s"], heads["linear_s"],
               heads["linear_plain_s"], heads["linear_vs_plain"],
               heads["sweep_speedup"], heads["logreg_speedup"], saved["onnx"]["onnx_images_per_s"],
               saved["onnx"]["predict_images_per_s"], heads["metrics_speedup"], heads["multilabel_speedup"]]
    figures += [row["speedup"] for row in saved["original_vs_dinoprobe"]]
    assert all(math.isfinite(f) and f > 0 for f in figures), figures

    table = (tmp_path / "out" / "results.md").read_text()
    assert table == bench.markdown(results)
    for row in ("bare backbone forward", "--decoder torchvision", "torchrun", "original method, 2 epochs",
                "plain PyTorch loop", "--last-blocks 0", "`Sweep`", "separate `Probe` fits", "logreg", "transformers",
                "ONNX Runtime", "--decode-on workers", "4x as many arrays",
                "step by step", "a run's metrics", "a multi-label run's scoring"):
        assert row in table, row
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- bench:start -->\nold table\n<!-- bench:end -->\nafter\n")
    bench.update_readme(readme, table)
    text = readme.read_text()
    assert "old table" not in text and table in text
    assert text.startswith("# title\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\nafter\n")


def test_the_features_profile_runs_and_writes_its_summary(tmp_path):
    """bench/gpu.sh profiles one features pass on the GPU; the same script runs here on the CPU."""
    from click.testing import CliRunner

    from bench.profile_features import main

    result = CliRunner().invoke(main, [str(tmp_path), "--device", "cpu", "--batch", "4", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "aten::" in (tmp_path / "profile.txt").read_text() and (tmp_path / "profile.json").stat().st_size > 0
    stages = (tmp_path / "stages.txt").read_text()  # the host's time per named stage of the pipeline
    assert all(f"dinoprobe.{stage}" in stages for stage in ("forward", "store", "wait_for_features")), stages


def test_the_demo_photo_writer_never_writes_into_a_folder_that_holds_files(tmp_path):
    """`python -m bench.sample_images FOLDER` (the README's "no images at hand?") writes 70 JPEGs into a new
    folder; a folder that already holds files (a user's photos named 00000.jpg...) is refused untouched, and
    --help is help, not a folder named '--help'."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]

    def sample(*args):
        return subprocess.run([sys.executable, "-m", "bench.sample_images", *map(str, args)], capture_output=True,
                              text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=120)

    made = sample(tmp_path / "demo")
    assert made.returncode == 0 and len(list((tmp_path / "demo").rglob("*.jpg"))) == 70
    mine = tmp_path / "mine" / "train" / "ants" / "00000.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own photo")
    refused = sample(tmp_path / "mine")
    assert refused.returncode != 0 and "not an empty folder" in refused.stderr and "Traceback" not in refused.stderr
    assert mine.read_bytes() == b"my own photo" and len(list((tmp_path / "mine").rglob("*"))) == 3
    helped = sample("--help")
    assert helped.returncode == 0 and "FOLDER" in helped.stdout.upper() and not (tmp_path / "--help").exists()
