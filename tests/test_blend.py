import shutil

import numpy as np
import pandas as pd
import pytest

from revsd import artifacts, blend, paths
from revsd.artifacts import Predictions, load_predictions, save_predictions
from revsd.metrics import mean_cosine
from revsd.submission import read_submission


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def noisy(y, sigma, rng):
    """A simulated model: the true embedding plus isotropic noise of norm ≈ sigma."""
    return _unit(y + sigma * rng.normal(size=y.shape) / np.sqrt(y.shape[1])).astype(np.float32)


def clone_exp(src: str, dst: str) -> str:
    """Copy 01_filter + 02_targets of ``src`` to a fresh exp so this file's runs are the only ones there."""
    for stage in ("01_filter", "02_targets"):
        shutil.copytree(paths.stage_dir(stage, src, create=False), paths.stage_dir(stage, dst, create=False),
                        dirs_exist_ok=True)
    return dst


def synthetic_exp(exp: str, n=(120, 40, 40), centres=20, d=384, seed=0) -> str:
    """01/02 outputs of a synthetic experiment (what 06 reads): clustered unit targets, a train/val/test split."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    y = _unit(c[rng.integers(0, centres, sum(n))] + 0.8 * rng.normal(size=(sum(n), d))).astype(np.float32)
    ids = np.array([f"img{i:05d}" for i in range(sum(n))])
    split = np.repeat(["train", "val", "test"], n)
    artifacts.save_parquet(paths.stage_dir("01_filter", exp) / "filtered.parquet",
                           pd.DataFrame({"image_id": ids, "prompt": "p", "split": split}))
    artifacts.save_npy(paths.stage_dir("02_targets", exp) / "targets.npy", y)
    artifacts.save_npy(paths.stage_dir("02_targets", exp) / "ids.npy", ids)
    return exp


def _targets(exp):
    out = paths.stage_dir("02_targets", exp, create=False)
    split = pd.read_parquet(paths.stage_dir("01_filter", exp, create=False) / "filtered.parquet")["split"]
    return np.load(out / "targets.npy"), np.load(out / "ids.npy").astype(str), split.to_numpy()


def fake_run(exp, name, backbone, variant, sigma, seed=0, stage="03_train", done=True, epochs=3, vocab=None,
             head_config="parallel"):
    """A run directory per the artifacts contract, with predictions = real targets + noise of size sigma
    (training rows in-sample: half the noise)."""
    emb, ids, split = _targets(exp)
    rng = np.random.default_rng(seed)
    d = paths.stage_dir(stage, exp, name)
    cos = {}
    for part, fname, s in (("train", "preds_train.npz", sigma / 2), ("val", "preds_oof.npz", sigma),
                           ("test", "preds_test.npz", sigma)):
        rows = np.flatnonzero(split == part)
        pred = noisy(emb[rows], s, rng)
        save_predictions(d / fname, Predictions(ids[rows], pred))
        cos[part] = mean_cosine(pred, emb[rows])
    const = _unit(emb[split == "train"].mean(0))
    vocab = variant != "plain" if vocab is None else vocab
    artifacts.write_json(d / "metrics.json", {
        "run": name, "stage": stage, "backbone": backbone, "variant": variant, "head_config": head_config,
        "vocab_head": vocab, "lam": 0.1 if vocab else 0.0, "vocab_size": 64, "mode": "frozen", "epochs": epochs,
        "steps": 10 * epochs, "val_cosine": cos["val"], "test_cosine": cos["test"],
        "const_mean_val": mean_cosine(np.tile(const, ((split == "val").sum(), 1)), emb[split == "val"]),
        "const_mean_test": mean_cosine(np.tile(const, ((split == "test").sum(), 1)), emb[split == "test"])})
    pd.DataFrame({"epoch": range(1, epochs + 1), "step": range(10, 10 * epochs + 1, 10),
                  "train_loss": np.linspace(0.5, 0.3, epochs), "train_cos": np.linspace(0.6, 0.8, epochs),
                  "val_cos": np.linspace(0.55, cos["val"], epochs), "lr": 1e-3, "seconds": 1.0}
                 ).to_csv(d / "summary.csv", index=False)
    if done:
        (d / "DONE").touch()
    return d


@pytest.fixture(scope="module")
def exp(prepared_exp):
    e = clone_exp(prepared_exp, "blend_t")
    fake_run(e, "lite0_plain", "effnet_lite0", "plain", 1.2, seed=1)
    fake_run(e, "lite0_vocab", "effnet_lite0", "vocab", 0.6, seed=2)
    fake_run(e, "lite2_vocab", "effnet_lite2", "vocab", 0.9, seed=3)
    fake_run(e, "lite0_curr", "effnet_lite0", "curriculum_equal", 1.0, seed=4, stage="05_curriculum")
    fake_run(e, "unfinished", "effnet_lite0", "cfg2", 0.1, seed=5, done=False)
    return e


def test_fit_weights_on_simplex_and_prefers_the_good_model():
    rng = np.random.default_rng(0)
    y = _unit(rng.normal(size=(200, 384)))
    models = [noisy(y, 2.0, rng), noisy(y, 0.4, rng), noisy(y, 2.0, rng)]
    w = blend.fit_weights(models, y)
    assert w.shape == (3,) and (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert w.argmax() == 1 and w[1] > 0.6
    fitted = mean_cosine(blend.weighted_blend(np.stack(models), w), y)
    assert fitted >= mean_cosine(blend.weighted_blend(np.stack(models), [1 / 3] * 3), y)
    assert fitted >= max(mean_cosine(m, y) for m in models) - 1e-6
    np.testing.assert_array_equal(w, blend.fit_weights(models, y))  # deterministic
    assert blend.fit_weights(models[:1], y).tolist() == [1.0]


def test_fit_weights_mixes_complementary_models():
    rng = np.random.default_rng(1)
    y = _unit(rng.normal(size=(300, 384)))
    a, b = noisy(y, 1.0, rng), noisy(y, 1.0, rng)  # independent errors: the mean beats both
    w = blend.fit_weights([a, b], y)
    assert w == pytest.approx([0.5, 0.5], abs=0.1)
    assert mean_cosine(blend.weighted_blend(np.stack([a, b]), w), y) > max(mean_cosine(a, y), mean_cosine(b, y))


def test_median_and_weighted_blend():
    good = _unit(np.random.default_rng(0).normal(size=(5, 384)))
    stack = np.stack([good, good * 3.0, -good])  # scale is ignored; the outlier is voted out
    np.testing.assert_allclose(blend.median_blend(stack), good, atol=1e-6)
    np.testing.assert_allclose(blend.weighted_blend(stack, [0, 1, 0]), good, atol=1e-6)
    mix = blend.weighted_blend(stack, [0.25, 0.25, 0.5])  # cancels out exactly: zeros, not NaN
    assert np.isfinite(mix).all() and np.abs(mix).max() < 1e-3
    assert blend.weighted_blend(stack, [0.2, 0.3, 0.5]).dtype == np.float32
    with pytest.raises(ValueError, match="weights"):
        blend.weighted_blend(stack, [0.5, 0.5])


def test_discover_and_select(exp):
    runs = blend.discover_runs(exp)
    assert [(r.stage, r.name) for r in runs] == [("03_train", "lite0_plain"), ("03_train", "lite0_vocab"),
                                                 ("03_train", "lite2_vocab"), ("05_curriculum", "lite0_curr")]
    assert [r.name for r in blend.select_runs(runs, "best")] == ["lite0_vocab", "lite2_vocab"]
    assert len(blend.select_runs(runs, "all")) == 4
    assert [r.name for r in blend.select_runs(runs, "lite2_vocab, lite0_plain")] == ["lite2_vocab", "lite0_plain"]
    with pytest.raises(ValueError, match="unknown run.*nope"):
        blend.select_runs(runs, "nope")


def test_streamed_train_blend_equals_the_in_memory_blend(exp):
    runs = blend.discover_runs(exp)
    ids, stack = blend.join_predictions(runs, "train")
    w = np.array([0.1, 0.4, 0.3, 0.2])
    np.testing.assert_allclose(blend.streamed_weighted_blend(runs, "train", ids, w), blend.weighted_blend(stack, w),
                               atol=1e-6)


def test_join_realigns_by_id_and_refuses_missing_ids(exp, capsys):
    runs = blend.select_runs(blend.discover_runs(exp), "best")
    ids, stack = blend.join_predictions(runs, "test")
    assert stack.shape == (2, len(ids), 384) and stack.dtype == np.float32
    p = load_predictions(runs[1].path / "preds_test.npz")
    try:
        save_predictions(runs[1].path / "preds_test.npz", Predictions(p.ids[::-1], p.emb[::-1]))
        ids2, stack2 = blend.join_predictions(runs, "test")  # a reversed file is re-aligned by id
        assert ids2.tolist() == ids.tolist()
        np.testing.assert_array_equal(stack2[1], stack[1])
        save_predictions(runs[1].path / "preds_test.npz", Predictions(p.ids[2:], p.emb[2:]))
        with pytest.raises(ValueError, match=f"03_train/{runs[1].name}/preds_test.npz lacks 2.*allow_partial"):
            blend.join_predictions(runs, "test")
        with pytest.warns(UserWarning, match="lacks 2"):
            ids3, _ = blend.join_predictions(runs, "test", allow_partial=True)
        assert ids3.tolist() == ids[2:].tolist() and "WARNING" in capsys.readouterr().out
        save_predictions(runs[1].path / "preds_test.npz", Predictions(["zz1", "zz2"], p.emb[:2]))
        with pytest.raises(ValueError, match="share no image id"):
            blend.join_predictions(runs, "test", allow_partial=True)
    finally:
        save_predictions(runs[1].path / "preds_test.npz", p)


def test_stage_refuses_a_run_with_half_the_test_ids(prepared_exp):
    """Issue 14: one run's preds_test.npz holds half the test ids -> 06 stops, naming the run and the ids."""
    e = clone_exp(prepared_exp, "blend_partial")
    fake_run(e, "good", "effnet_lite0", "vocab", 0.8, seed=1)
    smoke = fake_run(e, "smoke", "effnet_lite2", "vocab", 0.9, seed=2)
    p = load_predictions(smoke / "preds_test.npz")
    half = len(p) // 2
    save_predictions(smoke / "preds_test.npz", Predictions(p.ids[:half], p.emb[:half]))
    cfg = dict(exp=e, runs="all", smoke=True, dakl_rs="16")
    with pytest.raises(ValueError, match=f"03_train/smoke/preds_test.npz lacks {len(p) - half}, e.g. .*"
                                         f"{p.ids[half]}"):
        blend.run(blend.EnsembleConfig(**cfg))
    assert not (paths.stage_dir("06_dakl_ensemble", e) / "ensemble.json").exists()
    with pytest.warns(UserWarning, match="lacks"):
        res = blend.run(blend.EnsembleConfig(**cfg, allow_partial=True))
    assert res["n"]["test"] == half and res["partial"]["test"]["lacking"] == {"03_train/smoke": len(p) - half}
    top = (paths.working_dir() / "report.md").read_text().split("\n## ")[0]
    assert f"{half} of the {len(p)} test ids" in top and "allow_partial" in top


