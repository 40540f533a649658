"""Stable Diffusion parts (VAE, U-Net, text encoder, tokenizer): local folders, the hub, or random-init offline.

Where a part loads from is decided by :func:`revsd.weights.locate` (an explicit SD folder, then
``$REVSD_WEIGHTS/stable-diffusion-v1-4/<part>/``, then the hub id through its local cache). ``tiny=True`` builds
small random-init configs of every part offline (tests, smoke runs); ``pretrained=False`` with an SD v1 id builds
the full-size architecture random-init offline (benchmarks).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from revsd.weights import locate

SD_MODEL_ID = "CompVis/stable-diffusion-v1-4"
TINY_IMAGE_SIZE = 32  # tiny VAE downsamples ×2 → 16×16 latents
TEXT_MAX_LENGTH = 77
SD_PARTS = ("vae", "unet", "text_encoder", "tokenizer")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-unicode table (for the tiny byte-level CLIP vocabulary)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer():
    """A character-level CLIPTokenizer (byte vocabulary, no merges) built offline from files it writes."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        Path(d, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=TEXT_MAX_LENGTH)


# SD v1.x architecture (v1-1 … v1-5 share it), for offline random-init builds of the full-size model
SD_V1_IDS = ("CompVis/stable-diffusion-v1-1", "CompVis/stable-diffusion-v1-2", "CompVis/stable-diffusion-v1-3",
             "CompVis/stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5",
             "stable-diffusion-v1-5/stable-diffusion-v1-5")
SD_V1 = {
    "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280)),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, hidden_act="quick_gelu"),
}
TINY = {
    "unet": dict(sample_size=TINY_IMAGE_SIZE // 2, layers_per_block=1, block_out_channels=(8, 16),
                 norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, sample_size=TINY_IMAGE_SIZE,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "text_encoder": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
}


def random_sd_parts(arch: dict, seed: int = 0, parts: Sequence[str] = SD_PARTS) -> dict:
    """Random-init SD parts of an architecture (``TINY`` or ``SD_V1``), offline; same seed → same weights.

    The tokenizer is the offline character-level one (real SD tokenization needs the hub's vocabulary)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    build = {
        "unet": lambda: UNet2DConditionModel(in_channels=4, out_channels=4, **arch["unet"]),
        "vae": lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **arch["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**{
            "vocab_size": len(tokenizer), "max_position_embeddings": TEXT_MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **arch["text_encoder"]})).eval(),
        "tokenizer": lambda: tokenizer,
    }
    out = {}
    with torch.random.fork_rng(devices=[]):
        for name in parts:
            torch.manual_seed(seed)
            out[name] = build[name]()
    return out


def tiny_sd_parts(seed: int = 0) -> dict:
    """Tiny random-init SD v1-shaped parts: vae, unet, text_encoder, tokenizer (32×32 images)."""
    return random_sd_parts(TINY, seed)


def _classes() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
            "tokenizer": CLIPTokenizer}


def load_sd_parts(model_id: str = SD_MODEL_ID, tiny: bool = False, pretrained: bool = True,
                  parts: Sequence[str] = SD_PARTS, weights: str = "") -> dict:
    """The SD parts named in ``parts``: each from a local diffusers/transformers folder when
    :func:`revsd.weights.locate` finds one (``weights``: an SD folder with unet/, vae/, text_encoder/,
    tokenizer/; else ``$REVSD_WEIGHTS``), else from the hub repo ``model_id`` (``subfolder=`` layout) or its cache.

    ``tiny``: tiny random-init offline. ``pretrained=False`` with an SD v1.x id: full-size random-init offline."""
    if tiny or (not pretrained and model_id in SD_V1_IDS and not weights):
        return random_sd_parts(TINY if tiny else SD_V1, parts=parts)
    classes, out = _classes(), {}
    for name in parts:
        cls, src = classes[name], locate(name, weights, hub=model_id)
        where = src.require() if src.local else model_id
        kw = {} if src.local else {"subfolder": name}
        try:
            if pretrained or name == "tokenizer":
                out[name] = cls.from_pretrained(where, **kw)
            else:
                out[name] = cls.from_config(cls.load_config(where, **kw)) if name != "text_encoder" else \
                    cls(cls.config_class.from_pretrained(where, **kw))
        except OSError as e:
            fix = src.hint or ("check that folder (a save_pretrained folder of this part)" if src.local else
                               f"download it once online (hf download {model_id})")
            raise OSError(f"could not load SD {name!r} from {where!r} ({e}); {fix}; tiny=True for an offline "
                          "smoke run") from e
    return out
