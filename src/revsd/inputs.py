"""Batches of table rows for 03_train: cached backbone features (frozen mode) or decoded images (finetune).

Images are preprocessed as the backbone's spec says (``revsd.transforms``), the same way the feature cache and
the predictor do it. Invalid images are excluded from batches and listed in ``Inputs.errors``.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial

import numpy as np
import torch

from revsd import features, imagecache, paths
from revsd.backbones import get_spec
from revsd.transforms import iter_image_batches, pil_to_array, to_batch


class Inputs:
    """Batches for table rows: cached features (frozen) or decoded images (finetune). Invalid images are
    excluded from batches and listed in ``errors`` (image_id -> message).

    ``cfg`` is a ``revsd.train.TrainConfig`` (mode, backbone, pretrained, tiny, weights, num_workers)."""

    def __init__(self, cfg, targetset, rows: np.ndarray, labels, device: str):
        self.cfg, self.ts, self.labels, self.device = cfg, targetset, labels, device
        t = targetset.table
        self.ids = t["image_id"].astype(str).to_numpy()
        self.paths = t["image_path"].astype(str).to_numpy()  # absolute: targets.load resolves them
        self.spec = get_spec(cfg.backbone)
        self.preprocess = self.spec.preprocessing(cfg.tiny)
        self.valid = np.ones(len(t), bool)
        self.errors: dict[str, str] = {}
        self.feats = self.cache = None
        if cfg.mode == "finetune" and getattr(cfg, "image_cache", False):
            self.cache, self.cache_row = self._image_cache(np.unique(rows))
        if cfg.mode == "frozen":
            rows = np.unique(rows)
            fs = features.extract(cfg.backbone, self.ids[rows], self.paths[rows], cfg.pretrained, cfg.tiny,
                                  batch_size=64, num_workers=cfg.num_workers, device=device, weights=cfg.weights)
            self.feats = np.zeros((len(t), fs.feats.shape[1]), np.float32)
            self.feats[rows] = fs.feats
            self.valid[rows] = fs.valid
            self.errors.update(fs.errors)
            self.dim = fs.feats.shape[1]

    def _image_cache(self, rows: np.ndarray):
        """Pixels of ``rows`` decoded and preprocessed once (``revsd.imagecache``), and each table row's cache row."""
        pp = self.preprocess
        pp_id = json.dumps(pp.to_dict(), sort_keys=True)
        name = f"{self.cfg.backbone}{'-tiny' if self.cfg.tiny else ''}-{pp.input_size}-" + \
            hashlib.sha1(pp_id.encode()).hexdigest()[:8]  # one folder per preprocessing
        cache = imagecache.build(paths.working_dir() / "imagecache" / name, self.ids[rows], self.paths[rows],
                                 partial(pil_to_array, pp=pp), preprocess_id=pp_id,
                                 shape=(pp.input_size, pp.input_size, 3))
        where = np.full(len(self.ids), -1, dtype=np.int64)
        where[rows] = cache.rows(self.ids[rows], self.paths[rows])
        return cache, where

    def _cached_batches(self, row_batches):
        """``(arrays, errors)`` per batch, as ``iter_image_batches`` yields them, read from the image cache."""
        for rows in row_batches:
            got = [self.cache[int(self.cache_row[r])] for r in rows]
            yield [a if ok else None for a, ok, _ in got], ["" if ok else e for _, ok, e in got]

    def _dict(self, rows, x, context=None) -> dict:
        rows = np.asarray(rows)
        d = {"x": x, "targets": torch.from_numpy(self.ts.emb[rows]), "index": rows}
        if self.labels is not None:
            d["labels"] = torch.from_numpy(self.labels[rows].toarray().astype(np.float32))
        if context is not None:
            d["context"] = context
        return d

    def batches(self, row_batches, keep_empty: bool = False):
        """Yield batch dicts (``index`` = table rows) for lists of table rows, skipping invalid images; a batch left
        with no rows is skipped, or yielded as None with ``keep_empty`` (then there is one item per batch)."""
        if self.feats is not None:
            for rows in row_batches:
                rows = np.asarray([r for r in rows if self.valid[r]], dtype=np.int64)
                if len(rows):
                    yield self._dict(rows, torch.from_numpy(self.feats[rows]))
                elif keep_empty:
                    yield None
            return
        pp = self.preprocess
        row_batches = [np.asarray(r, dtype=np.int64) for r in row_batches]
        loaded = self._cached_batches(row_batches) if self.cache is not None else \
            iter_image_batches([self.paths[r] for r in row_batches], pp, self.cfg.num_workers)
        for rows, (arrays, errs) in zip(row_batches, loaded):
            for r, e in zip(rows, errs):
                if e:
                    self.valid[r] = False
                    self.errors[self.ids[r]] = e
            keep = [i for i, a in enumerate(arrays) if a is not None]
            if not keep:
                if keep_empty:
                    yield None
                continue
            rows = rows[keep]
            x = to_batch([arrays[i] for i in keep], pp.mean, pp.std, self.device)
            ctx = None
            if self.spec.needs_context:
                ctx = self.spec.context_fn(self.ids[rows], self.paths[rows], tiny=self.cfg.tiny, device=self.device,
                                          weights=self.cfg.weights)
            yield self._dict(rows, x, ctx)

    def chunks(self, rows: np.ndarray, size: int = 256):
        return self.batches([rows[s:s + size] for s in range(0, len(rows), size)])
