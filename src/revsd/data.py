"""Loaders: DiffusionDB's on-disk format (the embedded sample or a downloaded subset) and the Kaggle layout.

DiffusionDB layout (what ``revsd data fetch`` writes and ``input/sample`` mirrors)::

    <root>/images/part-000001/<image_name>.png        images
    <root>/images/part-000001/part-000001.json        {image_name: {"p": prompt, "se": seed, "c": cfg,
                                                                    "st": steps, "sa": sampler}}
    <root>/metadata.parquet                           optional; preferred when present (image_name, prompt,
                                                      part_id, ... source metadata such as artist)

Kaggle layout::

    <root>/images/<imgId>.png
    <root>/prompts.csv                                columns imgId, prompt

Every loader returns one row per image: ``image_id`` (str, unique), ``image_path`` (str, absolute), ``prompt``,
plus the source metadata. Problems raise :class:`DataError`, whose one-line message names the file and what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from revsd import paths
from revsd.artifacts import save_parquet
from revsd.images import IMAGE_EXTENSIONS, ImageError, list_images, open_rgb

log = logging.getLogger(__name__)

FORMATS = ("auto", "diffusiondb", "kaggle")
HF_REPO = "poloclub/diffusiondb"
N_PARTS_2M = 2000  # DiffusionDB 2M: parts 1..2000, 1000 images each
RANDOM_SUBSET_SEED = 0  # 2m_random_<N>k = N parts drawn with numpy default_rng(0) from 1..2000, sorted
PART_RE = re.compile(r"part-(\d{6})$")
JSON_FIELDS = {"p": "prompt", "se": "seed", "c": "cfg", "st": "step", "sa": "sampler"}


class DataError(ValueError):
    """Unusable input data; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------- loading


def detect_format(root: str | Path) -> str:
    """``kaggle`` if ``prompts.csv`` is present, ``diffusiondb`` if part folders or metadata.parquet are."""
    root = Path(root)
    if (root / "prompts.csv").exists():
        return "kaggle"
    if (root / "metadata.parquet").exists() or _part_dirs(root):
        return "diffusiondb"
    raise DataError(f"{root}: neither prompts.csv (Kaggle layout) nor images/part-*/ or metadata.parquet "
                    "(DiffusionDB layout) found; point `source` at a dataset folder or run `revsd data fetch`")


def load_dataset(root: str | Path, fmt: str = "auto") -> pd.DataFrame:
    """Load a dataset folder into a table with ``image_id``, ``image_path``, ``prompt`` + source metadata."""
    root = Path(root)
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; run `revsd data fetch --subset 2m_first_1k` "
                        "or set `source` to an existing folder (relative to the input dir, or absolute)")
    if fmt == "auto":
        fmt = detect_format(root)
    df = load_kaggle(root) if fmt == "kaggle" else load_diffusiondb(root)
    dup = df["image_id"].duplicated()
    if dup.any():
        raise DataError(f"{root}: {int(dup.sum())} duplicate image ids, e.g. {df.loc[dup, 'image_id'].iloc[0]!r}; "
                        "each image file name (without extension) must be unique")
    return df.reset_index(drop=True)


def _part_dirs(root: Path) -> dict[int, Path]:
    images = root / "images"
    if not images.is_dir():
        return {}
    return {int(m.group(1)): p for p in sorted(images.iterdir()) if p.is_dir() and (m := PART_RE.match(p.name))}


def _require_columns(df: pd.DataFrame, cols: list[str], file: Path, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))}); "
                        f"{what}")


def _require_rows(df: pd.DataFrame, file: Path, what: str) -> None:
    if len(df) == 0:
        raise DataError(f"{file}: the prompt table is empty; {what}")


def _read_part_json(part_id: int, part_dir: Path) -> pd.DataFrame:
    index_file = part_dir / f"{part_dir.name}.json"
    if not index_file.exists():
        raise DataError(f"{index_file}: part index not found; re-download part {part_id} "
                        "(`revsd data fetch`) or add metadata.parquet")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{index_file}: not valid JSON ({e}); re-download part {part_id}") from e
    rows = [{"image_name": name, "part_id": part_id, **{col: rec.get(key) for key, col in JSON_FIELDS.items()}}
            for name, rec in index.items()]
    return pd.DataFrame(rows, columns=["image_name", "part_id", *JSON_FIELDS.values()])


