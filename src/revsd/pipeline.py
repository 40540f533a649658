"""Headless pipeline runner: the numbered jupytext notebooks executed in order through papermill.

    revsd pipeline --profile demo                # everything, on the embedded sample, CPU, offline
    revsd pipeline --profile demo --only 06_dakl_ensemble
    revsd pipeline --profile demo --from 03_train_effnet_lite2
    revsd pipeline --profile paper --set 03_train_clip_vit_h14.epochs=3

A profile (``src/revsd/profiles/<name>.yaml`` or a path to a YAML file) names the experiment and lists the
steps: which notebook, the name of its executed copy, and its parameters. Parameters are checked against the
stage's config dataclass before anything runs, so a typo fails fast. Executed notebooks are saved under
``working/notebooks/<exp>/<step>.ipynb``; ``status.csv`` beside them records every step as it finishes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from revsd import paths
from revsd.artifacts import append_csv_row

# notebook -> the config dataclass its parameters map onto
STAGE_CONFIGS = {
    "01_filter": "revsd.filtering:FilterConfig",
    "02_targets": "revsd.targets:TargetsConfig",
    "03_train": "revsd.train:TrainConfig",
    "04_difficulty": "revsd.difficulty:DifficultyConfig",
    "05_curriculum": "revsd.curriculum:CurriculumConfig",
    "06_dakl_ensemble": "revsd.blend:EnsembleConfig",
}
PROFILES_DIR = Path(__file__).parent / "profiles"


class NotebookFailed(RuntimeError):
    pass


class ProfileError(ValueError):
    pass


@dataclass
class Step:
    name: str  # executed copy's name, unique in the profile (e.g. 03_train_effnet_lite0)
    notebook: str  # notebooks/<notebook>.py
    params: dict = field(default_factory=dict)


@dataclass
class Profile:
    name: str
    exp: str
    steps: list[Step]
    description: str = ""


def config_class(notebook: str):
    if notebook not in STAGE_CONFIGS:
        raise ProfileError(f"unknown notebook {notebook!r}; known: {', '.join(STAGE_CONFIGS)}")
    module, cls = STAGE_CONFIGS[notebook].split(":")
    return getattr(importlib.import_module(module), cls)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str, exp: str | None = None, overrides: list[str] | None = None) -> Profile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ProfileError(f"profile {name_or_path!r} not found (looked for {path}); "
                           f"available: {', '.join(available_profiles())}")
    raw = yaml.safe_load(path.read_text()) or {}
    exp = exp or raw.get("exp") or path.stem
    steps = []
    for i, s in enumerate(raw.get("steps") or []):
        if "notebook" not in s:
            raise ProfileError(f"{path}: step {i + 1} has no 'notebook'")
        steps.append(Step(name=s.get("name", s["notebook"]), notebook=s["notebook"], params=dict(s.get("params") or {})))
    if not steps:
        raise ProfileError(f"{path}: no steps")
    names = [s.name for s in steps]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ProfileError(f"{path}: step names must be unique; repeated: {', '.join(sorted(dup))}")
    for ov in overrides or []:
        apply_override(steps, ov)
    for s in steps:
        s.params["exp"] = exp
        config_class(s.notebook).check_keys(s.params.keys())
    return Profile(name=path.stem, exp=exp, steps=steps, description=raw.get("description", ""))


def apply_override(steps: list[Step], override: str) -> None:
    """``STEP.key=value`` (one step) or ``key=value`` (every step whose config has that field)."""
    if "=" not in override:
        raise ProfileError(f"--set {override!r}: expected STEP.key=value or key=value")
    lhs, value = override.split("=", 1)
    value = yaml.safe_load(value)
    if "." in lhs:
        step_name, key = lhs.rsplit(".", 1)
        match = [s for s in steps if s.name == step_name]
        if not match:
            raise ProfileError(f"--set {override!r}: no step named {step_name!r}")
        match[0].params[key] = value
        return
    hit = False
    for s in steps:
        if lhs in config_class(s.notebook).field_names():
            s.params[lhs] = value
            hit = True
    if not hit:
        raise ProfileError(f"--set {override!r}: no step's config has a field {lhs!r}")


def select_steps(steps: list[Step], only: list[str] | None = None, start: str | None = None) -> list[Step]:
    names = [s.name for s in steps]

    def resolve(n: str) -> list[str]:
        hits = [x for x in names if x == n] or [x for x in names if x.startswith(n)]
        if not hits:
            raise ProfileError(f"no step matches {n!r}; steps: {', '.join(names)}")
        return hits

    if start:
        first = names.index(resolve(start)[0])
        steps = steps[first:]
    if only:
        wanted = {h for n in only for h in resolve(n)}
        steps = [s for s in steps if s.name in wanted]
    return steps


def execute_notebook(name: str, parameters: dict | None = None, output_dir: str | Path | None = None,
                     output_name: str | None = None, progress: bool = False) -> Path:
    """Run ``notebooks/<name>.py`` headless with papermill; returns the executed ``.ipynb`` path.

    Raises :class:`NotebookFailed` naming the notebook (and the saved executed copy) if a cell fails.
    """
    import jupytext
    import papermill as pm

    src = paths.notebooks_dir() / f"{name}.py"
    if not src.exists():
        raise FileNotFoundError(f"notebook {src} not found")
    out_dir = Path(output_dir) if output_dir else paths.working_dir() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    staged = out_dir / f".{output_name or name}.input.ipynb"
    jupytext.write(nb, staged, fmt="ipynb")
    out = out_dir / f"{output_name or name}.ipynb"
    try:
        pm.execute_notebook(str(staged), str(out), parameters=parameters or {}, kernel_name="python3",
                            progress_bar=progress, cwd=str(paths.repo_root()),
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no transport chatter
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(f"notebook {output_name or name} failed in cell {e.exec_count}: {e.ename}: "
                             f"{e.evalue}\n  executed copy with the traceback: {out}") from e
    finally:
        staged.unlink(missing_ok=True)
    return out


def run_profile(profile: Profile, only=None, start=None, progress: bool = True) -> list[dict]:
    steps = select_steps(profile.steps, only, start)
    out_dir = paths.working_dir() / "notebooks" / profile.exp
    status = out_dir / "status.csv"
    results = []
    t_all = time.time()
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name} ({step.notebook}.py) ...", flush=True)
        t0 = time.time()
        row = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), exp=profile.exp, step=step.name, status="ok",
                   seconds=0.0, notebook="")
        try:
            out = execute_notebook(step.notebook, step.params, out_dir, step.name, progress=progress)
            row["notebook"] = str(out)
        except Exception:
            row.update(status="failed", seconds=round(time.time() - t0, 1))
            append_csv_row(status, row)
            raise
        row["seconds"] = round(time.time() - t0, 1)
        append_csv_row(status, row)
        results.append(row)
        print(f"[{i}/{len(steps)}] {step.name} done in {row['seconds']:.1f}s -> {row['notebook']}", flush=True)
    print(f"pipeline {profile.name} (exp {profile.exp}): {len(steps)} notebook(s) in {time.time() - t_all:.0f}s")
    return results


def print_headline(exp: str) -> None:
    """Where the submission and the report are, and the report's headline numbers (once 06 has run)."""
    from revsd import report

    ensemble = paths.working_dir() / report.STAGE / exp / "ensemble.json"
    if not ensemble.exists():
        return
    print("\n== revsd: done ==")
    print(f"  submission: {paths.submissions_dir() / 'submission.csv'}")
    print(f"  report:     {paths.working_dir() / 'report.md'}")
    print(f"  {report.headline(exp)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="revsd pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo", help=f"profile name ({', '.join(available_profiles())}) or YAML path")
    ap.add_argument("--exp", help="experiment name (default: the profile's)")
    ap.add_argument("--only", help="comma-separated step names (or prefixes) to run")
    ap.add_argument("--from", dest="start", help="start at this step (name or prefix) and run the rest")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="[STEP.]KEY=VALUE",
                    help="override a parameter (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the profile's steps and exit")
    ap.add_argument("--no-progress", action="store_true", help="no per-cell progress bars")
    a = ap.parse_args(argv)
    try:
        profile = load_profile(a.profile, a.exp, a.overrides)
    except (ProfileError, ValueError) as e:
        print(f"revsd pipeline: {e}", file=sys.stderr)
        return 2
    if a.list:
        for s in profile.steps:
            print(f"{s.name:<32} {s.notebook}.py  {s.params}")
        return 0
    only = [x.strip() for x in a.only.split(",")] if a.only else None
    try:
        run_profile(profile, only, a.start, progress=not a.no_progress)
    except ProfileError as e:
        print(f"revsd pipeline: {e}", file=sys.stderr)
        return 2
    except NotebookFailed as e:
        print(f"revsd pipeline: {e}", file=sys.stderr)
        return 1
    print_headline(profile.exp)
    return 0
