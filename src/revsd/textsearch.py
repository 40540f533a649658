"""Readable prompts: the search behind ``revsd predict``'s text (:class:`TextChooser`, used via ``revsd.retrieval``).

A predicted MiniLM embedding is turned into the candidate text whose OWN all-MiniLM-L6-v2 embedding has the
highest cosine to it. Candidates: the nearest bank prompts (scored from their stored embeddings), the vocabulary
head's confident words alone and appended to the nearest prompts, then a short beam search that extends the best
texts with the phrases that best fill the residual to the predicted embedding, drops one of their comma-separated
parts, or swaps one part for the phrases that best fill what the rest misses. Phrases: the modifier phrases
(``input/modifiers/``) nearest the target and the parts of the nearest bank prompts.

Speed: every new candidate is MiniLM-encoded, which is nearly all of the time. Candidates are encoded under
bfloat16 autocast where the device supports it (:func:`encode_fast`; on the 2-CPU AVX512-BF16 machine of
``bench/bench_text.py`` about 3x less CPU time per short text than float32, cosine to the float32 embedding
≥ 0.9999 on the texts checked); then the ``rescore`` best candidates of each image are encoded again in float32
(as :func:`revsd.textenc.encode_prompts`), the chosen text is the best of those and its reported cosine is the
float32 one. Encodings are cached across calls; the same calls give the same texts (deterministic).

Not used: ranking extensions by a sum of per-phrase pooled vectors (``"A, B"`` ≈ token-weighted mean of the
pooled vectors of A and B). Checked on the demo test split, it ranked the best extension of a text worse than
the residual rule used here (MiniLM's context changes each part's tokens too much).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from revsd.textenc import EMB_DIM, encode_prompts, load_minilm


def bf16_supported(device) -> bool:
    """Whether bfloat16 autocast is fast here: CUDA with bf16, or a CPU with native bf16 (oneDNN) support."""
    import torch

    try:
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def encode_fast(texts: Sequence[str], model: str = "", bf16: bool | None = None, batch_size: int = 64) -> np.ndarray:
    """L2-normalised MiniLM embeddings (n, 384) float32; ``bf16`` (default: when supported) runs the transformer
    under bfloat16 autocast. Mean-pooling models skip sentence-transformers' per-call overhead; ``bf16=False``
    matches :func:`revsd.textenc.encode_prompts` (to ~1e-6)."""
    import torch

    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((0, EMB_DIM), np.float32)
    st = load_minilm(model)
    bf16 = bf16_supported(st.device) if bf16 is None else bf16
    with torch.inference_mode(), torch.autocast(st.device.type, dtype=torch.bfloat16, enabled=bf16):
        if len(st) < 2 or getattr(st[1], "pooling_mode", "") != "mean" or not hasattr(st[0], "auto_model"):
            return encode_prompts(texts, model, batch_size=batch_size)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
        out = np.zeros((len(texts), st[0].auto_model.config.hidden_size), np.float32)
        for s in range(0, len(texts), batch_size):
            rows = order[s:s + batch_size]
            f = st.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=st.max_seq_length,
                             return_tensors="pt").to(st.device)
            h = st[0].auto_model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).last_hidden_state
            m = f["attention_mask"].unsqueeze(-1).float()
            v = (h.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(v, dim=1).cpu().numpy()
    return out


@dataclass
class Readable:
    """The chosen text for one image, its cosine to the predicted embedding, and what was considered."""

    prompt: str
    cosine: float
    neighbors: list[tuple[str, float]]
    candidates: dict[str, float]


def _join(base: str, extra: Sequence[str]) -> str:
    """``base, extra1, extra2`` with extras already contained in ``base`` (case-insensitive) left out."""
    low = base.lower()
    add = [e for e in extra if e.lower() not in low]
    return ", ".join([base, *add]) if add and base else ", ".join(add) or base


def _segments(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if len(s.strip()) > 1]


def _cuts(text: str) -> list[str]:
    """``text`` with one of its comma-separated parts left out (none for a single part)."""
    parts = _segments(text)
    return [", ".join(parts[:j] + parts[j + 1:]) for j in range(len(parts))] if len(parts) > 1 else []


class TextChooser:
    """Pick, per predicted embedding, the candidate text whose own MiniLM embedding is closest to it.

    Candidates: the ``pool`` nearest bank prompts (scored from the bank's stored embeddings, no encoding), the
    vocabulary words alone and appended to the ``k`` nearest, then ``rounds`` of beam search over the ``beam``
    best texts: each is extended by the ``per_round`` phrases with the highest cosine to its residual (the target
    minus its projection on the text's embedding), shortened by each of its parts, and each part is swapped for
    the ``swap`` phrases that best fill the residual of the text without it. Phrases: the ``phrases`` modifier
    phrases nearest the target plus the parts of the ``k`` nearest bank prompts. New texts are batch-encoded
    (:func:`encode_fast`, ``bf16``) and cached; the ``rescore`` best per image are re-encoded in float32 and the
    best of those is chosen. ``candidates`` holds every score (float32 for bank prompts and re-scored texts).
    """

    def __init__(self, bank, modifiers=None, k: int = 5, rounds: int = 2, per_round: int = 6, max_words: int = 6,
                 model: str = "", pool: int = 64, beam: int = 2, phrases: int = 48, swap: int = 3,
                 rescore: int = 2, bf16: bool | None = None):
        self.bank, self.modifiers, self.k, self.rounds = bank, modifiers, k, rounds
        self.per_round, self.max_words, self.model = per_round, max_words, model
        self.pool, self.beam, self.phrases = max(pool, k), beam, phrases
        self.swap, self.rescore, self.bf16 = swap, max(rescore, 1), bf16
        self._cache: dict[str, np.ndarray] = {}  # search encodings (bf16 where enabled)
        self._exact: dict[str, np.ndarray] = {}  # float32 encodings (bank prompts, re-scored texts)

    def _embed(self, texts) -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            self._cache.update(zip(new, encode_fast(new, self.model, self.bf16)))

    def _score(self, pending: list[dict[str, None]], emb: np.ndarray, cands: list[dict[str, float]]) -> None:
        self._embed([t for p in pending for t in p])
        for i, texts in enumerate(pending):
            for t in texts:
                if t not in cands[i]:
                    cands[i][t] = float(self._cache[t] @ emb[i])

    def _phrase_pool(self, emb: np.ndarray, neighbors: list[list[tuple[str, float]]]):
        """Per image: phrase texts and their embeddings (modifiers nearest the target + neighbour parts)."""
        texts = [[] for _ in emb]
        vecs = [[] for _ in emb]
        if self.modifiers is not None and self.phrases > 0:
            _, midx = self.modifiers.search(emb, self.phrases)
            for i, row in enumerate(midx):
                row = row[row >= 0]
                texts[i] += [self.modifiers.prompts[j] for j in row]
                vecs[i].append(self.modifiers.emb[row])
        parts = [list(dict.fromkeys(s for p, _ in nb[: self.k] for s in _segments(p))) for nb in neighbors]
        self._embed([s for ps in parts for s in ps])
        for i, ps in enumerate(parts):
            texts[i] += ps
            vecs[i].append(np.stack([self._cache[s] for s in ps]) if ps else np.zeros((0, emb.shape[1]), np.float32))
        return texts, [np.concatenate(v) if v else np.zeros((0, emb.shape[1]), np.float32) for v in vecs]

    def _fill(self, text: str, target: np.ndarray, phrases: list[str], pvecs: np.ndarray, n: int) -> list[str]:
        """The ``n`` phrases not yet in ``text`` with the highest cosine to its residual (``text`` is encoded)."""
        e = self._cache.get(text)
        resid = target - (target @ e) * e if e is not None else target
        low = text.lower()
        order = np.argsort(-(pvecs @ resid), kind="stable") if len(pvecs) and n > 0 else []
        return [p for p in (phrases[j] for j in order) if p.lower() not in low][:n]

    def _moves(self, text: str, target: np.ndarray, phrases: list[str], pvecs: np.ndarray) -> list[str]:
        """Extensions of ``text``, its cuts and its swaps (``text`` and its cuts are encoded)."""
        ext = [_join(text, [p]) for p in self._fill(text, target, phrases, pvecs, self.per_round)]
        parts, cuts = _segments(text), _cuts(text)
        swaps = [", ".join(parts[:j] + [p] + parts[j + 1:]) for j, rest in enumerate(cuts)
                 for p in self._fill(rest, target, phrases, pvecs, self.swap) if p.lower() not in text.lower()]
        return ext + cuts + swaps

    def _nearest(self, emb: np.ndarray, words, n_bank: int):
        """Unit-norm ``emb`` (n, D), each image's first ``max_words`` words, its ``n_bank`` nearest bank prompts
        as ``(prompt, cosine)`` and their bank rows."""
        emb = np.atleast_2d(np.asarray(emb, dtype=np.float32))
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        words = [list(w)[: self.max_words] for w in (words or [[]] * len(emb))]
        scores, idx = self.bank.search(emb, n_bank)
        nearest = [[(self.bank.prompts[j], float(s)) for s, j in zip(srow, irow) if j >= 0]
                   for srow, irow in zip(scores, idx)]
        return emb, words, nearest, idx

    def choose(self, emb: np.ndarray, words=None, known: Sequence[str | None] | None = None) -> list[Readable]:
        """``self(emb, words)`` for the rows without a ``known`` prompt; a known prompt (read from the file) is taken
        as it is (cosine 1), with its nearest bank prompts as neighbours and no text search."""
        known = list(known) if known is not None else [None] * len(emb)
        words = list(words) if words is not None else [[] for _ in known]
        search, rest = [i for i, k in enumerate(known) if k is None], [i for i, k in enumerate(known) if k is not None]
        out: list = [None] * len(known)
        for i, r in zip(search, self(emb[search], [words[i] for i in search]) if search else []):
            out[i] = r
        for i, nb in zip(rest, self._nearest(emb[rest], None, self.k)[2] if rest else []):
            out[i] = Readable(known[i], 1.0, nb, {})
        return out

    def __call__(self, emb: np.ndarray, words: Sequence[Sequence[str]] | None = None) -> list[Readable]:
        """``emb`` (n, 384) predicted embeddings; ``words[i]``: image i's confident words, most probable first."""
        emb, words, pooled, idx = self._nearest(emb, words, self.pool)
        neighbors = [nb[: self.k] for nb in pooled]
        cands: list[dict[str, float]] = [dict(nb) for nb in pooled]
        for row in idx:  # bank prompts come with their (float32) embeddings: never encoded
            for j in row[row >= 0]:
                self._cache[self.bank.prompts[j]] = self._exact[self.bank.prompts[j]] = self.bank.emb[j]
        pending = [dict.fromkeys([_join("", w)] * bool(w) + [_join(p, w) for p, _ in nb if w])
                   for nb, w in zip(neighbors, words)]
        self._score(pending, emb, cands)
        if self.rounds > 0:
            phrases, pvecs = self._phrase_pool(emb, pooled)
            beams = [sorted(c, key=c.get, reverse=True)[: self.beam] for c in cands]
            for _ in range(self.rounds):
                self._embed([t for bs in beams for b in bs for t in [b, *_cuts(b)]])
                pending = [dict.fromkeys(t for b in bs for t in self._moves(b, emb[i], phrases[i], pvecs[i])
                                         if t and t != b) for i, bs in enumerate(beams)]
                self._score(pending, emb, cands)
                new_beams = [sorted(c, key=c.get, reverse=True)[: self.beam] for c in cands]
                if new_beams == beams:
                    break
                beams = new_beams
        tops = [sorted(c, key=c.get, reverse=True)[: self.rescore] for c in cands]
        todo = list(dict.fromkeys(t for ts in tops for t in ts if t not in self._exact))
        self._exact.update(zip(todo, encode_fast(todo, self.model, bf16=False)))
        out = []
        for i, (nb, c, ts) in enumerate(zip(neighbors, cands, tops)):
            c.update((t, float(self._exact[t] @ emb[i])) for t in ts)
            best = max(ts, key=c.get)
            out.append(Readable(best, c[best], nb, c))
        if len(self._cache) > 50_000:
            self._cache.clear()
            self._exact.clear()
        return out
