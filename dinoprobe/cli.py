"""Command line: parsing and printing only; the work happens in the modules it calls."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dinoprobe import __version__
from dinoprobe.errors import DinoprobeError
from dinoprobe.settings import (
    DECODE_ON,
    DECODERS,
    DEFAULT_C_GRID,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MODEL,
    EVAL_SUITES,
    KNN_KS,
    KNN_TEMPERATURE,
    PRESETS,
    PROTOCOLS,
    TASKS,
    TRANSFORMS,
)
from dinoprobe.train.config import SETTINGS, check_number, check_value, describe_range, value_type

POSITIVE_INT = click.IntRange(min=1)
PROBABILITY = click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True)
WORKERS_HELP = ("DataLoader decoding processes [default: 0 on a CPU with <= 4 cores, else cores/8; GPU: cores-1, max 8; "
                "cores = this process's CPU affinity, split between torchrun ranks]")


class FeatureType(click.ParamType):
    """A `+`-joined feature spec (dinoprobe.features): cls, patch_mean, clsN."""

    name = "feature"

    def convert(self, value, param, ctx):
        from dinoprobe.cache.specs import parse_feature

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


class Number(click.ParamType):
    """A finite int or float within a range, checked by the same function as TrainConfig's settings."""

    def __init__(self, kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
        self.kind, self.name = kind, kind.__name__
        self.meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open}

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = self.kind(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}", param, ctx)
        problem = check_number(param.name if param else "value", number, self.meta, self.kind)
        if problem:
            self.fail(problem, param, ctx)
        return number


class Setting(click.ParamType):
    """One value of a TrainConfig setting: converted by its type, checked by its own range or choices."""

    def __init__(self, name: str):
        self.field = SETTINGS[name]
        self.kind = value_type(self.field)
        self.name = "/".join(self.field.metadata["choices"]) if self.field.metadata["choices"] else self.kind.__name__

    def convert(self, value, param, ctx):
        try:
            value = value if isinstance(value, self.kind) else self.kind(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}", param, ctx)
        problem = check_value(self.field, value)
        if problem:
            self.fail(problem, param, ctx)
        return value


def _setting_help(name: str) -> str:
    meta = SETTINGS[name].metadata
    rng = "" if meta["choices"] or meta["low"] is None else f" {describe_range(meta)}"
    return meta["help"] + rng


def _train_options(many: bool):
    """One option per TrainConfig setting, with its help, type, range and default from its declaration. many: each
    takes a comma-separated list (sweep's grid); flags and betas take one value."""
    def decorate(command):
        for name in reversed(list(SETTINGS)):
            f, flag = SETTINGS[name], "--" + name.replace("_", "-")
            if value_type(f) is bool:
                command = click.option(flag, is_flag=True, default=None if many else f.default,
                                       help=_setting_help(name))(command)
            elif name == "betas":
                command = click.option(flag, nargs=2, type=Number(float, low=0.0, high=1.0, high_open=True),
                                       default=None if many else f.default, show_default=not many,
                                       help=_setting_help(name))(command)
            elif many:
                command = click.option(flag, callback=_comma_list(Setting(name)), help=_setting_help(name)
                                       + (f" [default: {f.default}]" if f.default is not None else ""))(command)
            else:
                command = click.option(flag, type=Setting(name), default=f.default, show_default=f.default is not None,
                                       help=_setting_help(name))(command)
        return command
    return decorate


DEVICE_OPTION = click.option("--device", type=DeviceType(), default="auto", show_default=True,
                             help="auto (a GPU when there is one), cpu, cuda, cuda:N or mps")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a scheduler preempting the job), raised where Ctrl-C's KeyboardInterrupt would
    be, so a command stops the way Ctrl-C stops it: complete outputs kept, nothing half-written, exit code 143."""


def _stopped(err: KeyboardInterrupt) -> tuple[str, int]:
    """How a stop reads and the exit code it gives: Ctrl-C 130, SIGTERM 143 (128 + the signal)."""
    return ("Terminated", 143) if isinstance(err, Terminated) else ("Interrupted", 130)


def _terminate(signum, frame):
    raise Terminated()


class Group(click.Group):
    """Turns DinoprobeError into a one-line `Error: ...` with exit code 1 (click's usage errors exit 2), and Ctrl-C
    (or SIGTERM) into one line with exit code 130 (143): every command writes its outputs only when complete, so
    nothing is half-done. The SIGTERM handler is the command's, installed for its run and put back after."""

    def invoke(self, ctx):
        import signal
        import threading
        import warnings

        previous = None
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            with warnings.catch_warnings():  # a library warning is one line for the user, not a source location
                warnings.showwarning = lambda message, *_: _echo_err(f"Warning: {message}")
                return super().invoke(ctx)
        except DinoprobeError as err:
            raise click.ClickException(str(err)) from None
        except BrokenPipeError as err:
            if not _stdout_reader_gone():  # a pipe other than stdout: a real error
                raise _system_error(err) from None
            # `dinoprobe predict ... | head`: the reader has what it wanted. Exit as Unix tools do on SIGPIPE (141),
            # silently; stdout goes to /dev/null so Python's flush at exit does not fail a second time
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except OSError as err:  # a full disk, a read-only folder, a path that vanished: the system's reason, one line
            raise _system_error(err) from None
        except KeyboardInterrupt as err:
            word, code = _stopped(err)
            _echo_err(f"\n{word}; nothing was left half-written (a run directory appears only when complete).")
            ctx.exit(code)
        except (MemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            reason = reason.split("DefaultCPUAllocator: ")[-1]  # not torch's "[enforce fail at alloc_cpu.cpp:127]"
            raise click.ClickException(f"out of memory ({reason}); use a smaller --batch-size, or --max-memory for "
                                       "probe and sweep (train features then stream from disk; a sweep trains fewer "
                                       "heads at once), or --device cpu. Complete outputs are kept (a `features` "
                                       "rerun resumes)") from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _system_error(err: OSError) -> click.ClickException:
    where = f" ({err.filename})" if err.filename else ""
    return click.ClickException(f"{err.strerror or err}{where}; check free disk space, permissions and the path, then "
                                "rerun (complete outputs are kept; nothing half-written is)")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on the write end), as opposed to
    a broken pipe anywhere else (a decoding worker's), which is a real error."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file descriptor (a test runner's buffer), or closed
        return False


def _out_of_memory(err: BaseException) -> bool:
    """The host's MemoryError, torch's OutOfMemoryError on a GPU, or torch's CPU allocator refused by the system (a
    plain RuntimeError: "DefaultCPUAllocator: can't allocate memory"). torch is never imported just to ask: a
    command that did not import it cannot have raised it."""
    torch = sys.modules.get("torch")
    return isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError)) or \
        (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _echo_err(message: str) -> None:
    """A note on stderr. One that cannot be written (stderr closed, or `2> log` on a full disk) does not stop the
    command: its results go elsewhere."""
    try:
        click.echo(message, err=True)
    except (OSError, ValueError):
        pass


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dinoprobe")
def main():
    """Frozen DINOv3 backbone -> cached features -> heads trained in seconds."""


# ------------------------------------------------------------------------------------------------------- info
@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="timm model name")
@click.option("--weights", default=None, help="Optional: hub, random or PATH, to load and fingerprint them too")
@click.option("--image-size", type=click.IntRange(min=16, max=4096), default=DEFAULT_IMAGE_SIZE, show_default=True,
              help="Image size for token/FLOP counts")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table")
