"""The CLIP route of the image-conditioned prior: image–text similarity to the bank prompts, CLIP Interrogator's way.

For a frozen ``clip_vit_h14`` run the pooled features the run already computed are CLIP image embeddings (the
visual tower's projected output), so no classifier is needed: the text tower of the same open_clip checkpoint
encodes every bank prompt once (cached on disk), and each image gets

    sims_j = cos(feat, clip_text_j)                 over all bank prompts j
    top    = the k prompts with the highest sims    (k = ``K``)
    w      = softmax(scale · sims_top)              (scale = the checkpoint's own logit scale, 100 for LAION ViT-H)
    cond   = normalize(Σ_j w_j · minilm_j)          (the bank's MiniLM embeddings, ``bank.emb``)
    prior  = normalize(beta · cond + (1 − beta) · broad)

``scale``: CLIP was trained so that ``softmax(logit_scale · cos)`` over captions is its distribution for an image;
over the top ``k`` prompts it is that distribution renormalised, which keeps a clear best match dominant and
near-ties shared, without a free temperature. ``K`` and ``BETA`` are uncalibrated: no CLIP ViT-H weights exist
offline here, so they are set by analogy with ``revsd.prior`` (its TOP = 20; beta between its 0.3 and an even
mix) and should be tuned on real SD images with the weights present (as ``bench/bench_prior.py`` did for the
classifier route).

Text-embedding cache: ``working/banks/clip_text/<key>.npy`` (+ ``<key>.json``: logit scale, count, checkpoint),
``key`` = sha256 of the architecture, the tiny flag, the checkpoint's content stamp (size and the sha256 of its
first and last MiB: a torch zip ends with every entry's CRC-32) and the bank's prompts in order; a changed bank or
checkpoint gets a new key, so it is recomputed, never read stale.

The checkpoint is only ever read from disk: the run's ``weights`` file, ``$REVSD_WEIGHTS`` or a file already in
the Hugging Face cache (``revsd.weights.locate``); nothing is downloaded, and without one there is no CLIP prior
(``ClipPrior.for_run`` returns ``None`` and the caller falls back to ``revsd.prior.ImagePrior``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from revsd import paths
from revsd.domain import _unit, bank_prior, guard
from revsd.retrieval import PromptBank

K, BETA = 20, 0.5
ARCH, BACKBONE = "ViT-H-14", "clip_vit_h14"
BATCH = 256  # prompts per text-tower forward
STAMP_BYTES = 1 << 20  # bytes hashed at each end of the checkpoint for its content stamp


# --- the checkpoint, from disk only ----------------------------------------------------------------------------

def checkpoint_file(spec) -> str:
    """The local open_clip checkpoint of a run (``revsd.inference.ModelSpec``), or ``""`` when it is not on this
    machine: the run's ``weights`` (or ``$REVSD_WEIGHTS``), else the hub's file if already in the HF cache. Tiny
    runs count only with a ``weights`` file (a tiny random-init tower has no matching text tower). Never
    touches the network."""
    from revsd import weights as W

    if spec.tiny and not spec.weights:
        return ""
    src = W.locate(BACKBONE, spec.weights)
    if src.local:
        return src.source if src.found else ""
    if spec.tiny:
        return ""
    from huggingface_hub import try_to_load_from_cache

    for f in W.MODELS[BACKBONE].hub_files:
        hit = try_to_load_from_cache(W.MODELS[BACKBONE].hub, f, cache_dir=W.hub_cache_dir())
        if isinstance(hit, str) and Path(hit).is_file():
            return hit
    return ""


def checkpoint_stamp(file: str | Path) -> str:
    """A content stamp of a checkpoint file: its size and the sha256 of its first and last ``STAMP_BYTES``."""
    path = Path(file)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(STAMP_BYTES))
        if size > STAMP_BYTES:
            f.seek(max(STAMP_BYTES, size - STAMP_BYTES))
            h.update(f.read())
    return f"{size}:{h.hexdigest()[:32]}"


def load_clip(file: str | Path, tiny: bool = False):
    """(model, tokenizer) of an open_clip ViT-H-14 checkpoint file (``tiny``: of ``backbones.TINY_CLIP``)."""
    import open_clip

    from revsd.backbones import TINY_CLIP

    cfg = TINY_CLIP if tiny else {}
    with torch.random.fork_rng(devices=[]):
        model = open_clip.create_model(ARCH, pretrained=str(file), **cfg)
    model.visual = None  # the run's features stand for the image tower; only the text tower is used here
    ctx = cfg["text_cfg"]["context_length"] if tiny else None
    return model.eval(), open_clip.get_tokenizer(ARCH, context_length=ctx)


def tokenize(tokenizer, texts: Sequence[str], vocab_size: int) -> torch.Tensor:
    """Token ids for the text tower. A tiny test tower's vocabulary is smaller than CLIP's BPE: ids are folded
    into it (end-of-text kept as the largest id, so open_clip's argmax pooling still finds it)."""
    ids = tokenizer(list(texts))
    if vocab_size >= tokenizer.vocab_size:
        return ids
    folded = torch.where(ids > 0, 1 + ids % (vocab_size - 2), ids)
    return torch.where(ids == tokenizer.eot_token_id, torch.full_like(ids, vocab_size - 1), folded)


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = BATCH, device: str | None = None,
                 progress: bool = True) -> np.ndarray:
    """(n, d) float32 L2-normalised CLIP text embeddings, in batches with a progress bar."""
    from tqdm.auto import tqdm

    from revsd.device import resolve_device

    device = resolve_device(device)
    model = model.to(device)
    vocab = model.token_embedding.num_embeddings
    out = []
    starts = range(0, len(texts), batch_size)
    for s in tqdm(starts, desc="CLIP text embeddings of the bank", unit="batch", disable=not progress or
                  len(starts) < 2):
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.startswith("cuda")):
            e = model.encode_text(tokenize(tokenizer, texts[s:s + batch_size], vocab).to(device))
        out.append(_unit(e.float().cpu().numpy()))
    dim = int(model.text_projection.shape[-1]) if model.text_projection is not None else 0
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


