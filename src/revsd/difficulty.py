"""04_difficulty: a preliminary run of E epochs in the normal regime scores each training image's difficulty.

The run is a normal-regime 03_train run (the same engine, ``train.run(..., stage="04_difficulty")``), whose
``sample_cosines.csv`` holds every training sample's cosine after every epoch. Difficulty = the mean cosine
over the epochs (high = easy). Written to ``working/04_difficulty/<exp>/<run>/difficulty.csv``
(image_id, difficulty, cos_epoch_1..E). If 03_train already finished a run with exactly the same settings,
its cosines are reused instead of retraining (logged).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from revsd import artifacts, paths, runs, train

log = logging.getLogger(__name__)

STAGE = "04_difficulty"


@dataclasses.dataclass(frozen=True)
class DifficultyConfig(train.TrainConfig):
    """Every 03_train setting (``epochs`` is E, the length of the preliminary phase), plus:"""

    reuse: bool = True  # reuse a finished 03_train run with exactly these settings instead of retraining

    def train_config(self) -> "train.TrainConfig":
        return train.as_train_config(self)


check = train.check  # 04's settings are 03's (the runner calls it before anything runs)


def difficulty_table(sample_cosines: pd.DataFrame) -> pd.DataFrame:
    """(image_id, epoch, cosine) rows -> one row per image: difficulty (mean over epochs) + cos_epoch_<e>."""
    missing = {"image_id", "epoch", "cosine"} - set(sample_cosines.columns)
    if missing:
        raise ValueError(f"sample_cosines needs columns image_id, epoch, cosine; missing {sorted(missing)}")
    wide = sample_cosines.pivot_table(index="image_id", columns="epoch", values="cosine", aggfunc="mean")
    if wide.isna().any().any():
        bad = wide.index[wide.isna().any(axis=1)].tolist()
        raise ValueError(f"{len(bad)} training images lack a cosine for some epoch (e.g. {bad[:3]}): "
                         "the preliminary run is incomplete; rerun 04_difficulty")
    wide.columns = [f"cos_epoch_{int(e)}" for e in wide.columns]
    out = wide.reset_index()
    out.insert(1, "difficulty", wide.mean(axis=1).to_numpy())
    out["image_id"] = out["image_id"].astype(str)
    return out


def difficulty_path(exp: str, run: str) -> Path:
    return paths.stage_dir(STAGE, exp, run, create=False) / "difficulty.csv"


def run(cfg: DifficultyConfig) -> Path:
    """Score every training image; returns the run directory holding ``difficulty.csv``."""
    tcfg = cfg.train_config()
    reusable = [p for p in runs.matching_runs("03_train", tcfg.to_dict(), normalise=train.comparable)
                if (p / "sample_cosines.csv").exists()]
    if cfg.reuse and reusable:
        source = reusable[0]
        log.info("reusing sample_cosines.csv of the finished 03_train run %s (same settings)", source)
        print(f"04_difficulty: reusing the per-sample cosines of the finished 03_train run {source} "
              "(exactly the same settings; no retraining)")
        run_dir = paths.stage_dir(STAGE, cfg.exp, train.run_name(tcfg))
        saved = run_dir / "difficulty.json"  # scores of other settings are never overwritten silently
        if saved.exists():
            old = artifacts.read_json(saved)["config"]
            diff = runs.config_diff(train.comparable(old), train.comparable(cfg.to_dict()))
            if diff:
                raise runs.conflict(run_dir, diff, "difficulty scores")
    else:
        source = run_dir = train.run(tcfg, stage=STAGE)
    table = difficulty_table(pd.read_csv(source / "sample_cosines.csv", dtype={"image_id": str}))
    artifacts.save_csv(run_dir / "difficulty.csv", table)
    invalid = source / "invalid_images.csv"  # unreadable images: skipped by the engine, so never scored
    artifacts.write_json(run_dir / "difficulty.json", {
        "config": cfg.to_dict(), "cosines_from": source.relative_to(paths.working_dir()).as_posix(),
        "n_images": len(table), "epochs": len(table.columns) - 2,
        "invalid_images": pd.read_csv(invalid, dtype={"image_id": str})["image_id"].tolist()
        if invalid.exists() else []})
    return run_dir


def load(exp: str, run: str) -> pd.DataFrame:
    """``difficulty.csv`` of a 04_difficulty run (image_id as str)."""
    path = difficulty_path(exp, run)
    if not path.exists():
        raise FileNotFoundError(f"no difficulty scores at {path}: run notebooks/04_difficulty.py with "
                                f"exp={exp!r} (and run={run!r}) first")
    return pd.read_csv(path, dtype={"image_id": str})


def invalid_ids(exp: str, run: str) -> list[str]:
    """Training images the preliminary run could not read (no score; 05 puts them in the hard chunk)."""
    return artifacts.read_json(difficulty_path(exp, run).with_name("difficulty.json")).get("invalid_images", [])


def extremes(exp: str, table: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """The ``n`` easiest and ``n`` hardest images with their prompts and paths (column ``kind``)."""
    from revsd import targets

    meta = targets.load(exp).table[["image_id", "image_path", "prompt"]].astype({"image_id": str})
    ranked = table[["image_id", "difficulty"]].sort_values("difficulty", ascending=False, kind="stable")
    picked = pd.concat([ranked.head(n).assign(kind="easiest"), ranked.tail(n)[::-1].assign(kind="hardest")])
    return picked.merge(meta, on="image_id", how="left")


def plot_extremes(examples: pd.DataFrame, thumb: int = 160):
    """A grid: easiest images on the first row, hardest on the second, titled with score and prompt."""
    import textwrap

    import matplotlib.pyplot as plt

    from revsd.images import ImageError, open_rgb

    kinds = list(dict.fromkeys(examples["kind"]))
    ncol = int(examples["kind"].value_counts().max())
    fig, axes = plt.subplots(len(kinds), ncol, figsize=(3 * ncol, 3.6 * len(kinds)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, kind in enumerate(kinds):
        for c, row in enumerate(examples[examples["kind"] == kind].itertuples()):
            try:
                img = open_rgb(row.image_path)
                img.thumbnail((thumb, thumb))
                axes[r, c].imshow(img)
            except ImageError as e:
                axes[r, c].text(0.5, 0.5, str(e)[:80], ha="center", wrap=True)
            title = textwrap.shorten(str(row.prompt), 90)
            axes[r, c].set_title(f"{kind} {row.difficulty:.3f}\n" + "\n".join(textwrap.wrap(title, 32)), fontsize=7)
    fig.tight_layout()
    return fig
