"""The package's layering (docs/architecture.md), checked on the source: every ``revsd`` import of every module,
lazy ones inside functions included, must go down or sideways as the layer table allows; no import cycles; no
module over 400 lines; every module classified."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "revsd"
MAX_LINES = 400

LAYERS = {
    "foundations": {"__init__", "paths", "config", "artifacts", "images", "metrics", "device", "variants", "runs"},
    "services": {"textenc", "weights"},
    "data": {"data", "filtering", "targets", "vocab"},
    "models": {"backbones", "unet_encoder", "captions", "sd_parts", "heads", "losses", "transforms", "features",
               "inference", "imagecache"},
    "training": {"engine", "distributed", "inputs", "trainer", "train", "difficulty", "curriculum"},
    "meta": {"blend", "dakl", "report", "submission", "paper_numbers"},
    "apps": {"predict", "retrieval", "textsearch", "domain", "prior", "clipprior", "sidecars", "metadata", "promptformats", "comfy", "comfy_workflow", "stealth", "importer", "datacli", "generate", "study", "study_tally"},
    "runners": {"pipeline", "steps", "weightscheck", "cli", "__main__"},
}
# which layers a layer may import (its own included); inference (models) and apps never reach training
ALLOWED = {
    "foundations": {"foundations"},
    "services": {"foundations", "services"},
    "data": {"foundations", "services", "data"},
    "models": {"foundations", "services", "models"},
    "training": {"foundations", "services", "data", "models", "training"},
    "meta": {"foundations", "meta"},
    "apps": {"foundations", "services", "data", "models", "meta", "apps"},
    "runners": set(LAYERS),
}
LAYER_OF = {m: layer for layer, mods in LAYERS.items() for m in mods}


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SRC.glob("*.py"))}


def revsd_imports(path: Path, known: set[str]) -> set[str]:
    """Every revsd module ``path`` imports, at any depth of the file (functions, methods, try blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("revsd.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module == "revsd":
                found |= {a.name for a in node.names if a.name in known}
            elif node.module and node.module.startswith("revsd."):
                found.add(node.module.split(".")[1])
    return (found & known) - {path.stem}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: revsd_imports(path, set(mods)) for name, path in mods.items()}


def test_every_module_is_classified():
    unknown = sorted(set(modules()) - set(LAYER_OF))
    assert not unknown, f"classify {unknown} in LAYERS (tests/test_architecture.py) and docs/architecture.md"


def test_imports_follow_the_layers(graph):
    broken = [f"{m} ({LAYER_OF[m]}) imports {d} ({LAYER_OF[d]})" for m, deps in sorted(graph.items())
              for d in sorted(deps) if m in LAYER_OF and d in LAYER_OF and LAYER_OF[d] not in ALLOWED[LAYER_OF[m]]]
    assert not broken, "import rule broken:\n" + "\n".join(broken)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_predict_path_never_reaches_training(graph):
    """What ``inference`` and ``predict`` import, transitively: nothing of the training layer."""
    for start in ("inference", "predict"):
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        assert not {m for m in seen if LAYER_OF.get(m) == "training"}, start


def test_modules_stay_short():
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by role): {long}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom revsd import paths\n\ndef g():\n    from revsd.engine import x\n"
                 "    import revsd.train\n    from . import blend\n")
    assert revsd_imports(f, {"paths", "engine", "train", "blend", "os"}) == {"paths", "engine", "train", "blend"}