def info(model, weights, image_size, as_json):
    """Model facts: parameters, width, depth, heads, tokens, data config and measured FLOPs per image."""
    from dinoprobe.extract.backbone import architecture, build_backbone, model_facts

    backbone = build_backbone(model, weights, image_size, log=_echo_err) if weights else architecture(model, image_size)
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
        ("weights in float32", f"{facts['weights_bytes_float32'] / 2**30:.3g} GiB (host memory to build it; twice "
                               "that while a checkpoint loads)"),
        ("width (hidden size)", facts["width"]), ("depth (layers)", facts["depth"]),
        ("attention heads", facts["heads"]), ("MLP width", facts["mlp_width"]),
        ("patch size", facts["patch_size"]), ("register tokens", facts["register_tokens"]),
        (f"tokens at {image_size} px", f"{facts['tokens']} = {facts['patch_tokens']} patches + 1 CLS + "
                                       f"{facts['register_tokens']} registers"),
        ("FLOPs per image", f"{facts['flops_per_image'] / 1e9:.2f} GFLOP (torch.utils.flop_counter on the meta "
                            "device, attention included)"),
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
@click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True,
              help="single: one label per image; multilabel: any number (sigmoid heads, mAP); auto: multilabel when "
                   "some image has several labels or none")
@click.option("--label-sep", default=None,
              help="CSV/TSV file lists: the character between several labels in one cell, e.g. '|' (cat|dog)")
@click.option("--data-dir", default="data", show_default=True, help="Where CIFAR lives / is downloaded")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="timm model name")
@click.option("--weights", default="hub", show_default=True,
              help="hub | random | PATH (Meta .pth, timm .safetensors/.pth, or Hugging Face folder)")
@click.option("--cache", "cache_dir", default=None, help="Cache folder [default: cache/<data>-<model>-<size>px-<weights>]")
@click.option("--image-size", type=click.IntRange(min=16, max=4096), default=DEFAULT_IMAGE_SIZE, show_default=True,
              help="Input size in pixels, a multiple of the patch size (16)")
@click.option("--batch-size", type=POSITIVE_INT, default=64, show_default=True,
              help="Images per forward pass (lower it if memory runs out)")
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
              help="torch.compile the backbone: ~1 min of compiling; it pays only where the forward bounds the "
                   "run (on the measured H200 it did not: README, Performance)")
@click.option("--last-blocks", type=click.IntRange(0), default=4, show_default=True,
              help="Also store the CLS token of each of the last N blocks (for --feature clsN, DINOv3's linear eval)")
@click.option("--transform", type=click.Choice(TRANSFORMS), default="timm", show_default=True,
              help="timm: the model's timm data config; dinov3: DINOv3's eval transform (resize to size/crop-pct, "
                   "256 at 224, bicubic on uint8 tensors, centre crop, ImageNet mean/std); square: resize to size x "
                   "size, no crop (the DINOv3 README's make_transform at 256, the Hugging Face processor at 224)")
@click.option("--crop-pct", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="crop size / resize size [default: timm: the model's; dinov3: 224/256]; DINOv3's logistic "
                   "regression computes its features at 1.0 (resize 224, crop 224)")
@click.option("--decoder", type=click.Choice(DECODERS), default="pil", show_default=True,
              help="JPEG decoding: pil = timm's reference transform; torchvision = decode_jpeg + tensor resize "
                   "(faster; on the GPU with nvJPEG when extracting on CUDA)")
@click.option("--decode-on", type=click.Choice(list(DECODE_ON)), default="auto", show_default=True,
              help="Where --decoder torchvision decodes: device = batched on the extraction device (nvJPEG on "
                   "CUDA); workers = in the loader workers on the CPU; auto = device on CUDA, else workers")
