"""`KNN`: DINO's weighted k-NN on L2-normalised features."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted

from dinoprobe import settings
from dinoprobe.device import resolve_device
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.base import _Classifier, as_labels
from dinoprobe.progress import progress_bar
from dinoprobe.settings import KNN_KS, KNN_TEMPERATURE
from dinoprobe.train.ranking import mean_average_precision

SIMILARITY_BLOCK = 1 << 25  # entries of the (queries, train rows) similarity matrix computed at once
# what a neighbour search holds besides the features: a block of similarities, and topk's work on it (measured:
# 1.2 times the block on a CPU)
SEARCH_BYTES = 2 * 4 * SIMILARITY_BLOCK


def knn_scores(train_x, train_y, query_x, num_classes: int, ks=KNN_KS, temperature: float = KNN_TEMPERATURE,
               max_block: int = SIMILARITY_BLOCK, bar=None) -> dict[int, torch.Tensor]:
    """Weighted k-NN on L2-normalised features (DINO): class scores sum exp(cos / T) over the k nearest.
    Multi-label train_y (N, classes) 0/1: each class's score is the share of the k neighbours' weight whose rows
    carry it (per-class weighted votes, in [0, 1]). Every k in one dict; `knn_scores_per_k` yields them one at a
    time."""
    return dict(knn_scores_per_k(train_x, train_y, query_x, num_classes, ks, temperature, max_block, bar))


def knn_scores_per_k(train_x, train_y, query_x, num_classes: int, ks=KNN_KS, temperature: float = KNN_TEMPERATURE,
                     max_block: int = SIMILARITY_BLOCK, bar=None):
    """(k, scores (queries, classes)) for each k, smallest first, from one neighbour search. Only the nearest
    max(ks) of each query are held between ks (queries x max(ks) numbers), and one k's scores at a time: at 10,000
    classes and 100,000 queries each k's scores are 4 GB.

    The similarity matrix is computed in row blocks of at most `max_block` entries, never whole; `bar` (a
    progress bar) counts the queries searched.
    """
    ks = sorted({min(k, len(train_x)) for k in ks})
    sims, nearest = knn_neighbours(F.normalize(train_x.float(), dim=1), query_x, ks[-1], max_block, bar)
    yield from knn_votes(sims, nearest, train_y, num_classes, ks, temperature, max(1, max_block // max(1, len(train_x))))


def knn_neighbours(train, query_x, top: int, max_block: int = SIMILARITY_BLOCK, bar=None):
    """(similarities, indices), each (queries, top): every query's `top` nearest training rows by cosine
    similarity, nearest first; the similarity matrix in row blocks of at most `max_block` entries. `train` is the
    bank already L2-normalised (float32), so that a caller searching in blocks normalises it once."""
    query = F.normalize(query_x.float(), dim=1)
    top = min(top, len(train))
    rows = max(1, max_block // max(1, len(train)))
    sims = torch.empty(len(query), top, device=query.device)
    nearest = torch.empty(len(query), top, dtype=torch.long, device=query.device)
    for start in range(0, len(query), rows):
        sims[start:start + rows], nearest[start:start + rows] = (query[start:start + rows] @ train.t()).topk(top, dim=1)
        if bar is not None:
            bar.update(len(query[start:start + rows]))
    return sims, nearest


def knn_votes(sims, nearest, train_y, num_classes: int, ks, temperature: float, rows: int):
    """(k, scores (queries, classes)) for each k of `ks` (each at most the neighbours held), from the neighbours
    `knn_neighbours` found, `rows` queries at a time: one k's scores in memory at a time. Multi-label rows gather
    (queries, k, classes) label sets, so fewer queries at a time: at most settings.SCORING_BYTES of them."""
    weights = (sims / temperature).exp()
    for k in ks:
        out = torch.zeros(len(sims), num_classes)
        step = rows if train_y.dim() == 1 else max(1, min(rows, settings.SCORING_BYTES // (12 * k * num_classes)))
        for start in range(0, len(sims), step):
            labels, w = train_y[nearest[start:start + step, :k]], weights[start:start + step, :k]
            if labels.dim() == 3:  # multi-label rows (block, k, classes): shares in float64, stored in float32,
                # so that equal shares (unanimous neighbours: exactly 1) are equal and tie in the average precision
                w = w.double()
                votes = (torch.einsum("qk,qkc->qc", w, labels.double()) / w.sum(1, keepdim=True)).float()
            else:
                votes = torch.zeros(len(labels), num_classes, device=w.device)
                votes.scatter_add_(1, labels, w)
            out[start:start + step] = votes.cpu()
        yield k, out


def as_ks(ks) -> list[int]:
    """KNN's `ks` (one k or several) as sorted distinct integers."""
    return sorted({int(k) for k in (ks if hasattr(ks, "__iter__") else [ks])})


