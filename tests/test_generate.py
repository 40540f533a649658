"""Generation with the trained U-Net encoder: a tiny random-init SD pipeline built offline."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from revsd import generate
from revsd.unet_encoder import build_unet_encoder


def write_run(run_dir, mode="finetune", prefix="backbone.net.", backbone="unet_enc"):
    """A unet_enc run dir as 03_train writes it, with encoder weights moved away from the SD init."""
    enc = build_unet_encoder(tiny=True)
    with torch.no_grad():
        for p in enc.unet.mid_block.parameters():
            p.add_(0.5 * torch.randn_like(p))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in enc.state_dict().items()}, str(run_dir / "model.safetensors"))
    (run_dir / "model.json").write_text(json.dumps({"backbone": backbone, "mode": mode, "tiny": True}))
    return enc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("unet_run")
    write_run(d)
    return d


@pytest.fixture(scope="module")
def pipe(run_dir):
    p = generate.build_pipeline(tiny=True)
    generate.install_swap(p, generate.load_run_encoder(run_dir))
    return p


def test_swap_happens_exactly_from_step_two(pipe):
    swap = pipe.unet
    calls = {"original": 0, "swapped": 0}
    hooks = [m.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, m in (("original", swap.original), ("swapped", swap.swapped))]
    try:
        original, ours = generate.generate_pair(pipe, "a castle at night", seed=1, steps=5)
        assert swap.history == ["original"] + ["swapped"] * 4  # the "ours" pass
        assert calls == {"original": 5 + 1, "swapped": 4}  # baseline pass: 5 original calls
    finally:
        for h in hooks:
            h.remove()
    assert original.size == ours.size == (32, 32)
    assert np.abs(np.asarray(original, float) - np.asarray(ours, float)).mean() > 1  # the trained encoder acts


def test_seed_makes_both_paths_reproducible(pipe):
    a = generate.generate_pair(pipe, "a red dog", seed=3, steps=3)
    b = generate.generate_pair(pipe, "a red dog", seed=3, steps=3)
    c = generate.generate_pair(pipe, "a red dog", seed=4, steps=3)
    arr = lambda im: np.asarray(im)  # noqa: E731
    assert np.array_equal(arr(a[0]), arr(b[0])) and np.array_equal(arr(a[1]), arr(b[1]))
    assert not np.array_equal(arr(a[0]), arr(c[0]))


def test_swapped_unet_carries_the_trained_weights(pipe, run_dir):
    swap = pipe.unet
    trained = generate.load_run_encoder(run_dir)
    k = "mid_block.resnets.0.conv1.weight"
    assert torch.equal(swap.swapped.state_dict()[k], trained[k])
    assert not torch.equal(swap.original.state_dict()[k], trained[k])
    up = "up_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(swap.swapped.state_dict()[up], swap.original.state_dict()[up])  # decoder untouched
    bad = {**trained, k: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="does not fit"):
        generate.swapped_unet(swap.original, bad)


def test_cli_writes_pairs_and_manifest_and_resumes(tmp_path, run_dir):
    prompts = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": ["a portrait of a woman", "a city at night", ""]}).to_csv(prompts, index=False)
    out = tmp_path / "gen"
    argv = ["--prompts", str(prompts), "--unet-encoder", str(run_dir), "--out", str(out), "--steps", "2",
            "--seed", "7", "--device", "cpu"]
    assert generate.main(argv) == 0  # model.json says tiny → tiny pipeline
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["pair_id"] for r in rows] == ["p00000", "p00001"]  # the empty prompt is dropped
    assert [r["seed"] for r in rows] == [7, 8]
    assert pd.read_csv(out / "manifest.csv").columns.tolist() == generate.MANIFEST_COLUMNS
    files = [out / r[side] for r in rows for side in ("original", "ours")]
    assert all(f.exists() for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert generate.main(argv) == 0  # a rerun keeps the finished pairs
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_bad_run_dirs_are_refused_with_a_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        generate.load_run_encoder(tmp_path)
    write_run(tmp_path / "frozen", mode="frozen")
    with pytest.raises(ValueError, match="finetune"):
        generate.load_run_encoder(tmp_path / "frozen")
    write_run(tmp_path / "eff", backbone="effnet_lite0")
    with pytest.raises(ValueError, match="effnet_lite0"):
        generate.load_run_encoder(tmp_path / "eff")
    with pytest.raises(ValueError, match="prompt"):
        (tmp_path / "p.csv").write_text("text\nabc\n")
        generate.read_prompts(tmp_path / "p.csv")


def test_reads_what_03_train_saves(tmp_path):
    """Contract with 03_train: a finetuned unet_enc RevSDModel saved by engine.save_weights loads here."""
    from revsd import inference
    from revsd.backbones import create_backbone
    from revsd.heads import PromptHead, RevSDModel

    backbone = create_backbone("unet_enc", pretrained=False, tiny=True)
    model = RevSDModel(PromptHead(backbone.feature_dim, hidden=8), backbone)
    inference.save_weights(tmp_path / "model.safetensors", model)
    (tmp_path / "model.json").write_text(json.dumps({"backbone": "unet_enc", "mode": "finetune", "tiny": True}))
    state = generate.load_run_encoder(tmp_path)
    assert state.keys() == backbone.net.encoder_state_dict().keys()


def test_local_sd_folders(tmp_path, monkeypatch):
    """--sd-weights: a parts-only folder (unet/ vae/ text_encoder/ tokenizer/) or a full pipeline folder
    (model_index.json); $REVSD_WEIGHTS/stable-diffusion-v1-4 when none is given. Same tensors as saved."""
    from revsd.sd_parts import tiny_sd_parts

    parts = tiny_sd_parts(seed=5)
    for name, part in parts.items():
        part.save_pretrained(tmp_path / "parts" / name)
    with pytest.raises(ValueError, match="no model_index.json.*--no-safety-checker"):
        generate.build_pipeline(sd_weights=str(tmp_path / "parts"))
    pipe = generate.build_pipeline(sd_weights=str(tmp_path / "parts"), safety_checker=False)
    assert torch.equal(pipe.unet.conv_in.weight, parts["unet"].conv_in.weight)
    assert torch.equal(pipe.vae.decoder.conv_out.weight, parts["vae"].decoder.conv_out.weight)

    generate.pipeline_from_parts(tiny_sd_parts(seed=6)).save_pretrained(tmp_path / "w" / "stable-diffusion-v1-4")
    monkeypatch.setenv("REVSD_WEIGHTS", str(tmp_path / "w"))
    full = generate.build_pipeline(safety_checker=False)  # from the weights root, a full pipeline folder
    assert torch.equal(full.unet.conv_in.weight, tiny_sd_parts(seed=6)["unet"].conv_in.weight)
    original, ours = generate.generate_pair(_swap(full), "a cat", seed=0, steps=2)
    assert original.size == ours.size == (32, 32)


def _swap(pipe):
    generate.install_swap(pipe, {})  # no trained weights: both images from the same U-Net
    return pipe
