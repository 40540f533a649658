"""Image preprocessing that travels with a backbone (timm ``pretrained_cfg`` style): decode, resize, normalise.

A :class:`Preprocess` (carried by ``revsd.backbones.BackboneSpec``) says how a picture becomes the backbone's
input: the input side, mean/std, the interpolation, the crop fraction and the resize mode. The feature cache,
fine-tuning and predict all go through :func:`pil_to_array` + :func:`to_batch` with the spec's ``Preprocess``, so
the three never disagree.

- ``resize_mode="shorter_crop"``: resize the shorter side to ``input_size / crop_pct``, centre-crop
  ``input_size`` (ImageNet/CLIP style; ``crop_pct=1`` crops only the longer side);
- ``resize_mode="squash"``: resize both sides to ``input_size``, ignoring the aspect ratio (SigLIP style).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from revsd.images import ImageError, open_rgb

RESIZE_MODES = ("shorter_crop", "squash")
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    input_size: int
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"  # a key of INTERPOLATIONS
    crop_pct: float = 1.0  # shorter_crop: the centre crop keeps this fraction of the resized shorter side
    resize_mode: str = "shorter_crop"  # shorter_crop | squash

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def pil_to_array(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Resize (and crop) a PIL image as ``pp`` says: uint8 (input_size, input_size, 3)."""
    size, resample = pp.input_size, INTERPOLATIONS[pp.interpolation]
    w, h = img.size
    if pp.resize_mode == "squash":
        gap = 3.0 if min(w, h) > 2 * size else None
        return np.asarray(img.resize((size, size), resample, reducing_gap=gap).convert("RGB"), dtype=np.uint8)
    short = size / pp.crop_pct
    s = short / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), resample, reducing_gap=3.0 if min(w, h) > 2 * short else None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)).convert("RGB"), dtype=np.uint8)


def load_array(path: str | Path, pp: Preprocess) -> np.ndarray:
    """Open with :func:`revsd.images.open_rgb` (raises :class:`ImageError`) and preprocess."""
    return pil_to_array(open_rgb(path), pp)


def to_batch(arrays: list[np.ndarray] | np.ndarray, mean, std, device="cpu", channels_last: bool = True
             ) -> torch.Tensor:
    """uint8 HWC arrays → normalised float (B, 3, H, W) on ``device`` (``channels_last`` memory format)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).to(device).permute(0, 3, 1, 2).float()
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def _load_or_error(path, pp: Preprocess):
    try:
        return load_array(path, pp), ""
    except ImageError as e:
        return None, str(e)


def iter_image_batches(path_batches, pp: Preprocess, num_workers: int = 2):
    """Yield ``(arrays, errors)`` per batch of paths; decoding/resizing runs in ``num_workers`` threads and the
    next batch is decoded while the current one is processed. ``arrays[i]`` is None where ``errors[i]`` says why."""
    path_batches = [list(b) for b in path_batches]
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        def submit(batch):
            return [pool.submit(_load_or_error, p, pp) for p in batch]

        pending = submit(path_batches[0]) if path_batches else None
        for i in range(len(path_batches)):
            futures = pending
            pending = submit(path_batches[i + 1]) if i + 1 < len(path_batches) else None
            results = [f.result() for f in futures]
            yield [r[0] for r in results], [r[1] for r in results]
