"""revsd.comfy on ComfyUI's UI ``workflow`` alone, against the API graph of the same workflow.

    .venv/bin/python bench/bench_comfy_workflows.py DIR     # writes bench/results/comfy_workflows.md

``DIR`` holds pairs ``<name>.ui.json`` (the UI's workflow, what ComfyUI stores as the ``workflow`` chunk) and
``<name>.api.json`` (the same workflow exported in API format, the ``prompt`` chunk). The 25 measured pairs are public
files listed in ``bench/comfy_workflow_sources.tsv`` (repository, both paths, commits); they are not stored here. Each
pair was checked to be one workflow (the API node ids and types are the UI's, less muted, bypassed, note and reroute
nodes); some API files were edited after export (a prompt, a model, a file name), which the verdicts show.
For each pair: the tracer on the API graph (:func:`revsd.comfy.read`, the reference) and on the graph rebuilt from
the UI workflow (:func:`revsd.comfy.from_workflow`); do they find a prompt, the same prompt, the same negative
prompt and the same settings. A file whose only metadata is the UI workflow is read this way
(:mod:`revsd.metadata`). Prompt texts are not copied into the results, only these verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from revsd import comfy

sys.path.insert(0, str(Path(__file__).parent))
from bench_comfy_graphs import report

SETTINGS = ("model", "seed", "steps", "sampler", "cfg", "width", "height")


def verdict(ui: dict, api: dict) -> dict:
    """Found / same prompt / same negative; settings the UI reading left empty (widget names unknown: nothing is
    guessed) and settings that differ. Where the prompt differs: is the API's prompt in the UI file at all (if not,
    the API file was edited after export and the UI reading is not wrong)."""
    ref, got = comfy.read(api), comfy.read(comfy.from_workflow(ui))
    row = {"version": str(ui.get("version", "?")), "nodes": len(ui.get("nodes") or []),
           "API graph": "prompt" if ref else "–", "UI workflow": "prompt" if got else "–",
           "same prompt": "", "same negative": "", "settings missing": "", "settings different": ""}
    if ref and got:
        row["same prompt"] = "yes" if got["prompt"] == ref["prompt"] else \
            "no" + ("" if json.dumps(ref["prompt"])[1:-1] in json.dumps(ui) else " (API prompt not in the UI file)")
        row["same negative"] = "yes" if got["negative_prompt"] == ref["negative_prompt"] else "no"
        row["settings missing"] = ", ".join(k for k in SETTINGS if got[k] is None and ref[k] is not None)
        row["settings different"] = ", ".join(k for k in SETTINGS if got[k] is not None and got[k] != ref[k])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="folder of <name>.ui.json / <name>.api.json pairs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "comfy_workflows.md"))
    args = ap.parse_args(argv)
    rows = []
    for f in sorted(Path(args.dir).glob("*.ui.json")):
        api = f.with_name(f.name[: -len(".ui.json")] + ".api.json")
        try:
            pair = json.loads(f.read_text(encoding="utf-8")), json.loads(api.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rows.append({"workflow": f.name[: -len(".ui.json")][:60], **verdict(*pair)})
    if not rows:
        raise SystemExit(f"no <name>.ui.json / <name>.api.json pairs in {args.dir}")
    ref = [r for r in rows if r["API graph"] == "prompt"]
    both = [r for r in ref if r["UI workflow"] == "prompt"]
    extra = sum(r["UI workflow"] == "prompt" and r["API graph"] == "–" for r in rows)
    same = sum(r["same prompt"] == "yes" for r in both)
    edited = sum("not in the UI file" in r["same prompt"] for r in both)
    summary = (f"{len(rows)} workflows; the API graph has a prompt in {len(ref)}. From the UI workflow alone: a "
               f"prompt in {len(both)} of those {len(ref)}: the same prompt in {same}, a different one in "
               f"{len(both) - same} (of which {edited} where the API file's prompt is nowhere in the UI file: edited "
               f"after export); the same negative in {sum(r['same negative'] == 'yes' for r in both)}; a setting "
               f"left empty in {sum(bool(r['settings missing']) for r in both)}, a setting different in "
               f"{sum(bool(r['settings different']) for r in both)}. A prompt where the API graph has none: {extra}.")
    return report("bench_comfy_workflows", argv, args.out, "pairs: `bench/comfy_workflow_sources.tsv`", summary, rows)


if __name__ == "__main__":
    raise SystemExit(main())
