"""revsd.inference: the model.json contract (ModelSpec), the predictor against the run's own saved predictions,
pooled features for a domain guard, and runs saved before the typed spec."""

import json

import numpy as np
import pytest

from revsd import artifacts, features, inference, targets, train
from revsd.images import open_rgb
from revsd.transforms import Preprocess


@pytest.fixture(scope="module")
def frozen_run(prepared_exp):
    """A frozen run with the vocabulary head on real effnet_lite0 features."""
    cfg = train.TrainConfig(exp=prepared_exp, run="inference", epochs=3, num_workers=1)
    return cfg, train.run(cfg)


def _images(exp, ids):
    ts = targets.load(exp)
    paths = ts.table.set_index(ts.table["image_id"].astype(str))["image_path"]
    return [open_rgb(paths[i]) for i in ids], [paths[i] for i in ids]


def test_model_spec_round_trip(frozen_run, tmp_path):
    cfg, run_dir = frozen_run
    spec = inference.ModelSpec.load(run_dir)
    ts = targets.load(cfg.exp)
    assert spec.backbone == "effnet_lite0" and spec.mode == "frozen" and spec.head_config == "concat"
    assert spec.words == tuple(ts.words) and spec.vocab_size == len(ts.words) and spec.in_dim == 1280
    assert spec.preprocess == Preprocess(224, (0.5,) * 3, (0.5,) * 3) and 1 <= spec.best_epoch <= 3
    spec.save(tmp_path)
    assert inference.ModelSpec.load(tmp_path) == spec
    saved = json.loads((run_dir / "model.json").read_text())
    assert saved["tiny"] is False and saved["mode"] == "frozen"  # the keys other tools read stay top-level
    with pytest.raises(FileNotFoundError, match="not a finished 03_train run"):
        inference.ModelSpec.load(tmp_path / "nothing")


def test_predictor_reproduces_the_saved_predictions(frozen_run):
    cfg, run_dir = frozen_run
    pred = inference.load_predictor(run_dir, device="cpu")
    assert pred.backbone == "effnet_lite0" and pred.input_size == 224 and pred.run_dir == run_dir
    assert isinstance(pred.spec, inference.ModelSpec) and pred.words == list(pred.spec.words)
    saved = artifacts.load_predictions(run_dir / "preds_test.npz")
    images, _ = _images(cfg.exp, saved.ids[:5])
    emb, probs = pred.predict(images, batch_size=2)
    np.testing.assert_allclose(emb, saved.emb[:5], atol=2e-3)
    np.testing.assert_allclose(probs, saved.probs[:5], atol=2e-3)
    empty = pred.predict([])
    assert empty[0].shape == (0, 384)


def test_predict_with_features_returns_the_pooled_backbone_features(frozen_run):
    """feats are what the heads read: the frozen backbone's pooled features (the feature cache holds the same)."""
    cfg, run_dir = frozen_run
    pred = inference.load_predictor(run_dir, device="cpu")
    ids = artifacts.load_predictions(run_dir / "preds_oof.npz").ids[:3]
    images, paths = _images(cfg.exp, ids)
    emb, probs, feats = pred.predict(images, batch_size=2, with_features=True)
    assert feats.shape == (3, 1280) and feats.dtype == np.float32
    cached = features.extract("effnet_lite0", ids, paths, progress=False).feats
    np.testing.assert_allclose(feats, cached, rtol=1e-3, atol=1e-3)
    emb2, _ = pred.predict(images, batch_size=3)
    np.testing.assert_allclose(emb, emb2, atol=1e-5)


def test_finetuned_run_gives_features_of_its_own_backbone(prepared_exp):
    cfg = train.TrainConfig(exp=prepared_exp, run="inf_ft", mode="finetune", backbone="vit_b16", tiny=True,
                            pretrained=False, smoke=True, epochs=1, batch_size=16, hidden=0, dropout=0.0,
                            head_norm=False, head_config="parallel", num_workers=1, device="cpu")
    run_dir = train.run(cfg)
    pred = inference.load_predictor(run_dir, device="cpu")
    assert pred.extractor is None and pred.spec.head_norm is False
    images, _ = _images(prepared_exp, artifacts.load_predictions(run_dir / "preds_test.npz").ids[:2])
    emb, probs, feats = pred.predict(images, with_features=True)
    assert feats.shape == (2, 32) and probs.shape[0] == 2
    # the paper's heads: one linear layer reading exactly these features
    import torch

    lin = pred.model.head.emb_head[0]
    raw = torch.from_numpy(feats) @ lin.weight.T.detach() + lin.bias.detach()
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(raw, dim=-1).numpy(), atol=1e-5)


def test_legacy_model_json_still_loads(frozen_run, tmp_path):
    """model.json of a run saved before ModelSpec (untyped dict: image_size/mean/std, no head_norm)."""
    _, run_dir = frozen_run
    spec = inference.ModelSpec.load(run_dir)
    old = {k: v for k, v in spec.to_json().items() if k not in ("preprocess", "head_norm", "weights")}
    old.update(image_size=224, mean=[0.5] * 3, std=[0.5] * 3, words=list(spec.words))
    (tmp_path / "model.json").write_text(json.dumps(old))
    assert inference.ModelSpec.load(tmp_path) == spec
    (tmp_path / "model.json").write_text(json.dumps({"backbone": "effnet_lite0"}))
    with pytest.raises(ValueError, match="not a valid model description"):
        inference.ModelSpec.load(tmp_path)
