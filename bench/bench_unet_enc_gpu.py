"""GPU bench of the ``unet_enc`` backbone and ``revsd generate`` on the full-size SD v1 architecture.

Random-init weights built offline (``revsd.unet_encoder.SD_V1``: the exact v1.4 parameter counts), so it runs on a
machine without hub access; speed and memory do not depend on the weights. Measures at 512×512:
- encoder forward (frozen feature extraction, bf16 autocast, inference mode): images/s;
- encoder train step (bf16 autocast, AdamW on the 349M trainable U-Net encoder params): images/s, peak GiB;
- the same train step with the VAE latents read from the on-disk latent cache (every epoch after the first);
- generation (fp16, DDIM, CFG 7.5): seconds per pair (original + ours), and the swap schedule on CUDA.

    python bench/bench_unet_enc_gpu.py [--batch 8 16 32] [--steps 50] [--pairs 2]
    python bench/bench_unet_enc_gpu.py --tiny --batch 2 --steps 3 --pairs 1   # CPU dry run of the script

Prints a table and writes bench/results/unet_enc_gpu.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from revsd import generate, unet_encoder as ue


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def timed(fn, n: int, warmup: int = 2) -> float:
    """Seconds per call (synchronised mean over ``n`` calls after ``warmup``)."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def bench_encoder(batch_sizes: list[int], arch: dict, size: int, device: str) -> list[dict]:
    parts = ue.random_sd_parts(arch, parts=("vae", "unet"))
    enc = ue.UNetEncoder(parts["vae"], parts["unet"]).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-6)
    enc.latent_cache = ue.LatentCache(tempfile.mkdtemp(prefix="latents-"))
    rows = []
    for bs in batch_sizes:
        x = torch.rand(bs, 3, size, size, device=device) * 2 - 1
        ctx = torch.randn(bs, ue.TEXT_MAX_LENGTH, enc.context_dim, device=device)
        cached = ue.UNetContext(ctx, [f"bench-{bs}-{i}" for i in range(bs)])

        def forward():
            with torch.inference_mode(), torch.autocast(device, torch.bfloat16):
                enc.eval()(x, ctx)

        def train_step(context=ctx):
            with torch.autocast(device, torch.bfloat16):
                loss = enc.train()(x, context).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            fwd = timed(forward, 5)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step = timed(train_step, 5)
            peak = peak_gib()
            step_cached = timed(lambda: train_step(cached), 5)  # the warm-up calls fill the cache
            rows.append({"batch": bs, "forward img/s": bs / fwd, "train img/s": bs / step,
                         "train img/s cached": bs / step_cached, "train peak GiB": peak})
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": bs, "forward img/s": float("nan"), "train img/s": float("nan"),
                         "train img/s cached": float("nan"), "train peak GiB": float("inf")})
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    return rows


def bench_generate(steps: int, n_pairs: int, arch: dict, device: str) -> dict:
    parts = ue.random_sd_parts(arch)
    trained = {k: v.clone() + 1e-3 * torch.randn_like(v) for k, v in
               ue.UNetEncoder(parts["vae"], parts["unet"]).encoder_state_dict().items()}
    pipe = generate.pipeline_from_parts(parts, device, torch.float16 if device == "cuda" else torch.float32)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    swap = generate.install_swap(pipe, trained)
    generate.generate_pair(pipe, "warm up", seed=0, steps=3)
    sync()
    t0 = time.perf_counter()
    for i in range(n_pairs):
        a = generate.generate_pair(pipe, f"a portrait of a woman, oil painting {i}", seed=i, steps=steps)
    sync()
    per_pair = (time.perf_counter() - t0) / n_pairs
    schedule_ok = swap.history == ["original"] + ["swapped"] * (steps - 1)
    b = generate.generate_pair(pipe, f"a portrait of a woman, oil painting {n_pairs - 1}", seed=n_pairs - 1,
                               steps=steps)
    same = float(np.abs(np.asarray(a[0], float) - np.asarray(b[0], float)).max())
    return {"steps": steps, "s/pair": round(per_pair, 3), "image": a[0].size, "swap schedule ok": schedule_ok,
            "original rerun max abs diff (0-255)": same,
            "peak GiB": round(peak_gib(), 2)}


def to_md(enc_rows: list[dict], gen: dict, title: str, command: str) -> str:
    lines = [f"# {title}", "",
             "| batch | forward img/s (bf16) | train img/s (bf16, AdamW) | train img/s, cached latents | "
             "train peak GiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['forward img/s']:.1f} | {r['train img/s']:.1f} | {r['train img/s cached']:.1f} "
              f"| {r['train peak GiB']:.1f} |" for r in enc_rows]
    lines += ["", "| generation | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in gen.items()]
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny architecture (CPU dry run of this script)")
    ap.add_argument("--out", default=None, help="default bench/results/unet_enc_gpu.md (tiny: not written)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.tiny:
        raise SystemExit("needs a CUDA GPU (or --tiny for a CPU dry run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    arch, size = (ue.TINY, ue.TINY_IMAGE_SIZE) if a.tiny else (ue.SD_V1, 512)
    title = (f"unet_enc on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'} "
             f"({'tiny' if a.tiny else 'SD v1'} architecture, {size}×{size}, random init)")
    command = "python bench/bench_unet_enc_gpu.py " + " ".join(sys.argv[1:])
    md = to_md(bench_encoder(a.batch, arch, size, device), bench_generate(a.steps, a.pairs, arch, device), title,
               command.strip())
    print(md)
    out = a.out or (None if a.tiny else Path(__file__).parent / "results" / "unet_enc_gpu.md")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(md)


if __name__ == "__main__":
    main()
