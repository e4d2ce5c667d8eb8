"""scikit-learn estimators over feature arrays: `Probe`, `Sweep`, `LogReg`, `KNN`.

`X` is any (N, D) float array or tensor: features from a dinoprobe cache (`load_cache`) or from anywhere else.
All four share `fit(X, y, *, X_val=None, y_val=None)`. Without validation data, a stratified validation split
is carved from the training data, as `dinoprobe features` does. The CLI's probe, sweep, logreg and knn commands
are these estimators plus a cache loader and a run directory.
"""
from __future__ import annotations

import warnings
from dataclasses import fields

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import ParameterGrid
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d

from dinoprobe.batches import AugmentedViews
from dinoprobe.device import resolve_device
from dinoprobe.engine import TrainConfig, train_heads
from dinoprobe.errors import DinoprobeError
from dinoprobe.fewshot import sample_shots
from dinoprobe.heads import Normalizer, build_head
from dinoprobe.splitting import carve_indices
from dinoprobe.stream import StreamedTrainSplit

TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
# DINOv3's linear evaluation: 13 learning rates, SGD with momentum 0.9, cosine schedule, lr scaled by batch/256
DINOV3_LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
PRESETS = ("dinov3-linear",)
# scikit-learn checks deliberately not passed (check_estimator(..., expected_failed_checks=...)), and why
EXPECTED_FAILED_CHECKS = {
    "KNN": {"check_methods_subset_invariance": "similarities are float32 matrix products, whose blocking (so the "
                                               "last bits of each vote) depends on the batch size"},
}


# ------------------------------------------------------------------------------------------ input checks
def as_features(X, name: str = "X") -> torch.Tensor:
    """An (N, D) finite float32 tensor from an array-like or tensor, or a ValueError naming the problem."""
    if isinstance(X, torch.Tensor):
        if X.dim() != 2:
            raise DinoprobeError(f"{name} must be 2-D (samples, features), got shape {tuple(X.shape)}")
        X = X.detach().float()
        if len(X) and not torch.isfinite(X).all():
            raise DinoprobeError(f"{name} contains NaN or infinity; remove or impute those rows first")
        return X
    try:
        array = check_array(X, dtype=(np.float32, np.float64), input_name=name)
    except ValueError as err:
        raise DinoprobeError(str(err)) from None
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def as_labels(y, n: int, name: str = "y") -> np.ndarray:
    if y is None:
        raise DinoprobeError("this estimator requires y to be passed, but the target y is None")
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    try:
        y = column_or_1d(y, warn=True)  # a column vector is accepted with scikit-learn's warning
    except ValueError:
        raise DinoprobeError(f"{name} must be 1-D (one label per sample), got shape {y.shape}") from None
    if len(y) != n:
        raise DinoprobeError(f"{name} has {len(y)} labels for {n} samples; they must have the same length")
    check_classification_targets(y)
    return y