# --- the cache -------------------------------------------------------------------------------------------------

def cache_key(prompts: Sequence[str], file: str | Path, tiny: bool = False) -> str:
    h = hashlib.sha256(json.dumps([ARCH, bool(tiny), checkpoint_stamp(file), len(prompts)]).encode())
    for p in prompts:
        h.update(p.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()[:24]


def cache_path(prompts: Sequence[str], file: str | Path, tiny: bool = False) -> Path:
    """``working/banks/clip_text/<key>.npy``; ``<key>.json`` beside it (see the module doc)."""
    return paths.working_dir() / "banks" / "clip_text" / f"{cache_key(prompts, file, tiny)}.npy"


def text_embeddings(prompts: Sequence[str], file: str | Path, tiny: bool = False, batch_size: int = BATCH,
                    device: str | None = None, progress: bool = True) -> tuple[np.ndarray, float]:
    """(CLIP text embeddings (n, d) of the prompts, the checkpoint's logit scale), from the cache or computed
    once (loading the checkpoint only then) and cached."""
    from revsd.artifacts import read_json, save_npy, write_json

    prompts = list(prompts)
    f = cache_path(prompts, file, tiny)
    meta = f.with_suffix(".json")
    if f.exists() and meta.exists():
        emb, info = np.load(f, allow_pickle=False), read_json(meta)
        if len(emb) == len(prompts) == info.get("count"):
            return emb, float(info["logit_scale"])
    print(f"CLIP prior: encoding {len(prompts):,} bank prompts with the text tower of {file} (once; cached in "
          f"{f.parent})", file=sys.stderr, flush=True)
    model, tokenizer = load_clip(file, tiny)
    scale = float(model.logit_scale.exp().item())
    emb = encode_texts(model, tokenizer, prompts, batch_size, device, progress)
    del model
    save_npy(f, emb)
    write_json(meta, {"arch": ARCH, "tiny": bool(tiny), "checkpoint": str(file), "count": len(prompts),
                      "dim": int(emb.shape[1]), "logit_scale": scale})
    return emb, scale


def _load_errors() -> tuple:
    """What loading a broken or foreign checkpoint file raises (torch zip/pickle, safetensors, open_clip)."""
    import pickle
    import zipfile

    errors = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)
    try:
        from safetensors import SafetensorError
    except ImportError:
        return errors
    return errors + (SafetensorError,)