def load_diffusiondb(root: str | Path) -> pd.DataFrame:
    """DiffusionDB on-disk format: metadata.parquet when present (rows of parts on disk), else the part JSONs."""
    root = Path(root)
    parts = _part_dirs(root)
    meta_file = root / "metadata.parquet"
    tables = []
    if meta_file.exists():
        meta = pd.read_parquet(meta_file)
        _require_columns(meta, ["image_name", "prompt", "part_id"], meta_file,
                         "use DiffusionDB's metadata.parquet or delete it to read the part JSON indexes")
        _require_rows(meta, meta_file, "delete it to read the part JSON indexes, or re-download it")
        meta = meta[meta["part_id"].isin(list(parts))]
        if len(meta) == 0:
            raise DataError(f"{meta_file}: none of its rows belong to the part folders under {root / 'images'}; "
                            "download the parts it lists (`revsd data fetch`)")
        tables.append(meta)
    covered = set(tables[0]["part_id"].unique().tolist()) if tables else set()
    tables += [_read_part_json(pid, d) for pid, d in parts.items() if pid not in covered]
    if not tables:
        raise DataError(f"{root}: no part folders under images/ and no metadata.parquet; "
                        "run `revsd data fetch --subset 2m_first_1k --out <root>`")
    df = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0].reset_index(drop=True)
    _require_rows(df, root / "images", "the part JSON indexes list no images; re-download the parts")
    folder = df["part_id"].map(lambda p: str(parts[int(p)].resolve()))
    df.insert(0, "image_path", folder + "/" + df["image_name"].astype(str))
    df.insert(0, "image_id", df["image_name"].astype(str).map(lambda s: Path(s).stem))
    _require_files(df, meta_file if meta_file.exists() else root / "images" / "part-*" / "part-*.json")
    return _order(df)


def load_kaggle(root: str | Path) -> pd.DataFrame:
    """Kaggle layout: ``images/<imgId>.<ext>`` + ``prompts.csv`` (imgId, prompt)."""
    root = Path(root)
    csv = root / "prompts.csv"
    if not csv.exists():
        raise DataError(f"{csv}: not found; the Kaggle layout needs prompts.csv with columns imgId, prompt")
    table = pd.read_csv(csv, dtype={"imgId": str}, keep_default_na=False, na_values=[""])
    _require_columns(table, ["imgId", "prompt"], csv, "the Kaggle layout needs columns imgId, prompt")
    _require_rows(table, csv, "add one row per image (imgId, prompt)")
    images = root / "images"
    found = {p.stem: p for p in list_images([images])} if images.is_dir() else {}
    df = table.rename(columns={"imgId": "image_id"})
    df["image_id"] = df["image_id"].astype(str)
    df.insert(1, "image_path", [str(found.get(i, images / f"{i}.png").resolve()) for i in df["image_id"]])
    _require_files(df, csv)
    return _order(df)


def _require_files(df: pd.DataFrame, listed_in: Path) -> None:
    missing = [p for p in df["image_path"] if not Path(p).is_file()]
    if missing:
        raise DataError(f"{listed_in}: {len(missing)} listed image(s) are absent, e.g. {missing[0]}; "
                        "re-download the missing part(s) or remove their rows from the table")


def _order(df: pd.DataFrame) -> pd.DataFrame:
    first = ["image_id", "image_path", "prompt"]
    return df[first + [c for c in df.columns if c not in first]]


