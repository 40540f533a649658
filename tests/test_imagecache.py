"""Image cache: byte-identical to decoding on the fly, incremental by file key, bad images kept and reported."""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from revsd import imagecache
from revsd.images import open_rgb
from revsd.transforms import Preprocess, pil_to_array

SAMPLE = Path(__file__).resolve().parents[1] / "input" / "sample" / "images"
PP = Preprocess(input_size=48, interpolation="bicubic", crop_pct=0.9)
SHAPE = (48, 48, 3)
prep = partial(pil_to_array, pp=PP)


def _build(directory, ids, paths, **kw):
    return imagecache.build(directory, ids, paths, prep, "pp48", SHAPE, progress=False, **kw)


@pytest.fixture()
def images(tmp_path):
    files = sorted(SAMPLE.glob("*/*.jpg"))[:10]
    out = []
    for f in files:
        dst = tmp_path / "img" / f.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(f, dst)
        out.append(dst)
    return [p.stem for p in out], out


def test_cache_equals_decoding_on_the_fly_and_is_reused(tmp_path, images):
    ids, paths = images
    cache = _build(tmp_path / "c", ids, paths, shard_size=4)
    assert len(cache) == 10 and len(cache.shards) == 3 and cache.valid.all()
    rows = cache.rows(ids, paths)
    for row, path in zip(rows, paths):
        arr, valid, err = cache[row]
        assert valid and err == "" and arr.dtype == np.uint8
        np.testing.assert_array_equal(arr, prep(open_rgb(path)))  # byte-identical
    again = _build(tmp_path / "c", ids[::-1], paths[::-1])
    assert again.shards == cache.shards  # nothing new to decode
    with pytest.raises(ValueError, match="preprocessed as pp48"):
        imagecache.build(tmp_path / "c", ids, paths, prep, "other", SHAPE, progress=False)


def test_edited_file_is_decoded_again(tmp_path, images):
    ids, paths = images
    cache = _build(tmp_path / "c", ids, paths)
    old = cache[cache.rows(ids[:1], paths[:1])[0]][0]
    shutil.copy(paths[1], paths[0])  # new content, new size/mtime
    os.utime(paths[0], ns=(1, 1))
    with pytest.raises(KeyError, match="not in the image cache"):
        cache.rows(ids[:1], paths[:1])
    cache = _build(tmp_path / "c", ids, paths)
    assert len(cache.shards) == 2 and len(cache) == 11  # one new shard with the one edited image
    new = cache[cache.rows(ids[:1], paths[:1])[0]][0]
    np.testing.assert_array_equal(new, prep(open_rgb(paths[1])))
    assert not np.array_equal(new, old)


def test_bad_images_are_kept_invalid_with_their_reason(tmp_path, images):
    ids, paths = images
    bad = tmp_path / "img" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ids, paths = ids[:3] + ["broken", "gone"], paths[:3] + [bad, tmp_path / "img" / "gone.png"]
    cache = _build(tmp_path / "c", ids, paths)
    rows = cache.rows(ids, paths)
    assert cache.valid[rows].tolist() == [True, True, True, False, False]
    arr, valid, err = cache[rows[3]]
    assert not valid and not arr.any() and "broken.jpg" in err
    assert "gone.png" in cache[rows[4]][2] and "not found" in cache[rows[4]][2]


def test_loader_yields_the_cached_pixels_in_order_from_worker_processes(tmp_path, images):
    ids, paths = images
    cache = _build(tmp_path / "c", ids, paths, shard_size=3)
    rows = cache.rows(ids, paths)[::-1]
    loader = imagecache.create_loader(cache, rows, batch_size=4, num_workers=2)
    got = [(p.numpy(), v.numpy(), i.numpy()) for p, v, i in loader]
    pixels = np.concatenate([g[0] for g in got])
    np.testing.assert_array_equal(pixels, np.stack([cache[r][0] for r in rows]))
    assert np.concatenate([g[1] for g in got]).all()
    assert np.concatenate([g[2] for g in got]).tolist() == list(range(10))
    shuffled = imagecache.create_loader(cache, rows, batch_size=4, shuffle=True, seed=1, num_workers=0)
    order = np.concatenate([i.numpy() for _, _, i in shuffled])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
