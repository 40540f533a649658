"""revsd.comfy against sd-parsers on real ComfyUI API-format graphs (the ``prompt`` chunk ComfyUI writes).

    .venv/bin/python bench/bench_comfy_graphs.py DIR        # writes bench/results/comfy_graphs.md

``DIR`` holds the graphs as JSON files. The 63 measured ones are public files listed in
``bench/comfy_graph_sources.tsv`` (repository, path, commit); they are not stored here. For each graph: does our
tracer (:func:`revsd.comfy.read`) find a positive prompt, does sd-parsers (its ComfyUI parser, fed the links rebuilt
from the graph, as ``revsd.metadata`` did before it used the tracer), and where both do, do they agree, and did
sd-parsers mix the two prompts (the positive returned as the negative; the negative appended to the positive).
Prompt texts are not copied into the results, only these verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from revsd import comfy, metadata
from revsd.artifacts import write_text

sys.path.insert(0, str(Path(__file__).parent))
from bench_predict import markdown


def library(graph: dict) -> dict | None:
    from sd_parsers.parsers import ComfyUIParser

    links = [[0, str(v[0]), v[1], str(nid), 0, name.upper()] for nid, node in graph.items() if isinstance(node, dict)
             for name, v in (node.get("inputs") or {}).items() if isinstance(v, list) and len(v) == 2]
    try:
        return metadata._from_library("comfyui", ComfyUIParser().parse({"prompt": graph, "workflow": {"links": links}}))
    except Exception:  # the library's own failures count as "nothing found"
        return None


def verdict(graph: dict) -> dict:
    own, lib = comfy.read(graph), library(graph)
    samplers = sorted({str(n.get("class_type")) for n in graph.values() if isinstance(n, dict)
                       and "ampler" in str(n.get("class_type")) and "Select" not in str(n.get("class_type"))})
    row = {"samplers": ", ".join(samplers) or "–", "ours": "prompt" if own else "–",
           "sd-parsers": "prompt" if lib else "–", "same prompt": "", "sd-parsers mixed them": ""}
    if own and lib:
        row["same prompt"] = "yes" if own["prompt"] == lib["prompt"] else "no"
        mixed = []
        if lib["negative_prompt"] and own["prompt"] in lib["negative_prompt"]:
            mixed.append("positive inside negative")
        if lib["prompt"] != own["prompt"] and lib["prompt"].startswith(own["prompt"]):
            mixed.append("negative appended to positive")
        row["sd-parsers mixed them"] = "; ".join(mixed) or "no"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="folder of ComfyUI API-format graphs (*.json)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "comfy_graphs.md"))
    args = ap.parse_args(argv)
    rows = []
    for f in sorted(Path(args.dir).glob("*.json")):
        try:
            graph = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(graph, dict) and any(isinstance(n, dict) and "class_type" in n for n in graph.values()):
            rows.append({"graph": f.stem[:60], **verdict(graph)})
    if not rows:
        raise SystemExit(f"no ComfyUI API-format graphs in {args.dir}")
    both = [r for r in rows if r["ours"] == r["sd-parsers"] == "prompt"]
    count = lambda what: sum(what in r["sd-parsers mixed them"] for r in both)
    summary = (f"{len(rows)} graphs: a positive prompt from ours in {sum(r['ours'] == 'prompt' for r in rows)}, "
               f"from sd-parsers in {sum(r['sd-parsers'] == 'prompt' for r in rows)}, from neither in "
               f"{sum(r['ours'] == r['sd-parsers'] == '–' for r in rows)}. Where both found one ({len(both)}): the "
               f"same prompt in {sum(r['same prompt'] == 'yes' for r in both)}; sd-parsers put the positive inside "
               f"the negative in {count('positive inside negative')} and appended the negative to the positive in "
               f"{count('negative appended')}.")
    return report("bench_comfy_graphs", argv, args.out, "graphs: `bench/comfy_graph_sources.tsv`", summary, rows)


def report(name: str, argv, out: str, sources: str, summary: str, rows: list[dict]) -> int:
    """Write ``bench/results/<name>.md`` (the command, where its inputs come from, the summary, the table)."""
    cmd = " ".join([f".venv/bin/python bench/{name}.py", *(sys.argv[1:] if argv is None else argv)])
    write_text(out, f"# {name}\n\n`{cmd}` ({sources})\n\n{summary}\n\n{markdown(rows)}")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
