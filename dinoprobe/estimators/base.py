"""What the four estimators share: input checks at the boundary, label encoding, the validation split, few-shot
tries, and scikit-learn's classifier interface (`predict_proba` from each estimator's `_scores`)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d

from dinoprobe.cache.stream import non_finite_rows
from dinoprobe.errors import DinoprobeError
from dinoprobe.splits import carve_indices, sample_shots
from dinoprobe.train.ranking import f1_thresholds
from dinoprobe.train.sources import TrainSource

# with few-shot training and no validation data, DINOv3 carves 1 % of train (dinov3/eval/log_regression.py)
FEW_SHOT_VAL_FRACTION = 0.01
# scikit-learn checks deliberately not passed (check_estimator(..., expected_failed_checks=...)), and why
EXPECTED_FAILED_CHECKS = {
    "Probe": {"check_class_weight_classifiers": "the kept head is the best epoch on (weighted) val accuracy, which "
                                                "its 1000:0.0001 weights saturate at epoch 2, before the head has "
                                                "learned to predict class 0 everywhere; with select='last' (the "
                                                "fully trained head) the check passes (checked by hand)"},
    "KNN": {"check_methods_subset_invariance": "similarities are float32 matrix products, whose blocking (so the "
                                               "last bits of each vote) depends on the batch size",
            "check_classifiers_multilabel_output_format_predict_proba": "a multi-label probability is the share of the "
                                                                        "k neighbours' vote weight carrying the class: "
                                                                        "exactly 0 or 1 when all k agree, where the "
                                                                        "check wants values strictly inside (0, 1)"},
}


# ------------------------------------------------------------------------------------------ input checks
def as_features(X, name: str = "X") -> torch.Tensor:
    """An (N, D) finite float32 tensor from an array-like or tensor, or a ValueError naming the problem."""
    if isinstance(X, torch.Tensor):
        if X.dim() != 2:
            raise DinoprobeError(f"{name} must be 2-D (samples, features), got shape {tuple(X.shape)}")
        X = X.detach().float()
        if len(non_finite_rows(X)):
            raise DinoprobeError(f"{name} contains NaN or infinity; remove or impute those rows first")
        return X
    try:
        array = check_array(X, dtype=(np.float32, np.float64), input_name=name)
    except ValueError as err:
        raise DinoprobeError(str(err)) from None
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def as_labels(y, n: int, name: str = "y") -> np.ndarray:
    """Labels (n,), or a multi-label (n, classes) 0/1 indicator matrix as scikit-learn's multi-label estimators
    take it; a ValueError naming the problem otherwise."""
    if y is None:
        raise DinoprobeError("this estimator requires y to be passed, but the target y is None")
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        if len(y) != n:
            raise DinoprobeError(f"{name} has {len(y)} rows for {n} samples; they must have the same length")
        if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():  # sklearn's own test also lets {0, 2} in
            raise DinoprobeError(f"{name} is 2-D {y.shape} but not a 0/1 indicator matrix (samples, classes); pass "
                                 "one label per sample, or 1 where a sample has a class and 0 elsewhere")
        return y
    try:
        y = column_or_1d(y, warn=True)  # a column vector is accepted with scikit-learn's warning
    except ValueError:
        raise DinoprobeError(f"{name} must be 1-D (one label per sample), got shape {y.shape}") from None
    if len(y) != n:
        raise DinoprobeError(f"{name} has {len(y)} labels for {n} samples; they must have the same length")
    try:
        check_classification_targets(y)
    except TypeError:  # e.g. a mix of strings and numbers, or None among the labels: they cannot be ordered
        raise DinoprobeError(f"{name} mixes label types ({sorted({type(v).__name__ for v in y})}); use one type for "
                             "every label, all strings or all integers") from None
    return y


class _Classifier(ClassifierMixin, BaseEstimator):
    """Validation, label encoding and the validation split shared by the four estimators; `predict_proba`
    comes from each one's `_scores` (logits or votes, (N, classes))."""

    def fit(self, X, y, *, X_val=None, y_val=None):
        """Fit on (X, y), choosing the model on (X_val, y_val) or on a split carved from X; returns self.

        With `shots`, fits `tries` models, each on K training images per class drawn with the try number as
        seed, and evaluated on the untouched validation data; the estimator then predicts with try 0, and
        tries_ / try_estimators_ hold every try (see `few_shot`)."""
        fraction = FEW_SHOT_VAL_FRACTION if self.shots is not None else self.val_fraction
        x_tr, y_tr, x_val, y_val, positions = self._train_and_val(X, y, X_val, y_val, fraction, self.seed)
        rows = self._shot_rows(y_tr, x_tr, self.shots, self.tries)
        if rows is None:
            self._fit_encoded(x_tr, y_tr, x_val, y_val)
            return self._tune_thresholds(x_val, y_val)
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
        copy = clone(self).set_params(shots=None, tries=1)
        copy.classes_, copy.n_features_in_, copy.multilabel_ = self.classes_, self.n_features_in_, self.multilabel_
        if self.multilabel_:
            copy.label_dtype_ = self.label_dtype_
        return copy

    def _shot_rows(self, y_tr: torch.Tensor, x_tr, shots, tries) -> list[torch.Tensor] | None:
        """Each try's training rows (positions in x_tr) when `shots` is set, else None."""
        if shots is None:
            return None
        if self.multilabel_:
            raise DinoprobeError("few-shot training draws K images per class, and a multi-label image belongs to "
                                 "several classes (or none), so 'K per class' is no single draw; train on the full "
                                 "split (drop shots / --shots)")
        if not isinstance(x_tr, torch.Tensor):
            raise DinoprobeError("few-shot training samples rows of in-memory features; drop --views/--max-memory")
        if not (isinstance(tries, (int, np.integer)) and tries >= 1):
            raise DinoprobeError(f"tries must be an integer >= 1, got {tries!r}")
        draws = [sample_shots(y_tr.numpy(), shots, seed=t) for t in range(tries)]
        short = {str(self.classes_[c]): n for _, s in draws for c, n in s.items()}
        self.few_shot_ = {"shots": str(shots), "tries": int(tries), "short_classes": short}
        if short:
            warnings.warn(f"few-shot: {len(short)} class(es) have fewer than {shots} training images and keep "
                          f"all of them: {dict(list(short.items())[:5])}", stacklevel=3)
        return [torch.from_numpy(rows) for rows, _ in draws]

    def _train_and_val(self, X, y, X_val, y_val, fraction: float, seed: int):
        """(train features or source, encoded train labels, val features, encoded val labels, positions of the
        train rows in X); sets classes_ and n_features_in_."""
        if (X_val is None) != (y_val is None):
            raise DinoprobeError("pass both X_val and y_val, or neither (a validation split is then carved from X)")
        source = X if isinstance(X, TrainSource) and not isinstance(X, (torch.Tensor, np.ndarray)) else None
        X = X if source is not None else as_features(X)
        y = as_labels(y, len(X))
        self.multilabel_ = y.ndim == 2
        if self.multilabel_:
            return self._multilabel_train_and_val(X, y, X_val, y_val, fraction, seed, source)
        try:
            self.classes_, y_enc = np.unique(y, return_inverse=True)
        except TypeError:  # e.g. a mix of strings and numbers, or None among the labels
            raise DinoprobeError(f"y mixes label types ({sorted({type(v).__name__ for v in y})}); use one type for "
                                 "every label, all strings or all integers") from None
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
        y_val_enc = self._encode(y_val)
        if (y_val_enc < 0).any():  # model selection on a class no head can predict is silently wrong
            unknown = sorted({str(v) for v in np.asarray(y_val)[y_val_enc < 0]})
            raise DinoprobeError(f"y_val holds {len(unknown)} label(s) that y lacks: {unknown[:5]}; validation "
                                 "labels must be among the training classes")
        return X, torch.from_numpy(y_enc), X_val, torch.from_numpy(y_val_enc), np.arange(len(y_enc))

    def _multilabel_train_and_val(self, X, y, X_val, y_val, fraction, seed, source):
        """`_train_and_val` for an (N, classes) indicator y: classes_ are the column numbers, as in scikit-learn's
        multi-label estimators; validation is carved unstratified (a row belongs to several classes)."""
        self.classes_ = np.arange(y.shape[1])
        self.label_dtype_ = y.dtype
        self.n_features_in_ = int(X.shape[1])
        y_enc = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        if not y_enc.any():
            raise DinoprobeError("y has no positive label at all (every row is all 0); nothing to learn")
        if X_val is None:
            if source is not None:
                raise DinoprobeError("augmented views and streamed features need X_val and y_val")
            train_pos, val_pos = carve_indices(y_enc, fraction, seed, stratified=False)
            return X[train_pos], y_enc[train_pos], X[val_pos], y_enc[val_pos], train_pos
        X_val = self._check_width(as_features(X_val, "X_val"))
        y_val = as_labels(y_val, len(X_val), "y_val")
        if y_val.ndim != 2 or y_val.shape[1] != y.shape[1]:
            raise DinoprobeError(f"y_val must be an indicator matrix with y's {y.shape[1]} columns, got shape "
                                 f"{y_val.shape}")
        if len(X_val) == 0:
            raise DinoprobeError("X_val is empty; pass validation rows or leave X_val out to carve them from X")
        return X, y_enc, X_val, torch.from_numpy(np.ascontiguousarray(y_val, dtype=np.float32)), np.arange(len(y))

    def _tune_thresholds(self, x_val, y_val):
        """Multi-label: each class's decision threshold on its probability, the one that maximises its F1 on the
        validation rows (0.5 for a class without validation positives)."""
        if self.multilabel_:
            self.thresholds_ = f1_thresholds(torch.from_numpy(self._validation_probabilities(x_val.cpu())),
                                             y_val.cpu()).numpy()
        else:  # a refit on single-label data must not keep an earlier multi-label fit's thresholds
            self.__dict__.pop("thresholds_", None)
        return self

    def _validation_probabilities(self, x_val) -> np.ndarray:
        """Probabilities the thresholds are tuned on (LogReg: its train-only model's, as the refit saw val)."""
        return self._probabilities(self._scores(x_val))

    def _probabilities(self, scores: torch.Tensor) -> np.ndarray:
        """Softmax over the classes, or each class's sigmoid for multi-label heads."""
        scores = scores.double()
        return (torch.sigmoid(scores) if getattr(self, "multilabel_", False) else torch.softmax(scores, 1)).numpy()

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
        """X to predict on, as a CPU tensor: fitted models live on the CPU (k-NN moves it to its bank's device)."""
        check_is_fitted(self)
        return self._check_width(as_features(X)).cpu()

    def predict_proba(self, X) -> np.ndarray:
        """(N, classes): class probabilities, or, multi-label, each class's own probability."""
        return self._probabilities(self._scores(self._features(X)))

    def predict(self, X) -> np.ndarray:
        """Labels (N,), or multi-label the (N, classes) indicator of the classes over their tuned thresholds."""
        if getattr(self, "multilabel_", False):
            return (self.predict_proba(X) >= self.thresholds_).astype(self.label_dtype_)
        best = self._scores(self._features(X)).argmax(1).numpy()
        return self.classes_[best]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        tags.classifier_tags.multi_label = True
        return tags


