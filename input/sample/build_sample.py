"""Rebuild this embedded sample from the workplace's shared data (provenance; not needed to use the sample).

    python input/sample/build_sample.py --shared ../shared/data

Takes 100 artists (every artist's TL/TR/BL tiles, chosen by a fixed-seed shuffle) from the SupaGruen SD 1.5
cheat-sheet images and lays them out in DiffusionDB's own on-disk format:

    images/part-000001/<image_name>   (+ part-000001.json: {image_name: {"p", "se", "c", "st", "sa"}})
    metadata.parquet                  (DiffusionDB's columns + artist, checkpoint, category)

plus the 18k real DiffusionDB prompts (prompt bank / vocabulary statistics) and the modifier lists.
Image bytes are copied unchanged (256x256 JPEG tiles); seeds/cfg were not published, so they are null.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

N_ARTISTS = 100
PER_PART = 100
SEED = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    a = ap.parse_args()
    src, out = Path(a.shared), Path(a.out)
    sd = src / "sd_images" / "supagruen_sd15"
    pairs = pd.read_csv(sd / "pairs.csv")
    artists = sorted(pairs["artist"].unique())
    rng = np.random.default_rng(SEED)
    keep = set(rng.choice(artists, size=N_ARTISTS, replace=False).tolist())
    df = pairs[pairs["artist"].isin(keep)].sort_values(["artist", "quadrant"]).reset_index(drop=True)

    shutil.rmtree(out / "images", ignore_errors=True)
    rows = []
    for i, r in df.iterrows():
        part_id = i // PER_PART + 1
        part = out / "images" / f"part-{part_id:06d}"
        part.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sd / r["file"], part / r["file"])
        rows.append(dict(image_name=r["file"], prompt=r["prompt"], part_id=part_id, seed=None, step=None,
                         cfg=None, sampler="DPM++", width=256, height=256, user_name=None, timestamp=None,
                         image_nsfw=0.0, prompt_nsfw=0.0, artist=r["artist"], checkpoint=r["checkpoint"],
                         category=r["category"]))
    meta = pd.DataFrame(rows)
    for part_id, g in meta.groupby("part_id"):
        index = {r.image_name: {"p": r.prompt, "se": None, "c": None, "st": None, "sa": r.sampler}
                 for r in g.itertuples()}
        (out / "images" / f"part-{part_id:06d}" / f"part-{part_id:06d}.json").write_text(json.dumps(index, indent=1))
    meta.to_parquet(out / "metadata.parquet", index=False)
    shutil.copyfile(sd / "LICENSE", out / "LICENSE.images-SupaGruen-MIT")

    prompts = out.parent / "prompts"
    prompts.mkdir(exist_ok=True)
    pd.read_csv(src / "prompts" / "diffusiondb_prompts.csv").to_parquet(prompts / "diffusiondb_prompts.parquet",
                                                                        index=False)
    shutil.copyfile(src / "prompts" / "LICENSE.ImageReward", prompts / "LICENSE.ImageReward-Apache-2.0")
    mods = out.parent / "modifiers"
    mods.mkdir(exist_ok=True)
    for f in ["mediums.txt", "movements.txt", "trendings.txt", "artists.txt", "diffusiondb_phrase_counts.csv",
              "LICENSE"]:
        shutil.copyfile(src / "modifiers" / f, mods / f)
    print(f"{len(meta)} images in {meta.part_id.nunique()} parts, {len(keep)} artists -> {out}")


if __name__ == "__main__":
    main()
