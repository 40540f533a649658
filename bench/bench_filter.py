"""Speed of 01_filter's text rules on a synthetic DiffusionDB-2M-sized table (target: < 60 s in total), and what
rule 3 keeps: rows kept and the largest cluster (rows collapsed into one kept row), old rule vs new rule, on the
18k real DiffusionDB prompts (input/prompts) at growing sizes and on the synthetic table.

    .venv/bin/python bench/bench_filter.py              # 2M rows; writes bench/results/filter.md
    .venv/bin/python bench/bench_filter.py --n 200000   # quicker

Prompts: a random modifier (artists, mediums, movements from input/modifiers), a real DiffusionDB prompt
(input/prompts) and another random modifier, so lengths follow real prompts. Injected: 10% share the first 60 characters
of another row, 5% its last 60, 5% exact copies, 1% padded with whitespace, 0.3% empty / "nan" / missing.

Old rule 3 (before issue 11): connected components of "shares the first or the last 50 characters" (prompts of
>= 50 characters only), one row kept per component. New rule: see revsd.filtering (no chaining, exact duplicates
of any length).
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


def clusters(df: pd.DataFrame, n_chars: int = 50) -> dict:
    """Rows kept and largest cluster under the old rule (components) and the new one (on rules 1-2 output);
    ``old_chained``: rows the old rule dropped although they share neither prefix nor suffix with the kept row."""
    p = df["prompt"]
    labels = filtering.components(len(df), filtering.affix_codes(p, n_chars))
    kept = filtering.keep_one_per_cluster(labels, df["image_id"])
    rep_old = pd.Series(np.flatnonzero(kept), index=labels[kept])[labels].to_numpy()
    share = ((p.str[:n_chars].to_numpy() == p.str[:n_chars].to_numpy()[rep_old])
             | (p.str[-n_chars:].to_numpy() == p.str[-n_chars:].to_numpy()[rep_old]))
    old = np.bincount(labels)
    new = np.bincount(filtering.near_duplicate_representatives(p, filtering.dedup_order(df), n_chars))
    return {"rows": len(df), "old_kept": int(kept.sum()), "old_largest": int(old.max()),
            "old_chained": int((~kept & ~share).sum()), "new_kept": int((new > 0).sum()),
            "new_largest": int(new.max())}


def real_prompts(sizes: list[int]) -> pd.DataFrame:
    p = pd.read_parquet(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")["prompt"]
    p = filtering.strip_prompts(p)
    p = p[filtering.valid_prompt_mask(p)].reset_index(drop=True)
    rows = []
    for n in sizes:
        head = p.head(n)
        rows.append(clusters(pd.DataFrame({"image_id": [f"{i:06d}" for i in range(len(head))], "prompt": head})))
    return pd.DataFrame(rows)


def timed(rows: list, name: str, n_in: int, fn):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    n_out = len(out) if isinstance(out, pd.DataFrame) else n_in
    rows.append({"step": name, "rows_in": n_in, "rows_out": n_out, "seconds": round(dt, 2)})
    print(f"{name:<28} {n_in:>10,} -> {n_out:>10,}  {dt:7.2f} s", flush=True)
    return out


def cluster_md(table: pd.DataFrame) -> list[str]:
    md = [("| rows (after rules 1-2) | old: kept | old: largest cluster | old: dropped by a chain only "
           "| new: kept | new: largest cluster |"), "|---:|---:|---:|---:|---:|---:|"]
    for r in table.itertuples():
        md.append(f"| {r.rows:,} | {r.old_kept:,} | {r.old_largest:,} ({100 * r.old_largest / r.rows:.2f}%) "
                  f"| {r.old_chained:,} | {r.new_kept:,} | {r.new_largest:,} ({100 * r.new_largest / r.rows:.2f}%) |")
    return md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "filter.md"))
    a = ap.parse_args()

    real = real_prompts([2250, 4500, 9000, 18019])
    print(real.to_string(index=False))
    t = time.perf_counter()
    df = synthetic_table(a.n, a.seed)
    print(f"synthetic table: {len(df):,} rows, median prompt length {df['prompt'].str.len().median():.0f} chars, "
          f"built in {time.perf_counter() - t:.1f} s")
    cfg = filtering.FilterConfig(check_images=False)
    rows: list[dict] = []
    df = timed(rows, "strip_whitespace", len(df), lambda: df.assign(prompt=filtering.strip_prompts(df["prompt"])))
    df = timed(rows, "min_words_null", len(df),
               lambda: df[filtering.valid_prompt_mask(df["prompt"])].reset_index(drop=True))
    synth = pd.DataFrame([clusters(df, cfg.near_dup_chars)])
    print(synth.to_string(index=False))
    df = timed(rows, "near_duplicates (50 chars)", len(df),
               lambda: df[filtering.near_duplicate_keep(df, cfg.near_dup_chars)].reset_index(drop=True))
    groups = timed(rows, "assign_groups", len(df), lambda: filtering.assign_groups(df, cfg.near_dup_chars, ""))
    timed(rows, "split_and_fold (5 folds)", len(df),
          lambda: filtering.split_and_fold(groups, cfg.val_size, cfg.test_size, cfg.n_folds, cfg.seed))
    largest_group = int(groups.value_counts().max())
    table = pd.DataFrame(rows)
    total = table["seconds"].sum()
    rules = table["seconds"].iloc[:3].sum()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load = os.getloadavg()[0]
    print(f"text rules: {rules:.1f} s; all steps: {total:.1f} s; peak RSS {peak:.1f} GiB; load average {load:.1f}")

    md = [f"# bench_filter: 01_filter text rules on a synthetic {a.n:,}-row table", "",
          (f"`.venv/bin/python bench/bench_filter.py --n {a.n}` on {platform.machine()}, "
           f"{len(os.sched_getaffinity(0))} CPU core(s) (1-min load average {load:.1f} at the end: "
           f"the machine is shared, so seconds are pessimistic), pandas {pd.__version__}; seed {a.seed}."), "",
          "| step | rows in | rows out | seconds |", "|---|---:|---:|---:|"]
    md += [f"| {r.step} | {r.rows_in:,} | {r.rows_out:,} | {r.seconds:.2f} |" for r in table.itertuples()]
    md += ["", (f"Text rules (strip, min words/null, near duplicates): **{rules:.1f} s** (target < 60 s). "
                f"With grouping and splits: {total:.1f} s. Peak RSS {peak:.1f} GiB. "
                f"Largest split group after rule 3 (no group column): {largest_group} row(s)."), "",
           "## Rule 3, old (connected components) vs new (no chaining)", "",
           "Real DiffusionDB prompts (input/prompts, first N after rules 1-2):", "", *cluster_md(real), "",
           f"Synthetic table (seed {a.seed}):", "", *cluster_md(synth), ""]
    write_text(a.out, "\n".join(md))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
