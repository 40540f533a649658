"""Readable prompts (revsd.textsearch): the chooser's candidates, beam moves, exact reported cosines and
determinism, and the fast encoder against sentence-transformers, with real MiniLM and real prompts."""

from __future__ import annotations

import numpy as np
import pytest

from revsd import retrieval
from revsd.retrieval import build_bank, encode
from revsd.textsearch import TextChooser, encode_fast


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
