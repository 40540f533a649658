"""The benchmark scripts that cannot run at full size here still run end to end on tiny models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_gpu_tiny_cpu_run(tmp_path):
    import os

    bench = _load("bench_train_gpu")
    out = tmp_path / "train_gpu.md"
    working = os.environ.get("REVSD_WORKING")
    assert bench.main(["--tiny", "--backbones", "vit_b16", "--steps", "1", "--warmup", "1", "--batch", "2",
                       "--out", str(out)]) == 0
    assert os.environ.get("REVSD_WORKING") == working  # the script's temp working dir does not leak
    text = out.read_text()
    assert "vit_b16" in text and "img/s" in text


def test_bench_comfy_graphs_counts_what_each_parser_finds(tmp_path):
    """On graphs the tests build: a KSampler graph both read alike, a Flux graph only ours reads, a ControlNet
    graph where sd-parsers mixes the prompts, an upscale-only graph neither claims, and a non-graph file skipped."""
    import copy
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_comfy import FLUX
    from test_metadata import COMFY_GRAPH

    cn = copy.deepcopy(COMFY_GRAPH)
    cn["3"]["inputs"].update(positive=["12", 0], negative=["12", 1])
    cn["12"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["6", 0], "negative": ["7", 0],
                                                                     "control_net": ["13", 0], "strength": 1.0}}
    cn["13"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}}
    upscale = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
               "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    for name, g in {"ksampler": COMFY_GRAPH, "flux": FLUX, "controlnet": cn, "upscale": upscale,
                    "other": {"a": 1}}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(g))
    out = tmp_path / "comfy.md"
    assert _load("bench_comfy_graphs").main([str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert ("4 graphs: a positive prompt from ours in 3, from sd-parsers in 2, from neither in 1. Where both found "
            "one (2): the same prompt in 1; sd-parsers put the positive inside the negative in 1 and appended the "
            "negative to the positive in 1.") in text



def test_bench_comfy_subgraphs_reads_workflows_built_from_subgraphs(tmp_path):
    """Workflows the tests build: the default one packed into a subgraph (its prompt promoted onto the subgraph node),
    the same with the prompt fed from a primitive outside, one whose promoted values are unnamed (no prompt), and a
    workflow without subgraphs (skipped)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_comfy_workflow import subgraphed, ui_default

    unnamed = subgraphed()
    unnamed["nodes"][0]["properties"] = {}
    for name, wf in (("promoted", subgraphed()), ("primitive", subgraphed(text_value="a fox")), ("unnamed", unnamed),
                     ("flat", ui_default())):
        (tmp_path / f"{name}.json").write_text(json.dumps(wf))
    out = tmp_path / "sub.md"
    assert _load("bench_comfy_subgraphs").main([str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert ("3 workflows with subgraphs: a prompt in 2 now (before expanding subgraphs: 0); every prompt found is a "
            "text stored in the file: yes; stored on the subgraph node in 1, on another node (inside it) in 1.") in text
    assert "| promoted | 2 | 1 | 7 | – | prompt | yes | subgraph node | 6/7 |" in text and "flat" not in text


def test_bench_comfy_workflows_compares_the_ui_workflow_with_its_api_graph(tmp_path):
    """Pairs the tests build: the default workflow (both read alike), the same with an unknown encoder type in the
    UI (nothing guessed: no prompt from the UI), one without text in either, one whose API file was edited after
    export, and a lone UI file skipped."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_comfy_workflow import UI_INFO, ui_default
    from test_metadata import COMFY_GRAPH

    api = json.loads(json.dumps(COMFY_GRAPH))
    api["3"]["inputs"].update(seed=UI_INFO["seed"], steps=20, cfg=8, sampler_name="euler")
    api["4"]["inputs"]["ckpt_name"] = UI_INFO["model"]
    api["5"]["inputs"].update(width=512, height=640)
    api["6"]["inputs"]["text"], api["7"]["inputs"]["text"] = UI_INFO["prompt"], UI_INFO["negative_prompt"]
    unknown = ui_default()
    unknown["nodes"][3]["type"] = "MyTextEncoder"
    empty_api = json.loads(json.dumps(api))
    empty_api["6"]["inputs"]["text"] = ""
    empty_ui = ui_default()
    empty_ui["nodes"][3]["widgets_values"] = [""]
    edited = json.loads(json.dumps(api))  # an API file edited after export: its prompt is not in the UI file
    edited["6"]["inputs"]["text"] = "a prompt typed into the API file"
    for name, ui, a in (("default", ui_default(), api), ("unknown", unknown, api), ("empty", empty_ui, empty_api),
                        ("edited", ui_default(), edited)):
        (tmp_path / f"{name}.ui.json").write_text(json.dumps(ui))
        (tmp_path / f"{name}.api.json").write_text(json.dumps(a))
    (tmp_path / "lone.ui.json").write_text(json.dumps(ui_default()))
    out = tmp_path / "wf.md"
    assert _load("bench_comfy_workflows").main([str(tmp_path), "--out", str(out)]) == 0
    assert ("4 workflows; the API graph has a prompt in 3. From the UI workflow alone: a prompt in 2 of those 3: the "
            "same prompt in 1, a different one in 1 (of which 1 where the API file's prompt is nowhere in the UI file: "
            "edited after export); the same negative in 2; a setting left empty in 0, a setting different in 0. A "
            "prompt where the API graph has none: 0.") in out.read_text()