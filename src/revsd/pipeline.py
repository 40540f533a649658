"""Headless pipeline runner: the numbered jupytext notebooks executed in order through papermill.

    revsd pipeline --profile demo                # everything, on the embedded sample, CPU, offline
    revsd pipeline --profile demo --only 06_dakl_ensemble
    revsd pipeline --profile demo --from 03_train_effnet_lite2
    revsd pipeline --profile paper --set 03_train_clip_vit_h14_vocab.epochs=3
    revsd pipeline --profile paper --list --json        # every step's full resolved configuration
    revsd pipeline --profile paper --launcher accelerate --num-processes 8   # 03/04/05 under accelerate launch
    revsd pipeline --profile paper --export-ipynb out/  # one .ipynb per step, parameters injected (Kaggle/Colab)

A profile (``src/revsd/profiles/<name>.yaml`` or a path to a YAML file) names the experiment and lists the
steps: which notebook, the name of its executed copy, and its parameters. Every value is typed and checked
against the stage's config dataclass (defaults, then the profile, then ``--set``) before anything runs, so a typo
or a bad value fails fast; the notebook then receives the full resolved configuration. Executed notebooks are
saved under ``working/notebooks/<exp>/<step>.ipynb``; ``status.csv`` beside them records every step.

``--launcher accelerate`` first trains each finetune step of 03/04/05 with ``accelerate launch -m revsd.pipeline
<notebook> key=value ...`` (this module's stage entry point), then runs the notebook, which finds the finished
run (DONE) and only records and shows its results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from revsd import paths
from revsd.artifacts import append_csv_row, write_text
from revsd.steps import (STAGE_CONFIGS, Profile, ProfileError, Step, apply_override, available_profiles,  # noqa: F401
                         config_class, load_profile, resolve, select_steps, typed)

# training notebooks a launcher can start outside the notebook: notebook -> the stage's run(cfg)
LAUNCHABLE = {"03_train": "revsd.train:run", "04_difficulty": "revsd.difficulty:run",
              "05_curriculum": "revsd.curriculum:run"}


class NotebookFailed(RuntimeError):
    pass


# --- notebooks ------------------------------------------------------------------------------------------------

def read_notebook(name: str):
    """``notebooks/<name>.py`` as a notebook (jupytext), with a python3 kernelspec."""
    import jupytext

    src = paths.notebooks_dir() / f"{name}.py"
    if not src.exists():
        raise FileNotFoundError(f"notebook {src} not found")
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


class _FullConfigFilter(logging.Filter):
    """The runner passes every field of the resolved config, most of them not in the notebook's parameters cell
    (by design: the cell holds a few flat literals): papermill's "Passed unknown parameter" line is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


_QUIET = _FullConfigFilter()


def execute_notebook(name: str, parameters: dict | None = None, output_dir: str | Path | None = None,
                     output_name: str | None = None, progress: bool = False) -> Path:
    """Run ``notebooks/<name>.py`` headless with papermill; returns the executed ``.ipynb`` path.

    Raises :class:`NotebookFailed` naming the notebook (and the saved executed copy) if a cell fails.
    """
    import jupytext
    import papermill as pm

    logging.getLogger("papermill").addFilter(_QUIET)  # idempotent
    nb = read_notebook(name)
    out_dir = Path(output_dir) if output_dir else paths.working_dir() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
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


def export_notebooks(profile: Profile, out_dir: str | Path, steps: list[Step] | None = None) -> list[Path]:
    """Each step as ``<out_dir>/<step>.ipynb`` with its resolved configuration injected after the parameters
    cell (as papermill does), ready to upload and run on Kaggle/Colab."""
    import nbformat
    from papermill.parameterize import parameterize_notebook

    written = []
    for step in steps or profile.steps:
        nb = read_notebook(step.notebook)
        nb.metadata["papermill"] = {}
        for cell in nb.cells:  # papermill looks the parameters cell up by tag
            cell.metadata.setdefault("tags", [])
        nb = parameterize_notebook(nb, step.config or step.params, comment=f"Parameters of step {step.name} "
                                   f"(profile {profile.name})", kernel_name="python3", language="python")
        written.append(write_text(Path(out_dir) / f"{step.name}.ipynb", nbformat.writes(nb)))
    return written


# --- launchers ------------------------------------------------------------------------------------------------

def _arg(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value) if isinstance(value, float) \
        else str(value)


