"""A profile's steps: loading a profile YAML, typing every value against the stage's config dataclass and checking
the resolved configuration, before anything runs (used by ``revsd.pipeline``; light: no torch until a stage's
config class is imported).

A profile (``src/revsd/profiles/<name>.yaml`` or a path) is a mapping: ``exp`` (a plain name), ``description`` and
``steps``, a list of ``{notebook, name, params}``. A step's configuration resolves as: the dataclass defaults,
then the profile's params, then ``--set`` overrides, each value typed against its field (``1e-4`` is a float even
where YAML 1.1 reads a string) and checked by the stage.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from revsd.config import typed

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
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")  # a file name that stays in its folder


class ProfileError(ValueError):
    pass


@dataclass
class Step:
    name: str  # executed copy's name, unique in the profile (e.g. 03_train_effnet_lite0)
    notebook: str  # notebooks/<notebook>.py
    params: dict = field(default_factory=dict)  # the profile's values (typed) and --set overrides
    config: dict | None = None  # the full resolved configuration (set by load_profile): what the notebook gets


@dataclass
class Profile:
    name: str
    exp: str
    steps: list[Step]
    description: str = ""


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def config_class(notebook: str):
    if notebook not in STAGE_CONFIGS:
        raise ProfileError(f"unknown notebook {notebook!r}; known: {', '.join(STAGE_CONFIGS)}")
    return _load(STAGE_CONFIGS[notebook])


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def plain_name(value, what: str) -> str:
    """``value`` if it is a plain file name (letters, digits, ``-``, ``_``, ``.``; never ``..``), else raise."""
    if not isinstance(value, str) or not PLAIN_NAME.match(value) or ".." in value:
        raise ProfileError(f"{what} {value!r} must be a plain name (letters, digits, '-', '_', '.', no '..'): "
                           "it names a folder under working/")
    return value


def check_config(notebook: str, cfg) -> None:
    """The stage's own ``check(cfg)`` (every stage module has one). Raises ConfigError/ValueError."""
    importlib.import_module(STAGE_CONFIGS[notebook].split(":")[0]).check(cfg)


def resolve(step: Step) -> dict:
    """The step's full configuration: dataclass defaults, then its (typed) params; checked by the stage."""
    cls = config_class(step.notebook)
    try:
        cls.check_keys(step.params)
        cfg = cls(**{k: typed(cls, k, v) for k, v in step.params.items()})
        with contextlib.redirect_stdout(sys.stderr):  # a check's notes never mix into --list --json
            check_config(step.notebook, cfg)
    except ValueError as e:
        raise ProfileError(f"step {step.name}: {e}") from e
    return cfg.to_dict()


# --- profiles -------------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ProfileError(f"{path}: not valid YAML{line} ({getattr(e, 'problem', None) or e}); fix the file") from e
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: the top level must be a mapping with 'exp', 'description' and 'steps', "
                           f"got {type(raw).__name__}")
    unknown = [k for k in raw if k not in ("exp", "description", "steps") and not str(k).startswith("x-")]
    if unknown:
        raise ProfileError(f"{path}: unknown top-level key(s) {unknown}: a profile has exp, description, steps "
                           "(and x-... keys for YAML anchors)")
    if not isinstance(raw.get("steps"), list) or not raw["steps"]:
        raise ProfileError(f"{path}: 'steps' must be a non-empty list of {{notebook, name, params}}")
    return raw


def _step(path: Path, i: int, s) -> Step:
    if not isinstance(s, dict) or "notebook" not in s:
        raise ProfileError(f"{path}: step {i + 1} must be a mapping with a 'notebook' key, got {s!r}")
    name = plain_name(s.get("name", s["notebook"]), f"{path}: step {i + 1}: name")
    params = s.get("params") or {}
    if not isinstance(params, dict):
        raise ProfileError(f"{path}: step {name}: 'params' must be a mapping of key: value, "
                           f"got {type(params).__name__}")
    if "exp" in params:
        raise ProfileError(f"{path}: step {name}: set 'exp' once at the top of the profile, not in a step")
    cls = config_class(s["notebook"])
    try:
        cls.check_keys(params)
        params = {k: typed(cls, k, v) for k, v in params.items()}
    except ValueError as e:
        raise ProfileError(f"{path}: step {name}: {e}") from e
    return Step(name=name, notebook=s["notebook"], params=params)


def load_profile(name_or_path: str, exp: str | None = None, overrides: list[str] | None = None) -> Profile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(f"profile {name_or_path!r} not found (looked for {path}); "
                           f"available: {', '.join(available_profiles())}")
    raw = _read_yaml(path)
    exp = plain_name(exp or raw.get("exp") or path.stem, "--exp" if exp else f"{path}: exp")
    steps = [_step(path, i, s) for i, s in enumerate(raw["steps"])]
    names = [s.name for s in steps]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ProfileError(f"{path}: step names must be unique; repeated: {', '.join(sorted(dup))}")
    for ov in overrides or []:
        apply_override(steps, ov)
    for s in steps:
        s.params["exp"] = exp
        s.config = resolve(s)
    return Profile(name=path.stem, exp=exp, steps=steps, description=str(raw.get("description", "")))


def apply_override(steps: list[Step], override: str) -> None:
    """``STEP.key=value`` (one step) or ``key=value`` (every step whose config has that field); the value is
    typed against the field (``1e-3`` is a float, ``abc`` for an int field raises)."""
    if "=" not in override:
        raise ProfileError(f"--set {override!r}: expected STEP.key=value or key=value")
    lhs, value = override.split("=", 1)
    step_name, _, key = lhs.rpartition(".")
    if key == "exp":
        raise ProfileError(f"--set {override!r}: use --exp NAME to change the experiment")
    if step_name:
        targets = [s for s in steps if s.name == step_name]
        if not targets:
            raise ProfileError(f"--set {override!r}: no step named {step_name!r}; "
                               f"steps: {', '.join(s.name for s in steps)}")
    else:
        targets = [s for s in steps if key in config_class(s.notebook).field_names()]
        if not targets:
            raise ProfileError(f"--set {override!r}: no step's config has a field {key!r}")
    for s in targets:
        try:
            s.params[key] = typed(config_class(s.notebook), key, value)
        except ValueError as e:
            raise ProfileError(f"--set {override!r}: {e}") from e


def select_steps(steps: list[Step], only: list[str] | None = None, start: str | None = None) -> list[Step]:
    names = [s.name for s in steps]

    def resolve_name(n: str) -> list[str]:
        hits = [x for x in names if x == n] or [x for x in names if x.startswith(n)]
        if not hits:
            raise ProfileError(f"no step matches {n!r}; steps: {', '.join(names)}")
        return hits

    if start:
        steps = steps[names.index(resolve_name(start)[0]):]
    if only:
        wanted = {h for n in only for h in resolve_name(n)}
        steps = [s for s in steps if s.name in wanted]
    return steps
