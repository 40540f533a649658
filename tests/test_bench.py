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
