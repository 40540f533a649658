"""Peak memory of ``revsd predict`` on huge images, and the decode time of large JPEGs (issue 14, item 3).

    .venv/bin/python bench/bench_predict_memory.py            # writes bench/results/predict_memory.md
    .venv/bin/python bench/bench_predict_memory.py --model working/03_train/demo/<run>

1. ``revsd predict`` on 16 PNGs of 8000x8000 pixels (one batch of 16), each run in a fresh child process whose
   peak RSS (its own ``VmHWM``) is read when it exits: images decoded at full size (``min_side`` off: how predict
   decoded before) against decoded no larger than the model needs (``open_rgb(min_side=...)``, today's default),
   with and without reading the files' generation metadata. Goal: < 2.5 GiB.
2. ``open_rgb`` on 8 JPEGs of 6000x4000: full decode against ``min_side`` (JPEG draft mode), seconds per image.

Model: ``--model`` or, by default, an untrained run (random heads on the packaged EfficientNet-Lite2 backbone,
260 px) written to a temporary working dir: memory and decode time do not depend on what the heads learned.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from revsd.artifacts import write_text

# VmHWM is this process's own high-water mark; ru_maxrss is not: Linux carries it over fork + exec, so a child
# started by this (large) benchmark process would report at least the parent's RSS at the time of the fork.
CHILD = """
import sys
from revsd import predict
if sys.argv[1] == "full":
    predict.min_side = lambda predictor: None  # decode at full size, as predict did before
code = predict.main(sys.argv[2:])
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_KIB", hwm, file=sys.stderr)
sys.exit(code)
"""


def untrained_run(work: Path, backbone: str = "effnet_lite2") -> Path:
    from revsd.backbones import get_spec
    from revsd.inference import ModelSpec, build_model, save_weights

    run = work / "03_train" / "bench" / f"{backbone}_untrained"
    run.mkdir(parents=True)
    bb = get_spec(backbone)
    spec = ModelSpec(backbone=backbone, mode="frozen", head_config="parallel", in_dim=bb.feature_dim, emb_dim=384,
                     vocab_size=4, hidden=0, dropout=0.0, head_norm=True, lam=1.0,
                     words=("woman", "painting", "portrait", "cat"), preprocess=bb.preprocess, pretrained=True,
                     tiny=False)
    spec.save(run)
    save_weights(run / "model.safetensors", build_model(spec, pretrained_backbone=False))
    return run


def big_pngs(folder: Path, n: int, side: int) -> list[Path]:
    """``n`` copies of one smooth ``side``² RGB PNG (a gradient with a pattern: a few hundred KB each)."""
    y, x = np.ogrid[:side, :side]
    img = np.empty((side, side, 3), np.uint8)
    img[..., 0] = (x * 255 // side).astype(np.uint8)
    img[..., 1] = (y * 255 // side).astype(np.uint8)
    img[..., 2] = (((x // 500) + (y // 500)) % 2 * 200).astype(np.uint8)
    first = folder / "big_00.png"
    Image.fromarray(img).save(first, compress_level=1)
    out = [first]
    for i in range(1, n):
        out.append(folder / f"big_{i:02d}.png")
        os.link(first, out[-1])
    return out


def child_peak(mode: str, args: list[str], env: dict) -> tuple[float, float, int]:
    """(peak RSS GiB, wall s, exit code) of ``revsd predict`` in a fresh child process."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, mode, *args], env=env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
    peak_kib = next((int(s.split()[1]) for s in p.stderr.splitlines() if s.startswith("PEAK_KIB")), 0)
    return peak_kib / 2**20, dt, p.returncode


def jpeg_decode(folder: Path, n: int, min_side: int) -> list[dict]:
    from revsd.images import open_rgb

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)).resize((6000, 4000), Image.BICUBIC)
    files = []
    for i in range(n):
        files.append(folder / f"photo_{i}.jpg")
        small.save(files[-1], quality=90)
    rows = []
    for label, side in (("full decode", None), (f"min_side={min_side} (draft)", min_side)):
        t = time.perf_counter()
        sizes = {open_rgb(f, min_side=side).size for f in files}
        dt = (time.perf_counter() - t) / n
        rows.append({"what": f"open_rgb, {n} JPEGs 6000x4000, {label}", "value": f"{dt * 1000:.0f} ms/image",
                     "note": "decoded to {}x{}".format(*min(sizes))})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="run directory (default: an untrained EfficientNet-Lite2 run)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--side", type=int, default=8000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "predict_memory.md"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_predict_memory_") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "REVSD_WORKING": str(tmp / "working"), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        os.environ["REVSD_WORKING"] = env["REVSD_WORKING"]
        run = Path(args.model) if args.model else untrained_run(tmp / "working")
        from revsd import paths
        from revsd.retrieval import build_bank, read_prompt_table

        bank = build_bank(read_prompt_table(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")[:500],
                          tmp / "bank", progress=False)
        del bank
        (tmp / "imgs").mkdir()
        files = big_pngs(tmp / "imgs", args.images, args.side)
        size_kb = files[0].stat().st_size / 1024
        common = [*map(str, files), "--model", str(run), "--bank", str(tmp / "bank"), "--no-modifiers",
                  "--batch-size", str(args.images), "--no-guard", "--out"]
        rows = []
        for mode, extra, label in (("bounded", ["--ignore-metadata"], "decoded to what the model needs"),
                                   ("bounded", [], "decoded to what the model needs, metadata read too"),
                                   ("full", ["--ignore-metadata"], "decoded at full size (before)")):
            peak, dt, code = child_peak(mode, [*common, str(tmp / f"{mode}.jsonl"), *extra], env)
            rows.append({"what": f"revsd predict, {args.images} PNGs {args.side}x{args.side} ({size_kb:.0f} KB "
                                 f"each), batch {args.images}: {label}",
                         "value": f"{peak:.2f} GiB peak RSS", "note": f"{dt:.1f} s wall, exit {code}"
                         + ("; goal < 2.5 GiB: " + ("met" if peak < 2.5 else "MISSED") if mode == "bounded" else "")})
            print(rows[-1], flush=True)
        from revsd.predict import load_predictor, min_side

        side = min_side(load_predictor(run))
        rows += jpeg_decode(tmp, 8, side)
    cols = list(rows[0])
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                      + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows])
    cmd = " ".join([".venv/bin/python bench/bench_predict_memory.py", *(sys.argv[1:] if argv is None else argv)])
    md = (f"# bench_predict_memory\n\n`{cmd}` on {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end (other jobs share these CPUs); model {run.name}\n\n{table}\n\n"
          "Peak RSS is each child process's own (`VmHWM` of the process running `revsd predict`; its `ru_maxrss` would include this benchmark's own RSS, which Linux carries over fork + exec). Reading the metadata "
          "of a PNG whose text chunks follow the pixel data makes Pillow decode the image once more "
          "(`revsd.metadata.read`).\n")
    print(md)
    write_text(args.out, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
