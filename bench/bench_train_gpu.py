"""Fine-tuning throughput on a GPU: images/s and model-FLOPs utilisation (MFU) of each paper backbone.

Each backbone (full size, random init, offline: ``revsd.backbones.create_backbone(name, pretrained=False)``) gets
a linear head to the 384-d target and trains on random pixels at its input size: global batch 64 (micro-batches
with gradient accumulation when 64 does not fit: the micro-batch halves on out-of-memory), bf16 autocast,
channels-last, fused AdamW, optionally ``--compile`` and ``--grad-checkpointing``. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on one micro-batch (forward + backward; for ``unet_enc`` this
includes the frozen VAE encoder, which 03 runs at every step until its latents are cached); MFU = counted
FLOPs/s over the GPU's dense bf16 peak (table below, or ``--peak-tflops``). From the measured rates it projects
the paper profile's GPU-hours (images x epochs x runs per backbone, read from ``profiles/paper.yaml``) on 1
and on 8 GPUs (ideal data-parallel scaling).

    python bench/bench_train_gpu.py [--backbones clip_vit_h14 vit_b16 swin_l unet_enc] [--steps 10] [--compile]
    python bench/bench_train_gpu.py --tiny --steps 2 --batch 4 --out ""   # CPU dry run of the script (tiny models)

Prints a table and writes ``bench/results/train_gpu.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BACKBONES = ("clip_vit_h14", "vit_b16", "swin_l", "unet_enc")
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "T4": 65}  # dense
PAPER_IMAGES = 670_000
EMB_DIM = 384


def gpu_peak_tflops(name: str) -> float | None:
    """Dense bf16 tensor-core peak of a GPU by its name (T4: fp16, it has no bf16); None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS.items():  # longest names first where they share a prefix (L40S, L40, L4)
        if key in name:
            return float(tflops)
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Model(torch.nn.Module):
    def __init__(self, name: str, tiny: bool):
        super().__init__()
        from revsd.backbones import create_backbone

        self.backbone = create_backbone(name, pretrained=False, tiny=tiny)
        self.head = torch.nn.Linear(self.backbone.feature_dim, EMB_DIM)
        self.context_dim = getattr(self.backbone.net, "context_dim", 0)

    def forward(self, x, context=None):
        return self.head(self.backbone(x, context))


