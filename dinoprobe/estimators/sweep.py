"""`Sweep`: a grid of `Probe` configurations trained side by side by the engine, as GridSearchCV wraps an estimator."""
from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import ParameterGrid
from sklearn.utils.validation import check_is_fitted

from dinoprobe.device import resolve_device
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.base import FEW_SHOT_VAL_FRACTION, _Classifier, class_weights, sample_std
from dinoprobe.estimators.probe import Probe, _to, diverged_message
from dinoprobe.settings import PRESETS, PROTOCOLS
from dinoprobe.train.config import SETTINGS, TrainConfig
from dinoprobe.train.loop import train_heads

# what a linear-evaluation preset fixes (besides its learning rates and features)
PRESET_SETTINGS = ("head", "optimizer", "momentum", "weight_decay", "batch_size", "epochs", "epoch_length",
                   "warmup_epochs", "init", "select", "normalize", "label_smoothing")


class Sweep(_Classifier):
    """Every combination of `param_grid` (TrainConfig fields -> lists of values) over `estimator` (a `Probe`, whose
    other parameters apply to every configuration), trained side by side by the engine; the best on validation
    accuracy is kept, as GridSearchCV does with cross-validation.

    `preset="dinov3-linear"` (or "dinov2-linear") is that code's linear evaluation exactly (settings.PROTOCOLS): a
    linear head initialised N(0, 0.01), SGD momentum 0.9 without weight decay, batch 128, 10 epochs of 1,250
    iterations from an endless shuffled stream, cosine to 0 per iteration, 13 learning rates x batch / 256, the
    final iteration's heads with the best chosen on validation. param_grid entries replace the preset's.
    `max_memory` (bytes) caps the heads trained at once (default: half of the device's available memory). A grid
    key that is not a training setting, or a value out of its range, is refused before any training starts.

    Fitted attributes: results_ (one dict per configuration, in grid order, ready for pandas.DataFrame), configs_,
    best_index_, best_params_, best_score_, best_estimator_ (a fitted Probe), classes_, n_features_in_. With a
    multi-label y, configurations are ranked on validation macro mAP (results_' `val_map`) instead of accuracy.
    """

    def __init__(self, estimator=None, param_grid=None, preset=None, max_memory=None):
        self.estimator = estimator
        self.param_grid = param_grid
        self.preset = preset
        self.max_memory = max_memory

    def base_estimator(self) -> Probe:
        """A fresh copy of the wrapped Probe (Probe() when none was given)."""
        if self.estimator is None:
            return Probe()
        if not isinstance(self.estimator, Probe):
            raise DinoprobeError(f"Sweep wraps a Probe, got {type(self.estimator).__name__}")
        return clone(self.estimator)

    def grid(self) -> dict[str, list]:
        """The searched grid: the preset's settings (each a one-value entry, so param_grid or the estimator can
        override them) and its 13 learning rates x batch_size / 256, then param_grid's entries."""
        grid = dict(self.param_grid or {})
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise DinoprobeError(f"unknown preset {self.preset!r}; presets are {', '.join(PRESETS)}")
            protocol = PROTOCOLS[self.preset]
            sizes = grid.get("batch_size", [protocol["batch_size"]])
            if len(sizes) != 1:
                raise DinoprobeError(f"preset {self.preset} scales lr by one batch size; give a single batch_size")
            fixed = {k: [protocol[k]] for k in PRESET_SETTINGS}
            fixed["lr"] = [lr * sizes[0] / 256 for lr in protocol["lrs"]]
            grid = {**fixed, **grid}
        unknown = sorted(set(grid) - set(SETTINGS))
        if unknown:
            raise DinoprobeError(f"unknown grid parameters {unknown}; a grid searches training settings: "
                                 f"{', '.join(SETTINGS)}")
        for key, values in grid.items():
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not len(list(values)):
                raise DinoprobeError(f"param_grid[{key!r}] must be a non-empty list of values")
        return {k: list(v) for k, v in grid.items()}

    def configurations(self) -> list[tuple[dict, TrainConfig]]:
        """The grid's combinations (scikit-learn's ParameterGrid order), each as its parameters with its engine
        config (checked: a bad value fails here); a linear head ignores hidden and dropout, so combinations
        differing only there collapse."""
        base = self.base_estimator()
        out, seen = [], set()
        for params in ParameterGrid(self.grid()):
            cfg = base.train_config(**params)
            if cfg.head == "linear":
                cfg = base.train_config(**{**params, "hidden": base.hidden, "dropout": base.dropout})
            if cfg not in seen:
                seen.add(cfg)
                out.append((params, cfg))
        return out

    def fit(self, X, y, *, X_val=None, y_val=None):
        """Train every configuration (and, with the estimator's `shots`, every try of each) side by side; keep the
        best configuration on validation accuracy (the mean over tries); returns self."""
        combos = self.configurations()
        base = self.base_estimator()
        device = resolve_device(base.device)
        fraction = FEW_SHOT_VAL_FRACTION if base.shots is not None else base.val_fraction
        x_tr, y_tr, x_val, y_val, positions = self._train_and_val(X, y, X_val, y_val, fraction, base.seed)
        tries = self._shot_rows(y_tr, x_tr, base.shots, base.tries)
        configs = [cfg for _, cfg in combos]
        per = 1 if tries is None else len(tries)
        results = train_heads([cfg for cfg in configs for _ in range(per)], _to(x_tr, device), y_tr.to(device),
                              x_val.to(device), y_val.to(device), len(self.classes_), self.max_memory,
                              progress=base.progress, desc="sweep",
                              rows=None if tries is None else [r for _ in configs for r in tries],
                              class_weights=class_weights(base.class_weight, self.classes_, y_tr.numpy()))
        by_config = [results[i * per:(i + 1) * per] for i in range(len(configs))]
        scores = [float(np.mean([r.best_val_acc for r in rs])) for rs in by_config]
        key = "val_map" if self.multilabel_ else "val_top1"  # what the heads were chosen on
        self.results_ = []
        for (params, _), rs, score in zip(combos, by_config, scores):
            row = {**params, key: score, "best_epoch": rs[0].best_epoch, "epochs_run": rs[0].epochs_run,
                   "group": rs[0].group, "group_size": rs[0].group_size, "group_seconds": round(rs[0].seconds, 3)}
            if tries is not None:
                row.update({f"{key}_std": sample_std([r.best_val_acc for r in rs]), "tries": per})
            diverged = [r.diverged_epoch for r in rs if r.diverged_epoch is not None]
            row["diverged_epoch"] = min(diverged) if diverged else None
            self.results_.append(row)
        usable = [i for i, rs in enumerate(by_config) if all(r.best_val_acc >= 0 for r in rs)]
        if not usable:
            raise DinoprobeError(f"every configuration diverged; {diverged_message(by_config[0][0])}")
        self.configs_ = configs
        self.best_index_ = max(usable, key=lambda i: (scores[i], -i))  # ties: the earliest
        self.best_params_ = combos[self.best_index_][0]
        self.best_score_ = scores[self.best_index_]
        best = base.set_params(**self.best_params_)
        best.classes_, best.n_features_in_, best.multilabel_ = self.classes_, self.n_features_in_, self.multilabel_
        if self.multilabel_:
            best.label_dtype_ = self.label_dtype_
        fitted = [best._fitted_copy()._set_result(r) for r in by_config[self.best_index_]]
        best._set_result(by_config[self.best_index_][0])._tune_thresholds(x_val, y_val)
        if self.multilabel_:
            self.thresholds_ = best.thresholds_
        if tries is not None:
            best.few_shot_, best.try_estimators_ = self.few_shot_, fitted
            best.tries_ = [{"seed": t, "train_index": positions[r.numpy()], "val_score": est.best_score_}
                           for t, (r, est) in enumerate(zip(tries, fitted))]
        self.best_estimator_ = best
        return self

    def _scores(self, X):
        return self.best_estimator_._scores(X)

    def save(self, path, cache=None, class_names=None):
        """The best configuration's head file (see Probe.save)."""
        check_is_fitted(self)
        return self.best_estimator_.save(path, cache, class_names)
