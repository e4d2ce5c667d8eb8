"""`Probe`: one linear or MLP head trained on feature arrays by dinoprobe's engine."""
from __future__ import annotations

import warnings

import torch
from sklearn.utils.validation import check_is_fitted

from dinoprobe.device import resolve_device
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.base import _Classifier, class_weights, names_for
from dinoprobe.train.config import TrainConfig, default
from dinoprobe.train.headfile import save_head
from dinoprobe.train.heads import HeadSpec, build_head
from dinoprobe.train.loop import train_heads

# Probe's parameters beyond TrainConfig's fields (a test holds Probe's signature to exactly these two sets)
ESTIMATOR_PARAMS = ("class_weight", "val_fraction", "shots", "tries", "device", "progress")


class Probe(_Classifier):
    """A linear or MLP head trained on features by dinoprobe's engine, keeping the epoch with the best
    validation accuracy.

    The training parameters are `TrainConfig`'s fields, with its defaults and checks (the original script's MLP
    head, D -> 256 -> ReLU -> Dropout(0.1) -> C, with Adam 1e-3 for 100 epochs, per-step cosine schedule).
    `class_weight` (None, "balanced" or {label: weight}, scikit-learn's convention) weights each training row's
    loss by its class, as F.cross_entropy(weight=...).
    `val_fraction` is the stratified share of X held out for validation when fit gets no X_val; `shots`/`tries`
    train on K images per class (see `fit`); `device` is auto, cpu, cuda[:N] or mps.

    Multi-label y (an (N, classes) 0/1 indicator matrix): sigmoid outputs and binary cross-entropy, the epoch chosen
    on validation macro mAP, then each class's decision threshold tuned on validation F1 (thresholds_); predict
    returns the indicator matrix, predict_proba each class's probability; class_weight gives each class's positive
    and negative weights (base.label_weights).

    Fitted attributes: classes_, n_features_in_, config_ (the TrainConfig), head_ (an nn.Sequential), normalizer_,
    history_ (one dict per epoch), best_epoch_, best_score_ (validation accuracy, or macro mAP, at best_epoch_),
    train_seconds_, cuda_graph_ (its epochs replayed as a CUDA graph), multilabel_, thresholds_ (multi-label only).
    """

    # scikit-learn reads the parameters from this signature, so each is spelled out; the defaults are TrainConfig's
    def __init__(self, head=default("head"), hidden=default("hidden"), dropout=default("dropout"),
                 normalize=default("normalize"), optimizer=default("optimizer"), lr=default("lr"),
                 weight_decay=default("weight_decay"), momentum=default("momentum"), nesterov=default("nesterov"),
                 betas=default("betas"), eps=default("eps"), batch_size=default("batch_size"),
                 epochs=default("epochs"), warmup_epochs=default("warmup_epochs"),
                 label_smoothing=default("label_smoothing"), seed=default("seed"), patience=default("patience"),
                 epoch_length=default("epoch_length"), init=default("init"), select=default("select"),
                 class_weight=None, val_fraction=0.1, shots=None, tries=1, device="auto", progress=False):
        self.head = head
        self.hidden = hidden
        self.dropout = dropout
        self.normalize = normalize
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.nesterov = nesterov
        self.betas = betas
        self.eps = eps
        self.batch_size = batch_size
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.label_smoothing = label_smoothing
        self.seed = seed
        self.patience = patience
        self.epoch_length = epoch_length
        self.init = init
        self.select = select
        self.class_weight = class_weight
        self.val_fraction = val_fraction
        self.shots = shots
        self.tries = tries
        self.device = device
        self.progress = progress

    def train_config(self, **overrides) -> TrainConfig:
        """This estimator's training parameters as the engine's config (checked there)."""
        params = {k: v for k, v in self.get_params().items() if k not in ESTIMATOR_PARAMS}
        params["betas"] = tuple(params["betas"])
        return TrainConfig(**{**params, **overrides})

    def _fit_encoded(self, x_tr, y_tr, x_val, y_val):
        config, device = self.train_config(), resolve_device(self.device)
        weights = class_weights(self.class_weight, self.classes_, y_tr.numpy())
        result, = train_heads([config], _to(x_tr, device), y_tr.to(device), x_val.to(device), y_val.to(device),
                              len(self.classes_), progress=self.progress, desc="probe", class_weights=weights)
        return self._set_result(result)

    def _fit_tries(self, x_tr, y_tr, x_val, y_val, rows) -> list:
        """Every try side by side in the engine (each head on its own rows)."""
        config, device = self.train_config(), resolve_device(self.device)
        results = train_heads([config] * len(rows), x_tr.to(device), y_tr.to(device), x_val.to(device),
                              y_val.to(device), len(self.classes_), progress=self.progress, desc="probe tries",
                              rows=rows, class_weights=class_weights(self.class_weight, self.classes_, y_tr.numpy()))
        return [self._fitted_copy()._set_result(r) for r in results]

    def _set_result(self, result):
        if result.diverged_epoch is not None and result.best_val_acc < 0:
            raise DinoprobeError(diverged_message(result))
        self.diverged_epoch_ = result.diverged_epoch
        if result.diverged_epoch is not None:
            warnings.warn(f"training diverged in epoch {result.diverged_epoch} and stopped; the head kept is epoch "
                          f"{result.best_epoch}'s, from before (lower the learning rate to train further)",
                          stacklevel=3)
        self.config_ = result.config
        spec = HeadSpec.of(result.config, self.n_features_in_, len(self.classes_))
        self.head_ = build_head(spec, result.best_layers).eval()
        self.normalizer_ = result.normalizer.cpu()
        self.history_, self.step_losses_ = result.history, result.step_losses
        self.best_epoch_, self.best_score_, self.train_seconds_ = result.best_epoch, result.best_val_acc, result.seconds
        self.cuda_graph_ = result.cuda_graph
        return self

    @torch.no_grad()
    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.head_(self.normalizer_(part)) for part in X.split(65536)]) if len(X) \
            else torch.zeros(0, len(self.classes_))

    def save(self, path, cache=None, class_names=None):
        """Write a head file that `dinoprobe predict` and `export` accept (read with weights_only=True).

        cache: the FeatureSplits (or cache folder) the features came from, so predict can rebuild the backbone
        and transform; without it the file records no backbone and serves Python use only. class_names: names
        indexed by integer label (a cache's), else str(label)."""
        check_is_fitted(self)
        spec = HeadSpec.of(self.config_, self.n_features_in_, len(self.classes_))
        return save_head(path, self.head_, spec, self.normalizer_, names_for(self, class_names), cache,
                         self.config_.to_dict(), getattr(self, "thresholds_", None))


def diverged_message(result) -> str:
    return (f"training diverged in epoch {result.diverged_epoch} (the loss became NaN or infinite) before any "
            f"epoch scored on validation; lower the learning rate (lr {result.config.lr:g}) or standardise the "
            "features (normalize='standardize')")


def _to(x, device):
    """Train features to the device; other training sources (streamed) read onto their own."""
    return x.to(device) if hasattr(x, "to") else x
