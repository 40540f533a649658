"""BLIP captions of images, computed once per image and cached on disk (the ``unet_enc`` backbone's text context).

Cache: ``<cache_dir>/<blip id>.jsonl``, one ``{"key", "image_id", "caption"}`` per line, keyed like the feature
cache (``image_id|file size|mtime_ns``: an edited image is captioned again); appended and fsync'ed per batch; a
torn last line (crash mid-write) is ignored on reading, so the cache is never corrupt. BLIP loads lazily (only
when a caption is missing) from :func:`revsd.weights.locate` (``blip_weights``: a transformers folder; else
``$REVSD_WEIGHTS/blip-image-captioning-base/``; else the hub id through its local cache).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch

from revsd import paths
from revsd.images import ImageError, image_key, open_rgb
from revsd.weights import locate

BLIP_ID = "Salesforce/blip-image-captioning-base"
TINY_BLIP_ID = "tiny-random-blip"


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def tiny_blip(seed: int = 0):
    """A tiny random-init BLIP captioner (processor, model) built offline."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, \
        BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "painting", "photo", "portrait", "of",
             "the", "woman", "man", "city", "night", "red", "blue", "forest", "castle", "art", "dog", "cat"]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.txt").write_text("\n".join(words) + "\n")
        tok = BertTokenizer.from_pretrained(d, bos_token="[DEC]")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, encoder_hidden_size=16,
                         bos_token_id=5, sep_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(cfg)
    return proc, model.eval()


def load_blip(blip_id: str = BLIP_ID, weights: str = ""):
    """(processor, model) from a local transformers folder or the hub id (see the module docstring)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    src = locate("blip", weights, hub=blip_id)
    where = src.require()
    try:
        return BlipProcessor.from_pretrained(where), BlipForConditionalGeneration.from_pretrained(where).eval()
    except OSError as e:
        raise OSError(f"could not load BLIP from {where!r} ({e}); "
                      f"{src.hint or 'check that folder (BlipForConditionalGeneration.save_pretrained)'}; "
                      "or tiny=True for an offline smoke run") from e


class Captioner:
    """``captions(image_ids, image_paths) -> list[str]``: cached BLIP captions (unreadable images → "")."""

    def __init__(self, blip_id: str = BLIP_ID, weights: str = "", cache_dir: str | Path | None = None,
                 tiny: bool = False, device: str | torch.device = "cpu", batch_size: int = 16,
                 max_new_tokens: int = 30):
        self.tiny, self.weights, self.device = tiny, weights, torch.device(device)
        self.blip_id = TINY_BLIP_ID if tiny else blip_id
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.cache_path = Path(cache_dir or paths.working_dir() / "captions") / f"{slug(self.blip_id)}.jsonl"
        self._cache: dict[str, str] | None = None
        self._blip = None
        self.blip_calls = 0  # captioning batches run (the cache keeps it at 0 on a second pass)

    def cached(self) -> dict[str, str]:
        """image key → caption, read once from the jsonl (torn or old-format lines skipped)."""
        if self._cache is None:
            self._cache = {}
            if self.cache_path.exists():
                for line in self.cache_path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                        self._cache[str(row["key"])] = str(row["caption"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # torn/garbled line: recomputed on demand
        return self._cache

    def _append(self, rows: list[tuple[str, str, str]]) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"key": k, "image_id": i, "caption": c}) + "\n" for k, i, c in rows)
        with open(self.cache_path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _captioner(self):
        if self._blip is None:
            proc, model = tiny_blip() if self.tiny else load_blip(self.blip_id, self.weights)
            self._blip = (proc, model.to(self.device))
        return self._blip

    @torch.inference_mode()
    def _caption_batch(self, paths_: Sequence[str | Path]) -> list[str | None]:
        proc, model = self._captioner()
        images, ok = [], []
        for p in paths_:
            try:
                images.append(open_rgb(p))
                ok.append(True)
            except ImageError as e:
                warnings.warn(f"caption skipped: {e}")
                ok.append(False)
        caps = iter([])
        if images:
            pix = proc(images=images, return_tensors="pt").pixel_values.to(self.device)
            ids = model.generate(pixel_values=pix, max_new_tokens=self.max_new_tokens)
            caps = iter(c.strip() for c in proc.batch_decode(ids, skip_special_tokens=True))
            self.blip_calls += 1
        return [next(caps) if good else None for good in ok]

    def captions(self, image_ids: Sequence[str], image_paths: Sequence[str | Path], keys: Sequence[str] = (),
                 progress: bool = False) -> list[str]:
        """Captions for the images, computing and caching the missing ones; ``keys`` default to image_key."""
        cache = self.cached()
        ids = [str(i) for i in image_ids]
        keys = list(keys) or [image_key(i, p) for i, p in zip(ids, image_paths)]
        todo = list({k: (k, i, str(p)) for k, i, p in zip(keys, ids, image_paths) if k not in cache}.values())
        starts = range(0, len(todo), self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="BLIP captions", unit="batch")
        for s in starts:
            chunk = todo[s:s + self.batch_size]
            caps = self._caption_batch([p for _, _, p in chunk])
            new = [(k, i, c) for (k, i, _), c in zip(chunk, caps) if c is not None]
            if new:
                self._append(new)
                cache.update({k: c for k, _, c in new})
        return [cache.get(k, "") for k in keys]

    def to(self, device) -> "Captioner":
        self.device = torch.device(device)
        if self._blip is not None:
            self._blip = (self._blip[0], self._blip[1].to(self.device))
        return self
