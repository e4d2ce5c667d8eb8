"""`LogReg`: DINOv3's logistic-regression protocol on feature arrays, every C of the grid solved at once.

scikit-learn's `LogisticRegression(solver='lbfgs')` is the reference (`solver="sklearn"`). `fit_logreg_batched`
solves the same problems for many C at once: one batched loss/gradient evaluation per step for all C, with each C
keeping its own L-BFGS history and line search (no library offers independent L-BFGS problems batched together).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from dinoprobe.device import memory_available, resolve_device
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.base import _Classifier, class_weights, names_for
from dinoprobe.progress import progress_bar
from dinoprobe.settings import DEFAULT_C_GRID
from dinoprobe.train.headfile import save_head
from dinoprobe.train.heads import HeadSpec, Normalizer, build_head
from dinoprobe.train.losses import sigmoid_cross_entropy, softmax_cross_entropy
from dinoprobe.train.ranking import mean_average_precision


def _objective(theta, x, targets, lam, num_classes, weights=None, multilabel=False):
    """Per-problem mean cross-entropy + lam/2 ||W||^2 (intercept unpenalised), and its gradient. (K,), (K,P).

    Two classes are scikit-learn's binary problem: one logit z = w.x + b, i.e. softmax over (0, z) with the first
    class's row held at zero (its gradient is zeroed), so the penalty is lam/2 ||w||^2 as in scikit-learn.
    `targets` are the (n,) labels. Multi-label, they are the (n, classes) 0/1 targets and each class its own binary
    problem (one-vs-rest): the sum over classes of each one's mean binary cross-entropy + lam/2 ||w_c||^2, which
    separates into scikit-learn's per-class objectives, so its optimum is OneVsRestClassifier(LogisticRegression(C))'s."""
    k, (n, d) = theta.shape[0], x.shape
    w = theta[:, : num_classes * d].view(k, num_classes, d)
    b = theta[:, num_classes * d:]
    logits = (x @ w.reshape(k * num_classes, d).t()).view(n, k, num_classes).transpose(0, 1) + b[:, None, :]
    if multilabel:  # the loss is a mean over classes too: scale back to a sum of the per-class problems
        neg_loss, dlogits = sigmoid_cross_entropy(logits, targets, weights)
        neg_loss, dlogits = neg_loss * num_classes, dlogits.mul_(num_classes)
    else:
        neg_loss, dlogits = softmax_cross_entropy(logits, targets, weights=weights)  # scikit-learn's sum / n
    loss = -neg_loss / n + 0.5 * lam * w.pow(2).sum((1, 2))
    grad_w = torch.bmm(dlogits.transpose(1, 2), x.expand(k, n, d)) + lam[:, None, None] * w
    grad_b = dlogits.sum(1)
    if num_classes == 2 and not multilabel:
        grad_w[:, 0], grad_b[:, 0] = 0, 0
    return loss, torch.cat([grad_w.reshape(k, -1), grad_b], dim=1)


# DINOv3's C grid, exactly: 10 ** torch.linspace(-6, 5, 45) in float32 (dinov3/eval/log_regression.py)
DINOV3_C_GRID = tuple((10 ** torch.linspace(-6, 5, 45)).tolist())
DEFAULT_MAX_BYTES = 2 << 30  # the solver's working set for all C values at once; more C values run in chunks


def problem_bytes(n: int, d: int, num_classes: int, memory: int = 10, itemsize: int = 8) -> int:
    """The solver's working set per C value: parameters, gradient, the L-BFGS history (2 x memory copies), the line
    search's trial copies, and the logits, probabilities and gradient of the batch (3 x n x classes)."""
    params = num_classes * d + num_classes
    return itemsize * ((2 * memory + 8) * params + 3 * n * num_classes)


