"""Device and precision choices shared by extraction, training and prediction."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from dinoprobe.errors import DinoprobeError


def resolve_device(device="auto") -> torch.device:
    """auto (the first GPU when there is one), cpu, cuda, cuda:N or mps, checked against what this machine has."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DinoprobeError(f"'{device}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DinoprobeError(f"--device {device} requested but no CUDA GPU is visible; use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise DinoprobeError(f"--device {device} requested but this machine has {count} CUDA GPU(s): "
                                 f"cuda:0..cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DinoprobeError("--device mps requested but Metal is not available; use --device cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on CUDA (tensor cores), fp32 on CPU (bf16 matmuls are slower on most CPUs)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (taskset, SLURM's --cpus-per-task,
    container cpusets pin a process to fewer cores than the machine has), else every core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def local_processes(world: int = 1) -> int:
    """The processes torchrun started on this machine (LOCAL_WORLD_SIZE; `world` when it is not set): they share its
    cores and its memory, each holding its own backbone and batches."""
    value = os.environ.get("LOCAL_WORLD_SIZE", str(world))
    try:
        return max(1, int(value))
    except ValueError:
        raise DinoprobeError(f"LOCAL_WORLD_SIZE={value!r} is not a number of processes; unset it, or start the "
                             "command with torchrun, which sets it") from None


def default_workers(device: torch.device, ranks: int = 1) -> int:
    """DataLoader processes for decoding. On a CPU with few cores the backbone's matmuls use every core, and
    worker processes preempting them cost more than decoding in-process (measured on 2 cores: 0.94 of the bare
    forward in-process, 0.87 with 2 workers; decoding is ~7 ms of ~90 ms per 224-px image). With more cores, or a
    GPU to feed, decoding moves to workers. `ranks` processes of one machine (torchrun) share its cores."""
    cores = max(1, usable_cores() // max(1, ranks))
    if device.type == "cpu":
        return 0 if cores <= 4 else max(1, cores // 8)
    return min(8, max(1, cores - 1))


# what a result depends on beyond its settings: numerics move by ulps between releases of these
PACKAGES = ("dinoprobe", "torch", "torchvision", "timm", "numpy", "scikit-learn", "h5py")


def environment(device: torch.device | None = None) -> dict:
    """What produced a result, for run.json, the cache manifest and evaluate's table: when (UTC), Python and package
    versions (read from the installed metadata, so nothing is imported), and the device."""
    import datetime
    import importlib.metadata
    import platform

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    packages = {name: version(name) for name in PACKAGES}
    packages["torch"] = str(torch.__version__)  # with its build (+cu130); a plain str (TorchVersion is a class)
    info = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "packages": packages}
    if device is not None:
        device = torch.device(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{usable_cores()} cores"
        info["device"] = f"{device} ({name})"
    return info


SHARED_MEMORY = "/dev/shm"  # where DataLoader workers hand their batches to the main process (Linux)


def shared_memory_free(path: str = SHARED_MEMORY) -> int | None:
    """Bytes free in the shared-memory filesystem, None where there is none to measure (macOS, Windows)."""
    try:
        stat = os.statvfs(path)
    except (AttributeError, OSError):
        return None
    return stat.f_bavail * stat.f_frsize


def loader_prefetch(workers: int, batch_bytes: int, wanted: int = 4) -> tuple[int | None, str | None]:
    """(prefetch_factor, warning) for a DataLoader whose `workers` each hold up to prefetch_factor batches of
    `batch_bytes` in shared memory: `wanted` where it fits, fewer where /dev/shm is small (Docker's default is
    64 MB, where 8 workers x 4 batches of 64 images at 224 px, 300 MB, die with a bus error), and a warning that
    names the fix where not even one batch per worker fits."""
    if workers == 0:
        return None, None
    free = shared_memory_free()
    if free is None or workers * wanted * batch_bytes <= free:
        return wanted, None
    fits = free // max(1, workers * batch_bytes)
    if fits >= 1:
        return int(min(wanted, fits)), None
    return 1, (f"{workers} loader workers x 1 batch of {batch_bytes / 2**20:.1f} MB need more shared memory than "
               f"{SHARED_MEMORY} has free ({free / 2**20:.0f} MB): workers may die with a bus error. Use fewer "
               "--workers or a smaller --batch-size (in Docker, --shm-size raises it)")


def memory_available(device: torch.device) -> int | None:
    """Bytes this device can still give: a GPU's free memory, or on the host the least of MemAvailable (Linux) and
    what this process's memory cgroup still allows (cgroup_memory_left); None where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    host = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limits = [v for v in (host, cgroup_memory_left()) if v is not None]
    return min(limits) if limits else None


UNLIMITED = 2**62  # cgroup v1 writes "no limit" as the largest page-aligned 64-bit number


def cgroup_memory_left(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """What the memory limit of this process's cgroup (Docker's --memory, a Kubernetes limit, a SLURM job) still
    allows, or None without one. MemAvailable is the whole machine's, and past a container's limit the kernel's
    OOM killer ends the process without a word. Like `docker stats`, the page cache the kernel can drop
    (inactive files) counts as free; every ancestor cgroup's limit applies too. cgroup v2 and v1."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2: one tree, memory.max / memory.current
            mount, names = Path(root), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own tree
            mount, names = (Path(root) / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                   "total_inactive_file"))  # v1's usage counts the children too
        else:
            continue
        folder = mount / path.strip().lstrip("/")
        while True:  # up to the mount, which is the container's own cgroup under a cgroup namespace
            if (room := _cgroup_room(folder, *names)) is not None:
                left.append(room)
            if folder == mount or mount not in folder.parents:
                break
            folder = folder.parent
    return min(left) if left else None


def _cgroup_room(folder: Path, limit_file: str, usage_file: str, reclaimable: str) -> int | None:
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= UNLIMITED:
            return None
        usage = int((folder / usage_file).read_text())
        stat = dict(line.split()[:2] for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        return max(0, int(limit) - usage + int(stat.get(reclaimable, 0)))
    except (OSError, ValueError):
        return None
