"""Where everything lives. One place roots all paths at ``input/`` and ``working/``.

Override with environment variables (e.g. on Kaggle ``REVSD_INPUT=/kaggle/input``,
``REVSD_WORKING=/kaggle/working``):

- ``REVSD_ROOT``     repository root (default: found by walking up from this file / the cwd)
- ``REVSD_INPUT``    input data root (default ``<root>/input``)
- ``REVSD_WORKING``  artifacts root (default ``<root>/working``)
- ``REVSD_SUBMISSIONS`` submissions folder (default ``<root>/submissions``)

Artifact layout (the contract between stages; later stages join on ``image_id``):

    working/01_filter/<exp>/filtered.parquet      one row per image: image_id, image_path, prompt, group,
                                                  split (train|val|test), fold (0..K-1 on train, -1 otherwise)
    working/02_targets/<exp>/targets.npy           float32 (n, 384), row-aligned with filtered.parquet
    working/02_targets/<exp>/vocab.json, labels.npz
    working/03_train/<exp>/<run>/                  config.json, summary.csv, model.safetensors,
                                                  preds_{train,oof,test}.npz, sample_cosines.csv
    working/05_curriculum/<exp>/<run>/             same files as a 03_train run
    working/06_dakl_ensemble/<exp>/                final.npz, report.md
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    env = os.environ.get("REVSD_ROOT")
    if env:
        return Path(env).resolve()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for p in (start, *start.parents):
            if (p / "pyproject.toml").exists() and (p / "src" / "revsd").is_dir():
                return p
    return Path.cwd()


def input_dir() -> Path:
    return Path(os.environ.get("REVSD_INPUT") or repo_root() / "input")


def working_dir() -> Path:
    return Path(os.environ.get("REVSD_WORKING") or repo_root() / "working")


def submissions_dir() -> Path:
    return Path(os.environ.get("REVSD_SUBMISSIONS") or repo_root() / "submissions")


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def sample_dir() -> Path:
    """The embedded real sample (DiffusionDB on-disk format)."""
    return input_dir() / "sample"


def stage_dir(stage: str, exp: str, run: str | None = None, create: bool = True) -> Path:
    """``working/<stage>/<exp>[/<run>]``; created unless ``create=False``."""
    p = working_dir() / stage / exp
    if run:
        p = p / run
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p


def portable(path: str | Path) -> str:
    """A path as stored in tables: relative to ``input/`` when it lies below it (so the table survives a move to
    another machine or ``/kaggle/input``), else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(input_dir().resolve()).as_posix()
    except ValueError:
        return str(p)


def resolve_input(path: str | Path) -> Path:
    """Inverse of :func:`portable`: relative paths are taken relative to ``input/``."""
    p = Path(path)
    return p if p.is_absolute() else input_dir() / p


def filtered_table(exp: str) -> Path:
    return stage_dir("01_filter", exp, create=False) / "filtered.parquet"


def targets_dir(exp: str) -> Path:
    return stage_dir("02_targets", exp, create=False)
