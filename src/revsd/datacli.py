"""``revsd data``: the command line over the data layer (an app: it may use 01's rules and the importer).

    revsd data fetch --subset 2m_first_10k [--out DIR] [--filter]    # DiffusionDB 2M / Large, part by part
    revsd data import DIR... --out DS [--recursive]                  # your own generations -> DiffusionDB format
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from revsd import paths
from revsd.data import RELEASES, DataError, fetch_diffusiondb, parse_subset


def main(argv: list[str] | None = None) -> int:
    """``revsd data fetch --subset 2m_first_10k [--out DIR] [--filter]``, ``revsd data import ...``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import"]:
        from revsd import importer

        return importer.main(argv[1:])
    ap = argparse.ArgumentParser(prog="revsd data", description="DiffusionDB data utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a DiffusionDB 2M or Large subset part by part (needs internet)")
    f.add_argument("--subset", default="2m_first_1k",
                   help="2m_first_<N>k, 2m_random_<N>k, 2m_all, large_first_<N>k, large_random_<N>k or large_all")
    f.add_argument("--out", default=None, help="target folder (default: <input>/diffusiondb, or diffusiondb-large)")
    f.add_argument("--filter", action="store_true",
                   help="write only the images whose rows pass 01_filter's text rules (1-3)")
    f.add_argument("--near-dup-chars", type=int, default=50, help="rule 3's affix length with --filter (0 = off)")
    f.add_argument("--dry-run", action="store_true", help="print the part ids and exit")
    sub.add_parser("import", help="make a DiffusionDB-format dataset from your own images "
                                  "(revsd data import DIR... --out DS; see `revsd data import --help`)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        release, parts = parse_subset(a.subset)
        out = Path(a.out) if a.out else paths.input_dir() / RELEASES[release].default_out
        if a.dry_run:
            print(f"{a.subset}: {RELEASES[release].name}, {len(parts)} parts ({len(parts) * 1000:,} images) -> {out}"
                  f"\nparts: {', '.join(map(str, parts))}")
            return 0
        keep = None
        if a.filter:
            from revsd.filtering import text_rules_keep

            keep = functools.partial(text_rules_keep, near_dup_chars=a.near_dup_chars)
        fetch_diffusiondb(a.subset, out, keep, a.near_dup_chars)
    except DataError as e:
        print(f"revsd data: {e}", file=sys.stderr)
        return 1
    print(f"done: {out} (use it with source={out.name!r} in 01_filter, relative to the input dir)"
          if out.parent == paths.input_dir() else f"done: {out} (use it with source={str(out)!r} in 01_filter)")
    return 0
