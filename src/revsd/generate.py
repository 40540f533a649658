"""``revsd generate``: Stable Diffusion with the U-Net encoder trained for prompt prediction (paper §4).

For every prompt, two images from the same seed with DDIM (50 steps by default):

- ``original.png``: the original SD U-Net at every step;
- ``ours.png``: the original U-Net for the first denoising step, then the U-Net whose encoder (``conv_in``,
  time embedding, down blocks, mid block) carries the trained ``unet_enc`` weights for the remaining steps.

The trained weights come from a 03_train run dir (``model.safetensors`` + ``model.json``): every key of the form
``<any prefix>unet.{conv_in,time_embedding,down_blocks,mid_block}.*`` (what :class:`revsd.unet_encoder.UNetEncoder`
saves, e.g. ``backbone.net.unet.down_blocks.0...``) is loaded into a copy of the pipeline's U-Net. The run must be
a ``mode="finetune"`` run (frozen runs save only the heads); ``"tiny": true`` in ``model.json`` selects the tiny
pipeline.

Writes ``<out>/pairs/<pair_id>/{original,ours}.png`` and ``<out>/manifest.jsonl`` + ``manifest.csv`` (pair_id,
prompt, seed, original, ours; image paths relative to ``<out>``), the input of ``revsd study serve``. Pairs already
on disk are kept (an interrupted run resumes). ``--tiny`` runs a random-init tiny pipeline offline (smoke test).

Weights: ``--sd-weights FOLDER`` (a diffusers SD folder: a full pipeline folder with ``model_index.json``, or just
``unet/ vae/ text_encoder/ tokenizer/``), else ``$REVSD_WEIGHTS/stable-diffusion-v1-4/``, else the hub id through
its local cache (:func:`revsd.weights.locate`).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from revsd.artifacts import atomic_path, save_csv, write_text
from revsd.sd_parts import SD_MODEL_ID, SD_PARTS, load_sd_parts, tiny_sd_parts
from revsd.unet_encoder import extract_encoder_state
from revsd.weights import locate

MANIFEST_COLUMNS = ["pair_id", "prompt", "seed", "original", "ours"]


class SwapUNet(nn.Module):
    """Dispatches each denoising step to ``original`` (steps < ``swap_from``) or ``swapped`` (the rest).

    The pipeline advances ``step`` through :meth:`on_step_end` (its ``callback_on_step_end``); ``history``
    records which U-Net ran at each call. With ``enabled=False`` only the original runs (the baseline image).
    """

    def __init__(self, original: nn.Module, swapped: nn.Module, swap_from: int = 1):
        super().__init__()
        self.original, self.swapped, self.swap_from = original, swapped, swap_from
        self.reset(True)

    def reset(self, enabled: bool) -> None:
        self.enabled, self.step, self.history = enabled, 0, []

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.step = step + 1
        return {}

    # what diffusers' pipeline reads from its unet
    @property
    def config(self):
        return self.original.config

    @property
    def dtype(self) -> torch.dtype:
        return self.original.dtype

    @property
    def device(self) -> torch.device:
        return self.original.device

    def forward(self, *args, **kwargs):
        use_swapped = self.enabled and self.step >= self.swap_from
        self.history.append("swapped" if use_swapped else "original")
        return (self.swapped if use_swapped else self.original)(*args, **kwargs)


def read_run_meta(run_dir: str | Path) -> dict:
    """A run dir's ``model.json`` (``{}`` if absent); refuses runs that are not a fine-tuned ``unet_enc``."""
    meta_path = Path(run_dir) / "model.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("backbone", "unet_enc") != "unet_enc":
        raise ValueError(f"{meta_path}: backbone is {meta['backbone']!r}; revsd generate needs a unet_enc run")
    if meta.get("mode", "finetune") != "finetune":
        raise ValueError(f"{meta_path}: mode is {meta['mode']!r}, so only the heads were saved; train unet_enc "
                         "with mode='finetune' to get trained U-Net weights")
    return meta


def load_run_encoder(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The trained U-Net encoder weights (diffusers names) from a run dir's ``model.safetensors``."""
    from safetensors.torch import load_file

    read_run_meta(run_dir)
    weights = Path(run_dir) / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found: pass a finished unet_enc run dir of 03_train "
                                "(working/03_train/<exp>/<run>/)")
    try:
        return extract_encoder_state(load_file(str(weights)))
    except KeyError as e:
        raise KeyError(f"{weights}: {e.args[0]}") from e