def check_images(df: pd.DataFrame, workers: int = 4) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fully decode every image; returns ``(ok_df, bad_df)``, bad_df with image_id, image_path, error."""

    def one(path: str) -> str:
        try:
            open_rgb(path)
            return ""
        except ImageError as e:
            return str(e)

    paths_ = df["image_path"].tolist()
    with ThreadPoolExecutor(max(1, workers)) as ex:
        errors = list(tqdm(ex.map(one, paths_), total=len(paths_), desc="check images", unit="img"))
    bad_mask = np.array([bool(e) for e in errors], dtype=bool)
    bad = df.loc[bad_mask, ["image_id", "image_path"]].assign(error=[e for e in errors if e])
    for err in bad["error"]:
        log.warning("skipping bad image: %s", err)
    return df.loc[~bad_mask].reset_index(drop=True), bad.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- fetching


def subset_parts(subset: str) -> list[int]:
    """DiffusionDB 2M part ids for a subset name: ``2m_first_<N>k`` (parts 1..N), ``2m_random_<N>k``
    (N parts drawn without replacement by ``numpy.random.default_rng(RANDOM_SUBSET_SEED)``), ``2m_all``."""
    if subset == "2m_all":
        return list(range(1, N_PARTS_2M + 1))
    m = re.fullmatch(r"2m_(first|random)_(\d+)k", subset)
    if not m or not 1 <= int(m.group(2)) <= N_PARTS_2M:
        raise DataError(f"unknown subset {subset!r}; use 2m_first_<N>k or 2m_random_<N>k "
                        f"(1 <= N <= {N_PARTS_2M}, 1000 images per part) or 2m_all")
    n = int(m.group(2))
    if m.group(1) == "first":
        return list(range(1, n + 1))
    rng = np.random.default_rng(RANDOM_SUBSET_SEED)
    return sorted(rng.choice(np.arange(1, N_PARTS_2M + 1), size=n, replace=False).tolist())


def extract_part(zip_path: str | Path, out: str | Path, part_id: int) -> Path:
    """Unzip one part into ``<out>/images/part-XXXXXX/`` (flattened; written to a temp folder, then renamed)."""
    out = Path(out)
    dest = out / "images" / f"part-{part_id:06d}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as z:
                for info in z.infolist():
                    name = Path(info.filename).name
                    if info.is_dir() or not name or name.startswith("."):
                        continue
                    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS | {".json"}:
                        continue
                    with z.open(info) as src, open(tmp / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile as e:
            raise DataError(f"{zip_path}: not a valid zip ({e}); delete it and fetch part {part_id} again") from e
        if not (tmp / f"{dest.name}.json").exists():
            raise DataError(f"{zip_path}: has no {dest.name}.json index; is it really DiffusionDB part {part_id}?")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def trim_metadata(metadata: str | Path, out: str | Path) -> Path:
    """Write ``<out>/metadata.parquet`` holding only the rows of the parts present under ``<out>/images``."""
    out = Path(out)
    meta = pd.read_parquet(metadata)
    meta = meta[meta["part_id"].isin(list(_part_dirs(out)))]
    return save_parquet(out / "metadata.parquet", meta)


def fetch_diffusiondb(subset: str, out: str | Path) -> Path:
    """Download a DiffusionDB 2M subset from the Hugging Face hub into DiffusionDB's on-disk layout at ``out``.

    Parts already extracted are skipped, so an interrupted fetch resumes. Needs internet.
    """
    from huggingface_hub import hf_hub_download

    out = Path(out)
    parts = subset_parts(subset)

    def download(filename: str) -> str:
        try:
            return hf_hub_download(repo_id=HF_REPO, repo_type="dataset", filename=filename)
        except Exception as e:  # network, auth, offline mode: one clear line
            raise DataError(f"could not download {HF_REPO}/{filename} ({type(e).__name__}: {e}); "
                            "check the internet connection (and unset HF_HUB_OFFLINE)") from e

    todo = [p for p in parts if not (out / "images" / f"part-{p:06d}" / f"part-{p:06d}.json").exists()]
    for part_id in tqdm(todo, desc=f"fetch {subset}", unit="part"):
        extract_part(download(f"images/part-{part_id:06d}.zip"), out, part_id)
    trim_metadata(download("metadata.parquet"), out)
    log.info("%s: %d parts in %s", subset, len(parts), out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``revsd data fetch --subset 2m_first_10k [--out input/diffusiondb]``."""
    ap = argparse.ArgumentParser(prog="revsd data", description="DiffusionDB data utilities")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a DiffusionDB 2M subset (needs internet)")
    f.add_argument("--subset", default="2m_first_1k", help="2m_first_<N>k, 2m_random_<N>k or 2m_all")
    f.add_argument("--out", default=None, help="target folder (default: <input>/diffusiondb)")
    f.add_argument("--dry-run", action="store_true", help="print the part ids and exit")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.out) if a.out else paths.input_dir() / "diffusiondb"
    try:
        parts = subset_parts(a.subset)
        if a.dry_run:
            print(f"{a.subset}: {len(parts)} parts ({len(parts) * 1000:,} images) -> {out}\n"
                  f"parts: {', '.join(map(str, parts))}")
            return 0
        fetch_diffusiondb(a.subset, out)
    except DataError as e:
        print(f"revsd data: {e}", file=sys.stderr)
        return 1
    print(f"done: {out} (use it with source={out.name!r} in 01_filter, relative to the input dir)"
          if out.parent == paths.input_dir() else f"done: {out}")
    return 0
