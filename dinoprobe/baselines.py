"""The standard baselines on cached features: L2 logistic regression (DINOv3's protocol) and weighted k-NN (DINO's).

scikit-learn's `LogisticRegression(solver='lbfgs')` is the reference. `fit_logreg_batched` solves the same
problems for many C at once: one batched loss/gradient evaluation per step for all C, with each C keeping its
own L-BFGS history and line search (no library offers independent L-BFGS problems batched together).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dinoprobe.losses import softmax_cross_entropy

DEFAULT_C_GRID = tuple(float(c) for c in 10 ** np.linspace(-6, 5, 45))
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07


# ------------------------------------------------------------------------------------ logistic regression
def _objective(theta, x, onehot, lam, num_classes):
    """Per-problem mean cross-entropy + lam/2 ||W||^2 (intercept unpenalised), and its gradient. (K,), (K,P)."""
    k, (n, d) = theta.shape[0], x.shape
    w = theta[:, : num_classes * d].view(k, num_classes, d)
    b = theta[:, num_classes * d:]
    logits = (x @ w.reshape(k * num_classes, d).t()).view(n, k, num_classes).transpose(0, 1) + b[:, None, :]
    neg_loss, dlogits = softmax_cross_entropy(logits, onehot, batch_dim=1)  # (K,), (K, n, C)
    loss = -neg_loss / n + 0.5 * lam * w.pow(2).sum((1, 2))
    grad_w = torch.bmm(dlogits.transpose(1, 2), x.expand(k, n, d)) + lam[:, None, None] * w
    return loss, torch.cat([grad_w.reshape(k, -1), dlogits.sum(1)], dim=1)


def fit_logreg_batched(x: torch.Tensor, y: torch.Tensor, num_classes: int, cs, max_iter: int = 1000,
                       tol: float = 1e-4, memory: int = 10, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Minimise C * sum CE + ||W||^2 / 2 (sklearn's objective, scaled by 1/(C n)) for every C in `cs`.

    Stops each problem like scikit-learn's lbfgs: gradient inf-norm <= tol (same default, same objective
    scale), or no relative decrease left at the dtype's precision. float64 by default: strongly regularised
    problems change the loss by less than float32 can resolve. Returns W (K, C, D), b (K, C) and iterations.
    """
    x = x.to(dtype)
    n, d = x.shape
    k = len(cs)
    ftol = 64 * torch.finfo(dtype).eps  # scipy's L-BFGS-B default in scikit-learn
    lam = 1.0 / (torch.tensor(cs, dtype=dtype, device=x.device) * n)
    onehot = F.one_hot(y, num_classes).to(dtype)
    theta = torch.zeros(k, num_classes * d + num_classes, device=x.device, dtype=dtype)
    S = torch.zeros(k, memory, theta.shape[1], device=x.device, dtype=dtype)
    Y = torch.zeros_like(S)
    rho = torch.zeros(k, memory, device=x.device, dtype=dtype)  # rho = 0 marks an empty history slot
    f, g = _objective(theta, x, onehot, lam, num_classes)
    iterations = [max_iter] * k
    active = torch.ones(k, dtype=torch.bool, device=x.device)
    for it in range(max_iter):
        active &= g.abs().amax(1) > tol
        if not active.any():
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
            tf, tg = _objective(trial, x, onehot, lam[a[todo]], num_classes)
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


def fit_logreg_sklearn(x, y, cs, max_iter: int = 1000, tol: float = 1e-4):
    """The reference: one scikit-learn fit per C. Returns W (K, C, D), b (K, C) as tensors, and iterations."""
    from sklearn.linear_model import LogisticRegression

    x_np, y_np = np.asarray(x, dtype=np.float64), np.asarray(y)
    ws, bs, iterations = [], [], []
    for c in cs:
        model = LogisticRegression(C=c, max_iter=max_iter, tol=tol).fit(x_np, y_np)
        iterations.append(int(model.n_iter_.max()))
        coef, intercept = model.coef_, model.intercept_
        if coef.shape[0] == 1:  # binary: sklearn fits one logit; as two softmax logits that is (-w/2, w/2)
            coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        ws.append(coef)
        bs.append(intercept)
    return (torch.tensor(np.stack(ws), dtype=torch.float32), torch.tensor(np.stack(bs), dtype=torch.float32),
            iterations)


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, cs, solver: str = "torch",
               max_iter: int = 1000, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """W (K, classes, D), b (K, classes) and the iterations, for every C in `cs`, on x's device."""
    if solver == "sklearn":
        w, b, iterations = fit_logreg_sklearn(x.cpu().numpy(), y.cpu().numpy(), cs, max_iter, tol)
        return w.to(x.device), b.to(x.device), iterations
    return fit_logreg_batched(x, y, num_classes, cs, max_iter, tol)


# -------------------------------------------------------------------------------------------------- k-NN
def knn_scores(train_x, train_y, query_x, num_classes: int, ks=KNN_KS, temperature: float = KNN_TEMPERATURE,
               max_block: int = 1 << 25) -> dict[int, torch.Tensor]:
    """Weighted k-NN on L2-normalised features (DINO): class scores sum exp(cos / T) over the k nearest.

    The similarity matrix is computed in row blocks of at most `max_block` entries, never whole.
    """
    train = F.normalize(train_x.float(), dim=1)
    query = F.normalize(query_x.float(), dim=1)
    ks = sorted({min(k, len(train)) for k in ks})
    top = ks[-1]
    rows = max(1, max_block // max(1, len(train)))
    out = {k: torch.zeros(len(query), num_classes) for k in ks}
    for start in range(0, len(query), rows):
        sims, idx = (query[start:start + rows] @ train.t()).topk(top, dim=1)
        labels, weights = train_y[idx], (sims / temperature).exp()
        for k in ks:
            votes = torch.zeros(len(idx), num_classes, device=weights.device)
            votes.scatter_add_(1, labels[:, :k], weights[:, :k])
            out[k][start:start + rows] = votes.cpu()
    return out
