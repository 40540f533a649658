"""Stage 06: blend the runs' predictions, apply DAKL, write the final embeddings, the submission and the report.

Runs are discovered by globbing ``working/{03_train,05_curriculum}/<exp>/*/DONE`` (no hand-kept lists) and
joined on image id. Which runs enter the blend is the ``runs`` parameter: ``"best"`` (default: the variant with
the best validation cosine per backbone, i.e. one model per backbone as in the paper's "all models" row),
``"all"``, or a comma-separated list of run names. A run whose predictions miss ids the others (or the test
split) hold stops the stage, naming the run and the ids, unless ``allow_partial`` is set.

Blend weights are fitted on the OOF (validation) rows. DAKL's labelled domain is ``dakl_fit``: ``"oof"``
(default, ours) cross-fits on the OOF rows — K folds, each predicted from the others, tuned on those
predictions, then fitted on every OOF row to predict test — so the meta-model learns from out-of-sample
predictions like the test rows it is applied to; ``"train"`` (the paper's) uses the weighted blend of the
training rows, whose predictions are in-sample, tuned with the OOF rows as the target domain. The final output
(final.npz and the submission) is the weighted blend or DAKL, whichever scores higher on OOF, unless ``final``
names one. Memory: float32 throughout, only ids and embeddings are read (never vocabulary probabilities), the
training rows are blended one run at a time, and nothing else is computed over them.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from revsd import artifacts, dakl, paths, submission
from revsd.artifacts import Predictions, save_predictions, write_json
from revsd.config import ConfigError, StageConfig
from revsd.metrics import mean_cosine, row_cosines
from revsd.runs import RUN_STAGES, SPLIT_FILES, RunInfo, discover_runs

STAGE = "06_dakl_ensemble"
METHODS = ("median", "weighted", "dakl")
SPLIT_NAMES = {"train": "train", "oof": "val", "test": "test"}  # prediction split -> 02_targets split


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


def _read(run: RunInfo, split: str, key: str) -> np.ndarray:
    """One array of a run's predictions file, read alone (an .npz member loads lazily: probabilities never)."""
    path = run.path / SPLIT_FILES[split]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: rerun {run.stage}/{run.name}, or leave it out with runs=...")
    with np.load(path, allow_pickle=False) as z:
        return z[key].astype(str) if key == "ids" else np.asarray(z[key], dtype=np.float32)


def common_ids(runs: Sequence[RunInfo], split: str, expected: Sequence[str] | None = None,
               allow_partial: bool = False) -> tuple[np.ndarray, dict]:
    """Ids every run predicted for ``split`` (first run's order) and, per run, how many it lacks.

    A run lacking ids that another run (or ``expected``, e.g. the test split) holds raises, naming the run and
    the ids, unless ``allow_partial``: then a loud warning, and the blend uses the ids all runs share.
    """
    if not runs:
        raise ValueError("06: no runs given")
    per_run = [_read(r, split, "ids") for r in runs]
    sets = [set(ids.tolist()) for ids in per_run]
    seen = [*(expected if expected is not None else []), *(i for ids in per_run for i in ids.tolist())]
    order = list(dict.fromkeys(seen))  # expected ids first, then each run's, first appearance kept
    wanted = set(order)
    lacking = {f"{r.stage}/{r.name}": [i for i in order if i not in s] for r, s in zip(runs, sets) if wanted - s}
    if lacking:
        msg = (f"06: {split} predictions incomplete ({len(wanted)} ids expected): " + "; ".join(
            f"{name}/{SPLIT_FILES[split]} lacks {len(m)}, e.g. {m[:3]}" for name, m in lacking.items())
            + ". Rerun those runs, leave them out with runs=..., or set allow_partial: true to blend on the "
              "ids all runs share")
        if not allow_partial:
            raise ValueError(msg)
        print(f"WARNING: {msg}")
        warnings.warn(msg, stacklevel=2)
    shared = set.intersection(*sets)
    ids = np.array([i for i in per_run[0].tolist() if i in shared], dtype=str)
    if len(ids) == 0:
        raise ValueError(f"the {split} predictions of runs {[r.name for r in runs]} share no image id "
                         f"(sizes {[len(p) for p in per_run]}): were they trained on different exps or folds?")
    return ids, {"kept": int(len(ids)), "expected": len(wanted), "lacking": {k: len(v) for k, v in lacking.items()}}


