"""The CLIP route of the image-conditioned prior (revsd.clipprior), on a tiny random-init open_clip checkpoint saved
to a local file and a bank of real DiffusionDB prompts."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from revsd import clipprior as C


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _save_tiny_clip(path, seed):
    import open_clip

    from revsd.backbones import TINY_CLIP

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_CLIP)
    with torch.no_grad():  # open_clip's init leaves the tiny text tower nearly constant: spread it out
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        model.logit_scale.fill_(np.log(50.0 + seed))  # not open_clip's init (1/0.07): read from the file
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_tiny_clip(tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin", seed=1)


@pytest.fixture(scope="module")
def bank():
    from revsd import paths
    from revsd.retrieval import build_bank, read_prompt_table

    prompts = read_prompt_table(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")
    return build_bank(prompts[:5000:100], progress=False)  # 50 real DiffusionDB prompts


def _spec(weights="", backbone="clip_vit_h14", mode="frozen", tiny=True, pretrained=True):
    return SimpleNamespace(backbone=backbone, mode=mode, pretrained=pretrained, tiny=tiny, weights=str(weights))


def _direct_text_embeddings(ckpt, prompts):
    """The tiny checkpoint's text tower, one prompt at a time, normalised in numpy."""
    import open_clip

    from revsd.backbones import TINY_CLIP

    model = open_clip.create_model("ViT-H-14", pretrained=str(ckpt), **TINY_CLIP).eval()
    tok = open_clip.get_tokenizer("ViT-H-14", context_length=TINY_CLIP["text_cfg"]["context_length"])
    with torch.no_grad():
        rows = [model.encode_text(C.tokenize(tok, [p], TINY_CLIP["text_cfg"]["vocab_size"]))[0].numpy()
                for p in prompts]
    return _unit(np.stack(rows)), float(model.logit_scale.detach().exp())


def test_chosen_prompts_are_the_most_clip_similar(ckpt, bank):
    from revsd.backbones import create_backbone

    p = C.ClipPrior.for_run(_spec(ckpt), bank, k=5, beta=0.5, progress=False)
    assert p is not None and p.uses_run_features
    bb = create_backbone("clip_vit_h14", pretrained=True, tiny=True, weights=str(ckpt)).eval()
    with torch.no_grad():
        feats = bb(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))).numpy()

    text, scale = _direct_text_embeddings(ckpt, bank.prompts)
    np.testing.assert_allclose(p.text_emb, text, atol=1e-5)  # batched + cached = one at a time
    assert p.scale == pytest.approx(scale) and scale == pytest.approx(51.0, rel=1e-5)
    cos = _unit(feats) @ text.T
    want = np.argsort(-cos, axis=1, kind="stable")[:, :5]
    idx, w = p.neighbours(feats)
    assert np.array_equal(idx, want)
    top = np.take_along_axis(cos, want, 1)
    soft = np.exp(scale * top) / np.exp(scale * top).sum(1, keepdims=True)
    np.testing.assert_allclose(w, soft, atol=1e-5)
    out = p(None, feats)
    expected = _unit(0.5 * _unit(np.einsum("nk,nkd->nd", soft, bank.emb[want])) + 0.5 * _unit(bank.emb.mean(0)))
    assert out.shape == (6, 384)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="pass feats"):
        p(None, None)
    with pytest.raises(ValueError, match="not this checkpoint's image tower"):
        p(None, np.ones((1, 1024), np.float32))


def test_a_feature_equal_to_a_prompt_embedding_takes_the_weight(ckpt, bank):
    p = C.ClipPrior.for_run(_spec(ckpt), bank, beta=1.0, scale=100.0, progress=False)  # ViT-H's own scale
    rows = [0, 17, 49]
    idx, w = p.neighbours(p.text_emb[rows])
    assert list(idx[:, 0]) == rows and (w[:, 0] > 0.99).all()
    out = p(None, p.text_emb[rows])
    assert (np.sum(out * bank.emb[rows], 1) > 0.999).all()  # beta = 1: the prompt's own MiniLM embedding
    broad_only = C.ClipPrior(p.text_emb, bank, beta=0.0)(None, p.text_emb[rows])
    np.testing.assert_allclose(broad_only, np.repeat(p.broad[None], 3, 0), atol=1e-6)


