"""Vocabulary: spaCy POS filter, lemmatisation and case, top-m order and ties, label matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from revsd import vocab

REAL_PROMPTS = "input/prompts/diffusiondb_prompts.parquet"


def test_case_and_inflection_match_one_lemma():
    assert vocab.lemmatize(["Cats", "cat", "CAT", "cats"]) == [["cat"]] * 4
    # capitalised words inside a prompt (spaCy tags "Woman" PROPN and "CAT" PROPN unless lower-cased first)
    assert vocab.lemmatize(["A Woman with Cats"]) == vocab.lemmatize(["a woman with cats"]) == [["woman", "cat"]]
    assert vocab.lemmatize(["A CAT SITTING ON A MAT"]) == [["cat", "sit", "mat"]]


def test_pos_filter_keeps_adjectives_nouns_verbs_only():
    (words,) = vocab.lemmatize(["A beautiful Woman running quickly in the forest by Greg Rutkowski, 8k"])
    assert words == ["beautiful", "woman", "run", "forest"]  # no DET/ADV/ADP, no PROPN names, no "8k"
    (with_names,) = vocab.lemmatize(["portrait by greg rutkowski"], pos="ADJ,NOUN,VERB,PROPN")
    assert with_names == ["portrait", "greg", "rutkowski"]
    assert vocab.lemmatize(["", "the of and, !!"]) == [[], []]


def test_parse_pos():
    assert vocab.parse_pos(" adj, NOUN ,verb") == ("ADJ", "NOUN", "VERB")
    with pytest.raises(ValueError, match="part-of-speech"):
        vocab.parse_pos(" , ")


def test_lemmas_are_cached_per_prompt(monkeypatch):
    text = "an ancient lighthouse painted in watercolor"
    first = vocab.lemmatize([text])
    monkeypatch.setattr(vocab, "_nlp", lambda: pytest.fail("spaCy called again for a cached prompt"))
    assert vocab.lemmatize([text, text]) == first * 2


PROMPTS = ["a red cat", "a red dog", "a blue cat", "a green bird", "a red cat chasing another cat"]


def test_build_vocab_top_m_by_prompt_count_with_alphabetical_ties():
    words, counts = vocab.build_vocab(PROMPTS, m=5)
    # red 3, cat 3 (counted once per prompt), then ties at 1 in alphabetical order
    assert words == ["cat", "red", "bird", "blue", "chase"]
    assert counts == [3, 3, 1, 1, 1]
    assert vocab.build_vocab(PROMPTS[::-1], m=5) == (words, counts)  # order of prompts does not matter
    assert vocab.build_vocab(PROMPTS, m=100, min_count=2) == (["cat", "red"], [3, 3])
    assert vocab.build_vocab(["Cats", "cat", "CAT"], m=3) == (["cat"], [3])
    with pytest.raises(ValueError):
        vocab.build_vocab(PROMPTS, m=0)


def test_label_matrix_on_hand_made_prompts():
    words = ["cat", "dog", "mat", "red", "unicorn"]
    labels = vocab.label_matrix(["Cats on a red MAT", "a dog", "", "CAT cat cats"], words)
    assert sp.isspmatrix_csr(labels) and labels.dtype == np.uint8 and labels.shape == (4, 5)
    np.testing.assert_array_equal(labels.toarray(), [[1, 0, 1, 1, 0],
                                                     [0, 1, 0, 0, 0],
                                                     [0, 0, 0, 0, 0],
                                                     [1, 0, 0, 0, 0]])
    assert vocab.label_matrix([], words).shape == (0, 5)
    with pytest.raises(ValueError, match="duplicate"):
        vocab.label_matrix(["a cat"], ["cat", "cat"])


def test_vocab_counts_equal_label_column_sums_on_real_prompts():
    prompts = pd.read_parquet(REAL_PROMPTS)["prompt"].astype(str).tolist()[:300]
    words, counts = vocab.build_vocab(prompts, m=40, min_count=2)
    assert len(words) == 40 and counts == sorted(counts, reverse=True) and min(counts) >= 2
    assert all(w == w.lower() for w in words)
    assert {"detailed", "painting", "portrait"} <= set(words)  # staples of SD prompts
    labels = vocab.label_matrix(prompts, words)
    np.testing.assert_array_equal(np.asarray(labels.sum(axis=0)).ravel(), counts)


# --- the batched tagger reproduces spaCy's pipeline ----------------------------------------------------------

TRICKY = ["I ain't gonna paint y'all, let's go", "c'mon, it is what it is", "There is a CAT; there are 2 cats!",
          "  double  spaces\tand\nnewlines ", "１２ ｆｕｌｌ-width, émigré café, naïve façade", "8k 4k hd uhd 1024x1024",
          "", "!!!", "a", "photo of a gon na robot", "‘quoted’ “words” — dashes"]


def test_fast_path_equals_spacy_pipeline_on_real_and_tricky_prompts():
    prompts = pd.read_parquet(REAL_PROMPTS)["prompt"].astype(str).tolist()[1000:1600] + TRICKY
    vocab.clear_cache()
    one_by_one = []
    for t in prompts[-60:]:  # batches of one prompt (the tricky ones and some real ones)
        vocab.lemmatize([t])
        one_by_one.append(vocab._CACHE[t])
    vocab.clear_cache()
    vocab.lemmatize(prompts, pos="ADJ,NOUN,VERB,PROPN", batch_size=256, workers=1)
    batched = [vocab._CACHE[t] for t in prompts]
    vocab.clear_cache()
    vocab.lemmatize(prompts, batch_size=256, workers=2)  # forked processes: the same, in the same order
    forked = [vocab._CACHE[t] for t in prompts]
    reference = vocab.spacy_candidates(prompts)
    assert batched == reference and forked == reference
    assert one_by_one == reference[-60:]
    assert sum(map(len, reference)) > 3000  # real content, not empty tuples


def test_tagger_tags_equal_spacy_tags_and_skips_unneeded_tokens():
    prompts = [t.lower() for t in pd.read_parquet(REAL_PROMPTS)["prompt"].astype(str).tolist()[:200]]
    nlp, ann = vocab._nlp(), vocab._annotator()
    docs = list(nlp.tokenizer.pipe(prompts))
    needed = np.random.default_rng(0).random(sum(map(len, docs))) < 0.5
    tags = ann.tagger(docs, needed)
    labels = nlp.get_pipe("tagger").labels
    expected = np.array([labels.index(t.tag_) for d in nlp.pipe(prompts) for t in d])
    np.testing.assert_array_equal(tags[needed], expected[needed])
    assert (tags[~needed] == -1).all()


def test_multi_token_ruler_patterns_go_through_spacy(monkeypatch):
    calls = []
    real = vocab.spacy_candidates
    monkeypatch.setattr(vocab, "spacy_candidates", lambda texts: calls.append(list(texts)) or real(texts))
    out = vocab._annotator()(["we are gon na win", "a red cat"])
    assert calls == [["we are gon na win"]]  # only the prompt a two-token pattern could match
    assert out == real(["we are gon na win", "a red cat"])


def test_unique_rows_matches_numpy():
    a = np.random.default_rng(1).integers(0, 5, size=(500, 3))
    u, inv = vocab._unique_rows(a)
    np.testing.assert_array_equal(u[inv], a)
    assert len(u) == len(np.unique(a, axis=0))
