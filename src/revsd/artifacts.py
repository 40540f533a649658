"""Artifact I/O shared by all stages: atomic writes, predictions keyed by image id, per-epoch CSV rows.

Every file is written to a temporary sibling and renamed into place, so an interrupted run never leaves a
half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the artifact normal permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def save_npy(path: str | Path, arr: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return Path(path)


def save_parquet(path: str | Path, df) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def save_csv(path: str | Path, df, index: bool = False, **to_csv_kwargs) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=index, **to_csv_kwargs)
    return Path(path)


def append_csv_row(path: str | Path, row: dict) -> None:
    """Append one row (e.g. an epoch) to a CSV, writing the header if the file is new. Flushed at once."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row.keys()))
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Predictions:
    """Predicted embeddings keyed by image id (and optional vocabulary probabilities)."""

    ids: np.ndarray  # (n,) str
    emb: np.ndarray  # (n, 384) float32, L2-normalised
    probs: np.ndarray | None = None  # (n, m) float32 vocabulary-head probabilities

    def __post_init__(self):
        self.ids = np.asarray(self.ids).astype(str)
        self.emb = np.asarray(self.emb, dtype=np.float32)
        if self.emb.ndim != 2 or len(self.emb) != len(self.ids):
            raise ValueError(f"Predictions: emb shape {self.emb.shape} does not match {len(self.ids)} ids")
        if len(set(self.ids.tolist())) != len(self.ids):
            raise ValueError("Predictions: duplicate image ids")
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if len(self.probs) != len(self.ids):
                raise ValueError("Predictions: probs rows do not match ids")

    def __len__(self) -> int:
        return len(self.ids)

    def align(self, ids) -> "Predictions":
        """Reorder to ``ids``; raises naming the missing ids."""
        ids = np.asarray(ids).astype(str)
        index = {k: i for i, k in enumerate(self.ids.tolist())}
        missing = [k for k in ids.tolist() if k not in index]
        if missing:
            raise KeyError(f"{len(missing)} ids missing from predictions, e.g. {missing[:3]}")
        rows = np.array([index[k] for k in ids.tolist()], dtype=np.int64)
        return Predictions(ids, self.emb[rows], None if self.probs is None else self.probs[rows])


def save_predictions(path: str | Path, preds: Predictions) -> Path:
    arrays = {"ids": preds.ids, "emb": preds.emb}
    if preds.probs is not None:
        arrays["probs"] = preds.probs
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


def load_predictions(path: str | Path) -> Predictions:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no predictions at {path}: run the stage that writes it first")
    with np.load(path, allow_pickle=False) as z:
        return Predictions(z["ids"], z["emb"], z["probs"] if "probs" in z.files else None)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content (hex), read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
