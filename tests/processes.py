"""Python processes for the tests that need one of their own (signals, kill -9, locks, file-size limits, a
resident-memory peak) without paying the interpreter's imports each time: torch, timm and scikit-learn take
10-15 s to import on 2 cores, the work under test well under one. Each process is a fork of a server that
imported them once and ran nothing (multiprocessing's forkserver), so it starts with no threads and no CUDA
context, like a new interpreter; its command line is Python's (`-m dinoprobe ...` or `-c CODE ...`).

What a fork cannot be is kept for real interpreters (`subprocess`): what a process imports (it starts with the
server's modules), its interpreter shutdown (a fork exits with os._exit after the command, as multiprocessing's
children do: no atexit handlers, no garbage collection at exit), torchrun, and shell pipelines.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what `python -m dinoprobe` and the tests' code snippets import (import errors are ignored by the server)
PRELOAD = ["numpy", "torch", "torchvision", "timm", "h5py", "PIL.Image", "sklearn.linear_model", "sklearn.metrics",
           "click", "tqdm", "safetensors.torch", "jsonschema", "dinoprobe.cli", "dinoprobe.extract.run",
           "dinoprobe.extract.backbone", "dinoprobe.train.loop", "dinoprobe.estimators", "dinoprobe.runs.predict"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _stream(fd: int, target: str | None, unbuffered: bool):
    """Point file descriptor `fd` at `target` (a path, or None: closed) and give Python a text stream on it as a new
    interpreter would (stderr line-buffered; both write-through with PYTHONUNBUFFERED)."""
    if target is None:
        os.close(fd)
        return None
    opened = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(opened, fd)
    os.close(opened)
    binary = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
    return io.TextIOWrapper(binary, encoding="utf-8", errors="backslashreplace" if fd == 2 else "strict",
                            line_buffering=fd == 2 and not unbuffered, write_through=unbuffered)


def _child(argv: list[str], env: dict, cwd: str, stdout: str | None, stderr: str | None,
           file_size_kib: int | None) -> None:
    # multiprocessing made its own start method this process's default; a new interpreter has none (fork on Linux)
    multiprocessing.set_start_method(None, force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if file_size_kib is not None:  # bash's `ulimit -f`, with SIGXFSZ ignored: writes past it fail with EFBIG
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_kib * 1024, file_size_kib * 1024))
    try:  # the resident peak (VmHWM) is this process's own from here, not the server's import-time one
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdout, sys.stderr = _stream(1, stdout, unbuffered), _stream(2, stderr, unbuffered)
    if argv[0] == "-W":  # -W ignore
        import warnings

        warnings.simplefilter(argv[1])
        argv = argv[2:]
    try:
        if argv[:2] == ["-m", "dinoprobe"]:
            sys.argv = ["-m", *argv[2:]]
            runpy.run_module("dinoprobe", run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - a test's code
        else:
            raise ValueError(f"unsupported command line {argv[:2]}")
    except SystemExit:
        raise
    except KeyboardInterrupt:  # as the interpreter does: the traceback, then death by SIGINT
        traceback.print_exc()
        sys.stderr and sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1) from None


class Process:
    """A started process, the part of subprocess.Popen the tests use. Its stdout and stderr go to files (a path, or
    by default files of its own, read by `output` and `communicate`); None closes one, as `2>&-` does."""

    def __init__(self, argv, env=None, cwd=REPO, stdout=True, stderr=True, file_size_kib=None):
        self._dir = tempfile.TemporaryDirectory(prefix="dinoprobe-process-")
        self.stdout_path = Path(self._dir.name) / "stdout" if stdout is True else stdout
        self.stderr_path = Path(self._dir.name) / "stderr" if stderr is True else stderr
        self.args = list(map(str, argv))
        full_env = {**os.environ, **(env or {})}
        self._process = _forkserver().Process(
            target=_child, args=(self.args, full_env, str(cwd), _path(self.stdout_path), _path(self.stderr_path),
                                 file_size_kib))
        self._process.start()
        self.pid = self._process.pid
        self.returncode = None

    def poll(self):
        self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def output(self, which: str) -> str:
        path = self.stdout_path if which == "stdout" else self.stderr_path
        return Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""  # not /dev/full

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.output("stdout"), self.output("stderr")


def _path(target):
    return None if target is None else str(target)


def run(argv, env=None, cwd=REPO, timeout=300, file_size_kib=None, stdout=True, stderr=True
        ) -> subprocess.CompletedProcess:
    """subprocess.run(..., capture_output=True, text=True) for a Python command line ARGV, in a fork of the server."""
    process = Process(argv, env, cwd, stdout, stderr, file_size_kib)
    try:
        out, err = process.communicate(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)

