"""Domain-adaptive kernel learning (DAKL, paper Eq. 5-7), vectorised and chunked.

Z = r k-means centroids of the training embeddings (each paired with the normalised mean target of its
members) ∪ p unlabeled target-domain embeddings. With K = Z Zᵀ, K̂_ij = K_ij / √(K_ii K_jj) and
K_DA = exp(−γ (1 − K̂)), the rows of K_DA are the new features φ(z) ∈ R^{r+p}. A dual ridge regression on the
linear kernel of those features, G = Φ Φᵀ, is fitted on the r training rows, A = (G_tt + α I)⁻¹ Y, and the
target rows are predicted as G_st A, then L2-normalised.

Memory stays bounded: K_DA is never materialised. Its column blocks are computed on the fly, G_tt is
accumulated block-wise (r × r), W = Φ_tᵀ A is built block by block, and predictions are Φ_s W over row blocks,
so the peak is about 2·r² float64 (G_tt and the solver's copy) + O(chunk·(r + p) + (r + p)·d), never
(r + p)². Runs on the GPU when there is one.

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


@dataclasses.dataclass(frozen=True)
class DaklParams:
    gamma: float = 10.0  # RBF width on the cosine distance, K_DA = exp(-gamma (1 - K_hat))
    r: int = 2000  # number of k-means centroids standing in for the training samples
    alpha: float = 1.0  # L2 (ridge) strength of the dual regression


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


def centroids(x: np.ndarray, y: np.ndarray, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """r k-means centroids of the (normalised) embeddings x, each with the normalised mean target of its members.

    With r ≥ len(x) the samples themselves are returned. Empty clusters are dropped.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    if len(x) != len(y):
        raise ValueError(f"DAKL: {len(x)} training embeddings but {len(y)} targets")
    if r >= len(x):
        return x, y
    from sklearn.cluster import MiniBatchKMeans

    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    km = MiniBatchKMeans(n_clusters=r, random_state=seed, n_init=3, batch_size=max(1024, 4 * r))
    lab = km.fit_predict(xn)
    counts = np.bincount(lab, minlength=r)
    keep = counts > 0
    sums = np.zeros((r, y.shape[1]), dtype=np.float64)
    np.add.at(sums, lab, y)
    cy = sums[keep] / np.linalg.norm(sums[keep], axis=1, keepdims=True)
    return km.cluster_centers_[keep].astype(np.float32), cy.astype(np.float32)


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
    solutions = []
    for al in alphas:  # ridge on the diagonal in place: no r × r identity or copy of G besides the solver's
        g.diagonal().add_(al)
        solutions.append(torch.linalg.solve(g, y))
        g.diagonal().sub_(al)
    del g
    a = torch.cat(solutions, dim=1)  # (r, d·len(alphas))
    a = a.to(dtype)
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
         **kw) -> np.ndarray:
    """Centroids of the training domain, then :func:`dakl_predict` on the target domain."""
    cx, cy = centroids(train_x, train_y, params.r, seed)
    return dakl_predict(cx, cy, target_x, params.gamma, params.alpha, **kw)


def tune_dakl(train_x: np.ndarray, train_y: np.ndarray, oof_x: np.ndarray, oof_y: np.ndarray,
              gammas: Sequence[float] = (1.0, 3.0, 10.0, 30.0), rs: Sequence[int] = (64, 256, 1024),
              alphas: Sequence[float] = (0.1, 1.0, 10.0), seed: int = 0, **kw) -> tuple[DaklParams, pd.DataFrame]:
    """Grid search on OOF rows used as the target domain (their targets known): best (γ, r, α) and the grid.

    r values above the number of training rows collapse to it (the samples themselves). Ties go to the first.
    """
    rows = []
    rs = sorted({min(int(r), len(train_x)) for r in rs})
    for r in rs:
        cx, cy = centroids(train_x, train_y, r, seed)
        for gamma in gammas:
            preds = dakl_predict(cx, cy, oof_x, gamma, list(alphas), **kw)
            rows += [dict(gamma=float(gamma), r=r, alpha=float(a), oof_cosine=mean_cosine(p, oof_y))
                     for a, p in zip(alphas, preds)]
    grid = pd.DataFrame(rows)
    best = grid.loc[grid["oof_cosine"].idxmax()]
    return DaklParams(float(best.gamma), int(best.r), float(best.alpha)), grid


__all__ = ["DaklParams", "kernel_features", "centroids", "dakl_predict", "dakl", "tune_dakl"]
