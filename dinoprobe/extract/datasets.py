"""What the extraction's DataLoader iterates: image files or bytes (decoded and transformed in the workers) and
CIFAR-style arrays, each item with its label, index, skip reason and augmented views; `collate` keeps the skips;
`DecodingLoader` is the DataLoader `features` and `predict` run them with."""
from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch
from PIL import Image

from dinoprobe.device import SHARED_MEMORY, loader_prefetch, shared_memory_free
from dinoprobe.errors import DinoprobeError
from dinoprobe.extract.transforms import DataConfig, Views, worker_transform
from dinoprobe.imagefiles import SkippedInput, check_encoded_size, load_rgb
from dinoprobe.settings import DEFAULT_MAX_PIXELS


class ImageFileDataset(torch.utils.data.Dataset):
    """Items (pixels, label, index, skip reason, views): pixels uint8 (3, S, S) from PIL and the eval transform,
    or whatever `decode(path)` returns (decode.py: the same from torchvision, or a JPEG's bytes)."""

    def __init__(self, samples: list[tuple[str, int]], config: DataConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
                 views: Views | None = None, decode=None, reader=None):
        self.samples, self.transform, self.max_pixels, self.views = samples, worker_transform(config), max_pixels, views
        self.decode, self.reader = decode, reader  # reader: key -> bytes, for sources whose keys are not files
        self.resize_to = config.resize_size
        pixels = 3 * config.image_size ** 2
        # one item's size in a batch, for the loader's shared-memory budget: decoded pixels and views (JPEG bytes
        # left for the device to decode are far smaller, and not counted)
        self.input_bytes = (0 if getattr(decode, "encoded", False) else pixels) + pixels * (views.count if views else 0)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            check_encoded_size(self._size(path), self.max_pixels)
            source = path if self.reader is None else self.reader.read(path)
            if isinstance(source, bytes):  # a source that cannot tell the size before reading (Hugging Face rows)
                check_encoded_size(len(source), self.max_pixels)
            if self.decode is None:
                image = load_rgb(source, self.max_pixels, self.resize_to)
                pixels = self.transform(image)
            else:
                pixels = self.decode(source)
                # augmentations work on PIL images
                image = load_rgb(source, self.max_pixels, self.resize_to) if self.views else None
        except SkippedInput as err:
            return None, label, index, str(err), None
        return pixels, label, index, None, self.views(image, index) if self.views else None


    def _size(self, path: str) -> int:
        """The input's size in bytes before reading it, -1 when unknown (a missing file: the read reports it)."""
        if self.reader is not None:
            return self.reader.size(path)
        try:
            return os.path.getsize(path)
        except OSError:
            return -1


class ArrayDataset(torch.utils.data.Dataset):
    """CIFAR-style uint8 HWC arrays; resizing happens batched on the device (`Preprocess`)."""

    def __init__(self, array: np.ndarray, samples: list[tuple[str, int]], views: Views | None = None,
                 image_size: int = 0):
        self.array, self.samples, self.views = array, samples, views
        # one item's size in a batch: the array as stored (resized later, on the device), and any views
        self.input_bytes = (array[0].nbytes if len(array) else 0) + 3 * image_size ** 2 * (views.count if views else 0)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int):
        pixels = np.ascontiguousarray(self.array[index])
        views = self.views(Image.fromarray(pixels), index) if self.views else None
        return torch.from_numpy(pixels).permute(2, 0, 1), self.samples[index][1], index, None, views


