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
Image files that no table row lists are skipped, never silently: one warning line names them and the table's
``attrs["skipped"]`` holds ``{"path", "reason"}`` for each. Two image files with one id (``abc.png`` and
``abc.jpg``) are an error naming both.

``revsd data fetch`` writes the DiffusionDB layout from the hub (2M or Large, see :data:`RELEASES`), one part at a
time; ``revsd data import`` (``revsd.importer``) writes it from a folder of your own images.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from revsd.artifacts import read_json, save_parquet, write_json
from revsd.images import IMAGE_EXTENSIONS, list_images

log = logging.getLogger(__name__)

FORMATS = ("auto", "diffusiondb", "kaggle")
HF_REPO = "poloclub/diffusiondb"
RANDOM_SUBSET_SEED = 0  # <release>_random_<N>k = N parts drawn with numpy default_rng(0), sorted
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
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "image_id"].iloc[0]
        files = ", ".join(df.loc[df["image_id"] == first, "image_path"])
        raise DataError(f"{root}: {df.loc[dup, 'image_id'].nunique()} image id(s) name more than one image, e.g. "
                        f"{first!r}: {files}; each image file name (without extension) must be unique")
    return df.reset_index(drop=True)


def _skip_unlisted(df: pd.DataFrame, folders: list[Path], listed_in: Path) -> pd.DataFrame:
    """Record image files under ``folders`` that no row of ``df`` lists in ``df.attrs["skipped"]``; warn once."""
    ids = set(df["image_id"])
    unlisted = [str(p) for p in list_images(folders) if p.stem not in ids]
    df.attrs["skipped"] = [{"path": p, "reason": f"no row in {listed_in.name}"} for p in unlisted]
    if unlisted:
        names = ", ".join(Path(p).name for p in unlisted[:20]) + (f" and {len(unlisted) - 20} more"
                                                                  if len(unlisted) > 20 else "")
        log.warning("%s: skipped %d image file(s) that have no row there: %s", listed_in, len(unlisted), names)
    return df


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
    listed_in = meta_file if meta_file.exists() else root / "images" / "part-*" / "part-*.json"
    _require_files(df, listed_in)
    return _skip_unlisted(_order(df), list(parts.values()), listed_in)


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
    files = pd.Series(list_images([images]) if images.is_dir() else [], dtype=object)
    stems = files.map(lambda p: p.stem)
    dup = stems.duplicated(keep=False)
    if dup.any():
        first = stems[dup].iloc[0]
        raise DataError(f"{images}: {stems[dup].nunique()} image id(s) have more than one file, e.g. {first!r}: "
                        f"{', '.join(p.name for p in files[stems == first])}; keep one file per id "
                        "(the id is the file name without extension)")
    found = dict(zip(stems, files))
    df = table.rename(columns={"imgId": "image_id"})
    df["image_id"] = df["image_id"].astype(str)
    df.insert(1, "image_path", [str(found.get(i, images / f"{i}.png").resolve()) for i in df["image_id"]])
    _require_files(df, csv)
    return _skip_unlisted(_order(df), [images] if images.is_dir() else [], csv)


def _require_files(df: pd.DataFrame, listed_in: Path) -> None:
    missing = [p for p in df["image_path"] if not Path(p).is_file()]
    if missing:
        raise DataError(f"{listed_in}: {len(missing)} listed image(s) are absent, e.g. {missing[0]}; "
                        "re-download the missing part(s) or remove their rows from the table")


def _order(df: pd.DataFrame) -> pd.DataFrame:
    first = ["image_id", "image_path", "prompt"]
    return df[first + [c for c in df.columns if c not in first]]


# ---------------------------------------------------------------------------------------------- fetching


class Release(NamedTuple):
    """A DiffusionDB release on the hub: parts of 1000 images, the hub folders of their zips, its metadata table."""

    name: str
    n_parts: int
    metadata: str  # on the hub; written trimmed to the parts on disk as <out>/metadata.parquet
    folders: tuple[tuple[int, str], ...]  # (last part id, hub folder holding its part-XXXXXX.zip), ascending
    default_out: str  # under the input dir

    def part_file(self, part_id: int) -> str:
        return f"{next(f for last, f in self.folders if part_id <= last)}/part-{part_id:06d}.zip"


RELEASES = {  # subset names start with the key: 2m_first_10k, large_random_5k, large_all, ...
    "2m": Release("DiffusionDB 2M (png)", 2000, "metadata.parquet", ((2000, "images"),), "diffusiondb"),
    "large": Release("DiffusionDB Large (lossless webp)", 14000, "metadata-large.parquet",
                     ((10000, "diffusiondb-large-part-1"), (14000, "diffusiondb-large-part-2")), "diffusiondb-large"),
}
FETCH_RECORD = "fetch.json"  # {"release", "filter_near_dup_chars"}: what a fetch folder holds
TMP_NAME = ".fetch-tmp"  # downloads land here (not in the hub cache) and are deleted once extracted


def parse_subset(subset: str) -> tuple[str, list[int]]:
    """``(release key, part ids)`` for ``<release>_first_<N>k`` (parts 1..N), ``<release>_random_<N>k`` (N parts
    drawn without replacement by ``numpy.random.default_rng(RANDOM_SUBSET_SEED)``, sorted) or ``<release>_all``."""
    m = re.fullmatch(r"(2m|large)_(?:all|(first|random)_(\d+)k)", subset)
    n_max = RELEASES[m.group(1)].n_parts if m else 0
    n = int(m.group(3)) if m and m.group(3) else n_max
    if not m or not 1 <= n <= n_max:
        raise DataError(f"unknown subset {subset!r}; use 2m_first_<N>k, 2m_random_<N>k, 2m_all (N <= 2000) or "
                        "large_first_<N>k, large_random_<N>k, large_all (N <= 14000); N >= 1, 1000 images per part")
    if m.group(2) == "random":
        rng = np.random.default_rng(RANDOM_SUBSET_SEED)
        return m.group(1), sorted(rng.choice(np.arange(1, n_max + 1), size=n, replace=False).tolist())
    return m.group(1), list(range(1, n + 1))


