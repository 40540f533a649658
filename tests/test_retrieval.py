"""Prompt banks (build / save / load / search / default bank) and the readable-prompt chooser, with real MiniLM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from revsd import retrieval
from revsd.retrieval import PromptBank, TextChooser, build_bank, encode, load_bank
from revsd.textsearch import encode_fast

REPO_PROMPTS = "input/prompts/diffusiondb_prompts.parquet"


@pytest.fixture(scope="module")
def real_prompts(sample_dir) -> list[str]:
    """120 short real DiffusionDB prompts (short keeps MiniLM fast on CPU)."""
    df = pd.read_parquet(sample_dir.parents[1] / REPO_PROMPTS)
    short = df.loc[df["prompt"].str.len().between(20, 70), "prompt"]
    return short.sample(120, random_state=0).tolist()


@pytest.fixture(scope="module")
def bank(real_prompts, tmp_path_factory) -> PromptBank:
    return build_bank(real_prompts, tmp_path_factory.mktemp("bank") / "b", progress=False)


def test_build_cleans_saves_and_loads(real_prompts, tmp_path):
    raw = ["  " + real_prompts[0] + "  ", real_prompts[0], "", None, float("nan"), real_prompts[1] + "\n"]
    b = build_bank(raw, tmp_path / "b", progress=False)
    assert b.prompts == [real_prompts[0], real_prompts[1]]
    meta = pd.read_json(tmp_path / "b" / "meta.json", typ="series")
    assert meta["count"] == 2 and meta["index"] == "flat"
    loaded = load_bank(tmp_path / "b")
    assert loaded.prompts == b.prompts
    np.testing.assert_allclose(loaded.emb, encode(b.prompts), atol=1e-5)
    assert not list(tmp_path.glob(".b.*")), "no temporary folder left behind"
    with pytest.raises(ValueError, match="no usable prompts"):
        build_bank(["", "   "], progress=False)
    with pytest.raises(FileNotFoundError, match="revsd bank build"):
        load_bank(tmp_path / "missing")


def test_search_is_exact_cosine(bank, real_prompts):
    q = encode([real_prompts[5], "a watercolor painting of a cat"])
    scores, idx = bank.search(q, k=4)
    assert bank.prompts[idx[0, 0]] == real_prompts[5] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    brute = q @ bank.emb.T
    np.testing.assert_array_equal(idx, np.argsort(-brute, axis=1)[:, :4])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, idx, 1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_ivf_bank_roundtrip(monkeypatch, tmp_path):
    monkeypatch.setattr(retrieval, "IVF_MIN", 1000)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3000, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    b = PromptBank([f"p{i}" for i in range(3000)], emb)
    b.save(tmp_path / "ivf")
    assert (tmp_path / "ivf" / "index.faiss").exists()
    loaded = load_bank(tmp_path / "ivf")
    _, idx = loaded.search(emb[:50], k=1)
    assert (idx[:, 0] == np.arange(50)).mean() >= 0.9  # approximate index, but finds the exact vectors


def test_bank_merge_dedupes(bank):
    extra = build_bank([bank.prompts[0], "style of Tomma Abts, woman"], progress=False)
    merged = bank + extra
    assert len(merged) == len(bank) + 1 and merged.prompts[-1] == "style of Tomma Abts, woman"
    _, idx = merged.search(extra.emb[1:], k=1)
    assert idx[0, 0] == len(bank)


def test_bank_cli(tmp_path, capsys):
    csv = tmp_path / "mine.csv"
    pd.DataFrame({"text": ["a red fox in snow", " a red fox in snow ", "oil painting of a lighthouse"]}).to_csv(csv)
    assert retrieval.main(["build", str(csv), "--column", "text", "--out", str(tmp_path / "bank")]) == 0
    assert load_bank(tmp_path / "bank").prompts == ["a red fox in snow", "oil painting of a lighthouse"]
    assert retrieval.main(["build", str(csv), "--out", str(tmp_path / "b2")]) == 1
    err = capsys.readouterr().err
    assert "mine.csv" in err and "'prompt'" in err and "--column" in err
    assert retrieval.main(["build", str(tmp_path / "nope.csv")]) == 1


def test_default_bank_holds_train_prompts_only(monkeypatch, tmp_path, real_prompts):
    inp, work = tmp_path / "input", tmp_path / "working"
    (inp / "prompts").mkdir(parents=True)
    pd.DataFrame({"prompt": real_prompts[:10]}).to_parquet(inp / "prompts" / "diffusiondb_prompts.parquet")
    (work / "01_filter" / "x").mkdir(parents=True)
    pd.DataFrame({"image_id": list("abc"), "prompt": ["style of A, woman", "style of B, woman", "style of C"],
                  "split": ["train", "val", "test"]}).to_parquet(work / "01_filter" / "x" / "filtered.parquet")
    monkeypatch.setenv("REVSD_INPUT", str(inp))
    monkeypatch.setenv("REVSD_WORKING", str(work))
    b = retrieval.default_bank("x")
    assert b.prompts == real_prompts[:10] + ["style of A, woman"]
    assert (work / "banks" / "default" / "meta.json").exists() and (work / "banks" / "train_x").is_dir()
    monkeypatch.setattr(retrieval, "encode", lambda *a, **k: pytest.fail("cached banks must not be re-encoded"))
    assert retrieval.default_bank("x").prompts == b.prompts
    assert retrieval.default_bank(None).prompts == real_prompts[:10]


def test_modifier_phrases_are_real_and_formatted():
    phrases = retrieval.modifier_phrases()
    assert len(phrases) == len(set(phrases)) > 5000
    assert "by Greg Rutkowski" in phrases and "trending on artstation" in phrases and "abstract art" in phrases


def test_chosen_text_is_the_closest_candidate(bank, real_prompts):
    mods = build_bank(retrieval.modifier_phrases()[::60], progress=False)
    target = encode(["portrait of a woman, oil painting by Tomma Abts"])
    rng = np.random.default_rng(1)
    pred = target + 0.02 * rng.standard_normal(target.shape).astype(np.float32)
    pred /= np.linalg.norm(pred)
    chooser = TextChooser(bank, mods, k=4, rounds=2, per_round=6)
    (r,) = chooser(pred, [["woman", "painting", "portrait"]])
    assert len(r.candidates) > 4 + 1 + 4  # neighbours, the words alone, neighbour + words, modifier extensions
    assert "woman, painting, portrait" in r.candidates
    assert any(c.startswith(r.neighbors[0][0] + ", ") for c in r.candidates)
    texts = list(r.candidates)
    own = encode(texts) @ pred[0]  # each candidate's own embedding, encoded independently (float32)
    assert r.cosine == pytest.approx(float(own[texts.index(r.prompt)]), abs=1e-5)  # the reported cosine is exact
    assert r.cosine >= own.max() - 2e-3  # bf16 search scores, float32 re-scoring: the best or within bf16 error
    np.testing.assert_allclose([r.candidates[t] for t in texts], own, atol=5e-3)
    assert r.cosine >= r.neighbors[0][1] - 1e-6  # never worse than plain retrieval
    assert r.cosine > 0.6
    (again,) = TextChooser(bank, mods, k=4, rounds=2, per_round=6)(pred, [["woman", "painting", "portrait"]])
    assert again.prompt == r.prompt  # deterministic


def test_chooser_without_words_or_modifiers(bank, real_prompts):
    q = encode(real_prompts[:3])
    out = TextChooser(bank, None, k=3, pool=10, rounds=0)(q)
    assert [o.prompt for o in out] == real_prompts[:3]
    assert all(len(o.candidates) == 10 and len(o.neighbors) == 3 for o in out)  # the pool, scored from the bank
    out = TextChooser(bank, None, k=3)(q)  # parts of the neighbours as phrases: the exact prompt still wins
    assert [o.prompt for o in out] == real_prompts[:3] and all(o.cosine > 0.999 for o in out)


def test_beam_search_extends_and_shortens():
    """Targets one phrase away from a bank prompt: the beam finds them exactly, plain retrieval cannot."""
    base = ["a red fox in the snow", "a lighthouse at night, stormy sea, oil painting", "portrait of an old sailor"]
    mods = build_bank(["by Greg Rutkowski", "watercolor", "trending on artstation", "cinematic lighting",
                       "by Claude Monet", "pixel art", "studio photo"], progress=False)
    targets = ["a red fox in the snow, watercolor, by Claude Monet", "a lighthouse at night, oil painting"]
    out = TextChooser(build_bank(base, progress=False), mods, k=2, rounds=3, beam=2)(encode(targets))
    assert [sorted(o.prompt.split(", ")) for o in out] == [sorted(t.split(", ")) for t in targets]  # any order
    assert all(o.cosine > 0.98 and o.cosine > o.neighbors[0][1] + 0.05 for o in out)


def test_encode_fast_matches_encode(real_prompts):
    texts = real_prompts[:40] + ["woman", "by Greg Rutkowski, trending on artstation"]
    exact = encode(texts)
    np.testing.assert_allclose(encode_fast(texts, bf16=False), exact, atol=1e-5)
    fast = encode_fast(texts, bf16=True)  # bfloat16 autocast (slow but valid where the CPU lacks bf16)
    assert fast.shape == exact.shape and ((fast * exact).sum(1) > 0.999).all()
    assert encode_fast([]).shape == (0, 384)


def test_chooser_is_deterministic_and_reports_exact_cosines(bank, real_prompts):
    mods = build_bank(retrieval.modifier_phrases()[::40], progress=False)
    rng = np.random.default_rng(3)
    pred = encode(real_prompts[10:16]) + 0.05 * rng.standard_normal((6, 384)).astype(np.float32)
    first = TextChooser(bank, mods, k=4)(pred)
    chooser = TextChooser(bank, mods, k=4)
    chooser(pred[::-1])  # an earlier call with other batches must not change the result
    again = chooser(pred)
    assert [(r.prompt, r.cosine) for r in first] == [(r.prompt, r.cosine) for r in again]
    unit = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    exact = (encode([r.prompt for r in first]) * unit).sum(1)
    np.testing.assert_allclose([r.cosine for r in first], exact, atol=1e-5)


def test_beam_search_swaps_a_part():
    """One round: only a swap (drop a part, add a phrase in its place) reaches the target."""
    base = build_bank(["a lighthouse at night, stormy sea, oil painting", "portrait of an old sailor"], progress=False)
    mods = build_bank(["pixel art", "watercolor", "by Claude Monet", "studio photo"], progress=False)
    target = "a lighthouse at night, pixel art, oil painting"
    (r,) = TextChooser(base, mods, k=2, rounds=1, beam=1)(encode([target]))
    assert r.prompt == target and r.cosine > 0.999
    (r,) = TextChooser(base, mods, k=2, rounds=1, beam=1, swap=0)(encode([target]))
    assert r.prompt != target
