"""Runs: the one home for finding, comparing and claiming them (used by 03, 04, 05, 06, the report and predict).

A run is a directory ``working/<stage>/<exp>/<run>/`` of a training stage (:data:`RUN_STAGES`); it is complete
when ``DONE`` exists (written last). A stage *claims* its run directory with :func:`claim_run_dir` (the same rule
and error for 03, 04 and 05) and ties it to its data with :func:`check_data`. This module never imports models,
the engine or a stage, so the meta stage (06) and the apps can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from revsd import paths
from revsd.artifacts import Predictions, load_predictions, read_json, write_json
from revsd.config import ConfigError

RUN_STAGES = ("03_train", "05_curriculum")  # stages whose run directories hold trained models
# TrainConfig fields that never change a result: two runs that differ only here are the same run
NEUTRAL_FIELDS = ("run", "variant", "stop_after_epoch", "num_workers", "device", "compile", "grad_checkpointing",
                  "image_cache")
SPLIT_FILES = {"train": "preds_train.npz", "oof": "preds_oof.npz", "test": "preds_test.npz"}  # a run's predictions
CHECKPOINT = "last.json"  # the resume checkpoint's pointer (revsd.engine); present while a run can resume
DATA_FILE = "data.json"  # fingerprint of the 01/02 outputs a run was trained on


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A finished run directory and its metrics.json."""

    stage: str
    path: Path
    metrics: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def backbone(self) -> str:
        return str(self.metrics.get("backbone", "?"))

    @property
    def variant(self) -> str:
        return str(self.metrics.get("variant", "?"))

    @property
    def val_cosine(self) -> float:
        return float(self.metrics.get("val_cosine", float("nan")))

    def preds(self, split: str) -> Predictions:
        """The run's predictions for ``split`` (train, oof or test)."""
        return load_predictions(self.path / SPLIT_FILES[split])


def finished_runs(exp: str, stage: str = "03_train") -> list[Path]:
    """Run directories of ``exp`` under ``working/<stage>/`` with ``DONE``, sorted by name."""
    return [p.parent for p in sorted(paths.stage_dir(stage, exp, create=False).glob("*/DONE"))]


def discover_runs(exp: str, stages: Sequence[str] = RUN_STAGES) -> list[RunInfo]:
    """Every finished run of ``exp`` under ``working/<stage>/<exp>/``, sorted by stage and name."""
    runs = []
    for stage in stages:
        for run_dir in finished_runs(exp, stage):
            mfile = run_dir / "metrics.json"
            if not mfile.exists():
                raise FileNotFoundError(f"{run_dir} is marked DONE but has no metrics.json: rerun that run")
            runs.append(RunInfo(stage, run_dir, read_json(mfile)))
    return runs


def complete_runs() -> list[Path]:
    """Every finished run directory of every experiment (``working/{03_train,05_curriculum}/*/*/DONE``)."""
    w = paths.working_dir()
    return sorted(d.parent for stage in RUN_STAGES for d in w.glob(f"{stage}/*/*/DONE"))


def _val_cosine(run_dir: Path) -> float:
    try:
        v = json.loads((run_dir / "metrics.json").read_text()).get("val_cosine")
        return float(v) if v is not None else float("-inf")
    except (OSError, ValueError, TypeError):
        return float("-inf")


def latest_best_run() -> Path | None:
    """Best ``val_cosine`` run of the experiment whose run finished last; None when there is no finished run."""
    runs = complete_runs()
    if not runs:
        return None
    mtime = {r: (r / "DONE").stat().st_mtime for r in runs}
    exp = max(runs, key=mtime.get).parent.name
    return max((r for r in runs if r.parent.name == exp), key=lambda r: (_val_cosine(r), mtime[r]))


def result_fields(config: dict, ignore: Sequence[str] = NEUTRAL_FIELDS) -> dict:
    """The settings of a saved or new config that determine a run's result."""
    return {k: v for k, v in config.items() if k not in ignore and k != "class"}