def extract_part(zip_path: str | Path, out: str | Path, part_id: int, keep: set[str] | None = None) -> Path:
    """Unzip one part into ``<out>/images/part-XXXXXX/`` (flattened; written to a temp folder, then renamed).

    ``keep``: image file names to extract (the part's JSON index is cut to them); None = all.
    """
    out = Path(out)
    dest = out / "images" / f"part-{part_id:06d}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as z:
                for info in z.infolist():
                    name = Path(info.filename).name
                    suffix = Path(name).suffix.lower()
                    if info.is_dir() or not name or name.startswith(".") or suffix not in IMAGE_EXTENSIONS | {".json"}:
                        continue
                    if keep is not None and suffix != ".json" and name not in keep:
                        continue
                    with z.open(info) as src, open(tmp / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile as e:
            raise DataError(f"{zip_path}: not a valid zip ({e}); delete it and fetch part {part_id} again") from e
        index = tmp / f"{dest.name}.json"
        jsons = sorted(tmp.glob("*.json"))
        if not index.exists() and len(jsons) == 1:
            jsons[0].rename(index)  # one index under another name: still this part's index
        if not index.exists():
            raise DataError(f"{zip_path}: has no {dest.name}.json index; is it really DiffusionDB part {part_id}?")
        if keep is not None:
            entries = json.loads(index.read_text())
            index.write_text(json.dumps({k: v for k, v in entries.items() if k in keep}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def _check_record(out: Path, release: str, near_dup_chars: int | None) -> None:
    """A fetch folder holds one release fetched one way; refuse to mix, then record what it holds."""
    record = {"release": release, "filter_near_dup_chars": near_dup_chars}
    file = out / FETCH_RECORD
    if file.exists() and (old := read_json(file)) != record:
        raise DataError(f"{file}: this folder holds a fetch with other settings ({old}, asked {record}); "
                        "use another --out, or the same release and --filter setting")
    write_json(file, record)


def _on_disk(meta: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Rows of ``meta`` whose image file is under ``<out>/images/part-XXXXXX/``."""
    have = {f"{pid}/{name}" for pid, d in _part_dirs(out).items() for name in os.listdir(d)}
    return meta[(meta["part_id"].astype(str) + "/" + meta["image_name"].astype(str)).isin(have)]


def fetch_diffusiondb(subset: str, out: str | Path, keep=None, near_dup_chars: int | None = None) -> Path:
    """Download a DiffusionDB subset (2M or Large) from the hub into DiffusionDB's on-disk layout at ``out``.

    Part by part: each zip is downloaded into ``<out>/.fetch-tmp`` (never the hub cache), extracted, deleted, so
    the extra disk at any time is about one part. Parts already extracted are skipped and an interrupted part
    is redone (extraction writes a temp folder, then renames), so a rerun resumes. ``keep(table) -> bool mask``
    (table: the subset's metadata rows with ``image_id``), e.g. 01's text rules: only those images are written;
    ``near_dup_chars`` is recorded with it in ``fetch.json``. Needs internet.
    """
    from huggingface_hub import hf_hub_download

    out = Path(out)
    release, parts = parse_subset(subset)
    rel = RELEASES[release]
    out.mkdir(parents=True, exist_ok=True)
    _check_record(out, release, near_dup_chars if keep is not None else None)
    tmp = out / TMP_NAME
    for stale in [tmp, *(out / "images").glob(".part-*")]:  # left by an interrupted fetch
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()

    def download(filename: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id=HF_REPO, repo_type="dataset", filename=filename, local_dir=tmp))
        except Exception as e:  # network, auth, offline mode: one clear line
            raise DataError(f"could not download {HF_REPO}/{filename} ({type(e).__name__}: {e}); "
                            "check the internet connection (and unset HF_HUB_OFFLINE)") from e

    try:
        meta_file = download(rel.metadata)
        wanted = sorted(set(parts) | set(_part_dirs(out)))
        meta = pd.read_parquet(meta_file, filters=[("part_id", "in", wanted)])
        meta_file.unlink()
        names = None
        if keep is not None:
            rows = meta[meta["part_id"].isin(parts)]
            rows = rows[np.asarray(keep(rows.assign(image_id=rows["image_name"].map(lambda s: Path(s).stem))))]
            names = rows.groupby("part_id")["image_name"].agg(set).to_dict()
            log.info("%s: %d of %d rows pass the text rules", subset, len(rows), int(meta["part_id"].isin(parts).sum()))
        todo = [p for p in parts if not (out / "images" / f"part-{p:06d}" / f"part-{p:06d}.json").exists()]
        for part_id in tqdm(todo, desc=f"fetch {subset}", unit="part"):
            archive = download(rel.part_file(part_id))
            extract_part(archive, out, part_id, None if names is None else names.get(part_id, set()))
            archive.unlink()
        save_parquet(out / "metadata.parquet", _on_disk(meta, out).reset_index(drop=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: %d parts of %s in %s", subset, len(parts), rel.name, out)
    return out
