"""``revsd data import DIR... --out DS [--recursive] [--copy]``: your own generations as a training set.

Reads the generation metadata of every image under ``DIR...`` (:mod:`revsd.metadata` lists the formats: A1111/Forge,
ComfyUI, InvokeAI, NovelAI, Fooocus, SwarmUI, Draw Things, Easy Diffusion, Mochi, Midjourney, DiffusionDB) and
writes the images that carry a prompt as a dataset in DiffusionDB's on-disk format, the one 01_filter reads
(``source: <DS>`` in a profile)::

    DS/images/part-000001/<sha256[:16]>.<ext>    the image (hard link when DS is on the same filesystem, else a copy)
    DS/images/part-000001/part-000001.json      {image_name: {"p": prompt, "se": seed, "c": cfg, "st": steps,
                                                  "sa": sampler, "neg", "model", "tool", "w", "h", "sha256", "src"}}
    DS/metadata.parquet                         image_name, prompt, part_id, seed, step, cfg, sampler, width,
                                                height, negative_prompt, model, tool, sha256, source

Images without a prompt are skipped and counted; identical files (same SHA-256) are imported once. Each run
appends one new part holding only what is new; the part is built in a temporary folder and renamed into place,
then ``metadata.parquet`` is rebuilt from all part JSONs (the part JSONs are the record), so an interrupted run
leaves a valid dataset and re-running finishes the job. ``width``/``height`` are the file's pixel size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from revsd import metadata
from revsd.artifacts import file_sha256, save_parquet
from revsd.data import PART_RE, DataError
from revsd.images import list_images

INT64_MAX = 2**63 - 1


def read_parts(out: Path) -> dict[int, dict]:
    """``{part_id: part JSON}`` of an import folder; refuses a dataset that ``revsd data import`` did not write."""
    parts = {}
    images = out / "images"
    for d in sorted(images.iterdir()) if images.is_dir() else []:
        m = PART_RE.match(d.name)
        if not (m and d.is_dir()):
            continue
        index = d / f"{d.name}.json"
        try:
            recs = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{index}: unreadable part index ({type(e).__name__}); delete {d} and import again") from e
        if any("sha256" not in r for r in recs.values()):
            raise DataError(f"{index}: this part was not written by `revsd data import`; "
                            "import into a new --out folder")
        parts[int(m.group(1))] = recs
    return parts


def metadata_table(parts: dict[int, dict]) -> pd.DataFrame:
    """``metadata.parquet`` rows rebuilt from the part JSONs."""
    rows = [{"image_name": name, "prompt": r["p"], "part_id": pid, "seed": r["se"], "step": r["st"], "cfg": r["c"],
             "sampler": r["sa"], "width": r["w"], "height": r["h"], "negative_prompt": r["neg"], "model": r["model"],
             "tool": r["tool"], "sha256": r["sha256"], "source": r["src"]}
            for pid, recs in sorted(parts.items()) for name, r in recs.items()]
    df = pd.DataFrame(rows, columns=["image_name", "prompt", "part_id", "seed", "step", "cfg", "sampler", "width",
                                     "height", "negative_prompt", "model", "tool", "sha256", "source"])
    return df.astype({"part_id": "int64", "seed": "Int64", "step": "Int64", "cfg": "Float64", "width": "int64",
                      "height": "int64"})


def _record(path: Path, digest: str, info: dict, size: tuple[int, int]) -> dict:
    seed = info["seed"] if info["seed"] is not None and 0 <= info["seed"] <= INT64_MAX else None
    return {"p": info["prompt"], "se": seed, "c": info["cfg"], "st": info["steps"], "sa": info["sampler"],
            "neg": info["negative_prompt"], "model": info["model"], "tool": info["tool"], "w": size[0],
            "h": size[1], "sha256": digest, "src": str(path.resolve())}


def _place(src: Path, dst: Path, copy: bool) -> str:
    if not copy:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:  # another filesystem, or links not allowed
            pass
    shutil.copy2(src, dst)
    return "copied"


def write_part(out: Path, part_id: int, new: dict[str, tuple[Path, dict]], copy: bool) -> dict[str, int]:
    """Write ``images/part-XXXXXX/`` (images + JSON) in a temporary folder, then rename it into place."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    name = f"part-{part_id:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=images))
    how = {"linked": 0, "copied": 0}
    try:
        for image_name, (src, _) in new.items():
            how[_place(src, tmp / image_name, copy)] += 1
        (tmp / f"{name}.json").write_text(json.dumps({k: rec for k, (_, rec) in new.items()}, indent=1))
        tmp.chmod(0o755)
        os.replace(tmp, images / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return how


def import_images(dirs: list[str | Path], out: str | Path, recursive: bool = False, copy: bool = False) -> dict:
    """Import the prompted images under ``dirs`` into ``out``; returns the summary counts (and warnings)."""
    out = Path(out)
    files = list_images(dirs, recursive=recursive)
    parts = read_parts(out)
    existing = {r["sha256"] for recs in parts.values() for r in recs.values()}
    seen = set(existing)
    summary = {"scanned": len(files), "imported": 0, "no_prompt": 0, "already_in_dataset": 0,
               "duplicate_in_input": 0, "unreadable": 0, "part": None, "warnings": []}
    new: dict[str, tuple[Path, dict]] = {}
    for path in tqdm(files, desc="import", unit="img"):
        try:
            with Image.open(path) as im:
                size = im.size
            digest = file_sha256(path)
        except Exception as e:  # not an image, unreadable: counted, never fatal
            summary["unreadable"] += 1
            summary["warnings"].append(f"{path}: not a readable image ({type(e).__name__})")
            continue
        if digest in seen:
            summary["already_in_dataset" if digest in existing else "duplicate_in_input"] += 1
            continue
        res = metadata.read(path)
        if res.warning:
            summary["warnings"].append(res.warning)
        if res.info is None:
            summary["no_prompt"] += 1
            continue
        seen.add(digest)
        new[f"{digest[:16]}{path.suffix.lower()}"] = (path, _record(path, digest, res.info, size))
    if new:
        part_id = max(parts, default=0) + 1
        summary.update(write_part(out, part_id, new, copy), part=f"part-{part_id:06d}", imported=len(new))
        parts[part_id] = {k: rec for k, (_, rec) in new.items()}
    if parts:  # rebuilt on every run, so an interrupted run is completed by the next
        save_parquet(out / "metadata.parquet", metadata_table(parts))
    summary["total_in_dataset"] = sum(len(r) for r in parts.values())
    return summary


def main(argv: list[str] | None = None) -> int:
    """``revsd data import DIR... --out DS [--recursive] [--copy]`` (argv without the word "import")."""
    ap = argparse.ArgumentParser(prog="revsd data import", description=__doc__.split("\n\n")[1])
    ap.add_argument("dirs", nargs="+", help="folders (or files) of generated images")
    ap.add_argument("--out", required=True, help="dataset folder to create or extend (use it as `source` in 01_filter)")
    ap.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    ap.add_argument("--copy", action="store_true", help="always copy (default: hard-link when possible)")
    a = ap.parse_args(argv)
    missing = [d for d in a.dirs if not Path(d).exists()]
    if missing:
        print(f"revsd data import: {missing[0]}: not found; pass existing image folders", file=sys.stderr)
        return 2
    try:
        s = import_images(a.dirs, a.out, a.recursive, a.copy)
    except DataError as e:
        print(f"revsd data import: {e}", file=sys.stderr)
        return 1
    for w in s["warnings"][:10]:
        print(f"  warning: {w}", file=sys.stderr)
    if len(s["warnings"]) > 10:
        print(f"  ... and {len(s['warnings']) - 10} more warnings", file=sys.stderr)
    print(f"revsd data import: {s['scanned']} file(s): {s['imported']} imported"
          f"{' into ' + s['part'] if s['part'] else ''} ({s.get('linked', 0)} linked, {s.get('copied', 0)} copied); "
          f"skipped {s['no_prompt']} without a prompt, {s['already_in_dataset']} already in the dataset, "
          f"{s['duplicate_in_input']} duplicate(s) in the input, {s['unreadable']} unreadable; "
          f"{s['total_in_dataset']} image(s) in {a.out}", file=sys.stderr)
    if not s["total_in_dataset"]:
        print(f"revsd data import: no image under {' '.join(a.dirs)} carries a prompt; nothing to train on "
              "(--recursive descends into sub-folders)", file=sys.stderr)
        return 1
    print(f"train on it: revsd pipeline --profile demo --set 01_filter.source={Path(a.out).resolve()}",
          file=sys.stderr)
    return 0
