"""dinoprobe: run a frozen DINOv3 backbone once, cache its features in HDF5, train heads on the cache.

The estimators (`Probe`, `Sweep`, `LogReg`, `KNN`) and the cache loader are imported on first use, so
`import dinoprobe` and the command line stay fast."""

__version__ = "0.2.0"

from dinoprobe.errors import DinoprobeError  # noqa: E402,F401

_LAZY = {"Probe": "estimators", "Sweep": "estimators", "LogReg": "estimators", "KNN": "estimators",
         "load_cache": "tensors", "TrainConfig": "engine", "train_heads": "engine"}
__all__ = ["DinoprobeError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dinoprobe.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dinoprobe' has no attribute {name!r}")
