"""Our own parsers of generators' metadata text: Mochi Diffusion here (the others through metadata.read in
test_metadata.py), and the value rules every parser shares."""

from __future__ import annotations

from test_metadata import _pixels, write_exif, write_png, xmp_packet

from revsd import metadata, promptformats

MOCHI = ("Include in Image: a lighthouse; stormy sea, oil painting; Exclude from Image: blurry, text; "
         "Model: stable-diffusion-2-1-base_split-einsum_compiled; Steps: 25; Guidance Scale: 7.5; Seed: 4021; "
         "Size: 512x768; Scheduler: DPM-Solver++; ML Compute Unit: CPU & Neural Engine; Generator: Mochi Diffusion 4.2")
MOCHI_INFO = {"prompt": "a lighthouse; stormy sea, oil painting", "negative_prompt": "blurry, text",
              "model": "stable-diffusion-2-1-base_split-einsum_compiled", "seed": 4021, "steps": 25,
              "sampler": "DPM-Solver++", "cfg": 7.5, "width": 512, "height": 768, "tool": "mochi"}


def test_mochi_keeps_semicolons_inside_the_prompt():
    assert promptformats.mochi(MOCHI) == MOCHI_INFO
    assert promptformats.mochi("Include in Image: a cat; Generator: Mochi Diffusion 3.0")["prompt"] == "a cat"
    assert promptformats.mochi("Include in Image: ; Seed: 3") is None  # no positive prompt: no claim


def test_mochi_from_png_description_xmp_and_jpeg_description(tmp_path):
    assert metadata.read(write_png(tmp_path / "m.png", {"Description": MOCHI})).info == MOCHI_INFO
    xmp = xmp_packet(MOCHI.replace("&", "&amp;"), "dc:description")
    _pixels().save(tmp_path / "m.jpg", xmp=xmp)
    assert metadata.read(tmp_path / "m.jpg").info == MOCHI_INFO
    assert metadata.read(write_exif(tmp_path / "d.jpg", tags={0x010E: MOCHI})).info == MOCHI_INFO


def test_values_are_never_guessed():
    info = promptformats.info("x", "  a prompt ", None, "", "12.5", "20", "", "7", "512", "abc")
    assert info == {"prompt": "a prompt", "negative_prompt": None, "model": None, "seed": None, "steps": 20,
                    "sampler": None, "cfg": 7.0, "width": 512, "height": None, "tool": "x"}
    assert promptformats.info("x", "   ") is None
    assert promptformats.size("(1152, 896)") == (1152, 896) and promptformats.size("square") == (None, None)
