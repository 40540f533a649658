"""The Stable Diffusion U-Net encoder as a white-box backbone (paper §3), plus cached BLIP-caption context.

image in [-1, 1] → frozen SD VAE encoder (latent mean × scaling factor) → the U-Net's ``conv_in`` + time
embedding at a fixed timestep + down blocks + mid block, with cross-attention on the SD text encoder's hidden
states of the image's BLIP caption → global average pool of the mid output (optionally concatenated with the
pooled output of every down block) → ``(B, feature_dim)``.

SD v1.x weights by default (``CompVis/stable-diffusion-v1-4``): DiffusionDB was generated with SD v1, so its
images live in that model's latent space. The authors' released code uses an SD 2 config (OpenCLIP text encoder)
and timestep 0 on clean latents; ``model_id="stabilityai/stable-diffusion-2-base"`` gives that variant here.
``tiny=True`` builds small random-init configs of every part offline (tests, smoke runs); ``pretrained=False`` with
an SD v1 id builds the full-size architecture random-init offline (benchmarks); everything else loads from the
Hugging Face hub (or its local cache).

Weight naming: the U-Net parts live under the ``unet.`` attribute with diffusers' own names
(``unet.conv_in.*``, ``unet.time_embedding.*``, ``unet.down_blocks.*``, ``unet.mid_block.*``), so a saved model
(whatever prefix a wrapper adds, e.g. ``backbone.net.unet.down_blocks.0...``) loads back into a full
``UNet2DConditionModel`` with :func:`extract_encoder_state` (used by ``revsd generate``).
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
from torch import nn

from revsd import paths
from revsd.images import ImageError, open_rgb

SD_MODEL_ID = "CompVis/stable-diffusion-v1-4"
BLIP_ID = "Salesforce/blip-image-captioning-base"
TINY_BLIP_ID = "tiny-random-blip"
TINY_IMAGE_SIZE = 32  # tiny VAE downsamples ×2 → 16×16 latents
ENCODER_MODULES = ("conv_in", "time_embedding", "down_blocks", "mid_block")  # trained parts, diffusers names
UNET_PREFIX = "unet."
TEXT_MAX_LENGTH = 77
SD_PARTS = ("vae", "unet", "text_encoder", "tokenizer")


# ---------------------------------------------------------------- SD parts (hub or tiny random-init offline)

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


def load_sd_parts(model_id: str = SD_MODEL_ID, tiny: bool = False, pretrained: bool = True,
                  parts: Sequence[str] = SD_PARTS) -> dict:
    """The SD parts named in ``parts`` from the hub (``subfolder=`` layout of an SD repo), or tiny offline.

    ``pretrained=False`` with an SD v1.x id: the full-size architecture, random-init, offline."""
    if tiny or (not pretrained and model_id in SD_V1_IDS):
        return random_sd_parts(TINY if tiny else SD_V1, parts=parts)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    classes = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer}
    out = {}
    for name in parts:
        cls = classes[name]
        try:
            if pretrained or name == "tokenizer":
                out[name] = cls.from_pretrained(model_id, subfolder=name)
            else:
                out[name] = cls.from_config(cls.load_config(model_id, subfolder=name))
        except OSError as e:
            raise OSError(f"could not load {name!r} of {model_id!r} from the Hugging Face hub or its cache ({e}); "
                          "download it once online (huggingface-cli download "
                          f"{model_id}) or use tiny=True for an offline smoke run") from e
    return out


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
    """``forward(x, context) -> (B, feature_dim)``; x: images in [-1, 1]; context: (B, 77, text dim)."""

    def __init__(self, vae, unet, timestep: int = 0, pool_down: bool = False, image_size: int = 512):
        super().__init__()
        self.vae_encoder = vae.encoder.requires_grad_(False).eval()
        self.vae_quant_conv = (vae.quant_conv or nn.Identity()).requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.unet = _UNetDown(unet)
        self.timestep, self.pool_down = int(timestep), bool(pool_down)
        widths = list(unet.config.block_out_channels)
        self.feature_dim = widths[-1] + (sum(widths) if pool_down else 0)
        self.context_dim = int(unet.config.cross_attention_dim)
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
        mean, _logvar = self.vae_quant_conv(self.vae_encoder(x)).chunk(2, dim=1)
        return mean * self.scaling_factor

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"UNetEncoder needs a caption context of shape (B, L, {self.context_dim}); got "
                             f"{None if context is None else tuple(context.shape)} (see make_context_fn)")
        return self.unet(self.encode_latents(x), context.to(x.dtype), self.timestep, self.pool_down)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained U-Net weights with diffusers' names (``down_blocks.0...``), loadable into a full U-Net."""
        return {k[len(UNET_PREFIX):]: v for k, v in self.state_dict().items() if k.startswith(UNET_PREFIX)}


