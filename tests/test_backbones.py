import os

import pytest
import torch

from revsd.backbones import REGISTRY, create_backbone, get_spec
from revsd.heads import PromptHead, RevSDModel


def test_registry_has_the_paper_backbones_and_offline_default():
    assert {"clip_vit_h14", "vit_b16", "swin_l", "unet_enc", "effnet_lite0", "effnet_lite2"} <= set(REGISTRY)
    assert REGISTRY["unet_enc"].needs_context and REGISTRY["unet_enc"].context_fn is not None
    with pytest.raises(KeyError, match="registered"):
        get_spec("resnet9000")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_tiny_forward_backward(name, tmp_path, monkeypatch):
    """Every registry entry builds offline as a tiny random-init model; a head trains on top of it."""
    monkeypatch.setenv("REVSD_WORKING", str(tmp_path))  # caption cache of unet_enc
    torch.manual_seed(0)
    bb = create_backbone(name, pretrained=False, tiny=True)
    s = bb.image_size
    x = torch.randn(2, 3, s, s)
    ctx = None
    if bb.spec.needs_context:
        img = os.path.join(os.path.dirname(__file__), "..", "input", "sample", "images", "part-000001")
        files = sorted(os.listdir(img))[:2]
        ctx = bb.spec.context_fn([f[:-4] for f in files], [os.path.join(img, f) for f in files], tiny=True)
    feats = bb(x, ctx)
    assert feats.shape == (2, bb.feature_dim)
    model = RevSDModel(PromptHead(bb.feature_dim, 384, 5, "concat", hidden=16), bb, lam=1.0)
    out = model(x, ctx, targets=torch.randn(2, 384), labels=torch.ones(2, 5))
    out["loss"].backward()
    grads = [p.grad for p in bb.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_tiny_models_are_deterministic():
    a, b = create_backbone("vit_b16", tiny=True), create_backbone("vit_b16", tiny=True)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_packaged_effnet_weights_classify_a_known_picture():
    """The packaged .pth loads in order into timm's tf_efficientnet_lite0 and predicts ImageNet classes: Grace
    Hopper's portrait (shipped with matplotlib) is a 'military uniform' (class 652)."""
    import matplotlib
    import timm

    from revsd.backbones import HALF, load_packaged_effnet
    from revsd.transforms import load_array, to_batch

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    model = load_packaged_effnet(timm.create_model("tf_efficientnet_lite0", pretrained=False), "lite0").eval()
    with torch.inference_mode():
        probs = model(to_batch([load_array(path, get_spec("effnet_lite0").preprocess)], HALF, HALF)).softmax(-1)[0]
    assert int(probs.argmax()) == 652 and float(probs.max()) > 0.2
    bb = create_backbone("effnet_lite0")  # registry path: classifier dropped, same trunk weights
    assert bb.feature_dim == 1280
    assert torch.equal(bb.net.conv_stem.weight, model.conv_stem.weight)


def test_hub_weights_are_announced_and_fail_clearly_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load pretrained weights.*effnet_lite0"):
        create_backbone("vit_b16", pretrained=True)
    assert "through the hub" in capsys.readouterr().out
    create_backbone("effnet_lite0", pretrained=True)  # packaged weights: no hub, no announcement
    assert "through the hub" not in capsys.readouterr().out


def test_specs_carry_their_preprocessing_and_weights_source():
    for spec in REGISTRY.values():
        pp = spec.preprocessing(tiny=True)
        assert pp.input_size == spec.tiny_image_size and pp.mean == spec.preprocess.mean
        assert spec.packaged != spec.loads_file or spec.name == "unet_enc"
    assert REGISTRY["effnet_lite2"].preprocess.input_size == 260 and REGISTRY["effnet_lite0"].packaged
    assert REGISTRY["clip_vit_h14"].preprocess.mean != REGISTRY["vit_b16"].preprocess.mean


def test_local_timm_checkpoint_file_is_loaded(tmp_path, capsys):
    """A timm-format checkpoint saved here (tiny ViT, classifier included) loads through timm's own file path."""
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("vit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.nn.init.normal_(src.patch_embed.proj.weight)  # not what a seeded random init gives
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(file))
    bb = create_backbone("vit_b16", pretrained=True, tiny=True, weights=str(file))
    assert "from " + str(file) in capsys.readouterr().out
    theirs = src.state_dict()
    for k, v in bb.net.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    assert not torch.equal(create_backbone("vit_b16", tiny=True).net.patch_embed.proj.weight,
                           src.patch_embed.proj.weight)


def test_local_open_clip_checkpoint_file_is_loaded(tmp_path):
    """An open_clip checkpoint (a whole tiny CLIP, as open_clip saves it) loads its image tower."""
    import open_clip

    from revsd.backbones import TINY_CLIP

    src = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_CLIP)
    file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(src.state_dict(), file)
    bb = create_backbone("clip_vit_h14", pretrained=True, tiny=True, weights=str(file))
    theirs = src.visual.state_dict()
    assert bb.feature_dim == 32
    for k, v in bb.net.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_bad_weights_settings_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file .*missing.bin not found"):
        create_backbone("vit_b16", pretrained=True, tiny=True, weights=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="does not load a local weights file"):
        create_backbone("effnet_lite0", weights=str(tmp_path / "x.pth"))


def test_weights_root_is_consulted_for_hub_backed_entries(tmp_path, monkeypatch):
    """$REVSD_WEIGHTS/<name>/... is found through revsd.weights.locate; packaged and tiny entries never look."""
    from revsd.backbones import local_weights

    monkeypatch.delenv("REVSD_WEIGHTS", raising=False)
    assert local_weights(get_spec("vit_b16")) == ""  # nothing local: the hub
    (tmp_path / "vit_b16").mkdir()
    (tmp_path / "vit_b16" / "model.safetensors").write_bytes(b"x")
    monkeypatch.setenv("REVSD_WEIGHTS", str(tmp_path))
    assert local_weights(get_spec("vit_b16")) == str(tmp_path / "vit_b16" / "model.safetensors")
    assert local_weights(get_spec("effnet_lite0")) == ""
