"""Domain-adaptive kernel learning (DAKL, paper Eq. 5-7), vectorised, chunked and cross-fitted.

Z = r k-means centroids of the labelled embeddings (each paired with the normalised mean target of its members)
∪ p unlabelled target-domain embeddings. With K = Z Zᵀ, K̂_ij = K_ij / √(K_ii K_jj) and K_DA = exp(−γ (1 − K̂)),
the rows of K_DA are the new features φ(z) ∈ R^{r+p}. A dual ridge regression on the linear kernel of those
features, G = Φ Φᵀ, is fitted on the r labelled rows, A = (G_tt + α I)⁻¹ Y, and the target rows are predicted as
G_st A, then L2-normalised.

Memory stays bounded: K_DA is never materialised. Its column blocks are computed on the fly, G_tt is accumulated
block-wise (r × r float64), solved by Cholesky in place on the CPU (one r × r matrix for every α), W = Φ_tᵀ A is
built block by block and predictions are Φ_s W over row blocks: peak ≈ r² float64 + O(chunk·(r + p) + (r + p)·d).
Runs on the GPU when there is one. Centroids come from sklearn's BisectingKMeans (the paper's), faiss k-means or
sklearn's MiniBatchKMeans, computed once per r and labelled set.

:func:`tune` searches (γ, r, α) over one or more "splits" (labelled rows → target rows with known targets): the
paper's way is one split, training rows → OOF rows; cross-fitting is K splits of the OOF rows, so no row's own
target is ever used to predict it. ``search="staged"`` evaluates every γ at the smallest r and carries the best
``keep`` γ to each larger r (the large-r fits dominate the cost); ``"grid"`` evaluates every point.

(The paper's released code applied the RBF step per row inside a loop, so its kernel was all ones and the
regressor predicted a constant; :func:`kernel_features` and the tests guard against that.)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from revsd.metrics import mean_cosine

KMEANS = ("bisecting", "faiss", "minibatch")


@dataclasses.dataclass(frozen=True)
class DaklParams:
    gamma: float = 0.01  # RBF width on the cosine distance, K_DA = exp(-gamma (1 - K_hat)); the paper's 0.01
    r: int = 10000  # number of k-means centroids standing in for the labelled samples; the paper's 10,000
    alpha: float = 10.0  # L2 (ridge) strength of the dual regression; the paper's 10


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """K̂ = Z Zᵀ / √(diag diagᵀ) equals the Gram matrix of the row-normalised Z."""
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("DAKL: an embedding has zero norm, so K_ii = 0 and K̂ is undefined")
    return x / norms


def _as_tensor(a, device, dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), device=device).to(dtype)


def kernel_features(z: np.ndarray, gamma: float) -> np.ndarray:
    """Dense K_DA = exp(−γ(1 − K̂)) for small inputs (inspection and tests); rows are the features φ(z)."""
    zt = _unit(torch.as_tensor(np.asarray(z, dtype=np.float64)))
    return torch.exp(-gamma * (1.0 - zt @ zt.T)).numpy()


def _labels(xn: np.ndarray, r: int, seed: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(centres (r, d), member label per row) of the unit rows ``xn`` by ``method`` (see :data:`KMEANS`)."""
    if method == "bisecting":
        from sklearn.cluster import BisectingKMeans

        km = BisectingKMeans(n_clusters=r, random_state=seed, init="k-means++").fit(xn)
        return km.cluster_centers_, km.labels_
    if method == "faiss":
        import faiss

        km = faiss.Kmeans(xn.shape[1], r, niter=20, seed=seed, max_points_per_centroid=256, verbose=False)
        km.train(xn)
        return km.centroids, km.index.search(xn, 1)[1][:, 0]
    if method == "minibatch":
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(n_clusters=r, random_state=seed, n_init=3, batch_size=max(1024, 4 * r))
        lab = km.fit_predict(xn)
        return km.cluster_centers_, lab
    raise ValueError(f"DAKL: kmeans={method!r}: expected one of {', '.join(KMEANS)}")