@click.option("--like", "like_run", default=None, type=click.Path(),
              help="A run directory or head file: its head's model, weights, image size, transform and decoder, so "
                   "the cache holds that head's features (for `dinoprobe score`); --weights PATH if the checkpoint "
                   "moved")
@click.pass_context
def features(ctx, data, image_column, label_column, task, label_sep, data_dir, model, weights, cache_dir, image_size,
             batch_size, workers, device,
             precision, dtype,
             shard_size, val_fraction, max_pixels, strict, overwrite, views, augment, compile_, last_blocks, transform,
             crop_pct, decoder, decode_on, like_run):
    """Run the frozen backbone once over every split and cache the features (resumable)."""
    import dataclasses
    import os

    from dinoprobe.device import local_processes, resolve_device
    from dinoprobe.extract.backbone import build_backbone
    from dinoprobe.extract.run import ExtractOptions, distributed_context, end_distributed, extract
    from dinoprobe.extract.sources import open_source

    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    say = _echo_err if main_process else (lambda *_: None)
    like = None
    if like_run is not None:  # the head's backbone settings replace the options' defaults
        like = _like(ctx, like_run, weights, last_blocks)
        model, weights, image_size, decoder, last_blocks = (like[k] for k in ("model", "weights_name", "image_size",
                                                                              "decoder", "last_blocks"))
    cache_dir = cache_dir or default_cache_dir(data, model, image_size, weights)
    source = open_source(data, data_dir, val_fraction, image_column=image_column, label_column=label_column, task=task,
                         label_sep=label_sep)
    options = ExtractOptions(batch_size=batch_size, workers=workers, device=device, precision=precision, dtype=dtype,
                             shard_size=shard_size, strict=strict, overwrite=overwrite, max_pixels=max_pixels,
                             compile=compile_, views=views, augment=augment, decoder=decoder,
                             decode_on_device=DECODE_ON[decode_on], last_blocks=last_blocks)
    options.check_source(source)  # before any weights load
    source.check_cache_place(cache_dir)
    if precision == "fp16" and "dinov3" in model:
        say("WARNING: DINOv3's authors say it does not support fp16 (activations overflow); use --precision bf16 "
            "(or auto: bf16 on CUDA)")
    processes = local_processes()  # torchrun ranks of this machine, each loading a backbone at once
    if like is not None:
        from dinoprobe.runs.predict import backbone_for_head

        backbone = backbone_for_head(like["head_file"], like["weights"], log=say, processes=processes)
    else:
        backbone = build_backbone(model, weights, image_size, log=say, transform=transform, crop_pct=crop_pct,
                                  processes=processes)
    cfg = backbone.data_config
    counts = ", ".join(f"{s} {len(v)}" for s, v in source.splits.items())
    say(f"{source.kind} {source.root}: {len(source.classes)} classes{' (multi-label)' if source.multilabel else ''}; "
        f"{counts} inputs -> {cache_dir}")
    if "train" not in source.splits:
        say(f"no train split: an evaluation set, to score a trained head on with `dinoprobe score --run "
            f"{like_run or 'RUN'} --cache {cache_dir}`")
    for note in source.notes():
        say(f"WARNING: {note}")
    geometry = (f"square resize to {cfg.image_size} x {cfg.image_size}" if cfg.name == "square"
                else f"resize {cfg.resize_size}, centre crop {cfg.image_size} px")
    say(f"transform {cfg.name}: {geometry} ({cfg.interpolation})")
    rank, world = distributed_context(resolve_device(device))  # torchrun: the process group lives here
    try:
        summary = extract(backbone, source, cache_dir, dataclasses.replace(options, rank=rank, world=world))
    except KeyboardInterrupt as err:
        word, code = _stopped(err)
        _echo_err(f"\n{word}. Complete shards in {cache_dir} are kept; the shard in progress was discarded. Rerun "
                  "the same command to resume.")
        sys.exit(code)
    finally:
        end_distributed()
    if not main_process:
        return
    if summary.read_only:
        click.echo(f"cache {cache_dir} is read-only here, and already complete for this request: nothing to compute")
    if summary.repaired:
        click.echo(f"recomputed {len(summary.repaired)} missing or truncated shard(s): "
                   f"{', '.join(summary.repaired[:5])}{' ...' if len(summary.repaired) > 5 else ''}")
    rows = ", ".join(f"{s} {n}" for s, n in summary.rows.items())
    skipped = sum(summary.skipped.values())
    click.echo(f"cache {cache_dir}: {rows} rows; {skipped} skipped input(s)"
               + (" (listed in manifest.json)" if skipped else "")
               + f"; {summary.computed} computed in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s)")
    _warn_unread_splits(cache_dir, summary)


def _warn_unread_splits(cache_dir, summary) -> None:
    """A split whose every input was skipped (a file list's paths written relative to another folder, a mount that
    is not there) leaves a complete cache with nothing in it: said with the commonest reasons, not only as 0 rows."""
    from collections import Counter

    from dinoprobe.cache.store import read_manifest, skipped_inputs

    empty = [split for split, n in summary.rows.items() if n == 0 and summary.skipped.get(split)]
    manifest = read_manifest(cache_dir) if empty else None
    for split in empty if manifest is not None else ():
        reasons = Counter(s["reason"] for s in skipped_inputs(manifest, split))
        common = "; ".join(f"{reason} ({n:,})" for reason, n in reasons.most_common(3))
        hint = (" (a CSV's relative paths resolve against the CSV's folder)"
                if manifest["fingerprint"].get("data", {}).get("kind") == "csv" else "")
        _echo_err(f"WARNING: every input of {split} was skipped: {common}. `dinoprobe cache skipped {cache_dir}` "
                  f"lists them{hint}")


