"""Local weights for every model: tiny random-init models saved in each library's own format to a temporary folder
and loaded back through the config / $REVSD_WEIGHTS (same tensors); the resolution order; ``revsd weights``."""

from __future__ import annotations

import json

import pytest
import torch

from revsd import weights as W
from revsd.weightscheck import main as weights_main


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _perturb(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every float tensor away from any seeded init, so equal tensors prove the file was read."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g))
    return module


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv(W.ENV, str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


# --- resolution order -----------------------------------------------------------------------------------------

def test_explicit_then_root_then_hub(root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    hub = W.locate("vit_b16")
    assert (hub.where, hub.found, hub.local, hub.source) == ("hub (not cached)", False, False, W.MODELS["vit_b16"].hub)
    assert "vit_b16/model.safetensors" in hub.hint and "weights=" in hub.hint

    (root / "vit_b16").mkdir()
    (root / "vit_b16" / "model.safetensors").write_bytes(b"x" * 10)
    src = W.locate("vit_b16")
    assert (src.where, src.found, src.source, src.size_bytes) == ("$REVSD_WEIGHTS", True,
                                                                  str(root / "vit_b16" / "model.safetensors"), 10)
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"y" * 3)
    assert W.locate("vit_b16", mine).source == str(mine)  # an explicit path wins
    missing = W.locate("vit_b16", tmp_path / "nope.pth")
    assert missing.local and not missing.found
    with pytest.raises(FileNotFoundError, match="nope.pth not found; the path does not exist: fix weights="):
        missing.require()


def test_file_next_to_the_root_and_ambiguous_folder(root):
    (root / "swin_l.safetensors").write_bytes(b"z")
    assert W.locate("swin_l").source == str(root / "swin_l.safetensors")
    (root / "clip_vit_h14").mkdir()
    for name in ("a.bin", "b.pt"):
        (root / "clip_vit_h14" / name).write_bytes(b"0")
    with pytest.raises(ValueError, match="2 checkpoint files .*keep exactly one"):
        W.locate("clip_vit_h14")
    (root / "clip_vit_h14" / "open_clip_pytorch_model.bin").write_bytes(b"0")  # the library's own name wins
    assert W.locate("clip_vit_h14").source.endswith("open_clip_pytorch_model.bin")


def test_hub_cache_is_checked_offline(tmp_path, monkeypatch):
    """A snapshot in the HF cache layout (what huggingface-cli download leaves) counts as found, no download."""
    monkeypatch.delenv(W.ENV, raising=False)
    cache = tmp_path / "hf"
    repo = cache / "models--Salesforce--blip-image-captioning-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"w" * 42)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    src = W.locate("blip")
    assert (src.where, src.found, src.size_bytes, src.local) == ("hub (cached)", True, 42, False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other"))
    assert W.locate("blip").where == "hub (not cached)"
    # another repo than the default has its own folder name under the root and its own cache entry
    other = W.locate("blip", hub="Salesforce/blip-image-captioning-large")
    assert other.source == "Salesforce/blip-image-captioning-large"
    assert "blip-image-captioning-large/" in other.hint


def test_packaged_models(monkeypatch):
    monkeypatch.delenv(W.ENV, raising=False)
    for name in ("effnet_lite0", "effnet_lite2", "minilm"):
        src = W.locate(name)
        assert (src.where, src.found, src.local) == ("packaged", True, True) and src.size_bytes > 1_000_000


def test_hub_ids_agree_with_the_model_code():
    import open_clip

    from revsd import captions, sd_parts, textenc
    from revsd.backbones import REGISTRY

    for name in ("vit_b16", "swin_l"):
        assert W.MODELS[name].hub == REGISTRY[name].pretrained_tag
    spec = REGISTRY["clip_vit_h14"]
    hf_hub = open_clip.get_pretrained_cfg(spec.hub_id, spec.pretrained_tag)["hf_hub"]
    assert hf_hub.rstrip("/") == W.MODELS["clip_vit_h14"].hub
    assert {W.MODELS[m].hub for m in ("unet", "vae", "text_encoder", "tokenizer")} == {sd_parts.SD_MODEL_ID}
    assert W.MODELS["blip"].hub == captions.BLIP_ID and W.MODELS["minilm"].hub == textenc.DEFAULT_MODEL


# --- each library's format, loaded back through the config ---------------------------------------------------

def test_open_clip_checkpoint_file(root):
    import open_clip

    from revsd.backbones import TINY_CLIP, create_backbone

    model = _perturb(open_clip.create_model("ViT-H-14", **TINY_CLIP))
    (root / "clip_vit_h14").mkdir()
    torch.save(model.state_dict(), root / "clip_vit_h14" / "open_clip_pytorch_model.bin")
    bb = create_backbone("clip_vit_h14", tiny=True, weights=str(root / "clip_vit_h14"))
    assert _same(bb.net.state_dict(), model.visual.state_dict())


@pytest.mark.parametrize("name", ["vit_b16", "swin_l"])
def test_timm_checkpoint_file(root, name):
    from safetensors.torch import save_file

    from revsd.backbones import create_backbone

    net = _perturb(create_backbone(name, pretrained=False, tiny=True).net)
    (root / name).mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / name / "model.safetensors"))
    bb = create_backbone(name, tiny=True, weights=str(root / name))
    assert _same(bb.net.state_dict(), net.state_dict())


def _save_sd(folder, seed=1) -> dict:
    from revsd.sd_parts import tiny_sd_parts

    parts = tiny_sd_parts(seed=seed)
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    return parts


def test_diffusers_sd_folder(root, tmp_path):
    from revsd import sd_parts, unet_encoder as ue

    parts = _save_sd(root / "stable-diffusion-v1-4")  # found through $REVSD_WEIGHTS
    loaded = sd_parts.load_sd_parts()
    for name in ("unet", "vae", "text_encoder"):
        assert _same(loaded[name].state_dict(), parts[name].state_dict()), name
    assert loaded["tokenizer"]("a cat").input_ids == parts["tokenizer"]("a cat").input_ids

    other = _save_sd(tmp_path / "my-sd", seed=2)  # explicit folder (sd_weights / weights=) wins over the root
    enc = ue.build_unet_encoder(weights=str(tmp_path / "my-sd"), latent_cache=False)
    assert torch.equal(enc.unet.conv_in.weight, other["unet"].conv_in.weight)
    assert torch.equal(enc.vae_encoder.conv_in.weight, other["vae"].encoder.conv_in.weight)
    assert not torch.equal(enc.unet.conv_in.weight, parts["unet"].conv_in.weight)

    from revsd.backbones import create_backbone  # the training config's weights= for unet_enc: the same folder
    bb = create_backbone("unet_enc", pretrained=True, weights=str(tmp_path / "my-sd"))
    assert bb.weights == str(tmp_path / "my-sd")
    assert torch.equal(bb.net.unet.conv_in.weight, other["unet"].conv_in.weight)


def test_transformers_blip_folder(root, sample_dir, tmp_path):
    from revsd.captions import Captioner, tiny_blip
    from revsd.images import open_rgb

    proc, model = tiny_blip(seed=3)
    _perturb(model)
    model.save_pretrained(root / "blip-image-captioning-base")
    proc.save_pretrained(root / "blip-image-captioning-base")
    cap = Captioner(cache_dir=tmp_path)  # not tiny: BLIP from $REVSD_WEIGHTS
    files = sorted((sample_dir / "images").rglob("*.jpg"))[:2]
    got = cap.captions([f.stem for f in files], files)
    assert _same(cap._blip[1].state_dict(), model.state_dict())
    with torch.inference_mode():
        pix = proc(images=[open_rgb(f) for f in files], return_tensors="pt").pixel_values
        ids = model.generate(pixel_values=pix, max_new_tokens=30)
    assert got == [c.strip() for c in proc.batch_decode(ids, skip_special_tokens=True)]


def test_sentence_transformers_minilm_folder(root):
    """A tiny MiniLM-shaped model saved as a sentence-transformers folder replaces the packaged one for model=""."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from revsd import textenc

    packaged = W.locate("minilm").source
    bert_dir = root.parent / "bert"
    tok = BertTokenizerFast.from_pretrained(packaged)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    word = Transformer(str(bert_dir))
    st = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension())])
    folder = root / "all-MiniLM-L6-v2"
    st.save(str(folder))
    assert W.locate("minilm").source == str(folder)
    emb = textenc.encode_prompts(["a castle at night"], device="cpu")
    assert emb.shape == (1, 32)
    ref = SentenceTransformer(str(folder), device="cpu").encode(["a castle at night"], normalize_embeddings=True)
    assert torch.allclose(torch.from_numpy(emb), torch.from_numpy(ref), atol=1e-6)


# --- revsd weights --------------------------------------------------------------------------------------------

PAPER_MODELS = {"clip_vit_h14", "vit_b16", "swin_l", "unet", "vae", "text_encoder", "blip", "minilm"}


def test_weights_json_lists_every_paper_model(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert weights_main(["--profile", "paper", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert PAPER_MODELS <= {r["model"] for r in rows}
    assert all({"model", "source", "found", "where", "size_bytes", "steps"} <= r.keys() for r in rows)
    by = {r["model"]: r for r in rows}
    assert not by["clip_vit_h14"]["found"] and by["clip_vit_h14"]["where"] == "hub (not cached)"
    assert by["minilm"]["found"] and by["minilm"]["where"] == "packaged"
    assert any(s.startswith("03_train") for s in by["unet"]["steps"])

    assert weights_main(["--profile", "paper", "--check"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len([r for r in rows if not r["found"]]) and all(line.startswith("missing: ") for line in err)
    assert any(f"{root}/clip_vit_h14/" in line for line in err)


def test_weights_check_passes_when_the_root_holds_everything(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    for name in ("clip_vit_h14", "vit_b16", "swin_l"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"0")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (root / "stable-diffusion-v1-4" / part).mkdir(parents=True)
    (root / "blip-image-captioning-base").mkdir()
    assert weights_main(["--profile", "paper", "--check"]) == 0
    table = capsys.readouterr().out
    assert "NO" not in table and "$REVSD_WEIGHTS" in table
    # the demo profile needs only packaged weights
    assert weights_main(["--profile", "demo", "--check"]) == 0
    assert {"effnet_lite0", "minilm"} <= {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
