"""Metadata hidden in the alpha channel (NovelAI, A1111's stealth-pnginfo), on a real sample image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_metadata import A1111, A1111_PROMPT, NOVELAI_COMMENT

from revsd import metadata, stealth

NOVELAI = {"Title": "NovelAI generated image", "Description": "1girl, silver hair, night city",
           "Software": "NovelAI", "Source": "NovelAI Diffusion V3 7BCCAA2C", "Comment": json.dumps(NOVELAI_COMMENT)}


@pytest.fixture()
def photo(sample_dir) -> Image.Image:
    with Image.open(next((sample_dir / "images" / "part-000001").glob("*.jpg"))) as im:
        return im.convert("RGBA")


@pytest.mark.parametrize("compressed", [True, False])
def test_round_trip_changes_only_alpha_low_bits(photo, compressed):
    hidden = stealth.write(photo, A1111, compressed)
    assert stealth.read(hidden) == A1111
    before, after = np.asarray(photo).astype(int), np.asarray(hidden).astype(int)
    assert (before[..., :3] == after[..., :3]).all() and np.abs(before[..., 3] - after[..., 3]).max() <= 1


def test_reads_what_the_extensions_pixel_loop_writes(photo):
    """An independent writer, pixel by pixel as the stealth-pnginfo extension lays the bits out (alpha set to 255
    first, then x outer, y inner, MSB first, a 32-bit length in bits, gzip): guards against a bug that
    ``stealth.write`` and ``stealth.read`` would share."""
    import gzip

    im = photo.resize((64, 48))
    im.putalpha(255)
    payload = gzip.compress(A1111.encode())
    bits = "".join(format(b, "08b") for b in b"stealth_pngcomp" + (8 * len(payload)).to_bytes(4, "big") + payload)
    px, i = im.load(), 0
    for x in range(im.width):
        for y in range(im.height):
            if i < len(bits):
                r, g, b, a = px[x, y]
                px[x, y] = (r, g, b, (a & ~1) | int(bits[i]))
                i += 1
    assert i == len(bits) and stealth.read(im) == A1111


def test_novelai_and_a1111_files_without_text_chunks(photo, tmp_path):
    stealth.write(photo, json.dumps(NOVELAI)).save(tmp_path / "nai.png")
    r = metadata.read(tmp_path / "nai.png")
    assert r.warning is None
    assert r.info == {"prompt": "1girl, silver hair, night city", "negative_prompt": "lowres, bad hands",
                      "model": "NovelAI Diffusion V3", "seed": 2210, "steps": 28, "sampler": "k_euler_ancestral",
                      "cfg": 5.0, "width": 1216, "height": 832, "tool": "novelai"}
    stealth.write(photo, A1111, compressed=False).save(tmp_path / "a.png")
    r = metadata.read(tmp_path / "a.png")
    assert (r.info["prompt"], r.info["seed"], r.info["tool"]) == (A1111_PROMPT, 1234567, "a1111")


def test_huge_images_are_not_decoded_to_look(photo, tmp_path, monkeypatch):
    stealth.write(photo, A1111).save(tmp_path / "a.png")
    monkeypatch.setattr(stealth, "MAX_PIXELS", 256 * 255)
    assert metadata.read(tmp_path / "a.png") == metadata.MetadataResult(None, None)


def test_images_without_hidden_text_claim_nothing(photo, tmp_path):
    photo.save(tmp_path / "plain.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(noise, "RGBA").save(tmp_path / "noise.png")
    photo.convert("RGB").save(tmp_path / "rgb.png")
    for name in ("plain.png", "noise.png", "rgb.png"):
        assert metadata.read(tmp_path / name) == metadata.MetadataResult(None, None)


def test_cut_short_payload_is_a_warning(photo, tmp_path):
    small = photo.resize((16, 16))
    full = np.asarray(stealth.write(photo, A1111 * 3))  # a payload longer than a 16x16 image holds
    cut = np.asarray(small).copy()
    cut[..., 3] = full[..., 3].T.reshape(-1)[:256].reshape(16, 16).T  # its first 256 bits, column-major
    Image.fromarray(cut, "RGBA").save(tmp_path / "cut.png")
    r = metadata.read(tmp_path / "cut.png")
    assert r.info is None and "stealth" in r.warning and "cut.png" in r.warning
    with pytest.raises(ValueError, match="do not fit"):
        stealth.write(small, A1111 * 3)
