"""Command line: parsing and printing only; the work happens in the modules it calls."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dinoprobe import __version__
from dinoprobe.errors import DinoprobeError

DEFAULT_MODEL = "vit_small_patch16_dinov3.lvd1689m"
POSITIVE_INT = click.IntRange(min=1)
PROBABILITY = click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True)


class Group(click.Group):
    """Turns DinoprobeError into a one-line `Error: ...` with exit code 1 (click's usage errors exit 2)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DinoprobeError as err:
            raise click.ClickException(str(err)) from None


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dinoprobe")
def main():
    """Frozen DINOv3 backbone -> cached features -> heads trained in seconds."""


# ------------------------------------------------------------------------------------------------------- info
@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="timm model name")
@click.option("--weights", default=None, help="Optional: hub, random or PATH, to load and fingerprint them too")
@click.option("--image-size", type=POSITIVE_INT, default=224, show_default=True, help="Image size for token/FLOP counts")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table")
def info(model, weights, image_size, as_json):
    """Model facts: parameters, width, depth, heads, tokens, data config and measured FLOPs per image."""
    from dinoprobe.backbone import build_backbone, model_facts

    backbone = build_backbone(model, weights or "random", image_size, log=_echo_err if weights else (lambda *_: None))
    facts = model_facts(backbone)
    if not weights:
        facts["weights"] = "not loaded (architecture only; pass --weights to fingerprint a checkpoint)"
    if as_json:
        click.echo(json.dumps(facts, indent=1))
        return
    cfg = facts["data_config"]
    rows = [
        ("model", facts["model"]),
        ("weights", facts["weights"] if isinstance(facts["weights"], str)
         else f"{facts['weights']['source']} {facts['weights']['location']} sha256={facts['weights']['sha256'][:16]}…"),
        ("parameters", f"{facts['parameters']:,} ({facts['trainable_parameters']:,} trainable: frozen)"),
        ("width (hidden size)", facts["width"]), ("depth (layers)", facts["depth"]),
        ("attention heads", facts["heads"]), ("MLP width", facts["mlp_width"]),
        ("patch size", facts["patch_size"]), ("register tokens", facts["register_tokens"]),
        (f"tokens at {image_size} px", f"{facts['tokens']} = {facts['patch_tokens']} patches + 1 CLS + "
                                       f"{facts['register_tokens']} registers"),
        ("FLOPs per image", f"{facts['flops_per_image'] / 1e9:.2f} GFLOP (torch.utils.flop_counter; fused "
                            "attention kernels are not counted)"),
        ("data config", f"input {cfg['image_size']} px, resize {cfg['resize_size']} ({cfg['interpolation']}), "
                        f"crop_pct {cfg['crop_pct']}, mean {cfg['mean']}, std {cfg['std']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


# --------------------------------------------------------------------------------------------------- features
def default_cache_dir(data: str, model: str, image_size: int | None, weights: str) -> str:
    name = Path(data.rstrip("/")).name or data
    tag = weights if weights in ("hub", "random") else "local"
    return f"cache/{name}-{model}-{image_size or 'default'}px-{tag}"


@main.command()
@click.option("--data", required=True, help="Image folder (ROOT/train/<class>/*, optional val/ test/) or cifar10/cifar100")
@click.option("--data-dir", default="data", show_default=True, help="Where CIFAR lives / is downloaded")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="timm model name")
@click.option("--weights", default="hub", show_default=True,
              help="hub | random | PATH (Meta .pth, timm .safetensors/.pth, or Hugging Face folder)")
@click.option("--cache", "cache_dir", default=None, help="Cache folder [default: cache/<data>-<model>-<size>px-<weights>]")
@click.option("--image-size", type=click.IntRange(min=16), default=None, help="Override the model's input size")
@click.option("--batch-size", type=POSITIVE_INT, default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader processes")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto = bf16 autocast on CUDA, fp32 on CPU")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of features on disk")
@click.option("--shard-size", type=POSITIVE_INT, default=4096, show_default=True, help="Rows per shard")
@click.option("--val-fraction", type=PROBABILITY, default=0.1, show_default=True,
              help="Validation fraction carved from train when there is no val/ (stratified, seed 0)")
@click.option("--max-pixels", type=POSITIVE_INT, default=89_478_485, show_default=True,
              help="Skip images larger than this (decompression-bomb guard)")
@click.option("--strict", is_flag=True, help="Fail on the first unreadable image instead of skipping it")
@click.option("--overwrite", is_flag=True, help="Rebuild the cache even if it exists with another fingerprint")
def features(data, data_dir, model, weights, cache_dir, image_size, batch_size, workers, device, precision, dtype,
             shard_size, val_fraction, max_pixels, strict, overwrite):
    """Run the frozen backbone once over every split and cache the features (resumable)."""
    from dinoprobe.backbone import build_backbone
    from dinoprobe.data import open_source
    from dinoprobe.extract import extract

    cache_dir = cache_dir or default_cache_dir(data, model, image_size, weights)
    source = open_source(data, data_dir, val_fraction)
    backbone = build_backbone(model, weights, image_size, log=_echo_err)
    counts = ", ".join(f"{s} {len(v)}" for s, v in source.splits.items())
    _echo_err(f"{source.kind} {source.root}: {len(source.classes)} classes; {counts} inputs -> {cache_dir}")
    try:
        summary = extract(backbone, source, cache_dir, batch_size=batch_size, workers=workers, device=device,
                          precision=precision, dtype=dtype, shard_size=shard_size, strict=strict,
                          overwrite=overwrite, max_pixels=max_pixels)
    except KeyboardInterrupt:
        _echo_err(f"\nInterrupted. Complete shards in {cache_dir} are kept; the shard in progress was discarded. "
                  "Rerun the same command to resume.")
        sys.exit(130)
    rows = ", ".join(f"{s} {n}" for s, n in summary.rows.items())
    skipped = sum(summary.skipped.values())
    click.echo(f"cache {cache_dir}: {rows} rows; {skipped} skipped input(s)"
               + (" (listed in manifest.json)" if skipped else "")
               + f"; {summary.computed} computed in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s)")


# ------------------------------------------------------------------------------------------------------ cache
@main.group(cls=Group)
def cache():
    """Inspect and check feature caches."""


@cache.command("verify")
@click.argument("cache_dir", type=click.Path(file_okay=False))
def cache_verify(cache_dir):
    """Re-check row counts and sha256 of every shard; exit 1 if anything is wrong."""
    from dinoprobe.cache import read_manifest, verify

    problems = verify(cache_dir)
    if problems:
        for problem in problems:
            _echo_err(f"problem: {problem}")
        raise DinoprobeError(f"{len(problems)} problem(s) in {cache_dir}")
    manifest = read_manifest(cache_dir)
    rows = ", ".join(f"{s} {sum(x['rows'] for x in v['shards'])}" for s, v in manifest["splits"].items())
    click.echo(f"ok: {cache_dir} ({manifest['fingerprint']['model']}, {len(manifest['classes'])} classes; {rows} rows)")


# ------------------------------------------------------------------------------------------------------ probe
def _print_metrics(metrics: dict, out) -> None:
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            top5 = f", top-5 {m['top5']:.4f}" if "top5" in m else ""
            click.echo(f"{split}: top-1 {m['top1']:.4f}{top5}, balanced {m['balanced_accuracy']:.4f} (n={m['n']})")
    click.echo(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}; run saved to {out}")


@main.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(), help="Feature cache from `dinoprobe features`")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write")
@click.option("--feature", type=click.Choice(["cls", "patch_mean", "cls+patch_mean"]), default="cls", show_default=True)
@click.option("--normalize", type=click.Choice(["none", "standardize", "l2"]), default="none", show_default=True,
              help="Feature normalisation (statistics from train, stored with the head)")