class _Classifier(ClassifierMixin, BaseEstimator):
    """Validation, label encoding and the validation split shared by the four estimators; `predict_proba`
    comes from each one's `_scores` (logits or votes, (N, classes))."""

    def fit(self, X, y, *, X_val=None, y_val=None):
        """Fit on (X, y), choosing the model on (X_val, y_val) or on a split carved from X; returns self.

        With `shots`, fits `tries` models, each on K training images per class drawn with the try number as
        seed, and evaluated on the untouched validation data; the estimator then predicts with try 0, and
        tries_ / try_estimators_ hold every try (see `few_shot`)."""
        x_tr, y_tr, x_val, y_val, positions = self._train_and_val(X, y, X_val, y_val, self.val_fraction, self.seed)
        rows = self._shot_rows(y_tr, x_tr)
        if rows is None:
            return self._fit_encoded(x_tr, y_tr, x_val, y_val)
        fitted = self._fit_tries(x_tr, y_tr, x_val, y_val, rows)
        self.try_estimators_ = fitted
        self.tries_ = [{"seed": t, "train_index": positions[r.numpy()], "val_score": est.best_score_}
                       for t, (r, est) in enumerate(zip(rows, fitted))]
        self.__dict__.update({k: v for k, v in fitted[0].__dict__.items()
                              if k.endswith("_") and not k.startswith("_")})  # predict with try 0
        return self

    def _fit_tries(self, x_tr, y_tr, x_val, y_val, rows) -> list:
        """One fitted copy per try (Probe overrides this to train the tries side by side)."""
        return [self._fitted_copy()._fit_encoded(x_tr[r], y_tr[r], x_val, y_val) for r in rows]

    def _fitted_copy(self):
        """A new estimator with these parameters (shots off) and this fit's classes and width."""
        copy = type(self)(**{**self.get_params(), "shots": None, "tries": 1})
        copy.classes_, copy.n_features_in_ = self.classes_, self.n_features_in_
        return copy

    def _shot_rows(self, y_tr: torch.Tensor, x_tr) -> list[torch.Tensor] | None:
        """Each try's training rows (positions in x_tr) when `shots` is set, else None."""
        if self.shots is None:
            return None
        if not isinstance(x_tr, torch.Tensor):
            raise DinoprobeError("few-shot training samples rows of in-memory features; drop --views/--max-memory")
        if not (isinstance(self.tries, (int, np.integer)) and self.tries >= 1):
            raise DinoprobeError(f"tries must be an integer >= 1, got {self.tries!r}")
        draws = [sample_shots(y_tr.numpy(), self.shots, seed=t) for t in range(self.tries)]
        short = {str(self.classes_[c]): n for _, s in draws for c, n in s.items()}
        self.few_shot_ = {"shots": str(self.shots), "tries": int(self.tries), "short_classes": short}
        if short:
            warnings.warn(f"few-shot: {len(short)} class(es) have fewer than {self.shots} training images and keep "
                          f"all of them: {dict(list(short.items())[:5])}", stacklevel=3)
        return [torch.from_numpy(rows) for rows, _ in draws]

    def _train_and_val(self, X, y, X_val, y_val, fraction: float, seed: int):
        """(train features or source, encoded train labels, val features, encoded val labels, positions of the
        train rows in X); sets classes_ and n_features_in_."""
        if (X_val is None) != (y_val is None):
            raise DinoprobeError("pass both X_val and y_val, or neither (a validation split is then carved from X)")
        source = X if isinstance(X, (AugmentedViews, StreamedTrainSplit)) else None
        X = X if source is not None else as_features(X)
        y = as_labels(y, len(X))
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DinoprobeError(f"y holds {len(self.classes_)} class; a classifier needs at least 2 classes")
        self.n_features_in_ = int(X.shape[1])
        if X_val is None:
            if source is not None:
                raise DinoprobeError("augmented views and streamed features need X_val and y_val")
            train_pos, val_pos = carve_indices(y_enc, fraction, seed)
            return (X[train_pos], torch.from_numpy(y_enc[train_pos]), X[val_pos], torch.from_numpy(y_enc[val_pos]),
                    train_pos)
        X_val = self._check_width(as_features(X_val, "X_val"))
        y_val = as_labels(y_val, len(X_val), "y_val")
        if len(X_val) == 0:
            raise DinoprobeError("X_val is empty; pass validation rows or leave X_val out to carve them from X")
        return X, torch.from_numpy(y_enc), X_val, torch.from_numpy(self._encode(y_val)), np.arange(len(y_enc))

    def _encode(self, labels: np.ndarray) -> np.ndarray:
        """Positions in classes_; labels never seen in training become -1 (never predicted, always wrong)."""
        pos = np.searchsorted(self.classes_, labels).clip(0, len(self.classes_) - 1)
        return np.where(self.classes_[pos] == labels, pos, -1).astype(np.int64)

    def _check_width(self, X: torch.Tensor) -> torch.Tensor:
        if X.shape[1] != self.n_features_in_:
            raise DinoprobeError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                                 f"{self.n_features_in_} features as input")
        return X

    def _features(self, X) -> torch.Tensor:
        check_is_fitted(self)
        return self._check_width(as_features(X))

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(self._scores(self._features(X)).double(), dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        best = self._scores(self._features(X)).argmax(1).numpy()
        return self.classes_[best]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


# ---------------------------------------------------------------------------------------------------- Probe
class Probe(_Classifier):
    """A linear or MLP head trained on features by dinoprobe's engine, keeping the epoch with the best
    validation accuracy.

    Parameters are those of `dinoprobe probe`; the defaults are the original script's MLP head
    (D -> 256 -> ReLU -> Dropout(0.1) -> C) with Adam 1e-3, for 100 epochs with a per-step cosine schedule.
    `val_fraction` is the stratified share of X held out for validation when fit gets no X_val.

    Fitted attributes: classes_, n_features_in_, head_ (an nn.Sequential), normalizer_, history_ (one dict per
    epoch), best_epoch_, best_score_ (validation accuracy at best_epoch_), train_seconds_.
    """

    def __init__(self, head="mlp", hidden=256, dropout=0.1, optimizer="adam", lr=1e-3, weight_decay=0.0,
                 momentum=0.9, nesterov=False, batch_size=256, epochs=100, warmup_epochs=0, label_smoothing=0.0,
                 patience=None, normalize="none", val_fraction=0.1, seed=0, shots=None, tries=1, device="auto",
                 progress=False):
        self.head = head
        self.hidden = hidden
        self.dropout = dropout
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.nesterov = nesterov
        self.batch_size = batch_size
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.label_smoothing = label_smoothing
        self.patience = patience
        self.normalize = normalize
        self.val_fraction = val_fraction
        self.seed = seed
        self.shots = shots
        self.tries = tries
        self.device = device
        self.progress = progress

    def train_config(self, **overrides) -> TrainConfig:
        """This estimator's parameters as the engine's per-head config."""
        params = {k: v for k, v in self.get_params().items() if k in TRAIN_FIELDS}
        return TrainConfig(**{**params, **overrides})

    def _fit_encoded(self, x_tr, y_tr, x_val, y_val):
        device = resolve_device(self.device)
        result, = train_heads([self.train_config()], _to(x_tr, device), y_tr.to(device), x_val.to(device),
                              y_val.to(device), len(self.classes_), progress=self.progress, desc="probe")
        return self._set_result(result)

    def _fit_tries(self, x_tr, y_tr, x_val, y_val, rows) -> list:
        """Every try side by side in the engine (each head on its own rows)."""
        device = resolve_device(self.device)
        results = train_heads([self.train_config()] * len(rows), x_tr.to(device), y_tr.to(device), x_val.to(device),
                              y_val.to(device), len(self.classes_), progress=self.progress, desc="probe tries",
                              rows=rows)
        return [self._fitted_copy()._set_result(r) for r in results]

    def _set_result(self, result):
        self.config_ = result.config
        self.head_ = build_head(result.config.head_spec(self.n_features_in_, len(self.classes_)), result.config.seed,
                                state=result.best_state).eval()
        self.normalizer_ = result.normalizer.cpu()
        self.history_, self.step_losses_ = result.history, result.step_losses
        self.best_epoch_, self.best_score_, self.train_seconds_ = result.best_epoch, result.best_val_acc, result.seconds
        return self

    @torch.no_grad()
    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.head_(self.normalizer_(part)) for part in X.split(65536)]) if len(X) \
            else torch.zeros(0, len(self.classes_))

    def save(self, path, cache=None, class_names=None):
        """Write a head file that `dinoprobe predict` and `export` accept (read with weights_only=True).

        cache: the FeatureSplits (or cache folder) the features came from, so predict can rebuild the backbone
        and transform; without it the file records no backbone and serves Python use only."""
        from dinoprobe.runs import save_head

        check_is_fitted(self)
        return save_head(path, self.head_, self.config_.head_spec(self.n_features_in_, len(self.classes_)),
                         self.normalizer_, _class_names(self, class_names), cache, self.config_.to_dict())


