"""The Stable Diffusion U-Net encoder as a white-box backbone (paper §3), its caption context and latent cache.

image in [-1, 1] → frozen SD VAE encoder (latent mean × scaling factor) → the U-Net's ``conv_in`` + time
embedding at a fixed timestep + down blocks + mid block, with cross-attention on the SD text encoder's hidden
states of the image's BLIP caption → global average pool of the mid output (optionally concatenated with the
pooled output of every down block) → ``(B, feature_dim)``.

SD v1.x weights by default (``CompVis/stable-diffusion-v1-4``): DiffusionDB was generated with SD v1, so its
images live in that model's latent space. The authors' released code uses an SD 2 config (OpenCLIP text encoder)
and timestep 0 on clean latents; ``model_id="stabilityai/stable-diffusion-2-base"`` gives that variant here.
The parts load through :mod:`revsd.sd_parts` (``weights``/``sd_weights``: a local diffusers SD folder, else
``$REVSD_WEIGHTS``, else the hub cache); ``tiny=True`` builds them random-init offline.

Computed once, cached on disk (issue 12): BLIP captions (:mod:`revsd.captions`) and VAE latents (the VAE is
frozen). The context function returns a :class:`UNetContext` (caption states + each image's cache key, keyed like
the feature cache: ``image_id|size|mtime_ns``); the encoder then reads the latents of known images from
``working/latents/<vae>/`` and runs the VAE only on the others. Each cached latent stores a fingerprint of the
pixels it came from; pixels that no longer match (augmentation, changed preprocessing) are encoded again.
Latents are rounded to float16 whether fresh or cached, so a second epoch sees exactly what the first saw.

Weight naming: the U-Net parts live under the ``unet.`` attribute with diffusers' own names
(``unet.conv_in.*``, ``unet.time_embedding.*``, ``unet.down_blocks.*``, ``unet.mid_block.*``), so a saved model
(whatever prefix a wrapper adds, e.g. ``backbone.net.unet.down_blocks.0...``) loads back into a full
``UNet2DConditionModel`` with :func:`extract_encoder_state` (used by ``revsd generate``).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from revsd import paths
from revsd.artifacts import atomic_path
from revsd.captions import BLIP_ID, TINY_BLIP_ID, Captioner, image_key, slug, tiny_blip  # noqa: F401
from revsd.sd_parts import (SD_MODEL_ID, SD_PARTS, SD_V1, SD_V1_IDS, TEXT_MAX_LENGTH, TINY,  # noqa: F401
                            TINY_IMAGE_SIZE, load_sd_parts, random_sd_parts, tiny_clip_tokenizer, tiny_sd_parts)

ENCODER_MODULES = ("conv_in", "time_embedding", "down_blocks", "mid_block")  # trained parts, diffusers names
UNET_PREFIX = "unet."
LATENT_DTYPE = torch.float16  # stored and used latents (bf16 training computes them at lower precision anyway)


class UNetContext(NamedTuple):
    """What the context function gives the encoder: caption states (B, 77, dim) and the images' cache keys."""
    states: torch.Tensor
    keys: list


# ---------------------------------------------------------------- VAE latents, cached on disk

def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """(B, 3) float32 per image: mean pixel, and means weighted by horizontal and vertical ramps (flip-aware)."""
    x = x.detach().float()
    gy = torch.linspace(-1, 1, x.shape[-2], device=x.device).view(-1, 1)
    gx = torch.linspace(-1, 1, x.shape[-1], device=x.device)
    return torch.stack([x.mean((1, 2, 3)), (x * gx).mean((1, 2, 3)), (x * gy).mean((1, 2, 3))], 1).cpu()


class LatentCache:
    """One ``.npz`` per image key (latent float16 + pixel fingerprint) under ``directory``, written atomically
    (several processes may share it)."""

    def __init__(self, directory: str | Path, atol: float = 1e-4):
        self.directory, self.atol = Path(directory), atol
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        h = hashlib.sha1(key.encode()).hexdigest()
        return self.directory / h[:2] / f"{h}.npz"

    def get(self, key: str, fp: torch.Tensor) -> torch.Tensor | None:
        p = self.path(key)
        try:
            with np.load(p) as z:
                lat, old = z["latent"], z["fingerprint"]
        except (OSError, ValueError, KeyError):
            self.misses += 1
            return None
        if not np.allclose(old, fp.numpy(), atol=self.atol, rtol=0):
            warnings.warn(f"latent cache: the pixels of {key.split('|')[0]} changed since {p} was written "
                          "(augmentation or new preprocessing?); encoding it again")
            self.misses += 1
            return None
        self.hits += 1
        return torch.from_numpy(lat)

    def put(self, key: str, latent: torch.Tensor, fp: torch.Tensor) -> None:
        with atomic_path(self.path(key)) as tmp, open(tmp, "wb") as f:
            np.savez(f, latent=latent.detach().cpu().numpy(), fingerprint=fp.numpy())