def centroids(x: np.ndarray, y: np.ndarray, r: int, seed: int = 0,
              method: str = "bisecting") -> tuple[np.ndarray, np.ndarray]:
    """r k-means centroids of the (normalised) embeddings x, each with the normalised mean target of its members.

    With r ≥ len(x) the samples themselves are returned. Empty clusters are dropped. float32 throughout.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    if len(x) != len(y):
        raise ValueError(f"DAKL: {len(x)} training embeddings but {len(y)} targets")
    if r >= len(x):
        return x, y
    centres, lab = _labels(x / np.linalg.norm(x, axis=1, keepdims=True), r, seed, method)
    lab = torch.as_tensor(np.asarray(lab, dtype=np.int64))
    counts = torch.bincount(lab, minlength=r).numpy()
    sums = torch.zeros(r, y.shape[1], dtype=torch.float64)
    for s in range(0, len(y), 65536):  # float64 sums of float32 rows, 64k rows at a time
        sums.index_add_(0, lab[s:s + 65536], torch.from_numpy(y[s:s + 65536]).to(torch.float64))
    keep = counts > 0
    cy = sums.numpy()[keep]
    cy /= np.linalg.norm(cy, axis=1, keepdims=True)
    return np.asarray(centres, dtype=np.float32)[keep], cy.astype(np.float32)


def _ridge_solves(g: torch.Tensor, y: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """``[(G + αI)⁻¹ Y for α in alphas]`` side by side, G symmetric positive semi-definite (r × r float64).

    On the CPU the Cholesky factor overwrites G's upper triangle in place (no second r × r matrix); the lower
    triangle and the saved diagonal restore G for the next α. On a GPU, torch's Cholesky (memory is plentiful).
    """
    if min(alphas) <= 0:
        raise ValueError(f"DAKL: alpha must be > 0, got {list(alphas)}")
    out = []
    if g.device.type != "cpu":
        for al in alphas:
            g.diagonal().add_(al)
            out.append(torch.cholesky_solve(y, torch.linalg.cholesky(g)))
            g.diagonal().sub_(al)
        return torch.cat(out, dim=1)
    from scipy.linalg import cho_factor, cho_solve

    a = g.numpy()  # shares memory; a.T is Fortran-ordered and, G being symmetric, equal to G
    diag = a.diagonal().copy()
    yn = y.numpy()
    for i, al in enumerate(alphas):
        if i:
            _upper_from_lower(a)
        np.fill_diagonal(a, diag + al)
        factor = cho_factor(a.T, lower=True, overwrite_a=True, check_finite=False)  # writes a's upper triangle
        out.append(torch.from_numpy(cho_solve(factor, yn, check_finite=False)))
    return torch.cat(out, dim=1)


def _upper_from_lower(a: np.ndarray, block: int = 1024) -> None:
    """Mirror the strict lower triangle of the square ``a`` onto its upper triangle, block by block."""
    n = len(a)
    for s in range(0, n, block):
        e = min(s + block, n)
        a[s:e, e:] = a[e:, s:e].T
        d = a[s:e, s:e]
        iu = np.triu_indices(e - s, 1)
        d[iu] = d.T[iu]


def dakl_predict(train_x: np.ndarray, train_y: np.ndarray, target_x: np.ndarray, gamma: float,
                 alpha: float | Sequence[float], *, chunk: int = 2048, device: str | None = None,
                 dtype: torch.dtype = torch.float32, progress: bool = False):
    """Eq. 5–7 on Z = train_x ∪ target_x; returns the L2-normalised predictions for target_x (p, d).

    ``alpha`` may be a sequence: G_tt is then built once and a list of predictions (one per α) is returned.
    Kernel blocks are computed in ``dtype``; G_tt is accumulated and solved in float64.
    """
    dev = _device(device)
    alphas = [float(alpha)] if np.isscalar(alpha) else [float(a) for a in alpha]
    zt = _unit(_as_tensor(train_x, dev, dtype))
    zs = _unit(_as_tensor(target_x, dev, dtype))
    z = torch.cat([zt, zs])
    y = _as_tensor(train_y, dev, torch.float64)
    r, n, d = len(zt), len(z), y.shape[1]
    if len(y) != r:
        raise ValueError(f"DAKL: {r} training rows but {len(y)} targets")

    def phi(rows: torch.Tensor, cols: slice) -> torch.Tensor:  # a block of K_DA = exp(γ(K̂ − 1)), in place
        return (rows @ z[cols].T).sub_(1.0).mul_(gamma).exp_()

    blocks = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    tiles = [slice(i, min(i + chunk, r)) for i in range(0, r, chunk)]
    pairs = [(ti, tj) for k, ti in enumerate(tiles) for tj in tiles[:k + 1]]  # lower triangle: G is symmetric
    g = torch.zeros(r, r, dtype=torch.float64, device=dev)
    for c in tqdm(blocks, desc="DAKL G_tt", disable=not progress):  # G_tt = Φ_t Φ_tᵀ, column block by block
        f = phi(zt, c)  # (r, chunk)
        for ti, tj in pairs:  # float64 accumulation with chunk × chunk temporaries
            g[ti, tj] += (f[ti] @ f[tj].T).to(torch.float64)
    for ti, tj in pairs:
        if ti != tj:  # diagonal tiles are complete already
            g[tj, ti] = g[ti, tj].T
    a = _ridge_solves(g, y, alphas).to(dtype)  # (r, d·len(alphas))
    del g
    w = torch.empty(n, a.shape[1], dtype=dtype, device=dev)  # W = Φ_tᵀ A
    for c in blocks:
        w[c] = phi(zt, c).T @ a
    pred = torch.empty(len(zs), a.shape[1], dtype=dtype, device=dev)  # G_st A = Φ_s W, row block by row block
    for rb in tqdm(range(0, len(zs), chunk), desc="DAKL predict", disable=not progress):
        rows = zs[rb:rb + chunk]
        acc = torch.zeros(len(rows), a.shape[1], dtype=dtype, device=dev)
        for c in blocks:
            acc += phi(rows, c) @ w[c]
        pred[rb:rb + chunk] = acc
    out = [torch.nn.functional.normalize(p.to(torch.float64), dim=1).cpu().numpy().astype(np.float32)
           for p in pred.split(d, dim=1)]
    return out[0] if np.isscalar(alpha) else out


def dakl(train_x: np.ndarray, train_y: np.ndarray, target_x: np.ndarray, params: DaklParams, seed: int = 0,
         kmeans: str = "bisecting", cache: dict | None = None, **kw) -> np.ndarray:
    """Centroids of the labelled domain (from ``cache[r]`` when given), then :func:`dakl_predict` on the target."""
    cx, cy = _cached(cache, params.r, lambda: centroids(train_x, train_y, params.r, seed, kmeans))
    return dakl_predict(cx, cy, target_x, params.gamma, params.alpha, **kw)


def _cached(cache: dict | None, key, make):
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


@dataclasses.dataclass
class Split:
    """Labelled rows (x, y) → target rows ``x_t`` whose targets ``y_t`` score the fit; ``rows`` places the target
    rows in the scored set (for cross-fitted predictions)."""

    x: np.ndarray
    y: np.ndarray
    x_t: np.ndarray
    y_t: np.ndarray
    rows: np.ndarray


def crossfit_splits(x: np.ndarray, y: np.ndarray, folds: int, seed: int = 0) -> list[Split]:
    """K splits of one labelled set: fold k is predicted from the other folds only (a seeded random partition)."""
    n = len(x)
    if not 2 <= folds <= n:
        raise ValueError(f"DAKL cross-fitting: folds={folds} needs 2 ≤ folds ≤ {n} (the OOF rows)")
    fold = np.random.default_rng(seed).permutation(n) % folds
    return [Split(x[fold != k], y[fold != k], x[fold == k], y[fold == k], np.flatnonzero(fold == k))
            for k in range(folds)]


def tune(splits: Sequence[Split], gammas: Sequence[float], rs: Sequence[int], alphas: Sequence[float], *,
         seed: int = 0, kmeans: str = "bisecting", search: str = "grid", keep: int = 2, caches=None,
         **kw) -> tuple[DaklParams, pd.DataFrame, np.ndarray]:
    """Search (γ, r, α) by the mean cosine over every split's target rows; returns the best parameters, the grid
    evaluated (one row per point) and the best point's predictions for the scored rows (in ``rows`` order).

    r values above the smallest labelled set collapse to it. Centroids are computed once per (split, r) and kept
    in ``caches[i]`` (a dict per split) for later fits. Ties go to the first point evaluated.
    """
    if search not in ("grid", "staged"):
        raise ValueError(f"DAKL: search={search!r}: expected grid or staged")
    caches = caches if caches is not None else [{} for _ in splits]
    n_lab = min(len(s.x) for s in splits)
    total = sum(len(s.rows) for s in splits)
    d = splits[0].y.shape[1]
    rows, best, best_pred = [], -np.inf, None
    y_all = np.empty((total, d), dtype=np.float32)
    for s in splits:
        y_all[s.rows] = s.y_t
    candidates = list(dict.fromkeys(float(g) for g in gammas))
    for r in sorted({min(int(r), n_lab) for r in rs}):
        cents = [_cached(c, r, lambda s=s, r=r: centroids(s.x, s.y, r, seed, kmeans))
                 for s, c in zip(splits, caches)]
        at_r = {}
        for gamma in candidates:
            preds = np.empty((len(alphas), total, d), dtype=np.float32)
            for s, (cx, cy) in zip(splits, cents):
                preds[:, s.rows] = np.stack(dakl_predict(cx, cy, s.x_t, gamma, list(alphas), **kw))
            for a, p in zip(alphas, preds):
                score = mean_cosine(p, y_all)
                rows.append(dict(gamma=gamma, r=r, alpha=float(a), oof_cosine=score))
                at_r[gamma] = max(at_r.get(gamma, -np.inf), score)
                if score > best:
                    best, best_pred = score, p.copy()
        if search == "staged":
            candidates = sorted(at_r, key=lambda g: -at_r[g])[:keep]
            candidates = [g for g in at_r if g in candidates]  # keep the grid's order
    grid = pd.DataFrame(rows)
    top = grid.loc[grid["oof_cosine"].idxmax()]
    return DaklParams(float(top.gamma), int(top.r), float(top.alpha)), grid, best_pred


def tune_dakl(train_x: np.ndarray, train_y: np.ndarray, oof_x: np.ndarray, oof_y: np.ndarray,
              gammas: Sequence[float] = (0.01, 1.0, 10.0), rs: Sequence[int] = (256, 1024, 10000),
              alphas: Sequence[float] = (0.1, 1.0, 10.0), seed: int = 0, **kw) -> tuple[DaklParams, pd.DataFrame]:
    """The paper's setting: training rows labelled, OOF rows as the target domain; best (γ, r, α) and the grid."""
    rows = np.arange(len(oof_x))
    params, grid, _ = tune([Split(train_x, train_y, oof_x, oof_y, rows)], gammas, rs, alphas, seed=seed, **kw)
    return params, grid


__all__ = ["DaklParams", "KMEANS", "Split", "kernel_features", "centroids", "dakl_predict", "dakl",
           "crossfit_splits", "tune", "tune_dakl"]
