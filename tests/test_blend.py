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


def fake_run(exp, name, backbone, variant, sigma, seed=0, stage="03_train", done=True, epochs=3):
    """A run directory per the artifacts contract, with predictions = real targets + noise of size sigma."""
    from revsd import targets

    ts = targets.load(exp)
    rng = np.random.default_rng(seed)
    d = paths.stage_dir(stage, exp, name)
    cos = {}
    for split, fname, s in (("train", "preds_train.npz", sigma / 2), ("val", "preds_oof.npz", sigma),
                            ("test", "preds_test.npz", sigma)):
        rows = ts.rows(split)
        emb = noisy(ts.emb[rows], s, rng)
        save_predictions(d / fname, Predictions(ts.ids[rows], emb))
        cos[split] = mean_cosine(emb, ts.emb[rows])
    const = _unit(ts.emb[ts.rows("train")].mean(0))
    artifacts.write_json(d / "metrics.json", {
        "run": name, "stage": stage, "backbone": backbone, "variant": variant, "head_config": "parallel",
        "lambda": 0.0 if variant == "plain" else 1.0, "vocab_size": 64, "mode": "frozen", "epochs": epochs,
        "steps": 10 * epochs, "val_cosine": cos["val"], "test_cosine": cos["test"],
        "const_mean_val": mean_cosine(np.tile(const, (len(ts.rows("val")), 1)), ts.emb[ts.rows("val")]),
        "const_mean_test": mean_cosine(np.tile(const, (len(ts.rows("test")), 1)), ts.emb[ts.rows("test")])})
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
    assert fitted >= max(mean_cosine(m, y) for m in models) - 1e-9
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


def test_join_on_common_ids(exp, capsys):
    runs = blend.select_runs(blend.discover_runs(exp), "best")
    ids, stack = blend.join_predictions(runs, "test")
    assert stack.shape == (2, len(ids), 384)
    p = load_predictions(runs[1].path / "preds_test.npz")
    save_predictions(runs[1].path / "preds_test.npz", Predictions(p.ids[2:][::-1], p.emb[2:][::-1]))
    try:
        ids2, stack2 = blend.join_predictions(runs, "test")
        assert ids2.tolist() == ids[2:].tolist()  # first run's order, reversed file re-aligned by id
        np.testing.assert_array_equal(stack2[1], stack[1][2:])
        assert "dropped per run" in capsys.readouterr().out
        save_predictions(runs[1].path / "preds_test.npz", Predictions(["zz1", "zz2"], p.emb[:2]))
        with pytest.raises(ValueError, match="share no image id"):
            blend.join_predictions(runs, "test")
    finally:
        save_predictions(runs[1].path / "preds_test.npz", p)


def test_stage_run_end_to_end(exp):
    res = blend.run(blend.EnsembleConfig(exp=exp, runs="all", dakl_rs="16,64", dakl_gammas="3,10",
                                         dakl_alphas="0.1,1"))
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
    dakl_test = pd.read_parquet(out / "test_cosines.parquet")["dakl"]
    assert dakl_test.std() > 1e-3  # DAKL predictions are not a constant
    assert (out / "report.md").exists() and res["report"].endswith("report.md")


def test_run_without_runs_says_what_to_do(prepared_exp):
    e = clone_exp(prepared_exp, "blend_empty")
    with pytest.raises(FileNotFoundError, match="run 03_train first"):
        blend.run(blend.EnsembleConfig(exp=e, smoke=True))


def test_unknown_parameter_rejected():
    with pytest.raises(Exception, match="did you mean 'runs'"):
        blend.EnsembleConfig.from_dict({"run": "all"})


def test_bad_grid_and_final_rejected(exp):
    with pytest.raises(ValueError, match="dakl_rs='a,b'"):
        blend.run(blend.EnsembleConfig(exp=exp, dakl_rs="a,b"))
    with pytest.raises(ValueError, match="final='best'"):
        blend.run(blend.EnsembleConfig(exp=exp, final="best"))


@pytest.mark.slow
def test_notebook_smoke(exp, tmp_path):
    from revsd.pipeline import execute_notebook

    nb = execute_notebook("06_dakl_ensemble", {"exp": exp, "smoke": True, "runs": "best"}, tmp_path)
    text = nb.read_text()
    assert "all models (2 runs): weighted mean" in text and "image/png" in text
    assert (paths.submissions_dir() / "submission.csv").exists()