def _like(ctx, like_run: str, weights: str, last_blocks: int) -> dict:
    """features --like RUN: the head's model, weights, image size, transform and decoder, and at least the last
    blocks its feature reads. An option that --like sets, given too, is refused (one source of truth); --weights
    may point at the same checkpoint moved elsewhere (backbone_for_head checks its sha256)."""
    from click.core import ParameterSource

    from dinoprobe.cache.specs import blocks_needed, parse_feature
    from dinoprobe.train.headfile import load_head_file

    given = [f"--{name.replace('_', '-')}" for name in ("model", "image_size", "transform", "crop_pct", "decoder")
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"--like takes {', '.join(given)} from the run's head; drop {'it' if len(given) == 1 else 'them'}")
    head_file = load_head_file(like_run)
    fp = head_file.fingerprint
    if not fp:
        raise DinoprobeError(f"'{like_run}' was saved from features without a dinoprobe cache, so it records no "
                             "backbone to build the cache like; give --model, --weights and --image-size")
    needed = blocks_needed(parse_feature(head_file.feature))
    if last_blocks < needed:
        if ctx.get_parameter_source("last_blocks") == ParameterSource.COMMANDLINE:
            raise click.UsageError(f"the run's head reads '{head_file.feature}', the CLS tokens of the last {needed} "
                                   f"blocks; use --last-blocks {needed} or more")
        last_blocks = needed
    explicit = ctx.get_parameter_source("weights") == ParameterSource.COMMANDLINE
    source = fp["weights"]["source"]
    recorded = source if source in ("hub", "random") else head_file.weights_location
    return {"head_file": head_file, "model": fp["model"], "image_size": fp["transform"]["image_size"],
            "weights": weights if explicit else None, "weights_name": weights if explicit else recorded,
            "decoder": (fp.get("decoder") or {}).get("name", "pil"), "last_blocks": last_blocks}


# ------------------------------------------------------------------------------------------------------ cache
@main.group(cls=Group)
def cache():
    """Inspect and check feature caches."""


@cache.command("verify")
@click.argument("cache_dir", type=click.Path(file_okay=False))
def cache_verify(cache_dir):
    """Re-check row counts and sha256 of every shard; exit 1 if anything is wrong."""
    from dinoprobe.cache.store import read_manifest, verify

    problems = verify(cache_dir)
    if problems:
        for problem in problems:
            _echo_err(f"problem: {problem}")
        raise DinoprobeError(f"{len(problems)} problem(s) in {cache_dir}")
    manifest = read_manifest(cache_dir)
    rows = ", ".join(f"{s} {sum(x['rows'] for x in v['shards'])}" for s, v in manifest["splits"].items())
    task = " (multi-label)" if manifest.get("task") == "multilabel" else ""
    click.echo(f"ok: {cache_dir} ({manifest['fingerprint']['model']}, {len(manifest['classes'])} classes{task}; {rows} "
               "rows)")


@cache.command("skipped")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
def cache_skipped(cache_dir, fmt):
    """List the inputs `features` skipped, with the reason for each (unreadable, too large, unlabelled...)."""
    from dinoprobe.cache.store import read_manifest, skipped_inputs

    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise DinoprobeError(f"{cache_dir} is not a dinoprobe cache (no manifest.json)")
    rows = [{"split": s["split"], "index": s["index"], "path": s["path"], "reason": s["reason"]}
            for s in skipped_inputs(manifest)]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1, ensure_ascii=False))
    elif fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=["split", "index", "path", "reason"])
        writer.writeheader()
        writer.writerows(rows)
    else:
        for r in rows:
            click.echo(f"{r['split']}\t{r['path']}\t{r['reason']}")
        _echo_err(f"{len(rows)} skipped input(s) in {cache_dir}")


# ------------------------------------------------------------------------------------------------------ probe
def _print_metrics(metrics: dict, out) -> None:
    mode = metrics.get("train_features")
    if mode and mode["mode"] == "streamed":
        click.echo(f"train features streamed from disk ({mode['shards']} shards, {mode['shards_per_buffer']} per "
                   f"read-ahead buffer within --max-memory); the batch order differs from in-memory training")
    elif mode and mode.get("max_memory"):
        click.echo(f"train features held in memory ({mode['mode']}): they fit --max-memory")
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
    for split in ("train", "val", "test"):
        if split in metrics and metrics[split].get("task") == "multilabel":
            m = metrics[split]
            number = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            click.echo(f"{split}: mAP {number(m['map_macro'])} (micro {number(m['map_micro'])}), F1 micro "
                       f"{number(m['f1_micro'])}, macro {number(m['f1_macro'])}, samples {number(m['f1_samples'])}, "
                       f"subset accuracy {number(m['subset_accuracy'])} (n={m['n']})")
            if m["classes_without_positives"]:
                click.echo(f"  no positive {split} image, so left out of the mAP: "
                           f"{', '.join(m['classes_without_positives'][:10])}")
        elif split in metrics and metrics[split].get("task") == "any_match":
            m = metrics[split]
            top5 = f", top-5 {m['top5']:.4f}" if "top5" in m else ""
            left_out = f"; {m['unlabelled']} image(s) without a label left out" if m["unlabelled"] else ""
            click.echo(f"{split}: top-1 {m['top1']:.4f}{top5} (any-match: the prediction is one of the image's labels; "
                       f"n={m['n']}{left_out})")
        elif split in metrics:
            m = metrics[split]
            top5 = f", top-5 {m['top5']:.4f}" if "top5" in m else ""
            click.echo(f"{split}: top-1 {m['top1']:.4f}{top5}, balanced {m['balanced_accuracy']:.4f} (n={m['n']})")
    if "best_epoch" in metrics:
        click.echo(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}")
    if metrics.get("diverged_epoch"):
        _echo_err(f"WARNING: training diverged in epoch {metrics['diverged_epoch']} (the loss exploded) and "
                  f"stopped; the head is epoch {metrics['best_epoch']}'s — lower --lr to train further")
    if out:
        click.echo(f"run saved to {out}")


