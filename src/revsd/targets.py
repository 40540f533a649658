"""02_targets: all-MiniLM-L6-v2 prompt embeddings (the regression targets), vocabulary and label matrix.

At DiffusionDB scale: MiniLM runs on the GPU when there is one (batches of 1024), and the vocabulary/labels use
``revsd.vocab``'s batched spaCy tagger (``bench/bench_targets.py``: same labels as spaCy's own pipeline).

Reads ``working/01_filter/<exp>/filtered.parquet``; writes into ``working/02_targets/<exp>/``:
``targets.npy`` float32 (n, 384) L2-normalised and row-aligned with the filtered table, ``ids.npy`` (image ids
in row order, to check that alignment), ``vocab.json``, ``labels.npz`` (scipy CSR uint8 (n, m)) and
``config.json``. The vocabulary is built on training rows only; labels cover every row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from revsd import paths, vocab
from revsd.artifacts import atomic_path, read_json, save_npy, write_json
from revsd.config import ConfigError, StageConfig
from revsd.device import resolve_device
from revsd.textenc import DEFAULT_MODEL, EMB_DIM, encode_prompts  # noqa: F401  (targets.EMB_DIM is public)

STAGE = "02_targets"
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class TargetsConfig(StageConfig):
    exp: str = "demo"  # experiment: reads working/01_filter/<exp>/filtered.parquet
    model: str = ""  # "" is the packaged all-MiniLM-L6-v2 (offline); else a hub name or a local folder
    vocab_size: int = 1000  # m, words kept in the vocabulary
    vocab_min_count: int = 2  # a word must occur in at least this many training prompts
    vocab_pos: str = "ADJ,NOUN,VERB"  # spaCy word classes in the vocabulary (the paper's); add PROPN for names
    batch_size: int = 0  # prompts per MiniLM batch; 0 = auto: 1024 on a GPU, 128 on the CPU
    device: str = ""  # "" means cuda if available, else cpu
    force: bool = False  # recompute the embeddings even when targets.npy matches the table


@dataclasses.dataclass
class TargetSet:
    """Stage 02's outputs joined with the filtered table (row i of every array is row i of ``table``)."""

    table: pd.DataFrame
    emb: np.ndarray  # (n, 384) float32
    words: list[str]
    labels: sp.csr_matrix  # (n, m) uint8
    counts: list[int] = dataclasses.field(default_factory=list)  # training prompts containing each word

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> np.ndarray:
        return _ids(self.table)

    def rows(self, split: str) -> np.ndarray:
        """Row indices of ``split`` (train, val or test)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(self.table["split"].to_numpy() == split)


def _ids(table: pd.DataFrame) -> np.ndarray:
    """Image ids as a fixed-width unicode array (saved without pickle)."""
    return np.asarray(table["image_id"].astype(str).tolist(), dtype=str)


def _read_filtered(exp: str) -> pd.DataFrame:
    path = paths.filtered_table(exp)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 01_filter first for exp={exp!r} "
                                f"(notebooks/01_filter.py, or `revsd pipeline --profile demo`)")
    table = pd.read_parquet(path)
    if "image_path" in table.columns:  # stored relative to input/ where possible (paths.portable)
        table["image_path"] = table["image_path"].map(lambda p: str(paths.resolve_input(p)))
    missing = [c for c in ("image_id", "prompt", "split") if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}: rerun 01_filter to rebuild it")
    if table.empty:
        raise ValueError(f"{path} has no rows: check 01_filter's report (filter_report.csv)")
    return table


def _cached_targets(out: Path, ids: np.ndarray, model: str) -> np.ndarray | None:
    """The saved embeddings if they were made by ``model`` for exactly these ids, else None."""
    files = [out / n for n in ("targets.npy", "ids.npy", "vocab.json")]
    if not all(f.exists() for f in files):
        return None
    if read_json(files[2]).get("model") != (model or DEFAULT_MODEL):
        return None
    old_ids = np.load(files[1], allow_pickle=False)
    emb = np.load(files[0], allow_pickle=False)
    if len(old_ids) != len(ids) or not np.array_equal(old_ids.astype(str), ids) or emb.shape[0] != len(ids):
        return None
    return emb


def check(cfg: TargetsConfig) -> None:
    """Settings that can never work (the runner calls this before anything runs)."""
    if cfg.vocab_size < 1 or cfg.batch_size < 0 or cfg.vocab_min_count < 1:
        raise ConfigError(f"vocab_size={cfg.vocab_size} and vocab_min_count={cfg.vocab_min_count} must be >= 1, "
                          f"batch_size={cfg.batch_size} >= 0 (0 = auto)")
    vocab.parse_pos(cfg.vocab_pos)


def run(cfg: TargetsConfig) -> TargetSet:
    """Encode every prompt once, build the vocabulary on training rows, label every row; returns the set."""
    check(cfg)
    table = _read_filtered(cfg.exp)
    ids = _ids(table)
    prompts = table["prompt"].astype(str).tolist()
    train = np.flatnonzero(table["split"].to_numpy() == "train")
    if len(train) == 0:
        raise ValueError(f"{paths.filtered_table(cfg.exp)} has no split == 'train' rows to build the vocabulary on")
    out = paths.stage_dir(STAGE, cfg.exp)

    emb = None if cfg.force else _cached_targets(out, ids, cfg.model)
    if emb is None:
        device = resolve_device(cfg.device or None)
        batch = cfg.batch_size or (1024 if device.startswith("cuda") else 128)
        print(f"encoding {len(prompts)} prompts with MiniLM on {device}, batches of {batch}")
        emb = encode_prompts(prompts, cfg.model, batch, device, progress=True)
        save_npy(out / "targets.npy", emb)
        save_npy(out / "ids.npy", ids)
    else:
        print(f"targets.npy matches the filtered table ({len(ids)} rows): embeddings reused (force=True recomputes)")

    pos = vocab.parse_pos(cfg.vocab_pos)
    words, counts = vocab.build_vocab([prompts[i] for i in train], cfg.vocab_size, cfg.vocab_min_count, pos,
                                      progress=True)
    labels = vocab.label_matrix(prompts, words, pos, progress=True)
    with atomic_path(out / "labels.npz") as tmp:
        with open(tmp, "wb") as f:
            sp.save_npz(f, labels)
    write_json(out / "vocab.json", {"words": words, "counts": counts, "pos": ",".join(pos),
                                    "model": cfg.model or DEFAULT_MODEL, "n_train_prompts": int(len(train))})
    cfg.save(out / "config.json")
    return load(cfg.exp)


def load(exp: str) -> TargetSet:
    """Read stage 02's outputs with the filtered table; raises if they are missing or misaligned."""
    table = _read_filtered(exp)
    out = paths.targets_dir(exp)
    files = {n: out / n for n in ("targets.npy", "ids.npy", "vocab.json", "labels.npz")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: run 02_targets first for exp={exp!r} "
                                f"(notebooks/02_targets.py)")
    emb = np.load(files["targets.npy"], allow_pickle=False)
    saved_ids = np.load(files["ids.npy"], allow_pickle=False).astype(str)
    ids = _ids(table)
    if len(saved_ids) != len(ids) or not np.array_equal(saved_ids, ids) or len(emb) != len(ids):
        raise ValueError(f"{out} is not aligned with {paths.filtered_table(exp)} ({len(saved_ids)} saved ids vs "
                         f"{len(ids)} rows): 01_filter changed since; rerun 02_targets")
    meta = read_json(files["vocab.json"])
    labels = sp.load_npz(files["labels.npz"]).tocsr()
    if labels.shape != (len(ids), len(meta["words"])):
        raise ValueError(f"{files['labels.npz']} has shape {labels.shape}, expected {(len(ids), len(meta['words']))}:"
                         f" rerun 02_targets")
    return TargetSet(table, emb, list(meta["words"]), labels, list(meta.get("counts", [])))
