import numpy as np
import pandas as pd
import pytest

from revsd import blend, paths, report
from revsd.artifacts import read_json
from test_blend import clone_exp, fake_run


def _table_rows(md: str) -> dict[str, list[str]]:
    """First markdown table of a report: model label -> remaining cells."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split(" | ")]
        if cells[0] in ("run", "gamma"):  # the next table starts
            break
        rows[cells[0]] = cells[1:]
    return rows


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
    res = blend.run(blend.EnsembleConfig(exp=exp, smoke=True, dakl_rs="32"))
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