def collate(batch):
    """Stack what decoded (and its augmented views, if any); hand back what did not with its reason."""
    good = [b for b in batch if b[3] is None]
    skipped = [(b[2], b[3]) for b in batch if b[3] is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped, None
    views = torch.stack([b[4] for b in good]) if good[0][4] is not None else None
    pixels = [b[0] for b in good]
    # encoded JPEGs, left for the device to decode (decode.py), cannot be stacked: they stay a list
    pixels = torch.stack(pixels) if all(p.dim() == 3 for p in pixels) else pixels
    return (pixels, torch.tensor([b[1] for b in good], dtype=torch.long),
            torch.tensor([b[2] for b in good], dtype=torch.long), skipped, views)


class DecodingLoader:
    """torch's DataLoader over one of these datasets, `collate`d, for `features` and `predict`: each worker keeps as
    many batches in shared memory as /dev/shm holds (device.loader_prefetch, which warns where not even one fits).
    Iterate it inside `with loader.explaining_failures():`, which turns a worker the system stopped (out of memory,
    or a bus error when /dev/shm fills) into an error that names the fix instead of torch's traceback: torch
    reports it from its SIGCHLD handler, wherever the main process is at that moment, so the whole loop is covered,
    not only the fetching of batches. `input_bytes`: one input's size in a batch (the datasets' `input_bytes`).
    `batches`: the dataset positions of each batch, in order (each at most `batch_size`), instead of consecutive
    runs of `batch_size`."""

    def __init__(self, dataset, batch_size: int, workers: int, input_bytes: int, pin_memory: bool = False,
                 warn: bool = True, batches: list[list[int]] | None = None):
        self.batch_bytes, self.workers = batch_size * input_bytes, workers
        self.prefetch, warning = loader_prefetch(workers, self.batch_bytes)
        if warning and warn:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        batching = {"batch_sampler": batches} if batches is not None else {"batch_size": batch_size, "shuffle": False}
        self.loader = torch.utils.data.DataLoader(dataset, **batching, num_workers=workers, collate_fn=collate,
                                                  pin_memory=pin_memory, prefetch_factor=self.prefetch,
                                                  persistent_workers=False)
        self._batches = None

    def __iter__(self):
        self._batches = iter(self.loader)  # kept, so that a failure can stop its workers at once (_stop_workers)
        return self._batches

    def _stop_workers(self, err: BaseException) -> None:
        """Shut the remaining workers down now. Left to themselves they live as long as the error does (its traceback
        holds torch's iterator), and when they exit, torch's SIGCHLD handler raises its own "DataLoader worker exited
        unexpectedly" for the dead one, wherever the main process is by then — while the CLI prints this error, say:
        a traceback after all (seen once in a full test run). The handler is set aside (process-wide, so only
        meanwhile) while the iterator, its last reference dropped, stops the workers and forgets their pids."""
        import gc
        import signal
        import threading
        import traceback

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main and hasattr(signal, "SIGCHLD") else None
        try:
            while err is not None:  # the frames of torch's iterator in this error and in the ones it happened during
                traceback.clear_frames(err.__traceback__)
                err = err.__context__
            self._batches = None
            gc.collect()  # in case the iterator sits in a reference cycle
        finally:
            if previous is not None:
                signal.signal(signal.SIGCHLD, previous)

    def _stop_workers_despite_torch(self, err: BaseException) -> None:
        """_stop_workers, again if torch's SIGCHLD handler raised its "DataLoader worker ... killed" for the dead
        worker before _stop_workers had set it aside (a few bytecodes' window; seen once in a full test run, after
        a worker's broken connection)."""
        attempts = self.workers + 2  # each raise is one worker's exit
        for attempt in range(attempts):
            try:
                return self._stop_workers(err)
            except RuntimeError as again:
                if "DataLoader worker" not in str(again) or attempt == attempts - 1:
                    raise
                err = again

    @contextlib.contextmanager
    def explaining_failures(self):
        try:
            yield
        except RuntimeError as err:
            if "DataLoader worker" not in str(err):
                raise
            self._stop_workers_despite_torch(err)
            reason = str(err)[:120].strip()
        except (EOFError, ConnectionError) as err:
            # a worker killed while it hands a batch over: the pipe or the socket its tensors' shared memory is
            # passed through breaks before torch has noticed the worker is gone (seen once, in a full test run)
            if not self.workers:
                raise
            self._stop_workers_despite_torch(err)
            reason = f"{type(err).__name__} from a worker's connection{': ' + str(err)[:80] if str(err) else ''}"
        else:
            return
        free = shared_memory_free()
        where = (f"; {SHARED_MEMORY} has {free / 2**20:.0f} MB free and this run keeps up to {self.workers} x "
                 f"{self.prefetch} batches of {self.batch_bytes / 2**20:.1f} MB there"
                 if free is not None and self.batch_bytes else "")
        raise DinoprobeError(f"a decoding worker process died ({reason}): the system stopped it, most often for lack "
                             f"of memory{where}. Outputs already written are kept: rerun with fewer --workers, a "
                             "smaller --batch-size, or --workers 0 (a `features` rerun resumes; in Docker, "
                             "--shm-size raises the shared memory)")
