"""The papermill runner: profiles, step selection, overrides, failure reporting, the CLI."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from revsd import cli, paths, pipeline
from revsd.pipeline import NotebookFailed, Profile, ProfileError, Step

GOOD = '''# %% [markdown]
# # test notebook

# %% tags=["parameters"]
exp = "x"
value = 1

# %%
from pathlib import Path
Path(out).write_text(f"{exp}:{value * 2}")
'''
BAD = GOOD.replace('Path(out).write_text(f"{exp}:{value * 2}")', 'raise ValueError("boom in cell")')


@pytest.fixture()
def fake_notebooks(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "good.py").write_text(GOOD.replace("value = 1", "value = 1\nout = ''"))
    (nbdir / "bad.py").write_text(BAD.replace("value = 1", "value = 1\nout = ''"))
    monkeypatch.setattr(paths, "notebooks_dir", lambda: nbdir)
    return tmp_path


@pytest.mark.slow
def test_run_profile_executes_in_order_and_records_status(fake_notebooks):
    out = fake_notebooks / "result.txt"
    prof = Profile("t", "e1", [Step("first", "good", {"exp": "e1", "value": 21, "out": str(out)})])
    pipeline.run_profile(prof, progress=False)
    assert out.read_text() == "e1:42"  # papermill injected the parameters
    executed = paths.working_dir() / "notebooks" / "e1" / "first.ipynb"
    assert executed.exists()
    rows = list(csv.DictReader(open(paths.working_dir() / "notebooks" / "e1" / "status.csv")))
    assert [(r["step"], r["status"]) for r in rows] == [("first", "ok")]


@pytest.mark.slow
def test_failing_cell_names_the_notebook(fake_notebooks):
    prof = Profile("t", "e2", [Step("broken_step", "bad", {"exp": "e2"}),
                               Step("never", "good", {"exp": "e2", "out": str(fake_notebooks / "n.txt")})])
    with pytest.raises(NotebookFailed, match=r"broken_step failed.*ValueError: boom in cell"):
        pipeline.run_profile(prof, progress=False)
    assert not (fake_notebooks / "n.txt").exists()  # later steps do not run
    rows = list(csv.DictReader(open(paths.working_dir() / "notebooks" / "e2" / "status.csv")))
    assert rows[-1]["status"] == "failed"


def test_select_steps_only_and_from():
    steps = [Step(n, "01_filter") for n in ["01_filter", "03_train_a", "03_train_b", "06_dakl_ensemble"]]
    names = lambda ss: [s.name for s in ss]  # noqa: E731
    assert names(pipeline.select_steps(steps, only=["03_train"])) == ["03_train_a", "03_train_b"]
    assert names(pipeline.select_steps(steps, start="03_train_b")) == ["03_train_b", "06_dakl_ensemble"]
    with pytest.raises(ProfileError, match="no step matches"):
        pipeline.select_steps(steps, only=["07_nothing"])


@pytest.mark.parametrize("profile", pipeline.available_profiles())
def test_shipped_profiles_validate_against_stage_configs(profile):
    prof = pipeline.load_profile(profile)
    assert prof.steps and all(s.params["exp"] == prof.exp for s in prof.steps)
    assert [s.notebook for s in prof.steps][:2] == ["01_filter", "02_targets"]
    assert all((paths.notebooks_dir() / f"{s.notebook}.py").exists() for s in prof.steps)


def test_profile_typos_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("exp: x\nsteps:\n  - notebook: 01_filter\n    params: {n_fold: 3}\n")
    with pytest.raises(ValueError, match="n_fold.*did you mean 'n_folds'"):
        pipeline.load_profile(str(bad))
    ok = pipeline.load_profile("demo", exp="other", overrides=["01_filter.seed=7", "seed=3"])
    assert ok.exp == "other"
    first = ok.steps[0]
    assert first.params["seed"] == 3 and first.params["exp"] == "other"
    with pytest.raises(ProfileError, match="no step's config has a field"):
        pipeline.load_profile("demo", overrides=["nonsense=1"])


def test_cli_dispatch_and_errors(capsys):
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main(["pipeline", "--profile", "demo", "--list"]) == 0
    assert "03_train_effnet_lite0" in capsys.readouterr().out
    assert cli.main(["pipeline", "--profile", "no-such-profile"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_profile_runs_the_whole_pipeline(capsys):
    """The main job's shape end to end: every stage through papermill on 60 sample images, then the headline."""
    from revsd.submission import read_submission

    assert cli.main(["pipeline", "--profile", "smoke", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "== revsd: done ==" in out and "constant mean" in out
    ids, emb = read_submission(paths.submissions_dir() / "submission.csv")
    test_ids = pd.read_parquet(paths.filtered_table("smoke")).query("split == 'test'")["image_id"]
    assert sorted(ids) == sorted(test_ids.astype(str)) and emb.shape == (len(test_ids), 384)
    report = (paths.working_dir() / "report.md").read_text()
    assert "effnet_lite0" in report and "curriculum" in report and "DAKL" in report
    rows = list(csv.DictReader(open(paths.working_dir() / "notebooks" / "smoke" / "status.csv")))
    assert [r["status"] for r in rows] == ["ok"] * 6