def class_weights(class_weight, classes: np.ndarray, y_enc: np.ndarray):
    """scikit-learn's class_weight as a float32 tensor over the encoded classes (or None): "balanced" is
    n_rows / (n_classes x rows of the class), by sklearn.utils.class_weight; a dict gives {label: weight}, the
    classes it leaves out weight 1. Multi-label y (N, classes): see `label_weights`."""
    if class_weight is None:
        return None
    if np.ndim(y_enc) == 2:
        return label_weights(class_weight, classes, np.asarray(y_enc))
    weights = np.ones(len(classes))
    if isinstance(class_weight, str) and class_weight == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(y_enc)
        weights[present] = compute_class_weight("balanced", classes=present, y=y_enc)
    elif isinstance(class_weight, dict):
        known = set(classes.tolist())
        unknown = [k for k in class_weight if k not in known]
        if unknown:
            raise DinoprobeError(f"class_weight names {unknown[:5]}, which are not among the classes "
                                 f"{classes.tolist()[:10]}")
        weights = np.array([float(class_weight.get(label, 1.0)) for label in classes.tolist()])
        if not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
            raise DinoprobeError(f"class weights must be finite, >= 0 and not all 0, got {class_weight}")
    else:
        raise DinoprobeError(f"class_weight must be None, 'balanced' or a dict of class -> weight, got "
                             f"{class_weight!r}")
    return torch.tensor(weights, dtype=torch.float32)