def _to(x, device):
    """Train features to the device; a streamed split already reads onto its own."""
    return x if isinstance(x, StreamedTrainSplit) else x.to(device)


def _class_names(estimator, class_names=None) -> list[str]:
    """Names for classes_: class_names[label] for integer labels from a cache, else str(label)."""
    if class_names is not None:
        return [class_names[int(c)] for c in estimator.classes_]
    return [str(c) for c in estimator.classes_]


# ---------------------------------------------------------------------------------------------------- Sweep
class Sweep(_Classifier):
    """Every combination of `param_grid` (Probe parameters -> lists of values) trained side by side by the engine,
    the best on validation kept, as GridSearchCV does with cross-validation.

    The other parameters are Probe's and apply to every configuration. `preset="dinov3-linear"` searches DINOv3's
    linear evaluation: a linear head, SGD with momentum 0.9, 13 learning rates from 1e-5 to 0.1 scaled by
    batch_size / 256 (param_grid entries other than lr are added to it). `max_memory` (bytes) caps the heads
    trained at once.

    Fitted attributes: results_ (one dict per configuration, in grid order, ready for pandas.DataFrame),
    best_index_, best_params_, best_score_, best_estimator_ (a fitted Probe), classes_, n_features_in_.
    """

    def __init__(self, param_grid=None, preset=None, head="mlp", hidden=256, dropout=0.1, optimizer="adam", lr=1e-3,
                 weight_decay=0.0, momentum=0.9, nesterov=False, batch_size=256, epochs=100, warmup_epochs=0,
                 label_smoothing=0.0, patience=None, normalize="none", val_fraction=0.1, seed=0, shots=None,
                 tries=1, device="auto", max_memory=None, progress=False):
        self.param_grid = param_grid
        self.preset = preset
        self.head = head
        self.hidden = hidden
        self.dropout = dropout
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.nesterov = nesterov
        self.batch_size = batch_size
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.label_smoothing = label_smoothing
        self.patience = patience
        self.normalize = normalize
        self.val_fraction = val_fraction
        self.seed = seed
        self.shots = shots
        self.tries = tries
        self.device = device
        self.max_memory = max_memory
        self.progress = progress

    def _probe_params(self) -> dict:
        return {k: v for k, v in self.get_params().items() if k in Probe().get_params()}

    def grid(self) -> dict[str, list]:
        """The searched grid: param_grid, with the preset's entries first."""
        grid = dict(self.param_grid or {})
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise DinoprobeError(f"unknown preset {self.preset!r}; presets are {', '.join(PRESETS)}")
            sizes = grid.get("batch_size", [self.batch_size])
            if len(sizes) != 1:
                raise DinoprobeError("preset dinov3-linear scales lr by one batch size; give a single batch_size")
            grid = {"head": ["linear"], "optimizer": ["sgd"], "momentum": [0.9],
                    "lr": [lr * sizes[0] / 256 for lr in DINOV3_LINEAR_LRS],
                    **{k: v for k, v in grid.items() if k != "lr"}}
        unknown = sorted(set(grid) - set(TRAIN_FIELDS))
        if unknown:
            raise DinoprobeError(f"unknown grid parameters {unknown}; grid parameters are {', '.join(TRAIN_FIELDS)}")
        for key, values in grid.items():
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not len(list(values)):
                raise DinoprobeError(f"param_grid[{key!r}] must be a non-empty list of values")
        return {k: list(v) for k, v in grid.items()}

    def configurations(self) -> list[tuple[dict, TrainConfig]]:
        """The grid's combinations (scikit-learn's ParameterGrid order), each as Probe parameters with its
        engine config; a linear head ignores hidden and dropout, so combinations differing only there collapse."""
        base = Probe(**self._probe_params())
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
        """Train every configuration (and, with `shots`, every try of each) side by side; keep the best
        configuration on validation accuracy (the mean over tries); returns self."""
        combos = self.configurations()
        device = resolve_device(self.device)
        x_tr, y_tr, x_val, y_val, positions = self._train_and_val(X, y, X_val, y_val, self.val_fraction, self.seed)
        tries = self._shot_rows(y_tr, x_tr)
        configs = [cfg for _, cfg in combos]
        per = 1 if tries is None else len(tries)
        results = train_heads([cfg for cfg in configs for _ in range(per)], _to(x_tr, device), y_tr.to(device),
                              x_val.to(device), y_val.to(device), len(self.classes_), self.max_memory,
                              progress=self.progress, desc="sweep",
                              rows=None if tries is None else [r for _ in configs for r in tries])
        by_config = [results[i * per:(i + 1) * per] for i in range(len(configs))]
        scores = [float(np.mean([r.best_val_acc for r in rs])) for rs in by_config]
        self.results_ = []
        for (params, _), rs, score in zip(combos, by_config, scores):
            row = {**params, "val_top1": score, "best_epoch": rs[0].best_epoch, "epochs_run": rs[0].epochs_run,
                   "group": rs[0].group, "group_size": rs[0].group_size, "group_seconds": round(rs[0].seconds, 3)}
            if tries is not None:
                row.update({"val_top1_std": float(np.std([r.best_val_acc for r in rs])), "tries": per})
            self.results_.append(row)
        self.configs_ = configs
        self.best_index_ = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the earliest
        self.best_params_ = combos[self.best_index_][0]
        self.best_score_ = scores[self.best_index_]
        best = Probe(**{**self._probe_params(), **self.best_params_})
        best.classes_, best.n_features_in_ = self.classes_, self.n_features_in_
        fitted = [best._fitted_copy()._set_result(r) for r in by_config[self.best_index_]]
        best._set_result(by_config[self.best_index_][0])
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


