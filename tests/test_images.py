"""Robust image reading: every kind of bad or unusual file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from revsd.images import ImageError, list_images, open_rgb


@pytest.fixture()
def real_jpg(sample_dir):
    return next((sample_dir / "images" / "part-000001").glob("*.jpg"))


def test_real_sample_image_opens_as_rgb(real_jpg):
    im = open_rgb(real_jpg)
    assert im.mode == "RGB" and im.size == (256, 256)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "F", "CMYK"])
def test_unusual_modes_become_rgb(tmp_path, mode):
    arr = (np.arange(32 * 32) % 251).reshape(32, 32)
    if mode == "I;16":
        img = Image.fromarray((arr * 200).astype(np.uint16)).convert("I;16")  # 16-bit grayscale
    elif mode == "F":
        img = Image.fromarray(arr.astype(np.float32), mode="F")
    else:
        img = Image.fromarray(arr.astype(np.uint8), mode="L").convert(mode)
    ext = ".tiff" if mode in ("F", "CMYK") else ".png"
    path = tmp_path / f"x{ext}"
    img.save(path)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (32, 32)
    assert np.asarray(out).std() > 0  # content survives the conversion


def test_transparent_pixels_composite_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.save(tmp_path / "t.png")
    assert np.asarray(open_rgb(tmp_path / "t.png"))[0, 0].tolist() == [255, 255, 255]


def test_bad_files_raise_image_error_naming_the_file(tmp_path, real_jpg):
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(real_jpg.read_bytes()[:2000])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    folder = tmp_path / "dir.png"
    folder.mkdir()
    for path, why in [(trunc, "corrupt or truncated"), (text, "not a readable image"),
                      (folder, "is a directory"), (tmp_path / "missing.png", "file not found")]:
        with pytest.raises(ImageError, match=why) as e:
            open_rgb(path)
        assert str(path) in str(e.value)


def test_decompression_bomb_guard(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="pixel limit"):
        open_rgb(tmp_path / "big.png", max_pixels=200 * 200)


def test_list_images_expands_folders(tmp_path, real_jpg):
    (tmp_path / "sub").mkdir()
    for p in [tmp_path / "a.jpg", tmp_path / "sub" / "b.png"]:
        p.write_bytes(b"x")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "z.png").symlink_to(tmp_path / "gone.png")  # dangling: listed, so that it gets reported
    assert [p.name for p in list_images([tmp_path])] == ["a.jpg", "z.png"]
    found = [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path], recursive=True)]
    assert found == ["a.jpg", "sub/b.png", "z.png"]
    assert list_images([real_jpg]) == [real_jpg]