def _emb(run: RunInfo, split: str, ids: np.ndarray) -> np.ndarray:
    """The run's ``split`` embeddings in ``ids`` order, unit rows, float32."""
    own, emb = _read(run, split, "ids"), _read(run, split, "emb")
    if not np.array_equal(own, ids):  # the usual case (same order) needs no reordered copy
        index = {k: i for i, k in enumerate(own.tolist())}
        emb = emb[[index[k] for k in ids.tolist()]]
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-6)  # in place: unit rows
    return emb


def join_predictions(runs: Sequence[RunInfo], split: str, allow_partial: bool = False,
                     expected: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, stack (m, n, d) float32 unit rows) of the runs' ``split`` predictions (see :func:`common_ids`)."""
    ids, _ = common_ids(runs, split, expected, allow_partial)
    return ids, np.stack([_emb(r, split, ids) for r in runs])


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.where(norm < 1e-6, np.float32(0), a / np.maximum(norm, 1e-6))  # a (cancelled-out) zero row stays 0


def median_blend(stack: np.ndarray) -> np.ndarray:
    """Element-wise median over models of the normalised embeddings, renormalised. stack: (m, n, d)."""
    return _unit(np.median(_unit(stack), axis=0))


def weighted_blend(stack: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Normalised weighted mean over models of the normalised embeddings."""
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != (len(stack),):
        raise ValueError(f"weighted_blend: {len(w)} weights for {len(stack)} models")
    return _unit(np.tensordot(w, _unit(stack), axes=1))


def streamed_weighted_blend(runs: Sequence[RunInfo], split: str, ids: np.ndarray, weights) -> np.ndarray:
    """:func:`weighted_blend` of the runs' ``split`` predictions, reading one run at a time (bounded memory)."""
    acc = None
    for run, w in zip(runs, np.asarray(weights, dtype=np.float32)):
        e = _emb(run, split, ids)
        e *= w
        acc = e if acc is None else np.add(acc, e, out=acc)
    return _unit(acc)


def fit_weights(oof_list: Sequence[np.ndarray] | np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to one that maximise the OOF mean cosine of :func:`weighted_blend`.

    SLSQP on the simplex from uniform weights, with the analytic gradient; the result is never worse on the
    given data than uniform weights or any single model (those are checked too). Deterministic. Inputs stay
    float32; the per-row dot products are accumulated in float64.
    """
    from scipy.optimize import minimize

    e = [_unit(x) for x in oof_list]
    y = _unit(targets)
    m = len(e)
    p = np.stack([np.einsum("nd,nd->n", ek, y, dtype=np.float64) for ek in e])  # (m, n): e_k · y
    gram = np.empty((len(y), m, m))  # e_k · e_l per row
    for k in range(m):
        for j in range(k + 1):
            gram[:, k, j] = gram[:, j, k] = np.einsum("nd,nd->n", e[k], e[j], dtype=np.float64)

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
    dakl_fit: str = "oof"  # DAKL's labelled rows: oof (cross-fitted on OOF rows, ours) or train (the paper's)
    dakl_folds: int = 3  # folds of the OOF rows when dakl_fit is oof
    dakl_kmeans: str = "faiss"  # centroids: faiss (fast), bisecting (sklearn BisectingKMeans, the paper's; slow), minibatch
    dakl_gammas: str = "0.01,0.3,1,3,10,30"  # gamma grid tuned on OOF (comma-separated); the paper's is 0.01
    dakl_rs: str = "64,256,1024,2000,10000"  # centroid counts (capped at the labelled rows); the paper's is 10000
    dakl_alphas: str = "0.1,1,10"  # ridge strengths tuned on OOF; the paper's is 10
    dakl_search: str = "staged"  # staged (every gamma at the smallest r, the best dakl_keep at larger r) or grid
    dakl_keep: int = 2  # gammas carried to the next r by the staged search
    allow_partial: bool = False  # blend on the ids all runs share when a run lacks some (warns); else refuse
    final: str = "auto"  # written to final.npz and the submission: auto (best on OOF of weighted/dakl), median, weighted, dakl
    chunk: int = 2048  # DAKL block size (memory bound)
    device: str = ""  # "" means cuda if available, else cpu
    seed: int = 0  # k-means and fold seed
    smoke: bool = False  # tiny grids (tests)


def _grid(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{name}={text!r}: expected comma-separated numbers, e.g. '1,3,10'")
    return values


def check(cfg: EnsembleConfig) -> None:
    """Every setting checked before anything runs (the pipeline calls this for ``--list`` too)."""
    for name in ("dakl_gammas", "dakl_rs", "dakl_alphas"):
        _grid(getattr(cfg, name), name)
    choices = {"final": ("auto", *METHODS), "dakl_fit": ("oof", "train"), "dakl_kmeans": dakl.KMEANS,
               "dakl_search": ("staged", "grid")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: expected {', '.join(allowed)}")
    if min(_grid(cfg.dakl_alphas, "dakl_alphas")) <= 0 or min(_grid(cfg.dakl_rs, "dakl_rs")) < 1:
        raise ConfigError(f"dakl_alphas={cfg.dakl_alphas!r} must be > 0 and dakl_rs={cfg.dakl_rs!r} >= 1")
    if cfg.dakl_folds < 2 or cfg.dakl_keep < 1 or cfg.chunk < 1:
        raise ConfigError(f"dakl_folds={cfg.dakl_folds} must be >= 2, dakl_keep={cfg.dakl_keep} and "
                          f"chunk={cfg.chunk} >= 1")


def _targets_for(exp: str):
    """(lookup(ids, split) -> targets float32, constant mean of the training targets, ids of a split), read
    straight from 02_targets' files (memory-mapped: only the rows asked for are read)."""
    out = paths.targets_dir(exp)
    files = [out / "targets.npy", out / "ids.npy", paths.filtered_table(exp)]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: run 01_filter and 02_targets for exp={exp!r}")
    emb = np.load(files[0], mmap_mode="r", allow_pickle=False)
    ids = np.load(files[1], allow_pickle=False).astype(str)
    split = pd.read_parquet(files[2], columns=["split"])["split"].to_numpy()
    if not len(emb) == len(ids) == len(split):
        raise ValueError(f"{out} ({len(ids)} ids) is not aligned with {files[2]} ({len(split)} rows): rerun 02_targets")
    index = {k: i for i, k in enumerate(ids.tolist())}

    def lookup(want: np.ndarray, name: str) -> np.ndarray:
        missing = [i for i in want.tolist() if i not in index]
        if missing:
            raise KeyError(f"{len(missing)} {name} prediction ids are not in 02_targets of exp={exp!r}, e.g. "
                           f"{missing[:3]}: the runs are stale; rerun 03_train after 01/02")
        rows = np.array([index[i] for i in want.tolist()], dtype=np.int64)
        return np.asarray(emb[np.sort(rows)], dtype=np.float32)[np.argsort(np.argsort(rows))]

    train = np.flatnonzero(split == "train")
    total = np.zeros(emb.shape[1], dtype=np.float64)
    for s in range(0, len(train), 65536):
        total += np.asarray(emb[train[s:s + 65536]], dtype=np.float64).sum(0)
    const = (total / max(np.linalg.norm(total), 1e-12)).astype(np.float32)
    return lookup, const, lambda name: ids[split == name]


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


def _dakl(cfg: EnsembleConfig, chosen, weights, preds: dict, y: dict, lookup) -> tuple[dict, pd.DataFrame, dict]:
    """Tune DAKL and predict OOF (cross-fitted, or as the target domain) and test; returns (params, grid, n)."""
    gammas, rs, alphas = (_grid(getattr(cfg, f), f) for f in ("dakl_gammas", "dakl_rs", "dakl_alphas"))
    if cfg.smoke:
        gammas, rs, alphas = gammas[:2], rs[:1], alphas[:2]
    kw = dict(chunk=cfg.chunk, device=cfg.device or None, seed=cfg.seed, kmeans=cfg.dakl_kmeans)
    oof_x, test_x = preds["oof"]["weighted"], preds["test"]["weighted"]
    if cfg.dakl_fit == "train":
        ids, _ = common_ids(chosen, "train")
        lab_x, lab_y = streamed_weighted_blend(chosen, "train", ids, weights), lookup(ids, "train")
        splits = [dakl.Split(lab_x, lab_y, oof_x, y["oof"], np.arange(len(oof_x)))]
    else:
        lab_x, lab_y = oof_x, y["oof"]
        splits = dakl.crossfit_splits(lab_x, lab_y, min(cfg.dakl_folds, len(lab_x)), cfg.seed)
    caches = [{} for _ in splits]
    params, grid, preds["oof"]["dakl"] = dakl.tune(splits, gammas, rs, alphas, search=cfg.dakl_search,
                                                   keep=cfg.dakl_keep, caches=caches, **kw)
    params = dataclasses.replace(params, r=min(params.r, len(lab_x)))
    cache = caches[0] if cfg.dakl_fit == "train" else None  # same labelled rows: the centroids are reused
    preds["test"]["dakl"] = dakl.dakl(lab_x, lab_y, test_x, params, cache=cache, progress=True, **kw)
    return dataclasses.asdict(params), grid, {"labelled": int(len(lab_x))}


def run(cfg: EnsembleConfig) -> dict:
    """Blend, fit weights and tune DAKL on OOF, predict test; write final.npz, the submission and the report."""
    from revsd import report

    check(cfg)
    found = discover_runs(cfg.exp)
    if not found:
        raise FileNotFoundError(f"no finished run under {paths.working_dir()}/{{{','.join(RUN_STAGES)}}}/{cfg.exp}/"
                                f"*/DONE: run 03_train first (or `revsd pipeline --profile demo`)")
    t0 = time.perf_counter()
    chosen = select_runs(found, cfg.runs)
    lookup, const, split_ids = _targets_for(cfg.exp)
    data, partial = {}, {}
    for s in ("oof", "test"):
        ids, partial[s] = common_ids(chosen, s, split_ids("test") if s == "test" else None, cfg.allow_partial)
        data[s] = ids, np.stack([_emb(r, s, ids) for r in chosen])
    y = {s: lookup(ids, s) for s, (ids, _) in data.items()}
    weights = fit_weights(data["oof"][1], y["oof"])
    preds = {s: {"median": median_blend(st), "weighted": weighted_blend(st, weights)} for s, (_, st) in data.items()}
    t1 = time.perf_counter()
    params, grid, n_lab = _dakl(cfg, chosen, weights, preds, y, lookup)
    scores = _scores(preds, y, const)
    final = cfg.final if cfg.final != "auto" else max(("weighted", "dakl"), key=lambda m: scores[m]["oof"])
    summary = {"exp": cfg.exp, "runs": [f"{r.stage}/{r.name}" for r in chosen], "weights": weights.round(6).tolist(),
               "dakl": params, "dakl_fit": cfg.dakl_fit, "dakl_kmeans": cfg.dakl_kmeans, "final": final,
               "scores": scores, "n": {**{s: int(len(ids)) for s, (ids, _) in data.items()}, **n_lab},
               "partial": {s: p for s, p in partial.items() if p["lacking"]},
               "seconds": {"blend": round(t1 - t0, 2), "dakl": round(time.perf_counter() - t1, 2)}}
    written = _write_outputs(cfg, data["test"][0], preds["test"], y["test"], const, final, grid, summary)
    return {**summary, **written, "report": str(report.build_report(cfg.exp))}