# --------------------------------------------------------------------------------------------------- LogReg
class LogReg(_Classifier):
    """DINOv3's logistic-regression protocol: L2-regularised multinomial logistic regression (scikit-learn's
    objective) for every C in `Cs`, solved together by a batched L-BFGS; C chosen on validation accuracy, then
    refit on train + validation. solver="sklearn" runs scikit-learn's LogisticRegression once per C instead.

    Fitted attributes: coef_ (classes, D), intercept_ (classes,), best_C_, val_score_per_C_, n_iter_, normalizer_,
    selection_coef_ / selection_intercept_ (the train-only model at best_C_ that chose it), classes_.
    """

    def __init__(self, Cs=None, normalize="standardize", max_iter=1000, tol=1e-4, solver="torch", val_fraction=0.1,
                 seed=0, shots=None, tries=1, device="auto"):
        self.Cs = Cs
        self.normalize = normalize
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.val_fraction = val_fraction
        self.seed = seed
        self.shots = shots
        self.tries = tries
        self.device = device

    def _fit_encoded(self, x_tr, y_tr, x_val, y_val):
        from dinoprobe.baselines import DEFAULT_C_GRID, fit_logreg

        cs = [float(c) for c in (DEFAULT_C_GRID if self.Cs is None else self.Cs)]
        if not cs or any(c <= 0 for c in cs):
            raise DinoprobeError(f"Cs must be positive values, got {self.Cs}")
        if self.solver not in ("torch", "sklearn"):
            raise DinoprobeError(f"solver must be 'torch' or 'sklearn', got {self.solver!r}")
        device = resolve_device(self.device)
        k = len(self.classes_)
        self.normalizer_ = Normalizer.fit(self.normalize, x_tr)
        x_tr, x_val = self.normalizer_(x_tr).to(device), self.normalizer_(x_val).to(device)
        w, b, iterations = fit_logreg(x_tr, y_tr.to(device), k, cs, self.solver, self.max_iter, self.tol)
        val_pred = (torch.einsum("nd,kcd->knc", x_val, w) + b[:, None]).argmax(-1).cpu()
        self.val_score_per_C_ = ((val_pred == y_val).sum(1) / len(y_val)).tolist()
        best = int(np.argmax(self.val_score_per_C_))
        self.best_C_, self.Cs_, self.best_score_ = cs[best], cs, self.val_score_per_C_[best]
        self.selection_coef_, self.selection_intercept_ = w[best].cpu(), b[best].cpu()
        w, b, refit_iterations = fit_logreg(torch.cat([x_tr, x_val]), torch.cat([y_tr, y_val]).to(device), k,
                                            [cs[best]], self.solver, self.max_iter, self.tol)
        self.coef_, self.intercept_ = w[0].cpu(), b[0].cpu()
        self.n_iter_ = np.array([refit_iterations[0]])  # L-BFGS iterations of the final fit, as scikit-learn's
        self.n_iter_per_C_ = list(iterations)
        return self

    def _scores(self, X, selection: bool = False):
        w, b = (self.selection_coef_, self.selection_intercept_) if selection else (self.coef_, self.intercept_)
        return self.normalizer_(X) @ w.t() + b

    def selection_predict_proba(self, X) -> np.ndarray:
        """Probabilities from the train-only model at best_C_: honest validation scores, since the final model
        (predict_proba) was refit on the validation data too."""
        return torch.softmax(self._scores(self._features(X), selection=True).double(), dim=1).numpy()

    def head(self):
        """The fitted model as a linear head (build_head's layout), for run directories and head files."""
        from dinoprobe.heads import HeadSpec

        spec = HeadSpec("linear", self.n_features_in_, len(self.classes_))
        return build_head(spec, state={"0.weight": self.coef_, "0.bias": self.intercept_}).eval(), spec

    def save(self, path, cache=None, class_names=None):
        """A linear head file that `dinoprobe predict` and `export` accept (see Probe.save)."""
        from dinoprobe.runs import save_head

        check_is_fitted(self)
        head, spec = self.head()
        config = {"method": "logreg", "normalize": self.normalize, "solver": self.solver, "best_C": self.best_C_}
        return save_head(path, head, spec, self.normalizer_, _class_names(self, class_names), cache, config)


