"""Frozen feature-extraction throughput (images/s) of ``effnet_lite0`` on this machine, on the embedded sample.

Compares, in the same run and interleaved (repeats, median reported):
- ``eager timm``: PIL images loaded one by one, timm's eval transform, batches under ``torch.no_grad``, NCHW,
  default threads;
- ``revsd.features``: decode + resize in worker threads (next batch prefetched), ``inference_mode``,
  ``channels_last``, BatchNorm folded into the convolutions.

    .venv/bin/python bench/bench_features.py [--n 300] [--repeats 3] [--batch-size 32]

Prints a table and writes ``bench/results/features.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from revsd import features, paths
from revsd.artifacts import write_text
from revsd.backbones import create_backbone, fuse_conv_bn, load_packaged_effnet


def eager_timm(image_paths, batch_size: int):
    import timm

    model = load_packaged_effnet(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0),
                                 "lite0").eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    def run():
        out = []
        for s in range(0, len(image_paths), batch_size):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths[s:s + batch_size]])
            with torch.no_grad():
                out.append(model(x))
        return torch.cat(out)

    return run


def revsd_features(image_paths, batch_size: int, workers: int):
    backbone = fuse_conv_bn(create_backbone("effnet_lite0").eval())

    def run():
        return features.compute_features(backbone, image_paths, batch_size=batch_size, num_workers=workers,
                                         progress=False)[0]

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="images from the embedded sample")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="decoding threads of revsd.features")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "features.md"))
    args = ap.parse_args(argv)

    image_paths = sorted(str(p) for p in (paths.sample_dir() / "images").glob("*/*.jpg"))[:args.n]
    if not image_paths:
        raise SystemExit(f"no images under {paths.sample_dir() / 'images'}")
    threads = torch.get_num_threads()
    runners = {"eager timm (PIL one by one, no_grad, NCHW)": eager_timm(image_paths, args.batch_size),
               "revsd.features (threads, inference_mode, channels_last, BN folded)":
                   revsd_features(image_paths, args.batch_size, args.workers)}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times[next(iter(runners))])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append((name, len(image_paths) / med, len(image_paths) / min(ts), base / med))
    header = "| method | images/s (median) | images/s (best) | speed-up |\n|---|---:|---:|---:|\n"
    table = header + "".join(f"| {n} | {a:.1f} | {b:.1f} | {c:.2f}× |\n" for n, a, b, c in rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (f"# Feature extraction throughput: effnet_lite0 (224 px), {len(image_paths)} sample images\n\n"
            f"Command: `.venv/bin/python bench/bench_features.py --n {args.n} --repeats {args.repeats} "
            f"--batch-size {args.batch_size} --workers {args.workers}`\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{threads} torch threads, load average at the end {load:.1f} (shared machine: absolute numbers are "
            f"noisy; both methods run interleaved in the same process).\n\n{table}")
    print(table)
    write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