def swapped_unet(original: nn.Module, encoder_state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``original`` whose encoder weights are replaced by ``encoder_state`` (all keys must fit)."""
    unet = copy.deepcopy(original)
    own = unet.state_dict()
    unknown = [k for k in encoder_state if k not in own]
    bad = [k for k in encoder_state if k in own and own[k].shape != encoder_state[k].shape]
    if unknown or bad:
        raise ValueError(f"trained encoder does not fit this U-Net ({len(unknown)} unknown keys e.g. "
                         f"{unknown[:2]}, {len(bad)} shape mismatches e.g. {bad[:2]}): use the --model-id the "
                         "encoder was trained from (or --tiny for a tiny run)")
    unet.load_state_dict({k: v.to(own[k].dtype) for k, v in encoder_state.items()}, strict=False)
    return unet.eval()


def pipeline_from_parts(parts: dict, device: str = "cpu", dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline (DDIM with SD v1's schedule, no safety checker) from vae/unet/text parts."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def build_pipeline(model_id: str = SD_MODEL_ID, tiny: bool = False, device: str = "cpu",
                   safety_checker: bool = True, sd_weights: str = ""):
    """StableDiffusionPipeline with a DDIM scheduler (fp16 on CUDA) from a local SD folder or the hub (module
    docstring); ``tiny``: offline random-init."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if tiny:
        return pipeline_from_parts(tiny_sd_parts(), device)
    kw = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    src = locate("unet", sd_weights, hub=model_id)
    where = Path(src.require()).parent if src.local else model_id
    if src.local and not (where / "model_index.json").exists():  # parts only: no safety checker to load
        if safety_checker:
            raise ValueError(f"{where}: no model_index.json, so no safety checker to load; pass "
                             "--no-safety-checker, or use a full diffusers pipeline folder (save_pretrained)")
        return pipeline_from_parts(load_sd_parts(model_id, parts=SD_PARTS, weights=sd_weights), device, dtype)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(where, dtype=dtype, **kw)
    except OSError as e:
        raise OSError(f"could not load SD from {str(where)!r} ({e}); {src.hint or 'check that folder'}; or use "
                      "--tiny for an offline smoke run") from e
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def install_swap(pipe, encoder_state: dict[str, torch.Tensor], swap_from: int = 1) -> SwapUNet:
    """Replace ``pipe.unet`` by a :class:`SwapUNet` (original + trained-encoder copy); returns it."""
    swap = SwapUNet(pipe.unet, swapped_unet(pipe.unet, encoder_state), swap_from=swap_from)
    pipe.unet = swap
    return swap


def generate_pair(pipe, prompt: str, seed: int, steps: int = 50, guidance: float = 7.5):
    """(original, ours) PIL images from the same seed; ``pipe.unet`` must be a :class:`SwapUNet`."""
    swap: SwapUNet = pipe.unet
    images = []
    for enabled in (False, True):
        swap.reset(enabled)
        gen = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same images on any device
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                   callback_on_step_end=swap.on_step_end)
        images.append(out.images[0])
    return tuple(images)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from .txt (one per line) or .csv/.parquet/.jsonl with a ``prompt`` column."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} not found")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines()]
    else:
        readers = {".csv": pd.read_csv, ".parquet": pd.read_parquet,
                   ".jsonl": lambda p: pd.read_json(p, lines=True)}
        if path.suffix not in readers:
            raise ValueError(f"{path}: use .txt (one prompt a line) or .csv/.parquet/.jsonl with a 'prompt' column")
        df = readers[path.suffix](path)
        if "prompt" not in df.columns:
            raise ValueError(f"{path}: no 'prompt' column (columns: {list(df.columns)})")
        prompts = df["prompt"].fillna("").astype(str).str.strip().tolist()
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def write_manifest(out_dir: Path, rows: list[dict]) -> Path:
    path = out_dir / "manifest.jsonl"
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    save_csv(out_dir / "manifest.csv", pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    return path


def run(prompts: list[str], run_dir: str | Path, out_dir: str | Path, steps: int = 50, seed: int = 0,
        guidance: float = 7.5, model_id: str = SD_MODEL_ID, device: str = "cpu", tiny: bool = False,
        safety_checker: bool = True, pipe=None, sd_weights: str = "") -> Path:
    """Generate every pair (prompt i uses seed ``seed + i``); returns the manifest path."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    encoder_state = load_run_encoder(run_dir)
    tiny = tiny or bool(read_run_meta(run_dir).get("tiny", False))  # a tiny run only fits the tiny pipeline
    pipe = pipe or build_pipeline(model_id, tiny=tiny, device=device, safety_checker=safety_checker,
                                  sd_weights=sd_weights)
    install_swap(pipe, encoder_state)
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc="pairs", unit="pair")):
        pair_id = f"p{i:05d}"
        row = {"pair_id": pair_id, "prompt": prompt, "seed": seed + i,
               "original": f"pairs/{pair_id}/original.png", "ours": f"pairs/{pair_id}/ours.png"}
        targets = [out_dir / row["original"], out_dir / row["ours"]]
        if not all(t.exists() for t in targets):
            for img, target in zip(generate_pair(pipe, prompt, seed + i, steps, guidance), targets):
                with atomic_path(target) as tmp:
                    img.save(tmp, format="PNG")
        rows.append(row)
        write_manifest(out_dir, rows)
    return out_dir / "manifest.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="revsd generate", description="SD generation with the trained U-Net "
                                 "encoder (paper §4): image pairs (original, ours) + a manifest for revsd study")
    ap.add_argument("--prompts", required=True, help=".txt (one a line) or .csv/.parquet/.jsonl with 'prompt'")
    ap.add_argument("--unet-encoder", required=True, help="unet_enc run dir (model.safetensors + model.json)")
    ap.add_argument("--out", required=True, help="output folder (pairs/ + manifest.jsonl/csv)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i for both images")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--model-id", default=SD_MODEL_ID, help="the SD model the encoder was trained from")
    ap.add_argument("--sd-weights", default="", help="local diffusers SD folder (default: $REVSD_WEIGHTS/"
                    "stable-diffusion-v1-4, else the hub cache)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-safety-checker", action="store_true", help="disable SD's NSFW safety checker")
    ap.add_argument("--tiny", action="store_true", help="tiny random-init pipeline, offline (smoke test)")
    a = ap.parse_args(argv)
    manifest = run(read_prompts(a.prompts), a.unet_encoder, a.out, steps=a.steps, seed=a.seed,
                   guidance=a.guidance, model_id=a.model_id, device=a.device, tiny=a.tiny,
                   safety_checker=not a.no_safety_checker, sd_weights=a.sd_weights)
    print(f"wrote {manifest}  (next: revsd study serve --pairs {manifest})")
    return 0
