"""revsd.comfy on UI workflows built from subgraphs (ComfyUI's newer templates pack the whole graph into one).

    .venv/bin/python bench/bench_comfy_subgraphs.py DIR     # writes bench/results/comfy_subgraphs.md

``DIR`` holds UI workflows (``*.json``, what ComfyUI stores as the ``workflow`` chunk) with ``definitions.subgraphs``;
the measured ones are public templates listed in ``bench/comfy_subgraph_sources.tsv`` (repository, path, commit), not
stored here. No API export exists beside them, so each reading is checked against the file itself: the prompt found
must be a text stored in the file (never made up), and it is stored either as a value on the subgraph node (promoted
with ``proxyWidgets ["-1", name]``) or on another node (inside the subgraph in the templates). "Before": the same
file with its subgraph definitions left out, i.e. how it was read before subgraphs were expanded. Prompt texts are
not copied into the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from revsd import comfy

sys.path.insert(0, str(Path(__file__).parent))
from bench_comfy_graphs import report
from bench_comfy_workflows import SETTINGS


def verdict(wf: dict) -> dict:
    defs = {d.get("id") for d in (wf.get("definitions") or {}).get("subgraphs") or [] if isinstance(d, dict)}
    hosts = [n for n in wf.get("nodes") or [] if isinstance(n, dict) and n.get("type") in defs]
    before = comfy.read(comfy.from_workflow({k: v for k, v in wf.items() if k != "definitions"}))
    graph = comfy.from_workflow(wf)
    got = comfy.read(graph)
    text = json.dumps(got["prompt"])[1:-1] if got else None
    on_host = got is not None and any(isinstance(v, str) and v.strip() == got["prompt"]
                                      for n in hosts for v in n.get("widgets_values") or [])
    return {"subgraph definitions": len(defs), "subgraph nodes": len(hosts), "nodes expanded": len(graph),
            "before": "prompt" if before else "–", "now": "prompt" if got else "–",
            "prompt stored in the file": "" if not got else "yes" if text in json.dumps(wf) else "NO",
            "where": "" if not got else "subgraph node" if on_host else "another node",
            "settings found": "" if not got else f"{sum(got[k] is not None for k in SETTINGS)}/{len(SETTINGS)}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="folder of UI workflow .json files with subgraphs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "comfy_subgraphs.md"))
    args = ap.parse_args(argv)
    rows = []
    for f in sorted(Path(args.dir).glob("*.json")):
        try:
            wf = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(wf, dict) and isinstance(wf.get("definitions"), dict) and wf["definitions"].get("subgraphs"):
            rows.append({"workflow": f.stem[:60], **verdict(wf)})
    if not rows:
        raise SystemExit(f"no UI workflows with subgraphs in {args.dir}")
    now = [r for r in rows if r["now"] == "prompt"]
    summary = (f"{len(rows)} workflows with subgraphs: a prompt in {len(now)} now (before expanding subgraphs: "
               f"{sum(r['before'] == 'prompt' for r in rows)}); every prompt found is a text stored in the file: "
               f"{'yes' if all(r['prompt stored in the file'] == 'yes' for r in now) else 'NO'}; stored on the "
               f"subgraph node in {sum(r['where'] == 'subgraph node' for r in now)}, on another node (inside it) in "
               f"{sum(r['where'] == 'another node' for r in now)}.")
    return report("bench_comfy_subgraphs", argv, args.out, "files: `bench/comfy_subgraph_sources.tsv`", summary, rows)


if __name__ == "__main__":
    raise SystemExit(main())