def _class_weight(ctx, param, value: str | None):
    """--class-weight: balanced, or NAME=WEIGHT,NAME=WEIGHT (classes not named weigh 1)."""
    if value is None or value.strip() == "balanced":
        return None if value is None else "balanced"
    weights = {}
    for item in value.split(","):
        name, _, weight = item.partition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected NAME=WEIGHT (e.g. cat=2,dog=0.5) or balanced") from None
        if not name.strip() or not weights[name.strip()] >= 0 or weights[name.strip()] == float("inf"):
            raise click.BadParameter(f"{item!r}: a class name and a finite weight >= 0")
    return weights


CLASS_WEIGHT_OPTION = click.option(
    "--class-weight", callback=_class_weight, default=None,
    help="Weight each training row's loss by its class: balanced (n / (classes x class count)) or "
         "NAME=WEIGHT,... (scikit-learn's class_weight) [default: none]")


def _size(ctx, param, value: str | None) -> int | None:
    """A --max-memory size such as 512MB or 4GB, in bytes (> 0)."""
    if value is None:
        return None
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}
    text = value.strip().lower()
    number = text.rstrip("kmgb")
    try:
        size = int(float(number) * units[text[len(number):]])
    except (ValueError, KeyError, OverflowError):
        size = 0
    if size <= 0:
        raise click.BadParameter(f"{value!r} is not a positive size like 512MB or 4GB")
    return size


def _check_shots(ctx, param, value):
    if value is None:
        return None
    from dinoprobe.splits import parse_shots

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
@_train_options(many=False)
@CLASS_WEIGHT_OPTION
@click.option("--views", is_flag=True, help="Train on one cached augmented view per image per epoch (features --views K)")
@click.option("--max-memory", callback=_size, default=None,
              help="Memory budget for train features, e.g. 8GB; a larger cache is streamed from disk")
@DEVICE_OPTION
def probe(cache_dir, out, overwrite, shots, tries, feature, class_weight, views, max_memory, device, **params):
    """Train a linear or MLP head on cached features, keep the best on val, report test."""
    from dinoprobe.estimators.probe import Probe
    from dinoprobe.runs.experiments import run_probe

    estimator = Probe(**params, class_weight=class_weight, shots=shots, tries=tries, device=device, progress=True)
    metrics = run_probe(cache_dir, out, estimator, feature=feature, views=views, max_memory=max_memory,
                        overwrite=overwrite)
    _print_metrics(metrics, out)


# ---------------------------------------------------------------------------------------------------- predict
@main.command()
@click.option("--run", "head_path", default=None, type=click.Path(), help="RUN_DIR (or RUN_DIR/head.pt)")
@click.option("--model", "onnx_path", default=None, type=click.Path(dir_okay=False),
              help="An ONNX export instead of --run: runs with ONNX Runtime, numpy and PIL only (no torch)")
@click.option("--weights", default=None, help="Backbone weights [default: those recorded in the head file]")
@click.option("--allow-weights-mismatch", is_flag=True, help="Use weights whose sha256 differs from training's")
@click.option("--top-k", "topk", type=POSITIVE_INT, default=5, show_default=True,
              help="Labels per image (single-label heads)")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Multi-label heads: report every class with at least this probability [default: each class's "
                   "threshold tuned on val, stored with the head]")
@click.option("--batch-size", type=POSITIVE_INT, default=32, show_default=True,
              help="Images per forward pass (lower it if memory runs out)")
@click.option("--workers", type=click.IntRange(min=0), default=None, help=WORKERS_HELP)
@DEVICE_OPTION
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def predict(head_path, onnx_path, weights, allow_weights_mismatch, topk, threshold, batch_size, workers, device, fmt,
            paths):
    """Top-k labels (multi-label heads: every label over its threshold) for image files and folders (recursively)
    with a trained head (--run) or an ONNX export (--model)."""
    if (head_path is None) == (onnx_path is None):
        raise click.UsageError("give one of --run RUN_DIR or --model MODEL.onnx")
    from collections import Counter

    from dinoprobe.imagefiles import describe_ignored, expand_inputs

    ignored = Counter()
    files, errors = expand_inputs(paths, ignored)
    if ignored:
        _echo_err(f"WARNING: {describe_ignored(ignored)}")

    def some_input():  # after the model file is checked (quick), before a backbone is built (seconds)
        if not files and not errors:  # folders without one image file: say so, not an empty result and exit 0
            raise DinoprobeError(f"no image files in {', '.join(paths)}")

    if onnx_path is not None:
        from dinoprobe.runs.onnx_predict import OnnxClassifier

        classifier = OnnxClassifier(onnx_path)
        some_input()
        entries = classifier.iter_predictions(files, topk, batch_size, threshold)
        class_names, multilabel = classifier.class_names, classifier.thresholds is not None
    else:
        from dinoprobe.runs.predict import backbone_for_head, iter_predictions
        from dinoprobe.train.headfile import load_head_file

        head_file = load_head_file(head_path)
        some_input()
        backbone = backbone_for_head(head_file, weights, allow_weights_mismatch, log=_echo_err)
        entries = iter_predictions(head_file, backbone, files, topk, batch_size, workers, device, threshold=threshold,
                                   progress=True)
        class_names, multilabel = head_file.class_names, head_file.multilabel
    for path, reason in errors:
        _echo_err(f"skipped {path}: {reason}")
    printed = _print_predictions(entries, fmt, min(topk, len(class_names)), class_names, multilabel,
                                 width=max((len(f) for f in files), default=4))
    if not printed and (errors or files):
        raise DinoprobeError("no input could be read")


