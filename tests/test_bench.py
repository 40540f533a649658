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
