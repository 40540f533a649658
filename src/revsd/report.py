"""The pipeline's report, built from the runs' files only: ``working/report.md`` and
``working/06_dakl_ensemble/<exp>/report.md`` with PNG plots beside the latter.

Per-run rows come from each finished run's ``metrics.json``; the blend / DAKL / constant-mean rows from stage
06's ``ensemble.json`` (when 06 has run). Variants that were not run are absent; nothing is filled in. The
paper's Tables 1-3 follow in the paper's layout, the paper's numbers (:mod:`revsd.paper_numbers`) beside ours;
ours are blank where a row was not run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from revsd import paper_numbers as paper
from revsd import paths
from revsd.artifacts import atomic_path, read_json, write_text
from revsd.runs import discover_runs
from revsd.variants import HEAD_CONFIGS, PLAIN, VARIANT_LABELS, variant_label

STAGE = "06_dakl_ensemble"
_FIT = {"oof": "cross-fitted on the OOF rows: each fold predicted from the others, then all OOF rows → test",
        "train": "the training rows' in-sample predictions, as in the paper"}
COLUMNS = ["model", "run", "val / OOF cosine", "test cosine", "Δ test vs constant"]


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def results_table(runs, ensemble: dict | None) -> pd.DataFrame:
    """Table-1-style rows: each backbone × variant present, then the blends, DAKL and the constant mean."""
    order = {v: i for i, v in enumerate(VARIANT_LABELS)}
    runs = sorted(runs, key=lambda r: (r.backbone, order.get(r.variant, len(order)), r.name))
    rows = [(f"{r.backbone} {variant_label(r.variant)}", f"{r.stage}/{r.name}",
             _num(r.metrics.get("val_cosine")), _num(r.metrics.get("test_cosine"))) for r in runs]
    if ensemble:
        sc, p, n = ensemble["scores"], ensemble["dakl"], len(ensemble["runs"])
        labels = {"median": f"all models ({n} runs): median", "weighted": f"all models ({n} runs): weighted mean",
                  "dakl": f"all models weighted + DAKL (γ={p['gamma']:g}, r={p['r']}, α={p['alpha']:g})"}
        for m, label in labels.items():
            mark = " ← final" if ensemble["final"] == m else ""
            rows.append((label + mark, "06_dakl_ensemble", sc[m]["oof"], sc[m]["test"]))
        const = sc["constant_mean"]["oof"], sc["constant_mean"]["test"]
    else:
        first = next((r.metrics for r in runs if "const_mean_test" in r.metrics), {})
        const = _num(first.get("const_mean_val")), _num(first.get("const_mean_test"))
    rows.append(("constant mean embedding (train targets)", "baseline", *const))
    df = pd.DataFrame(rows, columns=COLUMNS[:4])
    df[COLUMNS[4]] = df["test cosine"] - const[1]
    return df


def to_markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A pipe table; floats to ``digits`` places, signed in columns starting with "Δ", NaN as "–"."""
    def cell(v, col):
        if isinstance(v, (float, np.floating)):
            return "–" if math.isnan(v) else f"{v:{'+' if col.startswith('Δ') else ''}.{digits}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v, c) for v, c in zip(row, df.columns)) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


def run_keys(run) -> dict:
    """How a run maps onto the paper's rows: vocabulary head or not, the paper's head configuration, curriculum."""
    m = run.metrics
    cfg_path = run.path / "config.json"
    cfg = read_json(cfg_path) if ("vocab_head" not in m or "head_config" not in m) and cfg_path.exists() else {}
    vocab = m.get("vocab_head", cfg.get("vocab_head"))
    if vocab is None:  # runs from before `vocab_head` was recorded
        vocab = run.variant != PLAIN and _num(m.get("lam", m.get("lambda", 1.0))) != 0
    head = HEAD_CONFIGS.get(str(m.get("head_config", cfg.get("head_config", ""))))
    return {"vocab": bool(vocab), "paper_cfg": head.paper if (vocab and head) else 0,
            "curriculum": run.stage == "05_curriculum"}


def _best(runs, **want):
    """The run with the best validation cosine among those whose :func:`run_keys` match ``want``."""
    hits = [r for r in runs if all(run_keys(r)[k] == v for k, v in want.items())]
    return max(hits, key=lambda r: r.val_cosine) if hits else None


def _ours(run) -> tuple:
    if run is None:
        return "", "", ""
    return _num(run.metrics.get("test_cosine")), _num(run.metrics.get("val_cosine")), f"{run.stage}/{run.name}"


