import numpy as np
import pandas as pd
import pytest

from revsd import blend, paths, report
from revsd.artifacts import read_json
from test_blend import clone_exp, fake_run


def _table_rows(md: str) -> dict[str, list[str]]:
    """First markdown table of a report: model label -> remaining cells."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| "))
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("| "):  # the table ends
            break
        cells = [c.strip() for c in ln.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def _section(md: str, title: str) -> str:
    return md.split(title, 1)[1].split("\n#", 1)[0]


def _rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in md.splitlines() if ln.startswith("| ")][1:]


@pytest.fixture(scope="module")
def exp(prepared_exp):
    e = clone_exp(prepared_exp, "report_t")
    fake_run(e, "l0_plain", "effnet_lite0", "plain", 1.5, seed=1)
    fake_run(e, "l0_vocab", "effnet_lite0", "vocab", 0.8, seed=2)
    fake_run(e, "l0_cfg3", "effnet_lite0", "cfg3", 1.0, seed=3, epochs=4)
    fake_run(e, "l2_vocab", "effnet_lite2", "vocab", 0.9, seed=4)
    return e


def test_report_renders_only_the_rows_present(exp):
    path = report.build_report(exp)  # before 06 ran: run rows + the constant baseline from metrics.json
    assert path == paths.working_dir() / "report.md"
    rows = _table_rows(path.read_text())
    assert list(rows) == ["effnet_lite0 plain (embedding head only)", "effnet_lite0 + vocabulary head (cfg 1, parallel)",
                          "effnet_lite0 + vocabulary head, cfg 3 (classes read from the embedding)",
                          "effnet_lite2 + vocabulary head (cfg 1, parallel)", "constant mean embedding (train targets)"]
    m = read_json(paths.stage_dir("03_train", exp, "l0_cfg3") / "metrics.json")
    cfg3 = rows["effnet_lite0 + vocabulary head, cfg 3 (classes read from the embedding)"]
    assert cfg3[:3] == ["03_train/l0_cfg3", f"{m['val_cosine']:.4f}", f"{m['test_cosine']:.4f}"]
    assert float(cfg3[3]) == pytest.approx(m["test_cosine"] - m["const_mean_test"], abs=1e-4)
    assert not any("cfg 2" in k or "curriculum" in k or "median" in k for k in rows)
    png = paths.stage_dir("06_dakl_ensemble", exp) / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_after_the_ensemble(exp):
    res = blend.run(blend.EnsembleConfig(exp=exp, smoke=True, dakl_rs="32", dakl_fit="train"))
    out = paths.stage_dir("06_dakl_ensemble", exp)
    stage_md = (out / "report.md").read_text()
    rows = _table_rows(stage_md)
    sc = res["scores"]
    dakl_row = next(k for k in rows if "DAKL" in k)
    assert f"γ={res['dakl']['gamma']:g}" in dakl_row and "r=32" in dakl_row
    assert rows[dakl_row][2] == f"{sc['dakl']['test']:.4f}"
    weighted = next(k for k in rows if "weighted mean" in k)
    assert rows[weighted][1:3] == [f"{sc['weighted']['oof']:.4f}", f"{sc['weighted']['test']:.4f}"]
    assert ("← final" in weighted) == (res["final"] == "weighted")
    assert rows["constant mean embedding (train targets)"][2] == f"{sc['constant_mean']['test']:.4f}"
    assert "![per-image test cosines](test_cosine_hist.png)" in stage_md  # relative to the stage folder
    top = (paths.working_dir() / "report.md").read_text()
    assert f"](06_dakl_ensemble/{exp}/test_cosine_hist.png)" in top
    for name in ("test_cosine_hist.png", "learning_curves.png"):
        assert (out / name).stat().st_size > 1000
    cos = pd.read_parquet(out / "test_cosines.parquet")
    assert cos[res["final"]].mean() == pytest.approx(sc[res["final"]]["test"], abs=1e-6)
    assert "final (" in report.headline(exp)


def test_markdown_table_formatting():
    df = pd.DataFrame({"model": ["a|b"], "test cosine": [0.61234], "Δ test vs constant": [0.01], "x": [np.nan]})
    md = report.to_markdown(df)
    assert md.splitlines()[2] == "| a\\|b | 0.6123 | +0.0100 | – |"


@pytest.fixture(scope="module")
def paper_exp(prepared_exp):
    """Runs named like the paper's: Swin-L vanilla / cfg 1 / cfg 3 / + curriculum, ViT-B/16 + vocabulary head."""
    e = clone_exp(prepared_exp, "report_paper")
    fake_run(e, "swin_plain", "swin_l", "plain", 1.4, seed=1)
    fake_run(e, "swin_vocab", "swin_l", "vocab", 1.0, seed=2)
    fake_run(e, "swin_cfg3", "swin_l", "cfg3", 0.9, seed=3, head_config="emb2cls")
    fake_run(e, "swin_curr", "swin_l", "curriculum_equal", 1.1, seed=4, stage="05_curriculum")
    fake_run(e, "vitb_vocab", "vit_b16", "vocab", 1.2, seed=5)
    blend.run(blend.EnsembleConfig(exp=e, smoke=True, dakl_rs="8"))
    return e