# --- the prior -------------------------------------------------------------------------------------------------

class ClipPrior:
    """``prior(images, feats) -> (n, 384)``: the CLIP-similarity prior of each image (see the module doc).

    ``text_emb``: (N, d) CLIP text embeddings of ``bank.prompts`` (unit rows); ``logit_scale``: the checkpoint's;
    ``scale`` overrides it (softmax temperature 1/scale). ``K``/``BETA`` are uncalibrated (no CLIP weights
    offline here)."""

    uses_run_features = True  # reads the run's own pooled CLIP image embeddings

    def __init__(self, text_emb: np.ndarray, bank: PromptBank, logit_scale: float = 100.0, k: int = K,
                 beta: float = BETA, scale: float | None = None, broad: np.ndarray | None = None):

        self.text_emb = np.ascontiguousarray(_unit(text_emb))
        if len(self.text_emb) != len(bank):
            raise ValueError(f"ClipPrior: {len(self.text_emb)} text embeddings for a bank of {len(bank)} prompts")
        self.bank, self.k, self.beta = bank, int(k), float(beta)
        self.scale = float(scale if scale is not None else logit_scale)
        self.broad = _unit(broad if broad is not None else bank_prior(bank.emb))

    @classmethod
    def for_run(cls, spec, bank: PromptBank, k: int = K, beta: float = BETA, scale: float | None = None,
                device: str | None = None, progress: bool = True) -> ClipPrior | None:
        """The prior of a frozen, pretrained ``clip_vit_h14`` run whose checkpoint is on this machine; ``None``
        for any other run, without a local checkpoint, or when it does not load (said on stderr)."""
        if spec is None or spec.backbone != BACKBONE or spec.mode != "frozen" or not spec.pretrained:
            return None
        try:
            file = checkpoint_file(spec)
        except (OSError, ValueError, KeyError) as e:
            print(f"CLIP prior: no local checkpoint ({e})", file=sys.stderr)
            return None
        if not file:
            return None
        try:
            emb, logit_scale = text_embeddings(bank.prompts, file, bool(spec.tiny), device=device, progress=progress)
        except _load_errors() as e:  # a broken or foreign checkpoint file
            print(f"CLIP prior: could not use {file} ({type(e).__name__}: {e}); falling back", file=sys.stderr)
            return None
        return cls(emb, bank, logit_scale, k, beta, scale)

    def neighbours(self, feats: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(idx (n, k) bank rows by falling cosine to each image feature, softmax weights (n, k))."""
        x = _unit(np.atleast_2d(np.asarray(feats, dtype=np.float32)))
        if x.shape[1] != self.text_emb.shape[1]:
            raise ValueError(f"ClipPrior: image features of size {x.shape[1]}, CLIP text embeddings of size "
                             f"{self.text_emb.shape[1]}: the run's backbone is not this checkpoint's image tower")
        k = min(self.k, len(self.text_emb))
        idx = np.zeros((len(x), k), np.int64)
        sims = np.zeros((len(x), k), np.float32)
        for s in range(0, len(x), batch_size):
            c = x[s:s + batch_size] @ self.text_emb.T
            part = np.argpartition(-c, k - 1, axis=1)[:, :k] if k < c.shape[1] else np.tile(np.arange(k), (len(c), 1))
            order = np.argsort(-np.take_along_axis(c, part, 1), axis=1, kind="stable")
            idx[s:s + batch_size] = np.take_along_axis(part, order, 1)
            sims[s:s + batch_size] = np.take_along_axis(c, idx[s:s + batch_size], 1)
        z = self.scale * (sims - sims[:, :1])
        w = np.exp(z)
        return idx, (w / w.sum(1, keepdims=True)).astype(np.float32)

    def __call__(self, images=None, feats: np.ndarray | None = None) -> np.ndarray:
        if feats is None:
            raise ValueError("the CLIP prior reads the run's own CLIP image embeddings: pass feats")
        if not len(feats):
            return np.zeros((0, self.bank.emb.shape[1]), np.float32)
        idx, w = self.neighbours(feats)
        return guard(np.einsum("nk,nkd->nd", w, self.bank.emb[idx]), self.beta, self.broad)  # as prior.mix
