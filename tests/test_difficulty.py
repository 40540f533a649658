"""04_difficulty: mean cosine per image from the preliminary run, reuse of a matching 03_train run, notebook."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from revsd import difficulty, paths, runs, train


def test_difficulty_table_is_the_mean_over_epochs():
    cos = pd.DataFrame({"image_id": ["a", "b", "c"] * 2, "epoch": [1, 1, 1, 2, 2, 2],
                        "cosine": [0.2, 0.5, 0.9, 0.4, 0.5, 0.7]})
    table = difficulty.difficulty_table(cos.sample(frac=1, random_state=0))
    assert table["image_id"].tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(table["difficulty"], [0.3, 0.5, 0.8])
    np.testing.assert_allclose(table["cos_epoch_2"], [0.4, 0.5, 0.7])


def test_difficulty_table_rejects_an_incomplete_run():
    cos = pd.DataFrame({"image_id": ["a", "b", "a"], "epoch": [1, 1, 2], "cosine": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="incomplete"):
        difficulty.difficulty_table(cos)
    with pytest.raises(ValueError, match="cosine"):
        difficulty.difficulty_table(cos.drop(columns="cosine"))


def test_config_passes_the_shared_fields_to_03_train():
    cfg = difficulty.DifficultyConfig(exp="x", epochs=2, lr=0.123, seed=7, smoke=True)
    tcfg = cfg.train_config()
    assert type(tcfg) is train.TrainConfig
    assert (tcfg.exp, tcfg.epochs, tcfg.lr, tcfg.seed, tcfg.smoke) == ("x", 2, 0.123, 7, True)
    with pytest.raises(ValueError, match="unknown parameter"):
        difficulty.DifficultyConfig.from_dict({"epoch": 3})


def copy_exp(src: str, dst: str) -> str:
    """A private copy of a prepared exp (01 + 02 outputs), so runs made here do not show up in other tests."""
    for stage in ("01_filter", "02_targets"):
        shutil.copytree(paths.stage_dir(stage, src, create=False), paths.stage_dir(stage, dst, create=False),
                        dirs_exist_ok=True)
    return dst


@pytest.fixture(scope="module")
def difficulty_run(prepared_exp):
    cfg = difficulty.DifficultyConfig(exp=copy_exp(prepared_exp, "t_difficulty"), epochs=2, smoke=True, tiny=True,
                                      vocab_head=False, reuse=False, run="d0")
    return cfg, difficulty.run(cfg)


def test_run_scores_every_training_image(difficulty_run):
    cfg, run_dir = difficulty_run
    assert run_dir == paths.stage_dir("04_difficulty", cfg.exp, "d0", create=False)
    scores = difficulty.load(cfg.exp, "d0")
    cos = pd.read_csv(run_dir / "sample_cosines.csv", dtype={"image_id": str})
    tcfg = cfg.train_config()
    from revsd import targets

    ts = targets.load(cfg.exp)
    train_ids = ts.table["image_id"].astype(str).to_numpy()[np.asarray(train.training_rows(tcfg, ts))]
    assert sorted(scores["image_id"]) == sorted(train_ids)
    assert len([c for c in scores.columns if c.startswith("cos_epoch_")]) == 2 == cos["epoch"].nunique()
    expected = cos.groupby("image_id")["cosine"].mean()
    np.testing.assert_allclose(scores.set_index("image_id")["difficulty"], expected.loc[scores["image_id"]], atol=1e-6)
    assert scores["difficulty"].between(-1, 1).all() and scores["difficulty"].std() > 0


def test_reuses_a_matching_03_train_run_only_when_settings_match(difficulty_run, capsys):
    cfg, _ = difficulty_run
    plain_dir = train.run(cfg.train_config().replace(run="plain_match"))
    out = difficulty.run(cfg.replace(run="d1", reuse=True))
    assert "reusing" in capsys.readouterr().out
    assert not (out / "DONE").exists()  # nothing retrained here
    a = difficulty.load(cfg.exp, "d1")
    b = difficulty.difficulty_table(pd.read_csv(plain_dir / "sample_cosines.csv", dtype={"image_id": str}))
    pd.testing.assert_frame_equal(a, b)
    # other settings (a different seed) do not match: a fresh preliminary run
    assert runs.matching_runs("03_train", cfg.replace(seed=cfg.seed + 1).train_config().to_dict()) == []


@pytest.mark.slow
def test_notebook_smoke(difficulty_run, tmp_path):
    from revsd.pipeline import execute_notebook

    cfg, _ = difficulty_run
    params = {"exp": cfg.exp, "epochs": 2, "smoke": True, "tiny": True, "run": "nb", "reuse": False, "n_examples": 2}
    out = execute_notebook("04_difficulty", params, tmp_path)
    assert out.exists() and difficulty.load(cfg.exp, "nb")["difficulty"].notna().all()
