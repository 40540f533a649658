"""Out-of-domain scores for the domain guard (``revsd.domain``): which one puts scikit-image's photos out of domain?

    .venv/bin/python bench/bench_guard_scores.py           # every run under working/03_train/demo/, writes
                                                           # bench/results/guard_scores.md and, beside it,
                                                           # guard_astronaut_neighbours.jpg (--neighbours run)
    .venv/bin/python bench/bench_guard_scores.py --runs working/03_train/demo/effnet_lite2_cfg2_f-1_s0 --layers

Per run (read only: nothing under working/ is written), the run's pooled features (``predict(with_features=True)``)
of the demo's train / val / test images (``revsd.targets.load("demo")``), the 15 scikit-image photos
(``bench_predict.SKIMAGE_PHOTOS``) and ``--other`` seeded held-out SD tiles (../shared/data, supagruen_sd15, not in
the sample) and ``independent_photos()``. Every other score is fitted on train and calibrated on val (median /
MAD ``z``, ``in_domain = min(1, P(Z >= z) / alpha)``, out of domain below 0.5); the guarded test embeddings move
towards the broad prior (``domain.bank_prior``, as bench_predict.py's guard rows). The Q64 row is
``domain.DomainGuard`` on the rows ``domain.fit_for_run`` uses (or the run's saved ``domain.npz``), i.e. what
``revsd predict`` computes. ``--layers RUN ...`` adds per-block channel statistics (default: one Lite2 and one Lite0
run). Scores and columns: ``SCORES_DOC`` below.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm
from sklearn.covariance import LedoitWolf

from revsd import domain, predict, prior, retrieval, targets
from revsd.artifacts import write_text
from revsd.images import open_rgb

sys.path.insert(0, str(Path(__file__).parent))
from bench_predict import SKIMAGE_PHOTOS, markdown

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "sd_images" / "supagruen_sd15"
ASTRO = SKIMAGE_PHOTOS.index("astronaut.png")
INDEPENDENT_SKIMAGE = ("ihc.png", "cell.png", "clock_motion.png", "microaneurysms.png")  # photos, not charts/drawings
SCORES_DOC = """\
- **Q64 (guard)**: `domain.DomainGuard`: norm of the residual of the unit-norm, centred features outside their top
  principal components (min(64, n_train // 3, n_features // 2) of them); the score `revsd predict` uses; **Q64
  guard, --guard-alpha A**: the same guard as `revsd predict --guard-alpha A` makes it (stricter than the default
  alpha 0.005); **Q16**: the same with 16 components;
- **T²16**: Hotelling T², sqrt(Σ projection² / variance) on the top 16 components;
- **kNN1 / kNN5**: 1 − mean cosine to the k nearest training images;
- **LW-Mahalanobis**: Mahalanobis distance of the unit-norm features under sklearn's Ledoit-Wolf covariance;
- **logit Q64**: Q64 of the ImageNet logits (`revsd.prior._classifier_head(variant)` applied to the features; only
  frozen, pretrained EfficientNet-Lite0/2 runs, whose features are that classifier's input);
- **union a=…**: feature Q64 and logit Q64 each calibrated on val at that alpha, in_domain = the smaller one
  (= `max(z_feature, z_logit)`; its percentiles are of that max); **union cross-fitted a=…**: the same with the
  logit view cross-fitted like the guard (a=0.0025: each view at half the default alpha, as a Bonferroni union);
- **layer … Q64 / kNN5** (`--layers` runs only): the same scores on the per-channel mean and std of the block's output
  feature map (forward hooks on the run's frozen backbone);
- **head entropy / head JointEnergy** (runs with a vocabulary head): the head's uncertainty, Σ of the binary entropies
  of its word probabilities, and minus the multi-label energy Σ log(1 + e^logit) (JointEnergy, Wang et al. 2021),
  each calibrated on val as above (the heads were trained on train, so train is not a fair reference);
- **guard ∪ head log-entropy a=…**: in_domain = the smaller of the guard's (default alpha) and that of the log of the
  head entropy calibrated on val at the stricter alpha a (the head's entropy has a long right tail on SD tiles);
- **output norm / output kNN5 / output to targets**: the embedding head's output: minus the norm of its raw
  (unnormalised) output, which shrinks where the head hedges; 1 − mean cosine of the predicted embedding to the 5
  nearest predictions for training images; 1 − the largest cosine to a training target (calibrated on val).

Columns: *photos out* of 15 (in_domain < 0.5) and the names of those left in domain; *ast. in_domain*; *ast. pct*:
share of the val / test / other-SD images scoring below the astronaut (%); *test in*: test images in domain;
*Δ test cos*: mean cosine to the truth of the guarded minus the model's test embeddings; *other in*: other-SD images
in domain; *indep. out*: independent real photos out of domain (`independent_photos()`: matplotlib's grace_hopper, a
portrait like the astronaut, scikit-learn's china and flower, four more scikit-image photos), and those left in.
Requirement: 15/15 photos out, test in ≥ 95 %, |Δ test cos| ≤ 0.002.

The Q64 guard row is fitted as `revsd predict` fits it: a frozen backbone's guard is cross-fitted (subspace of
train ∪ val, calibrated on out-of-fold scores; its *ast. pct val* uses the val images' out-of-fold scores); the
other rows are fitted on train and calibrated on val."""


unit = domain._unit
STRICTER = (0.01, 0.02, 0.05)  # revsd predict --guard-alpha values shown beside the default
HEAD_UNION_ALPHAS = (0.001, 0.0002, 0.00005)  # the head's log-entropy joined with the guard at these alphas


def t2(dims):
    def fit(tr, va):
        x = unit(tr)
        m = x.mean(0)
        _, sv, vt = np.linalg.svd(x - m, full_matrices=False)
        d = min(dims, len(x) // 3)
        v, var = vt[:d], sv[:d] ** 2 / (len(x) - 1)
        return lambda f: np.sqrt(((((unit(f) - m) @ v.T) ** 2) / var).sum(1))  # sqrt of T²
    return fit


def knn(k):
    def fit(tr, va):
        x = unit(tr)
        return lambda f: 1 - np.sort(unit(f) @ x.T, axis=1)[:, -k:].mean(1)
    return fit


def lw_mahalanobis(tr, va):
    lw = LedoitWolf().fit(unit(tr))
    return lambda f: np.sqrt(lw.mahalanobis(unit(f)))


def q(dims):
    return lambda tr, va: domain.DomainGuard.fit(tr, va, dims=dims).score


FEATURE_SCORES = {"Q16": q(16), "T²16": t2(16), "kNN1": knn(1), "kNN5": knn(5), "LW-Mahalanobis": lw_mahalanobis}


def calibrate(score, data: dict) -> dict:
    """z of every set from the val scores' median and MAD (as ``DomainGuard.fit``)."""
    s = {k: np.asarray(score(v), dtype=np.float32) for k, v in data.items()}
    med = float(np.median(s["val"]))
    scale = float(max(1.4826 * np.median(np.abs(s["val"] - med)), 1e-6))
    return {k: (v.astype(np.float64) - med) / scale for k, v in s.items()}


def guard_z(g, data: dict, n_val: int) -> dict:
    """z of every set under a fitted ``DomainGuard``; cross-fitted: val is in the subspace, so its z are the
    out-of-fold calibration scores (the last ``n_val`` of them)."""
    z = {k: (g.score(v).astype(np.float64) - g.median) / g.scale for k, v in data.items()}
    if g.calibration != "val":
        z["val"] = (g.val_scores[-n_val:].astype(np.float64) - g.median) / g.scale
    return z


def in_domain(z, alpha):
    return np.minimum(1.0, np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in z]) / alpha)


def at_alpha(z, alpha, to):
    """``z`` rescaled so that ``in_domain(result, to) == in_domain(z, alpha)`` (to join views of other alphas)."""
    return norm.isf(np.clip(norm.sf(z) * to / alpha, 1e-300, 1.0))


def independent_photos() -> list[Path]:
    """Real photos that ship in other installed packages (and scikit-image's remaining ones), not among the 15
    judged ones: an independent check that a score's verdict on those 15 is not a fit to them."""
    import matplotlib
    import skimage.data
    import sklearn

    sk = Path(skimage.data.__file__).parent
    return [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
            *(Path(sklearn.__file__).parent / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")),
            *(sk / n for n in INDEPENDENT_SKIMAGE)]


def image_sets(n_other: int, seed: int):
    ts = targets.load("demo")
    files = ts.table["image_path"].to_numpy()
    sets = {s: list(files[ts.rows(s)]) for s in ("train", "val", "test")}
    import skimage.data
    sets["photos"] = [Path(skimage.data.__file__).parent / n for n in SKIMAGE_PHOTOS]
    sets["indep"] = independent_photos()
    used = {Path(p).name for p in files}
    pairs = pd.read_csv(SHARED / "pairs.csv")
    other = [SHARED / f for f in pairs["file"] if Path(f).name not in used]
    sets["other"] = list(np.random.default_rng(seed).choice(other, n_other, replace=False))
    return ts, sets


def features(run: Path, sets: dict, layers: bool):
    """(predictor, embeddings, vocabulary-head probabilities (None without that head), pooled features,
    {layer: {set: channel mean ‖ std}}) of every image set."""
    pred = predict.load_predictor(run)
    side = predict.min_side(pred)
    stats, hooks, lay, emb, probs, feats, raw = {}, [], {}, {}, {}, {}, {}
    if layers:
        mods = dict(pred.extractor.named_modules())
        names = ["net.bn1"] + [f"net.blocks.{i}" for i in range(len(pred.extractor.net.blocks))]

        def hook(name):
            return lambda m, i, o: stats.setdefault(name, []).append(
                torch.cat([o.mean((2, 3)), o.std((2, 3))], 1).float().cpu().numpy())
        hooks = [mods[n].register_forward_hook(hook(n)) for n in names]
    hooks.append(pred.model.head.emb_head.register_forward_hook(  # the embedding head's raw output
        lambda m, i, o: stats.setdefault("\0raw", []).append(o.detach().float().cpu().numpy())))
    for k, files in sets.items():
        stats.clear()
        emb[k], probs[k], feats[k] = pred.predict([open_rgb(p, min_side=side) for p in files], with_features=True)
        raw[k] = np.concatenate(stats.pop("\0raw"))
        for n, v in stats.items():
            lay.setdefault(n, {})[k] = np.concatenate(v)
    for h in hooks:
        h.remove()
    return pred, emb, probs if pred.spec.vocab_size else None, feats, lay, raw


def head_entropy(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p)).sum(1)


def head_joint_energy(p):  # log(1 + e^logit) = -log(1 - p)
    return np.log(np.clip(1 - p, 1e-7, 1)).sum(1)


def neighbours(run: Path, sets: dict, feats: dict, ts, out_jpg: Path | None, k: int = 5) -> str:
    """The training (train + val) images nearest the two portrait photos in the run's pooled features (cosine of the
    unit-norm features, the guard's geometry), with their prompts; ``out_jpg``: a contact sheet of them."""
    prompts = [*ts.table["prompt"].to_numpy()[ts.rows("train")], *ts.table["prompt"].to_numpy()[ts.rows("val")]]
    files = [*sets["train"], *sets["val"]]
    ref = unit(np.concatenate([feats["train"], feats["val"]]))
    lines, sheet = [], []
    for name, path, f in (("astronaut", sets["photos"][ASTRO], feats["photos"][ASTRO]),
                          ("grace_hopper", sets["indep"][0], feats["indep"][0])):
        sim = ref @ unit(f[None])[0]
        top = np.argsort(-sim, kind="stable")[:k]
        lines.append(f"- **{name}**: " + "; ".join(f"`{prompts[i]}` ({sim[i]:.3f}, {Path(files[i]).name})"
                                                  for i in top))
        sheet.append([path, *(files[i] for i in top)])
    if out_jpg is not None:
        from PIL import Image
        t = 128
        img = Image.new("RGB", (t * (k + 1), t * len(sheet)), "white")
        for r, paths in enumerate(sheet):
            for c, p in enumerate(paths):
                img.paste(open_rgb(p).resize((t, t)), (c * t, r * t))
        out_jpg.parent.mkdir(parents=True, exist_ok=True)
        img.save(out_jpg, quality=85)
    return (f"## Nearest training images of the two portrait photos ({run.name})\n\n" + "\n".join(lines)
            + (f"\n\nContact sheet (each row: the photo, then its {k} nearest training images): "
               f"`{out_jpg.name}`" if out_jpg is not None else "") + "\n\n")


def row(run, view, name, z, alpha, emb, true, prior_vec) -> dict:
    w = {k: in_domain(z[k], alpha) for k in ("test", "photos", "other", "indep")}
    a = z["photos"][ASTRO]
    pct = {k: float((z[k] < a).mean()) for k in ("val", "test", "other")}
    cos = lambda e: float((e * true).sum(1).mean())
    dcos = cos(domain.guard(emb, w["test"], prior_vec)) - cos(emb)
    out = int((w["photos"] < domain.OUT_OF_DOMAIN).sum())
    left = [n.split(".")[0] for n, v in zip(SKIMAGE_PHOTOS, w["photos"]) if v >= domain.OUT_OF_DOMAIN]
    test_in, other_in = float((w["test"] >= 0.5).mean()), float((w["other"] >= 0.5).mean())
    indep_out = int((w["indep"] < domain.OUT_OF_DOMAIN).sum())
    indep_left = [Path(p).stem for p, v in zip(independent_photos(), w["indep"]) if v >= domain.OUT_OF_DOMAIN]
    num = {"run": run, "view": view, "score": name, "out": out, "pct": pct, "test_in": test_in, "dcos": dcos,
           "ast": float(w["photos"][ASTRO]), "indep_out": indep_out, "indep_left": indep_left}
    shown = {"score": name, "alpha": alpha, "photos out": f"{out}/{len(w['photos'])}", "left in domain":
             ", ".join(left) or "–", "ast. in_domain": f"{num['ast']:.2f}",
             "ast. pct val / test / other": " / ".join(f"{100 * pct[k]:.0f}" for k in pct),
             "test in": f"{test_in:.1%}", "Δ test cos": f"{dcos:+.4f}", "other in": f"{other_in:.1%}",
             "indep. out": f"{indep_out}/{len(w['indep'])}", "indep. left in domain": ", ".join(indep_left) or "–"}
    return {"num": num, "shown": shown}


def bench_run(run: Path, sets: dict, ts, prior_vec, layers: bool, sheet: Path | None = None) -> tuple[list[dict], str]:
    """Every score's rows for one run (``ts``: the demo's targets); ``sheet``: also list and draw the portraits'
    nearest training images there."""
    true, train_targets = ts.emb[ts.rows("test")], ts.emb[ts.rows("train")]
    t = time.perf_counter()
    pred, emb, P, F, lay, raw = features(run, sets, layers)
    t_feat = time.perf_counter() - t
    n = {"train": len(F["train"]), "val": len(F["val"])}
    assert n["train"] <= domain.MAX_REF and n["val"] <= domain.MAX_VAL  # else fit_for_run would subsample
    g = domain.load(run)
    source = "the run's saved domain.npz" if g is not None else \
        f"`DomainGuard.fit` on all {n['train']} train / {n['val']} val features (as `domain.fit_for_run`)"
    g = g or domain.DomainGuard.fit(F["train"], F["val"], cross_fit=pred.spec.mode == "frozen")
    zq = guard_z(g, F, n["val"])
    if g.calibration != "val":
        source += f", calibrated {g.calibration}"
    assert np.allclose(in_domain(zq["test"], g.alpha), g.in_domain(F["test"]), atol=1e-6)
    name = f"Q{domain.DIMS} (guard: {len(g.components)} dims{', cross-fitted' if g.calibration != 'val' else ''})"
    rows = [row(run.name, "feature", name, zq, g.alpha, emb["test"], true, prior_vec)]
    rows += [row(run.name, "feature", f"Q64 guard, --guard-alpha {a}", zq, a, emb["test"], true, prior_vec)
             for a in STRICTER]
    for name, fit in FEATURE_SCORES.items():
        z = calibrate(fit(F["train"], F["val"]), F)
        rows.append(row(run.name, "feature", name, z, domain.ALPHA, emb["test"], true, prior_vec))
    spec = pred.spec
    variant = prior.VARIANTS.get(spec.backbone) if spec.mode == "frozen" and spec.pretrained and not spec.tiny \
        and not spec.weights else None
    if variant:
        head = prior._classifier_head(variant)
        with torch.no_grad():
            L = {k: head(torch.from_numpy(v)).numpy() for k, v in F.items()}
        zl = calibrate(q(64)(L["train"], L["val"]), L)
        rows.append(row(run.name, "logit", "logit Q64", zl, domain.ALPHA, emb["test"], true, prior_vec))
        zu = {k: np.maximum(zq[k], zl[k]) for k in zq}
        for a in (0.0025, 0.005):
            rows.append(row(run.name, "union", f"union a={a}", zu, a, emb["test"], true, prior_vec))
        if g.calibration != "val":  # the logit view calibrated as the guard is (cross-fitted), then the union
            zc = guard_z(domain.DomainGuard.fit(L["train"], L["val"], cross_fit=True), L, n["val"])
            zu = {k: np.maximum(zq[k], zc[k]) for k in zq}
            for a in (0.0025, 0.005):
                rows.append(row(run.name, "union", f"union cross-fitted a={a}", zu, a, emb["test"], true, prior_vec))
    for name, fn in (("head entropy", head_entropy), ("head JointEnergy", head_joint_energy)) if P else ():
        rows.append(row(run.name, "head", name, calibrate(fn, P), domain.ALPHA, emb["test"], true, prior_vec))
    if P:  # the guard joined with the head's log-entropy, the latter at stricter alphas
        zh = calibrate(lambda p: np.log(head_entropy(p)), P)
        for ah in HEAD_UNION_ALPHAS:
            zu = {k: np.maximum(zq[k], at_alpha(zh[k], ah, g.alpha)) for k in zq}
            rows.append(row(run.name, "union", f"guard ∪ head log-entropy a={ah:g}", zu, g.alpha, emb["test"], true,
                            prior_vec))
    outputs = {"output norm": {k: -np.linalg.norm(v, axis=1) for k, v in raw.items()},
               "output kNN5": {k: 1 - np.sort(v @ emb["train"].T, 1)[:, -5:].mean(1) for k, v in emb.items()},
               "output to targets": {k: 1 - (v @ train_targets.T).max(1) for k, v in emb.items()}}
    for name, s in outputs.items():
        rows.append(row(run.name, "output", name, calibrate(lambda v: v, s), domain.ALPHA, emb["test"], true,
                        prior_vec))
    for layer, data in lay.items():
        for name, fit in (("Q64", q(64)), ("kNN5", knn(5))):
            z = calibrate(fit(data["train"], data["val"]), data)
            rows.append(row(run.name, "layer", f"layer {layer} {name}", z, domain.ALPHA, emb["test"], true, prior_vec))
    base = float((emb["test"] * true).sum(1).mean())
    head_md = (f"## {run.name}\n\n{pred.backbone} ({spec.mode}, {pred.input_size}px); features of "
               f"{sum(map(len, F.values()))} images in {t_feat:.0f} s; Q guard: {source}; mean test cosine: model "
               f"{base:.4f}, broad prior {float((true @ prior_vec).mean()):.4f}"
               + ("" if variant else "; no logit view (not a frozen pretrained EfficientNet-Lite0/2)")
               + ("" if P else "; no vocabulary head") + "\n\n")
    if sheet is not None:
        head_md += neighbours(run, sets, F, ts, sheet)
    return rows, head_md


def conclusion(nums: list[dict]) -> str:
    lines = []
    for view in ("feature", "layer", "logit", "union", "head", "output"):
        v = [r for r in nums if r["view"] == view]
        if not v:
            continue
        worst = [min(r["pct"].values()) for r in v]  # astronaut's lowest percentile over val / test / other
        top = v[int(np.argmax(worst))]
        lines.append(f"- {view} scores ({len(v)} rows): photos out {min(r['out'] for r in v)}-"
                     f"{max(r['out'] for r in v)} of 15; astronaut out of domain in {sum(r['ast'] < 0.5 for r in v)} "
                     f"rows; its percentile (lowest of val / test / other) {100 * min(worst):.0f}-"
                     f"{100 * max(worst):.0f} %, highest for {top['score']} on {top['run']}")
    n_ind = len(independent_photos())
    ind_in = sorted({p for r in nums for p in r["indep_left"]})
    left = ", ".join(f"{p} ({sum(p in r['indep_left'] for r in nums)}/{len(nums)} rows)" for p in ind_in)
    lines.append(f"- independent photos ({n_ind}: {', '.join(p.stem for p in independent_photos())}) out of domain: "
                 f"{min(r['indep_out'] for r in nums)}-{max(r['indep_out'] for r in nums)} of {n_ind}; ever left in "
                 f"domain: {left or 'none'}")
    both = [r for r in nums if r["ast"] < 0.5 and "grace_hopper" not in r["indep_left"]]
    lines.append("- the two portrait photos (astronaut, grace_hopper) both out of domain: "
                 + ("; ".join(f"{r['score']} on {r['run']}" for r in both) or "**no row**"))
    all15 = [r for r in nums if r["out"] == 15]
    lines.append("- 15/15 photos out: " + ("; ".join(f"{r['score']} on {r['run']} (test in {r['test_in']:.1%}, "
                                                     f"Δ cos {r['dcos']:+.4f})" for r in all15) or "none"))
    ok = [r for r in all15 if r["test_in"] >= 0.95 and abs(r["dcos"]) <= 0.002]
    lines.append("- meeting the whole requirement (15/15 out, test in ≥ 95 %, |Δ test cos| ≤ 0.002): "
                 + (", ".join(f"{r['score']} on {r['run']}" for r in ok) or "**none**"))
    hu = [r for r in nums if "head log-entropy" in r["score"]]
    if hu:
        met = [r for r in hu if r in ok]
        lines.append(f"- guard ∪ head log-entropy: the whole requirement met in {len(met)} of {len(hu)} (run, alpha) "
                     "rows" + (": " + ", ".join(f"{r['run']} at {r['score'].split('=')[-1]}" for r in met) if met
                               else "") + "; per run and alpha (photos out, test in, Δ cos): " + "; ".join(
                         f"{r['run']} {r['score'].split('=')[-1]} ({r['out']}, {r['test_in']:.1%}, {r['dcos']:+.4f})"
                         for r in hu))
    strict = {}
    for r in nums:
        if r["score"].startswith("Q64 guard, --guard-alpha") and r["out"] == 15 and r["run"] not in strict:
            strict[r["run"]] = r
    lines.append("- smallest `--guard-alpha` that puts all 15 photos out, per run: "
                 + ("; ".join(f"{run}: {r['score'].split()[-1]} (test in {r['test_in']:.1%}, Δ cos {r['dcos']:+.4f}, "
                              f"grace_hopper {'in' if 'grace_hopper' in r['indep_left'] else 'out'})"
                              for run, r in strict.items()) or f"none up to {STRICTER[-1]}"))
    guard = [r for r in nums if "(guard" in r["score"]]
    lines.append(f"- the guard as shipped (Q64 (guard)): photos out {sorted({r['out'] for r in guard})}, Δ test cos "
                 f"{min(r['dcos'] for r in guard):+.4f} to {max(r['dcos'] for r in guard):+.4f}, test in "
                 f"{min(r['test_in'] for r in guard):.1%}-{max(r['test_in'] for r in guard):.1%}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=None, help="run folders (default: every trained demo run)")
    ap.add_argument("--layers", nargs="*", default=["effnet_lite2_cfg2_f-1_s0", "effnet_lite0_cfg3_f-1_s0"],
                    help="run names that also get the per-block channel-statistics view (none: --layers)")
    ap.add_argument("--other", type=int, default=300, help="held-out SD tiles from the shared data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "guard_scores.md"))
    ap.add_argument("--neighbours", default="effnet_lite2_cfg2_f-1_s0",
                    help="run whose nearest training images of the two portraits are listed (and drawn beside --out)")
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.runs] if args.runs else sorted(
        p for p in (ROOT / "working" / "03_train" / "demo").iterdir() if (p / "model.safetensors").exists())
    load0, t0 = os.getloadavg(), time.perf_counter()
    ts, sets = image_sets(args.other, args.seed)
    prior_vec = domain.bank_prior(retrieval.default_bank("demo").emb)
    nums, body = [], ""
    for run in runs:
        print(f"{run.name} ...", flush=True)
        near = run.name == args.neighbours
        rows, head_md = bench_run(run, sets, ts, prior_vec, run.name in args.layers,
                                  Path(args.out).with_name("guard_astronaut_neighbours.jpg") if near else None)
        nums += [r["num"] for r in rows]
        body += head_md + markdown([r["shown"] for r in rows]) + "\n"
        print(head_md + markdown([r["shown"] for r in rows]), flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads); load average {load0[0]:.1f} at the start, "
               f"{os.getloadavg()[0]:.1f} at the end (other jobs share these CPUs); {time.perf_counter() - t0:.0f} s")
    cmd = " ".join([".venv/bin/python bench/bench_guard_scores.py", *(sys.argv[1:] if argv is None else argv)])
    sizes = ", ".join(f"{k} {len(v)}" for k, v in sets.items())
    md = (f"# bench_guard_scores\n\n`{cmd}` on {machine}\n\nImages per run: {sizes} (other: seed {args.seed}, SD "
          f"tiles of supagruen_sd15 not in the sample). Frozen runs of one backbone share their features, so their "
          f"score columns agree; the heads differ only in Δ test cos.\n\n{SCORES_DOC}\n\n"
          f"## Conclusion (computed)\n\n{conclusion(nums)}\n{body}")
    write_text(args.out, md)
    print(conclusion(nums))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