def neighbour_bytes(queries: int, neighbours: int) -> int:
    """What a fit keeps of its validation search: each val row's nearest `neighbours` (max(ks), at most the train
    rows; a float32 similarity and an int64 index each), so that scoring val at the chosen k (and tuning multi-label
    thresholds) searches nothing again."""
    return queries * neighbours * (4 + 8)


class KNN(_Classifier):
    """DINO's weighted k-NN on L2-normalised features: each of the k nearest training rows (cosine similarity)
    votes for its class with weight exp(similarity / temperature); k chosen from `ks` on validation accuracy.
    Multi-label y: each class's probability is the share of the neighbours' vote weight carrying it, k chosen on
    validation macro mAP.

    Fitted attributes: best_k_, val_score_per_k_ ({k: accuracy}), classes_, n_features_in_, val_neighbours_
    (similarities and training-row indices of each validation row's nearest max(ks), for `val_proba`).
    `progress`: a bar on stderr per neighbour search of a split (the command line's), counting the queries searched.
    """

    def __init__(self, ks=KNN_KS, temperature=KNN_TEMPERATURE, val_fraction=0.1, seed=0, shots=None, tries=1,
                 device="auto", progress=False):
        self.ks = ks
        self.temperature = temperature
        self.val_fraction = val_fraction
        self.seed = seed
        self.shots = shots
        self.tries = tries
        self.device = device
        self.progress = progress

    def _fit_encoded(self, x_tr, y_tr, x_val, y_val):
        ks = as_ks(self.ks)
        if not ks or ks[0] < 1:
            raise DinoprobeError(f"ks must be positive integers, got {self.ks}")
        if not self.temperature > 0:
            raise DinoprobeError(f"temperature must be > 0, got {self.temperature}")
        self.device_ = resolve_device(self.device)
        self.bank_x_, self.bank_y_ = x_tr.to(self.device_), y_tr.to(self.device_)
        ks = sorted({min(k, len(self.bank_y_)) for k in ks})
        # val's nearest max(ks), kept: the chosen k's val scores (run_knn's metrics, multi-label thresholds) and every
        # k's come from them without a second search; a block of rows at a time, every k from the block's search
        self.val_neighbours_ = torch.empty(len(x_val), ks[-1], device=self.device_), torch.empty(
            len(x_val), ks[-1], dtype=torch.long, device=self.device_)
        rows = settings.scoring_rows(len(self.classes_))
        bank = F.normalize(self.bank_x_.float(), dim=1)  # once for every block (the working copy the check counts)
        with self._bar(len(x_val), "k-NN: val") as bar:
            for start in range(0, len(x_val), rows):
                found = knn_neighbours(bank, x_val[start:start + rows].to(self.device_), ks[-1], bar=bar)
                for kept, part in zip(self.val_neighbours_, found):
                    kept[start:start + rows] = part
        del bank
        if self.multilabel_:  # macro mAP ranks every validation row of a class: all rows' scores, a k at a time
            self.val_score_per_k_ = {k: self._score(s, y_val) for k, s in self.val_scores_per_k(ks)}
        else:  # accuracy counts rows: a block of them at a time
            y_val, correct = torch.as_tensor(y_val), dict.fromkeys(ks, 0)
            for start in range(0, max(len(x_val), 1), rows):
                block = slice(start, start + rows)
                for k, s in self.val_scores_per_k(ks, block):
                    correct[k] += int((s.argmax(1) == y_val[block]).sum())
            self.val_score_per_k_ = {k: c / len(y_val) for k, c in correct.items()}
        self.best_k_ = max(self.val_score_per_k_, key=lambda k: (self.val_score_per_k_[k], -k))
        self.best_score_ = self.val_score_per_k_[self.best_k_]
        return self

    def val_scores_per_k(self, ks=None, rows: slice = slice(None)):
        """(k, vote scores) of the fit's validation rows `rows` for each k of `ks` (default: the chosen k), from the
        neighbours fit found: no search."""
        check_is_fitted(self)
        sims, nearest = (kept[rows] for kept in self.val_neighbours_)
        ks = [self.best_k_] if ks is None else ks
        yield from knn_votes(sims, nearest, self.bank_y_, len(self.classes_), [min(k, sims.shape[1]) for k in ks],
                             self.temperature, settings.scoring_rows(len(self.classes_)))

    def val_proba(self, rows: slice = slice(None)) -> np.ndarray:
        """predict_proba of the fit's validation rows `rows` at the chosen k, from the neighbours fit found."""
        return self._probabilities(next(self.val_scores_per_k(None, rows))[1])

    @contextmanager
    def searching(self, queries: int, desc: str):
        """One progress bar for every neighbour search made inside (a split scored a block of rows at a time),
        counting `queries` in all, instead of a bar per call."""
        with progress_bar(queries, desc, "img", enabled=self.progress) as bar:
            self._shared_bar = bar
            try:
                yield bar
            finally:
                self._shared_bar = None

    def _bar(self, queries: int, desc: str):
        shared = getattr(self, "_shared_bar", None)
        return nullcontext(shared) if shared is not None else progress_bar(queries, desc, "img", enabled=self.progress)

    def _scores(self, X):
        with self._bar(len(X), "k-NN") as bar:
            scores = knn_scores(self.bank_x_, self.bank_y_, X.to(self.device_), len(self.classes_), [self.best_k_],
                                self.temperature, bar=bar)
        return scores[min(self.best_k_, len(self.bank_y_))]

    def _validation_probabilities(self, x_val) -> np.ndarray:
        return self.val_proba()  # the rows fit just searched: thresholds are tuned on them

    def _score(self, votes: torch.Tensor, y) -> float:
        """Accuracy of votes (N, classes) against encoded labels, or macro mAP against multi-label rows."""
        y = torch.as_tensor(y)
        if self.multilabel_:
            return float(mean_average_precision(votes, y.float()).nan_to_num(0.0))
        return (votes.argmax(1) == y).sum().item() / len(y)

    def iter_proba_per_k(self, X):
        """(k, predict_proba with that k) for every k in ks (capped at the number of training rows), smallest first,
        from one neighbour search; one k's probabilities in memory at a time."""
        X = self._features(X)
        with self._bar(len(X), "k-NN") as bar:
            scores = knn_scores_per_k(self.bank_x_, self.bank_y_, X.to(self.device_), len(self.classes_),
                                      sorted(self.ks), self.temperature, bar=bar)
            for k, votes in scores:
                yield k, self._probabilities(votes)

    def predict_proba_per_k(self, X) -> dict[int, np.ndarray]:
        """predict_proba for every k in ks (capped at the number of training rows), from one neighbour search."""
        return dict(self.iter_proba_per_k(X))

    def score_per_k(self, X, y) -> dict[int, float]:
        """Accuracy (multi-label: macro mAP) on (X, y) for every k in ks (capped at the number of training rows)."""
        y = as_labels(y, len(X))
        y = y.astype(np.float32) if self.multilabel_ else self._encode(y)
        return {k: self._score(torch.from_numpy(p), y) for k, p in self.iter_proba_per_k(X)}

    def _probabilities(self, votes: torch.Tensor) -> np.ndarray:
        votes = votes.double()
        if self.multilabel_:
            return votes.numpy()  # each class's share of the vote
        return (votes / votes.sum(1, keepdim=True).clamp_min(1e-300)).numpy()
