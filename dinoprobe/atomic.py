"""One way to write a file: readers see the old content or the new, never a mix, and nothing follows a planted link.

The rule, for cache shards and manifests, head files, exports and run directories alike: write into a temporary
name created exclusively (O_EXCL, a random suffix) in the target's own folder, fsync the file, rename it over the
target, fsync the folder. A crash leaves at most a `.NAME.tmp-*` file beside the target, never a half-written one
under the target's name.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path

TMP_MARK = ".tmp-"


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (a no-op where the platform cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path, directory: bool = False, kind: str = "tmp") -> Path:
    """A new temporary file (or folder) beside `path`, created exclusively (O_EXCL: never a planted link's target)
    as `.NAME.KIND-PID-RANDOM`, so leftovers of a killed process can be told from those of a live one (`leftovers`).
    Its mode is what the umask leaves of 0666 (folders 0777), as for any file a program creates; mkstemp's 0600 kept
    caches, runs and exports from the colleagues and services meant to read them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{kind}-{os.getpid()}-"
    for _ in range(100):
        candidate = path.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            # whatever the umask, the owner can read and write what it made (it reopens it by name to write)
            if directory:
                os.mkdir(candidate, 0o777)
                mode = os.lstat(candidate).st_mode  # not followed: a link swapped in since is left alone
                if stat.S_ISDIR(mode) and mode & 0o700 != 0o700:
                    os.chmod(candidate, mode | 0o700)
            else:
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    os.fchmod(fd, os.fstat(fd).st_mode | 0o600)
                finally:
                    os.close(fd)
            return candidate
        except FileExistsError:  # another process's temporary, or something planted there: a new name
            continue
    raise FileExistsError(f"no free temporary name beside {path} after 100 tries")


def leftovers(path: Path, kind: str = "tmp") -> list[Path]:
    """Temporary siblings of `path` (`.NAME.KIND-PID-*`) whose process is gone."""
    out = []
    for sibling in path.parent.glob(f".{path.name}.{kind}-*"):
        pid = sibling.name[len(f".{path.name}.{kind}-"):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            out.append(sibling)
    return sorted(out)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path to write by name (h5py, torch.save); on success it replaces `path` durably, on any
    error it is removed and `path` is untouched."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class _KeepsWriteErrors:
    """A binary file that remembers the OSError a write met. torch.save turns a failed write into its own
    RuntimeError ("unexpected pos 2752 vs 2646") and drops the system's reason (No space left on device)."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.fh.flush()


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """`atomic_path` for writers that take an open binary file (torch.save): a failed write is raised as the
    system's OSError, whatever the writer made of it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        keeper = _KeepsWriteErrors(fh)
        try:
            yield keeper
        except Exception:
            if keeper.error is not None:
                raise keeper.error from None
            raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))
