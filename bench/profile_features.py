"""One `features` batch under torch.profiler: where the time of the pipeline goes (decode, resize, host-to-device
copies, the forward, the HDF5 write). `python -m bench.profile_features OUT_DIR [--device cuda] [--batch 256]`
writes OUT_DIR/profile.txt (the top operators by self time) and OUT_DIR/profile.json (a Chrome trace)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--batch", type=int, default=256, show_default=True)
@click.option("--size", type=int, default=256, show_default=True)
@click.option("--decoder", type=click.Choice(["pil", "torchvision"]), default="pil", show_default=True)
def main(out, device, batch, size, decoder):
    from torch.profiler import ProfilerActivity, profile

    from bench.sample_images import make_jpeg_folder
    from dinoprobe.extract.backbone import build_backbone
    from dinoprobe.extract.run import extract
    from dinoprobe.extract.sources import open_source

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dinoprobe-profile-") as tmp:
        per_class = max(2, batch // 2)
        root = make_jpeg_folder(Path(tmp) / "jpegs", counts={"train": per_class, "val": 1}, sizes=(300, 500))
        backbone = build_backbone(weights="random", image_size=size, log=lambda *_: None)
        source = open_source(str(root))
        kw = dict(batch_size=batch, device=device, progress=False, decoder=decoder, precision="auto")
        extract(backbone, source, Path(tmp) / "warm", **kw)  # warm-up: cuDNN, allocator, thread pools
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities, record_shapes=False) as prof:
            extract(backbone, source, Path(tmp) / "profiled", **kw)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    (out / "profile.txt").write_text(table)
    prof.export_chrome_trace(str(out / "profile.json"))
    click.echo(table)


if __name__ == "__main__":
    main()
