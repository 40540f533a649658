import numpy as np
import pytest
import torch

from revsd import dakl
from revsd.metrics import mean_cosine


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def naive_dakl(train_x, train_y, target_x, gamma, alpha):
    """Eq. 5–7 written out densely, loop-free: the reference the chunked version must match."""
    z = np.vstack([train_x, target_x]).astype(np.float64)
    k = z @ z.T
    dg = np.sqrt(np.diag(k))
    k_hat = k / np.outer(dg, dg)
    k_da = np.exp(-gamma * (1 - k_hat))
    g = k_da @ k_da.T
    r = len(train_x)
    a = np.linalg.solve(g[:r, :r] + alpha * np.eye(r), train_y)
    return _unit(g[r:, :r] @ a)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    lab = rng.integers(0, 5, 120)
    x = centers[lab] + 0.5 * rng.normal(size=(120, 16))  # not normalised: K̂ must do it
    w = rng.normal(size=(16, 8))
    y = _unit(np.tanh(x @ w) + 0.1 * rng.normal(size=(120, 8)))
    return x[:40], y[:40], x[40:], y[40:]


@pytest.mark.parametrize("gamma,alpha,chunk", [(1.0, 0.1, 7), (10.0, 1.0, 2048), (30.0, 10.0, 33)])
def test_matches_naive_implementation(data, gamma, alpha, chunk):
    tx, ty, sx, _ = data
    ref = naive_dakl(tx, ty, sx, gamma, alpha)
    got = dakl.dakl_predict(tx, ty, sx, gamma, alpha, chunk=chunk, dtype=torch.float64)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)


def test_float32_close_and_alpha_list_equals_single_calls(data):
    tx, ty, sx, _ = data
    many = dakl.dakl_predict(tx, ty, sx, 10.0, [0.1, 1.0], chunk=16)
    for a, p in zip([0.1, 1.0], many):
        np.testing.assert_allclose(p, naive_dakl(tx, ty, sx, 10.0, a), atol=1e-3)


def test_kernel_is_not_degenerate(data):
    """The released code's kernel was all ones (constant predictions); ours must not be."""
    tx, ty, sx, _ = data
    k = dakl.kernel_features(np.vstack([tx, sx]), gamma=10.0)
    assert np.allclose(np.diag(k), 1)
    off = k[~np.eye(len(k), dtype=bool)]
    assert off.std() > 0.05 and off.min() < 0.5
    pred = dakl.dakl_predict(tx, ty, sx, 10.0, 1.0)
    assert pred.std(axis=0).mean() > 0.05  # predictions differ between inputs
    moved = dakl.dakl_predict(tx, ty, sx[::-1].copy(), 10.0, 1.0)
    np.testing.assert_allclose(moved, pred[::-1], atol=1e-4)  # and follow their own input


def test_beats_constant_mean_on_learnable_data(data):
    tx, ty, sx, sy = data
    params, grid = dakl.tune_dakl(tx, ty, sx, sy, gammas=(1.0, 10.0), rs=(20, 1000), alphas=(0.1, 1.0))
    assert len(grid) == 2 * 2 * 2 and set(grid.r) == {20, 40}  # r capped at the 40 training rows
    assert grid.oof_cosine.max() == pytest.approx(
        mean_cosine(dakl.dakl(tx, ty, sx, params), sy), abs=1e-6)
    const = _unit(ty.mean(0, keepdims=True))
    assert grid.oof_cosine.max() > mean_cosine(np.repeat(const, len(sy), 0), sy) + 0.05


def test_centroids_pair_with_mean_targets(data):
    tx, ty, _, _ = data
    cx, cy = dakl.centroids(tx, ty, 5, seed=0)
    assert cx.shape == (5, 16) and cy.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(cy, axis=1), 1, atol=1e-5)
    lab = np.argmax(_unit(tx) @ _unit(cx).T, axis=1)  # members = nearest centroid
    for j in range(5):
        np.testing.assert_allclose(cy[j], _unit(ty[lab == j].sum(0, keepdims=True))[0], atol=1e-4)
    cx2, _ = dakl.centroids(tx, ty, 5, seed=0)
    np.testing.assert_array_equal(cx, cx2)  # deterministic


def test_zero_norm_rejected(data):
    tx, ty, sx, _ = data
    sx = sx.copy()
    sx[0] = 0
    with pytest.raises(ValueError, match="zero norm"):
        dakl.dakl_predict(tx, ty, sx, 1.0, 1.0)