def test_paper_tables_in_the_papers_layout(paper_exp):
    from revsd import paper_numbers

    md = (paths.working_dir() / "report.md").read_text()
    t1 = _rows(_section(md, "### Table 1"))
    assert [r[:2] for r in t1[:3]] == [["CLIP ViT-H/14", "vanilla (λ = 0)"], ["CLIP ViT-H/14", "+ vocabulary head"],
                                       ["CLIP ViT-H/14", "+ vocabulary head + curriculum"]]
    assert len(t1) == 4 * 3 + 2 and all(r[2] == "n/a" for r in t1)  # every paper cell not transcribed: n/a
    assert t1[0][3:] == ["", "", ""]  # CLIP was not run: ours blank
    swin = {r[1]: r for r in t1 if r[0] == "Swin-L"}
    runs = {r.name: r for r in blend.discover_runs(paper_exp)}
    best_vocab = max((runs["swin_vocab"], runs["swin_cfg3"]), key=lambda r: r.val_cosine)
    assert swin["+ vocabulary head"][5] == f"03_train/{best_vocab.name}"
    assert swin["vanilla (λ = 0)"][3] == f"{runs['swin_plain'].metrics['test_cosine']:.4f}"
    assert swin["+ vocabulary head + curriculum"][5] == "05_curriculum/swin_curr"
    ens = read_json(paths.stage_dir("06_dakl_ensemble", paper_exp) / "ensemble.json")
    assert t1[-1][:4] == ["all backbones", "joint + DAKL", "n/a", f"{ens['scores']['dakl']['test']:.4f}"]
    t2 = {r[1]: r for r in _rows(_section(md, "### Table 2"))}
    assert t2["baseline (no vocabulary head)"][5] == "03_train/swin_plain"
    assert t2["configuration 1 (parallel)"][5] == "03_train/swin_vocab"
    assert t2["configuration 2 (concat)"][3:] == ["", "", ""]  # not run
    assert t2["configuration 3 (emb2cls)"][5] == "03_train/swin_cfg3"
    assert "No `tally.csv`" in _section(md, "### Table 3")
    assert paper_numbers.cell(None) == "n/a" and paper_numbers.cell(0.61234) == "0.6123"


def test_table3_reads_the_study_tally(paper_exp):
    from revsd import artifacts, study

    votes = pd.DataFrame({"annotator": ["ann1", "ann1", "ann2", "ann2"], "pair_id": ["p1", "p2", "p1", "p2"],
                          "answer": ["ours", "original", "ours", "undecided"]})
    artifacts.save_csv(paths.working_dir() / "gen_t" / "tally.csv", study.tally(votes), index=True)  # as tally writes
    report.build_report(paper_exp)
    t3 = {r[0]: r for r in _rows(_section((paths.working_dir() / "report.md").read_text(), "### Table 3"))}
    assert list(t3) == ["ann1", "ann2", "all agree", "average"]
    assert t3["ann1"][1:] == ["n/a", "1", "n/a", "1", "n/a", "0"]  # paper / ours per answer
    assert t3["all agree"][2] == "1" and t3["average"][2] == "1"
