"""Stage 06: blend the runs' predictions, apply DAKL, write the final embeddings, the submission and the report.

Runs are discovered by globbing ``working/{03_train,05_curriculum}/<exp>/*/DONE`` (no hand-kept lists) and
joined on image id. Which runs enter the blend is the ``runs`` parameter: ``"best"`` (default: the variant with
the best validation cosine per backbone, i.e. one model per backbone as in the paper's "all models" row),
``"all"``, or a comma-separated list of run names. Blend weights are fitted on the OOF (validation) rows; DAKL
uses the weighted blend of the training rows (with their targets) as the training domain, is tuned with the OOF
rows as the target domain, then applied with the test rows as the target domain. The final output (final.npz
and the submission) is the weighted blend or DAKL, whichever scores higher on OOF, unless ``final`` names one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from revsd import artifacts, dakl, paths, submission
from revsd.artifacts import Predictions, read_json, save_predictions, write_json
from revsd.config import StageConfig
from revsd.metrics import mean_cosine, row_cosines
from revsd.runs import RUN_STAGES, SPLIT_FILES, RunInfo, discover_runs

STAGE = "06_dakl_ensemble"


def select_runs(runs: Sequence[RunInfo], which: str = "best") -> list[RunInfo]:
    """``"best"``: the best validation cosine per backbone; ``"all"``; or comma-separated run names."""
    if which == "all":
        return list(runs)
    if which == "best":
        best: dict[str, RunInfo] = {}
        for r in runs:
            if r.backbone not in best or r.val_cosine > best[r.backbone].val_cosine:
                best[r.backbone] = r
        return sorted(best.values(), key=lambda r: r.backbone)
    names = [n.strip() for n in which.split(",") if n.strip()]
    by_name = {r.name: r for r in runs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"runs={which!r}: unknown run(s) {unknown}; finished runs: {sorted(by_name)}")
    return [by_name[n] for n in names]


def join_predictions(runs: Sequence[RunInfo], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, stack (m, n, d)) of the runs' ``split`` predictions on their common ids (first run's order)."""
    if not runs:
        raise ValueError("join_predictions: no runs given")
    preds = [r.preds(split) for r in runs]
    common = set(preds[0].ids.tolist()).intersection(*[p.ids.tolist() for p in preds[1:]])
    ids = np.array([i for i in preds[0].ids.tolist() if i in common], dtype=str)
    if len(ids) == 0:
        raise ValueError(f"the {split} predictions of runs {[r.name for r in runs]} share no image id "
                         f"(sizes {[len(p) for p in preds]}): were they trained on different exps or folds?")
    dropped = {r.name: len(p) - len(ids) for r, p in zip(runs, preds) if len(p) != len(ids)}
    if dropped:
        print(f"join {split}: keeping the {len(ids)} ids common to all runs; dropped per run: {dropped}")
    return ids, np.stack([p.align(ids).emb for p in preds])


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # an all-zero row stays zero


def median_blend(stack: np.ndarray) -> np.ndarray:
    """Element-wise median over models of the normalised embeddings, renormalised. stack: (m, n, d)."""
    return _unit(np.median(_unit(stack), axis=0)).astype(np.float32)