def fit_logreg_batched(x: torch.Tensor, y: torch.Tensor, num_classes: int, cs, max_iter: int = 1000, tol: float = 1e-4,
                       memory: int = 10, dtype: torch.dtype = torch.float64, progress: bool = False,
                       desc: str = "logreg", max_bytes: int | None = None, class_weights=None
                       ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`_fit_batch` over the C values in chunks whose working set fits `max_bytes` (at least one C per chunk):
    the problems are independent, so chunking changes only memory, never a result (tested). By default the budget
    is DEFAULT_MAX_BYTES or half the memory available on x's device, whichever is less; a single C that needs more
    than is available is refused, naming what fits."""
    per = problem_bytes(len(x), x.shape[1], num_classes, memory, torch.finfo(dtype).bits // 8)
    available = memory_available(x.device)
    if available is not None and per > available:
        raise DinoprobeError(
            f"logistic regression on {len(x):,} rows x {num_classes} classes needs about {per / 2**30:.1f} GiB for "
            f"one C value (full-batch L-BFGS holds the logits, probabilities and gradient of every row in float64) "
            f"and {available / 2**30:.1f} GiB are available on {x.device}; train a linear probe (`dinoprobe probe "
            "--head linear`, a batch at a time), fit on fewer rows (--shots), or use a machine with more memory")
    if max_bytes is None:
        max_bytes = DEFAULT_MAX_BYTES if available is None else min(DEFAULT_MAX_BYTES, available // 2)
    size = max(1, int(max_bytes // per))
    parts = [_fit_batch(x, y, num_classes, list(cs[i:i + size]), max_iter, tol, memory, dtype, progress,
                        desc if len(cs) <= size else f"{desc} ({i // size + 1}/{-(-len(cs) // size)})",
                        class_weights)
             for i in range(0, len(cs), size)]
    return (torch.cat([w for w, _, _ in parts]), torch.cat([b for _, b, _ in parts]),
            [it for _, _, its in parts for it in its])


def _fit_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, cs, max_iter: int, tol: float, memory: int,
               dtype: torch.dtype, progress: bool, desc: str,
               class_weights=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Minimise C * sum CE + ||W||^2 / 2 (sklearn's objective, scaled by 1/(C n)) for every C in `cs`.

    Stops each problem like scikit-learn's lbfgs: gradient inf-norm <= tol (same default, same objective
    scale), or no relative decrease left at the dtype's precision. float64 by default: strongly regularised
    problems change the loss by less than float32 can resolve. Returns W (K, C, D), b (K, C) and iterations.
    progress: a bar per L-BFGS iteration, with the number of problems (C values) still running.
    """
    x = x.to(dtype)
    n, d = x.shape
    k = len(cs)
    ftol = 64 * torch.finfo(dtype).eps  # scipy's L-BFGS-B default in scikit-learn
    lam = 1.0 / (torch.tensor(cs, dtype=dtype, device=x.device) * n)
    multilabel = y.dim() == 2  # (n, classes) 0/1 targets: one-vs-rest
    targets = y.to(dtype) if multilabel else y
    theta = torch.zeros(k, num_classes * d + num_classes, device=x.device, dtype=dtype)
    S = torch.zeros(k, memory, theta.shape[1], device=x.device, dtype=dtype)
    Y = torch.zeros_like(S)
    rho = torch.zeros(k, memory, device=x.device, dtype=dtype)  # rho = 0 marks an empty history slot
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=dtype, device=x.device)
    f, g = _objective(theta, x, targets, lam, num_classes, weights, multilabel)
    iterations = [max_iter] * k
    active = torch.ones(k, dtype=torch.bool, device=x.device)
    bar = progress_bar(max_iter, desc, "iter", enabled=progress)
    for it in range(max_iter):
        active &= g.abs().amax(1) > tol
        running = int(active.sum())
        bar.set_postfix(running=f"{running}/{k} C", refresh=False)
        bar.update(1)
        if not running:
            break
        a = active.nonzero().squeeze(1)
        direction = _two_loop(g[a], S[a], Y[a], rho[a])
        slope = (direction * g[a]).sum(1)
        bad = slope >= 0  # not a descent direction: restart that problem from steepest descent
        if bad.any():
            direction[bad], slope[bad] = -g[a][bad], -(g[a][bad] ** 2).sum(1)
            rho[a[bad]] = 0
        step = torch.ones(len(a), device=x.device, dtype=dtype)
        fresh = rho[a].abs().sum(1) == 0
        step[fresh] = 1.0 / g[a][fresh].abs().sum(1).clamp_min(1.0)
        new_theta, new_f, new_g = theta[a].clone(), f[a].clone(), g[a].clone()
        todo = torch.arange(len(a), device=x.device)
        for _ in range(20):  # backtracking Armijo line search, all pending problems evaluated together
            trial = theta[a[todo]] + step[todo, None] * direction[todo]
            tf, tg = _objective(trial, x, targets, lam[a[todo]], num_classes, weights, multilabel)
            ok = tf <= f[a[todo]] + 1e-4 * step[todo] * slope[todo]
            new_theta[todo[ok]], new_f[todo[ok]], new_g[todo[ok]] = trial[ok], tf[ok], tg[ok]
            todo = todo[~ok]
            if len(todo) == 0:
                break
            step[todo] *= 0.5
        stuck = torch.zeros(len(a), dtype=torch.bool, device=x.device)
        stuck[todo] = True  # no decrease found: at the floating-point optimum, stop that problem
        s, yv = new_theta - theta[a], new_g - g[a]
        sy = (s * yv).sum(1)
        keep = (sy > 1e-12) & ~stuck
        idx = a[keep]
        if len(idx):
            S[idx], Y[idx], rho[idx] = S[idx].roll(-1, 1), Y[idx].roll(-1, 1), rho[idx].roll(-1, 1)
            S[idx, -1], Y[idx, -1], rho[idx, -1] = s[keep], yv[keep], 1.0 / sy[keep]
        flat = (f[a] - new_f) <= ftol * torch.maximum(f[a].abs(), new_f.abs()).clamp_min(1.0)
        stuck |= flat
        theta[a], f[a], g[a] = new_theta, new_f, new_g
        for j in a[stuck].tolist():
            iterations[j] = it + 1
        active[a[stuck]] = False
        for j in a[(g[a].abs().amax(1) <= tol)].tolist():
            iterations[j] = it + 1
    bar.close()
    w = theta[:, : num_classes * d].view(k, num_classes, d)
    return w.float(), theta[:, num_classes * d:].float(), iterations