# ---------------------------------------------------------------- the encoder

class _UNetDown(nn.Module):
    """The encoder half of a ``UNet2DConditionModel``, keeping diffusers' attribute names."""

    def __init__(self, unet):
        super().__init__()
        cfg = unet.config
        if getattr(unet, "class_embedding", None) is not None or cfg.addition_embed_type is not None:
            raise NotImplementedError("only SD 1.x/2.x-style U-Nets (no class/added embeddings) are supported")
        self.center_input_sample = bool(cfg.center_input_sample)
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.time_embed_act = unet.time_embed_act
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block

    def forward(self, latents, context, timestep: int, pool_down: bool) -> torch.Tensor:
        if self.center_input_sample:
            latents = 2 * latents - 1.0
        t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
        emb = self.time_embedding(self.time_proj(t).to(latents.dtype))
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        h = self.conv_in(latents)
        pooled = []
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            pooled.append(h.mean(dim=(2, 3)))
        h = self.mid_block(h, emb, encoder_hidden_states=context)
        return torch.cat([*pooled, h.mean(dim=(2, 3))] if pool_down else [h.mean(dim=(2, 3))], dim=1)


class UNetEncoder(nn.Module):
    """``forward(x, context) -> (B, feature_dim)``; x: images in [-1, 1]; context: a :class:`UNetContext` (latents
    cached by key when ``latent_cache`` is set) or a plain (B, 77, text dim) tensor."""

    def __init__(self, vae, unet, timestep: int = 0, pool_down: bool = False, image_size: int = 512,
                 latent_cache: LatentCache | None = None):
        super().__init__()
        self.vae_encoder = vae.encoder.requires_grad_(False).eval()
        self.vae_quant_conv = (vae.quant_conv or nn.Identity()).requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.unet = _UNetDown(unet)
        self.timestep, self.pool_down = int(timestep), bool(pool_down)
        widths = list(unet.config.block_out_channels)
        self.feature_dim = widths[-1] + (sum(widths) if pool_down else 0)
        self.context_dim = int(unet.config.cross_attention_dim)
        self.latent_cache = latent_cache
        self.vae_calls = 0  # VAE batches run (the latent cache keeps it at 0 from the second epoch)
        # timm-style input description for the data pipeline
        self.pretrained_cfg = {"input_size": (3, image_size, image_size), "mean": (0.5, 0.5, 0.5),
                               "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae_encoder.eval()  # frozen, always
        self.vae_quant_conv.eval()
        return self

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        self.vae_calls += 1
        mean, _logvar = self.vae_quant_conv(self.vae_encoder(x)).chunk(2, dim=1)
        return (mean * self.scaling_factor).to(LATENT_DTYPE)

    def latents(self, x: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """VAE latents of ``x`` (float16-rounded, in x's dtype): from the cache for known keys, else computed."""
        if self.latent_cache is None or not keys:
            return self.encode_latents(x).to(x.dtype)
        fps = fingerprint(x)
        out = [self.latent_cache.get(k, fp) for k, fp in zip(keys, fps)]
        todo = [i for i, lat in enumerate(out) if lat is None]
        if todo:
            fresh = self.encode_latents(x[todo])
            for i, lat in zip(todo, fresh):
                self.latent_cache.put(keys[i], lat, fps[i])
                out[i] = lat
        return torch.stack([lat.to(x.device, x.dtype) for lat in out])

    def forward(self, x: torch.Tensor, context) -> torch.Tensor:
        keys = None
        if isinstance(context, UNetContext):
            context, keys = context.states, context.keys
        if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"UNetEncoder needs a caption context of shape (B, L, {self.context_dim}); got "
                             f"{None if context is None else tuple(context.shape)} (see make_context_fn)")
        return self.unet(self.latents(x, keys), context.to(x.dtype), self.timestep, self.pool_down)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained U-Net weights with diffusers' names (``down_blocks.0...``), loadable into a full U-Net."""
        return {k[len(UNET_PREFIX):]: v for k, v in self.state_dict().items() if k.startswith(UNET_PREFIX)}


def latent_cache_dir(model_id: str = SD_MODEL_ID, tiny: bool = False, pretrained: bool = True, weights: str = "",
                     image_size: int = 512) -> Path:
    """``working/latents/<vae>-<size>/``: one folder per VAE weights and input size."""
    if tiny:
        name = "tiny"
    elif weights:
        name = "local-" + slug(str(Path(weights).resolve()))[-60:]
    else:
        name = slug(model_id) + ("" if pretrained else "-random")
    return paths.working_dir() / "latents" / f"{name}-{image_size}"


def build_unet_encoder(pretrained: bool = True, tiny: bool = False, model_id: str = SD_MODEL_ID,
                       timestep: int = 0, pool_down: bool = False, weights: str = "",
                       latent_cache: bool = True) -> UNetEncoder:
    """SD VAE (frozen) + U-Net down/mid blocks. ``tiny``: random-init offline config (32×32 images).
    ``weights``: a local diffusers SD folder (else $REVSD_WEIGHTS, else the hub cache). ``latent_cache``: keep
    the VAE latents of images seen with a :class:`UNetContext` under :func:`latent_cache_dir`."""
    parts = load_sd_parts(model_id, tiny=tiny, pretrained=pretrained, parts=("vae", "unet"), weights=weights)
    vae_scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    size = parts["unet"].config.sample_size * vae_scale
    cache = LatentCache(latent_cache_dir(model_id, tiny, pretrained, weights, size)) if latent_cache else None
    return UNetEncoder(parts["vae"], parts["unet"], timestep=timestep, pool_down=pool_down, image_size=size,
                       latent_cache=cache)


def extract_encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """From a saved model's state dict, the U-Net encoder weights under diffusers' names.

    Accepts any wrapper prefix before ``unet.`` (``backbone.unet.down_blocks.0...``, ``unet.mid_block...``).
    """
    pattern = re.compile(r"^(.*?)" + re.escape(UNET_PREFIX) + r"((?:" + "|".join(ENCODER_MODULES) + r")\..*)$")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = pattern.match(k)
        if m:
            found.setdefault(m.group(1), {})[m.group(2)] = v
    if not found:
        raise KeyError(f"no U-Net encoder weights (keys like '<prefix>{UNET_PREFIX}down_blocks.0...') in the "
                       "state dict: is this a unet_enc run?")
    if len(found) > 1:
        raise KeyError(f"several U-Net encoders in the state dict (prefixes {sorted(found)}); keep one")
    return next(iter(found.values()))


# ---------------------------------------------------------------- captions → text-encoder context

class CaptionContext:
    """``(image_ids, image_paths) -> UNetContext``: cached BLIP captions (:class:`revsd.captions.Captioner`)
    encoded by SD's text encoder → (B, 77, dim), plus each image's cache key for the latent cache."""

    def __init__(self, blip_id: str = BLIP_ID, model_id: str = SD_MODEL_ID, cache_dir: str | Path | None = None,
                 tiny: bool = False, device: str | torch.device = "cpu", batch_size: int = 16,
                 max_new_tokens: int = 30, sd_weights: str = "", blip_weights: str = ""):
        self.tiny, self.model_id, self.sd_weights, self.device = tiny, model_id, sd_weights, torch.device(device)
        self.captioner = Captioner(blip_id, blip_weights, cache_dir, tiny, device, batch_size, max_new_tokens)
        self._text = None

    def captions(self, image_ids, image_paths, keys=(), progress: bool = False) -> list[str]:
        return self.captioner.captions(image_ids, image_paths, keys, progress)

    def _text_encoder(self):
        if self._text is None:
            parts = load_sd_parts(self.model_id, tiny=self.tiny, parts=("text_encoder", "tokenizer"),
                                  weights=self.sd_weights)
            self._text = (parts["tokenizer"], parts["text_encoder"].requires_grad_(False).eval().to(self.device))
        return self._text

    @torch.no_grad()  # not inference_mode: the context feeds cross-attention inside an autograd graph
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        tok, enc = self._text_encoder()
        ids = tok(list(captions), padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return enc(ids)[0]

    def __call__(self, image_ids: Sequence[str], image_paths: Sequence[str | Path]) -> UNetContext:
        keys = [image_key(str(i), p) for i, p in zip(image_ids, image_paths)]
        return UNetContext(self.encode(self.captions(image_ids, image_paths, keys)), keys)

    def to(self, device) -> "CaptionContext":
        self.device = torch.device(device)
        self.captioner.to(device)
        if self._text is not None:
            self._text = (self._text[0], self._text[1].to(self.device))
        return self


def make_context_fn(tiny: bool = False, cache_dir: str | Path | None = None, model_id: str = SD_MODEL_ID,
                    blip_id: str = BLIP_ID, device: str | torch.device = "cpu", sd_weights: str = "",
                    blip_weights: str = "") -> CaptionContext:
    """The ``context_fn(image_ids, image_paths) -> UNetContext`` that the ``unet_enc`` backbone needs."""
    return CaptionContext(blip_id=blip_id, model_id=model_id, cache_dir=cache_dir, tiny=tiny, device=device,
                          sd_weights=sd_weights, blip_weights=blip_weights)
