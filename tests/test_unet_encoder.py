"""The SD U-Net encoder backbone (tiny random-init, offline) and the cached BLIP-caption context."""

from __future__ import annotations

import json

import pytest
import torch

from revsd import unet_encoder as ue
from revsd.images import list_images


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ue.build_unet_encoder(tiny=True)


@pytest.fixture(scope="module")
def sample_images(sample_dir):
    files = list_images(sorted((sample_dir / "images").iterdir()))[:4]
    assert len(files) == 4
    return [f.stem for f in files], files


def _context(enc, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, ue.TEXT_MAX_LENGTH, enc.context_dim, generator=g)


def test_forward_backward_shapes_and_frozen_vae(encoder):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    encoder.zero_grad(set_to_none=True)
    feats = encoder.train()(x, _context(encoder, 3))
    assert feats.shape == (3, encoder.feature_dim) and torch.isfinite(feats).all()
    feats.square().mean().backward()
    assert not encoder.vae_encoder.training  # train() keeps the frozen VAE in eval mode
    assert all(p.grad is None for p in encoder.vae_encoder.parameters())
    for part in (encoder.unet.conv_in, encoder.unet.down_blocks, encoder.unet.mid_block):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert encoder.encode_latents(x).shape == (3, 4, 16, 16)  # SD latents: 4 channels, /2 in the tiny VAE


def test_cross_attention_uses_the_context(encoder):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = encoder.eval()(x, _context(encoder, 2, 0)), encoder(x, _context(encoder, 2, 1))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="caption context"):
        encoder(x, torch.zeros(2, 77, encoder.context_dim + 1))


def test_pool_down_concatenates_every_block():
    enc = ue.build_unet_encoder(tiny=True, pool_down=True)
    assert enc.feature_dim == 16 + 8 + 16  # mid + both down blocks of the tiny (8, 16) U-Net
    with torch.no_grad():
        out = enc(torch.zeros(1, 3, 32, 32), _context(enc, 1))
    assert out.shape == (1, enc.feature_dim)


def test_encoder_weights_load_into_a_full_unet(encoder):
    state = encoder.encoder_state_dict()
    assert {k.split(".")[0] for k in state} == {"conv_in", "time_embedding", "down_blocks", "mid_block"}
    # what a wrapper (Backbone.net inside the model) saves, any prefix before "unet."
    saved = {f"backbone.net.{k}": v for k, v in encoder.state_dict().items()}
    extracted = ue.extract_encoder_state(saved)
    assert extracted.keys() == state.keys()
    unet = ue.tiny_sd_parts(seed=1)["unet"]
    result = unet.load_state_dict(extracted, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("up_blocks", "conv_norm_out", "conv_out")) for k in result.missing_keys)
    assert torch.equal(unet.mid_block.resnets[0].conv1.weight, encoder.unet.mid_block.resnets[0].conv1.weight)
    with pytest.raises(KeyError, match="unet_enc"):
        ue.extract_encoder_state({"head.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="several"):
        ue.extract_encoder_state({**saved, **{f"other.{k}": v for k, v in encoder.state_dict().items()}})


def test_tiny_parts_are_deterministic():
    a, b = ue.tiny_sd_parts()["unet"], ue.tiny_sd_parts()["unet"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_caption_cache_on_real_images(tmp_path, sample_images):
    ids, files = sample_images
    ctx = ue.make_context_fn(tiny=True, cache_dir=tmp_path)
    out = ctx(ids[:3], files[:3])
    assert out.shape == (3, ue.TEXT_MAX_LENGTH, 16) and not out.requires_grad
    assert ctx.blip_calls == 1
    lines = [json.loads(line) for line in ctx.cache_path.read_text().splitlines()]
    assert [r["image_id"] for r in lines] == ids[:3] and all(r["caption"] for r in lines)

    # a crash mid-append leaves a torn last line: ignored, the rest of the cache is used
    with open(ctx.cache_path, "a") as f:
        f.write('{"image_id": "torn", "capt')
    again = ue.make_context_fn(tiny=True, cache_dir=tmp_path)
    assert torch.equal(again(ids[:3], files[:3]), out)
    assert again.blip_calls == 0  # all from the cache, BLIP never loaded
    assert again._blip is None

    again.captions(ids, files)  # only the 4th image is new
    assert again.blip_calls == 1 and len(again._load_cache()) == 4


def test_unreadable_image_gets_empty_caption_and_is_not_cached(tmp_path, sample_images):
    ids, files = sample_images
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    ctx = ue.make_context_fn(tiny=True, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="broken.png"):
        caps = ctx.captions(["bad", ids[0]], [bad, files[0]])
    assert caps[0] == "" and caps[1]
    assert "bad" not in ctx.cache_path.read_text()
