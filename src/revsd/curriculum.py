"""05_curriculum: retrain from scratch, introducing easy / medium / hard chunks cumulatively, easiest first.

Difficulty comes from 04_difficulty (mean training cosine over a preliminary run; high = easy). The chunks are
made by one of two heuristics (:func:`split_equal`, :func:`split_thresholds`) and fed to the unchanged 03_train
engine through :class:`CurriculumSampler`, which yields index batches for exactly as many optimizer steps as
the plain run. Within a stage the pool is shuffled; a sample is never yielded before its chunk's stage (the
released code of the paper re-shuffled after sorting and so lost the easy-first order).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from revsd import artifacts, difficulty, paths, runs, targets, train
from revsd.config import ConfigError
from revsd.difficulty import STAGE as STAGE_04

STAGE = "05_curriculum"

CHUNK_NAMES = ("easy", "medium", "hard")
HEURISTICS = ("equal", "thresholds")


# ---------------------------------------------------------------- chunking rules

def _desc_order(scores: np.ndarray) -> np.ndarray:
    """Positions from the highest score (easiest) down; ties keep their original order (deterministic)."""
    return np.argsort(-scores, kind="stable")


def _as_scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        raise ValueError(f"scores must be a non-empty 1-d array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite values")
    return s


def split_equal(scores) -> np.ndarray:
    """Three chunks of equal size (±1) by rank: 0 = easy (highest mean cosine), 1 = medium, 2 = hard.

    Ties are broken by position (earlier first), so the result is deterministic.
    """
    s = _as_scores(scores)
    labels = np.empty(len(s), dtype=np.int64)
    for chunk, part in enumerate(np.array_split(_desc_order(s), 3)):
        labels[part] = chunk
    return labels


def split_thresholds(scores, easy_share: float = 0.6, hard_share: float = 0.1
                     ) -> tuple[np.ndarray, tuple[float, float]]:
    """Two cosine thresholds ``(t_easy, t_hard)``; returns ``(labels, (t_easy, t_hard))``.

    Rule: with ``k_easy = round(easy_share * n)`` and ``k_hard = round(hard_share * n)``, ``t_easy`` is the
    k_easy-th highest score and ``t_hard`` the (k_hard+1)-th lowest. A sample is easy if ``score >= t_easy``,
    hard if ``score < t_hard``, medium otherwise. Without ties the shares are exactly k/n; samples tied at a
    threshold all go to the easier chunk (so easy may grow and hard shrink by the number of ties).
    """
    s = _as_scores(scores)
    if not (0.0 < easy_share <= 1.0 and 0.0 <= hard_share < 1.0 and easy_share + hard_share <= 1.0):
        raise ValueError(f"need 0 < easy_share <= 1, 0 <= hard_share < 1, easy_share + hard_share <= 1; "
                         f"got easy_share={easy_share}, hard_share={hard_share}")
    n = len(s)
    k_easy = max(1, int(round(easy_share * n)))
    k_hard = min(int(round(hard_share * n)), n - k_easy)
    asc = np.sort(s, kind="stable")
    t_easy = float(asc[n - k_easy])
    t_hard = float(asc[k_hard])  # hard = strictly below: exactly k_hard samples when there are no ties
    labels = np.ones(n, dtype=np.int64)
    labels[s >= t_easy] = 0
    labels[s < t_hard] = 2
    return labels, (t_easy, t_hard)


def make_chunks(scores, heuristic: str, easy_share: float = 0.6, hard_share: float = 0.1) -> np.ndarray:
    """Dispatch on ``heuristic`` ∈ {equal, thresholds}; returns labels 0/1/2."""
    if heuristic == "equal":
        return split_equal(scores)
    if heuristic == "thresholds":
        return split_thresholds(scores, easy_share, hard_share)[0]
    raise ValueError(f"heuristic must be one of {HEURISTICS}, got {heuristic!r}")


def parse_schedule(stage_starts: str | Sequence[float]) -> tuple[float, ...]:
    """``"0,0.33,0.66"`` (or a sequence) -> fractions of the total steps at which each chunk is added."""
    if isinstance(stage_starts, str):
        try:
            vals = tuple(float(x) for x in stage_starts.split(",") if x.strip())
        except ValueError as e:
            raise ValueError(f"stage_starts must be comma-separated numbers like '0,0.33,0.66', "
                             f"got {stage_starts!r}") from e
    else:
        vals = tuple(float(x) for x in stage_starts)
    if not vals or vals[0] != 0.0 or any(b < a for a, b in zip(vals, vals[1:])) or vals[-1] >= 1.0:
        raise ValueError(f"stage_starts must start at 0, be non-decreasing and stay below 1, got {vals}")
    return vals


# ---------------------------------------------------------------- the sampler

class CurriculumSampler:
    """Index batches (positions into the training rows) for ``total_steps`` optimizer steps.

    ``chunks[i]`` is the chunk (0 = easy ...) of training position ``i``. Stage ``s`` starts at step
    ``round(schedule[s] * total_steps)`` and draws from the pool of all chunks ``<= s``: the pool is shuffled,
    cut into full batches of ``min(batch_size, pool size)`` (the incomplete tail of each pass is dropped, as
    with ``drop_last``) and reshuffled when exhausted, so a batch never holds a sample twice. Deterministic for a
    given seed.
    """

    def __init__(self, chunks, total_steps: int, batch_size: int, schedule: Sequence[float] = (0.0, 1 / 3, 2 / 3),
                 seed: int = 0):
        self.chunks = np.asarray(chunks, dtype=np.int64)
        self.schedule = parse_schedule(schedule)
        n_chunks = len(self.schedule)
        if self.chunks.ndim != 1 or self.chunks.min(initial=0) < 0 or self.chunks.max(initial=0) >= n_chunks:
            raise ValueError(f"chunks must be 1-d labels in 0..{n_chunks - 1} (one per schedule entry)")
        if not (self.chunks == 0).any():
            raise ValueError("the easiest chunk is empty: the first stage would have nothing to train on")
        if total_steps < 1 or batch_size < 1:
            raise ValueError(f"total_steps and batch_size must be >= 1, got {total_steps}, {batch_size}")
        self.total_steps, self.batch_size, self.seed = int(total_steps), int(batch_size), int(seed)

    @property
    def stage_starts(self) -> list[int]:
        """The step at which each stage begins."""
        return [int(round(f * self.total_steps)) for f in self.schedule]

    def stage_of_step(self, step: int) -> int:
        return int(np.searchsorted(self.stage_starts, step, side="right") - 1)

    def stage_table(self) -> pd.DataFrame:
        """One row per stage: first step, steps, pool size, chunks in the pool."""
        starts = self.stage_starts + [self.total_steps]
        rows = []
        for s in range(len(self.schedule)):
            rows.append({"stage": s, "adds": CHUNK_NAMES[s] if s < len(CHUNK_NAMES) else str(s),
                         "chunk_size": int((self.chunks == s).sum()), "first_step": starts[s],
                         "steps": starts[s + 1] - starts[s], "pool_size": int((self.chunks <= s).sum())})
        return pd.DataFrame(rows)

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        starts = self.stage_starts + [self.total_steps]
        for s in range(len(self.schedule)):
            pool = np.flatnonzero(self.chunks <= s)
            bs = min(self.batch_size, len(pool))
            batches: list[np.ndarray] = []
            for _ in range(starts[s + 1] - starts[s]):
                if not batches:  # a fresh pass over the pool; the incomplete tail of a pass is dropped
                    perm = rng.permutation(pool)
                    batches = [perm[i:i + bs] for i in range(0, len(perm) - bs + 1, bs)][::-1]
                yield batches.pop().tolist()


# ---------------------------------------------------------------- the stage

@dataclasses.dataclass(frozen=True)
class CurriculumConfig(train.TrainConfig):
    """Every 03_train setting (the same values as the plain run to compare with), plus:"""

    difficulty_run: str = ""  # 04_difficulty run to read; empty picks the only one of this exp and backbone
    heuristic: str = "equal"  # equal (three equal chunks) or thresholds (two cosine thresholds)
    easy_share: float = 0.6  # thresholds: share of training samples in the easy chunk
    hard_share: float = 0.1  # thresholds: share of training samples in the hard chunk
    stage_starts: str = "0,0.33,0.66"  # fractions of the total steps at which easy, medium, hard enter

    def train_config(self) -> "train.TrainConfig":
        """The fresh 03_train run: ``variant`` curriculum_<heuristic> (unless set); the default run name also
        carries the variant of the run without curriculum, e.g. effnet_lite0_cfg2_curriculum_equal_f-1_s0."""
        variant = self.variant or f"curriculum_{self.heuristic}"
        base = train.resolve_variant(train.as_train_config(self, variant=""))
        run = self.run or f"{self.backbone}_{base}_{variant}_f{self.fold}_s{self.seed}"
        return train.as_train_config(self, variant=variant, run=run)


def resolve_difficulty_run(cfg: CurriculumConfig) -> str:
    """``cfg.difficulty_run`` if set; else the 04_difficulty run of this exp and backbone (among several, the one
    trained with exactly this run's settings)."""
    if cfg.difficulty_run:
        return cfg.difficulty_run
    root = paths.stage_dir(STAGE_04, cfg.exp, create=False)
    configs = {p.parent.name: artifacts.read_json(p.parent / "difficulty.json")["config"]
               for p in sorted(root.glob("*/difficulty.csv"))}
    found = [name for name, c in configs.items() if c.get("backbone") == cfg.backbone]
    if len(found) > 1:
        want = runs.result_fields(train.comparable(train.as_train_config(cfg).to_dict()))
        found = [name for name in found
                 if all(train.comparable(configs[name]).get(k) == v for k, v in want.items())] or found
    if not found:
        raise FileNotFoundError(f"no 04_difficulty run for exp {cfg.exp!r} and backbone {cfg.backbone!r} under "
                                f"{root}: run notebooks/04_difficulty.py first (or set difficulty_run)")
    if len(found) > 1:
        raise ValueError(f"several 04_difficulty runs for exp {cfg.exp!r} and backbone {cfg.backbone!r} ({found}): "
                         "set difficulty_run to one of them")
    return found[0]


def assign_chunks(ids, scores: pd.Series, invalid=(), heuristic: str = "equal", easy_share: float = 0.6,
                  hard_share: float = 0.1) -> pd.DataFrame:
    """``image_id, difficulty, chunk`` for the training ``ids`` (in order), chunked by their ``scores``.

    Images the preliminary run could not read (``invalid``; the engine skips them anyway) have no score: they go
    to the hard chunk, outside the chunking rule. Any other id without a score is an error.
    """
    ids = pd.Index(np.asarray(ids).astype(str))
    scored = ids.isin(scores.index)
    unread = ids.isin(list(invalid)) & ~scored
    missing = ids[~scored & ~unread]
    if len(missing):
        raise ValueError(f"{len(missing)} training images have no difficulty score (e.g. {list(missing[:3])}): the "
                         "04_difficulty run was made on other splits or folds; rerun 04 with this exp and fold")
    table = pd.DataFrame({"image_id": ids, "difficulty": scores.reindex(ids).to_numpy(), "chunk": len(CHUNK_NAMES) - 1})
    table.loc[scored, "chunk"] = make_chunks(table.loc[scored, "difficulty"], heuristic, easy_share, hard_share)
    return table


def check(cfg: CurriculumConfig) -> None:
    """Settings that can never work (the runner calls this before anything runs)."""
    train.check(cfg)
    parse_schedule(cfg.stage_starts)
    if cfg.heuristic not in HEURISTICS:
        raise ConfigError(f"heuristic must be one of {HEURISTICS}, got {cfg.heuristic!r}")
    if not (0 < cfg.easy_share <= 1 and 0 <= cfg.hard_share < 1 and cfg.easy_share + cfg.hard_share <= 1):
        raise ConfigError(f"easy_share={cfg.easy_share}, hard_share={cfg.hard_share}: need 0 < easy_share <= 1, "
                          "0 <= hard_share < 1 and a sum <= 1")


def run(cfg: CurriculumConfig) -> Path:
    """Train from scratch on the curriculum; returns the run directory (same artifacts as a 03_train run)."""
    check(cfg)
    cfg = cfg.replace(difficulty_run=resolve_difficulty_run(cfg))
    tcfg = cfg.train_config()
    ts = targets.load(cfg.exp)
    ids = ts.table["image_id"].astype(str).to_numpy()[train.training_rows(tcfg, ts)]
    scores = difficulty.load(cfg.exp, cfg.difficulty_run).set_index("image_id")["difficulty"]
    chunk_table = assign_chunks(ids, scores, difficulty.invalid_ids(cfg.exp, cfg.difficulty_run), cfg.heuristic,
                                cfg.easy_share, cfg.hard_share)
    run_dir = paths.stage_dir(STAGE, cfg.exp, train.run_name(tcfg))
    runs.claim_run_dir(run_dir, cfg.to_dict(), saved="curriculum.json", owned=("chunks.csv", "schedule.csv"),
                       normalise=train.comparable, what="a curriculum run")
    sampler = CurriculumSampler(chunk_table["chunk"].to_numpy(), train.total_steps(tcfg, len(chunk_table)),
                                tcfg.batch_size, parse_schedule(cfg.stage_starts), tcfg.seed)
    print(f"{cfg.heuristic} chunks from 04_difficulty/{cfg.exp}/{cfg.difficulty_run}; schedule:\n"
          + sampler.stage_table().to_string(index=False))
    # written before training, so DONE (written last by train.run) marks the whole directory complete
    artifacts.save_csv(run_dir / "chunks.csv", chunk_table)
    artifacts.save_csv(run_dir / "schedule.csv", sampler.stage_table())
    artifacts.write_json(run_dir / "curriculum.json", cfg.to_dict())
    return train.run(tcfg, batch_sampler=sampler, stage=STAGE)


# ---------------------------------------------------------------- results (for the notebook)

def chunk_summary(run_dir: str | Path) -> pd.DataFrame:
    """Per chunk: size, share and the range of difficulty scores."""
    chunks = pd.read_csv(Path(run_dir) / "chunks.csv", dtype={"image_id": str})
    out = chunks.groupby("chunk")["difficulty"].agg(["size", "min", "mean", "max"]).reset_index()
    out.insert(1, "name", [CHUNK_NAMES[c] for c in out["chunk"]])
    out.insert(3, "share", out["size"] / len(chunks))
    return out


def load_schedule(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "schedule.csv")


@dataclasses.dataclass
class Comparison:
    curves: pd.DataFrame  # summary.csv rows of each run, with a ``variant`` column
    metrics: pd.DataFrame  # metrics.json of each run (variant, val_cosine, test_cosine, ...)


def baseline_run_for(run_dir: str | Path, name: str = "") -> Path | None:
    """The 03_train run ``name``, else a finished one with this run's settings and no curriculum (or None)."""
    cfg = CurriculumConfig.from_dict(artifacts.read_json(Path(run_dir) / "curriculum.json"))
    if name:
        return paths.stage_dir("03_train", cfg.exp, name, create=False)
    found = [p for p in runs.matching_runs("03_train", cfg.train_config().to_dict(), normalise=train.comparable)
             if not train.load_metrics(p).get("variant", "").startswith("curriculum")]
    return found[0] if found else None


def compare_with_plain(run_dir: str | Path, plain_run: str = "") -> Comparison:
    """Learning curves and held-out cosines of this run next to the 03_train run with the same settings."""
    run_dirs = [Path(run_dir)]
    baseline = baseline_run_for(run_dir, plain_run)
    if baseline is None:
        print("no finished 03_train run with these settings: run notebooks/03_train.py to compare")
    else:
        run_dirs.insert(0, baseline)
    metrics = pd.DataFrame([{"run_dir": r.relative_to(paths.working_dir()).as_posix(), **train.load_metrics(r)}
                            for r in run_dirs])
    curves = pd.concat([train.load_summary(r).assign(variant=v) for r, v in zip(run_dirs, metrics["variant"])],
                       ignore_index=True)
    cols = ["run_dir", "variant", "val_cosine", "test_cosine", "const_mean_val", "const_mean_test", "steps"]
    return Comparison(curves, metrics[[c for c in cols if c in metrics]])


def plot_curves(comparison: Comparison, schedule: pd.DataFrame | None = None):
    """Each cosine column of summary.csv per epoch, one line per run; dashed lines where chunks enter."""
    import matplotlib.pyplot as plt

    curves = comparison.curves
    metrics = [c for c in curves.columns if "cos" in c and pd.api.types.is_numeric_dtype(curves[c])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for variant, rows in curves.groupby("variant", sort=False):
            ax.plot(rows["epoch"], rows[metric], marker="o", label=variant)
        if schedule is not None:
            total = schedule["first_step"].iloc[-1] + schedule["steps"].iloc[-1]
            n_epochs = curves["epoch"].max()
            for row in schedule.iloc[1:].itertuples():
                ax.axvline(row.first_step / total * n_epochs, ls="--", c="grey", lw=0.8)
        ax.set(title=metric, xlabel="epoch")
        ax.legend()
    fig.tight_layout()
    return fig