def test_text_embeddings_are_cached_per_bank_and_checkpoint(ckpt, bank, tmp_path, monkeypatch):
    from revsd.retrieval import PromptBank

    monkeypatch.setenv("REVSD_WORKING", str(tmp_path / "working"))
    calls = {"encode": 0, "load": 0}
    encode, load = C.encode_texts, C.load_clip

    def counting_encode(*a, **kw):
        calls["encode"] += 1
        return encode(*a, **kw)

    def counting_load(*a, **kw):
        calls["load"] += 1
        return load(*a, **kw)

    monkeypatch.setattr(C, "encode_texts", counting_encode)
    monkeypatch.setattr(C, "load_clip", counting_load)
    first = C.ClipPrior.for_run(_spec(ckpt), bank, progress=False)
    f = C.cache_path(bank.prompts, ckpt, tiny=True)
    assert calls == {"encode": 1, "load": 1} and f.is_file() and f.with_suffix(".json").is_file()
    assert f.parent == tmp_path / "working" / "banks" / "clip_text"
    again = C.ClipPrior.for_run(_spec(ckpt), bank, progress=False)
    assert calls == {"encode": 1, "load": 1}  # read back, checkpoint not even loaded
    np.testing.assert_array_equal(again.text_emb, first.text_emb)
    assert again.scale == first.scale

    other = PromptBank(bank.prompts[:-1] + ["a lighthouse at dawn, oil painting"], bank.emb)
    changed = C.ClipPrior.for_run(_spec(ckpt), other, progress=False)
    assert calls["encode"] == 2 and C.cache_path(other.prompts, ckpt, True) != f
    np.testing.assert_allclose(changed.text_emb[:-1], first.text_emb[:-1], atol=1e-5)
    assert not np.allclose(changed.text_emb[-1], first.text_emb[-1])

    ckpt2 = _save_tiny_clip(tmp_path / "other.bin", seed=2)  # another checkpoint, same bank
    assert C.cache_path(bank.prompts, ckpt2, True) != f
    assert not np.allclose(C.ClipPrior.for_run(_spec(ckpt2), bank, progress=False).text_emb, first.text_emb)
    assert calls["encode"] == 3


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails the test; $REVSD_WEIGHTS unset and an empty HF cache."""
    def refuse(*a, **kw):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("REVSD_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_for_run_is_none_unless_a_frozen_clip_run_with_a_local_checkpoint(ckpt, bank, no_network):
    t0 = time.perf_counter()
    assert C.ClipPrior.for_run(_spec(ckpt, mode="finetune"), bank) is None
    assert C.ClipPrior.for_run(_spec(ckpt, backbone="vit_b16"), bank) is None
    assert C.ClipPrior.for_run(_spec(ckpt, backbone="effnet_lite0", tiny=False), bank) is None
    assert C.ClipPrior.for_run(_spec(ckpt, pretrained=False), bank) is None
    assert C.ClipPrior.for_run(None, bank) is None
    assert C.ClipPrior.for_run(_spec(""), bank) is None  # tiny random-init tower: no text tower to match
    assert C.ClipPrior.for_run(_spec(no_network / "missing.bin"), bank) is None
    assert C.ClipPrior.for_run(_spec("", tiny=False), bank) is None  # ViT-H not in $REVSD_WEIGHTS nor HF cache
    broken = no_network / "broken.bin"
    broken.write_bytes(b"not a checkpoint")
    assert C.ClipPrior.for_run(_spec(broken), bank, progress=False) is None
    assert time.perf_counter() - t0 < 10


def test_checkpoint_found_in_weights_root_and_hub_cache_without_network(no_network, monkeypatch):
    from revsd import weights as W

    e = W.MODELS["clip_vit_h14"]
    snap = no_network / "hf" / f"models--{e.hub.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / e.hub_files[1]).write_bytes(b"0")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    assert C.checkpoint_file(_spec("", tiny=False)) == str(snap / e.hub_files[1])
    assert C.checkpoint_file(_spec("", tiny=True)) == ""  # tiny runs never take the real ViT-H
    root = no_network / "weights"
    (root / "clip_vit_h14").mkdir(parents=True)
    (root / "clip_vit_h14" / "open_clip_pytorch_model.bin").write_bytes(b"1")
    monkeypatch.setenv("REVSD_WEIGHTS", str(root))
    assert C.checkpoint_file(_spec("", tiny=False)) == str(root / "clip_vit_h14" / "open_clip_pytorch_model.bin")


def test_image_prior_takes_the_clip_route_for_frozen_clip_runs(ckpt, bank, no_network):
    from revsd import prior

    assert isinstance(prior.ImagePrior.for_run(_spec(ckpt), bank), C.ClipPrior)
    other = prior.ImagePrior.for_run(_spec(ckpt, mode="finetune"), bank)  # fine-tuned CLIP: the classifier route
    assert isinstance(other, prior.ImagePrior) and not other.uses_run_features
