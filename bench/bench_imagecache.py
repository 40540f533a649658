"""Training input: images/s decoding on the fly vs reading ``revsd.imagecache``, on the embedded sample.

For each source, the same images go through, in the same run (best of ``--repeats``):
- ``on the fly``: ``revsd.transforms.iter_image_batches`` (open_rgb + resize/crop in threads, what
  fine-tuning does at every epoch today), with as many threads as cores;
- ``cache build``: ``revsd.imagecache.build`` (the one-time decode into memory-mapped uint8 shards);
- ``cached reads``: one epoch of ``revsd.imagecache.create_loader`` (shuffled, workers = cores; and 0 workers).
Sources: the sample's 256 px JPEGs, and the same pictures re-encoded as 512 px PNGs (DiffusionDB's format
and size) in a temporary folder.

    .venv/bin/python bench/bench_imagecache.py [--n 300] [--size 224] [--repeats 2]

Prints a table and writes ``bench/results/imagecache.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

from PIL import Image

from revsd import imagecache, paths
from revsd.artifacts import write_text
from revsd.transforms import Preprocess, iter_image_batches, pil_to_array


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(files: list[Path], pp: Preprocess, work: Path, batch: int, repeats: int) -> dict[str, float]:
    cores = imagecache.available_cores()
    ids = [f"{f.parent.name}/{f.stem}" for f in files]
    prep = partial(pil_to_array, pp=pp)
    shape = (pp.input_size, pp.input_size, 3)

    def on_the_fly():
        for _ in iter_image_batches([files[s:s + batch] for s in range(0, len(files), batch)], pp, cores):
            pass

    builds = iter(range(repeats))

    def build():
        imagecache.build(work / f"cache{next(builds)}", ids, files, prep, json.dumps(pp.to_dict()), shape,
                         progress=False)

    out = {"on the fly (threads = cores)": best_of(on_the_fly, repeats), "cache build (one time)": best_of(build, repeats)}
    cache = imagecache.ImageCache(work / "cache0")
    rows = cache.rows(ids, files)
    for workers in (cores, 0):
        loader = imagecache.create_loader(cache, rows, batch_size=batch, shuffle=True, num_workers=workers)
        next(iter(loader))  # start the workers

        def epoch(loader=loader):
            for _ in loader:
                pass

        out[f"cached reads (DataLoader, {workers} workers)"] = best_of(epoch, repeats)
    return {k: len(files) / v for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="images from the embedded sample")
    ap.add_argument("--size", type=int, default=224, help="backbone input side")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "imagecache.md"))
    args = ap.parse_args(argv)

    jpgs = sorted((paths.sample_dir() / "images").glob("*/*.jpg"))[:args.n]
    if not jpgs:
        raise SystemExit(f"no images under {paths.sample_dir() / 'images'}")
    pp = Preprocess(input_size=args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pngs = []
        for f in jpgs:
            dst = tmp / "png512" / f.parent.name / (f.stem + ".png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.open(f).convert("RGB").resize((512, 512), Image.BICUBIC).save(dst)
            pngs.append(dst)
        for source, files in (("256 px JPEG (sample)", jpgs), ("512 px PNG (DiffusionDB-like)", pngs)):
            rates = measure(files, pp, tmp / source.split()[0], args.batch_size, args.repeats)
            rows += [(source, k, v) for k, v in rates.items()]
            for k, v in rates.items():
                print(f"{source:30s} {k:40s} {v:8.0f} img/s")
    cores, load = imagecache.available_cores(), os.getloadavg()[0]
    table = "\n".join(f"| {s} | {k} | {v:.0f} |" for s, k, v in rows)
    write_text(args.out, f"""# Image cache vs decoding on the fly

`.venv/bin/python bench/bench_imagecache.py --n {len(jpgs)} --size {args.size} --repeats {args.repeats}`
({len(jpgs)} images to {args.size} px, batch {args.batch_size}; {platform.machine()}, {cores} cores, load average
{load:.1f} when it ended: the machine was shared, so absolute rates are low; the ratios are what carry over).

| source | path | images/s |
|---|---|---|
{table}

Cached reads are uint8 copies out of memory-mapped shards ({args.size}x{args.size}x3 = {args.size ** 2 * 3 // 1024} KiB
per image), so an epoch no longer decodes a single PNG; the one-time build costs about one on-the-fly epoch.
""")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
