"""Generation metadata: every claimed format, written by these tests into real PNG/JPEG/WebP files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features
from PIL.PngImagePlugin import PngInfo

from revsd import metadata

A1111_PROMPT = "masterpiece, a red fox in the snow,\n(detailed fur:1.2), golden hour"
A1111 = (f"{A1111_PROMPT}\nNegative prompt: blurry, lowres, bad anatomy\n"
         "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234567, Size: 512x768, "
         "Model hash: 879db523c3, Model: dreamshaper_8, Version: v1.6.0")
FORGE = ("portrait of an old sailor, oil painting\nNegative prompt: cartoon\n"
         "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 832x1216, "
         'Model hash: 31e35c80fc, Model: juggernautXL_v9, Lora hashes: "add_detail: 7c6bad76eb54", '
         'Hashes: {"model": "31e35c80fc"}, Version: f2.0.1v1.10.1-previous-313-g8a042934')
COMFY_PROMPT = "a lighthouse on a cliff at night, dramatic sky"
COMFY_GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8.0,
                                               "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                               "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 640, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": COMFY_PROMPT, "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}
COMFY_WORKFLOW = {"last_node_id": 9, "nodes": [{"id": int(k), "type": v["class_type"]} for k, v in COMFY_GRAPH.items()],
                  "links": [[1, 4, 0, 3, 0, "MODEL"], [3, 4, 1, 6, 0, "CLIP"], [5, 4, 1, 7, 0, "CLIP"],
                            [4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"],
                            [2, 5, 0, 3, 3, "LATENT"], [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"],
                            [9, 8, 0, 9, 0, "IMAGE"]]}
INVOKE_META = {"generation_mode": "txt2img", "positive_prompt": "a cozy cabin in the woods, snow",
               "negative_prompt": "people", "width": 768, "height": 512, "seed": 987, "steps": 30,
               "cfg_scale": 7.5, "scheduler": "euler_a", "model": {"model_name": "stable-diffusion-v1-5",
                                                                   "base_model": "sd-1", "model_type": "main"}}
DREAM = '"a castle on a hill, fantasy art [ugly, blurry]" -s 50 -S 3040 -W 512 -H 512 -C 7.5 -A k_lms'
NOVELAI_COMMENT = {"prompt": "1girl, silver hair, night city", "steps": 28, "height": 832, "width": 1216,
                   "scale": 5.0, "seed": 2210, "sampler": "k_euler_ancestral", "uc": "lowres, bad hands"}
FOOOCUS = {"prompt": "an astronaut riding a horse", "negative_prompt": "", "styles": "['Fooocus V2']",
           "performance": "Speed", "resolution": "(1152, 896)", "guidance_scale": 4, "sharpness": 2,
           "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras", "seed": 77, "steps": 30,
           "base_model": "juggernautXL_v8Rundiffusion", "base_model_hash": "aeb7e9e689",
           "full_prompt": ["an astronaut riding a horse, cinematic, highly detailed"], "version": "Fooocus v2.3.1"}
SWARM = {"sui_image_params": {"prompt": "a bowl of ramen, studio photo", "negativeprompt": "blurry",
                              "model": "OfficialStableDiffusion/sd_xl_base_1.0", "seed": 1601, "steps": 25,
                              "cfgscale": 6, "width": 1024, "height": 1024, "sampler": "euler"},
         "sui_extra_data": {"date": "2024-05-01"}}
DIFFUSIONDB_PROMPT = "a portrait of a cyberpunk cat, digital art, trending on artstation"


def _pixels(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def write_png(path: Path, chunks: dict[str, str], itxt: bool = False) -> Path:
    """A PNG with the given text chunks (tEXt, or iTXt for non-Latin-1 text)."""
    info = PngInfo()
    for k, v in chunks.items():
        (info.add_itxt if itxt else info.add_text)(k, v)
    _pixels().save(path, pnginfo=info)
    return path


def user_comment(text: str, charset: str = "UNICODE") -> bytes:
    if charset == "UNICODE":
        return b"UNICODE\0" + text.encode("utf-16-be")
    return b"ASCII\0\0\0" + text.encode("utf-8")


def write_exif(path: Path, comment: bytes | None = None, tags: dict[int, str] | None = None, **save) -> Path:
    """A JPEG/WebP (by suffix) with an EXIF UserComment and/or IFD0 text tags."""
    exif = Image.Exif()
    if comment is not None:
        exif.get_ifd(metadata.EXIF_IFD)[metadata.USER_COMMENT] = comment
    for tag, v in (tags or {}).items():
        exif[tag] = v
    _pixels().save(path, exif=exif.tobytes(), **save)  # bytes: Pillow's AVIF writer drops an Exif object
    return path


def xmp_packet(text: str, field: str = "exif:UserComment") -> bytes:
    """An XMP packet holding ``text`` in ``field`` (``exif:UserComment`` or ``dc:description``)."""
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description rdf:about="" xmlns:exif="http://ns.adobe.com/exif/1.0/" '
            f'xmlns:dc="http://purl.org/dc/elements/1.1/"><{field}><rdf:Alt>'
            f'<rdf:li xml:lang="x-default">{text}</rdf:li></rdf:Alt></{field}></rdf:Description>'
            '</rdf:RDF></x:xmpmeta>').encode()


def comfy_chunks(workflow: bool = True) -> dict[str, str]:
    out = {"prompt": json.dumps(COMFY_GRAPH)}
    if workflow:
        out["workflow"] = json.dumps(COMFY_WORKFLOW)
    return out


def plain_jpeg(path: Path) -> Path:
    _pixels().save(path, quality=90)
    return path


def _clean(prompt: str) -> None:
    assert "Negative prompt" not in prompt and "Steps:" not in prompt and "Sampler" not in prompt


def test_a1111_png(tmp_path):
    r = metadata.read(write_png(tmp_path / "a.png", {"parameters": A1111}))
    assert r.warning is None
    assert r.info == {"prompt": A1111_PROMPT, "negative_prompt": "blurry, lowres, bad anatomy",
                      "model": "dreamshaper_8", "seed": 1234567, "steps": 28, "sampler": "DPM++ 2M Karras",
                      "cfg": 6.5, "width": 512, "height": 768, "tool": "a1111"}
    assert set(r.info) == set(metadata.FIELDS)


def test_forge_png_itxt(tmp_path):
    r = metadata.read(write_png(tmp_path / "f.png", {"parameters": FORGE}, itxt=True))
    assert r.info["prompt"] == "portrait of an old sailor, oil painting"
    assert (r.info["seed"], r.info["steps"], r.info["cfg"], r.info["sampler"], r.info["model"]) == \
        (42, 20, 7.0, "Euler a", "juggernautXL_v9")
    assert (r.info["width"], r.info["height"]) == (832, 1216)


def test_a1111_without_sampler_and_prompt_only(tmp_path):
    no_sampler = "a tiny robot\nNegative prompt: text\nSteps: 12, CFG scale: 5, Seed: 9, Size: 256x256"
    r = metadata.read(write_png(tmp_path / "n.png", {"parameters": no_sampler}))
    assert r.info["prompt"] == "a tiny robot" and r.info["negative_prompt"] == "text"
    assert (r.info["steps"], r.info["seed"], r.info["cfg"], r.info["sampler"]) == (12, 9, 5.0, None)
    r = metadata.read(write_png(tmp_path / "p.png", {"parameters": "just a prompt, nothing else"}))
    assert r.info["prompt"] == "just a prompt, nothing else" and r.info["seed"] is None and r.warning is None
    r = metadata.read(write_png(tmp_path / "s.png", {"parameters": "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1"}))
    assert r.info is None and "no positive prompt" in r.warning and "s.png" in r.warning


AVIF = pytest.mark.skipif(not features.check("avif"), reason="this Pillow cannot write AVIF")


@pytest.mark.parametrize("suffix,charset", [(".jpg", "UNICODE"), (".jpg", "ASCII"), (".webp", "UNICODE"),
                                            pytest.param(".avif", "UNICODE", marks=AVIF)])  # A1111/Forge save AVIF
def test_a1111_exif_user_comment(tmp_path, suffix, charset):
    r = metadata.read(write_exif(tmp_path / f"e{suffix}", user_comment(A1111, charset)))
    assert r.info["prompt"] == A1111_PROMPT and r.info["seed"] == 1234567 and r.info["tool"] == "a1111"
    _clean(r.info["prompt"])


def test_utf16_little_endian_and_non_latin(tmp_path):
    text = "桜の木の下の猫, watercolor\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5"
    r = metadata.read(write_exif(tmp_path / "le.jpg", b"UNICODE\0" + text.encode("utf-16-le")))
    assert r.info["prompt"] == "桜の木の下の猫, watercolor"


@pytest.mark.parametrize("suffix", [".jpg", ".webp", pytest.param(".avif", marks=AVIF)])
def test_xmp_user_comment(tmp_path, suffix):
    text = "a foggy forest, volumetric light\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 11"
    path = tmp_path / f"x{suffix}"
    _pixels().save(path, xmp=xmp_packet(text))
    r = metadata.read(path)
    assert r.info["prompt"] == "a foggy forest, volumetric light" and r.info["seed"] == 11


def test_comfyui_png_with_and_without_workflow(tmp_path):
    for wf in (True, False):
        r = metadata.read(write_png(tmp_path / f"c{wf}.png", comfy_chunks(wf)))
        assert r.warning is None
        assert r.info == {"prompt": COMFY_PROMPT, "negative_prompt": "text, watermark",
                          "model": "v1-5-pruned-emaonly.safetensors", "seed": 156680208700286, "steps": 20,
                          "sampler": "euler", "cfg": 8.0, "width": 512, "height": 640, "tool": "comfyui"}


def test_comfyui_webp_exif(tmp_path):
    tags = {0x0110: "prompt:" + json.dumps(COMFY_GRAPH), 0x010F: "workflow:" + json.dumps(COMFY_WORKFLOW)}
    r = metadata.read(write_exif(tmp_path / "c.webp", tags=tags))
    assert r.info["prompt"] == COMFY_PROMPT and r.info["tool"] == "comfyui"


def test_invokeai_variants(tmp_path):
    r = metadata.read(write_png(tmp_path / "i.png", {"invokeai_metadata": json.dumps(INVOKE_META)}))
    assert r.info == {"prompt": "a cozy cabin in the woods, snow", "negative_prompt": "people",
                      "model": "stable-diffusion-v1-5", "seed": 987, "steps": 30, "sampler": "euler_a",
                      "cfg": 7.5, "width": 768, "height": 512, "tool": "invokeai"}
    r = metadata.read(write_png(tmp_path / "d.png", {"Dream": DREAM}))
    assert r.info["prompt"] == "a castle on a hill, fantasy art" and r.info["negative_prompt"] == "ugly, blurry"
    assert (r.info["seed"], r.info["steps"], r.info["sampler"], r.info["width"]) == (3040, 50, "k_lms", 512)
    sd_meta = {"model_weights": "stable-diffusion-1.4", "image": {
        "prompt": [{"prompt": "a red bicycle [rust]", "weight": 1.0}], "sampler": "k_euler", "seed": 8, "steps": 40,
        "cfg_scale": 7.0, "width": 512, "height": 512}}
    r = metadata.read(write_png(tmp_path / "s.png", {"sd-metadata": json.dumps(sd_meta)}))
    assert r.info["prompt"] == "a red bicycle" and r.info["model"] == "stable-diffusion-1.4" and r.info["seed"] == 8


def test_novelai(tmp_path):
    chunks = {"Title": "AI generated image", "Description": "1girl, silver hair, night city", "Software": "NovelAI",
              "Source": "Stable Diffusion XL C1E1DE52", "Comment": json.dumps(NOVELAI_COMMENT)}
    r = metadata.read(write_png(tmp_path / "n.png", chunks))
    assert r.info == {"prompt": "1girl, silver hair, night city", "negative_prompt": "lowres, bad hands",
                      "model": "Stable Diffusion XL", "seed": 2210, "steps": 28, "sampler": "k_euler_ancestral",
                      "cfg": 5.0, "width": 1216, "height": 832, "tool": "novelai"}


def test_fooocus_png_and_jpeg(tmp_path):
    want = {"prompt": "an astronaut riding a horse", "negative_prompt": None, "model": "juggernautXL_v8Rundiffusion",
            "seed": 77, "steps": 30, "sampler": "dpmpp_2m_sde_gpu", "cfg": 4.0, "width": 1152, "height": 896,
            "tool": "fooocus"}
    assert metadata.read(write_png(tmp_path / "f.png", {"parameters": json.dumps(FOOOCUS)})).info == want
    assert metadata.read(write_exif(tmp_path / "f.jpg", user_comment(json.dumps(FOOOCUS)))).info == want
    no_hash = {k: v for k, v in FOOOCUS.items() if k != "base_model_hash"}  # the library refuses this one
    assert metadata.read(write_png(tmp_path / "g.png", {"parameters": json.dumps(no_hash)})).info == want


def test_swarmui_png_and_jpeg(tmp_path):
    want = {"prompt": "a bowl of ramen, studio photo", "negative_prompt": "blurry",
            "model": "OfficialStableDiffusion/sd_xl_base_1.0", "seed": 1601, "steps": 25, "sampler": "euler",
            "cfg": 6.0, "width": 1024, "height": 1024, "tool": "swarmui"}
    assert metadata.read(write_png(tmp_path / "s.png", {"parameters": json.dumps(SWARM)})).info == want
    assert metadata.read(write_exif(tmp_path / "s.jpg", user_comment(json.dumps(SWARM)))).info == want
    assert metadata.read(write_exif(tmp_path / "old.jpg", tags={0x0110: json.dumps(SWARM)})).info == want


def test_diffusiondb_prompt_chunk(tmp_path):
    r = metadata.read(write_png(tmp_path / "d.png", {"prompt": DIFFUSIONDB_PROMPT}))
    assert r.info == {**dict.fromkeys(metadata.FIELDS), "prompt": DIFFUSIONDB_PROMPT, "tool": "diffusiondb"}


def test_refiner_prompt_counted_once(tmp_path):
    """Base + refiner encode the same text in two nodes: the prompt holds it once."""
    graph = {**COMFY_GRAPH, "10": {"class_type": "KSamplerAdvanced", "inputs": {
        "add_noise": "disable", "noise_seed": 1, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "start_at_step": 20, "end_at_step": 25, "return_with_leftover_noise": "disable",
        "model": ["4", 0], "positive": ["11", 0], "negative": ["7", 0], "latent_image": ["3", 0]}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": COMFY_PROMPT, "clip": ["4", 1]}}}
    links = COMFY_WORKFLOW["links"] + [[20, 4, 0, 10, 0, "MODEL"], [21, 11, 0, 10, 1, "CONDITIONING"],
                                       [22, 7, 0, 10, 2, "CONDITIONING"], [23, 3, 0, 10, 3, "LATENT"],
                                       [24, 4, 1, 11, 0, "CLIP"]]
    chunks = {"prompt": json.dumps(graph), "workflow": json.dumps({**COMFY_WORKFLOW, "links": links})}
    assert metadata.read(write_png(tmp_path / "r.png", chunks)).info["prompt"] == COMFY_PROMPT


MIDJOURNEY = ("https://s.mj.run/abc123 a lighthouse in a storm, oil on canvas --ar 2:1 --no people, boats "
              "--seed 4242 --v 6.1 Job ID: a7421d2f-b262-44f9-977c-ac23e9c7d3e3")


def test_midjourney_png_and_jpeg(tmp_path):
    want = {**dict.fromkeys(metadata.FIELDS), "prompt": "a lighthouse in a storm, oil on canvas",
            "negative_prompt": "people, boats", "model": "Midjourney v6.1", "seed": 4242, "tool": "midjourney"}
    chunks = {"Description": MIDJOURNEY, "Author": "someone", "Creation Time": "2024-11-01T10:00:00Z"}
    assert metadata.read(write_png(tmp_path / "m.png", chunks)).info == want
    assert metadata.read(write_exif(tmp_path / "m.jpg", tags={0x010E: MIDJOURNEY})).info == want
    r = metadata.read(write_png(tmp_path / "n.png", {"Description": "a cat --niji 6 Job ID: 1-2-3"}))
    assert (r.info["prompt"], r.info["model"]) == ("a cat", "Midjourney niji 6")


def test_draw_things_xmp(tmp_path):
    """Draw Things: an A1111-like dc:description and the JSON settings in exif:UserComment; the JSON wins."""
    settings = {"c": "a koi pond at dawn, ukiyo-e", "uc": "text", "model": "sd_xl_base_1.0_f16.ckpt",
                "sampler": "DPM++ 2M Karras", "seed": 3141, "steps": 30, "scale": 5.5, "size": "1024x768"}
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
           'xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:xmp="http://ns.adobe.com/xap/1.0/">'
           '<xmp:CreatorTool>Draw Things</xmp:CreatorTool><dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
           'a koi pond at dawn, ukiyo-e&#10;-text&#10;Steps: 30, Sampler: DPM++ 2M Karras</rdf:li></rdf:Alt>'
           '</dc:description><exif:UserComment><rdf:Alt><rdf:li xml:lang="x-default">'
           f'{json.dumps(settings).replace(chr(34), "&quot;")}</rdf:li></rdf:Alt></exif:UserComment>'
           '</rdf:Description></rdf:RDF></x:xmpmeta>').encode()
    for suffix in (".png", ".jpg"):
        _pixels().save(tmp_path / f"d{suffix}", xmp=xmp) if suffix == ".jpg" else \
            write_png(tmp_path / "d.png", {"XML:com.adobe.xmp": xmp.decode()}, itxt=True)
        assert metadata.read(tmp_path / f"d{suffix}").info == {
            "prompt": "a koi pond at dawn, ukiyo-e", "negative_prompt": "text", "model": "sd_xl_base_1.0_f16.ckpt",
            "seed": 3141, "steps": 30, "sampler": "DPM++ 2M Karras", "cfg": 5.5, "width": 1024, "height": 768,
            "tool": "drawthings"}


def test_easy_diffusion_chunks_and_json(tmp_path):
    settings = {"prompt": "a steampunk owl, intricate", "negative_prompt": "lowres", "seed": 99,
                "use_stable_diffusion_model": "sd-v1-5", "num_inference_steps": 25, "guidance_scale": 7.5,
                "width": 512, "height": 768, "sampler_name": "euler_a"}
    want = {"prompt": "a steampunk owl, intricate", "negative_prompt": "lowres", "model": "sd-v1-5", "seed": 99,
            "steps": 25, "sampler": "euler_a", "cfg": 7.5, "width": 512, "height": 768, "tool": "easydiffusion"}
    assert metadata.read(write_png(tmp_path / "e.png", {k: str(v) for k, v in settings.items()})).info == want
    assert metadata.read(write_png(tmp_path / "j.png", {"parameters": json.dumps(settings)})).info == want
    other = {"prompt": "a paper boat", "seed": 5, "cfg_scale": 3}
    assert metadata.read(write_png(tmp_path / "o.png", {"parameters": json.dumps(other)})).info == {
        **dict.fromkeys(metadata.FIELDS), "prompt": "a paper boat", "seed": 5, "cfg": 3.0, "tool": "other"}


def test_no_metadata_is_not_claimed(tmp_path):
    assert metadata.read(plain_jpeg(tmp_path / "plain.jpg")) == metadata.MetadataResult(None, None)
    assert metadata.read(write_png(tmp_path / "gimp.png", {"Software": "GIMP 2.10", "Comment": "made by hand"})) \
        == metadata.MetadataResult(None, None)
    upscale_only = {"prompt": json.dumps({"9": COMFY_GRAPH["9"]})}  # a valid graph with no text prompt
    assert metadata.read(write_png(tmp_path / "u.png", upscale_only)) == metadata.MetadataResult(None, None)
    _pixels().save(tmp_path / "plain.webp")
    assert metadata.read(tmp_path / "plain.webp") == metadata.MetadataResult(None, None)
    # what cameras and photo tools write: a blank or personal UserComment, a stock photo's XMP description
    for i, comment in enumerate((b"ASCII\0\0\0" + b" " * 20, b"\0" * 64, user_comment("Taken on holiday in Crete"))):
        assert metadata.read(write_exif(tmp_path / f"cam{i}.jpg", comment)) == metadata.MetadataResult(None, None)
    xmp = xmp_packet("Sunset over the Alps, Switzerland", "dc:description")
    assert metadata._xmp_texts(xmp) == ["Sunset over the Alps, Switzerland"]
    _pixels().save(tmp_path / "stock.jpg", xmp=xmp)
    assert metadata.read(tmp_path / "stock.jpg") == metadata.MetadataResult(None, None)
    assert metadata.read(write_exif(tmp_path / "app.jpg", user_comment('{"app": "Camera", "hdr": true}'))) \
        == metadata.MetadataResult(None, None)


@pytest.mark.parametrize("chunks,needle", [
    ({"parameters": '{"prompt": "a cat", '}, "malformed JSON"),
    ({"parameters": "   "}, "empty"),
    ({"parameters": '{"foo": 1}'}, "unknown tool"),
    ({"prompt": '{"3": {"class_type": "KSampler"'}, "malformed JSON"),
    ({"prompt": '{"a": 1}'}, "not a ComfyUI graph"),
    ({"invokeai_metadata": "{not json"}, "invokeai metadata unreadable"),
    ({"Software": "NovelAI", "Description": "x", "Source": "y", "Comment": "{bad"}, "novelai metadata unreadable"),
])
def test_malformed_metadata_warns(tmp_path, chunks, needle):
    path = write_png(tmp_path / "bad.png", chunks)
    r = metadata.read(path)
    assert r.info is None and needle in r.warning and str(path) in r.warning


def test_unreadable_files_never_raise(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    r = metadata.read(tmp_path / "text.png")
    assert r.info is None and "text.png" in r.warning
    assert metadata.read(tmp_path / "missing.png").info is None
    good = write_png(tmp_path / "t.png", {"parameters": A1111}).read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])  # text chunk before IDAT survives
    r = metadata.read(tmp_path / "trunc.png")
    assert r.info is None or r.info["prompt"] == A1111_PROMPT


def test_png_text_reads_every_text_chunk_without_decoding_pixels(tmp_path, monkeypatch):
    """Chunks before and after the image data, plain / compressed / international, as Pillow reads them."""
    import struct
    import zlib

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20")
    info.add_text("zipped", "long text " * 50, zip=True)
    info.add_itxt("itxt", "ünïcode prompt", lang="en", tkey="t", zip=True)
    f = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(f, pnginfo=info)
    raw = f.read_bytes()
    after = b"prompt\0a dog after the pixels"  # a tEXt chunk after IDAT (ComfyUI-style writers do this)
    chunk = struct.pack(">I", len(after)) + b"tEXt" + after + struct.pack(">I", zlib.crc32(b"tEXt" + after))
    f.write_bytes(raw[:-12] + chunk + raw[-12:])  # before IEND

    with Image.open(f) as im:
        expected = dict(im.text)
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    assert metadata.png_text(f) == expected
    assert expected["prompt"] == "a dog after the pixels" and expected["itxt"] == "ünïcode prompt"


def test_png_exif_user_comment_is_read_without_decoding_pixels(tmp_path, monkeypatch):
    """A PNG carrying A1111 parameters in an eXIf chunk (Pillow's PNG getexif() would decode the pixels)."""
    import struct
    import zlib

    exif = Image.Exif()
    exif.get_ifd(metadata.EXIF_IFD)[metadata.USER_COMMENT] = user_comment(A1111)
    data = exif.tobytes()
    data = data[6:] if data.startswith(b"Exif\0\0") else data  # PNG's eXIf holds the bare TIFF structure
    f = tmp_path / "e.png"
    _pixels().save(f)
    raw = f.read_bytes()  # the eXIf chunk after the image data, where Pillow must decode the pixels to see it
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    f.write_bytes(raw[:-12] + chunk + raw[-12:])
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    r = metadata.read(f)
    assert r.warning is None and r.info["prompt"] == A1111_PROMPT and r.info["tool"] == "a1111"


def test_packaged_real_photos_claim_nothing():
    """The real photos that ship with scikit-image, matplotlib and scikit-learn (cameras', scanners' and editors'
    files) carry no generation prompt: none is claimed, and only a file Pillow cannot open gets a warning."""
    import matplotlib
    import skimage
    import sklearn

    dirs = [Path(skimage.__file__).parent / "data", Path(matplotlib.get_data_path()) / "sample_data",
            Path(sklearn.__file__).parent / "datasets" / "images"]
    files = [p for d in dirs for p in sorted(d.rglob("*"))
             if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".gif", ".bmp"}]
    assert len(files) >= 20
    results = {p.name: metadata.read(p) for p in files}
    assert not {n: r.info["tool"] for n, r in results.items() if r.info}
    assert all("metadata not read" in r.warning for r in results.values() if r.warning)
