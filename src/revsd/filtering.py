"""01_filter: the paper's prompt-cleaning rules, near-duplicate removal, grouped train/val/test splits and folds.

Rules, applied in order, each reported with the row count after it (``filter_report.csv``):

1. ``strip_whitespace``: leading/trailing whitespace removed (inner spacing untouched).
2. ``min_words_null``: drop prompts with fewer than one word (no letter or digit) or that "contain Null/NaN".
   We read the paper as meaning missing values and their serialised forms, not the English words: a prompt is
   dropped if it is missing, if its whole text is a null literal (``nan``, ``null``, ``none``, ``<na>``, any
   case), or if it holds ``NaN``/``NULL``/``Null`` as a standalone word in exactly that casing (a template
   filled with a missing value). Lower-case words inside a longer prompt are kept ("nan goldin", "null space").
3. ``near_duplicates``: rows are visited in a fixed order (by ``part_id`` when the table has it, i.e. DiffusionDB's
   release order, then by ``image_id``; independent of the table's row order). A row is dropped when its whole
   prompt (any length), or its first ``near_dup_chars`` characters, or its last ones (prompts of at least
   ``near_dup_chars`` characters) equal those of a row already kept. Only kept rows drop others, so nothing
   chains: with a~b (shared prefix) and b~c (shared suffix) but a≁c, a is kept, b dropped, c kept.
   ``near_dup_chars = 0`` turns the rule off. See docs/filtering.md for the measurements.
4. ``embed_dedup`` (optional): MiniLM cosine >= ``embed_dedup_threshold`` links prompts; one per component kept.
5. ``bad_images``: images that do not decode are written to ``bad_images.csv`` and skipped.

Image files of the source that no table row lists are named in ``skipped_inputs.csv`` (path, reason).

Splits: ``group`` = connected components of {identical prompt, shared first/last ``near_dup_chars`` characters,
``group_column`` value (e.g. artist) when present}. After rule 3 no two kept rows share a prompt or an affix, so
on its output groups chain only through ``group_column``; on tables that skipped rule 3 (``near_dup_chars = 0``
or other callers) near-identical prompts still land in one group, so they never straddle a split. Groups are
shuffled with ``seed`` and cut by cumulative row count into test / val / train, then train groups are cut the same
way into ``n_folds`` folds, so no group straddles two splits or folds.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from revsd import paths
from revsd.artifacts import save_csv, save_parquet
from revsd.config import ConfigError, StageConfig
from revsd.data import DataError, load_dataset
from revsd.images import ImageError, open_rgb

log = logging.getLogger(__name__)

STAGE = "01_filter"
NULL_LITERALS = ("nan", "null", "none", "<na>")
NULL_WORD_RE = r"\b(?:NaN|NULL|Null)\b"
WORD_RE = r"[^\W_]"  # a letter or digit, any script


@dataclasses.dataclass(frozen=True)
class FilterConfig(StageConfig):
    exp: str = "demo"  # experiment name: outputs go to working/01_filter/<exp>/
    source: str = "sample"  # "sample" = input/sample; else a folder relative to the input dir, or absolute
    fmt: str = "auto"  # auto | diffusiondb | kaggle
    limit: int = 0  # 0 = all rows; smoke mode keeps the first N loaded rows
    near_dup_chars: int = 50  # shared leading/trailing characters that make two prompts near duplicates; 0 = off
    embed_dedup_threshold: float = 0.0  # 0 = off; else MiniLM cosine >= this marks near duplicates
    group_column: str = "artist"  # extra grouping key when the table has it ("" = none)
    val_size: float = 30 / 730  # fraction of rows (whole groups) for validation; paper 30k of 730k
    test_size: float = 30 / 730  # fraction of rows (whole groups) for the held-out test split
    n_folds: int = 5  # K folds over the train split, grouped
    seed: int = 0  # shuffles groups before splitting
    check_images: bool = True  # decode every image; unreadable ones go to bad_images.csv and are skipped


# ---------------------------------------------------------------------------------------------- text rules


def strip_prompts(prompts: pd.Series) -> pd.Series:
    """Rule 1: strip leading/trailing whitespace; missing values stay missing."""
    return prompts.str.strip()


def valid_prompt_mask(prompts: pd.Series) -> np.ndarray:
    """Rule 2: True for prompts with at least one word and no Null/NaN (see the module docstring)."""
    s = prompts.astype("string")
    ok = (s.notna() & ~s.str.lower().isin(NULL_LITERALS)).fillna(False).to_numpy(dtype=bool, copy=True)
    # Unicode-aware regexes are slow on millions of rows: run them only where a cheap test is inconclusive.
    no_ascii_word = ~s.str.contains("[A-Za-z0-9]", regex=True).fillna(False).to_numpy(dtype=bool)
    check = ok & no_ascii_word
    ok[check] = s[check].str.contains(WORD_RE, regex=True).to_numpy(dtype=bool)
    maybe_null = s.str.contains("NaN|NULL|Null", regex=True).fillna(False).to_numpy(dtype=bool)
    check = ok & maybe_null
    ok[check] = ~s[check].str.contains(NULL_WORD_RE, regex=True).to_numpy(dtype=bool)
    return ok


def _key_codes(keys: pd.Series) -> np.ndarray:
    """Integer code per row for a key column (-1 where the key is missing)."""
    codes, _ = pd.factorize(keys, use_na_sentinel=True)
    return codes


def affix_codes(prompts: pd.Series, n: int) -> list[np.ndarray]:
    """Codes of the first and of the last ``n`` characters (-1 for prompts shorter than ``n``)."""
    if n <= 0:
        return []
    long = prompts.str.len().to_numpy() >= n
    out = []
    for key in (prompts.str[:n], prompts.str[-n:]):
        codes = _key_codes(key)
        codes[~long] = -1
        out.append(codes)
    return out


def components(n: int, key_codes: list[np.ndarray]) -> np.ndarray:
    """Connected components of rows linked by sharing any key (codes >= 0); returns a label per row.

    Rows and key values form a bipartite graph, so the transitive closure costs one sparse graph pass.
    """
    rows, cols, offset = [np.arange(n)], [np.arange(n)], n
    for codes in key_codes:
        m = codes >= 0
        rows.append(np.flatnonzero(m))
        cols.append(codes[m] + offset)
        offset += int(codes.max(initial=-1)) + 1
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sp.coo_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(offset, offset))
    _, labels = connected_components(graph, directed=False)
    return labels[:n]


def _id_rank(image_ids) -> np.ndarray:
    """Rank of each (unique) image_id in sorted order, as integers (cheaper to compare than strings)."""
    ids = pa.array(pd.Series(image_ids).astype(str))
    return pc.rank(ids, sort_keys="ascending", tiebreaker="first").to_numpy().astype(np.int64) - 1


def dedup_order(df: pd.DataFrame) -> np.ndarray:
    """Row positions in the order rule 3 visits them: by ``part_id`` when present, then by ``image_id``."""
    keys = [_id_rank(df["image_id"])]
    if "part_id" in df.columns:
        keys.append(pd.to_numeric(df["part_id"], errors="coerce").fillna(np.inf).to_numpy(dtype=float))
    return np.lexsort(keys)  # the last key is the primary one


def near_duplicate_representatives(prompts: pd.Series, order: np.ndarray, n_chars: int = 50) -> np.ndarray:
    """Rule 3: for each row, the position of the kept row it collapses into (itself when kept).

    Rows are visited in ``order``; a row is kept unless its whole prompt, or its first or last ``n_chars``
    characters, equal those of a row kept before it (checked in that order of keys). Rows whose keys are all
    unique can neither be dropped nor drop another row, so the sequential pass only visits the others.
    """
    prompts = prompts.reset_index(drop=True)
    n = len(prompts)
    rep = np.arange(n)
    if n_chars <= 0 or n == 0:
        return rep
    keys = [_key_codes(prompts), *affix_codes(prompts, n_chars)]
    shared = np.zeros(n, dtype=bool)
    for codes in keys:
        counts = np.bincount(codes[codes >= 0], minlength=1)
        shared |= (codes >= 0) & (counts[np.maximum(codes, 0)] > 1)
    todo = np.asarray(order)[shared[np.asarray(order)]]
    cols = [k[todo].tolist() for k in keys]
    owners = [[-1] * (int(k.max(initial=-1)) + 1) for k in keys]  # key code -> kept row position
    for j, i in enumerate(todo.tolist()):
        hit = next((o[c[j]] for o, c in zip(owners, cols) if c[j] >= 0 and o[c[j]] >= 0), -1)
        if hit >= 0:
            rep[i] = hit
        else:
            for o, c in zip(owners, cols):
                if c[j] >= 0:
                    o[c[j]] = i
    return rep


def near_duplicate_keep(df: pd.DataFrame, n_chars: int = 50) -> np.ndarray:
    """Rule 3 as a mask over ``df``'s rows (needs ``prompt``, ``image_id``; uses ``part_id`` when present)."""
    rep = near_duplicate_representatives(df["prompt"], dedup_order(df), n_chars)
    return rep == np.arange(len(rep))


