"""`--data` to a `DataSource`: which kind of input a string names."""
from __future__ import annotations

from pathlib import Path

from dinoprobe.errors import DinoprobeError
from dinoprobe.extract import filelists
from dinoprobe.extract.datasource import DataSource
from dinoprobe.extract.folders import CIFAR, cifar_source, folder_source


def open_source(data: str, data_dir: str = "data", val_fraction: float = 0.1, seed: int = 0,
                image_column: str | None = None, label_column: str | None = None) -> DataSource:
    """--data: an ImageFolder tree, cifar10/cifar100, a .csv/.tsv file list, a Hugging Face dataset (save_to_disk
    folder, Parquet folder, hf:OWNER/NAME[:CONFIG]) or WebDataset tar shards (filelists.py)."""
    if data.lower() in CIFAR:
        return cifar_source(data.lower(), data_dir, val_fraction, seed)
    path = Path(data)
    if path.suffix.lower() in (".csv", ".tsv"):
        if not path.is_file():
            raise DinoprobeError(f"--data '{data}': no such file list")
        return filelists.csv_source(path, val_fraction, seed)
    if data.startswith("hf:") or filelists.is_hf_folder(path):
        return filelists.hf_source(data, val_fraction, seed, image_column, label_column)
    if filelists.is_webdataset(data):
        return filelists.webdataset_source(data, val_fraction, seed, label_column)
    return folder_source(path, val_fraction, seed)
