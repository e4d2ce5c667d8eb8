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

from dinoprobe.atomic import fsync_dir, fsync_file, temporary_name
from dinoprobe.errors import DinoprobeError


def check_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing run unless asked."""
    if out.exists() and not overwrite:
        raise DinoprobeError(f"'{out}' already exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise DinoprobeError(f"'{out}' exists and is not a folder; choose another --out")


@contextlib.contextmanager
def run_directory(out: str | Path, overwrite: bool = False):
    """Yields a temporary folder to write the run into; on success it replaces `out` in one rename (the old run,
    if any and if overwrite, is removed only after the new one is in place). On any error nothing changes."""
    out = Path(out)
    check_run_dir(out, overwrite)
    tmp = temporary_name(out, directory=True)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        fsync_dir(tmp)
        check_run_dir(out, overwrite)  # another process may have written it meanwhile
        old = None
        if out.exists():
            old = temporary_name(out, directory=True)
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
