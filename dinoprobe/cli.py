"""Command line: parsing and printing only; the work happens in the modules it calls."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dinoprobe import __version__
from dinoprobe.errors import DinoprobeError

# = backbone.DEFAULT_MODEL, repeated so `--help` and usage errors answer without importing torch and timm
DEFAULT_MODEL = "vit_small_patch16_dinov3.lvd1689m"
POSITIVE_INT = click.IntRange(min=1)
PROBABILITY = click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True)
# DINOv3's linear evaluation searches n in {1, 4} last blocks x patch mean off/on
DINOV3_FEATURES = ["cls", "cls4", "cls+patch_mean", "cls4+patch_mean"]
WORKERS_HELP = "DataLoader decoding processes [default: 0 on a CPU with <= 4 cores, else cores/8; GPU: cores-1, max 8]"


class FeatureType(click.ParamType):
    """A `+`-joined feature spec (dinoprobe.features): cls, patch_mean, clsN."""

    name = "feature"

    def convert(self, value, param, ctx):
        from dinoprobe.features import parse_feature

        try:
            parse_feature(value)
        except DinoprobeError as err:
            self.fail(str(err), param, ctx)
        return str(value)


FEATURE_HELP = "cls, patch_mean, clsN (CLS of the last N blocks) joined by '+', e.g. cls4+patch_mean"


class DeviceType(click.ParamType):
    """auto, cpu, cuda, cuda:N or mps: checked here for form, and for availability when used."""

    name = "device"

    def convert(self, value, param, ctx):
        import re

        if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(value)):
            return str(value)
        self.fail(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps", param, ctx)


DEVICE_OPTION = click.option("--device", type=DeviceType(), default="auto", show_default=True,
                             help="auto (a GPU when there is one), cpu, cuda, cuda:N or mps")


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
    import re

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(data.rstrip("/")).name or data).strip("_") or "data"
    tag = weights if weights in ("hub", "random") else "local"
    return f"cache/{name}-{model}-{image_size or 'default'}px-{tag}"


@main.command()
@click.option("--data", required=True,
              help="Image folder (ROOT/train/<class>/*, optional val/ test/), cifar10/cifar100, a .csv/.tsv file list "
                   "(path,label[,split]), a Hugging Face dataset (save_to_disk or Parquet folder, hf:OWNER/NAME"
                   "[:CONFIG]), or WebDataset shards (a folder with train/*.tar..., or 'train=a-{000..009}.tar;val=...')")
@click.option("--image-column", default=None, help="Hugging Face datasets: the image column [default: detected]")
@click.option("--label-column", default=None,
              help="Hugging Face datasets: the label column; tar shards: the label field of .json members "
                   "[default: detected; 'label' in json]")
@click.option("--data-dir", default="data", show_default=True, help="Where CIFAR lives / is downloaded")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="timm model name")
@click.option("--weights", default="hub", show_default=True,
              help="hub | random | PATH (Meta .pth, timm .safetensors/.pth, or Hugging Face folder)")
@click.option("--cache", "cache_dir", default=None, help="Cache folder [default: cache/<data>-<model>-<size>px-<weights>]")
@click.option("--image-size", type=click.IntRange(min=16), default=None, help="Override the model's input size")
@click.option("--batch-size", type=POSITIVE_INT, default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None, help=WORKERS_HELP)
@DEVICE_OPTION
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
@click.option("--views", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Also store K augmented views per train image (for probe/sweep --views)")
@click.option("--augment", type=click.Choice(["timm", "light"]), default="light", show_default=True,
              help="Views: timm's training transform (crop, flip, colour jitter) or light (crop + flip)")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the backbone: ~1 min of compiling for a few % more images/s (long runs only)")
@click.option("--last-blocks", type=click.IntRange(0), default=4, show_default=True,
              help="Also store the CLS token of each of the last N blocks (for --feature clsN, DINOv3's linear eval)")
@click.option("--transform", type=click.Choice(["timm", "dinov3"]), default="timm", show_default=True,
              help="timm: the model's timm data config; dinov3: DINOv3's eval transform (resize to size*256/224 "
                   "bicubic on uint8 tensors, centre crop, ImageNet mean/std)")
@click.option("--decoder", type=click.Choice(["pil", "torchvision"]), default="pil", show_default=True,
              help="JPEG decoding: pil = timm's reference transform; torchvision = decode_jpeg + tensor resize "
                   "(faster; on the GPU with nvJPEG when extracting on CUDA)")
def features(data, image_column, label_column, data_dir, model, weights, cache_dir, image_size, batch_size, workers, device, precision, dtype,
             shard_size, val_fraction, max_pixels, strict, overwrite, views, augment, compile_, last_blocks, transform,
             decoder):
    """Run the frozen backbone once over every split and cache the features (resumable)."""
    from dinoprobe.backbone import build_backbone
    from dinoprobe.data import open_source
    from dinoprobe.extract import extract

    import os

    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    say = _echo_err if main_process else (lambda *_: None)
    cache_dir = cache_dir or default_cache_dir(data, model, image_size, weights)
    source = open_source(data, data_dir, val_fraction, image_column=image_column, label_column=label_column)
    if precision == "fp16" and "dinov3" in model:
        say("WARNING: DINOv3's authors say it does not support fp16 (activations overflow); use --precision bf16 "
            "(or auto: bf16 on CUDA)")
    backbone = build_backbone(model, weights, image_size, log=say, transform=transform)
    counts = ", ".join(f"{s} {len(v)}" for s, v in source.splits.items())
    say(f"{source.kind} {source.root}: {len(source.classes)} classes; {counts} inputs -> {cache_dir}")
    try:
        summary = extract(backbone, source, cache_dir, batch_size=batch_size, workers=workers, device=device,
                          precision=precision, dtype=dtype, shard_size=shard_size, strict=strict,
                          overwrite=overwrite, max_pixels=max_pixels, compile=compile_, views=views,
                          augment=augment, decoder=decoder, last_blocks=last_blocks)
    except KeyboardInterrupt:
        _echo_err(f"\nInterrupted. Complete shards in {cache_dir} are kept; the shard in progress was discarded. "
                  "Rerun the same command to resume.")
        sys.exit(130)
    if not main_process:
        return
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
    few = metrics.get("few_shot")
    if few:
        click.echo(f"few-shot: {few['shots']} per class, {few['tries']} tries; the run's head and the metrics "
                   "below are try 0's")
        if few.get("short_classes"):
            click.echo(f"  classes with fewer training images keep all of them: {few['short_classes']}")
        for split in ("val", "test"):
            if split in few:
                click.echo(f"  {split}: top-1 {few[split]['top1_mean']:.4f} ± {few[split]['top1_std']:.4f} "
                           f"(mean ± std over tries)")
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            top5 = f", top-5 {m['top5']:.4f}" if "top5" in m else ""
            click.echo(f"{split}: top-1 {m['top1']:.4f}{top5}, balanced {m['balanced_accuracy']:.4f} (n={m['n']})")
    if "best_epoch" in metrics:
        click.echo(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}")
    click.echo(f"run saved to {out}")


def _size(value: str | None) -> int | None:
    if value is None:
        return None
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}
    text = value.strip().lower()
    number = text.rstrip("kmgb")
    try:
        return int(float(number) * units[text[len(number):]])
    except (ValueError, KeyError):
        raise click.BadParameter(f"{value!r} is not a size like 512MB or 4GB") from None


def _check_shots(ctx, param, value):
    if value is None:
        return None
    from dinoprobe.fewshot import parse_shots

    try:
        parse_shots(value)
    except DinoprobeError as err:
        raise click.BadParameter(str(err)) from None
    return value


def _run_options(command):
    """--cache, --out, --overwrite, --shots and --tries: every training command reads a cache, can train on few
    images per class, and writes a run directory."""
    command = click.option("--tries", type=POSITIVE_INT, default=5, show_default=True,
                           help="With --shots: draws of the training images (try t is seeded by t)")(command)
    command = click.option("--shots", callback=_check_shots, default=None,
                           help="Few-shot: train on K images per class (e.g. 5) or a percentage of each class "
                                "(e.g. 1%); val and test stay whole")(command)
    command = click.option("--overwrite", is_flag=True, help="Replace an existing run directory")(command)
    command = click.option("--out", required=True, type=click.Path(file_okay=False),
                           help="Run directory to write (refused if it exists, unless --overwrite)")(command)
    return click.option("--cache", "cache_dir", required=True, type=click.Path(),
                        help="Feature cache from `dinoprobe features`")(command)


@main.command()
@_run_options
@click.option("--feature", type=FeatureType(), default="cls", show_default=True, help=FEATURE_HELP)
@click.option("--normalize", type=click.Choice(["none", "standardize", "l2"]), default="none", show_default=True,
              help="Feature normalisation (statistics from train, stored with the head)")
@click.option("--head", type=click.Choice(["mlp", "linear"]), default="mlp", show_default=True)
@click.option("--hidden", type=POSITIVE_INT, default=256, show_default=True, help="MLP hidden width")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default="adam", show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=0.9, show_default=True, help="SGD only")
@click.option("--nesterov", is_flag=True, help="SGD only: Nesterov momentum")
@click.option("--batch-size", type=POSITIVE_INT, default=256, show_default=True)
@click.option("--epochs", type=POSITIVE_INT, default=100, show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(0), default=0, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--patience", type=POSITIVE_INT, default=None, help="Stop after this many epochs without a better val accuracy")
@click.option("--views", is_flag=True, help="Train on one cached augmented view per image per epoch (features --views K)")
@click.option("--max-memory", default=None,
              help="Memory budget for train features, e.g. 8GB; a larger cache is streamed from disk")
@DEVICE_OPTION
def probe(cache_dir, out, overwrite, shots, tries, feature, views, max_memory, device, **params):
    """Train a linear or MLP head on cached features, keep the best on val, report test."""
    from dinoprobe.device import resolve_device
    from dinoprobe.estimators import Probe
    from dinoprobe.runs import check_run_dir, run_directory, write_probe_run
    from dinoprobe.tensors import load_cache

    check_run_dir(Path(out), overwrite)
    estimator = Probe(**params, shots=shots, tries=tries, device=device, progress=True)
    estimator.train_config()  # bad combinations fail here, before the cache is read
    data = load_cache(cache_dir, feature, resolve_device(device), views=views, max_memory=_size(max_memory))
    estimator.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
    with run_directory(out, overwrite) as tmp:
        metrics = write_probe_run(tmp, estimator, data)
    _print_metrics(metrics, out)


# ---------------------------------------------------------------------------------------------------- predict
@main.command()
@click.option("--run", "head_path", required=True, type=click.Path(), help="RUN_DIR (or RUN_DIR/head.pt)")
@click.option("--weights", default=None, help="Backbone weights [default: those recorded in the head file]")
@click.option("--allow-weights-mismatch", is_flag=True, help="Use weights whose sha256 differs from training's")
@click.option("--top-k", "topk", type=POSITIVE_INT, default=5, show_default=True, help="Labels per image")
@click.option("--batch-size", type=POSITIVE_INT, default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None, help=WORKERS_HELP)
@DEVICE_OPTION
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
@click.option("--run", "head_path", required=True, type=click.Path(), help="RUN_DIR (or RUN_DIR/head.pt)")
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


# ------------------------------------------------------------------------------------------------------ sweep
def _is_feature(value: str) -> bool:
    from dinoprobe.features import parse_feature

    try:
        parse_feature(value)
        return True
    except DinoprobeError:
        return False


def _comma_list(kind, choices=None, check=None, what=""):
    """A click callback parsing `a,b,c` into a validated list (usage error, exit 2, on a bad value)."""
    def callback(ctx, param, value):
        if value is None:
            return None
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            raise click.BadParameter("empty list")
        try:
            parsed = [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__}s") from None
        for v in parsed:
            if choices and v not in choices:
                raise click.BadParameter(f"{v!r} is not one of {', '.join(choices)}")
            if check and not check(v):
                raise click.BadParameter(f"{v!r} is out of range ({what})")
        return parsed
    return callback


@main.command()
@_run_options
@click.option("--preset", type=click.Choice(["dinov3-linear"]), default=None,
              help="DINOv3 linear eval: 13 lrs 1e-5..0.1 x batch/256, SGD momentum 0.9, cosine, linear head")
@click.option("--feature", callback=_comma_list(str, check=_is_feature, what=FEATURE_HELP),
              help="e.g. cls,cls4+patch_mean [default: cls; with --preset dinov3-linear: " + ",".join(DINOV3_FEATURES)
                   + "]")
@click.option("--head", callback=_comma_list(str, ("linear", "mlp")), help="e.g. linear,mlp")
@click.option("--lr", callback=_comma_list(float, check=lambda v: v > 0, what="> 0"), help="e.g. 1e-4,1e-3,1e-2")
@click.option("--weight-decay", callback=_comma_list(float, check=lambda v: v >= 0, what=">= 0"))
@click.option("--hidden", callback=_comma_list(int, check=lambda v: v >= 1, what=">= 1"))
@click.option("--dropout", callback=_comma_list(float, check=lambda v: 0 <= v < 1, what="[0, 1)"))
@click.option("--optimizer", callback=_comma_list(str, ("adam", "adamw", "sgd")))
@click.option("--momentum", callback=_comma_list(float, check=lambda v: 0 <= v < 1, what="[0, 1)"))
@click.option("--label-smoothing", callback=_comma_list(float, check=lambda v: 0 <= v < 1, what="[0, 1)"))
@click.option("--normalize", callback=_comma_list(str, ("none", "standardize", "l2")))
@click.option("--epochs", callback=_comma_list(int, check=lambda v: v >= 1, what=">= 1"))
@click.option("--batch-size", callback=_comma_list(int, check=lambda v: v >= 1, what=">= 1"))
@click.option("--seed", callback=_comma_list(int, check=lambda v: v >= 0, what=">= 0"))
@click.option("--warmup-epochs", callback=_comma_list(int, check=lambda v: v >= 0, what=">= 0"))
@click.option("--patience", type=POSITIVE_INT, default=None)
@click.option("--views", is_flag=True, help="Sample one cached augmented view per image per epoch")
@click.option("--max-memory", default=None,
              help="Memory budget, e.g. 2GB: groups are split to fit it, and train features above it stream from disk")
@DEVICE_OPTION
@click.option("--show", type=POSITIVE_INT, default=10, show_default=True, help="Rows of the table printed at the end")
def sweep(cache_dir, out, overwrite, shots, tries, preset, feature, patience, views, max_memory, device, show,
          **lists):
    """Train a grid of heads side by side (one batched model per group) and keep the best on val.

    Every option takes a comma-separated list; options with several values form the grid."""
    from dinoprobe.device import resolve_device
    from dinoprobe.estimators import Sweep
    from dinoprobe.report import RESULT_FIELDS, plot_sweep, ranked, varying_params, write_results
    from dinoprobe.runs import check_run_dir, run_directory, write_probe_run
    from dinoprobe.tensors import load_features

    check_run_dir(Path(out), overwrite)
    base = {k: v[0] for k, v in lists.items() if v is not None and len(v) == 1}
    grid = {k: v for k, v in lists.items() if v is not None and len(v) > 1}
    budget = _size(max_memory)
    feature = feature or (DINOV3_FEATURES if preset == "dinov3-linear" else ["cls"])
    searches = [Sweep(param_grid=grid, preset=preset, **base, patience=patience, shots=shots, tries=tries,
                      device=device, max_memory=budget, progress=True) for _ in feature]
    searches[0].configurations()  # a bad grid fails here, before the cache is read
    loaded = load_features(cache_dir, feature, resolve_device(device), views=views, max_memory=budget)
    rows, best = [], None
    for search, (name, data) in zip(searches, loaded.items()):
        search.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
        rows += [{"feature": name, **cfg.to_dict(), **{k: r[k] for k in RESULT_FIELDS if k in r}}
                 for cfg, r in zip(search.configs_, search.results_)]
        if best is None or search.best_score_ > best[0].best_score_:
            best = (search, data)
    rows = ranked(rows)
    with run_directory(out, overwrite) as tmp:
        write_results(tmp, rows)
        plot_sweep(rows, tmp / "sweep.png")
        (tmp / "best").mkdir()
        metrics = write_probe_run(tmp / "best", best[0].best_estimator_, best[1], {"sweep": str(out)})
    columns = varying_params(rows) + ["best_epoch", "val_top1"]
    click.echo("  ".join(f"{c:>12}" for c in columns))
    for row in rows[:show]:
        click.echo("  ".join(f"{row[c]:>12.4g}" if isinstance(row[c], float) else f"{str(row[c]):>12}"
                             for c in columns))
    seconds = sum({(r["feature"], r["group"]): r["group_seconds"] for r in rows}.values())
    click.echo(f"{len(rows)} configs trained in {seconds:.1f} s; results in {out}/results.csv, plot {out}/sweep.png")
    _print_metrics(metrics, Path(out) / "best")


# -------------------------------------------------------------------------------------------------- baselines
@main.command()
@_run_options
@click.option("--feature", type=FeatureType(), default="cls", show_default=True, help=FEATURE_HELP)
@click.option("--normalize", type=click.Choice(["none", "standardize", "l2"]), default="standardize",
              show_default=True)
@click.option("--c-grid", callback=_comma_list(float, check=lambda v: v > 0, what="> 0"), default=None,
              help="Comma list of C values [default: 10**linspace(-6, 5, 45)]")
@click.option("--solver", type=click.Choice(["torch", "sklearn"]), default="torch", show_default=True,
              help="torch: batched L-BFGS over all C at once; sklearn: the reference, one fit per C")
@click.option("--max-iter", type=POSITIVE_INT, default=1000, show_default=True)
@DEVICE_OPTION
def logreg(cache_dir, out, overwrite, shots, tries, feature, normalize, c_grid, solver, max_iter, device):
    """DINOv3's logistic-regression protocol: C chosen on val, refit on train+val, scored on test."""
    import time

    import numpy as np

    from dinoprobe.device import resolve_device
    from dinoprobe.estimators import LogReg
    from dinoprobe.metrics import classification_metrics
    from dinoprobe.runs import check_run_dir, evaluate, few_shot_metrics, run_directory, write_run_files
    from dinoprobe.tensors import load_cache

    check_run_dir(Path(out), overwrite)
    data = load_cache(cache_dir, feature, resolve_device(device), require_val=False)
    start = time.perf_counter()
    estimator = LogReg(Cs=c_grid, normalize=normalize, max_iter=max_iter, solver=solver, shots=shots, tries=tries,
                       device=device)
    estimator.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
    seconds = time.perf_counter() - start
    def selection_scores(fitted, d):  # the train-only model at the chosen C (the refit has seen val)
        scores = np.zeros((len(d.X_val), d.num_classes))
        scores[:, fitted.classes_] = fitted.selection_predict_proba(d.X_val)
        return scores

    metrics = evaluate(estimator, data, ("test",))
    if data.X_val is not None:
        metrics["val"] = classification_metrics(selection_scores(estimator, data), data.y_val, data.classes)
    few_shot = few_shot_metrics(estimator, data, selection_scores if data.X_val is not None else None)
    if few_shot:
        metrics["few_shot"] = few_shot
    best = estimator.val_score_per_C_[estimator.Cs_.index(estimator.best_C_)]
    metrics.update({"best_c": estimator.best_C_, "c_grid": estimator.Cs_,
                    "val_accuracy_per_c": estimator.val_score_per_C_})
    config = {"method": "logreg", "feature": feature, "normalize": normalize, "solver": solver, "max_iter": max_iter}
    with run_directory(out, overwrite) as tmp:
        estimator.save(tmp / "head.pt", data, data.classes)
        write_run_files(tmp, metrics, data, config, {"fit_seconds": round(seconds, 3)})
    click.echo(f"best C {estimator.best_C_:.3g} (val top-1 {best:.4f} of {len(estimator.Cs_)} values) in "
               f"{seconds:.1f} s")
    _print_metrics(metrics, f"{out} (head.pt is a linear head usable by predict)")