def paper_table1(runs, ensemble: dict | None) -> pd.DataFrame:
    """Table 1: per backbone vanilla / + vocabulary head / + curriculum, then the joint rows; paper beside ours."""
    want = {"vanilla": dict(vocab=False, curriculum=False), "vocab": dict(vocab=True, curriculum=False),
            "vocab_curriculum": dict(vocab=True, curriculum=True)}
    others = sorted({r.backbone for r in runs} - set(paper.BACKBONES))
    rows = []
    for b in [*paper.BACKBONES, *others]:
        mine = [r for r in runs if r.backbone == b]
        name = paper.BACKBONES.get(b, f"{b} (not in the paper)")
        for key, label in paper.TABLE1_ROWS.items():
            rows.append((name, label, paper.cell(paper.TABLE1.get((b, key))), *_ours(_best(mine, **want[key]))))
    for key, label in paper.JOINT_ROWS.items():
        sc = (ensemble or {}).get("scores", {}).get(key)
        ours = (sc["test"], sc["oof"], "06_dakl_ensemble") if sc else ("", "", "")
        rows.append(("all backbones", label, paper.cell(paper.TABLE1[("joint", key)]), *ours))
    return pd.DataFrame(rows, columns=["backbone", "model", "paper: test", "ours: test", "ours: val / OOF", "run"])


def paper_table2(runs) -> pd.DataFrame:
    """Table 2: Swin-L without a vocabulary head, then with head configurations 1, 2, 3."""
    swin = [r for r in runs if r.backbone == "swin_l"]
    labels = {0: "baseline (no vocabulary head)", **{h.paper: f"configuration {h.paper} ({h.name})"
                                                     for h in HEAD_CONFIGS.values() if h.paper}}
    rows = []
    for n, label in sorted(labels.items()):
        run = _best(swin, vocab=False, curriculum=False) if n == 0 else _best(swin, paper_cfg=n, curriculum=False)
        rows.append(("Swin-L", label, paper.cell(paper.TABLE2.get(n)), *_ours(run)))
    return pd.DataFrame(rows, columns=["backbone", "model", "paper: test", "ours: test", "ours: val / OOF", "run"])


