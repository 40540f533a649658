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
    from revsd.features import load_array, to_batch

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    model = load_packaged_effnet(timm.create_model("tf_efficientnet_lite0", pretrained=False), "lite0").eval()
    with torch.inference_mode():
        probs = model(to_batch([load_array(path, 224)], HALF, HALF)).softmax(-1)[0]
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