def launch_command(step: Step, num_processes: int) -> list[str]:
    """``accelerate launch`` of the step's stage with its full resolved configuration as key=value arguments."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        cmd.append("--multi_gpu")  # GPUs, or CPU processes over gloo when there is no GPU
    config = step.config or step.params
    return [*cmd, "-m", "revsd.pipeline", step.notebook, *[f"{k}={_arg(v)}" for k, v in config.items()]]


def launches(step: Step, launcher: str) -> bool:
    return launcher == "accelerate" and step.notebook in LAUNCHABLE and (step.config or {}).get("mode") == "finetune"


def _run_fn(notebook: str):
    module, name = LAUNCHABLE[notebook].split(":")
    return getattr(importlib.import_module(module), name)


def launch_step(step: Step, num_processes: int) -> None:
    cmd = launch_command(step, num_processes)
    print(f"  accelerate launch ({num_processes} process(es)): {' '.join(cmd[2:])}", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:
        raise NotebookFailed(f"step {step.name}: `accelerate launch` exited with {rc} (its output is above); "
                             "the notebook was not run")


def stage_main(argv: list[str]) -> int:
    """``python -m revsd.pipeline NOTEBOOK key=value ...``: run one training stage outside its notebook (what
    ``--launcher accelerate`` starts on every process); values are typed like ``--set``."""
    if not argv or argv[0] not in LAUNCHABLE:
        print(f"usage: python -m revsd.pipeline {{{','.join(LAUNCHABLE)}}} key=value ...", file=sys.stderr)
        return 2
    step = Step(argv[0], argv[0])
    try:
        for pair in argv[1:]:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ProfileError(f"expected key=value, got {pair!r}")
            step.params[key] = typed(config_class(step.notebook), key, value)
        cfg = config_class(step.notebook)(**resolve(step))
    except ValueError as e:
        print(f"revsd.pipeline {step.notebook}: {e}", file=sys.stderr)
        return 2
    run_dir = _run_fn(step.notebook)(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"{step.notebook}: {run_dir}")
    return 0


# --- running --------------------------------------------------------------------------------------------------

def run_profile(profile: Profile, only=None, start=None, progress: bool = True, launcher: str = "none",
                num_processes: int = 1) -> list[dict]:
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
            if launches(step, launcher):
                launch_step(step, num_processes)
            out = execute_notebook(step.notebook, step.config or step.params, out_dir, step.name, progress=progress)
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
    ap.add_argument("--exp", help="experiment name (default: the profile's); a plain name")
    ap.add_argument("--only", help="comma-separated step names (or prefixes) to run")
    ap.add_argument("--from", dest="start", help="start at this step (name or prefix) and run the rest")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="[STEP.]KEY=VALUE",
                    help="override a parameter (repeatable); typed and checked before anything runs")
    ap.add_argument("--list", action="store_true", help="list the steps and exit (with --json: full configs)")
    ap.add_argument("--json", action="store_true", help="with --list: a JSON array of {step, notebook, config}")
    ap.add_argument("--export-ipynb", metavar="DIR", help="write each (selected) step as DIR/<step>.ipynb with its "
                    "parameters injected, for Kaggle/Colab, and exit")
    ap.add_argument("--launcher", choices=("none", "accelerate"), default="none",
                    help="accelerate: train each finetune step of 03/04/05 under `accelerate launch` first")
    ap.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) for --launcher accelerate")
    ap.add_argument("--no-progress", action="store_true", help="no per-cell progress bars")
    a = ap.parse_args(argv)
    only = [x.strip() for x in a.only.split(",")] if a.only else None
    try:
        if a.num_processes < 1:
            raise ProfileError(f"--num-processes {a.num_processes}: need at least 1")
        profile = load_profile(a.profile, a.exp, a.overrides)
        steps = select_steps(profile.steps, only, a.start)
    except ValueError as e:  # ProfileError, ConfigError
        print(f"revsd pipeline: {e}", file=sys.stderr)
        return 2
    if a.list:
        if a.json:
            print(json.dumps([{"step": s.name, "notebook": s.notebook, "config": s.config} for s in steps], indent=1))
        for s in [] if a.json else steps:
            print(f"{s.name:<32} {s.notebook}.py  {s.params}")
        return 0
    if a.export_ipynb:
        for p in export_notebooks(profile, a.export_ipynb, steps):
            print(p)
        return 0
    try:
        run_profile(profile, only, a.start, progress=not a.no_progress, launcher=a.launcher,
                    num_processes=a.num_processes)
    except NotebookFailed as e:
        print(f"revsd pipeline: {e}", file=sys.stderr)
        return 1
    print_headline(profile.exp)
    return 0


if __name__ == "__main__":  # the stage entry point started by --launcher accelerate
    from revsd import distributed

    distributed.exit_process(stage_main(sys.argv[1:]))
