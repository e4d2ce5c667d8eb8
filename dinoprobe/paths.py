"""Resolving the paths users give."""
from __future__ import annotations

import errno
import os
from pathlib import Path


def resolved(path) -> Path:
    """Path(path).resolve(), with a symbolic-link loop (a link to itself, two links to each other) the OSError
    (ELOOP) that opening it gives, which the command line turns into one line, instead of Python 3.11's
    RuntimeError from pathlib (3.13 raises nothing and leaves the error to the first open)."""
    try:
        return Path(path).resolve()
    except RuntimeError:  # pathlib's only RuntimeError here: "Symlink loop from ..."
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None
