import shutil

import numpy as np
import pytest
import torch

from revsd import features
from revsd.backbones import create_backbone


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
        direct = bb(features.to_batch([features.load_array(images[0], bb.image_size)], (0.5,) * 3, (0.5,) * 3,
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
    arr = features.pil_to_array(img, 64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert arr[:, :, 0].min() > 200 and arr[:, :, 2].max() < 60
    x = features.to_batch([arr], (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (1, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    assert float(x[0, 0].mean()) == pytest.approx(1.0, abs=0.05)