@click.option("--head", type=click.Choice(["mlp", "linear"]), default="mlp", show_default=True)
@click.option("--hidden", type=POSITIVE_INT, default=256, show_default=True, help="MLP hidden width")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default="adam", show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True, help="SGD only")
@click.option("--batch-size", type=POSITIVE_INT, default=256, show_default=True)
@click.option("--epochs", type=POSITIVE_INT, default=100, show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(0), default=0, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--patience", type=POSITIVE_INT, default=None, help="Stop after this many epochs without a better val accuracy")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def probe(cache_dir, out, device, **options):
    """Train a linear or MLP head on cached features, keep the best on val, report test."""
    from dinoprobe.probe import run_probe
    from dinoprobe.train import TrainConfig

    cfg = TrainConfig(**options)
    metrics = run_probe(cache_dir, out, cfg, device=device)
    _print_metrics(metrics, out)


# ---------------------------------------------------------------------------------------------------- predict
@main.command()
@click.option("--head", "head_path", required=True, type=click.Path(), help="RUN_DIR/head.pt (or RUN_DIR)")
@click.option("--weights", default=None, help="Backbone weights [default: those recorded in the head file]")
@click.option("--allow-weights-mismatch", is_flag=True, help="Use weights whose sha256 differs from training's")
@click.option("--topk", type=POSITIVE_INT, default=5, show_default=True)
@click.option("--batch-size", type=POSITIVE_INT, default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def predict(head_path, weights, allow_weights_mismatch, topk, batch_size, workers, device, fmt, paths):
    """Top-k labels for image files and folders (recursively) with a trained head."""
    from dinoprobe.predict import backbone_for_head, predict as run_predict
    from dinoprobe.runs import load_head_file

    head_file = load_head_file(head_path)
    backbone = backbone_for_head(head_file, weights, allow_weights_mismatch, log=_echo_err)
    results, errors = run_predict(head_file, backbone, paths, topk, batch_size, workers, device)
    for path, reason in errors:
        _echo_err(f"skipped {path}: {reason}")
    if fmt == "json":
        click.echo(json.dumps(results, indent=1, ensure_ascii=False))
    elif fmt == "csv":
        import csv

        k = max((len(r["labels"]) for r in results), default=topk)
        writer = csv.writer(sys.stdout)
        writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "probability")])
        for r in results:
            writer.writerow([r["path"]] + [v for pair in zip(r["labels"], r["probabilities"]) for v in pair])
    else:
        width = max((len(r["path"]) for r in results), default=4)
        for r in results:
            labels = "  ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probabilities"]))
            click.echo(f"{r['path']:<{width}}  {labels}")
    if not results and errors:
        raise DinoprobeError("no input could be read")


@main.command()
@click.option("--head", "head_path", required=True, type=click.Path(), help="RUN_DIR/head.pt (or RUN_DIR)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write, e.g. model.pt")
@click.option("--weights", default=None, help="Backbone weights [default: those recorded in the head file]")
@click.option("--allow-weights-mismatch", is_flag=True)
def export(head_path, out, weights, allow_weights_mismatch):
    """Write backbone + head as one self-contained file (weights_only-loadable)."""
    from dinoprobe.predict import backbone_for_head, export as run_export
    from dinoprobe.runs import load_head_file

    head_file = load_head_file(head_path)
    backbone = backbone_for_head(head_file, weights, allow_weights_mismatch, log=_echo_err)
    path = run_export(head_file, backbone, out)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); load with "
               "dinoprobe.predict.load_exported(path)")


if __name__ == "__main__":
    main()