def _print_predictions(entries, fmt: str, k: int, class_names: list[str], multilabel: bool, width: int) -> int:
    """Each entry on stdout as it comes, in input order (a skipped input on stderr), flushed a line at a time so a
    pipe sees them and a killed run keeps what it printed; returns how many images were labelled."""
    import csv

    printed = 0
    writer = csv.writer(sys.stdout)
    if fmt == "csv" and multilabel:  # the predicted labels, then one probability column per class
        writer.writerow(["path", "labels"] + [f"probability_{name}" for name in class_names])
    elif fmt == "csv":
        writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "probability")])
    elif fmt == "json":
        sys.stdout.write("[")
    for r in entries:
        if "skipped" in r:
            _echo_err(f"skipped {r['path']}: {r['skipped']}")
            continue
        if fmt == "json":  # json.dumps(list, indent=1), an element at a time
            item = json.dumps(r, indent=1, ensure_ascii=False).replace("\n", "\n ")
            sys.stdout.write(f"{',' if printed else ''}\n {item}")
        elif fmt == "csv" and multilabel:
            writer.writerow([r["path"], "|".join(r["labels"])] + [r["all_probabilities"][n] for n in class_names])
        elif fmt == "csv":
            writer.writerow([r["path"]] + [v for pair in zip(r["labels"], r["probabilities"]) for v in pair])
        else:
            labels = "  ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probabilities"]))
            sys.stdout.write(f"{r['path']:<{width}}  "
                             f"{labels or '(no label over its threshold)' if multilabel else labels}\n")
        sys.stdout.flush()
        printed += 1
    if fmt == "json":
        sys.stdout.write("\n]\n" if printed else "]\n")
        sys.stdout.flush()
    return printed


@main.command()
@click.option("--run", "head_path", required=True, type=click.Path(), help="RUN_DIR (or RUN_DIR/head.pt)")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="File to write, e.g. model.pt (outside the run directory)")
@click.option("--overwrite", is_flag=True, help="Replace an existing file")
@click.option("--format", "fmt", type=click.Choice(["pt", "onnx"]), default=None,
              help="pt: torch, weights_only-loadable; onnx: one graph (pixels -> probabilities, features) with the "
                   "transform and class names in its metadata, for ONNX Runtime  [default: onnx for a .onnx file, "
                   "else pt]")
@click.option("--opset", type=click.IntRange(17, 23), default=18, show_default=True, help="ONNX opset (onnx only)")
@click.option("--fp16", is_flag=True, help="ONNX only: float16 weights (half the file; probabilities within 3e-4)")
@click.option("--weights", default=None, help="Backbone weights [default: those recorded in the head file]")
@click.option("--allow-weights-mismatch", is_flag=True)
def export(head_path, out, overwrite, fmt, opset, fp16, weights, allow_weights_mismatch):
    """Write backbone + head as one self-contained file (torch or ONNX), atomically."""
    from dinoprobe.runs.export import check_export_target, export_onnx
    from dinoprobe.runs.export import export as run_export
    from dinoprobe.runs.predict import backbone_for_head
    from dinoprobe.train.headfile import load_head_file

    fmt = _export_format(out, fmt)
    head_file = load_head_file(head_path)
    check_export_target(out, head_file, overwrite)  # before the backbone is built
    backbone = backbone_for_head(head_file, weights, allow_weights_mismatch, log=_echo_err)
    if fmt == "onnx":
        path = export_onnx(head_file, backbone, out, overwrite, opset, fp16)
        click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); run it with `dinoprobe predict --model "
                   f"{path} IMAGES` or ONNX Runtime (see the README)")
        return
    if fp16:
        raise click.UsageError("--fp16 applies to --format onnx")
    path = run_export(head_file, backbone, out, overwrite)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); load with "
               "dinoprobe.runs.export.load_exported(path)")


def _export_format(out: str, fmt: str | None) -> str:
    """The format a file's name says, unless --format says otherwise; a torch file named .onnx (or an ONNX graph
    named .pt) is refused, since every tool that opens it by its name would fail."""
    suffix = Path(out).suffix.lower()
    named = "onnx" if suffix == ".onnx" else "pt" if suffix in (".pt", ".pth") else None
    if fmt is not None and named is not None and fmt != named:
        raise click.UsageError(f"--format {fmt} does not match the file name '{out}': name it "
                               f"{Path(out).with_suffix('.onnx' if fmt == 'onnx' else '.pt').name}, or drop --format")
    return fmt or named or "pt"


# ------------------------------------------------------------------------------------------------------ sweep
def _comma_list(item_type: click.ParamType):
    """A click callback parsing `a,b,c` into a list, each item converted and checked by `item_type` (a usage
    error, exit 2, on a bad value)."""
    def callback(ctx, param, value):
        if value is None:
            return None
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            raise click.BadParameter("empty list")
        return [item_type.convert(v, param, ctx) for v in items]
    return callback