def weighted_blend(stack: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Normalised weighted mean over models of the normalised embeddings."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stack),):
        raise ValueError(f"weighted_blend: {len(w)} weights for {len(stack)} models")
    return _unit(np.tensordot(w, _unit(stack), axes=1)).astype(np.float32)


def fit_weights(oof_list: Sequence[np.ndarray] | np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to one that maximise the OOF mean cosine of :func:`weighted_blend`.

    SLSQP on the simplex from uniform weights, with the analytic gradient; the result is never worse on the
    given data than uniform weights or any single model (those are checked too). Deterministic.
    """
    from scipy.optimize import minimize

    e = _unit(np.stack(list(oof_list)))  # (m, n, d)
    y = _unit(targets)
    m = len(e)
    p = np.einsum("mnd,nd->mn", e, y)  # e_k · y
    gram = np.einsum("mnd,knd->nmk", e, e)  # e_k · e_l per row

    def neg_cos(w):
        ew = gram @ w  # (n, m): s · e_k with s = Σ w_k e_k
        norm = np.sqrt(np.maximum(ew @ w, 1e-24))
        sy = w @ p
        grad = p / norm - sy * ew.T / norm ** 3
        return -(sy / norm).mean(), -grad.mean(axis=1)

    candidates = [np.full(m, 1.0 / m), *np.eye(m)]
    if m > 1:
        res = minimize(neg_cos, candidates[0], jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}], options={"maxiter": 200})
        w = np.clip(res.x, 0.0, None)
        candidates.insert(0, w / w.sum())
    return min(candidates, key=lambda w: neg_cos(w)[0])


@dataclasses.dataclass(frozen=True)
class EnsembleConfig(StageConfig):
    exp: str = "demo"  # experiment: reads working/{03_train,05_curriculum}/<exp>/*/ and 02_targets
    runs: str = "best"  # blended runs: best (best val variant per backbone), all, or comma-separated run names
    dakl_gammas: str = "0.3,1,3,10,30"  # gamma grid tuned on OOF (comma-separated)
    dakl_rs: str = "64,256,1024,2000"  # centroid counts tuned on OOF (capped at the training rows)
    dakl_alphas: str = "0.1,1,10"  # ridge strengths tuned on OOF
    final: str = "auto"  # written to final.npz and the submission: auto (best on OOF of weighted/dakl), median, weighted, dakl
    chunk: int = 2048  # DAKL block size (memory bound)
    device: str = ""  # "" means cuda if available, else cpu
    seed: int = 0  # k-means seed
    smoke: bool = False  # tiny grids (tests)


METHODS = ("median", "weighted", "dakl")


def _targets_for(exp: str):
    from revsd import targets

    ts = targets.load(exp)
    index = {k: i for i, k in enumerate(ts.ids.tolist())}

    def lookup(ids: np.ndarray, split: str) -> np.ndarray:
        missing = [i for i in ids.tolist() if i not in index]
        if missing:
            raise KeyError(f"{len(missing)} {split} prediction ids are not in 02_targets of exp={exp!r}, e.g. "
                           f"{missing[:3]}: the runs are stale; rerun 03_train after 01/02")
        return ts.emb[[index[i] for i in ids.tolist()]]

    const = _unit(ts.emb[ts.rows("train")].mean(0, keepdims=True))[0]
    return lookup, const


def _grid(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{name}={text!r}: expected comma-separated numbers, e.g. '1,3,10'")
    return values


def _scores(preds: dict, y: dict, const: np.ndarray) -> dict:
    """Mean cosine per method on OOF and test; the constant-mean baseline beside them."""
    scores = {m: {s: mean_cosine(preds[s][m], y[s]) for s in ("oof", "test")} for m in METHODS}
    scores["constant_mean"] = {s: mean_cosine(np.broadcast_to(const, y[s].shape), y[s]) for s in ("oof", "test")}
    return scores


def _write_outputs(cfg: EnsembleConfig, ids: np.ndarray, preds: dict, y: np.ndarray, const: np.ndarray,
                   final: str, grid: pd.DataFrame, summary: dict) -> dict:
    """final.npz, the submission, per-image test cosines, the DAKL grid and ensemble.json; returns their paths."""
    out = paths.stage_dir(STAGE, cfg.exp)
    sub_path = submission.write_submission(ids, preds[final], paths.submissions_dir() / "submission.csv")
    final_path = save_predictions(out / "final.npz", Predictions(ids, preds[final]))
    per_image = {"constant_mean": row_cosines(np.broadcast_to(const, y.shape), y)}
    per_image |= {m: row_cosines(preds[m], y) for m in METHODS}
    artifacts.save_parquet(out / "test_cosines.parquet", pd.DataFrame({"image_id": ids, **per_image}))
    artifacts.save_parquet(out / "dakl_grid.parquet", grid)
    write_json(out / "ensemble.json", summary)
    cfg.save(out / "config.json")
    return {"final_path": str(final_path), "submission": str(sub_path)}


def run(cfg: EnsembleConfig) -> dict:
    """Blend, fit weights and tune DAKL on OOF, predict test; write final.npz, the submission and the report."""
    from revsd import report

    found = discover_runs(cfg.exp)
    if not found:
        raise FileNotFoundError(f"no finished run under {paths.working_dir()}/{{{','.join(RUN_STAGES)}}}/{cfg.exp}/"
                                f"*/DONE: run 03_train first (or `revsd pipeline --profile demo`)")
    if cfg.final not in ("auto", *METHODS):
        raise ValueError(f"final={cfg.final!r}: expected auto, {', '.join(METHODS)}")
    grids = [_grid(getattr(cfg, f), f) for f in ("dakl_gammas", "dakl_rs", "dakl_alphas")]
    if cfg.smoke:
        grids = [g[:n] for g, n in zip(grids, (2, 1, 2))]
    chosen = select_runs(found, cfg.runs)
    lookup, const = _targets_for(cfg.exp)
    data = {s: join_predictions(chosen, s) for s in SPLIT_FILES}  # split -> (ids, stack (m, n, d))
    y = {s: lookup(ids, s) for s, (ids, _) in data.items()}
    weights = fit_weights(data["oof"][1], y["oof"])
    preds = {s: {"median": median_blend(st), "weighted": weighted_blend(st, weights)} for s, (_, st) in data.items()}

    kw = dict(chunk=cfg.chunk, device=cfg.device or None, seed=cfg.seed)
    train_x = preds["train"]["weighted"]
    params, grid = dakl.tune_dakl(train_x, y["train"], preds["oof"]["weighted"], y["oof"], *grids, **kw)
    for s in ("oof", "test"):
        preds[s]["dakl"] = dakl.dakl(train_x, y["train"], preds[s]["weighted"], params, progress=True, **kw)

    scores = _scores(preds, y, const)
    final = cfg.final if cfg.final != "auto" else max(("weighted", "dakl"), key=lambda m: scores[m]["oof"])
    summary = {"exp": cfg.exp, "runs": [f"{r.stage}/{r.name}" for r in chosen], "weights": weights.round(6).tolist(),
               "dakl": dataclasses.asdict(params), "final": final, "scores": scores,
               "n": {s: int(len(ids)) for s, (ids, _) in data.items()}}
    written = _write_outputs(cfg, data["test"][0], preds["test"], y["test"], const, final, grid, summary)
    return {**summary, **written, "report": str(report.build_report(cfg.exp))}
