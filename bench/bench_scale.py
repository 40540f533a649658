"""Stage 06 at scale: time and peak memory of the whole stage on a synthetic experiment, in a child process.

    python bench/bench_scale.py --train-rows 100000 --eval-rows 10000 --runs 4 --json
    python bench/bench_scale.py --train-rows 100000 --eval-rows 10000 --runs 4 --json --set dakl_fit=train

Builds, in a temporary REVSD_WORKING, what 01/02 and R finished runs leave on disk: 384-d unit targets drawn
from a few hundred cluster centres plus noise (N training, M validation and M test rows), and per run
``preds_{train,oof,test}.npz`` = the targets plus noise (the training rows in-sample: half the noise; each run
its own noise level), ``metrics.json``, ``summary.csv`` and ``DONE``. Then runs stage 06 (``blend.run``, all
runs, the stage's defaults unless ``--set key=value``) in a child process and prints one JSON line:
``{"train_rows", "runs", "seconds", "peak_rss_gib", ...}`` — seconds of the child's wall time, the child's
peak RSS (its own ``VmHWM``), the DAKL choice and scores beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
D = 384


def _unit(a: np.ndarray) -> np.ndarray:
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


def build(exp: str, n_train: int, n_eval: int, runs: int, centres: int = 300, seed: int = 0) -> None:
    """The synthetic experiment's files under the current REVSD_WORKING (float32, written block by block)."""
    import pandas as pd

    from revsd import artifacts, paths
    from revsd.artifacts import Predictions, save_predictions

    rng = np.random.default_rng(seed)
    n = n_train + 2 * n_eval
    c = rng.normal(size=(centres, D)).astype(np.float32)
    y = c[rng.integers(0, centres, n)]
    y += 0.9 * rng.standard_normal((n, D), dtype=np.float32)
    y = _unit(y)
    ids = np.array([f"img{i:07d}" for i in range(n)])
    split = np.repeat(["train", "val", "test"], [n_train, n_eval, n_eval])
    artifacts.save_parquet(paths.stage_dir("01_filter", exp) / "filtered.parquet",
                           pd.DataFrame({"image_id": ids, "prompt": "p", "split": split}))
    artifacts.save_npy(paths.stage_dir("02_targets", exp) / "targets.npy", y)
    artifacts.save_npy(paths.stage_dir("02_targets", exp) / "ids.npy", ids)
    for k in range(runs):
        sigma = 1.0 + 0.25 * k
        d = paths.stage_dir("03_train", exp, f"bb{k}_vocab_f-1_s0")
        cos = {}
        for part, fname, s in (("train", "preds_train.npz", sigma / 2), ("val", "preds_oof.npz", sigma),
                               ("test", "preds_test.npz", sigma)):
            rows = np.flatnonzero(split == part)
            pred = y[rows] + (s / np.sqrt(D)) * rng.standard_normal((len(rows), D), dtype=np.float32)
            pred = _unit(pred)
            save_predictions(d / fname, Predictions(ids[rows], pred))
            cos[part] = float((pred * y[rows]).sum(1).mean())
            del pred
        artifacts.write_json(d / "metrics.json", {"backbone": f"bb{k}", "variant": "vocab", "vocab_head": True,
                                                  "head_config": "parallel", "val_cosine": cos["val"],
                                                  "test_cosine": cos["test"]})
        (d / "DONE").touch()


def worker(exp: str, sets: list[str]) -> None:
    from revsd import blend

    params = dict(s.split("=", 1) for s in sets)
    cfg = blend.EnsembleConfig.from_dict({"exp": exp, "runs": "all", **params})
    res = blend.run(cfg)
    print(json.dumps({"dakl": res["dakl"], "final": res["final"], "dakl_fit": res["dakl_fit"],
                      "dakl_kmeans": res["dakl_kmeans"], "seconds_parts": res["seconds"],
                      "scores": {m: round(v["test"], 4) for m, v in res["scores"].items()},
                      "dakl_oof": round(res["scores"]["dakl"]["oof"], 4),
                      "peak_rss_gib": round(_own_peak_kib() / 2**20, 3)}))


def _own_peak_kib() -> int:
    """This process's own peak RSS (VmHWM). ``ru_maxrss`` would not do: Linux carries it over fork + exec, so the
    worker would report at least the RSS the parent had when it started the worker."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=100000)
    ap.add_argument("--eval-rows", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a stage-06 parameter")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if args.worker:
        worker(args.worker, args.set)
        return 0
    with tempfile.TemporaryDirectory(prefix="revsd_scale_") as tmp:
        env = {**os.environ, "REVSD_WORKING": f"{tmp}/working", "REVSD_SUBMISSIONS": f"{tmp}/submissions",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        os.environ.update(REVSD_WORKING=env["REVSD_WORKING"], REVSD_SUBMISSIONS=env["REVSD_SUBMISSIONS"])
        t = time.perf_counter()
        build("scale", args.train_rows, args.eval_rows, args.runs)
        if not args.json:
            print(f"synthetic experiment built in {time.perf_counter() - t:.0f} s; running 06 ...", flush=True)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, __file__, "--worker", "scale", *sum((["--set", s] for s in args.set), [])],
                             env=env, capture_output=True, text=True)
        secs = time.perf_counter() - t
        if res.returncode:
            print(res.stderr[-4000:], file=sys.stderr)
            return res.returncode
    worker_out = json.loads(res.stdout.strip().splitlines()[-1])
    out = {"train_rows": args.train_rows, "runs": args.runs, "seconds": round(secs, 1),
           "peak_rss_gib": worker_out.pop("peak_rss_gib"), "eval_rows": args.eval_rows, "set": args.set, **worker_out}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
