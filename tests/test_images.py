"""Robust image reading: every kind of bad or unusual file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from revsd.images import ImageError, list_images, open_rgb, scan_images


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


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp"])
def test_min_side_decodes_no_larger_than_needed(tmp_path, ext):
    big = Image.fromarray(np.kron(np.asarray(_noise(40, 30)), np.ones((50, 50, 1), np.uint8)))  # 2000x1500 blocks
    path = tmp_path / f"big{ext}"
    big.save(path, quality=95) if ext != ".png" else big.save(path)
    full = open_rgb(path)
    small = open_rgb(path, min_side=100)
    assert full.size == (2000, 1500)
    assert 300 <= min(small.size) < 750 and small.size[0] / small.size[1] == pytest.approx(4 / 3, rel=0.01)
    same = np.asarray(full.resize(small.size, Image.BOX), np.float32)
    assert np.abs(np.asarray(small, np.float32) - same).mean() < 6  # the same picture, only smaller


def test_min_side_leaves_small_images_alone(real_jpg):
    assert np.array_equal(np.asarray(open_rgb(real_jpg, min_side=260)), np.asarray(open_rgb(real_jpg)))


def test_shrinking_keeps_transparent_colour_out(tmp_path):
    arr = np.zeros((600, 600, 4), np.uint8)
    arr[1::2, :, 0] = 255  # odd rows: invisible red
    arr[::2, :, 2], arr[::2, :, 3] = 255, 255  # even rows: opaque blue
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    px = np.asarray(open_rgb(tmp_path / "t.png", min_side=50), np.float32).reshape(-1, 3).mean(0)
    assert px[0] == pytest.approx(px[1], abs=2) == pytest.approx(255 / 2, abs=3)  # blue and white only, no red


def test_decompression_bomb_guard_holds_with_min_side(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="pixel limit"):
        open_rgb(tmp_path / "big.png", max_pixels=200 * 200, min_side=10)


def test_symlink_loops_and_dangling_links_say_so(tmp_path):
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(ImageError, match="symlink loop"):
        open_rgb(tmp_path / "self.png")
    with pytest.raises(ImageError, match="dangling symlink"):
        open_rgb(tmp_path / "gone.png")


def test_scan_follows_symlinked_folders_once_and_names_skips(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "deep" / "x.png").write_bytes(b"x")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "to_a").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "top" / "again").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "up").symlink_to(tmp_path / "top", target_is_directory=True)  # a loop
    (tmp_path / "top" / "readme.txt").write_text("x")
    files, skipped = scan_images([tmp_path / "top"], recursive=True)
    assert [p.name for p in files] == ["x.png"]
    why = {p.relative_to(tmp_path).as_posix(): w for p, w in skipped}
    assert why["top/readme.txt"] == "not an image file extension"
    assert sum("already listed" in w for w in why.values()) == 2  # the second link to a/, and a/up -> top
    files, skipped = scan_images([tmp_path / "top"])
    assert files == [] and {w for _, w in skipped} >= {"sub-folder (--recursive descends into it)"}


def test_image_key_changes_when_the_file_does(tmp_path):
    """The one key of every per-image cache (features, pixels, captions, latents)."""
    import os

    from revsd.images import image_key

    f = tmp_path / "a.png"
    f.write_bytes(b"12345")
    k = image_key("a", f)
    assert k.startswith("a|5|") and image_key("a", f) == k
    os.utime(f, ns=(0, 1))
    assert image_key("a", f) != k
    assert image_key("x", tmp_path / "nope.png") == "x|missing"


def test_cached_features_of_an_older_decoding_are_computed_again(sample_dir, monkeypatch, tmp_path):
    """Caches keyed before a decoding change (EXIF orientation) are not reused: the file now gives other pixels."""
    import shutil

    from revsd import features, images

    monkeypatch.setenv("REVSD_WORKING", str(tmp_path / "w"))
    f = tmp_path / "a.jpg"
    shutil.copy(sorted((sample_dir / "images" / "part-000001").glob("*.jpg"))[0], f)
    monkeypatch.setattr(images, "DECODE_VERSION", 1)
    old = images.image_key("a", f)
    features.extract("effnet_lite0", ["a"], [f], tiny=True, progress=False)
    monkeypatch.setattr(images, "DECODE_VERSION", 2)
    assert images.image_key("a", f) != old and images.image_key("a", f).endswith("|d2")
    features.extract("effnet_lite0", ["a"], [f], tiny=True, progress=False)
    shards = list(features.cache_dir("effnet_lite0", tiny=True).glob("shard-*.npz"))
    assert len(shards) == 2  # extracted again under the new key, the old shard left as it was


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_shows_the_image_upright(tmp_path, real_jpg, orientation):
    """A camera or editor that stores pixels sideways with an EXIF Orientation tag: the model sees what a viewer
    shows (PIL's ``ImageOps.exif_transpose``), at full size and through the shrinking decode path."""
    from PIL import ImageOps

    stored = Image.open(real_jpg).convert("RGB").crop((0, 0, 256, 160))  # not square: a turn changes the size
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"  # lossless, so pixels compare exactly
    stored.save(path, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert upright.size == ((160, 256) if orientation >= 5 else (256, 160))
    assert np.array_equal(np.asarray(open_rgb(path)), np.asarray(upright))
    small = open_rgb(path, min_side=20)  # decoded at a quarter: shorter side ≥ 3 × 20
    assert small.size == (upright.size[0] // 2, upright.size[1] // 2)
    same = np.asarray(upright.resize(small.size, Image.BOX), np.float32)
    assert np.abs(np.asarray(small, np.float32) - same).mean() < 2


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own, at open
def test_malformed_exif_keeps_the_stored_pixels(tmp_path, real_jpg):
    path = tmp_path / "bad_exif.jpg"
    Image.open(real_jpg).save(path, exif=b"Exif\x00\x00MM\x00*garbage")
    assert open_rgb(path).size == (256, 256)


def test_avif_files_are_listed_and_read_when_pillow_can(tmp_path, real_jpg):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    Image.open(real_jpg).save(tmp_path / "a.avif")
    assert list_images([tmp_path]) == [tmp_path / "a.avif"]
    assert open_rgb(tmp_path / "a.avif").size == (256, 256)


def _profile(name: str) -> bytes:
    """The embedded colour profile of one of scikit-image's sample photos (real profiles shipped in a package)."""
    import skimage.data

    with Image.open(Path(skimage.data.__file__).parent / name) as im:
        return im.info["icc_profile"]


def _saturation(a: np.ndarray) -> float:
    a = a.astype(float)
    return float((a.max(-1) - a.min(-1)).mean())


def test_embedded_colour_profiles_come_out_in_srgb(tmp_path):
    """Adobe RGB pixels are wider-gamut than the same numbers in sRGB: converted, they come out more saturated.
    An sRGB profile, no profile or a malformed one keeps the stored pixels."""
    yy, xx = np.mgrid[0:32, 0:64]
    smooth = np.stack([40 + 2.75 * xx, 40 + 5.5 * yy, np.full_like(xx, 100.0)], -1)  # saturated, smooth colours
    px = np.concatenate([smooth, np.full((32, 64, 3), 128.0)]).round().astype(np.uint8)
    adobe, srgb = _profile("rocket.jpg"), _profile("astronaut.png")  # "Adobe RGB (1998)", "sRGB IEC61966-2.1"
    files = {}
    for name, icc in (("adobe", adobe), ("srgb", srgb), ("none", None), ("broken", b"not a profile" * 20)):
        files[name] = tmp_path / f"{name}.png"
        Image.fromarray(px).save(files[name], **({"icc_profile": icc} if icc else {}))
    out = {k: np.asarray(open_rgb(f)) for k, f in files.items()}
    for k in ("srgb", "none", "broken"):
        np.testing.assert_array_equal(out[k], px)
    assert _saturation(out["adobe"][:32]) > 1.15 * _saturation(px[:32])
    grey = out["adobe"][32:].astype(int)  # a neutral grey stays neutral (both white points are D65)
    assert np.abs(grey - grey.mean(-1, keepdims=True)).max() <= 2 and abs(grey.mean() - 128) <= 6
    # min_side reduces first, then converts: the same colours as converting the full image and reducing
    small = np.asarray(open_rgb(files["adobe"], min_side=4)).astype(int)
    full = np.asarray(Image.fromarray(out["adobe"]).reduce(5)).astype(int)
    assert small.shape == full.shape and np.abs(small - full).mean() < 2


def test_grey_and_transparent_images_with_profiles(tmp_path):
    """A grey image with a print profile (scikit-image's page.png, "Dot Gain 20%") stays grey; RGBA with a
    profile keeps its transparency (composited on white)."""
    import skimage.data

    page = Path(skimage.data.__file__).parent / "page.png"
    with Image.open(page) as im:
        stored = np.asarray(im.convert("L")).astype(int)
    got = np.asarray(open_rgb(page)).astype(int)
    assert np.abs(got - got.mean(-1, keepdims=True)).max() <= 1  # still grey
    assert np.abs(got[..., 0] - stored).mean() > 2  # and the profile was applied
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8] = (200, 60, 60, 255)  # opaque top half, fully transparent bottom half
    f = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(f, icc_profile=_profile("rocket.jpg"))
    out = np.asarray(open_rgb(f)).astype(int)
    assert (out[8:] == 255).all() and _saturation(out[:8]) > _saturation(rgba[:8, :, :3])
