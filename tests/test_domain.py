"""The domain guard (issue 13): real photos from scikit-image are out of the demo sample's domain and get the
prior (the broad one, and through ``revsd predict`` the image-conditioned one of ``revsd.prior``); the sample's
held-out test split stays in domain and keeps its score."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from revsd import domain, predict

SKIMAGE_PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "moon.png",
                  "motorcycle_left.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "brick.png",
                  "gravel.png", "grass.png", "page.png", "horse.png"]


def _clusters(rng, n, center, spread=0.3):
    """Points near a 4-dimensional patch through ``center`` (training images lie on a low-dimensional set)."""
    basis = np.random.default_rng(42).standard_normal((4, len(center))).astype(np.float32)
    return (center + rng.standard_normal((n, 4)).astype(np.float32) @ basis * spread
            + 0.01 * rng.standard_normal((n, len(center))).astype(np.float32))


def test_guard_is_one_inside_and_falls_to_zero_far_out():
    rng = np.random.default_rng(0)
    center = rng.standard_normal(64).astype(np.float32)
    g = domain.DomainGuard.fit(_clusters(rng, 300, center), _clusters(rng, 200, center))
    inside = g.in_domain(_clusters(rng, 500, center))
    far = g.in_domain(rng.standard_normal((50, 64)).astype(np.float32) * 3)
    assert (inside == 1).mean() >= 0.95 and inside.min() > 0.2
    assert far.max() < 0.01
    prior = rng.standard_normal(384).astype(np.float32)
    emb = rng.standard_normal((3, 384)).astype(np.float32)
    out = domain.guard(emb, np.array([1.0, 0.5, 0.0]), prior)
    unit = lambda v: v / np.linalg.norm(v)
    np.testing.assert_allclose(out[0], unit(emb[0]), atol=1e-6)
    np.testing.assert_allclose(out[2], unit(prior), atol=1e-6)
    assert np.linalg.norm(out, axis=1) == pytest.approx(1.0, abs=1e-5)


def test_saved_with_the_weights_it_belongs_to(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(1)
    center = rng.standard_normal(64).astype(np.float32)
    (run / "model.safetensors").write_bytes(b"weights v1")
    g = domain.DomainGuard.fit(_clusters(rng, 40, center), _clusters(rng, 20, center))
    domain.save(run, g)
    meta = json.loads((run / "domain.json").read_text())
    assert meta["dims"] == 40 // 3 and meta["n_calibration"] == 20 and meta["calibration"] == "val"
    assert meta["weights"]["size"] == len(b"weights v1")
    back = domain.load(run)
    x = _clusters(rng, 10, center, 1.0)
    np.testing.assert_allclose(back.in_domain(x), g.in_domain(x), atol=1e-5)
    copy = tmp_path / "copied"  # e.g. a run folder attached to an offline Kaggle notebook: new mtimes
    shutil.copytree(run, copy, copy_function=shutil.copyfile)
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert domain.load(copy) is not None  # same content (SHA-256): the guard stays valid
    (copy / "model.safetensors").write_bytes(b"weights v9")  # same size, other content
    assert domain.load(copy) is None
    (run / "model.safetensors").write_bytes(b"weights v2, retrained")
    assert domain.load(run) is None  # stale: recomputed on next use
    (run / "domain.json").write_text("[1, 2]")
    assert domain.load(run) is None


def test_a_read_only_run_folder_still_gets_its_guard(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    center = rng.standard_normal(64).astype(np.float32)
    g = domain.DomainGuard.fit(_clusters(rng, 40, center), _clusters(rng, 20, center))
    monkeypatch.setattr(domain, "fit_for_run", lambda *a, **k: g)

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(domain, "save", read_only)
    with pytest.warns(UserWarning, match="not saved"):
        assert domain.load_or_fit(tmp_path, predictor=None) is g


def test_cross_fitted_calibration_uses_every_image_without_in_sample_bias(tmp_path):
    """Frozen backbones: the subspace of train ∪ val, calibrated on out-of-fold scores. Scoring the images the
    subspace was fitted on would calibrate too tight (their residuals are smaller than new images'), and new
    in-domain images would be moved."""
    rng = np.random.default_rng(3)
    center = rng.standard_normal(64).astype(np.float32)
    train, val = _clusters(rng, 60, center, 1.0), _clusters(rng, 20, center, 1.0)
    g = domain.DomainGuard.fit(train, val, cross_fit=True)
    assert len(g.val_scores) == 80 and len(g.components) == (80 - 16) // 3
    fresh = _clusters(rng, 1000, center, 1.0)
    assert (g.in_domain(fresh) == 1).mean() >= 0.93
    assert g.in_domain(rng.standard_normal((20, 64)).astype(np.float32) * 3).max() < 0.01
    in_sample = domain.DomainGuard._subspace(np.concatenate([train, val]), domain.DIMS, 64, domain.ALPHA)
    in_sample._calibrated(in_sample.score(np.concatenate([train, val])))
    assert (in_sample.in_domain(fresh) == 1).mean() < 0.6  # 0.38 here
    (tmp_path / "model.safetensors").write_bytes(b"w")
    domain.save(tmp_path, g)
    back = domain.load(tmp_path)
    assert back.calibration == g.calibration and back.calibration.startswith("out-of-fold")
    np.testing.assert_allclose(back.in_domain(fresh[:50]), g.in_domain(fresh[:50]), atol=1e-5)


def test_word_prior_counts_bank_prompts_and_guard_probs_moves_towards_it(monkeypatch):
    prompts = ["a red cat", "two cats on a sofa", "a dog", "portrait of a woman, oil painting", "a cat and a dog"]
    wp = domain.WordPrior(prompts, ["cat", "dog", "red", "painting"])
    np.testing.assert_allclose(wp.rates, [3 / 5, 2 / 5, 1 / 5, 1 / 5])  # lemmas: "cats" counts as "cat"
    many = [f"{p}, number {i}" for i in range(40) for p in prompts]  # 200 prompts, the same rates
    sub = domain.WordPrior(many, ["cat", "dog"], max_prompts=60)  # a seeded sample of 60 of them
    assert np.array_equal(sub.rates, domain.WordPrior(many, ["cat", "dog"], max_prompts=60).rates)
    assert np.abs(sub.rates - [0.6, 0.4]).max() < 0.15 and (sub.rates * 60).round(4).tolist() == \
        (sub.rates * 60).round().tolist()  # counted on 60 prompts

    def no_tagger(*a, **k):
        raise OSError("no spaCy model")

    monkeypatch.setattr("revsd.vocab.label_matrix", no_tagger)  # counted once: the cache answers now
    np.testing.assert_allclose(domain.WordPrior(prompts, ["cat", "dog", "red", "painting"]).rates, wp.rates)
    for _ in range(2):  # without a tagger the words fade with in_domain, and that is not cached
        with pytest.warns(UserWarning, match="word prior unavailable .*no spaCy model"):
            assert domain.WordPrior(["a cat"], ["cat", "dog"]).rates.tolist() == [0, 0]
    monkeypatch.undo()
    assert domain.WordPrior(["a cat"], ["cat", "dog"]).rates.tolist() == [1, 0]
    probs = np.array([[0.9, 0.1, 0.8, 0.0], [0.9, 0.1, 0.8, 0.0], [0.9, 0.1, 0.8, 0.0]], np.float32)
    moved = domain.guard_probs(probs, np.array([1.0, 0.0, 0.5]), wp.rates)
    np.testing.assert_allclose(moved[0], probs[0])
    np.testing.assert_allclose(moved[1], wp.rates)
    np.testing.assert_allclose(moved[2], (probs[2] + wp.rates) / 2)


@pytest.fixture(scope="module")
def demo_like_run(prepared_exp):
    """A real frozen EfficientNet-Lite2 run (packaged ImageNet weights; the demo's best backbone) trained on the
    embedded sample. (With Lite0 features the guard separates these photos much less well: see the module doc.)"""
    from revsd import train

    return Path(train.run(train.TrainConfig(exp=prepared_exp, backbone="effnet_lite2", mode="frozen",
                                            head_config="parallel", epochs=10)))


def test_real_photos_get_the_prior_and_the_test_split_keeps_its_score(demo_like_run, prepared_exp):
    skimage_data = pytest.importorskip("skimage.data")
    from revsd import paths, targets
    from revsd.images import open_rgb
    from revsd.retrieval import encode, read_prompt_table

    pred = predict.load_predictor(demo_like_run)
    side = predict.min_side(pred)
    g = domain.load_or_fit(demo_like_run, pred, side)
    assert (demo_like_run / "domain.npz").exists() and domain.load(demo_like_run) is not None
    assert g.calibration.startswith("out-of-fold")  # a frozen backbone: cross-fitted on train ∪ val
    bank_prompts = read_prompt_table(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")
    prior = domain.bank_prior(encode(bank_prompts[::30]))  # the default bank's mean, from 600 of its prompts

    photos = [open_rgb(Path(skimage_data.__file__).parent / name, min_side=side) for name in SKIMAGE_PHOTOS]
    emb, _, feats = pred.predict(photos, with_features=True)
    ind = g.in_domain(feats)
    guarded = domain.guard(emb, ind, prior)
    out = ind < domain.OUT_OF_DOMAIN
    # astronaut.png, a studio portrait photo, lies inside the sample's range (it holds photographic portrait styles);
    # so does an independent portrait photo, matplotlib's grace_hopper.jpg (bench/bench_guard_scores.py)
    assert out.sum() >= len(SKIMAGE_PHOTOS) - 1, dict(zip(SKIMAGE_PHOTOS, ind.round(3)))
    assert (guarded[out] @ prior).min() >= 0.98

    ts = targets.load(prepared_exp)
    rows = ts.rows("test")
    test = [open_rgb(p, min_side=side) for p in ts.table["image_path"].to_numpy()[rows]]
    emb, _, feats = pred.predict(test, with_features=True)
    ind = g.in_domain(feats)
    guarded = domain.guard(emb, ind, prior)
    truth = ts.emb[rows]
    assert (ind >= domain.OUT_OF_DOMAIN).mean() >= 0.95
    assert abs(float((guarded * truth).sum(1).mean()) - float((emb * truth).sum(1).mean())) <= 0.002


def test_predict_moves_out_of_domain_photos_to_their_image_prior(demo_like_run, tmp_path, capsys, monkeypatch):
    """End to end through the CLI: out-of-domain photos get (within 0.98) their image-conditioned prior, which
    differs per photo; in-domain sample images keep the model's embedding."""
    skimage_data = pytest.importorskip("skimage.data")
    from revsd import paths, prior
    from revsd.images import open_rgb
    from revsd.retrieval import build_bank, load_bank, read_prompt_table

    prompts = read_prompt_table(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")[::30]
    build_bank(prompts, tmp_path / "bank", progress=False)
    folder = Path(skimage_data.__file__).parent
    sample = sorted((paths.input_dir() / "sample" / "images").rglob("*.jpg"))[:4]
    files = [folder / n for n in SKIMAGE_PHOTOS] + sample
    out = tmp_path / "preds.jsonl"
    assert predict.main([*map(str, files), "--model", str(demo_like_run), "--bank", str(tmp_path / "bank"),
                         "--out", str(out)]) == 0
    assert "moved towards the image-conditioned prior" in capsys.readouterr().err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    pred = predict.load_predictor(demo_like_run)
    p = prior.ImagePrior.for_run(pred.spec, load_bank(tmp_path / "bank"))
    assert p.uses_run_features  # the frozen Lite2 run's own features feed the classifier
    photos = [open_rgb(f, min_side=predict.min_side(pred)) for f in files[:len(SKIMAGE_PHOTOS)]]
    want = p(photos, pred.predict(photos, with_features=True)[2])
    outside = [i for i, r in enumerate(recs[:len(SKIMAGE_PHOTOS)]) if r["in_domain"] < domain.OUT_OF_DOMAIN]
    assert len(outside) >= len(SKIMAGE_PHOTOS) - 1  # astronaut.png: see the test above
    got = np.array([recs[i]["embedding"] for i in outside])
    assert ((got * want[outside]).sum(1) >= 0.98).all()
    assert (want[outside] @ want[outside].T).min() < 0.99  # one prior per image, not one constant
    for r in recs[len(SKIMAGE_PHOTOS):]:
        if r["in_domain"] == 1:
            np.testing.assert_allclose(r["embedding"], r["model_embedding"], atol=1e-6)
    # the vocabulary head's words move alike: towards each word's share of the bank's prompts
    rates = dict(zip(pred.words, domain.WordPrior(load_bank(tmp_path / "bank").prompts, pred.words).rates))
    raw_words = [r for r in recs if r["in_domain"] < domain.OUT_OF_DOMAIN and r["model_words"]]
    assert raw_words  # the demo head names its words (e.g. "style") on photos too
    for r in recs:
        if r["in_domain"] == 1:
            assert r["words"] == r["model_words"]
        w = r["in_domain"]
        expected = {m["word"]: w * m["prob"] + (1 - w) * rates[m["word"]] for m in r["model_words"]}
        assert {m["word"] for m in r["words"]} >= {k for k, v in expected.items() if v >= 0.5 + 1e-3}
        for m in r["words"]:
            assert m["prob"] >= 0.5 and (m["word"] not in expected or abs(m["prob"] - expected[m["word"]]) < 1e-3)
    assert any(len(r["words"]) < len(r["model_words"]) for r in raw_words)
    # --guard-alpha: a stricter guard moves every image at least as far, and the summary line says so
    strict = tmp_path / "strict.jsonl"
    assert predict.main([*map(str, files), "--model", str(demo_like_run), "--bank", str(tmp_path / "bank"),
                         "--out", str(strict), "--guard-alpha", "0.05"]) == 0
    assert "guard alpha 0.05: moved towards" in capsys.readouterr().err
    stricter = [json.loads(line)["in_domain"] for line in strict.read_text().splitlines()]
    assert all(s <= r["in_domain"] + 1e-6 for s, r in zip(stricter, recs))
    assert any(s < r["in_domain"] - 1e-3 for s, r in zip(stricter, recs))
    # --broad-prior, or a prior that cannot be built: the guard moves towards the bank's mean instead
    broad = domain.bank_prior(load_bank(tmp_path / "bank").emb)
    photos_only = [str(f) for f in files[:3]]
    assert predict.main([*photos_only, "--model", str(demo_like_run), "--bank", str(tmp_path / "bank"),
                         "--out", str(out), "--broad-prior"]) == 0
    assert "moved towards the bank's mean" in capsys.readouterr().err

    def broken(*a, **k):
        raise RuntimeError("no classifier here")

    monkeypatch.setattr(predict.ImagePrior, "for_run", broken)
    assert predict.main([*photos_only, "--model", str(demo_like_run), "--bank", str(tmp_path / "bank"),
                         "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no image-conditioned prior (RuntimeError: no classifier here)" in err and "bank's mean" in err
    far = [r for r in map(json.loads, out.read_text().splitlines()) if r["in_domain"] < 0.05]
    assert far and all(float(np.dot(r["embedding"], broad)) > 0.99 for r in far)  # chelsea.png at least


def test_shift_caps_fire_on_shifted_batches_only():
    rng = np.random.default_rng(0)
    fired = [domain.shift_caps(rng.uniform(size=n))[1] is not None for n in (10, 30, 60, 200) for _ in range(250)]
    assert sum(fired) <= 3  # in-domain batches: uniform p-values, a false alarm at most at the test's level (1e-3)
    p = np.r_[rng.uniform(0.5, 1, 4), rng.uniform(0, 0.5, 36)]  # 4 of 40 above 1/2 where 20 are expected
    caps, share = domain.shift_caps(p)
    assert share == pytest.approx(4 / 20)
    assert (caps[:4] == 1).all() and np.allclose(caps[4:], 0.2 * 0.5 * 40 / 36)
    assert domain.shift_caps(np.zeros(1))[1] is None  # one image alone: no batch evidence
    assert domain.shift_caps(np.zeros(15))[1] == 0.0  # fifteen with nothing above 1/2: all capped at 0
    assert domain.shift_caps(np.zeros(0))[0].shape == (0,)
    # a large in-domain batch whose share below the calibration median is off by the median's own noise (238
    # calibration scores: sd 0.032): not a shift once that noise counts
    p = np.r_[np.full(2350, 0.75), np.full(2650, 0.25)]
    assert domain.shift_caps(p)[1] is not None and domain.shift_caps(p, n_cal=238)[1] is None


def test_predict_judges_a_folder_as_a_whole(demo_like_run, prepared_exp, tmp_path, capsys):
    """scikit-image's photos as one folder: all 15 out of domain, astronaut.png too (alone, a studio portrait sits
    inside the sample's range); the demo's test split as one folder: no shift found, output as with --each-alone."""
    skimage_data = pytest.importorskip("skimage.data")
    from revsd import targets

    photos = [str(Path(skimage_data.__file__).parent / n) for n in SKIMAGE_PHOTOS]
    ts = targets.load(prepared_exp)
    test = [str(p) for p in ts.table["image_path"].to_numpy()[ts.rows("test")]]

    def run(files, *flags):
        out = tmp_path / "preds.jsonl"
        assert predict.main([*files, "--model", str(demo_like_run), "--out", str(out), "--no-modifiers",
                             *flags]) == 0
        return [json.loads(line) for line in out.read_text().splitlines()], capsys.readouterr().err

    recs, err = run(photos)
    assert all(r["in_domain"] < domain.OUT_OF_DOMAIN for r in recs) and "look shifted" in err
    alone, err = run(photos, "--each-alone")
    assert sum(r["in_domain"] < domain.OUT_OF_DOMAIN for r in alone) >= len(photos) - 1 and "shifted" not in err
    recs, err = run(test)
    alone, _ = run(test, "--each-alone")
    assert "shifted" not in err and [r["in_domain"] for r in recs] == [r["in_domain"] for r in alone]
    truth = ts.emb[ts.rows("test")]
    model = np.array([r["model_embedding"] for r in recs]) * truth
    guarded = np.array([r["embedding"] for r in recs]) * truth
    assert abs(guarded.sum(1).mean() - model.sum(1).mean()) <= 0.002