def _two_loop(g, S, Y, rho):
    """L-BFGS two-loop recursion, vectorised over problems; empty history slots (rho=0) contribute nothing."""
    q = g.clone()
    m = S.shape[1]
    alpha = torch.zeros(g.shape[0], m, device=g.device, dtype=g.dtype)
    for i in reversed(range(m)):
        alpha[:, i] = rho[:, i] * (S[:, i] * q).sum(1)
        q -= alpha[:, i, None] * Y[:, i]
    sy, yy = (S[:, -1] * Y[:, -1]).sum(1), (Y[:, -1] ** 2).sum(1)
    gamma = torch.where(rho[:, -1] > 0, sy / yy.clamp_min(1e-30), torch.ones_like(sy))
    r = gamma[:, None] * q
    for i in range(m):
        beta = rho[:, i] * (Y[:, i] * r).sum(1)
        r += S[:, i] * (alpha[:, i] - beta)[:, None]
    return -r


def fit_logreg_sklearn(x, y, cs, max_iter: int = 1000, tol: float = 1e-4, class_weights=None):
    """The reference: one scikit-learn fit per C (multi-label y (n, classes): one per C and class, one-vs-rest).
    Returns W (K, C, D), b (K, C) as tensors, and iterations."""
    from sklearn.linear_model import LogisticRegression

    x_np, y_np = np.asarray(x, dtype=np.float64), np.asarray(y)
    if y_np.ndim == 2:
        return _fit_one_vs_rest_sklearn(x_np, y_np, cs, max_iter, tol, class_weights)
    ws, bs, iterations = [], [], []
    for c in cs:
        weight = None if class_weights is None else dict(enumerate(np.asarray(class_weights, dtype=float).tolist()))
        model = LogisticRegression(C=c, max_iter=max_iter, tol=tol, class_weight=weight).fit(x_np, y_np)
        iterations.append(int(model.n_iter_.max()))
        coef, intercept = model.coef_, model.intercept_
        if coef.shape[0] == 1:  # binary: scikit-learn fits one logit z; as two softmax logits that is (0, z)
            coef, intercept = np.concatenate([0 * coef, coef]), np.concatenate([0 * intercept, intercept])
        ws.append(coef)
        bs.append(intercept)
    return (torch.tensor(np.stack(ws), dtype=torch.float32), torch.tensor(np.stack(bs), dtype=torch.float32),
            iterations)


