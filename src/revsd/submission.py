"""Kaggle "Stable Diffusion - Image to Prompts" submission: ``imgId_eId,val``, 384 rows per image, eId 0..383.

Keys are parsed with ``rsplit("_", 1)``: the eId is always the trailing integer, so image ids containing "_"
(the embedded sample's ``Artist__TL``) stay unambiguous. Ids must not contain commas, quotes or whitespace.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from revsd.artifacts import save_csv

EMB_DIM = 384
_BAD_ID = re.compile(r"[\s,\"']")


class SubmissionError(ValueError):
    pass


def validate(ids, emb: np.ndarray, dim: int = EMB_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Check shape, finiteness and ids; returns (ids as str, emb as float32)."""
    ids = np.asarray(ids).astype(str)
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape != (len(ids), dim):
        raise SubmissionError(f"submission: embeddings of shape {emb.shape}, expected ({len(ids)}, {dim})")
    if len(ids) == 0:
        raise SubmissionError("submission: no images to write")
    if not np.isfinite(emb).all():
        raise SubmissionError(f"submission: {int((~np.isfinite(emb)).any(1).sum())} rows contain NaN/inf")
    bad = [i for i in ids.tolist() if not i or _BAD_ID.search(i)]
    if bad:
        raise SubmissionError(f"submission: image ids must be non-empty without commas/quotes/spaces, got {bad[:3]}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise SubmissionError(f"submission: duplicate image ids {uniq[counts > 1][:3].tolist()}")
    return ids, emb.astype(np.float32)


def write_submission(ids, emb: np.ndarray, path: str | Path) -> Path:
    """Validate, then write ``imgId_eId,val`` atomically (rows ordered by the given ids, eId 0..383)."""
    ids, emb = validate(ids, emb)
    keys = np.char.add(np.char.add(np.repeat(ids, EMB_DIM), "_"), np.tile(np.arange(EMB_DIM).astype(str), len(ids)))
    df = pd.DataFrame({"imgId_eId": keys, "val": emb.reshape(-1)})
    return save_csv(path, df, float_format="%.7g")


def read_submission(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`write_submission`: (ids in file order, emb (n, 384) float32); checks completeness."""
    path = Path(path)
    df = pd.read_csv(path, dtype={"imgId_eId": str, "val": np.float64})
    if list(df.columns) != ["imgId_eId", "val"]:
        raise SubmissionError(f"{path}: columns {list(df.columns)}, expected ['imgId_eId', 'val']")
    parts = df["imgId_eId"].str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any() or not parts[1].str.fullmatch(r"\d+").all():
        raise SubmissionError(f"{path}: keys must look like <imgId>_<eId>")
    img, eid = parts[0].to_numpy(str), parts[1].astype(int).to_numpy()
    ids = pd.unique(img)
    if len(df) != len(ids) * EMB_DIM or not (eid.reshape(-1, EMB_DIM) == np.arange(EMB_DIM)).all() or \
            not (img.reshape(-1, EMB_DIM) == ids[:, None]).all():
        raise SubmissionError(f"{path}: expected {EMB_DIM} consecutive rows (eId 0..{EMB_DIM - 1}) per image")
    return ids.astype(str), df["val"].to_numpy(np.float32).reshape(-1, EMB_DIM)