def test_stage_run_end_to_end(exp):
    res = blend.run(blend.EnsembleConfig(exp=exp, runs="all", dakl_fit="train", dakl_rs="16,64",
                                         dakl_gammas="3,10", dakl_alphas="0.1,1"))
    out = paths.stage_dir("06_dakl_ensemble", exp, create=False)
    w = np.array(res["weights"])
    assert len(w) == 4 and (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-5)
    sc = res["scores"]
    singles = [r.val_cosine for r in blend.discover_runs(exp)]
    assert sc["weighted"]["oof"] >= max(singles) - 1e-6  # weights fitted on exactly these OOF rows
    assert sc["weighted"]["test"] > sc["constant_mean"]["test"]
    final = load_predictions(out / "final.npz")
    ids, emb = read_submission(res["submission"])
    assert ids.tolist() == final.ids.tolist() and len(ids) == res["n"]["test"]
    np.testing.assert_allclose(emb, final.emb, atol=1e-6)
    assert res["final"] in ("weighted", "dakl") and res["dakl"]["r"] in (16, 64)
    assert res["n"]["labelled"] == len(blend.join_predictions(blend.discover_runs(exp), "train")[0])
    dakl_test = pd.read_parquet(out / "test_cosines.parquet")["dakl"]
    assert dakl_test.std() > 1e-3  # DAKL predictions are not a constant
    assert (out / "report.md").exists() and res["report"].endswith("report.md")


