"""`--data` to a `DataSource`: which kind of input a string names."""
from __future__ import annotations

from pathlib import Path

from dinoprobe.errors import DinoprobeError
from dinoprobe.extract import filelists
from dinoprobe.extract.datasource import DataSource
from dinoprobe.extract.folders import CIFAR, cifar_source, folder_source
from dinoprobe.settings import TASKS


def open_source(data: str, data_dir: str = "data", val_fraction: float = 0.1, seed: int = 0,
                image_column: str | None = None, label_column: str | None = None, task: str = "auto",
                label_sep: str | None = None) -> DataSource:
    """--data: an ImageFolder tree, cifar10/cifar100, a .csv/.tsv file list, a Hugging Face dataset (save_to_disk
    folder, Parquet folder, hf:OWNER/NAME[:CONFIG]) or WebDataset tar shards (filelists.py).

    task: auto (multi-label when the data has rows with several labels or none), single or multilabel (a
    single-label source then becomes multi-label data with one label per image). label_sep: CSV label cells hold
    several names separated by it."""
    if task not in TASKS:
        raise DinoprobeError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    path = Path(data)
    if label_sep is not None and path.suffix.lower() not in (".csv", ".tsv"):
        raise DinoprobeError("--label-sep splits the label cells of a CSV/TSV file list; other sources give "
                             "several labels as lists (Hugging Face) or JSON lists (tar shards)")
    if data.lower() in CIFAR:
        source = cifar_source(data.lower(), data_dir, val_fraction, seed)
    elif path.suffix.lower() in (".csv", ".tsv"):
        if not path.is_file():
            raise DinoprobeError(f"--data '{data}': no such file list")
        source = filelists.csv_source(path, val_fraction, seed, task, label_sep)
    elif data.startswith("hf:") or filelists.is_hf_folder(path):
        source = filelists.hf_source(data, val_fraction, seed, image_column, label_column, task)
    elif filelists.is_webdataset(data):
        source = filelists.webdataset_source(data, val_fraction, seed, label_column, task)
    else:
        source = folder_source(path, val_fraction, seed)
    if task == "multilabel" and not source.multilabel:  # folders and CIFAR: one label per image, as label sets
        source.splits = {split: [(key, (label,)) for key, label in rows] for split, rows in source.splits.items()}
        source.task = "multilabel"
    return source