# ------------------------------------------------------------------------------------------------------ KNN
class KNN(_Classifier):
    """DINO's weighted k-NN on L2-normalised features: each of the k nearest training rows (cosine similarity)
    votes for its class with weight exp(similarity / temperature); k chosen from `ks` on validation accuracy.

    Fitted attributes: best_k_, val_score_per_k_ ({k: accuracy}), classes_, n_features_in_.
    """

    def __init__(self, ks=(10, 20, 100, 200), temperature=0.07, val_fraction=0.1, seed=0, shots=None, tries=1,
                 device="auto"):
        self.ks = ks
        self.temperature = temperature
        self.val_fraction = val_fraction
        self.seed = seed
        self.shots = shots
        self.tries = tries
        self.device = device

    def _fit_encoded(self, x_tr, y_tr, x_val, y_val):
        from dinoprobe.baselines import knn_scores

        ks = sorted({int(k) for k in (self.ks if hasattr(self.ks, "__iter__") else [self.ks])})
        if not ks or ks[0] < 1:
            raise DinoprobeError(f"ks must be positive integers, got {self.ks}")
        if not self.temperature > 0:
            raise DinoprobeError(f"temperature must be > 0, got {self.temperature}")
        self.device_ = resolve_device(self.device)
        self.bank_x_, self.bank_y_ = x_tr.to(self.device_), y_tr.to(self.device_)
        scores = knn_scores(self.bank_x_, self.bank_y_, x_val.to(self.device_), len(self.classes_), ks,
                            self.temperature)
        self.val_score_per_k_ = {k: (s.argmax(1) == y_val).sum().item() / len(y_val) for k, s in scores.items()}
        self.best_k_ = max(self.val_score_per_k_, key=lambda k: (self.val_score_per_k_[k], -k))
        self.best_score_ = self.val_score_per_k_[self.best_k_]
        return self

    def _scores(self, X, ks=None):
        from dinoprobe.baselines import knn_scores

        scores = knn_scores(self.bank_x_, self.bank_y_, X.to(self.device_), len(self.classes_),
                            ks or [self.best_k_], self.temperature)
        return scores if ks else scores[min(self.best_k_, len(self.bank_y_))]

    def score_per_k(self, X, y) -> dict[int, float]:
        """Accuracy on (X, y) for every k in ks (capped at the number of training rows)."""
        X, y = self._features(X), self._encode(as_labels(y, len(X)))
        return {k: float((s.argmax(1).numpy() == y).mean()) for k, s in self._scores(X, sorted(self.ks)).items()}

    def predict_proba(self, X) -> np.ndarray:
        votes = self._scores(self._features(X)).double()
        return (votes / votes.sum(1, keepdim=True).clamp_min(1e-300)).numpy()