def test_cross_fitted_dakl_is_out_of_fold(exp):
    """dakl_fit=oof: the OOF score of DAKL comes from fold-wise fits on the other OOF rows only."""
    res = blend.run(blend.EnsembleConfig(exp=exp, runs="all", dakl_gammas="3,10", dakl_alphas="0.1,1",
                                         dakl_rs="4,1000", dakl_folds=3))
    n_oof = res["n"]["oof"]
    assert res["dakl_fit"] == "oof" and res["n"]["labelled"] == n_oof
    grid = pd.read_parquet(paths.stage_dir("06_dakl_ensemble", exp) / "dakl_grid.parquet")
    assert set(grid.r) == {4, n_oof - -(-n_oof // 3)}  # r capped at the labelled rows of the largest fold's fit
    assert res["scores"]["dakl"]["oof"] == pytest.approx(grid.oof_cosine.max(), abs=1e-6)


def test_old_code_path_results_unchanged(_isolated_working):
    """06 with the old settings (training rows, MiniBatchKMeans, full grid) reproduces the numbers the code
    before the memory work (commit 5af02d2) gave on this synthetic experiment."""
    e = synthetic_exp("old_path")
    fake_run(e, "a_plain", "bb_a", "plain", 1.4, seed=1)
    fake_run(e, "a_vocab", "bb_a", "vocab", 0.9, seed=2)
    fake_run(e, "b_vocab", "bb_b", "vocab", 1.1, seed=3)
    res = blend.run(blend.EnsembleConfig(exp=e, runs="all", dakl_fit="train", dakl_kmeans="minibatch",
                                         dakl_search="grid", dakl_rs="16,64,500", dakl_gammas="1,10",
                                         dakl_alphas="0.1,1"))
    saved = {"median": (0.8048534732485997, 0.800074735531106), "weighted": (0.8493592320662501, 0.8462469787591342),
             "dakl": (0.7724526568626633, 0.7712701511385203),
             "constant_mean": (0.1478962838353839, 0.17308560809088416)}
    for m, (oof, test) in saved.items():
        assert res["scores"][m]["oof"] == pytest.approx(oof, abs=2e-6), m
        assert res["scores"][m]["test"] == pytest.approx(test, abs=2e-6), m
    assert res["weights"] == pytest.approx([0.235471, 0.44442, 0.320109], abs=2e-5)
    assert res["dakl"] == {"gamma": 1.0, "r": 120, "alpha": 0.1} and res["final"] == "weighted"
    grid = pd.read_parquet(paths.stage_dir("06_dakl_ensemble", e) / "dakl_grid.parquet")
    assert grid.r.tolist() == [16] * 4 + [64] * 4 + [120] * 4
    np.testing.assert_allclose(grid.oof_cosine, [0.6580191, 0.5862168, 0.6591245, 0.6591171, 0.7534375, 0.7284559,
                                                 0.7391304, 0.7391967, 0.7724527, 0.7537573, 0.740206, 0.7401381],
                               atol=2e-6)


def test_run_without_runs_says_what_to_do(prepared_exp):
    e = clone_exp(prepared_exp, "blend_empty")
    with pytest.raises(FileNotFoundError, match="run 03_train first"):
        blend.run(blend.EnsembleConfig(exp=e, smoke=True))


def test_unknown_parameter_rejected():
    with pytest.raises(Exception, match="did you mean 'runs'"):
        blend.EnsembleConfig.from_dict({"run": "all"})


@pytest.mark.parametrize("field,value,match", [("dakl_rs", "a,b", "dakl_rs='a,b'"), ("final", "best", "final='best'"),
                                               ("dakl_fit", "test", "dakl_fit='test'"),
                                               ("dakl_kmeans", "kmeans", "dakl_kmeans='kmeans'"),
                                               ("dakl_alphas", "0,1", "must be > 0"), ("dakl_folds", 1, "folds=1")])
def test_bad_settings_rejected_before_anything_runs(exp, field, value, match):
    with pytest.raises(ValueError, match=match):
        blend.check(blend.EnsembleConfig(exp=exp, **{field: value}))
    with pytest.raises(ValueError, match=match):
        blend.run(blend.EnsembleConfig(exp=exp, **{field: value}))


def test_defaults_hold_the_papers_dakl_setting():
    cfg = blend.EnsembleConfig()
    assert 0.01 in blend._grid(cfg.dakl_gammas, "g") and 10000 in blend._grid(cfg.dakl_rs, "r")
    assert 10 in blend._grid(cfg.dakl_alphas, "a") and cfg.dakl_kmeans in ("faiss", "bisecting")


@pytest.mark.slow
def test_notebook_smoke(exp, tmp_path):
    from revsd.pipeline import execute_notebook

    nb = execute_notebook("06_dakl_ensemble", {"exp": exp, "smoke": True, "runs": "best"}, tmp_path)
    text = nb.read_text()
    assert "all models (2 runs): weighted mean" in text and "image/png" in text
    assert (paths.submissions_dir() / "submission.csv").exists()
