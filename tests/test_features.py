import shutil

import numpy as np
import pytest
import torch

from revsd import features, transforms
from revsd.backbones import create_backbone
from revsd.transforms import Preprocess


@pytest.fixture()
def images(sample_dir, tmp_path):
    """Four real sample images plus one corrupt file, copied so their mtimes can change."""
    src = sorted((sample_dir / "images" / "part-000001").glob("*.jpg"))[:4]
    out = []
    for p in src:
        shutil.copy(p, tmp_path / p.name)
        out.append(tmp_path / p.name)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(src[0].read_bytes()[:300])  # truncated JPEG
    out.insert(2, bad)
    return out


def test_extract_reports_bad_images_and_caches(images, monkeypatch, tmp_path):
    monkeypatch.setenv("REVSD_WORKING", str(tmp_path / "w"))
    ids = [p.stem for p in images]
    fs = features.extract("effnet_lite0", ids, images, tiny=True, batch_size=2, progress=False)
    assert fs.ids.tolist() == ids and fs.feats.shape == (5, 1280)
    assert fs.valid.tolist() == [True, True, False, True, True]
    assert list(fs.errors) == ["broken"] and "broken.jpg" in fs.errors["broken"]
    assert not fs.feats[2].any() and np.abs(fs.feats[fs.valid]).sum(1).min() > 0
    # features match a direct, uncached forward pass of the same preprocessing
    bb = create_backbone("effnet_lite0", tiny=True).eval()
    with torch.no_grad():
        direct = bb(transforms.to_batch([transforms.load_array(images[0], bb.preprocess)], (0.5,) * 3, (0.5,) * 3,
                                        channels_last=False)).numpy()
    np.testing.assert_allclose(fs.feats[0], direct[0], rtol=1e-3, atol=1e-4)
    cache = features.cache_dir("effnet_lite0", tiny=True)
    assert len(list(cache.glob("shard-*.npz"))) == 1 and not list(cache.glob("*.tmp*"))

    # a rerun reads the cache only (no model is built); a reordered subset comes back in the asked order
    monkeypatch.setattr(features, "create_backbone", lambda *a, **k: pytest.fail("cache miss"))
    again = features.extract("effnet_lite0", ids[::-1], images[::-1], tiny=True, progress=False)
    np.testing.assert_array_equal(again.feats, fs.feats[::-1])
    assert again.valid.tolist() == fs.valid[::-1].tolist()


def test_changed_file_is_recomputed(images, monkeypatch, tmp_path):
    monkeypatch.setenv("REVSD_WORKING", str(tmp_path / "w"))
    ids = [p.stem for p in images]
    features.extract("effnet_lite0", ids, images, tiny=True, progress=False)
    shutil.copy(images[1], images[0])  # same id, new content (size/mtime change)
    fs = features.extract("effnet_lite0", ids, images, tiny=True, progress=False)
    np.testing.assert_allclose(fs.feats[0], fs.feats[1], rtol=1e-5, atol=1e-6)
    assert len(list(features.cache_dir("effnet_lite0", tiny=True).glob("shard-*.npz"))) == 2


def test_preprocessing_resizes_and_centre_crops():
    from PIL import Image

    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 100, 100))  # left third blue: cropped away
    arr = transforms.pil_to_array(img, Preprocess(64))
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert arr[:, :, 0].min() > 200 and arr[:, :, 2].max() < 60
    x = transforms.to_batch([arr], (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (1, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    assert float(x[0, 0].mean()) == pytest.approx(1.0, abs=0.05)


def test_squash_keeps_the_whole_picture_and_crop_pct_zooms_in():
    from PIL import Image

    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 100, 100))  # left third blue
    squashed = transforms.pil_to_array(img, Preprocess(60, resize_mode="squash"))
    assert squashed.shape == (60, 60, 3)
    blue = squashed[:, :, 2].mean(0) > 200  # columns that are blue: the left third survives a squash
    assert 15 <= blue.sum() <= 25 and blue[:15].all() and not blue[25:].any()
    # crop_pct 0.5 on a centred square: the centre half of the shorter side fills the output
    sq = Image.new("RGB", (100, 100), (0, 0, 0))
    sq.paste((255, 255, 255), (25, 25, 75, 75))
    zoomed = transforms.pil_to_array(sq, Preprocess(40, crop_pct=0.5))
    assert zoomed.shape == (40, 40, 3) and zoomed[2:-2, 2:-2].min() > 240
    with pytest.raises(ValueError, match="resize_mode"):
        Preprocess(32, resize_mode="stretch")


def test_cache_refuses_features_of_other_preprocessing(images, monkeypatch, tmp_path):
    from revsd import artifacts

    monkeypatch.setenv("REVSD_WORKING", str(tmp_path / "w"))
    ids = [p.stem for p in images]
    features.extract("effnet_lite0", ids[:2], images[:2], tiny=True, progress=False)
    meta = features.cache_dir("effnet_lite0", tiny=True) / "meta.json"
    saved = artifacts.read_json(meta)
    assert saved["preprocess"]["resize_mode"] == "shorter_crop" and saved["preprocess"]["input_size"] == 32
    artifacts.write_json(meta, {**saved, "preprocess": {**saved["preprocess"], "resize_mode": "squash"}})
    with pytest.raises(ValueError, match="other preprocessing"):
        features.extract("effnet_lite0", ids, images, tiny=True, progress=False)
