"""03_train on the embedded sample (prepared by 01 + 02): real frozen EfficientNet-Lite0 features, tiny heads."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from revsd import artifacts, runs, targets, train
from revsd.config import ConfigError
from revsd.images import open_rgb
from revsd.inference import load_predictor

FAST = dict(epochs=4, batch_size=32, num_workers=1)


@pytest.fixture(scope="module")
def real_run(prepared_exp):
    """One frozen run with the vocabulary head on real effnet_lite0 features (features cached for the module)."""
    cfg = train.TrainConfig(exp=prepared_exp, run="real", epochs=12, num_workers=1)
    return cfg, train.run(cfg)


def test_run_writes_the_contract(real_run):
    cfg, run_dir = real_run
    for name in ("config.json", "summary.csv", "model.safetensors", "model.json", "preds_train.npz",
                 "preds_oof.npz", "preds_test.npz", "sample_cosines.csv", "metrics.json", "DONE"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "last.json").exists() and not list(run_dir.glob("*ckpt-*"))  # only the best weights stay
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m) == {"run", "stage", "backbone", "variant", "head_config", "lam", "vocab_size", "mode", "epochs",
                      "steps", "val_cosine", "test_cosine", "const_mean_val", "const_mean_test"}
    assert m["variant"] == "cfg2" and m["stage"] == "03_train" and m["epochs"] == cfg.epochs
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["epoch"].tolist() == list(range(1, cfg.epochs + 1))
    assert list(summary.columns) == ["epoch", "step", "train_loss", "train_cos", "val_cos", "lr", "seconds"]


def test_validation_beats_constant_mean(real_run):
    _, run_dir = real_run
    m = train.load_metrics(run_dir)
    assert m["val_cosine"] > m["const_mean_val"]
    assert 0.3 < m["const_mean_val"] < 0.9 and 0.3 < m["test_cosine"] < 1.0


def test_predictions_keyed_by_the_right_ids(real_run):
    cfg, run_dir = real_run
    ts = targets.load(cfg.exp)
    ids = ts.table["image_id"].astype(str).to_numpy()
    for name, rows in (("oof", ts.rows("val")), ("test", ts.rows("test")), ("train", ts.rows("train"))):
        p = artifacts.load_predictions(run_dir / f"preds_{name}.npz")
        assert sorted(p.ids.tolist()) == sorted(ids[rows].tolist()), name
        assert p.emb.shape == (len(rows), 384) and p.emb.dtype == np.float32
        assert np.allclose(np.linalg.norm(p.emb, axis=1), 1, atol=1e-5)
        if name == "train":  # lean: nobody reads the training rows' vocabulary probabilities
            assert p.probs is None
            continue
        assert p.probs is not None and p.probs.shape == (len(rows), len(ts.words))
        assert ((p.probs >= 0) & (p.probs <= 1)).all()
    # the reported cosine is the cosine of the saved OOF predictions against the targets of those ids
    oof = artifacts.load_predictions(run_dir / "preds_oof.npz")
    cos = (oof.emb * ts.emb[[int(np.flatnonzero(ids == i)[0]) for i in oof.ids]]).sum(1).mean()
    assert cos == pytest.approx(train.load_metrics(run_dir)["val_cosine"], abs=1e-5)


def test_sample_cosines_cover_every_training_image_every_epoch(real_run):
    cfg, run_dir = real_run
    ts = targets.load(cfg.exp)
    sc = pd.read_csv(run_dir / "sample_cosines.csv", dtype={"image_id": str})
    train_ids = set(ts.table["image_id"].astype(str).to_numpy()[ts.rows("train")])
    assert set(sc["image_id"]) == train_ids
    assert sc.groupby("epoch")["image_id"].nunique().to_dict() == {e: len(train_ids) for e in range(1, cfg.epochs + 1)}
    assert sc["cosine"].between(-1, 1).all()
    # mean training cosine rises as the head fits
    by_epoch = sc.groupby("epoch")["cosine"].mean()
    assert by_epoch[cfg.epochs] > by_epoch[1]


def test_finished_run_is_reused_and_conflicting_settings_raise(real_run):
    cfg, run_dir = real_run
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns
    assert train.run(cfg) == run_dir and (run_dir / "metrics.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="other settings"):
        train.run(cfg.replace(lr=0.5))


def test_default_run_name_and_rerun(prepared_exp):
    cfg = train.TrainConfig(exp=prepared_exp, vocab_head=False, epochs=1, smoke=True, num_workers=1)
    run_dir = train.run(cfg)
    assert run_dir.name == "effnet_lite0_plain_f-1_s0"
    assert train.run(cfg) == run_dir  # the saved config names the run; a rerun finds it finished


def test_resume_after_interruption_matches_uninterrupted(prepared_exp):
    base = train.TrainConfig(exp=prepared_exp, vocab_head=False, **FAST)
    full = train.run(base.replace(run="full"))
    with pytest.raises(train.Interrupted):
        train.run(base.replace(run="resumed", stop_after_epoch=2))
    part = full.parent / "resumed"
    assert (part / "last.json").exists() and not (part / "DONE").exists()
    assert pd.read_csv(part / "summary.csv")["epoch"].tolist() == [1, 2]
    resumed = train.run(base.replace(run="resumed"))
    a, b = pd.read_csv(full / "summary.csv"), pd.read_csv(resumed / "summary.csv")
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))
    for name in ("preds_oof.npz", "preds_test.npz"):
        np.testing.assert_array_equal(artifacts.load_predictions(full / name).emb,
                                      artifacts.load_predictions(resumed / name).emb)
    sc = pd.read_csv(resumed / "sample_cosines.csv")
    assert sc.groupby("epoch").size().nunique() == 1 and sorted(sc["epoch"].unique()) == [1, 2, 3, 4]
    assert train.load_metrics(resumed)["variant"] == "plain" and train.load_metrics(resumed)["vocab_size"] == 0


def test_batch_sampler_sets_the_steps(prepared_exp):
    """A curriculum-style sampler: index batches into training_rows; its length is the number of steps."""
    cfg = train.TrainConfig(exp=prepared_exp, run="sampled", vocab_head=False, epochs=2, batch_size=16,
                            num_workers=1)
    ts = targets.load(prepared_exp)
    n = len(train.training_rows(cfg, ts))
    total = train.total_steps(cfg, n)
    assert total == 2 * int(np.ceil(n / 16))
    easy = np.arange(n // 2)  # only the first half of the training rows is ever shown
    batches = [np.random.default_rng(i).choice(easy, 16, replace=False) for i in range(total)]
    run_dir = train.run(cfg, batch_sampler=batches)
    m = train.load_metrics(run_dir)
    assert m["steps"] == total and m["epochs"] == 2


def test_finetune_smoke_tiny(prepared_exp):
    """End-to-end mode on a tiny random-init backbone: trains, predicts, reloads."""
    cfg = train.TrainConfig(exp=prepared_exp, run="ft", mode="finetune", tiny=True, smoke=True, epochs=2,
                            batch_size=8, lam=1.0, head_config="emb2cls", hidden=32, ema=0.9, grad_accum=2, llrd=0.8,
                            num_workers=1)
    run_dir = train.run(cfg)
    m = train.load_metrics(run_dir)
    assert m["mode"] == "finetune" and m["variant"] == "cfg3" and m["steps"] == 2 * 3  # ceil(48/8)=6 batches/2
    oof = artifacts.load_predictions(run_dir / "preds_oof.npz")
    assert len(oof) == train.SMOKE_ROWS["val"] or len(oof) == len(targets.load(prepared_exp).rows("val"))
    pred = load_predictor(run_dir, device="cpu")
    ts = targets.load(prepared_exp)
    img = open_rgb(ts.table["image_path"].iloc[0])
    emb, probs = pred.predict([img, img])
    assert emb.shape == (2, 384) and probs.shape == (2, len(ts.words))
    assert torch.allclose(torch.from_numpy(emb[0]), torch.from_numpy(emb[1]), atol=1e-5)


@pytest.mark.slow
def test_notebook_smoke(prepared_exp, tmp_path):
    from revsd.pipeline import execute_notebook

    out = execute_notebook("03_train", {"exp": prepared_exp, "backbone": "effnet_lite0", "run": "nb", "epochs": 2,
                                        "tiny": True, "smoke": True}, tmp_path, output_name="03_train_effnet_lite0")
    assert out.exists()
    assert (runs.finished_runs(prepared_exp)[0].parent / "nb" / "DONE").exists()


def test_command_line_overrides_are_typed_and_strict():
    assert train.parse_overrides(["epochs=3", "lam=0.5", "tiny=true", "backbone=vit_b16", "vocab_head=false"]) == {
        "epochs": 3, "lam": 0.5, "tiny": True, "backbone": "vit_b16", "vocab_head": False}
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        train.parse_overrides(["epoch=3"])
    with pytest.raises(ConfigError, match="unknown|must be"):
        train.check(train.TrainConfig(head_config="sideways"))
    with pytest.raises(ConfigError, match="sample_cosines"):
        train.check(train.TrainConfig(sample_cosines="sometimes"))


def test_unreadable_image_is_reported_not_dropped(prepared_exp, tmp_path):
    """A broken training image and a broken test image: listed in invalid_images.csv, left out of training, and the
    test image still gets a prediction (the constant mean)."""
    import shutil

    from revsd import paths

    for stage in ("01_filter", "02_targets"):
        shutil.copytree(paths.stage_dir(stage, prepared_exp), paths.stage_dir(stage, "broken"), dirs_exist_ok=True)
    ts = targets.load(prepared_exp)
    table = ts.table.copy()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    victims = [int(ts.rows("train")[0]), int(ts.rows("test")[0])]
    table.loc[table.index[victims], "image_path"] = str(bad)
    table.to_parquet(paths.filtered_table("broken"), index=False)
    cfg = train.TrainConfig(exp="broken", tiny=True, smoke=True, epochs=1, vocab_head=False, num_workers=1)
    run_dir = train.run(cfg)
    ids = table["image_id"].astype(str).to_numpy()
    invalid = pd.read_csv(run_dir / "invalid_images.csv", dtype={"image_id": str})
    assert sorted(invalid["image_id"]) == sorted(ids[victims]) and invalid["error"].str.contains("broken.jpg").all()
    assert ids[victims[0]] not in set(pd.read_csv(run_dir / "sample_cosines.csv", dtype={"image_id": str})["image_id"])
    test_preds = artifacts.load_predictions(run_dir / "preds_test.npz")
    assert ids[victims[1]] in set(test_preds.ids)
    mean = ts.emb[train.training_rows(cfg, ts)].mean(0)
    got = test_preds.align([ids[victims[1]]]).emb[0]
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean), atol=1e-6)


def test_finished_run_is_not_reused_on_changed_data(prepared_exp, tmp_path):
    """Rerunning 01/02 with other settings must not silently hand back a run trained on the old split."""
    import shutil

    from revsd import filtering, paths

    exp = "t_fingerprint"
    for stage in ("01_filter", "02_targets"):
        shutil.copytree(paths.stage_dir(stage, prepared_exp, create=False), paths.stage_dir(stage, exp, create=False))
    cfg = train.TrainConfig(exp=exp, run="fp", epochs=1, num_workers=1)
    run_dir = train.run(cfg)
    assert train.run(cfg) == run_dir  # same data: the finished run is reused
    filtering.run(filtering.FilterConfig(exp=exp, seed=1))  # another split of the same images
    targets.run(targets.TargetsConfig(exp=exp, vocab_size=64))
    with pytest.raises(ConfigError, match="trained on other 01_filter/02_targets outputs"):
        train.run(cfg)


def test_sample_cosines_in_eval_mode_equal_a_separate_eval_pass(prepared_exp):
    """Finetune, sample_cosines="eval" (the paper's difficulty): the cosines written after the last epoch are those of
    a separate eval-mode pass of the final weights over the training images; "train" writes other (in-training,
    dropout) cosines."""
    from revsd import engine, inference
    from revsd.inputs import Inputs

    base = dict(exp=prepared_exp, mode="finetune", backbone="vit_b16", tiny=True, pretrained=False, smoke=True,
                epochs=2, batch_size=16, hidden=16, dropout=0.5, vocab_head=False, num_workers=1, device="cpu")
    cfg = train.TrainConfig(**base, run="ft_eval")
    run_dir = train.run(cfg)
    ts = targets.load(prepared_exp)
    model = inference.load_predictor(run_dir, device="cpu").model  # the last epoch is the best one: checked below
    assert train.load_metrics(run_dir)["epochs"] == 2 and inference.ModelSpec.load(run_dir).best_epoch == 2
    tr = train.training_rows(cfg, ts)
    again = engine.validate(model, Inputs(cfg, ts, tr, None, "cpu").chunks(tr))["cosines"]
    sc = pd.read_csv(run_dir / "sample_cosines.csv", dtype={"image_id": str})
    last = sc[sc["epoch"] == 2].set_index("image_id").loc[ts.table["image_id"].astype(str).to_numpy()[tr], "cosine"]
    np.testing.assert_allclose(last.to_numpy(), again, atol=2e-6)
    in_training = train.run(train.TrainConfig(**base, run="ft_train", sample_cosines="train"))
    sc2 = pd.read_csv(in_training / "sample_cosines.csv", dtype={"image_id": str})
    sc2 = sc2[sc2["epoch"] == 2].set_index("image_id").loc[last.index, "cosine"]
    assert np.abs(sc2.to_numpy() - last.to_numpy()).max() > 1e-3


def test_failed_run_never_blocks_its_corrected_rerun(prepared_exp):
    """A run that died before its first checkpoint (config.json, no checkpoint, no DONE) is reclaimed by a rerun
    with corrected settings; one that can resume (a checkpoint) or finished still refuses other settings."""
    base = train.TrainConfig(exp=prepared_exp, run="fixme", smoke=True, tiny=True, epochs=2, vocab_head=False,
                             num_workers=1)
    from revsd import paths

    with pytest.raises(train.Interrupted):
        train.run(base.replace(stop_after_epoch=1))
    run_dir = paths.stage_dir("03_train", prepared_exp, "fixme", create=False)
    with pytest.raises(ConfigError, match="other settings"):  # it has a checkpoint: it can resume, not be replaced
        train.run(base.replace(lr=0.01))
    (run_dir / "last.json").unlink()  # as if it had died during its first epoch
    for p in run_dir.glob("ckpt-*"):
        p.unlink()
    fixed = train.run(base.replace(lr=0.01))
    assert fixed == run_dir and (run_dir / "DONE").exists()
    assert artifacts.read_json(run_dir / "config.json")["lr"] == 0.01
    assert pd.read_csv(run_dir / "summary.csv")["epoch"].tolist() == [1, 2]


def test_lam_is_only_the_loss_weight(prepared_exp):
    """vocab_head switches the vocabulary head; lam=0 keeps it (trained without its loss)."""
    cfg = train.TrainConfig(exp=prepared_exp, smoke=True, tiny=True, epochs=1, lam=0.0, vocab_size=8, num_workers=1,
                            run="lam0_keeps_head")  # its own run: the default name is another test's run
    assert train.run_name(cfg.replace(run="")) == "effnet_lite0_cfg2_f-1_s0"  # the variant of a vocabulary head
    run_dir = train.run(cfg)
    m = train.load_metrics(run_dir)
    assert m["variant"] == "cfg2" and m["vocab_size"] == 8 and m["lam"] == 0.0
    assert artifacts.load_predictions(run_dir / "preds_test.npz").probs.shape[1] == 8


def test_configs_saved_before_vocab_head_compare_as_today():
    """A config.json written when lam=0 meant "no vocabulary head" is the same run as vocab_head=false today."""
    old = {k: v for k, v in train.TrainConfig(lam=0.0).to_dict().items()
           if k not in ("vocab_head", "head_norm", "sample_cosines", "weights", "compile", "grad_checkpointing")}
    new = train.TrainConfig(vocab_head=False).to_dict()
    assert runs.config_diff(train.comparable(old), train.comparable(new)) == {}
    assert runs.config_diff(train.comparable(old), train.comparable(train.TrainConfig(lam=0.5).to_dict()))
    assert train.comparable({**old, "mode": "finetune"})["sample_cosines"] == "train"


def test_grad_checkpointing_changes_memory_not_results(prepared_exp):
    """Activation checkpointing through timm's own switch: the same run, the same numbers."""
    base = dict(exp=prepared_exp, mode="finetune", backbone="vit_b16", tiny=True, pretrained=False, smoke=True,
                epochs=1, batch_size=16, hidden=16, dropout=0.0, vocab_head=False, num_workers=1, device="cpu")
    a = train.run(train.TrainConfig(**base, run="gc_off"))
    b = train.run(train.TrainConfig(**base, run="gc_on", grad_checkpointing=True))
    np.testing.assert_allclose(artifacts.load_predictions(a / "preds_test.npz").emb,
                               artifacts.load_predictions(b / "preds_test.npz").emb, atol=1e-6)
    from revsd.backbones import create_backbone

    bb = create_backbone("vit_b16", pretrained=False, tiny=True)
    assert bb.set_grad_checkpointing(True) and bb.net.grad_checkpointing


def test_finetune_reads_the_image_cache_and_gets_the_same_results(prepared_exp, monkeypatch):
    """The one-time image cache (revsd.imagecache) feeds fine-tuning the very pixels decoding would."""
    from revsd import imagecache, paths, transforms

    base = dict(exp=prepared_exp, mode="finetune", backbone="effnet_lite0", tiny=True, pretrained=False, smoke=True,
                epochs=1, batch_size=16, hidden=16, dropout=0.0, vocab_head=False, num_workers=1, device="cpu")
    a = train.run(train.TrainConfig(**base, run="pix_decoded", image_cache=False))
    b = train.run(train.TrainConfig(**base, run="pix_cached", image_cache=True))
    np.testing.assert_array_equal(artifacts.load_predictions(a / "preds_test.npz").emb,
                                  artifacts.load_predictions(b / "preds_test.npz").emb)
    assert list((paths.working_dir() / "imagecache").glob("effnet_lite0-tiny-*/shard-*.npy"))

    opened = []
    for module in (imagecache, transforms):  # the two places that decode image files for training
        monkeypatch.setattr(module, "open_rgb", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(OSError))
    c = train.run(train.TrainConfig(**base, run="pix_cached_again", image_cache=True))  # nothing decoded again
    assert opened == [] and (c / "DONE").exists()
