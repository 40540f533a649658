"""Speed of 01_filter's text rules on a synthetic DiffusionDB-2M-sized table (target: < 60 s in total).

    .venv/bin/python bench/bench_filter.py              # 2M rows; writes bench/results/filter.md
    .venv/bin/python bench/bench_filter.py --n 200000   # quicker

Prompts: a random modifier (artists, mediums, movements from input/modifiers), a real DiffusionDB prompt
(input/prompts) and another random modifier, so lengths follow real prompts. Injected: 10% share the first 60 characters
of another row, 5% its last 60, 5% exact copies, 1% padded with whitespace, 0.3% empty / "nan" / missing.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

from revsd import filtering, paths
from revsd.artifacts import write_text


def synthetic_table(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = pd.read_parquet(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")["prompt"].to_numpy()
    mods = np.concatenate([Path(paths.input_dir() / "modifiers" / f).read_text().split("\n")
                           for f in ("artists.txt", "mediums.txt", "movements.txt")])
    mods = mods[mods != ""]
    prompts = (pd.Series(mods[rng.integers(0, len(mods), n)], dtype="str") + ", "
               + base[rng.integers(0, len(base), n)] + ", " + mods[rng.integers(0, len(mods), n)])

    def pick(frac):
        return rng.choice(n, int(frac * n), replace=False), rng.integers(0, n, int(frac * n))

    rows, src = pick(0.10)
    prompts.iloc[rows] = prompts.iloc[src].str[:60].to_numpy() + " variation " + rows.astype(str)
    rows, src = pick(0.05)
    prompts.iloc[rows] = "new start " + rows.astype(str) + " " + prompts.iloc[src].str[-60:].to_numpy()
    rows, src = pick(0.05)
    prompts.iloc[rows] = prompts.iloc[src].to_numpy()
    rows, _ = pick(0.01)
    prompts.iloc[rows] = "  " + prompts.iloc[rows] + " \n"
    rows, _ = pick(0.003)
    prompts.iloc[rows] = rng.choice(np.array(["", "nan", None], dtype=object), len(rows))
    ids = pd.Series(np.arange(n)).map("{:08x}".format)
    return pd.DataFrame({"image_id": ids, "image_path": "", "prompt": prompts})


def timed(rows: list, name: str, n_in: int, fn):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    n_out = len(out) if isinstance(out, pd.DataFrame) else n_in
    rows.append({"step": name, "rows_in": n_in, "rows_out": n_out, "seconds": round(dt, 2)})
    print(f"{name:<28} {n_in:>10,} -> {n_out:>10,}  {dt:7.2f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "filter.md"))
    a = ap.parse_args()

    t = time.perf_counter()
    df = synthetic_table(a.n, a.seed)
    print(f"synthetic table: {len(df):,} rows, median prompt length {df['prompt'].str.len().median():.0f} chars, "
          f"built in {time.perf_counter() - t:.1f} s")
    cfg = filtering.FilterConfig(check_images=False)
    rows: list[dict] = []
    df = timed(rows, "strip_whitespace", len(df), lambda: df.assign(prompt=filtering.strip_prompts(df["prompt"])))
    df = timed(rows, "min_words_null", len(df),
               lambda: df[filtering.valid_prompt_mask(df["prompt"])].reset_index(drop=True))

    def dedup():
        labels = filtering.near_duplicate_clusters(df["prompt"], cfg.near_dup_chars)
        return df[filtering.keep_one_per_cluster(labels, df["image_id"])].reset_index(drop=True)

    df = timed(rows, "near_duplicates (50 chars)", len(df), dedup)
    groups = timed(rows, "assign_groups", len(df), lambda: filtering.assign_groups(df, cfg.near_dup_chars, ""))
    timed(rows, "split_and_fold (5 folds)", len(df),
          lambda: filtering.split_and_fold(groups, cfg.val_size, cfg.test_size, cfg.n_folds, cfg.seed))
    table = pd.DataFrame(rows)
    total = table["seconds"].sum()
    rules = table["seconds"].iloc[:3].sum()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load = os.getloadavg()[0]
    print(f"text rules: {rules:.1f} s; all steps: {total:.1f} s; peak RSS {peak:.1f} GiB; load average {load:.1f}")

    md = [f"# bench_filter: 01_filter text rules on a synthetic {a.n:,}-row table", "",
          f"`.venv/bin/python bench/bench_filter.py --n {a.n}` on {platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} CPU core(s) (1-min load average {load:.1f} at the end: "
          f"the machine is shared, so seconds are pessimistic), pandas {pd.__version__}; seed {a.seed}.", "",
          "| step | rows in | rows out | seconds |", "|---|---:|---:|---:|"]
    md += [f"| {r.step} | {r.rows_in:,} | {r.rows_out:,} | {r.seconds:.2f} |" for r in table.itertuples()]
    md += ["", f"Text rules (strip, min words/null, near duplicates): **{rules:.1f} s** (target < 60 s). "
               f"With grouping and splits: {total:.1f} s. Peak RSS {peak:.1f} GiB.", ""]
    write_text(a.out, "\n".join(md))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