def keep_one_per_cluster(labels: np.ndarray, image_ids: pd.Series) -> np.ndarray:
    """Mask keeping, in each cluster, the row with the smallest image_id (used by the embedding rule)."""
    labels = np.asarray(labels)
    order = np.lexsort((_id_rank(image_ids), labels))
    first = order[np.r_[True, labels[order][1:] != labels[order][:-1]]] if len(order) else order
    keep = np.zeros(len(labels), dtype=bool)
    keep[first] = True
    return keep


def text_rules_keep(df: pd.DataFrame, near_dup_chars: int = 50) -> np.ndarray:
    """Rules 1-3 as a mask over ``df``'s rows (``revsd data fetch --filter`` extracts only these images)."""
    kept, _, _ = apply_rules(df.reset_index(drop=True), FilterConfig(near_dup_chars=near_dup_chars,
                                                                        check_images=False))
    return df["image_id"].isin(kept["image_id"]).to_numpy()


def embedding_clusters(emb: np.ndarray, threshold: float, block: int | None = None) -> np.ndarray:
    """Components of the graph "cosine >= threshold" over L2-normalised rows (blockwise, O(n^2) dot products).

    ``block`` rows at a time; by default sized so one similarity block stays near 256 MB.
    """
    emb = np.asarray(emb, dtype=np.float32)
    n = len(emb)
    block = block or max(1, 2**26 // max(n, 1))
    rows, cols = [], []
    for start in tqdm(range(0, n, block), desc="embed dedup", unit="block", disable=n <= block):
        sims = emb[start:start + block] @ emb.T
        r, c = np.nonzero(sims >= threshold)
        rows.append(r + start)
        cols.append(c)
    r, c = (np.concatenate(rows), np.concatenate(cols)) if rows else (np.zeros(0, int), np.zeros(0, int))
    graph = sp.coo_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


# ---------------------------------------------------------------------------------------------- splits


def assign_groups(df: pd.DataFrame, near_dup_chars: int = 50, group_column: str = "") -> pd.Series:
    """``group`` label per row: components of identical prompt ∪ near-duplicate relation ∪ group_column value.

    Labels are ``g<k>``, numbered by each group's smallest image_id (stable under row order).
    """
    prompts = df["prompt"].reset_index(drop=True)
    keys = [_key_codes(prompts), *affix_codes(prompts, near_dup_chars)]
    if group_column and group_column in df.columns:
        keys.append(_key_codes(df[group_column].reset_index(drop=True)))
    labels = components(len(df), keys)
    first_id = pd.Series(_id_rank(df["image_id"])).groupby(labels).transform("min").to_numpy()
    number = np.unique(first_id, return_inverse=True)[1]  # groups numbered by their smallest image_id
    width = len(str(max(int(number.max(initial=0)), 1)))
    return ("g" + pd.Series(number, index=df.index).astype(str).str.zfill(width)).rename("group")


def _cut_groups(groups: pd.Series, fractions: list[float], seed: int) -> pd.Series:
    """Shuffle groups, lay them end to end by row count, and cut at the cumulative ``fractions``.

    Returns the bin index per row; a group falls in the bin where it starts, so it is never split.
    """
    codes, _ = pd.factorize(groups, sort=True)  # sorted: independent of row order
    sizes = np.bincount(codes)
    order = np.random.default_rng(seed).permutation(len(sizes))
    start = np.empty(len(sizes))
    start[order] = (np.cumsum(sizes[order]) - sizes[order]) / max(len(codes), 1)
    bins = np.searchsorted(np.cumsum(fractions)[:-1], start, side="right")
    return pd.Series(bins[codes], index=groups.index)


def split_and_fold(groups: pd.Series, val_size: float, test_size: float, n_folds: int, seed: int = 0
                   ) -> tuple[pd.Series, pd.Series]:
    """``split`` (train|val|test) and ``fold`` (0..K-1 on train, -1 elsewhere) per row, by whole groups."""
    if not (0 <= val_size < 1 and 0 <= test_size < 1 and val_size + test_size < 1):
        raise ValueError(f"val_size={val_size} and test_size={test_size} must be fractions summing below 1")
    if n_folds < 1:
        raise ValueError(f"n_folds={n_folds}: need at least 1 fold")
    bins = _cut_groups(groups, [test_size, val_size, 1 - test_size - val_size], seed)
    split = bins.map({0: "test", 1: "val", 2: "train"}).rename("split")
    train = split == "train"
    n_train_groups = groups[train].nunique()
    if n_train_groups < n_folds:
        raise DataError(f"only {n_train_groups} prompt groups in the train split, fewer than n_folds={n_folds}; "
                        "lower n_folds or use more data (limit)")
    fold = pd.Series(-1, index=groups.index, name="fold", dtype=np.int64)
    fold[train] = _cut_groups(groups[train], [1 / n_folds] * n_folds, seed + 1).astype(np.int64)
    for name in ("test", "val"):
        if (split == name).sum() == 0 and (test_size if name == "test" else val_size) > 0:
            log.warning("the %s split is empty (too few groups for the requested fraction)", name)
    return split, fold


# ---------------------------------------------------------------------------------------------- stage


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


def resolve_source(source: str) -> Path:
    """``"sample"`` -> the embedded sample; a relative path -> under the input dir; absolute paths as given."""
    if source == "sample":
        return paths.sample_dir()
    p = Path(source)
    return p if p.is_absolute() else paths.input_dir() / p


class _Report:
    def __init__(self, n: int):
        self.rows: list[dict] = []
        self.n = n

    def step(self, name: str, after: int) -> None:
        self.rows.append({"step": name, "rows_before": self.n, "rows_after": after, "dropped": self.n - after})
        log.info("%-18s %9d -> %9d", name, self.n, after)
        self.n = after

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["step", "rows_before", "rows_after", "dropped"])


