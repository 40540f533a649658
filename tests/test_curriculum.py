"""05_curriculum: chunking rules, the sampler's easy-first guarantee and step count, and a real (tiny) run."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from revsd import curriculum, difficulty, paths, train
from revsd.artifacts import load_predictions
from revsd.config import ConfigError
from revsd.curriculum import CurriculumConfig, CurriculumSampler, split_equal, split_thresholds


# ---------------------------------------------------------------- chunking

@pytest.mark.parametrize("n", [3, 10, 11, 100, 301])
def test_split_equal_sizes_and_order(n):
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n)
    labels = split_equal(scores)
    sizes = np.bincount(labels, minlength=3)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1
    # easy = highest mean cosine: every easy score >= every medium score >= every hard score
    assert scores[labels == 0].min() >= scores[labels == 1].max()
    assert scores[labels == 1].min() >= scores[labels == 2].max()


def test_split_equal_ties_are_deterministic():
    scores = np.array([0.5] * 9)
    a, b = split_equal(scores), split_equal(scores.copy())
    assert (a == b).all() and np.bincount(a).tolist() == [3, 3, 3]
    assert a.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ties keep position order


@pytest.mark.parametrize("easy_share,hard_share", [(0.6, 0.1), (0.5, 0.2), (0.34, 0.33), (0.9, 0.0), (1.0, 0.0)])
def test_split_thresholds_gives_asked_shares(easy_share, hard_share):
    n = 200
    scores = np.random.default_rng(0).uniform(0.2, 0.9, size=n)  # distinct values
    labels, (t_easy, t_hard) = split_thresholds(scores, easy_share, hard_share)
    sizes = np.bincount(labels, minlength=3)
    assert sizes[0] == round(easy_share * n) and sizes[2] == round(hard_share * n)
    # the labels are exactly what the two thresholds say
    assert (labels == 0).tolist() == (scores >= t_easy).tolist()
    assert (labels == 2).tolist() == (scores < t_hard).tolist()
    assert t_hard <= t_easy


def test_split_thresholds_ties_go_to_the_easier_chunk():
    scores = np.array([0.9, 0.8, 0.8, 0.8, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1])
    labels, (t_easy, t_hard) = split_thresholds(scores, easy_share=0.2, hard_share=0.1)
    assert t_easy == 0.8 and t_hard == 0.2
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]
    labels, (_, t_hard) = split_thresholds(scores, easy_share=0.5, hard_share=0.3)
    assert t_hard == 0.3 and labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]  # tied 0.3s both medium


@pytest.mark.parametrize("bad", [dict(easy_share=0.0), dict(easy_share=0.8, hard_share=0.3), dict(hard_share=1.0)])
def test_split_thresholds_rejects_bad_shares(bad):
    with pytest.raises(ValueError, match="easy_share"):
        split_thresholds(np.arange(10.0), **bad)


def test_assign_chunks_keeps_order_and_puts_unreadable_images_last():
    scores = pd.Series([0.9, 0.1, 0.5, 0.7, 0.3, 0.2], index=["a", "b", "c", "d", "e", "f"])
    table = curriculum.assign_chunks(["f", "x", "a", "b", "c", "d", "e"], scores, invalid=["x"])
    assert table["image_id"].tolist() == ["f", "x", "a", "b", "c", "d", "e"]  # the engine's training order
    assert table["chunk"].tolist() == [2, 2, 0, 2, 1, 0, 1] and np.isnan(table["difficulty"][1])
    with pytest.raises(ValueError, match="no difficulty score"):
        curriculum.assign_chunks(["a", "zz"], scores)


def test_parse_schedule():
    assert curriculum.parse_schedule("0,0.33,0.66") == (0.0, 0.33, 0.66)
    for bad in ("0.1,0.5,0.6", "0,0.6,0.3", "0,0.5,1.0", "0,a,b"):
        with pytest.raises(ValueError, match="stage_starts"):
            curriculum.parse_schedule(bad)


# ---------------------------------------------------------------- sampler

def _sampler(n=100, total_steps=50, batch_size=8, schedule=(0, 1 / 3, 2 / 3), seed=0):
    chunks = split_equal(np.random.default_rng(1).normal(size=n))
    return chunks, CurriculumSampler(chunks, total_steps, batch_size, schedule, seed)


@pytest.mark.parametrize("schedule", [(0, 1 / 3, 2 / 3), (0, 0.1, 0.9), (0, 0.5, 0.5), (0, 0, 0)])
def test_sampler_never_yields_a_sample_before_its_stage(schedule):
    chunks, sampler = _sampler(schedule=schedule)
    starts = sampler.stage_starts
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    seen_stage = set()
    for step, batch in enumerate(batches):
        stage = max(s for s, first in enumerate(starts) if first <= step)
        assert stage == sampler.stage_of_step(step)
        assert chunks[batch].max() <= stage, f"step {step}: chunk {chunks[batch].max()} before its stage {stage}"
        assert len(set(batch)) == len(batch) == 8
        seen_stage.add(int(chunks[batch].max()))
    assert max(seen_stage) == 2  # the hard chunk is reached eventually


def test_sampler_covers_each_pool_and_shuffles_within_a_stage():
    chunks, sampler = _sampler(n=90, total_steps=60, batch_size=10)
    batches = list(sampler)
    easy = sorted(np.flatnonzero(chunks == 0).tolist())  # stage 0 (steps 0..19): 30 easy samples, 3 batches a pass
    for p in range(0, 18, 3):
        assert sorted(sum(batches[p:p + 3], [])) == easy  # each pass is a permutation of the pool
    assert batches[0:3] != batches[3:6]  # reshuffled each pass
    assert sorted(sum(batches[20:23], [])) != easy  # stage 1 draws from easy + medium


def test_sampler_is_deterministic_by_seed():
    _, a = _sampler(seed=3)
    _, b = _sampler(seed=3)
    _, c = _sampler(seed=4)
    assert list(a) == list(b) == list(a)  # re-iterating gives the same order
    assert list(a) != list(c)


def test_sampler_small_pool_and_validation():
    chunks = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    batches = list(CurriculumSampler(chunks, 9, batch_size=4, seed=0))
    assert [len(b) for b in batches[:3]] == [2, 2, 2]  # pool of 2 easy < batch size: whole pool each step
    with pytest.raises(ValueError, match="easiest chunk is empty"):
        CurriculumSampler(np.array([1, 2, 2]), 5, 2)
    with pytest.raises(ValueError, match="chunks"):
        CurriculumSampler(np.array([0, 3]), 5, 2)


# ---------------------------------------------------------------- the stage on the embedded sample (tiny model)

@pytest.fixture(scope="module")
def curriculum_exp(prepared_exp):
    """A private exp with a 04 difficulty run and the plain 03 run to compare with (smoke, tiny backbone)."""
    exp = "t_curriculum"
    for stage in ("01_filter", "02_targets"):
        shutil.copytree(paths.stage_dir(stage, prepared_exp, create=False), paths.stage_dir(stage, exp, create=False),
                        dirs_exist_ok=True)
    base = dict(exp=exp, epochs=3, batch_size=8, smoke=True, tiny=True, vocab_head=False)
    difficulty.run(difficulty.DifficultyConfig(**base, reuse=False, run="d"))
    plain = train.run(train.TrainConfig(**base))
    return base, plain


@pytest.mark.parametrize("heuristic", ["equal", "thresholds"])
def test_run_takes_the_plain_runs_steps_and_writes_its_artifacts(curriculum_exp, heuristic):
    base, plain = curriculum_exp
    cfg = CurriculumConfig(**base, difficulty_run="d", heuristic=heuristic, easy_share=0.5, hard_share=0.25)
    run_dir = curriculum.run(cfg)
    assert run_dir == paths.stage_dir("05_curriculum", cfg.exp, f"effnet_lite0_plain_curriculum_{heuristic}_f-1_s0",
                                      create=False)
    assert (run_dir / "DONE").exists()
    metrics, plain_metrics = train.load_metrics(run_dir), train.load_metrics(plain)
    assert metrics["variant"] == f"curriculum_{heuristic}" and metrics["stage"] == "05_curriculum"
    n_train = len(pd.read_csv(run_dir / "chunks.csv"))
    assert metrics["steps"] == plain_metrics["steps"] == train.total_steps(cfg.train_config(), n_train)
    assert np.isfinite([metrics["val_cosine"], metrics["test_cosine"]]).all()
    # OOF / test predictions keyed by the same ids as the plain run's, so 06 blends it like any run
    for name in ("oof", "test"):
        ids = load_predictions(run_dir / f"preds_{name}.npz").ids
        assert (ids == load_predictions(plain / f"preds_{name}.npz").ids).all()
    chunks = curriculum.chunk_summary(run_dir)
    want = [16, 16, 16] if heuristic == "equal" else [24, 12, 12]  # 48 smoke training rows
    assert chunks["size"].tolist() == want
    assert chunks["min"].iloc[0] >= chunks["max"].iloc[1] >= chunks["min"].iloc[1] >= chunks["max"].iloc[2]
    comparison = curriculum.compare_with_plain(run_dir)
    assert comparison.metrics["variant"].tolist() == ["plain", f"curriculum_{heuristic}"]
    assert set(comparison.curves["epoch"]) == {1, 2, 3}


def test_run_refuses_a_directory_holding_other_curriculum_settings(curriculum_exp):
    base, _ = curriculum_exp
    cfg = CurriculumConfig(**base, difficulty_run="d", run="clash")
    curriculum.run(cfg)
    with pytest.raises(ConfigError, match="stage_starts"):
        curriculum.run(cfg.replace(stage_starts="0,0.5,0.9"))


def test_missing_or_ambiguous_difficulty_runs_are_explained(curriculum_exp):
    base, _ = curriculum_exp
    with pytest.raises(FileNotFoundError, match="04_difficulty.py"):
        curriculum.run(CurriculumConfig(**{**base, "backbone": "vit_b16"}))
    with pytest.raises(FileNotFoundError, match="no difficulty scores"):
        curriculum.run(CurriculumConfig(**base, difficulty_run="nope"))


def test_default_difficulty_run_is_the_one_with_the_same_settings(curriculum_exp):
    base, _ = curriculum_exp
    assert curriculum.resolve_difficulty_run(CurriculumConfig(**base)) == "d"
    difficulty.run(difficulty.DifficultyConfig(**{**base, "seed": 1}, reuse=False, run="d_s1"))
    assert curriculum.resolve_difficulty_run(CurriculumConfig(**base)) == "d"
    assert curriculum.resolve_difficulty_run(CurriculumConfig(**{**base, "seed": 1})) == "d_s1"
    with pytest.raises(ValueError, match="several 04_difficulty runs"):
        curriculum.resolve_difficulty_run(CurriculumConfig(**{**base, "lr": 0.5}))


@pytest.mark.slow
def test_notebook_smoke(curriculum_exp, tmp_path):
    from revsd.pipeline import execute_notebook

    base, _ = curriculum_exp
    params = {**base, "difficulty_run": "d", "heuristic": "thresholds", "run": "nb"}
    out = execute_notebook("05_curriculum", params, tmp_path)
    assert out.exists()
    assert (paths.stage_dir("05_curriculum", base["exp"], "nb", create=False) / "DONE").exists()


def _parameters(name: str) -> dict:
    import jupytext

    nb = jupytext.read(paths.notebooks_dir() / f"{name}.py")
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    ns: dict = {}
    exec(cell.source, ns)
    return {k: v for k, v in ns.items() if not k.startswith("__")}


def test_notebook_training_parameters_match_03_train():
    """04 and 05 must train like 03 (to reuse its cosines and compare with its runs): same names, same values."""
    ref = _parameters("03_train")
    for name, cls in (("04_difficulty", difficulty.DifficultyConfig), ("05_curriculum", CurriculumConfig)):
        params = _parameters(name)
        assert {k: params.get(k) for k in ref} == ref, name
        assert set(params) - {"n_examples", "plain_run"} <= set(cls.field_names()), name