@main.command()
@_run_options
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help="dinov3-linear: DINOv3's linear eval exactly (dinov3/eval/linear.py: last block CLS + patch mean, "
                   "13 lrs x batch/256, SGD 0.9, batch 128, 10 x 1250 iterations, N(0, 0.01) init, final heads); "
                   "dinov2-linear: DINOv2's (n in {1, 4} blocks x patch mean off/on). Options given override it")
@click.option("--feature", callback=_comma_list(FeatureType()),
              help="e.g. cls,cls4+patch_mean [default: cls; with a preset, its features: dinov3-linear "
                   + ",".join(PROTOCOLS["dinov3-linear"]["features"]) + " (cls4+patch_mean for n = 4), dinov2-linear "
                   + ",".join(PROTOCOLS["dinov2-linear"]["features"]) + "]")
@_train_options(many=True)
@CLASS_WEIGHT_OPTION
@click.option("--views", is_flag=True, help="Sample one cached augmented view per image per epoch")
@click.option("--max-memory", callback=_size, default=None,
              help="Memory budget, e.g. 2GB: groups are split to fit it, and train features above it stream from disk")
@DEVICE_OPTION
@click.option("--show", type=POSITIVE_INT, default=10, show_default=True, help="Rows of the table printed at the end")
def sweep(cache_dir, out, overwrite, shots, tries, preset, feature, class_weight, views, max_memory, device, show,
          **lists):
    """Train a grid of heads side by side (one batched model per group) and keep the best on val.

    Every training option takes a comma-separated list; options with several values form the grid."""
    from dinoprobe.estimators.probe import Probe
    from dinoprobe.estimators.sweep import Sweep
    from dinoprobe.runs.experiments import run_sweep
    from dinoprobe.runs.sweep_table import score_key, varying_params

    given = {k: v for k, v in lists.items() if v is not None}
    if preset:  # everything given overrides the preset's settings, so it goes into the grid
        base, grid = {}, {k: v if isinstance(v, list) else [tuple(v) if k == "betas" else v] for k, v in given.items()}
    else:
        base = {k: v[0] if isinstance(v, list) else v for k, v in given.items()
                if not isinstance(v, list) or len(v) == 1}
        grid = {k: v for k, v in given.items() if isinstance(v, list) and len(v) > 1}
    estimator = Probe(**base, class_weight=class_weight, shots=shots, tries=tries, device=device, progress=True)
    search = Sweep(estimator, param_grid=grid, preset=preset, max_memory=max_memory)
    features = feature or (list(PROTOCOLS[preset]["features"]) if preset else ["cls"])
    rows, metrics = run_sweep(cache_dir, out, search, features=features, views=views, max_memory=max_memory,
                              overwrite=overwrite)
    columns = varying_params(rows) + ["best_epoch", score_key(rows)]
    click.echo("  ".join(f"{c:>12}" for c in columns))
    for row in rows[:show]:
        click.echo("  ".join(f"{row[c]:>12.4g}" if isinstance(row[c], float) else f"{str(row[c]):>12}"
                             for c in columns))
    seconds = sum({(r["feature"], r["group"]): r["group_seconds"] for r in rows}.values())
    click.echo(f"{len(rows)} configs trained in {seconds:.1f} s; results in {out}/results.csv, plot {out}/sweep.png")
    _print_metrics(metrics, Path(out) / "best")


# --------------------------------------------------------------------------------------------------- evaluate
@main.command("evaluate")
@click.option("--cache", "caches", multiple=True, required=True, type=click.Path(),
              help="A feature cache; repeat for several (one table row each)")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the table and each protocol's run directory; rerun to resume")
@click.option("--protocol", type=click.Choice(list(EVAL_SUITES)), default="dinov3", show_default=True,
              help="dinov3: DINOv3's linear (last block CLS + patch mean), logistic regression and k-NN; dinov2: "
                   "DINOv2's linear grid with the same logistic regression and k-NN")
@click.option("--shots", callback=_comma_list(click.STRING), default=None,
              help="Few-shot logistic regression too, e.g. 1,2,5 (or 1%): K images per class")
@click.option("--tries", type=POSITIVE_INT, default=5, show_default=True, help="Few-shot draws per K")
@click.option("--epochs", type=POSITIVE_INT, default=None,
              help="Override the linear preset's 10 epochs (a quick look: the numbers are then not the protocol's)")
@click.option("--epoch-length", type=POSITIVE_INT, default=None, help="Override the preset's 1,250 iterations/epoch")
@click.option("--test-cache", "test_caches", multiple=True, metavar="[CACHE=]PATH",
              help="A further test set's cache (DINOv3's test_datasets: ImageNet-V2, -R, ...), built with the same "
                   "backbone: the linear protocol's best head is scored on its test split, a column named after its "
                   "folder; repeat for several. With several --cache, CACHE names the one whose head it tests")
@click.option("--restrict-classes", is_flag=True,
              help="Score each test cache over its own classes only (ImageNet-R/-A's 200 of ImageNet's 1,000)")
@DEVICE_OPTION
def evaluate(caches, out, protocol, shots, tries, epochs, epoch_length, test_caches, restrict_classes, device):
    """Every protocol on every cache: linear, logistic regression, k-NN (and few-shot); one results table."""
    from dinoprobe.runs.evaluate import evaluate as run_evaluate
    from dinoprobe.runs.evaluate import markdown

    overrides = {k: v for k, v in (("epochs", epochs), ("epoch_length", epoch_length)) if v is not None}
    rows = run_evaluate(list(caches), out, protocol=protocol, shots=shots or (), tries=tries, device=device,
                        linear_overrides=overrides, test_caches=test_caches, restrict_classes=restrict_classes,
                        log=_echo_err, progress=True)
    click.echo(markdown(rows, protocol))
    click.echo(f"wrote {out}/results.csv, results.json and results.md; each protocol's run is under {out}/<cache>/")


