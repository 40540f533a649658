"""01_filter: each text rule with its edge cases, grouping/split invariants, the stage on the sample, papermill."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def kept(prompts, n=50, ids=None, **cols) -> list[bool]:
    return filtering.near_duplicate_keep(table(list(prompts), ids, **cols), n).tolist()


def greedy_reference(prompts: list[str], n: int) -> list[bool]:
    """Rule 3 written the obvious O(n^2) way, for comparison."""
    def same(p, q):
        return p == q or (len(p) >= n and len(q) >= n and (p[:n] == q[:n] or p[-n:] == q[-n:]))

    keep = []
    for p in prompts:
        keep.append(not any(k and same(p, q) for k, q in zip(keep, prompts)))
    return keep


def test_prefix_50_vs_49_shared_characters():
    p50 = [BASE + " by greg", BASE + " in the rain"]  # share exactly 50 leading characters
    p49 = [BASE[:49] + "X and more", BASE[:49] + "Y and more"]  # share 49, then differ; same suffix < 50
    assert kept(p50 + p49) == [True, False, True, True]


def test_suffix_50_vs_49_shared_characters():
    p50 = ["one " + BASE, "another " + BASE]
    p49 = ["one X" + BASE[1:], "two Y" + BASE[1:]]  # last 49 characters identical
    assert kept(p50 + p49) == [True, False, True, True]


def test_prompt_of_exactly_50_characters():
    # the 50-char prompt is the prefix of one and the suffix of another; a 49-char one never matches an affix
    assert kept([BASE, BASE + " more", "xx " + BASE, BASE[1:]]) == [True, False, False, True]


def test_exact_duplicates_of_any_length_are_dropped():
    assert kept(["a cat", "a cat", BASE[:49], BASE[:49], "a dog", "A cat"]) == [True, False, True, False, True, True]


def test_no_chaining_a_b_c():
    a = BASE + " with a dragon"
    b = BASE + " by a river, " + "trending on artstation, highly detailed, 4k octane"
    c = "zzz totally different start " + "trending on artstation, highly detailed, 4k octane"
    d = "unrelated prompt about a small red boat on a calm lake at dawn, film"
    # a~b (prefix), b~c (suffix), a and c share nothing: b goes, a and c stay (the old rule kept one of the three)
    assert kept([a, b, c, d]) == [True, False, True, True]
    rep = filtering.near_duplicate_representatives(pd.Series([a, b, c, d]), np.arange(4), 50)
    assert rep.tolist() == [0, 0, 2, 3]
    # the order decides who is kept: visiting b first keeps b alone (a and c both match it)
    assert kept([a, b, c, d], ids=["i2", "i0", "i1", "i3"]) == [False, True, False, True]


def test_order_part_id_first_then_image_id():
    prompts = ["a cat", "a cat", "a cat"]
    assert kept(prompts, ids=["b", "a", "c"]) == [False, True, False]  # smallest image_id
    assert kept(prompts, ids=["b", "a", "c"], part_id=[1, 2, 1]) == [True, False, False]  # earliest part first


def test_matches_the_quadratic_reference_on_random_prompts():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 60))
        prompts = ["".join(rng.choice(list("ab"), int(rng.integers(1, 7)))) for _ in range(n)]
        order = rng.permutation(n)
        rep = filtering.near_duplicate_representatives(pd.Series(prompts), order, 3)
        ref = greedy_reference([prompts[i] for i in order], 3)
        assert (rep[order] == order).tolist() == ref, (trial, prompts, order)
        assert all(rep[rep[i]] == rep[i] for i in range(n))  # every row points at a kept row


def test_rule_3_is_order_independent_on_real_prompts():
    prompts = pd.read_parquet(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")["prompt"].head(3000)
    df = table(filtering.strip_prompts(prompts).tolist())
    survivors = set(df.loc[filtering.near_duplicate_keep(df), "image_id"])
    assert 0 < len(df) - len(survivors) < len(df)  # real prompts do contain near duplicates
    shuffled = df.sample(frac=1, random_state=1).reset_index(drop=True)
    assert set(shuffled.loc[filtering.near_duplicate_keep(shuffled), "image_id"]) == survivors
    left = df[df["image_id"].isin(survivors)]["prompt"]
    long = left[left.str.len() >= 50]
    assert left.is_unique and long.str[:50].is_unique and long.str[-50:].is_unique
    assert filtering.near_duplicate_keep(df[df["image_id"].isin(survivors)]).all()  # idempotent


def test_rules_report_counts():
    df = table(["  a cat  ", "", "nan", None, BASE + " A", BASE + " B", BASE + " C", "a dog"])
    kept, report, bad = filtering.apply_rules(df, FilterConfig(check_images=False))
    assert report["step"].tolist() == ["strip_whitespace", "min_words_null", "near_duplicates"]
    assert report["rows_after"].tolist() == [8, 5, 3]
    assert (report["rows_before"] - report["rows_after"] == report["dropped"]).all()
    assert kept["prompt"].tolist() == ["a cat", BASE + " A", "a dog"] and len(bad) == 0
    kept0, report0, _ = filtering.apply_rules(df, FilterConfig(check_images=False, near_dup_chars=0))
    assert len(kept0) == 5 and "near_duplicates" not in report0["step"].tolist()
    assert filtering.text_rules_keep(df).tolist() == df["image_id"].isin(kept["image_id"]).tolist()


def test_corrupt_image_reported_not_dropped(sample_dir, tmp_path):
    from revsd.data import load_dataset

    df = load_dataset(sample_dir).head(6).copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(df["image_path"].iloc[2]).read_bytes()[:300])  # truncated JPEG
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    df.loc[df.index[2], "image_path"] = str(broken)
    df.loc[df.index[4], "image_path"] = str(text)
    ok, bad = filtering.check_images(df, workers=2)
    assert len(ok) + len(bad) == 6
    assert bad["image_id"].tolist() == [df["image_id"].iloc[2], df["image_id"].iloc[4]]
    assert bad["error"].str.contains("broken.jpg").iloc[0] and "text.jpg" in bad["error"].iloc[1]
    assert not set(bad["image_id"]) & set(ok["image_id"])


# ---------------------------------------------------------------------------------------------- rule 4


def test_embedding_clusters():
    e = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0], [0, 0, 1], [0, 0.1, 0.995]], dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    labels = filtering.embedding_clusters(e, 0.95, block=2)
    assert labels[0] == labels[1] and labels[3] == labels[4] and len({labels[0], labels[2], labels[3]}) == 3


def test_embed_dedup_uses_encode_prompts(monkeypatch):
    from revsd import textenc

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


def test_run_names_skipped_inputs(sample_dir, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name in ("1.png", "2.png", "3.png", "no_row.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    (tmp_path / "prompts.csv").write_text("imgId,prompt\n1,a red fox\n2,a blue whale\n3,a green frog\n")
    df = filtering.run(FilterConfig(exp="t_skip", source=str(tmp_path), n_folds=1, val_size=0, test_size=0))
    assert len(df) == 3
    skipped = pd.read_csv(paths.stage_dir("01_filter", "t_skip", create=False) / "skipped_inputs.csv")
    assert [Path(p).name for p in skipped["path"]] == ["no_row.png"]
    assert "skipped 1 input file(s)" in capsys.readouterr().out


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
