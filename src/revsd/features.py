"""Frozen-backbone features: extracted once (batched, ``inference_mode``, ``channels_last``, decoding in worker
threads) and cached on disk under ``working/features/<backbone>/`` so reruns and other stages reuse them.

Cache key per image: ``image_id | file size | mtime_ns | decode version`` (an edited file, or one that
``open_rgb`` now decodes differently, is re-extracted). Each extraction call adds one shard ``shard-<hash>.npz``
(keys, feats, valid, errors), written atomically; readers merge all shards.
Unreadable images are reported (``FeatureSet.errors``), marked invalid (``valid == False``) and never dropped.
Images are preprocessed as the backbone's spec says (``spec.preprocess``, see ``revsd.transforms``); ``meta.json``
records it, and a cache made with other preprocessing is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from revsd import paths
from revsd.artifacts import atomic_path, read_json, write_json
from revsd.backbones import Backbone, create_backbone, fuse_conv_bn, get_spec
from revsd.images import image_key
from revsd.transforms import iter_image_batches, to_batch


# --- cache ----------------------------------------------------------------------------------------------------

@dataclass
class FeatureSet:
    ids: np.ndarray  # (n,) str, in the requested order
    feats: np.ndarray  # (n, D) float32; zeros where invalid
    valid: np.ndarray  # (n,) bool
    errors: dict[str, str] = field(default_factory=dict)  # image_id -> message for invalid rows


def cache_name(backbone: str, pretrained: bool = True, tiny: bool = False, weights: str = "") -> str:
    """``<backbone>[-tiny][-random][-w<hash of the local weights path>]``."""
    local = "-w" + hashlib.sha1(str(Path(weights).resolve()).encode()).hexdigest()[:8] if weights and pretrained \
        else ""
    return backbone + ("-tiny" if tiny else "") + ("" if pretrained or tiny else "-random") + local


def cache_dir(backbone: str, pretrained: bool = True, tiny: bool = False, weights: str = "") -> Path:
    return paths.working_dir() / "features" / cache_name(backbone, pretrained, tiny, weights)


def _check_preprocess(directory: Path, preprocess: dict) -> None:
    meta = directory / "meta.json"
    saved = read_json(meta).get("preprocess") if meta.exists() else None
    if saved is not None and saved != preprocess:
        raise ValueError(f"{directory} holds features made with other preprocessing ({saved}, now {preprocess}): "
                         "delete that folder to re-extract")


def read_cache(directory: Path) -> dict[str, tuple[np.ndarray, bool, str]]:
    """key -> (feature, valid, error) merged over all shards."""
    out: dict[str, tuple[np.ndarray, bool, str]] = {}
    for shard in sorted(directory.glob("shard-*.npz")):
        with np.load(shard, allow_pickle=False) as z:
            for k, f, v, e in zip(z["keys"].tolist(), z["feats"], z["valid"], z["errors"].tolist()):
                out[k] = (f, bool(v), e)
    return out


def _write_shard(directory: Path, keys: list[str], feats: np.ndarray, valid: np.ndarray, errors: list[str]) -> Path:
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    path = directory / f"shard-{digest}.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype=str), feats=feats.astype(np.float32), valid=valid,
                     errors=np.array(errors, dtype=str))
    return path


@torch.inference_mode()
def compute_features(backbone: Backbone, image_paths, image_ids=None, batch_size: int = 32, num_workers: int = 2,
                     device: str = "cpu", progress: bool = True):
    """Features for images (no cache): returns ``(feats (n, D), valid (n,), errors list[str])``."""
    from tqdm.auto import tqdm

    spec = backbone.spec
    backbone = backbone.to(device).eval().to(memory_format=torch.channels_last)
    image_paths = list(image_paths)
    n = len(image_paths)
    feats = np.zeros((n, backbone.feature_dim), np.float32)
    valid = np.zeros(n, bool)
    errors = [""] * n
    bar = tqdm(total=n, desc=f"features {backbone.name}", unit="img", disable=not progress)
    starts = range(0, n, batch_size)
    path_batches = [image_paths[s:s + batch_size] for s in starts]
    pp = backbone.preprocess
    for s, (arrays, errs) in zip(starts, iter_image_batches(path_batches, pp, num_workers)):
        ok = [i for i, a in enumerate(arrays) if a is not None]
        for i, e in enumerate(errs):
            errors[s + i] = e
        if ok:
            x = to_batch([arrays[i] for i in ok], pp.mean, pp.std, device)
            rows = [s + i for i in ok]
            if spec.needs_context:
                ids = [image_ids[r] if image_ids is not None else Path(image_paths[r]).stem for r in rows]
                ctx = spec.context_fn(ids, [image_paths[r] for r in rows], tiny=backbone.tiny, device=device,
                                      weights=backbone.weights)
                out = backbone(x, ctx)
            else:
                out = backbone(x)
            feats[rows] = out.float().cpu().numpy()
            valid[rows] = True
        bar.update(len(arrays))
    bar.close()
    return feats, valid, errors


def extract(backbone: str, image_ids, image_paths, pretrained: bool = True, tiny: bool = False,
            batch_size: int = 32, num_workers: int = 2, device: str = "cpu", progress: bool = True,
            weights: str = "") -> FeatureSet:
    """Cached features for ``image_ids`` (in order); only images missing from the cache are computed.
    ``weights``: a local checkpoint file for a hub-backed backbone (see ``backbones.create_backbone``)."""
    ids = np.asarray(image_ids).astype(str)
    paths_ = [str(p) for p in image_paths]
    if len(ids) != len(paths_):
        raise ValueError(f"extract: {len(ids)} ids but {len(paths_)} paths")
    directory = cache_dir(backbone, pretrained, tiny, weights)
    directory.mkdir(parents=True, exist_ok=True)
    preprocess = get_spec(backbone).preprocessing(tiny).to_dict()
    _check_preprocess(directory, preprocess)
    keys = [image_key(i, p) for i, p in zip(ids, paths_)]
    cache = read_cache(directory)
    todo = sorted({k: j for j, k in enumerate(keys) if k not in cache}.values())
    if todo:
        model = fuse_conv_bn(create_backbone(backbone, pretrained=pretrained, tiny=tiny, weights=weights).eval())
        f, v, e = compute_features(model, [paths_[j] for j in todo], [ids[j] for j in todo], batch_size,
                                   num_workers, device, progress)
        _write_shard(directory, [keys[j] for j in todo], f, v, e)
        write_json(directory / "meta.json", {"backbone": backbone, "pretrained": pretrained, "tiny": tiny,
                                             "feature_dim": int(f.shape[1]), "image_size": model.image_size,
                                             "preprocess": preprocess, "weights": weights})
        for j, row in enumerate(todo):
            cache[keys[row]] = (f[j], bool(v[j]), e[j])
    feats = np.stack([cache[k][0] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)
    valid = np.array([cache[k][1] for k in keys], bool)
    errors = {i: cache[k][2] for i, k in zip(ids.tolist(), keys) if not cache[k][1]}
    return FeatureSet(ids, feats, valid, errors)