def label_weights(class_weight, classes: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Multi-label class weights as (2, classes): each class's weight on positive and on negative targets.
    "balanced" is scikit-learn's balanced weights of each class's own binary problem (what
    OneVsRestClassifier(LogisticRegression(class_weight="balanced")) uses): n / (2 x positives) and
    n / (2 x negatives); a dict {class: w} is BCEWithLogitsLoss's pos_weight (negatives weight 1)."""
    n = len(y)
    positives, negatives = y.sum(0), n - y.sum(0)
    if isinstance(class_weight, str) and class_weight == "balanced":
        pos = np.where(positives > 0, n / (2 * np.maximum(positives, 1)), 1.0)
        neg = np.where(negatives > 0, n / (2 * np.maximum(negatives, 1)), 1.0)
    elif isinstance(class_weight, dict):
        unknown = [k for k in class_weight if k not in set(classes.tolist())]
        if unknown:
            raise DinoprobeError(f"class_weight names {unknown[:5]}, which are not among the classes "
                                 f"{classes.tolist()[:10]}")
        pos = np.array([float(class_weight.get(c, 1.0)) for c in classes.tolist()])
        neg = np.ones(len(classes))
        if not (np.isfinite(pos).all() and (pos >= 0).all()):
            raise DinoprobeError(f"class weights must be finite and >= 0, got {class_weight}")
    else:
        raise DinoprobeError(f"class_weight must be None, 'balanced' or a dict of class -> weight, got "
                             f"{class_weight!r}")
    return torch.tensor(np.stack([pos, neg]), dtype=torch.float32)


def names_for(estimator, names=None) -> list[str]:
    """Names for classes_: names[label] for integer labels from a cache, else str(label)."""
    if names is not None:
        return [names[int(c)] for c in estimator.classes_]
    return [str(c) for c in estimator.classes_]


def sample_std(values) -> float:
    """The spread over few-shot tries as DINOv3 reports it: the sample standard deviation (ddof 1; 0 for one try)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