def apply_rules(df: pd.DataFrame, cfg: FilterConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Rules 1-5 on a loaded table; returns ``(kept, report, bad_images)``."""
    report = _Report(len(df))
    df = df.assign(prompt=strip_prompts(df["prompt"]))
    report.step("strip_whitespace", len(df))
    df = df[valid_prompt_mask(df["prompt"])].reset_index(drop=True)
    report.step("min_words_null", len(df))
    if cfg.near_dup_chars > 0:
        df = df[near_duplicate_keep(df, cfg.near_dup_chars)].reset_index(drop=True)
        report.step("near_duplicates", len(df))
    if cfg.embed_dedup_threshold > 0:
        from revsd.textenc import encode_prompts

        labels = embedding_clusters(encode_prompts(df["prompt"].tolist()), cfg.embed_dedup_threshold)
        df = df[keep_one_per_cluster(labels, df["image_id"])].reset_index(drop=True)
        report.step("embed_dedup", len(df))
    bad = pd.DataFrame(columns=["image_id", "image_path", "error"])
    if cfg.check_images:
        df, bad = check_images(df)
        report.step("bad_images", len(df))
    return df, report.table(), bad


def check(cfg: FilterConfig) -> None:
    """Settings that can never work (the runner calls this before anything runs)."""
    if not (0 <= cfg.val_size < 1 and 0 <= cfg.test_size < 1 and cfg.val_size + cfg.test_size < 1):
        raise ConfigError(f"val_size={cfg.val_size} and test_size={cfg.test_size} must be fractions in [0, 1) "
                          "summing below 1")
    if cfg.n_folds < 1 or cfg.limit < 0:
        raise ConfigError(f"n_folds={cfg.n_folds} must be >= 1 and limit={cfg.limit} >= 0")


def run(cfg: FilterConfig) -> pd.DataFrame:
    """Load ``cfg.source``, apply the rules, split, and write filtered.parquet + reports; returns the table."""
    check(cfg)
    root = resolve_source(cfg.source)
    df = load_dataset(root, cfg.fmt)
    skipped = pd.DataFrame(df.attrs.pop("skipped", []), columns=["path", "reason"])  # pop: attrs travel with df
    if cfg.limit:
        df = df.head(cfg.limit).reset_index(drop=True)
    df, report, bad = apply_rules(df, cfg)
    if len(df) == 0:
        raise DataError(f"{root}: no rows left after filtering (see the report: {report.to_dict('records')}); "
                        "check the prompts or relax the rules")
    df.insert(3, "group", assign_groups(df, cfg.near_dup_chars, cfg.group_column))
    split, fold = split_and_fold(df["group"], cfg.val_size, cfg.test_size, cfg.n_folds, cfg.seed)
    df.insert(4, "split", split)
    df.insert(5, "fold", fold)

    out = paths.stage_dir(STAGE, cfg.exp)
    save_parquet(out / "filtered.parquet", df.assign(image_path=df["image_path"].map(paths.portable)))
    save_csv(out / "filter_report.csv", report)
    save_csv(out / "bad_images.csv", bad)
    save_csv(out / "skipped_inputs.csv", skipped)
    cfg.save(out / "config.json")
    print(f"01_filter: {root} -> {out}")
    if len(skipped):
        names = [Path(p).name for p in skipped["path"]]
        print(f"skipped {len(names)} input file(s) that no table row lists (all in skipped_inputs.csv): "
              + ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else ""))
    print(report.to_string(index=False))
    print(df.groupby("split")["group"].agg(rows="size", groups="nunique").to_string())
    return df
