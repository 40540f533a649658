import numpy as np
import pandas as pd
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


@pytest.mark.parametrize("method", dakl.KMEANS)
def test_every_kmeans_method_pairs_centroids_with_member_targets(data, method):
    tx, ty, _, _ = data
    cx, cy = dakl.centroids(np.vstack([tx] * 3), np.vstack([ty] * 3), 6, seed=0, method=method)
    assert 1 <= len(cx) <= 6 and cx.shape[1] == 16 and cx.dtype == cy.dtype == np.float32
    lab = np.argmax(_unit(np.vstack([tx] * 3)) @ _unit(cx).T, axis=1)
    agree = [np.dot(cy[j], _unit(ty[lab[:40] == j].sum(0, keepdims=True))[0]) for j in range(len(cx))
             if (lab[:40] == j).any()]
    assert np.mean(agree) > 0.95  # each centroid carries the mean target of (nearly) its nearest members


def test_bisecting_kmeans_is_sklearns(data):
    from sklearn.cluster import BisectingKMeans

    tx, ty, _, _ = data
    cx, _ = dakl.centroids(tx, ty, 5, seed=3, method="bisecting")
    ref = BisectingKMeans(n_clusters=5, random_state=3, init="k-means++").fit(_unit(tx).astype(np.float32))
    np.testing.assert_allclose(np.sort(cx, axis=0), np.sort(ref.cluster_centers_, axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="kmeans='nope'"):
        dakl.centroids(tx, ty, 5, method="nope")


def test_old_results_unchanged(data):
    """MiniBatchKMeans + full grid reproduces what the code before the memory work (commit 5af02d2) gave."""
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(12, 32))
    lab = rng.integers(0, 12, 400)
    y = _unit(centers[lab] + 0.6 * rng.normal(size=(400, 32))).astype(np.float32)
    x = _unit(y + 0.5 * rng.normal(size=(400, 32))).astype(np.float32)
    params, grid = dakl.tune_dakl(x[:250], y[:250], x[250:330], y[250:330], gammas=(1.0, 10.0), rs=(20, 100),
                                  alphas=(0.1, 10.0), seed=0, kmeans="minibatch")
    np.testing.assert_allclose(grid.oof_cosine, [0.2849317, 0.2382654, 0.277337, 0.2773022, 0.3022941, 0.3190924,
                                                 0.3081424, 0.3080876], atol=2e-6)
    assert (params.gamma, params.r, params.alpha) == (1.0, 100, 10.0)
    pred = dakl.dakl(x[:250], y[:250], x[330:], params, seed=0, kmeans="minibatch")
    assert mean_cosine(pred, y[330:]) == pytest.approx(0.3207224, abs=2e-6)
    np.testing.assert_allclose(pred[0, :3], [-0.200622, 0.061925, 0.134514], atol=2e-6)


def test_in_place_cholesky_equals_a_direct_solve():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 500))
    g, y = f @ f.T, rng.normal(size=(300, 8))
    got = dakl._ridge_solves(torch.tensor(g), torch.tensor(y), [0.1, 10.0, 1.0]).numpy()
    for i, a in enumerate([0.1, 10.0, 1.0]):
        np.testing.assert_allclose(got[:, 8 * i:8 * i + 8], np.linalg.solve(g + a * np.eye(300), y), rtol=1e-7,
                                   atol=1e-9)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dakl._ridge_solves(torch.tensor(g), torch.tensor(y), [0.0])


def test_cross_fitting_never_uses_a_rows_own_target(data):
    tx, ty, sx, sy = data
    x, y = np.vstack([tx, sx]), np.vstack([ty, sy])
    splits = dakl.crossfit_splits(x, y, folds=4, seed=0)
    assert sorted(np.concatenate([s.rows for s in splits]).tolist()) == list(range(len(x)))
    for s in splits:  # the labelled rows of a split are exactly the rows it does not predict
        assert len(s.x) + len(s.rows) == len(x) and not set(map(bytes, s.x)) & set(map(bytes, x[s.rows]))
    grid = dict(gammas=[10.0], rs=[30], alphas=[1.0], kmeans="minibatch")
    _, _, pred = dakl.tune(splits, **grid)
    i = int(splits[0].rows[0])
    y2 = y.copy()
    y2[i] = -y2[i]  # flip one row's target
    _, _, pred2 = dakl.tune(dakl.crossfit_splits(x, y2, folds=4, seed=0), **grid)
    np.testing.assert_allclose(pred2[i], pred[i], atol=1e-6)  # its own prediction does not move
    assert np.abs(pred2 - pred).max() > 1e-3  # the rows it helps predict do


def test_staged_search_carries_the_best_gammas(data):
    tx, ty, sx, sy = data
    split = [dakl.Split(tx, ty, sx, sy, np.arange(len(sx)))]
    kw = dict(gammas=[0.01, 1.0, 10.0, 30.0], rs=[10, 40], alphas=[0.1, 1.0], kmeans="minibatch")
    full = dakl.tune(split, search="grid", **kw)[1]
    staged = dakl.tune(split, search="staged", keep=2, **kw)[1]
    at10 = full[full.r == 10].groupby("gamma").oof_cosine.max()
    assert set(staged[staged.r == 40].gamma) == set(at10.nlargest(2).index)
    pd.testing.assert_frame_equal(staged[staged.r == 10].reset_index(drop=True),
                                  full[full.r == 10].reset_index(drop=True))
