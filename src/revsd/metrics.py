"""The task's metric: row-wise cosine between predicted and true prompt embeddings (the one implementation)."""

from __future__ import annotations

import numpy as np


def row_cosines(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of two (n, d) arrays, in float64; inputs need not be normalised."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1), 1e-24)
    return (p * t).sum(1) / norms


def mean_cosine(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean row-wise cosine (the Kaggle / paper metric); nan for no rows."""
    if len(pred) == 0:
        return float("nan")
    return float(row_cosines(pred, target).mean())