def build_unet_encoder(pretrained: bool = True, tiny: bool = False, model_id: str = SD_MODEL_ID,
                       timestep: int = 0, pool_down: bool = False) -> UNetEncoder:
    """SD VAE (frozen) + U-Net down/mid blocks. ``tiny``: random-init offline config (32×32 images)."""
    parts = load_sd_parts(model_id, tiny=tiny, pretrained=pretrained, parts=("vae", "unet"))
    vae_scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    return UNetEncoder(parts["vae"], parts["unet"], timestep=timestep, pool_down=pool_down,
                       image_size=parts["unet"].config.sample_size * vae_scale)


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

def _slug(s: str) -> str:
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


class CaptionContext:
    """BLIP captions (computed once per image id, cached) encoded by SD's text encoder → (B, 77, dim).

    Cache: ``<cache_dir>/<blip id>.jsonl``, one ``{"image_id", "caption"}`` per line, appended and fsync'ed per
    batch; a torn last line (crash mid-write) is ignored on reading, so the cache is never corrupt.
    Models load lazily: BLIP only when a caption is missing.
    """

    def __init__(self, blip_id: str = BLIP_ID, model_id: str = SD_MODEL_ID, cache_dir: str | Path | None = None,
                 tiny: bool = False, device: str | torch.device = "cpu", batch_size: int = 16,
                 max_new_tokens: int = 30):
        self.tiny, self.model_id, self.device = tiny, model_id, torch.device(device)
        self.blip_id = TINY_BLIP_ID if tiny else blip_id
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.cache_path = Path(cache_dir or paths.working_dir() / "captions") / f"{_slug(self.blip_id)}.jsonl"
        self._cache: dict[str, str] | None = None
        self._blip = None
        self._text = None
        self.blip_calls = 0  # number of captioning batches run (the cache keeps it at 0 on a second pass)

    # -- captions
    def _load_cache(self) -> dict[str, str]:
        if self._cache is None:
            self._cache = {}
            if self.cache_path.exists():
                for line in self.cache_path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                        self._cache[str(row["image_id"])] = str(row["caption"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # torn/garbled line: recomputed on demand
        return self._cache

    def _append(self, rows: dict[str, str]) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"image_id": k, "caption": v}) + "\n" for k, v in rows.items())
        with open(self.cache_path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _captioner(self):
        if self._blip is None:
            if self.tiny:
                proc, model = tiny_blip()
            else:
                from transformers import BlipForConditionalGeneration, BlipProcessor

                try:
                    proc = BlipProcessor.from_pretrained(self.blip_id)
                    model = BlipForConditionalGeneration.from_pretrained(self.blip_id).eval()
                except OSError as e:
                    raise OSError(f"could not load BLIP {self.blip_id!r} ({e}); download it once online or pass "
                                  "tiny=True for an offline smoke run") from e
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

    def captions(self, image_ids: Sequence[str], image_paths: Sequence[str | Path], progress: bool = False
                 ) -> list[str]:
        """Captions for the images, computing and caching the missing ones (unreadable images → "")."""
        cache = self._load_cache()
        ids = [str(i) for i in image_ids]
        todo = list(dict.fromkeys((i, str(p)) for i, p in zip(ids, image_paths) if i not in cache))
        starts = range(0, len(todo), self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="BLIP captions", unit="batch")
        for s in starts:
            chunk = todo[s:s + self.batch_size]
            caps = self._caption_batch([p for _, p in chunk])
            new = {i: c for (i, _), c in zip(chunk, caps) if c is not None}
            if new:
                self._append(new)
                cache.update(new)
        return [cache.get(i, "") for i in ids]

    # -- text encoder
    def _text_encoder(self):
        if self._text is None:
            parts = load_sd_parts(self.model_id, tiny=self.tiny, parts=("text_encoder", "tokenizer"))
            self._text = (parts["tokenizer"], parts["text_encoder"].requires_grad_(False).eval().to(self.device))
        return self._text

    @torch.no_grad()  # not inference_mode: the context feeds cross-attention inside an autograd graph
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        tok, enc = self._text_encoder()
        ids = tok(list(captions), padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return enc(ids)[0]

    def __call__(self, image_ids: Sequence[str], image_paths: Sequence[str | Path]) -> torch.Tensor:
        return self.encode(self.captions(image_ids, image_paths))

    def to(self, device) -> "CaptionContext":
        self.device = torch.device(device)
        if self._blip is not None:
            self._blip = (self._blip[0], self._blip[1].to(self.device))
        if self._text is not None:
            self._text = (self._text[0], self._text[1].to(self.device))
        return self


def make_context_fn(tiny: bool = False, cache_dir: str | Path | None = None, model_id: str = SD_MODEL_ID,
                    blip_id: str = BLIP_ID, device: str | torch.device = "cpu") -> CaptionContext:
    """The ``context_fn(image_ids, image_paths) -> (B, 77, dim)`` that the ``unet_enc`` backbone needs."""
    return CaptionContext(blip_id=blip_id, model_id=model_id, cache_dir=cache_dir, tiny=tiny, device=device)
