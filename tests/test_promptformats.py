"""Our own parsers of generators' metadata text: Mochi Diffusion and Civitai's checkpoint here (the others through
metadata.read in test_metadata.py), and the value rules every parser shares."""

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


CIVITAI = ('masterpiece, 1girl, cherry blossoms, <lora:detail_tweaker:0.5>\nNegative prompt: easynegative, lowres\n'
           'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 12345, Size: 512x768, Clip skip: 2, '
           'Created Date: 2024-05-01T10:00:00.000Z, Civitai resources: [{"type":"lora","weight":0.5,'
           '"modelVersionId":62833,"modelName":"Detail Tweaker LoRA","modelVersionName":"v1.0"},'
           '{"type":"checkpoint","modelVersionId":128713,"modelName":"DreamShaper","modelVersionName":"8"}], '
           'Civitai metadata: {"remixOfId":1}')


def test_civitai_jpeg_names_its_checkpoint_from_the_resources(tmp_path):
    """Civitai's generator writes A1111 text with no ``Model:``; the checkpoint is among its resources (the LoRA is
    not a checkpoint)."""
    from test_metadata import user_comment

    r = metadata.read(write_exif(tmp_path / "civitai.jpg", user_comment(CIVITAI)))
    assert r.warning is None and r.info == {
        "prompt": "masterpiece, 1girl, cherry blossoms, <lora:detail_tweaker:0.5>", "negative_prompt":
        "easynegative, lowres", "model": "DreamShaper 8", "seed": 12345, "steps": 30, "sampler": "DPM++ 2M Karras",
        "cfg": 7.0, "width": 512, "height": 768, "tool": "a1111"}
    assert promptformats.civitai_model(CIVITAI.replace('"type":"checkpoint"', '"type":"vae"')) is None
    assert promptformats.civitai_model('a cat\nSteps: 20, Civitai resources: [{"type":"checkpoint",') is None
    own = CIVITAI.replace(", Clip skip", ", Model: dreamshaper_8, Clip skip")
    named = metadata.read(write_exif(tmp_path / "named.jpg", user_comment(own)))
    assert named.info["model"] == "dreamshaper_8"  # the tool's own Model: wins