def make_batch(model: Model, micro: int, size: int, device: str):
    x = (torch.rand(micro, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(micro, 77, model.context_dim, device=device) if model.context_dim else None
    return x, ctx, F.normalize(torch.randn(micro, EMB_DIM, device=device), dim=1)


def train_step(model, opt, batches, device: str) -> None:
    """One optimizer step of the global batch: bf16 autocast forward/backward per micro-batch, then AdamW."""
    for x, ctx, y in batches:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = 1 - F.cosine_similarity(model(x, ctx).float(), y).mean()
        (loss / len(batches)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def count_flops(model, batch) -> float:
    """FLOPs of one forward + backward on one micro-batch."""
    from torch.utils.flop_counter import FlopCounterMode

    x, ctx, y = batch
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            loss = 1 - F.cosine_similarity(model(x, ctx).float(), y).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def bench_backbone(name: str, args, device: str) -> dict:
    from revsd.backbones import get_spec

    size = get_spec(name).input_size(args.tiny)
    model = Model(name, args.tiny).to(device).to(memory_format=torch.channels_last).train()
    ckpt = model.backbone.set_grad_checkpointing(True) if args.grad_checkpointing else False
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW not available on this device/build
        opt = torch.optim.AdamW(params, lr=1e-5)
    micro = args.batch
    while True:
        try:
            batches = [make_batch(model, micro, size, device) for _ in range(args.batch // micro)]
            flops = count_flops(model, batches[0]) / micro  # per image
            step = torch.compile(model) if args.compile else model
            for _ in range(args.warmup):
                train_step(step, opt, batches, device)
            break
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise
            micro //= 2
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        train_step(step, opt, batches, device)
    sync(device)
    img_s = args.batch * args.steps / (time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    n_params = sum(p.numel() for p in params)
    del model, opt, batches, step
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"backbone": name, "size": size, "params_m": n_params / 1e6, "micro": micro, "accum": args.batch // micro,
            "grad_ckpt": ckpt, "img_s": img_s, "gflop_per_img": flops / 1e9, "tflops": flops * img_s / 1e12,
            "peak_gib": peak}


def paper_runs(profile: str = "paper") -> dict[str, tuple[int, int, bool]]:
    """backbone -> (training runs, epochs per run, eval pass per epoch) of the paper profile's 03/05 steps."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "src" / "revsd" / "profiles" / f"{profile}.yaml"
    out: dict[str, tuple[int, int, bool]] = {}
    for step in yaml.safe_load(path.read_text())["steps"]:
        p = step.get("params", {})
        if step["notebook"] in ("03_train", "05_curriculum") and "backbone" in p:
            runs, _, _ = out.get(p["backbone"], (0, 0, False))
            out[p["backbone"]] = (runs + 1, int(p.get("epochs", 10)), p.get("sample_cosines", "eval") == "eval")
    return out


def projection(rates: dict[str, float], images: int = PAPER_IMAGES, profile: str = "paper") -> list[dict]:
    """GPU-hours of the paper profile's training from measured img/s (an eval pass per epoch counted as 1/3 of
    a training pass: forward only); 8 GPUs assume ideal data-parallel scaling."""
    rows = []
    for name, (runs, epochs, eval_pass) in paper_runs(profile).items():
        if name in rates:
            hours = images * epochs * runs * (4 / 3 if eval_pass else 1) / rates[name] / 3600
            rows.append({"backbone": name, "runs": runs, "epochs": epochs, "hours_1gpu": hours, "hours_8gpu": hours / 8})
    if rows:
        rows.append({"backbone": "total", "runs": sum(r["runs"] for r in rows), "epochs": "",
                     "hours_1gpu": sum(r["hours_1gpu"] for r in rows), "hours_8gpu": sum(r["hours_8gpu"] for r in rows)})
    return rows


def render(results: list[dict], proj: list[dict], peak: float | None, device_name: str, args) -> str:
    mfu = (lambda r: f"{r['tflops'] / peak:.1%}") if peak else (lambda r: "n/a")
    lines = [(f"device: {device_name}; dense bf16 peak: {f'{peak:.0f} TFLOPS' if peak else 'unknown (--peak-tflops)'}; "
              f"global batch {args.batch}, bf16 autocast, channels-last, fused AdamW, compile={args.compile}, "
              f"grad checkpointing={args.grad_checkpointing}{', TINY models' if args.tiny else ''}"), "",
             "| backbone | input | params (M) | micro x accum | img/s | GFLOP/img (fwd+bwd) | TFLOPS | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['size']} | {r['params_m']:.4g} | {r['micro']} x {r['accum']} | {r['img_s']:.1f} | "
              f"{r['gflop_per_img']:.4g} | {r['tflops']:.3g} | {mfu(r)} | {r['peak_gib']:.1f} |" for r in results]
    lines += ["", f"Paper profile projection ({PAPER_IMAGES:,} images x epochs x runs, + an eval pass per epoch):", "",
              "| backbone | runs | epochs | GPU-hours on 1 GPU | hours on 8 GPUs |", "|---|---|---|---|---|"]
    lines += [f"| {p['backbone']} | {p['runs']} | {p['epochs']} | {p['hours_1gpu']:.1f} | {p['hours_8gpu']:.1f} |"
              for p in proj]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--batch", type=int, default=64, help="global batch (micro-batches accumulate to it)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak of the device (overrides the table)")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU dry run of this script)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_gpu.md"), help="'' writes nothing")
    args = ap.parse_args(argv)
    old = os.environ.get("REVSD_WORKING")
    os.environ["REVSD_WORKING"] = tempfile.mkdtemp(prefix="bench-train-gpu-")  # latent caches etc. stay out of working/
    try:
        return _run(args, argv if argv is not None else sys.argv[1:])
    finally:  # callable from a test: leave the environment as it was
        if old is None:
            os.environ.pop("REVSD_WORKING", None)
        else:
            os.environ["REVSD_WORKING"] = old


def _run(args, argv: list[str]) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("no GPU: full-size models on CPU would take hours; use --tiny for a dry run", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = args.peak_tflops or (gpu_peak_tflops(device_name) if device == "cuda" else None)
    results = []
    for name in args.backbones:
        r = bench_backbone(name, args, device)
        results.append(r)
        print(f"{name}: {r['img_s']:.1f} img/s, {r['tflops']:.3g} TFLOPS"
              + (f", MFU {r['tflops'] / peak:.1%}" if peak else ""), flush=True)
    proj = projection({r["backbone"]: r["img_s"] for r in results})
    text = render(results, proj, peak, device_name, args)
    print(text)
    if args.out:
        from revsd.artifacts import write_text

        cmd = "python bench/bench_train_gpu.py " + " ".join(argv)
        write_text(args.out, f"# Fine-tuning throughput and MFU per backbone\n\n`{cmd.strip()}`\n\n{text}")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
