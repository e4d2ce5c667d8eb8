"""dinoprobe: run a frozen DINOv3 backbone once, cache its features in HDF5, train heads on the cache.

The estimators (`Probe`, `Sweep`, `LogReg`, `KNN`), the cache loader and the functions that write run directories
(`run_probe`, `run_sweep`, `run_logreg`, `run_knn`) are imported on first use, so `import dinoprobe` and the
command line stay fast."""

__version__ = "0.2.0"

from dinoprobe.errors import DinoprobeError  # noqa: E402,F401

_LAZY = {"Probe": "estimators.probe", "Sweep": "estimators.sweep", "LogReg": "estimators.logreg",
         "KNN": "estimators.knn", "load_cache": "cache.arrays", "TrainConfig": "train.config",
         "train_heads": "train.loop", "run_probe": "runs.experiments", "run_sweep": "runs.experiments",
         "run_logreg": "runs.experiments", "run_knn": "runs.experiments", "evaluate": "runs.evaluate",
         "score_run": "runs.score"}
__all__ = ["DinoprobeError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dinoprobe.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dinoprobe' has no attribute {name!r}")
