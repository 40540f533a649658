"""01_filter: each text rule with its edge cases, grouping/split invariants, the stage on the sample, papermill."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from revsd import filtering, paths
from revsd.config import ConfigError
from revsd.data import DataError
from revsd.filtering import FilterConfig

BASE = "a majestic castle on a hill at sunset, oil paintin"  # exactly 50 characters
assert len(BASE) == 50, len(BASE)


def table(prompts, ids=None, **cols) -> pd.DataFrame:
    ids = ids or [f"img{i:03d}" for i in range(len(prompts))]
    return pd.DataFrame({"image_id": ids, "image_path": [f"/x/{i}.png" for i in ids], "prompt": prompts, **cols})


# ---------------------------------------------------------------------------------------------- rules 1-2


def test_strip_whitespace():
    s = pd.Series(["  a cat ", "\ta dog\n", "two  spaces", None, "   "])
    out = filtering.strip_prompts(s)
    assert out.iloc[:3].tolist() == ["a cat", "a dog", "two  spaces"]
    assert pd.isna(out.iloc[3]) and out.iloc[4] == ""


@pytest.mark.parametrize("prompt, keep", [
    ("a", True), ("a cat", True), ("猫", True), ("4k", True),
    ("", False), ("!!! ...", False), ("___", False), (None, False), (np.nan, False),
    ("nan", False), ("NaN", False), ("Null", False), ("NULL", False), ("None", False), ("<NA>", False),
    ("portrait of NaN, trending on artstation", False), ("a NULL cat", False),
    ("nan goldin photograph of a woman", True), ("null space, abstract art", True), ("nancy drew", True),
    ("Nullarbor plain at dawn", True), ("banana", True),
])
def test_min_words_and_null(prompt, keep):
    assert filtering.valid_prompt_mask(pd.Series([prompt], dtype=object)).tolist() == [keep]


# ---------------------------------------------------------------------------------------------- rule 3


def test_prefix_50_vs_49_shared_characters():
    p50 = [BASE + " by greg", BASE + " in the rain"]  # share exactly 50 leading characters
    p49 = [BASE[:49] + "X and more", BASE[:49] + "Y and more"]  # share 49, then differ; same suffix < 50
    labels = filtering.near_duplicate_clusters(pd.Series(p50 + p49), 50)
    assert labels[0] == labels[1]
    assert labels[2] != labels[3]


def test_suffix_50_vs_49_shared_characters():
    p50 = ["one " + BASE, "another " + BASE]
    p49 = ["one X" + BASE[1:], "two Y" + BASE[1:]]  # last 49 characters identical
    labels = filtering.near_duplicate_clusters(pd.Series(p50 + p49), 50)
    assert labels[0] == labels[1] and labels[2] != labels[3]


def test_prompt_of_exactly_50_characters():
    labels = filtering.near_duplicate_clusters(pd.Series([BASE, BASE + " more", "xx " + BASE, BASE[1:]]), 50)
    assert labels[0] == labels[1] == labels[2]  # whole 50-char prompt = prefix of one, suffix of the other
    assert labels[3] != labels[0]  # 49 characters long: too short to be a near duplicate


def test_short_prompts_are_never_near_duplicates():
    labels = filtering.near_duplicate_clusters(pd.Series(["a cat", "a cat", BASE[:49], BASE[:49]]), 50)
    assert len(set(labels)) == 4


def test_group_of_three_by_chaining_prefix_and_suffix():
    a = BASE + " with a dragon"
    b = BASE + " by a river, " + "trending on artstation, highly detailed, 4k octane"
    c = "zzz totally different start " + "trending on artstation, highly detailed, 4k octane"
    d = "unrelated prompt about a small red boat on a calm lake at dawn, film"
    labels = filtering.near_duplicate_clusters(pd.Series([a, b, c, d]), 50)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    keep = filtering.keep_one_per_cluster(labels, pd.Series(["i2", "i0", "i1", "i3"]))
    assert keep.tolist() == [False, True, False, True]  # smallest image_id of the cluster, and d


def test_keep_one_is_order_independent():
    prompts = pd.read_parquet(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")["prompt"].head(3000)
    df = table(filtering.strip_prompts(prompts).tolist())
    labels = filtering.near_duplicate_clusters(df["prompt"], 50)
    kept = set(df.loc[filtering.keep_one_per_cluster(labels, df["image_id"]), "image_id"])
    assert 0 < len(df) - len(kept) < len(df)  # real prompts do contain near duplicates
    shuffled = df.sample(frac=1, random_state=1).reset_index(drop=True)
    labels2 = filtering.near_duplicate_clusters(shuffled["prompt"], 50)
    assert set(shuffled.loc[filtering.keep_one_per_cluster(labels2, shuffled["image_id"]), "image_id"]) == kept
    survivors = df[df["image_id"].isin(kept)]["prompt"]
    long = survivors[survivors.str.len() >= 50]
    assert long.str[:50].is_unique and long.str[-50:].is_unique


def test_rules_report_counts():
    df = table(["  a cat  ", "", "nan", None, BASE + " A", BASE + " B", BASE + " C", "a dog"])
    kept, report, bad = filtering.apply_rules(df, FilterConfig(check_images=False))
    assert report["step"].tolist() == ["strip_whitespace", "min_words_null", "near_duplicates"]
    assert report["rows_after"].tolist() == [8, 5, 3]
    assert (report["rows_before"] - report["rows_after"] == report["dropped"]).all()
    assert kept["prompt"].tolist() == ["a cat", BASE + " A", "a dog"] and len(bad) == 0
    kept0, report0, _ = filtering.apply_rules(df, FilterConfig(check_images=False, near_dup_chars=0))
    assert len(kept0) == 5 and "near_duplicates" not in report0["step"].tolist()


# ---------------------------------------------------------------------------------------------- rule 4


def test_embedding_clusters():
    e = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0], [0, 0, 1], [0, 0.1, 0.995]], dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    labels = filtering.embedding_clusters(e, 0.95, block=2)
    assert labels[0] == labels[1] and labels[3] == labels[4] and len({labels[0], labels[2], labels[3]}) == 3


def test_embed_dedup_uses_encode_prompts(monkeypatch):
    import revsd.textenc as textenc

    def fake_encode(prompts):  # "cat"/"kitten" prompts point the same way
        v = np.array([[1.0, 0.0] if ("cat" in p or "kitten" in p) else [0.0, 1.0] for p in prompts], np.float32)
        return v

    monkeypatch.setattr(textenc, "encode_prompts", fake_encode)
    df = table(["a cat", "a kitten", "a dog"], ids=["b", "a", "c"])
    kept, report, _ = filtering.apply_rules(df, FilterConfig(check_images=False, embed_dedup_threshold=0.9))
    assert kept["image_id"].tolist() == ["a", "c"] and report["step"].iloc[-1] == "embed_dedup"


# ---------------------------------------------------------------------------------------------- groups, splits


def test_assign_groups_links_identical_near_duplicate_and_artist():
    df = table(["a cat", "a cat", BASE + " x", BASE + " y", "a dog", "a cow", "a pig", "an owl"],
               artist=["A", None, None, None, "B", "B", None, None])
    g = filtering.assign_groups(df, 50, "artist")
    assert g[0] == g[1] and g[2] == g[3] and g[4] == g[5]
    assert g[6] != g[7]  # missing artist values never link rows
    assert g.nunique() == 5 and g.str.match(r"^g\d+$").all()
    assert filtering.assign_groups(df, 50, "").nunique() == 6
    shuffled = df.iloc[::-1].reset_index(drop=True)
    assert filtering.assign_groups(shuffled, 50, "artist").iloc[::-1].tolist() == g.tolist()


def test_split_and_fold_invariants_on_real_prompts():
    prompts = pd.read_parquet(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")["prompt"].head(4000)
    df = table(prompts.tolist())
    df["group"] = filtering.assign_groups(df, 50)
    assert df["group"].nunique() < len(df)  # real near duplicates/identical prompts exist
    split, fold = filtering.split_and_fold(df["group"], 0.1, 0.1, 5, seed=0)
    df["split"], df["fold"] = split, fold
    assert df.groupby("group")["split"].nunique().max() == 1
    assert df.groupby("group")["fold"].nunique().max() == 1
    assert set(df.loc[df["split"] != "train", "fold"]) == {-1}
    assert set(df.loc[df["split"] == "train", "fold"]) == set(range(5))
    frac = df["split"].value_counts(normalize=True)
    assert abs(frac["val"] - 0.1) < 0.03 and abs(frac["test"] - 0.1) < 0.03
    fold_sizes = df.loc[df["split"] == "train", "fold"].value_counts()
    assert fold_sizes.max() / fold_sizes.min() < 1.2
    again = filtering.split_and_fold(df["group"], 0.1, 0.1, 5, seed=0)
    other = filtering.split_and_fold(df["group"], 0.1, 0.1, 5, seed=1)
    assert again[0].equals(split) and again[1].equals(fold) and not other[0].equals(split)


def test_split_errors():
    groups = pd.Series([f"g{i}" for i in range(6)])
    with pytest.raises(DataError, match="fewer than n_folds=5"):
        filtering.split_and_fold(groups, 0.2, 0.2, 5)
    with pytest.raises(ValueError, match="summing below 1"):
        filtering.split_and_fold(groups, 0.6, 0.5, 2)


# ---------------------------------------------------------------------------------------------- the stage


def test_run_on_sample_groups_artists():
    cfg = FilterConfig(exp="t_filter")
    df = filtering.run(cfg)
    out = paths.stage_dir("01_filter", "t_filter", create=False)
    saved = pd.read_parquet(out / "filtered.parquet")
    assert list(saved.columns[:6]) == ["image_id", "image_path", "prompt", "group", "split", "fold"]
    assert saved["image_id"].tolist() == df["image_id"].tolist() and saved["image_id"].is_unique
    assert saved["image_path"].str.startswith("sample/images/part-").all()  # portable: relative to input/
    assert all(paths.resolve_input(p).is_file() for p in saved["image_path"])
    assert saved.groupby("artist")["group"].nunique().max() == 1  # artist grouping on the sample
    assert saved.groupby("group")["split"].nunique().max() == 1
    assert saved.groupby("group")["fold"].nunique().max() == 1
    assert set(saved["split"]) == {"train", "val", "test"}
    assert set(saved.loc[saved["split"] == "train", "fold"]) == set(range(cfg.n_folds))
    report = pd.read_csv(out / "filter_report.csv")
    assert report["rows_before"].iloc[0] == 300 and report["rows_after"].iloc[-1] == len(saved)
    assert report.set_index("step").loc["near_duplicates", "dropped"] == 2  # the 3 Nicolas Delort prompts
    assert len(pd.read_csv(out / "bad_images.csv")) == 0
    assert FilterConfig.load(out / "config.json") == cfg
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files


def test_run_skips_and_reports_bad_image(sample_dir, tmp_path):
    src = tmp_path / "ds"
    shutil.copytree(sample_dir / "images" / "part-000002", src / "images" / "part-000002")
    victim = sorted((src / "images" / "part-000002").glob("*.jpg"))[7]
    victim.write_bytes(victim.read_bytes()[:200])
    df = filtering.run(FilterConfig(exp="t_bad", source=str(src), n_folds=3))
    out = paths.stage_dir("01_filter", "t_bad", create=False)
    bad = pd.read_csv(out / "bad_images.csv")
    assert bad["image_id"].tolist() == [victim.stem] and victim.name in bad["error"].iloc[0]
    assert victim.stem not in set(df["image_id"])
    assert pd.read_csv(out / "filter_report.csv").set_index("step").loc["bad_images", "dropped"] == 1


def test_run_limit_and_relative_source(sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("REVSD_INPUT", str(tmp_path))
    shutil.copytree(sample_dir / "images" / "part-000003", tmp_path / "mine" / "images" / "part-000003")
    df = filtering.run(FilterConfig(exp="t_lim", source="mine", limit=40, n_folds=2, check_images=False))
    assert len(df) == 40 and set(df["part_id"]) == {3}


def test_run_all_rows_filtered_is_an_error(tmp_path, sample_dir):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "1.png")
    (tmp_path / "prompts.csv").write_text("imgId,prompt\n1,NaN\n")
    with pytest.raises(DataError, match="no rows left after filtering"):
        filtering.run(FilterConfig(exp="t_empty", source=str(tmp_path)))


def test_config_is_strict():
    with pytest.raises(ConfigError, match="near_dup_char.*did you mean 'near_dup_chars'"):
        FilterConfig.from_dict({"near_dup_char": 40})


@pytest.mark.slow
def test_notebook_smoke_via_papermill(tmp_path):
    from revsd.pipeline import execute_notebook

    nb = execute_notebook("01_filter", {"exp": "smoke01", "limit": 60}, tmp_path)
    assert nb.exists()
    df = pd.read_parquet(paths.filtered_table("smoke01"))
    assert len(df) <= 60 and set(df["split"]) == {"train", "val", "test"}
    assert df.groupby("group")["split"].nunique().max() == 1