@main.command()
@_run_options
@click.option("--feature", type=FeatureType(), default="cls", show_default=True, help=FEATURE_HELP)
@click.option("--k", "ks", callback=_comma_list(int, check=lambda v: v >= 1, what=">= 1"), default="10,20,100,200",
              show_default=True, help="Neighbour counts to choose from on val")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.07, show_default=True)
@DEVICE_OPTION
def knn(cache_dir, out, overwrite, shots, tries, feature, ks, temperature, device):
    """Weighted k-NN on L2-normalised features (DINO's protocol); k chosen on val."""
    from dinoprobe.device import resolve_device
    from dinoprobe.estimators import KNN
    from dinoprobe.runs import check_run_dir, evaluate, few_shot_metrics, run_directory, write_run_files
    from dinoprobe.tensors import load_cache

    check_run_dir(Path(out), overwrite)
    data = load_cache(cache_dir, feature, resolve_device(device))
    estimator = KNN(ks=tuple(ks), temperature=temperature, shots=shots, tries=tries, device=device)
    estimator.fit(data.X_train, data.y_train, X_val=data.X_val, y_val=data.y_val)
    per_k = {"val": estimator.val_score_per_k_}
    if data.X_test is not None:
        per_k["test"] = estimator.score_per_k(data.X_test, data.y_test)
    metrics = {**evaluate(estimator, data), "k": estimator.best_k_, "temperature": temperature, "top1_per_k": per_k}
    few_shot = few_shot_metrics(estimator, data)
    if few_shot:
        metrics["few_shot"] = few_shot
    with run_directory(out, overwrite) as tmp:
        write_run_files(tmp, metrics, data, {"method": "knn", "feature": feature, "k": list(ks),
                                             "temperature": temperature})
    for split, accs in per_k.items():
        click.echo(f"{split}: " + ", ".join(f"k={k} {a:.4f}" for k, a in accs.items()))
    click.echo(f"chosen k={estimator.best_k_}")
    _print_metrics(metrics, out)


# ------------------------------------------------------------------------------------------------------ bench
@main.command()
@click.option("--scale", type=click.Choice(["small", "full", "smoke"]), default="small", show_default=True,
              help="small: under ~3 minutes on 2 CPU cores; full: the long measurements; smoke: seconds, toy "
                   "sizes, checks that the benchmark runs (its figures mean nothing)")
@click.option("--out", default="bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--data", "data_root", default=None, type=click.Path(),
              help="Folder of JPEGs in train/<class>/ [default: 70 photograph-like JPEGs generated for the run]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--readme", default=None, type=click.Path(dir_okay=False),
              help="Also replace the table between <!-- bench:start/end --> in this README")
def bench(scale, out, data_root, device, readme):
    """Measure this machine and dinoprobe on it: bench/results.json + a Markdown table."""
    from dinoprobe import bench as bench_mod

    results = bench_mod.run(scale, Path(out), Path(data_root) if data_root else None, device, log=_echo_err)
    table = bench_mod.markdown(results)
    click.echo(table)
    if readme:
        bench_mod.update_readme(Path(readme), table)
    click.echo(f"wrote {out}/results.json and {out}/results.md")


if __name__ == "__main__":
    main()