# ------------------------------------------------------------------------------------------------------ score
@main.command()
@click.option("--run", "head_path", required=True, type=click.Path(), help="RUN_DIR (or RUN_DIR/head.pt)")
@click.option("--cache", "cache_dir", required=True, type=click.Path(),
              help="Cache of labelled images, built with the head's model, weights and transform")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--restrict-classes", is_flag=True,
              help="Predict among the cache's classes only (DINOv3's class mapping for ImageNet-R/-A), not all of "
                   "the head's")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run directory for metrics.json, predictions.csv and the plot [default: print only]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out written by `score`")
@DEVICE_OPTION
def score(head_path, cache_dir, split, restrict_classes, out, overwrite, device):
    """A trained head's metrics on another cache: a shifted test set, or newly labelled images."""
    from dinoprobe.runs.score import score_run

    metrics = score_run(head_path, cache_dir, split, restrict_classes=restrict_classes, out=out, overwrite=overwrite,
                        device=device)
    scored = metrics["scored"]
    task = metrics[split].get("task")
    among = f"its {scored['classes']}" if restrict_classes else f"the head's {scored['head_classes']}"
    how = "each at the head's threshold" if task == "multilabel" else \
        f"{'several per image, ' if task == 'any_match' else ''}predicted among {among} classes"
    click.echo(f"{cache_dir} {split}: {scored['classes']} classes, {how}")
    _print_metrics(metrics, out)


# -------------------------------------------------------------------------------------------------- baselines
@main.command()
@_run_options
@click.option("--feature", type=FeatureType(), default="cls", show_default=True, help=FEATURE_HELP)
@click.option("--protocol", type=click.Choice(["dinoprobe", "dinov3"]), default="dinoprobe", show_default=True,
              help="dinov3: DINOv3's log_regression.py exactly (raw features, tol 1e-12, its float32 C grid); "
                   "dinoprobe: standardised features, tol 1e-4 (the same optimum to far below a grid step, faster)")
@click.option("--normalize", type=click.Choice(["none", "standardize", "l2"]), default=None,
              help="Feature normalisation [default: standardize; dinov3: none]")
@click.option("--c-grid", callback=_comma_list(Number(float, low=0.0, low_open=True)), default=None,
              help=f"Comma list of C values [default: 10**linspace(-6, 5, {len(DEFAULT_C_GRID)})]")
@click.option("--tol", type=Number(float, low=0.0, low_open=True), default=None,
              help="L-BFGS gradient tolerance [default: 1e-4; dinov3: 1e-12]")
@click.option("--solver", type=click.Choice(["torch", "sklearn"]), default="torch", show_default=True,
              help="torch: batched L-BFGS over all C at once; sklearn: the reference, one fit per C")
@click.option("--max-iter", type=POSITIVE_INT, default=1000, show_default=True)
@CLASS_WEIGHT_OPTION
@DEVICE_OPTION
def logreg(cache_dir, out, overwrite, shots, tries, protocol, feature, normalize, c_grid, tol, solver, max_iter,
           class_weight, device):
    """Logistic regression: C chosen on val, refit on train+val (not in few-shot), scored on test."""
    from dinoprobe.estimators.logreg import LogReg
    from dinoprobe.runs.experiments import run_logreg

    given = {k: v for k, v in (("normalize", normalize), ("Cs", c_grid), ("tol", tol)) if v is not None}
    make = LogReg.dinov3 if protocol == "dinov3" else LogReg
    estimator = make(**given, max_iter=max_iter, solver=solver, class_weight=class_weight, shots=shots, tries=tries,
                     device=device, progress=True)
    metrics = run_logreg(cache_dir, out, estimator, feature=feature, overwrite=overwrite)
    best = estimator.val_score_per_C_[estimator.Cs_.index(estimator.best_C_)]
    what = "val mAP" if estimator.multilabel_ else "val top-1"
    click.echo(f"best C {estimator.best_C_:.3g} ({what} {best:.4f} of {len(estimator.Cs_)} values)")
    _print_metrics(metrics, f"{out} (head.pt is a linear head usable by predict)")


@main.command()
@_run_options
@click.option("--feature", type=FeatureType(), default="cls", show_default=True, help=FEATURE_HELP)
@click.option("--k", "ks", callback=_comma_list(Number(int, low=1)), default=",".join(map(str, KNN_KS)),
              show_default=True, help="Neighbour counts to choose from on val")
@click.option("--temperature", type=Number(float, low=0.0, low_open=True), default=KNN_TEMPERATURE,
              show_default=True)
@DEVICE_OPTION
def knn(cache_dir, out, overwrite, shots, tries, feature, ks, temperature, device):
    """Weighted k-NN on L2-normalised features (DINO's protocol); k chosen on val. Writes no head.pt."""
    from dinoprobe.estimators.knn import KNN
    from dinoprobe.runs.experiments import run_knn

    estimator = KNN(ks=tuple(ks), temperature=temperature, shots=shots, tries=tries, device=device, progress=True)
    metrics = run_knn(cache_dir, out, estimator, feature=feature, overwrite=overwrite)
    per_k = "map_per_k" if estimator.multilabel_ else "top1_per_k"
    for split, scores in metrics[per_k].items():
        click.echo(f"{split} {'mAP' if estimator.multilabel_ else 'top-1'}: "
                   + ", ".join(f"k={k} {a:.4f}" for k, a in scores.items()))
    click.echo(f"chosen k={estimator.best_k_}")
    _print_metrics(metrics, out)


if __name__ == "__main__":
    main()
