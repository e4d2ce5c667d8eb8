"""One `features` batch under torch.profiler: where the time of the pipeline goes (decode, resize, host-to-device
copies, the forward, the HDF5 write). `python -m bench.profile_features OUT_DIR [--device cuda] [--batch 256]`
writes OUT_DIR/profile.txt (the top operators by self time), OUT_DIR/stages.txt (host and device time inside each
of the pipeline's named stages, `dinoprobe.*` in extract/run.py: which stage the host's time goes to) and
OUT_DIR/profile.json (a Chrome trace)."""
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
        # on the device already, as in the bench: extract() moves a backbone to the device and back, and those
        # ~170 parameter copies (synchronous, pageable) would otherwise fill the profile
        backbone = build_backbone(weights="random", image_size=size, log=lambda *_: None).to(device)
        source = open_source(str(root))
        kw = dict(batch_size=batch, device=device, progress=False, decoder=decoder, precision="auto")
        extract(backbone, source, Path(tmp) / "warm", **kw)  # warm-up: cuDNN, allocator, thread pools
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities, record_shapes=False) as prof:
            extract(backbone, source, Path(tmp) / "profiled", **kw)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    (out / "profile.txt").write_text(table)
    stages = stage_table(prof.key_averages())
    (out / "stages.txt").write_text(stages)
    prof.export_chrome_trace(str(out / "profile.json"))
    click.echo(table)
    click.echo(stages)


def stage_table(averages) -> str:
    """The pipeline's named stages (record_function ranges) and the DataLoader's, with their host time and the
    device time of the kernels they launched: what the host spends per stage, which the operator table cannot say."""
    rows = sorted((a for a in averages if a.key.startswith(("dinoprobe.", "enumerate(DataLoader)"))),
                  key=lambda a: -a.cpu_time_total)
    lines = [f"{'stage':<48} {'calls':>6} {'host ms':>9} {'device ms':>10}"]
    lines += [f"{a.key[:48]:<48} {a.count:>6} {a.cpu_time_total / 1e3:>9.1f} {a.device_time_total / 1e3:>10.1f}"
              for a in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
