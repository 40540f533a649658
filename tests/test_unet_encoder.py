"""The SD U-Net encoder backbone (tiny random-init, offline) and the cached BLIP-caption context."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from revsd import unet_encoder as ue
from revsd.images import image_key
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
    assert isinstance(out, ue.UNetContext) and out.keys == [image_key(i, f) for i, f in zip(ids[:3], files[:3])]
    assert out.states.shape == (3, ue.TEXT_MAX_LENGTH, 16) and not out.states.requires_grad
    cap = ctx.captioner
    assert cap.blip_calls == 1
    lines = [json.loads(line) for line in cap.cache_path.read_text().splitlines()]
    assert [r["image_id"] for r in lines] == ids[:3] and all(r["caption"] for r in lines)
    assert [r["key"] for r in lines] == out.keys

    # a crash mid-append leaves a torn last line: ignored, the rest of the cache is used
    with open(cap.cache_path, "a") as f:
        f.write('{"key": "torn", "capt')
    again = ue.make_context_fn(tiny=True, cache_dir=tmp_path)
    assert torch.equal(again(ids[:3], files[:3]).states, out.states)
    assert again.captioner.blip_calls == 0  # all from the cache, BLIP never loaded
    assert again.captioner._blip is None

    again.captions(ids, files)  # only the 4th image is new
    assert again.captioner.blip_calls == 1 and len(again.captioner.cached()) == 4


def test_edited_image_is_captioned_again(tmp_path, sample_images):
    ids, files = sample_images
    local = tmp_path / files[0].name
    shutil.copy(files[0], local)
    ctx = ue.make_context_fn(tiny=True, cache_dir=tmp_path / "cache")
    ctx.captions([ids[0]], [local])
    os.utime(local, ns=(1, 1))  # same bytes, new mtime: the key changes as in the feature cache
    ctx.captions([ids[0]], [local])
    assert ctx.captioner.blip_calls == 2 and len(ctx.captioner.cached()) == 2


def test_unreadable_image_gets_empty_caption_and_is_not_cached(tmp_path, sample_images):
    ids, files = sample_images
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    ctx = ue.make_context_fn(tiny=True, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="broken.png"):
        caps = ctx.captions(["bad", ids[0]], [bad, files[0]])
    assert caps[0] == "" and caps[1]
    assert "bad" not in ctx.captioner.cache_path.read_text()


def _epoch(enc, ctx_fn, ids, files, order, batch=2):
    """One pass in ``order`` through the real preprocessing (as 03_train feeds the backbone): features by id."""
    from revsd.transforms import Preprocess, load_array, to_batch

    pp = Preprocess(enc.pretrained_cfg["input_size"][-1])
    out = {}
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        x = to_batch([load_array(files[r], pp) for r in rows], pp.mean, pp.std)
        with torch.no_grad():
            feats = enc.eval()(x, ctx_fn([ids[r] for r in rows], [files[r] for r in rows]))
        out.update({ids[r]: f for r, f in zip(rows, feats)})
    return out


def test_latents_and_captions_are_reused_from_the_second_epoch(tmp_path, sample_images):
    ids, files = sample_images
    enc = ue.build_unet_encoder(tiny=True, latent_cache=False)
    enc.latent_cache = ue.LatentCache(tmp_path / "latents")
    ctx_fn = ue.make_context_fn(tiny=True, cache_dir=tmp_path / "captions")
    first = _epoch(enc, ctx_fn, ids, files, [0, 1, 2, 3])
    assert enc.vae_calls == 2 and ctx_fn.captioner.blip_calls == 2
    assert len(list((tmp_path / "latents").rglob("*.npz"))) == 4

    second = _epoch(enc, ctx_fn, ids, files, [3, 1, 0, 2], batch=3)  # reshuffled, other batch sizes
    assert enc.vae_calls == 2 and ctx_fn.captioner.blip_calls == 2  # nothing recomputed
    assert enc.latent_cache.hits == 4
    assert all(torch.allclose(first[i], second[i], atol=1e-5) for i in ids)

    # a new process (fresh encoder and context) reads both caches from disk
    enc2 = ue.build_unet_encoder(tiny=True, latent_cache=False)
    enc2.latent_cache = ue.LatentCache(tmp_path / "latents")
    ctx2 = ue.make_context_fn(tiny=True, cache_dir=tmp_path / "captions")
    third = _epoch(enc2, ctx2, ids, files, [0, 1, 2, 3])
    assert enc2.vae_calls == 0 and ctx2.captioner.blip_calls == 0 and ctx2.captioner._blip is None
    # cached latents give the features of an encoder without any cache
    plain = _epoch(ue.build_unet_encoder(tiny=True, latent_cache=False), ctx2, ids, files, [0, 1, 2, 3])
    assert all(torch.allclose(third[i], plain[i], atol=1e-5) for i in ids)


def test_changed_pixels_are_encoded_again(tmp_path):
    """The key (id|size|mtime) cannot see augmentation or new preprocessing; the pixel fingerprint can."""
    enc = ue.build_unet_encoder(tiny=True, latent_cache=False)
    enc.latent_cache = ue.LatentCache(tmp_path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    keys = ["a|1|1", "b|1|1"]
    first = enc.latents(x, keys)
    assert enc.latents(x, keys).equal(first) and enc.vae_calls == 1
    flipped = x.flip(-1)
    with pytest.warns(UserWarning, match="changed"):
        again = enc.latents(flipped, keys)
    assert enc.vae_calls == 2 and again.equal(enc.encode_latents(flipped).float())


def test_build_cache_dir_is_per_vae_and_size(_isolated_working):
    enc = ue.build_unet_encoder(tiny=True)
    assert enc.latent_cache.directory == _isolated_working / "latents" / "tiny-32"
    assert ue.latent_cache_dir("CompVis/stable-diffusion-v1-4").name == "CompVis_stable-diffusion-v1-4-512"


@pytest.mark.slow
def test_03_train_encodes_each_image_once_over_three_epochs(prepared_exp, _isolated_working, monkeypatch):
    """The real trainer: the VAE and BLIP see every image once (first epoch and first eval pass), never again."""
    from revsd import train

    images = {"vae": 0}
    encode = ue.UNetEncoder.encode_latents

    def counting(self, x):
        images["vae"] += x.shape[0]
        return encode(self, x)

    def caches():  # other tests may share this working dir: compare before and after
        cap = _isolated_working / "captions" / f"{ue.TINY_BLIP_ID}.jsonl"
        return (set((_isolated_working / "latents" / "tiny-32").rglob("*.npz")),
                cap.read_text().splitlines() if cap.exists() else [])

    monkeypatch.setattr(ue.UNetEncoder, "encode_latents", counting)
    from revsd import backbones

    shutil.rmtree(_isolated_working / "latents" / "tiny-32", ignore_errors=True)  # caches other tests filled
    (_isolated_working / "captions" / f"{ue.TINY_BLIP_ID}.jsonl").unlink(missing_ok=True)  # (recomputed on use)
    monkeypatch.setattr(backbones, "_CAPTION_CONTEXTS", {})  # and their captioners, which remember captions
    latents0, captions0 = caches()
    cfg = train.TrainConfig(exp=prepared_exp, run="unet-cache", backbone="unet_enc", mode="finetune", tiny=True,
                            pretrained=False, smoke=True, epochs=3, batch_size=8, num_workers=1)
    train.run(cfg)
    latents, captions = caches()
    new_latents, new_captions = latents - latents0, captions[len(captions0):]
    assert images["vae"] == len(new_latents) == len({json.loads(c)["key"] for c in new_captions}) > 0
    assert len(new_captions) == len(new_latents)  # each caption computed once
