"""DAKL speed and memory: revsd.dakl (chunked) against a direct dense implementation.

    python bench/bench_dakl.py                  # all cases on this machine (CPU, 1 thread), ~5-8 min on 2 busy cores
    python bench/bench_dakl.py --skip-paper     # without the paper-scale case (r=10,000, p=30,000)
    python bench/bench_dakl.py --device cuda --skip-dense --out bench/results/dakl_gpu.md   # on a GPU machine

Cases: (1) equal predictions on small data (r=300, p=700) of the chunked code, a naive dense numpy Eq. 5-7 and
scikit-learn KernelRidge(kernel="precomputed") on the explicitly built kernel; (2) r=2,000 centroids and
p=5,000 target samples (target: < 20 s and < 2 GiB) for the chunked code and the dense KernelRidge; (3) the
paper's scale. Each timed case runs in its own subprocess; peak memory is that process's max RSS minus its RSS
after the data was made (so it is the DAKL call's own peak), and for CUDA the peak allocated GPU memory.
Writes a table to bench/results/dakl.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
D, GAMMA, ALPHA = 384, 10.0, 1.0


def make_data(r: int, p: int, seed: int = 0):
    """Clustered unit vectors (like prompt embeddings) and targets that depend on them non-linearly."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, D)).astype(np.float32)
    z = centers[rng.integers(0, 64, r + p)] + rng.normal(size=(r + p, D)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    y = np.tanh(z[:r] @ rng.normal(size=(D, D)).astype(np.float32))
    return z[:r], (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32), z[r:]


def dense_kernel_ridge(tx, ty, sx, gamma=GAMMA, alpha=ALPHA):
    """The direct way: build K_DA and the feature Gram explicitly, then sklearn KernelRidge on it."""
    from sklearn.kernel_ridge import KernelRidge

    z = np.vstack([tx, sx]).astype(np.float64)
    k = z @ z.T
    dg = np.sqrt(np.diag(k))
    phi = np.exp(-gamma * (1 - k / np.outer(dg, dg)))
    r = len(tx)
    model = KernelRidge(alpha=alpha, kernel="precomputed").fit(phi[:r] @ phi[:r].T, ty)
    pred = model.predict(phi[r:] @ phi[:r].T)
    return pred / np.linalg.norm(pred, axis=1, keepdims=True)


def naive_numpy(tx, ty, sx, gamma=GAMMA, alpha=ALPHA):
    """Eq. 5-7 written out densely with numpy (loop-free)."""
    z = np.vstack([tx, sx]).astype(np.float64)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    phi = np.exp(-gamma * (1 - zn @ zn.T))
    g = phi @ phi.T
    r = len(tx)
    a = np.linalg.solve(g[:r, :r] + alpha * np.eye(r), ty)
    pred = g[r:, :r] @ a
    return pred / np.linalg.norm(pred, axis=1, keepdims=True)


def worker(impl: str, r: int, p: int, device: str, save: str) -> dict:
    """One timed case in this (fresh) process."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from revsd.dakl import dakl_predict

    tx, ty, sx = make_data(r, p)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        dakl_predict(tx[:50], ty[:50], sx[:50], GAMMA, ALPHA, device="cuda")  # CUDA context and kernels warm
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if impl == "chunked":
        pred = dakl_predict(tx, ty, sx, GAMMA, ALPHA, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
    else:
        pred = dense_kernel_ridge(tx, ty, sx)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"impl": impl, "r": r, "p": p, "device": device, "seconds": secs, "peak_mib": (peak - base) / 1024,
           "total_mib": peak / 1024}
    if device == "cuda":
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if save:
        np.save(save, pred.astype(np.float32))
    return out


def run_case(impl: str, r: int, p: int, device: str, save: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1"),
           "OPENBLAS_NUM_THREADS": os.environ.get("BENCH_THREADS", "1"), "MKL_NUM_THREADS": os.environ.get("BENCH_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--worker", impl, str(r), str(p), "--device", device, "--save", save]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{impl} r={r} p={p} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def flops(r: int, p: int) -> float:
    """Matrix-product flops of the chunked code (n = r+p): r²n for G_tt (lower triangle), 2rnD twice for the
    training kernel blocks (passes 1 and 2) and 2rnD for W = Φ_tᵀA, 2pnD for the target blocks and 2pnD for Φ_s W."""
    n = r + p
    return r * r * n + 6 * r * n * D + 4 * p * n * D


def projection(r: int, p: int, tflops: float = 15.0, chunk: int = 2048) -> str:
    """GPU cost from the work count and the memory formula (15 TFLOP/s: what an H200 sustained on this code)."""
    mem = 2 * r * r * 8 + r * chunk * 4 + (r + p) * D * 4 + p * D * 4  # G_tt + solver copy, a block, W, preds
    return (f"Projected GPU cost at r={r:,}, p={p:,}: {flops(r, p) / 1e12:.1f} TFLOP at ~{tflops:g} TFLOP/s sustained "
            f"fp32 ≈ {flops(r, p) / tflops / 1e12:.1f} s, GPU memory ≈ 2·r²·8 B + r·chunk·4 B + (r+2p)·d·4 B "
            f"= {mem / 2**30:.2f} GiB (measured on an H200: bench/results/dakl_gpu.md).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "R", "P"), help=argparse.SUPPRESS)
    ap.add_argument("--save", default="", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--skip-paper", action="store_true", help="skip r=10,000, p=30,000")
    ap.add_argument("--skip-dense", action="store_true", help="skip the dense KernelRidge at r=2,000, p=5,000")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dakl.md"))
    args = ap.parse_args(argv)
    if args.worker:
        impl, r, p = args.worker
        print(json.dumps(worker(impl, int(r), int(p), args.device, args.save)))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from revsd.dakl import dakl_predict

    # (1) equality on small data
    tx, ty, sx = make_data(300, 700, seed=1)
    ref = dense_kernel_ridge(tx, ty, sx)
    diffs = {"naive numpy Eq. 5-7": np.abs(naive_numpy(tx, ty, sx) - ref).max(),
             "chunked float64 (chunk=128)": np.abs(dakl_predict(tx, ty, sx, GAMMA, ALPHA, chunk=128,
                                                                dtype=torch.float64, device=args.device) - ref).max(),
             "chunked float32 (default)": np.abs(dakl_predict(tx, ty, sx, GAMMA, ALPHA, device=args.device) - ref).max()}
    lines = ["# DAKL benchmark", "",
             f"`{' '.join(['python bench/bench_dakl.py', *(sys.argv[1:] if argv is None else argv)])}` on "
             f"{platform.node() or 'this machine'}: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, threads={os.environ.get('BENCH_THREADS', '1')}, device={args.device}"
             + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "") + f"; γ={GAMMA}, α={ALPHA}, d={D}.",
             "", "## Equal predictions (r=300, p=700): max |Δ| against sklearn KernelRidge on the explicit kernel", "",
             "| implementation | max abs difference |", "|---|---|"]
    lines += [f"| {k} | {v:.2e} |" for k, v in diffs.items()]
    print("\n".join(lines[-5:]))

    # (2) + (3) timed cases, each in a fresh process
    rows = []
    cases = [("chunked", 2000, 5000)] + ([] if args.skip_dense else [("dense", 2000, 5000)])
    cases += [] if args.skip_paper else [("chunked", 10000, 30000)]
    with tempfile.TemporaryDirectory() as tmp:
        for impl, r, p in cases:
            print(f"running {impl} r={r} p={p} ...", flush=True)
            res = run_case(impl, r, p, args.device if impl == "chunked" else "cpu", f"{tmp}/{impl}_{r}.npy")
            res["gflops"] = flops(r, p) / res["seconds"] / 1e9 if impl == "chunked" else float("nan")
            rows.append(res)
            print(json.dumps(res), flush=True)
        agree = ""
        if not args.skip_dense:
            a, b = np.load(f"{tmp}/chunked_2000.npy"), np.load(f"{tmp}/dense_2000.npy")
            agree = f"chunked (float32) vs dense at r=2,000, p=5,000: max |Δ| = {np.abs(a - b).max():.2e}, " \
                    f"mean cosine between them {float((a * b).sum(1).mean()):.6f}."
    lines += ["", "## Time and peak memory (each case in a fresh process)", "",
              "| implementation | r | p | device | seconds | peak RSS Δ (MiB) | process peak RSS (MiB) | GPU peak (MiB) "
              "| GFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        gpu = f"{x['gpu_peak_mib']:.0f}" if "gpu_peak_mib" in x else "–"
        gf = "–" if np.isnan(x["gflops"]) else f"{x['gflops']:.0f}"
        lines.append(f"| {x['impl']} | {x['r']:,} | {x['p']:,} | {x['device']} | {x['seconds']:.1f} | "
                     f"{x['peak_mib']:.0f} | {x['total_mib']:.0f} | {gpu} | {gf} |")
    small = next(x for x in rows if x["impl"] == "chunked" and x["r"] == 2000)
    ok = small["seconds"] < 20 and small["total_mib"] < 2048
    lines += ["", agree, "",
              f"Target r=2,000, p=5,000 under 20 s and 2 GiB: {'met' if ok else 'NOT met'} "
              f"({small['seconds']:.1f} s; whole process, torch included, peaked at {small['total_mib']:.0f} MiB).",
              "Peak RSS Δ is the process's high-water mark minus its mark after making the data, so it understates "
              "allocations smaller than the data generation's temporaries; the process peak is an upper bound.",
              f"Matrix-product work per fit+predict: {flops(2000, 5000) / 1e9:.0f} GFLOP at r=2,000, p=5,000; "
              f"{flops(10000, 30000) / 1e12:.1f} TFLOP at r=10,000, p=30,000 (memory ≈ 2·r² float64 for G_tt and "
              f"the solver's copy + chunk·(r+p) blocks, never (r+p)²).", projection(10000, 30000)]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
