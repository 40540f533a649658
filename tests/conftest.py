"""Shared fixtures. Tests never write into the repo's working/: REVSD_WORKING points at a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "input" / "sample"


@pytest.fixture(scope="session", autouse=True)
def _isolated_working(tmp_path_factory):
    work = tmp_path_factory.mktemp("working")
    subs = tmp_path_factory.mktemp("submissions")
    old = {k: os.environ.get(k) for k in ("REVSD_WORKING", "REVSD_SUBMISSIONS", "REVSD_ROOT")}
    os.environ.update(REVSD_WORKING=str(work), REVSD_SUBMISSIONS=str(subs), REVSD_ROOT=str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass
    yield work
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def prepared_exp(_isolated_working) -> str:
    """Stages 01 + 02 run once on the embedded sample (exp name ``"t"``); returns the exp name."""
    from revsd import filtering, targets

    exp = "t"
    filtering.run(filtering.FilterConfig(exp=exp))
    targets.run(targets.TargetsConfig(exp=exp, vocab_size=64))
    return exp


@pytest.fixture(scope="session")
def real_prompts(sample_dir) -> list[str]:
    """120 short real DiffusionDB prompts (short keeps MiniLM fast on CPU)."""
    import pandas as pd

    df = pd.read_parquet(REPO / "input" / "prompts" / "diffusiondb_prompts.parquet")
    short = df.loc[df["prompt"].str.len().between(20, 70), "prompt"]
    return short.sample(120, random_state=0).tolist()


@pytest.fixture(scope="session")
def bank(real_prompts, tmp_path_factory):
    """A saved prompt bank of ``real_prompts`` (revsd.retrieval.PromptBank)."""
    from revsd.retrieval import build_bank

    return build_bank(real_prompts, tmp_path_factory.mktemp("bank") / "b", progress=False)
