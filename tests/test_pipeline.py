"""The papermill runner: profiles, step selection, overrides, failure reporting, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys

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


# ---------------------------------------------------------------- resolved, typed, checked configs

def _json_list(capsys, *argv) -> list[dict]:
    assert cli.main(["pipeline", *argv, "--list", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_list_json_is_the_full_resolved_config(capsys):
    rows = _json_list(capsys, "--profile", "smoke", "--set", "03_train_effnet_lite0.lr=3e-3",
                      "--set", "03_train_effnet_lite0.pretrained=no", "--set", "05_curriculum_equal.run=007")
    prof = pipeline.load_profile("smoke")
    assert [r["step"] for r in rows] == [s.name for s in prof.steps]
    for row, step in zip(rows, prof.steps):
        cls = pipeline.config_class(step.notebook)
        assert row["notebook"] == step.notebook and list(row["config"]) == cls.field_names()
        expected = {**dataclasses.asdict(cls()), **step.params}  # defaults, then the profile
        changed = {k: v for k, v in row["config"].items() if expected[k] != v}
        if step.name == "03_train_effnet_lite0":
            assert changed == {"lr": 0.003, "pretrained": False}  # then --set, typed (3e-3 is a float)
            assert type(row["config"]["lr"]) is float
        elif step.name == "05_curriculum_equal":
            assert changed == {"run": "007"}  # a str field keeps the text
        else:
            assert changed == {}
        assert row["config"]["exp"] == "smoke"


@pytest.mark.parametrize("override, message", [
    ("epochs=abc", "epochs must be an int (TrainConfig.epochs), got 'abc'"),
    ("03_train_effnet_lite0.epochs=2.5", "epochs must be an int"),
    ("val_size=7", "val_size=7.0 and test_size=0.2 must be fractions"),
    ("03_train_effnet_lite0.smoke=maybe", "smoke must be a bool"),
    ("03_train_effnet_lite0.mode=fast", "mode must be frozen or finetune"),
    ("05_curriculum_equal.stage_starts=0.5,0.2", "stage_starts must start at 0"),
    ("06_dakl_ensemble.dakl_rs=many", "dakl_rs='many': expected comma-separated numbers"),
    ("exp=x", "use --exp NAME"),
])
def test_bad_set_values_fail_before_anything_runs(override, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("REVSD_WORKING", str(tmp_path))  # an empty working dir: nothing may appear in it
    assert cli.main(["pipeline", "--profile", "smoke", "--set", override, "--list"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (paths.working_dir() / "notebooks" / "smoke").exists()


def test_profile_yaml_values_are_typed(tmp_path):
    prof = tmp_path / "p.yaml"  # YAML 1.1 reads 1e-4 and 5e1 as strings; the runner makes them floats / ints
    prof.write_text("exp: typed\nsteps:\n  - notebook: 01_filter\n    params: {val_size: 1e-1, limit: 5e1}\n"
                    "  - notebook: 03_train\n    params: {lr: 1e-4, tiny: 'yes', run: 12}\n")
    first, train_step = pipeline.load_profile(str(prof)).steps
    assert first.config["val_size"] == 0.1 and first.config["limit"] == 50 and type(first.config["limit"]) is int
    assert (train_step.config["lr"], train_step.config["tiny"], train_step.config["run"]) == (1e-4, True, "12")


@pytest.mark.parametrize("text, message", [
    ("steps: [\n  - notebook", "not valid YAML at line"),
    ("- notebook: 01_filter\n", "the top level must be a mapping"),
    ("exp: x\nsteps:\n  - notebook: 01_filter\n    params: [source, sample]\n", "'params' must be a mapping"),
    ("exp: x\nsteps: {notebook: 01_filter}\n", "'steps' must be a non-empty list"),
    ("exp: x\nsteps:\n  - 01_filter\n", "must be a mapping with a 'notebook' key"),
    ("exp: x\nstep:\n  - notebook: 01_filter\n", "unknown top-level key(s) ['step']"),
    ("exp: ../../etc\nsteps:\n  - notebook: 01_filter\n", "exp '../../etc' must be a plain name"),
    ("exp: x\nsteps:\n  - notebook: 01_filter\n    name: ../evil\n", "name '../evil' must be a plain name"),
    ("exp: x\nsteps:\n  - notebook: 01_filter\n    params: {exp: y}\n", "set 'exp' once at the top"),
    ("exp: x\nsteps:\n  - notebook: 01_filter\n    params: {val_size: [1]}\n", "val_size must be a float"),
])
def test_malformed_profiles_are_one_line_errors(tmp_path, capsys, text, message):
    prof = tmp_path / "bad.yaml"
    prof.write_text(text)
    assert cli.main(["pipeline", "--profile", str(prof), "--list"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("exp", ["../x", "a/b", "..", ".hidden", "x..y", "a b", "/tmp/x"])
def test_exp_must_be_a_plain_name(exp, capsys):
    assert cli.main(["pipeline", "--profile", "smoke", "--exp", exp, "--list"]) == 2
    assert "must be a plain name" in capsys.readouterr().err


def test_plain_exp_names_pass():
    assert pipeline.load_profile("smoke", exp="run-2.v1_b").exp == "run-2.v1_b"


# ---------------------------------------------------------------- the paper profiles (issue 11)

PAPER = dict(mode="finetune", lr=1e-4, backbone_lr_scale=1.0, llrd=1.0, lam=0.1, hidden=0, dropout=0.0,
             head_norm=False, vocab_size=1000, ema=0.0)
BACKBONES = ("clip_vit_h14", "vit_b16", "swin_l", "unet_enc")


def test_paper_profile_holds_every_table_row_with_the_papers_settings(capsys):
    rows = _json_list(capsys, "--profile", "paper")
    train = [r for r in rows if r["notebook"] in ("03_train", "04_difficulty", "05_curriculum")]
    for r in train:
        c = r["config"]
        assert {k: c[k] for k in PAPER} == PAPER, r["step"]
        assert c["batch_size"] * c["grad_accum"] == 64, r["step"]
    runs = {(r["notebook"], r["config"]["backbone"], r["config"]["vocab_head"], r["config"]["head_config"])
            for r in train}
    for b in BACKBONES:  # Table 1: vanilla, + vocabulary head (cfg 3), + vocabulary head + curriculum
        assert any(n == "03_train" and bb == b and not vh for n, bb, vh, _ in runs), b
        for notebook in ("03_train", "04_difficulty", "05_curriculum"):
            assert (notebook, b, True, "emb2cls") in runs, (notebook, b)
    for head in ("parallel", "concat", "emb2cls"):  # Table 2 on Swin-L (plus its vanilla baseline above)
        assert ("03_train", "swin_l", True, head) in runs
    assert {r["config"]["sample_cosines"] for r in rows if r["notebook"] == "04_difficulty"} == {"eval"}
    unet = [r["config"] for r in train if r["config"]["backbone"] == "unet_enc"]
    assert {(c["batch_size"], c["grad_accum"]) for c in unet} == {(16, 4)}
    (dakl,) = [r["config"] for r in rows if r["notebook"] == "06_dakl_ensemble"]
    grid = {k: [float(v) for v in str(dakl[k]).split(",")] for k in ("dakl_gammas", "dakl_rs", "dakl_alphas")}
    assert 0.01 in grid["dakl_gammas"] and 10000 in grid["dakl_rs"] and 10 in grid["dakl_alphas"]


def test_paper_tuned_is_labelled_ours_and_differs_from_paper():
    tuned, paper = pipeline.load_profile("paper_tuned"), pipeline.load_profile("paper")
    assert tuned.description.startswith("OURS") and tuned.exp != paper.exp
    step = {s.name: s.config for s in tuned.steps}["03_train_vit_b16_vocab"]
    assert step["ema"] > 0 and step["hidden"] > 0 and step["llrd"] < 1 and step["lam"] == 0.1


# ---------------------------------------------------------------- launcher and export

def _finetune_smoke(**extra) -> pipeline.Step:
    sets = [f"03_train_effnet_lite0.{k}={v}" for k, v in {"mode": "finetune", **extra}.items()]
    return {s.name: s for s in pipeline.load_profile("smoke", overrides=sets).steps}["03_train_effnet_lite0"]


def test_launch_command_carries_the_resolved_config():
    step = _finetune_smoke(lr=3e-4, smoke=True)
    cmd = pipeline.launch_command(step, 4)
    i = cmd.index("-m", 2)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd[:i]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[i:i + 3] == ["-m", "revsd.pipeline", "03_train"]
    cls = pipeline.config_class("03_train")
    parsed = {k: pipeline.typed(cls, k, v) for k, v in (a.split("=", 1) for a in cmd[i + 3:])}
    assert parsed == step.config  # every field, typed back to the same values
    assert "--multi_gpu" not in pipeline.launch_command(step, 1)
    frozen = {s.name: s for s in pipeline.load_profile("smoke").steps}
    assert pipeline.launches(step, "accelerate") and not pipeline.launches(step, "none")
    assert not pipeline.launches(frozen["03_train_effnet_lite0"], "accelerate")  # frozen: the notebook alone
    assert not pipeline.launches(frozen["06_dakl_ensemble"], "accelerate")


def test_stage_entry_point_rejects_bad_arguments(capsys):
    assert pipeline.stage_main([]) == 2
    assert pipeline.stage_main(["06_dakl_ensemble"]) == 2
    assert pipeline.stage_main(["03_train", "epochs=abc"]) == 2
    assert pipeline.stage_main(["03_train", "epochs"]) == 2
    assert "expected key=value" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launcher_trains_then_the_notebook_reuses_the_run(prepared_exp, monkeypatch, capfd):
    """Two CPU processes (gloo) train the 03 step; the notebook then finds the finished run and does not retrain."""
    pytest.importorskip("accelerate")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    params = dict(exp=prepared_exp, backbone="vit_b16", mode="finetune", tiny=True, pretrained=False, epochs=1,
                  batch_size=16, hidden=16, dropout=0.0, num_workers=1, device="cpu", smoke=True, run="launched")
    step = Step("03_train_launched", "03_train", params)
    step.config = pipeline.resolve(step)
    prof = Profile("t", prepared_exp, [step])
    pipeline.run_profile(prof, progress=False, launcher="accelerate", num_processes=2)
    out = capfd.readouterr().out
    run_dir = paths.working_dir() / "03_train" / prepared_exp / "launched"
    assert (run_dir / "DONE").exists() and "accelerate launch (2 process(es))" in out
    executed = (paths.working_dir() / "notebooks" / prepared_exp / "03_train_launched.ipynb").read_text()
    assert "is finished (DONE): reusing it" in executed


def test_export_ipynb_injects_each_steps_resolved_config(tmp_path, capsys):
    import nbformat

    out = tmp_path / "kaggle"
    assert cli.main(["pipeline", "--profile", "smoke", "--set", "epochs=3", "--export-ipynb", str(out)]) == 0
    prof = pipeline.load_profile("smoke", overrides=["epochs=3"])
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s.name}.ipynb" for s in prof.steps)
    for step in prof.steps:
        nb = nbformat.read(out / f"{step.name}.ipynb", as_version=4)
        nbformat.validate(nb)
        tags = [c.metadata.get("tags", []) for c in nb.cells]
        i = next(k for k, t in enumerate(tags) if "injected-parameters" in t)
        assert "parameters" in tags[i - 1]  # right after the notebook's own parameters cell
        ns: dict = {}
        exec(nb.cells[i].source, ns)  # what the uploaded notebook runs before building its config
        cls = pipeline.config_class(step.notebook)
        assert cls.from_namespace(ns).to_dict() == step.config
        assert nb.metadata["kernelspec"]["name"] == "python3"
    only = tmp_path / "one"
    assert cli.main(["pipeline", "--profile", "smoke", "--only", "06", "--export-ipynb", str(only)]) == 0
    assert [p.name for p in only.iterdir()] == ["06_dakl_ensemble.ipynb"]
