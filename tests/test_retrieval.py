"""Prompt banks (build / save / load / search / default bank), with real MiniLM; the chooser is in test_textsearch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from revsd import retrieval
from revsd.retrieval import PromptBank, build_bank, encode, load_bank


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