def _fit_one_vs_rest_sklearn(x, y, cs, max_iter, tol, class_weights=None):
    """scikit-learn's LogisticRegression on each class's own 0/1 problem; class_weights (2, classes) are the
    positive and negative weights of each."""
    from sklearn.linear_model import LogisticRegression

    constant = [c for c in range(y.shape[1]) if y[:, c].min() == y[:, c].max()]
    if constant:
        raise DinoprobeError(f"class(es) {constant[:5]} have only positive or only negative training rows, which "
                             "scikit-learn's LogisticRegression cannot fit; use solver='torch'")
    ws, bs, iterations = [], [], []
    for c in cs:
        models = [LogisticRegression(C=c, max_iter=max_iter, tol=tol, class_weight=None if class_weights is None else
                                     {1: float(class_weights[0, j]), 0: float(class_weights[1, j])}).fit(x, y[:, j])
                  for j in range(y.shape[1])]
        ws.append(np.concatenate([m.coef_ for m in models]))
        bs.append(np.concatenate([m.intercept_ for m in models]))
        iterations.append(max(int(m.n_iter_.max()) for m in models))
    return (torch.tensor(np.stack(ws), dtype=torch.float32), torch.tensor(np.stack(bs), dtype=torch.float32),
            iterations)


def normalized_rows(normalizer, parts, device, dtype: torch.dtype = torch.float64,
                    block: int = 8192) -> torch.Tensor:
    """The parts' rows (train, then val) normalised, as one (rows, D) tensor on `device` in the solvers' precision
    (both take float64), a block of rows at a time: a whole float32 normalised copy would stand beside it."""
    out = torch.empty(sum(len(p) for p in parts), parts[0].shape[1], dtype=dtype, device=device)
    start = 0
    for part in parts:
        normalizer = normalizer.to(part.device)
        buffer = torch.empty(min(block, len(part)), part.shape[1], dtype=part.dtype, device=part.device)
        for rows in part.split(block):  # one buffer reused: a new block each time leaves the heap fragmented
            out[start:start + len(rows)] = normalizer(rows, out=buffer[:len(rows)])
            start += len(rows)
    return out


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, cs, solver: str = "torch",
               max_iter: int = 1000, tol: float = 1e-4, progress: bool = False,
               desc: str = "logreg", class_weights=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """W (K, classes, D), b (K, classes) and the iterations, for every C in `cs`, on x's device."""
    if solver == "sklearn":
        w, b, iterations = fit_logreg_sklearn(x.cpu().numpy(), y.cpu().numpy(), cs, max_iter, tol, class_weights)
        return w.to(x.device), b.to(x.device), iterations
    return fit_logreg_batched(x, y, num_classes, cs, max_iter, tol, progress=progress, desc=desc,
                              class_weights=class_weights)


