"""Run directories: everything a run leaves behind appears at once, or not at all.

A run is written into an exclusively created temporary sibling (`.OUT.tmp-*`), every file fsynced, and renamed
into place when complete, so a crash or Ctrl-C leaves the previous run whole or the new one whole, never a mix;
an existing run is replaced only when asked (--overwrite).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from dinoprobe import documents
from dinoprobe.atomic import fsync_dir, fsync_file, leftovers, temporary_name
from dinoprobe.errors import DinoprobeError
from dinoprobe.paths import resolved

# what a run directory holds; --overwrite replaces a folder only when it holds nothing else
RUN_FILES = {"head.pt", "metrics.json", "run.json", "history.csv", "curves.png", "confusion.png", "results.csv",
             "results.json", "sweep.png", "best", "ap.png", "predictions.csv"}


def recover(out: Path) -> None:
    """Finish what a killed run left: a previous run moved aside (`.OUT.old-*`) while `out` is missing is put back;
    unfinished new runs (`.OUT.tmp-*`) of dead processes are removed."""
    if not out.exists():
        olds = leftovers(out, "old")
        if olds:
            os.replace(olds[-1], out)
    for stale in leftovers(out, "tmp") + leftovers(out, "old"):
        shutil.rmtree(stale, ignore_errors=True)


def run_command(out: Path) -> str | None:
    """The command that wrote the run directory `out` (run.json's `command`), or None if it is not one."""
    info = documents.run_info(out)
    if info is None:
        return None
    if not {p.name for p in out.iterdir()} <= RUN_FILES:
        return None  # a run directory with the user's own files in it: not ours to delete
    return info.get("command") or (info.get("config") or {}).get("method") or "probe"


def check_run_dir(out: Path, overwrite: bool, command: str = "probe", protect=()) -> None:
    """Refuse, before any work: an `out` that is not a folder of its own (/, ., ..), one that is or holds a cache
    in `protect`, an existing folder unless --overwrite, and even then anything but a run directory written by the
    same command; and a parent folder this process cannot write."""
    out = Path(out)
    recover(out)
    if out.name in ("", ".", "..") or resolved(out) == resolved(out).parent:
        raise DinoprobeError(f"--out '{out}' is not a run directory name; choose a new folder such as runs/my-run")
    for cache_dir in protect:
        cache_dir = resolved(cache_dir)
        if resolved(out) == cache_dir or resolved(out) in cache_dir.parents or cache_dir in resolved(out).parents:
            raise DinoprobeError(f"--out '{out}' overlaps the cache {cache_dir}; write runs outside the cache")
    if out.exists():
        if not out.is_dir():
            raise DinoprobeError(f"'{out}' exists and is not a folder; choose another --out")
        if not overwrite:
            raise DinoprobeError(f"'{out}' already exists; pass --overwrite to replace it, or choose another --out")
        found = run_command(out)
        if found != command:
            what = f"a `{found}` run" if found else "not a dinoprobe run directory (or holds other files too)"
            raise DinoprobeError(f"--overwrite replaces only a `{command}` run directory, and '{out}' is {what}; "
                                 "choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DinoprobeError(f"cannot write '{out}': '{parent}' is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DinoprobeError(f"cannot write into '{parent}' (a read-only file system, or no write permission); "
                             "choose an --out you can write")


@contextlib.contextmanager
def run_directory(out: str | Path, overwrite: bool = False, command: str = "probe", protect=()):
    """Yields a temporary folder to write the run into; on success it replaces `out` in one rename (the old run,
    if any and if overwrite, is moved aside first and removed only after the new one is in place; a kill between
    the two renames is repaired by the next run, `recover`). On any error nothing changes."""
    out = Path(out)
    check_run_dir(out, overwrite, command, protect)
    try:
        tmp = temporary_name(out, directory=True)
    except OSError as err:
        raise DinoprobeError(f"cannot create the run directory beside '{out}' ({err.strerror}); check the disk and "
                             "the permissions of its folder") from None
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        fsync_dir(tmp)
        check_run_dir(out, overwrite, command, protect)  # another process may have written it meanwhile
        old = None
        if out.exists():
            old = temporary_name(out, directory=True, kind="old")
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and "inline_container" in str(err)):
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:120]
            raise DinoprobeError(f"writing the run directory '{out}' failed ({reason}); nothing was "
                                 "replaced — free disk space or fix permissions and rerun") from None
        raise