def config_diff(saved: dict, new: dict, ignore: Sequence[str] = NEUTRAL_FIELDS) -> dict:
    """``{field: (saved, new)}`` for the result-changing fields that differ."""
    old = result_fields(saved, ignore)
    return {k: (old.get(k), v) for k, v in result_fields(new, ignore).items() if old.get(k) != v}


def matching_runs(stage: str, config: dict, ignore: Sequence[str] = NEUTRAL_FIELDS,
                  normalise: Callable[[dict], dict] | None = None) -> list[Path]:
    """Finished runs of ``stage`` (exp = ``config["exp"]``) whose config.json equals ``config`` except ``ignore``;
    ``normalise`` maps both configs first (e.g. ``train.comparable``: defaults for fields added later)."""
    norm = normalise or (lambda d: d)
    want = result_fields(norm(config), ignore)
    found = []
    for run_dir in finished_runs(config["exp"], stage):
        if (run_dir / "config.json").exists():
            have = norm(read_json(run_dir / "config.json"))
            if all(have.get(k, object()) == v for k, v in want.items()):
                found.append(run_dir)
    return found


# --- claiming a run directory -----------------------------------------------------------------------------------

def conflict(run_dir: Path, diff: dict, what: str = "a run") -> ConfigError:
    return ConfigError(f"{run_dir} holds {what} with other settings {diff} (saved, new): pick another run name "
                       "(run=...) or delete that directory")


def claim_run_dir(run_dir: Path, config: dict, saved: str = "config.json", owned: Sequence[str] = (),
                  normalise: Callable[[dict], dict] | None = None, what: str = "a run", reclaim: bool = True) -> bool:
    """May ``config`` use ``run_dir``? Returns whether the run there is finished (``DONE``).

    The settings saved in ``run_dir/saved`` must equal ``config`` (up to :data:`NEUTRAL_FIELDS`, after
    ``normalise``) when the run there finished or can resume (a checkpoint): otherwise :func:`conflict` is
    raised. A run that failed before its first checkpoint (saved settings, no checkpoint, no DONE) never blocks
    its corrected rerun: its ``saved`` file and ``owned`` files are removed and the directory is reclaimed
    (``reclaim=False``: only checked, e.g. on the secondary processes of a multi-process run)."""
    run_dir = Path(run_dir)
    done = (run_dir / "DONE").exists()
    try:
        saved_config = read_json(run_dir / saved)
    except FileNotFoundError:
        return done
    norm = normalise or (lambda d: d)
    diff = config_diff(norm(saved_config), norm(config))
    if diff and (done or (run_dir / CHECKPOINT).exists()):
        raise conflict(run_dir, diff, what)
    if diff and reclaim:
        print(f"{run_dir}: reclaiming a run that failed before its first checkpoint (settings changed: {diff})")
        for name in (saved, *owned):
            (run_dir / name).unlink(missing_ok=True)
    return done


def data_fingerprint(ts) -> str:
    """Identifies the 01/02 outputs (a ``targets.TargetSet``) a run was trained on: ids, splits, folds, targets,
    vocabulary."""
    h = hashlib.sha1()
    t = ts.table
    for col in ("image_id", "split", "fold"):
        h.update("\x1f".join(map(str, t[col].tolist())).encode())
    h.update(np.ascontiguousarray(ts.emb[:: max(1, len(ts.emb) // 4096)]).tobytes())
    h.update("\x1f".join(ts.words).encode())
    return h.hexdigest()


def check_data(run_dir: Path, ts) -> None:
    """A run is only reused/resumed on the data it was trained on; otherwise say so instead of mixing them."""
    run_dir = Path(run_dir)
    f = run_dir / DATA_FILE
    fp = data_fingerprint(ts)
    started = (run_dir / "DONE").exists() or (run_dir / CHECKPOINT).exists()
    if f.exists() and read_json(f).get("fingerprint") != fp and started:
        raise ConfigError(f"{run_dir} was trained on other 01_filter/02_targets outputs of this exp: delete the "
                          "directory to retrain, or pick another run name (run=...)")
    if not f.exists() or not started:  # (a run that failed before its first checkpoint takes the new data)
        write_json(f, {"fingerprint": fp, "rows": int(len(ts.table))})