class LogReg(_Classifier):
    """L2-regularised logistic regression (scikit-learn's objective: multinomial, or its single-logit binary
    problem for two classes) for every C in `Cs`, solved together by a batched L-BFGS; C chosen on validation
    accuracy, then refit on train + validation (refit=None: except in few-shot, as DINOv3; True/False to force).
    solver="sklearn" runs scikit-learn's LogisticRegression once per C instead. `LogReg.dinov3()` is DINOv3's
    protocol exactly: raw features, tol 1e-12, its float32 C grid. dinoprobe's defaults differ on purpose:
    standardised features and tol 1e-4 (the same optimum to far below a grid step, much faster).

    Multi-label y ((N, classes) 0/1): one-vs-rest, each class its own binary problem (OneVsRestClassifier(
    LogisticRegression(C))'s optimum), C chosen on validation macro mAP, thresholds_ tuned on validation F1.

    Fitted attributes: coef_ (classes, D), intercept_ (classes,), best_C_, val_score_per_C_, n_iter_, normalizer_,
    selection_coef_ / selection_intercept_ (the train-only model at best_C_ that chose it), classes_.
    """

    def __init__(self, Cs=None, normalize="standardize", max_iter=1000, tol=1e-4, solver="torch", refit=None,
                 class_weight=None, val_fraction=0.1, seed=0, shots=None, tries=1, device="auto", progress=False):
        self.Cs = Cs
        self.refit = refit
        self.class_weight = class_weight
        self.normalize = normalize
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.val_fraction = val_fraction
        self.seed = seed
        self.shots = shots
        self.tries = tries
        self.device = device
        self.progress = progress

    @classmethod
    def dinov3(cls, **params) -> LogReg:
        """DINOv3's logistic-regression protocol (dinov3/eval/log_regression.py): raw features, tol 1e-12, at most
        1,000 iterations, C in 10 ** torch.linspace(-6, 5, 45) (float32), refit on train + val except in few-shot."""
        return cls(**{"Cs": DINOV3_C_GRID, "normalize": "none", "tol": 1e-12, "max_iter": 1000, **params})

    def _fit_tries(self, x_tr, y_tr, x_val, y_val, rows) -> list:
        """Each try fitted on its rows alone; its final model never sees validation labels (unless refit=True)."""
        return [self._fitted_copy().set_params(refit=bool(self.refit))._fit_encoded(x_tr[r], y_tr[r], x_val, y_val)
                for r in rows]

    def _fit_encoded(self, x_tr, y_tr, x_val, y_val):
        cs = [float(c) for c in (DEFAULT_C_GRID if self.Cs is None else self.Cs)]
        if not cs or any(not np.isfinite(c) or c <= 0 for c in cs):
            raise DinoprobeError(f"Cs must be positive finite values, got {self.Cs}")
        if self.solver not in ("torch", "sklearn"):
            raise DinoprobeError(f"solver must be 'torch' or 'sklearn', got {self.solver!r}")
        device = resolve_device(self.device)
        k = len(self.classes_)
        normalizer = Normalizer.fit(self.normalize, x_tr)  # on x_tr's device; the fitted model lives on the CPU
        x_all = normalized_rows(normalizer, (x_tr, x_val), device)  # train's rows, then val's: refit copies nothing
        x_tr, x_val = x_all[:len(x_tr)], x_all[len(x_tr):]
        self.normalizer_ = normalizer.cpu()
        weights = class_weights(self.class_weight, self.classes_, y_tr.numpy())  # scikit-learn's class_weight
        w, b, iterations = fit_logreg(x_tr, y_tr.to(device), k, cs, self.solver, self.max_iter, self.tol,
                                      self.progress, f"logreg: {len(cs)} C values", weights)
        val_scores = (torch.einsum("nd,kcd->knc", x_val.to(w.dtype), w) + b[:, None]).cpu()
        if self.multilabel_:  # one-vs-rest: C chosen on validation macro mAP
            self.val_score_per_C_ = mean_average_precision(val_scores, y_val).nan_to_num(0.0).tolist()
        else:
            self.val_score_per_C_ = ((val_scores.argmax(-1) == y_val).sum(1) / len(y_val)).tolist()
        best = int(np.argmax(self.val_score_per_C_))
        self.best_C_, self.Cs_, self.best_score_ = cs[best], cs, self.val_score_per_C_[best]
        self.selection_coef_, self.selection_intercept_ = w[best].cpu(), b[best].cpu()
        self.refit_ = self.refit is not False  # None: refit (few-shot tries pass refit=False)
        if not self.refit_:  # the model chosen on val is the final model
            self.coef_, self.intercept_ = self.selection_coef_, self.selection_intercept_
            self.n_iter_ = np.array([iterations[best]])
            self.n_iter_per_C_ = list(iterations)
            return self
        y_all = torch.cat([y_tr, y_val])  # "balanced" weights of the data refit on, as scikit-learn computes them
        w, b, refit_iterations = fit_logreg(x_all, y_all.to(device), k, [cs[best]], self.solver,
                                            self.max_iter, self.tol, self.progress, "logreg: refit on train + val",
                                            class_weights(self.class_weight, self.classes_, y_all.numpy()))
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
        return self._probabilities(self._scores(self._features(X), selection=True))

    def _validation_probabilities(self, x_val) -> np.ndarray:
        return self._probabilities(self._scores(x_val, selection=True))

    def head(self):
        """The fitted model as a linear head (build_head's layout), for run directories and head files."""
        spec = HeadSpec("linear", self.n_features_in_, len(self.classes_))
        return build_head(spec, [(self.coef_, self.intercept_)]).eval(), spec

    def save(self, path, cache=None, class_names=None):
        """A linear head file that `dinoprobe predict` and `export` accept (see Probe.save)."""
        check_is_fitted(self)
        head, spec = self.head()
        config = {"method": "logreg", "normalize": self.normalize, "solver": self.solver, "best_C": self.best_C_}
        return save_head(path, head, spec, self.normalizer_, names_for(self, class_names), cache, config,
                         getattr(self, "thresholds_", None))
