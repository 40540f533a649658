"""Finished runs: the one home for finding and comparing them (used by 04, 05, 06, the report and predict).

A run is a directory ``working/<stage>/<exp>/<run>/`` of a training stage (:data:`RUN_STAGES`); it is complete
when ``DONE`` exists (written last). This module only reads run directories: it never imports models, the
engine or a stage, so the meta stage (06) and the apps can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from revsd import paths
from revsd.artifacts import Predictions, load_predictions, read_json

RUN_STAGES = ("03_train", "05_curriculum")  # stages whose run directories hold trained models
# TrainConfig fields that never change a result: two runs that differ only here are the same run
NEUTRAL_FIELDS = ("run", "variant", "stop_after_epoch", "num_workers", "device")
SPLIT_FILES = {"train": "preds_train.npz", "oof": "preds_oof.npz", "test": "preds_test.npz"}  # a run's predictions


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


def matching_runs(stage: str, config: dict, ignore: Sequence[str] = NEUTRAL_FIELDS) -> list[Path]:
    """Finished runs of ``stage`` (exp = ``config["exp"]``) whose config.json equals ``config`` except ``ignore``."""
    want = result_fields(config, ignore)
    found = []
    for run_dir in finished_runs(config["exp"], stage):
        if (run_dir / "config.json").exists():
            have = read_json(run_dir / "config.json")
            if all(have.get(k, object()) == v for k, v in want.items()):
                found.append(run_dir)
    return found