def find_tally() -> Path | None:
    """The newest ``tally.csv`` written by ``revsd study tally`` one or two folders below working/."""
    w = paths.working_dir()
    found = [*w.glob("*/tally.csv"), *w.glob("*/*/tally.csv")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def paper_table3(tally: Path | None) -> pd.DataFrame:
    """Table 3: votes per annotator, all-agree and average, ours (from ``tally.csv``) and the paper's."""
    ours = pd.read_csv(tally, index_col=0) if tally else pd.DataFrame(columns=paper.TABLE3_ANSWERS)
    names = [*ours.index.astype(str)] or list(paper.TABLE3)
    rows = []
    for name in names:
        theirs = paper.TABLE3.get(name, {})
        row = [name]
        for a in paper.TABLE3_ANSWERS:
            row += [paper.cell(theirs.get(a), 2), f"{ours.loc[name, a]:g}" if name in ours.index else ""]
        rows.append(row)
    cols = ["annotator"] + [f"{who}: {a}" for a in paper.TABLE3_ANSWERS for who in ("paper", "ours")]
    return pd.DataFrame(rows, columns=cols)


def paper_tables_md(runs, ensemble: dict | None) -> list[str]:
    """The three tables as Markdown lines, with how rows were matched and where the numbers come from."""
    tally = find_tally()
    return ["## The paper's tables, ours beside the paper's", "",
            f"Paper numbers: {paper.SOURCE} (`revsd.paper_numbers`; n/a = not transcribed). Ours: mean test "
            "cosine of the best-validation run matching the row (backbone, vocabulary head or not, head "
            "configuration, curriculum); blank where no such run finished.", "",
            "### Table 1: backbones, vocabulary head, curriculum, ensembles", "",
            to_markdown(paper_table1(runs, ensemble)), "",
            "### Table 2: vocabulary-head configurations on Swin-L", "", to_markdown(paper_table2(runs)), "",
            "### Table 3: human study (votes)", "",
            f"Ours from `{tally.relative_to(paths.working_dir()).as_posix()}`." if tally else
            "No `tally.csv` under working/ yet: `revsd study tally --db <study.sqlite>` writes it.", "",
            to_markdown(paper_table3(tally)), ""]


def partial_md(ens: dict | None) -> list[str]:
    """A loud note when 06 blended on fewer ids than expected (``allow_partial``)."""
    notes = [f"{p['kept']} of the {p['expected']} {split} ids (lacking: " +
             ", ".join(f"{k} {v}" for k, v in p["lacking"].items()) + ")"
             for split, p in ((ens or {}).get("partial") or {}).items()]
    if not notes:
        return []
    return [f"> **Warning — partial predictions (allow_partial: true):** the blend and scores use only "
            f"{'; '.join(notes)}.", ""]


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_learning_curves(runs, path: Path) -> Path | None:
    """One panel per run: train and validation cosine per epoch from its summary.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r, pd.read_csv(r.path / "summary.csv")) for r in runs if (r.path / "summary.csv").exists()]
    if not curves:
        return None
    cols = min(3, len(curves))
    nrows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3 * nrows), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, (r, s) in zip(axes.flat, curves):
        x = s["epoch"] if "epoch" in s else np.arange(1, len(s) + 1)
        for col in ("train_cos", "val_cos"):
            if col in s:
                ax.plot(x, s[col], marker="o", ms=3, label=col)
        if "const_mean_val" in r.metrics:
            ax.axhline(_num(r.metrics["const_mean_val"]), color="grey", ls="--", lw=1, label="const mean (val)")
        ax.set_title(f"{r.name}", fontsize=9)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("mean cosine")
    axes[0, 0].legend(fontsize=7)
    return _save_fig(fig, path)


def plot_test_histogram(cosines: pd.DataFrame, path: Path) -> Path:
    """Histogram of per-image test cosines for each method in ``cosines`` (columns besides image_id)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    methods = [c for c in cosines.columns if c != "image_id"]
    bins = np.linspace(np.floor(10 * float(cosines[methods].min().min())) / 10, 1.0, 41)
    for m in methods:
        ax.hist(cosines[m], bins=bins, histtype="step", lw=1.5, label=f"{m} (mean {cosines[m].mean():.3f})")
    ax.set_xlabel("cosine(predicted, true prompt embedding) per test image")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    return _save_fig(fig, path)


def build_report(exp: str) -> Path:
    """Write the report for ``exp`` from the files on disk; returns ``working/report.md``."""
    runs = discover_runs(exp)
    out = paths.stage_dir(STAGE, exp)
    ens_path = out / "ensemble.json"
    ens = read_json(ens_path) if ens_path.exists() else None
    table = results_table(runs, ens)

    md = [f"# revsd report — exp `{exp}`", "",
          "Mean cosine between predicted and true all-MiniLM-L6-v2 prompt embeddings, measured in this run: "
          "`val / OOF` on each run's validation rows, `test` on the held-out `split == \"test\"` rows.", "",
          *partial_md(ens), to_markdown(table), ""]
    if not runs:
        md += ["No finished run found under `working/{03_train,05_curriculum}/" + exp + "/*/DONE`.", ""]
    if ens:
        md += ["## Blend weights (fitted on OOF)", "",
               to_markdown(pd.DataFrame({"run": ens["runs"], "weight": ens["weights"]})), "",
               "## DAKL (domain-adaptive kernel learning, tuned on OOF)", "",
               f"Chosen: γ = {ens['dakl']['gamma']:g}, r = {ens['dakl']['r']}, α = {ens['dakl']['alpha']:g}; "
               f"final output: **{ens['final']}**; labelled rows: {ens['n'].get('labelled', ens['n'].get('train'))}"
               f" ({_FIT.get(ens.get('dakl_fit', 'train'))}, centroids: {ens.get('dakl_kmeans', 'minibatch')}); "
               f"OOF / test rows: {ens['n']['oof']} / {ens['n']['test']}.", ""]
        grid_path = out / "dakl_grid.parquet"
        if grid_path.exists():
            grid = pd.read_parquet(grid_path).sort_values("oof_cosine", ascending=False).head(8)
            grid[["gamma", "alpha"]] = grid[["gamma", "alpha"]].map(lambda v: f"{v:g}")
            md += ["Best grid points:", "", to_markdown(grid.reset_index(drop=True)), ""]
    md += paper_tables_md(runs, ens)
    plots = {"learning curves (per run, from summary.csv)": plot_learning_curves(runs, out / "learning_curves.png")}
    cos_path = out / "test_cosines.parquet"
    if cos_path.exists():
        plots["per-image test cosines"] = plot_test_histogram(pd.read_parquet(cos_path), out / "test_cosine_hist.png")
    stage_md = list(md)
    for title, p in plots.items():
        if p is not None:
            stage_md += [f"## {title}", "", f"![{title}]({p.name})", ""]
            md += [f"## {title}", "", f"![{title}]({p.relative_to(paths.working_dir()).as_posix()})", ""]
    write_text(out / "report.md", "\n".join(stage_md))
    return write_text(paths.working_dir() / "report.md", "\n".join(md))


def headline(exp: str) -> str:
    """A few lines for the console: final test cosine against the constant mean and the best single run."""
    ens = read_json(paths.stage_dir(STAGE, exp, create=False) / "ensemble.json")
    sc = ens["scores"]
    return (f"final ({ens['final']}) test cosine {sc[ens['final']]['test']:.4f} | median {sc['median']['test']:.4f} "
            f"| weighted {sc['weighted']['test']:.4f} | DAKL {sc['dakl']['test']:.4f} | "
            f"constant mean {sc['constant_mean']['test']:.4f}")
