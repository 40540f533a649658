"""Generation metadata embedded in an image file: the exact prompt and the settings, when the file carries them.

:func:`read` returns a :class:`MetadataResult`: ``info`` (``None`` when the file carries no generation metadata)
with the keys ``prompt`` (the positive prompt, clean: no "Negative prompt:" or settings text),
``negative_prompt``, ``model``, ``seed``, ``steps``, ``sampler``, ``cfg``, ``width``, ``height`` (each ``None``
when the metadata does not state it; width/height are the *generation* size, which an upscaled file may not
have) and ``tool``; and ``warning`` (a one-line reason when something looked like metadata but could not be
read). :func:`read` never raises.

Formats (``tool``), where they are read from, and who parses them ("own": :mod:`revsd.promptformats`):

================== ======================================================= =========================================
tool               where                                                   parser
================== ======================================================= =========================================
``a1111``          PNG ``parameters``; JPEG/WebP EXIF UserComment or XMP   sd-parsers; own fallback for lines without
                   (AUTOMATIC1111, Forge, SD.Next, Civitai, ...)           a ``Sampler:`` and for prompt-only text;
                                                                           Civitai's checkpoint from its resources
``comfyui``        PNG ``prompt`` (+ ``workflow``); WebP EXIF ``prompt:``  own graph tracer (:mod:`revsd.comfy`);
                   a graph as JSON in ``parameters``/UserComment (custom   sd-parsers (needs ``workflow``) for
                   save nodes); the UI's ``workflow`` alone                graphs it finds no prompt in
``invokeai``       PNG ``invokeai_metadata``, ``sd-metadata``, ``Dream``   sd-parsers
``novelai``        PNG ``Description`` + ``Comment`` (``Software: NovelAI``) sd-parsers
``fooocus``        PNG ``parameters`` / JPEG UserComment / comment, JSON    sd-parsers; else own
``swarmui``        ``parameters`` / UserComment JSON ``sui_image_params``   own
``drawthings``     XMP ``exif:UserComment`` JSON (``c``, ``uc``, ...)       own
``easydiffusion``  PNG chunk per setting, or ``parameters`` JSON           own
``midjourney``     PNG ``Description`` / EXIF ImageDescription with         own: the text before the first ``--``
                   ``Job ID:``                                             parameter, image URLs dropped
``mochi``          the image description (PNG/XMP/EXIF): ``Include in       own
                   Image: ...; Exclude from Image: ...; Steps: ...``
``other``          ``parameters`` JSON of another tool with a prompt field  own
``diffusiondb``    PNG ``prompt`` holding plain text (not a ComfyUI graph)  own
(any of these)     hidden in the alpha channel's low bits ("stealth         :mod:`revsd.stealth`, then as above
                   pnginfo": NovelAI, A1111's extension), when no text
                   chunk holds metadata
================== ======================================================= =========================================

Library choice (compared on files written by ``tests/test_metadata.py``, offline, in Pillow 13):

- **sd-parsers 0.6** (MIT, d3x-at/sd-parsers, released 2025-03, one dependency: ``pillow>=10.4``): a parser
  per tool (A1111, ComfyUI, InvokeAI in its three variants, NovelAI, Fooocus) that takes a dict of text
  chunks, so we can feed it text we extracted ourselves. Gaps: no SwarmUI, no XMP, no plain-text ``prompt``
  chunk; ComfyUI needs the ``workflow`` chunk; EXIF UserComment always decoded as UTF-16-BE (ASCII-prefixed
  comments come out garbled) — hence our own chunk extraction and the small parsers above.
- **sd-prompt-reader 1.3.5** (MIT, receyuki, last release 2024-05): more formats (SwarmUI, Draw Things,
  Easy Diffusion), but it is a desktop app: it pins ``pillow==10.3.0`` (we run Pillow 13; installing it would
  downgrade ours) and pulls ``customtkinter``, ``tkinterdnd2``, ``pefile``, ``pyperclip``, ``requests``; its
  reader is one class that opens the file itself and dispatches on keys, so its parts cannot be reused alone.
- Tried offline on the same 11 files (A1111 PNG, A1111 JPEG with ASCII and UNICODE UserComment, ComfyUI with
  and without ``workflow``, InvokeAI ``invokeai_metadata`` and ``Dream``, NovelAI, Fooocus, SwarmUI, a
  DiffusionDB ``prompt`` chunk; sd-prompt-reader installed ``--no-deps`` into a scratch folder): sd-parsers
  read 7 (missed the ASCII JPEG, ComfyUI without workflow, SwarmUI, DiffusionDB); sd-prompt-reader read 7
  (missed both JPEGs, read the Fooocus JSON as an A1111 prompt, crashed on the DiffusionDB chunk); this
  module reads all 11.
  Chosen: sd-parsers, plus the small readers here for what it misses.
- ComfyUI later moved to our own tracer first: on real graphs sd-parsers missed half the prompts and mixed the
  positive and negative prompts in some (:mod:`revsd.comfy`, ``bench/bench_comfy_graphs.py``).
- Cameras and photo tools write EXIF UserComment / XMP text too: it counts only in a generator's form (``WEAK``).
"""

from __future__ import annotations

import json
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from revsd import comfy, stealth
from revsd import promptformats as formats

FIELDS = ("prompt", "negative_prompt", "model", "seed", "steps", "sampler", "cfg", "width", "height", "tool")
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
# the keys a generator's metadata comes under; without any of them, an image with alpha may hide it (revsd.stealth)
KNOWN_KEYS = {"parameters", "prompt", "Prompt", "workflow", "invokeai_metadata", "invokeai_graph", "sd-metadata",
              "Dream", "Description", "Comment", "comment"}
WEAK = "\0comment"  # EXIF UserComment / XMP text: a generator's only with an A1111 "Steps:" line or as JSON
EXIF_TEXT_TAGS = (0x010E, 0x010F, 0x0110)  # ImageDescription, Make, Model: ComfyUI/SwarmUI put "key:{json}" there


@dataclass
class MetadataResult:
    info: dict | None = None
    warning: str | None = None


# ---------------------------------------------------------------------------------------------- extraction


def _decode_user_comment(raw) -> str:
    """EXIF UserComment: 8-byte charset prefix (UNICODE / ASCII / JIS / zeros) + text."""
    if isinstance(raw, str):
        return raw
    head, body = bytes(raw[:8]), bytes(raw[8:])
    if head.startswith(b"UNICODE"):
        be, le = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
        # the byte order is not stated; the right one decodes to mostly ASCII
        return be if sum(c.isascii() for c in be) >= sum(c.isascii() for c in le) else le
    if head.startswith((b"ASCII", b"\0\0\0\0\0\0\0\0", b"JIS")):
        return body.decode("utf-8", "replace")
    return bytes(raw).decode("utf-8", "replace")


def _xmp_texts(xmp) -> list[str]:
    """Text of XMP ``exif:UserComment`` / ``dc:description`` elements (their ``rdf:li`` children)."""
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    root = ET.fromstring(xmp.strip().strip("\0"))
    out = []
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] in ("UserComment", "description"):
            out += [t.strip() for t in el.itertext() if t.strip()]
    return out


def png_text(path: str | Path, limit: int = 1 << 24) -> dict[str, str]:
    """Every tEXt / zTXt / iTXt chunk of a PNG, read by walking the chunks: unlike Pillow's ``im.text`` it never
    decodes the pixels (an 8000² PNG would cost 256 MB). Compressed texts are cut at ``limit`` bytes. The raw
    eXIf chunk, if any, comes back under the key ``"\0exif"``."""
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return out
        while len(head := f.read(8)) == 8:
            size, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                out["\0exif"] = f.read(size).decode("latin-1")
                f.seek(4, 1)
                continue
            if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                if kind == b"IEND":
                    break
                f.seek(size + 4, 1)  # data + CRC
                continue
            data = f.read(size)
            f.seek(4, 1)
            key, _, rest = data.partition(b"\0")
            if kind == b"tEXt":
                text = rest.decode("latin-1")
            elif kind == b"zTXt":
                text = zlib.decompressobj().decompress(rest[1:], limit).decode("latin-1")
            else:  # iTXt: compression flag, method, language tag \0, translated keyword \0, UTF-8 text
                flag, rest = rest[:1], rest[2:]
                rest = rest.split(b"\0", 2)[-1]
                raw = zlib.decompressobj().decompress(rest, limit) if flag == b"\1" else rest
                text = raw.decode("utf-8", "replace")
            out[key.decode("latin-1")] = text
    return out


def _chunks(im: Image.Image) -> tuple[dict[str, str], list[str]]:
    """Every text that may hold generation metadata, keyed as the tools name it; plus extraction problems."""
    found: dict[str, str] = {}
    problems: list[str] = []
    for k, v in im.info.items():
        if isinstance(v, bytes) and k in ("comment", "parameters", "prompt"):
            v = v.decode("utf-8", "replace")
        if isinstance(v, str) and k not in ("xmp", "XML:com.adobe.xmp"):
            found[k] = v
    exif_png = None
    if im.format == "PNG":
        try:
            texts = png_text(im.filename)  # tEXt/iTXt/zTXt after the image data too, pixels never decoded
            exif_png = texts.pop("\0exif", None)
            found.update(texts)
        except Exception as e:  # truncated data after the header chunks: keep what im.info had
            problems.append(f"text chunks after the image data unreadable ({type(e).__name__})")
    try:
        if im.format == "PNG":  # Pillow's PNG getexif() decodes the pixels to look for an eXIf chunk after them
            exif = Image.Exif()
            if exif_png or im.info.get("exif"):
                exif.load(exif_png.encode("latin-1") if exif_png else im.info["exif"])
        else:
            exif = im.getexif()
        comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
        if comment:
            found.setdefault(WEAK, _decode_user_comment(comment).strip("\0 "))
        for tag in EXIF_TEXT_TAGS:
            v = exif.get(tag)
            m = re.match(r"^(\w+):\s*(\{.*)$", v, re.DOTALL) if isinstance(v, str) else None
            if m:
                found.setdefault(m.group(1), m.group(2))
            elif isinstance(v, str) and "sui_image_params" in v:
                found.setdefault("parameters", v)
            elif isinstance(v, str) and ("Job ID:" in v or "Include in Image:" in v):  # Midjourney, Mochi
                found.setdefault("Description", v)
    except Exception as e:
        problems.append(f"EXIF unreadable ({type(e).__name__}: {e})")
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if xmp:
        try:
            texts = _xmp_texts(xmp)
            if texts:
                found.setdefault(WEAK, next((t for t in texts if t.startswith("{")), texts[0]))
        except Exception as e:
            problems.append(f"XMP unreadable ({type(e).__name__}: {e})")
    if not KNOWN_KEYS & found.keys() and "A" in im.getbands():
        try:
            hidden = stealth.read(im)
        except ValueError as e:  # the signature is there: a claim of metadata, so a warning
            found["\0stealth"] = ""
            problems.append(f"hidden (stealth) metadata unreadable: {e}")
        except Exception as e:  # pixels that do not decode: the image's own error comes later
            problems.append(f"pixels unreadable ({type(e).__name__})")
        else:
            found.update(stealth.as_chunks(hidden) if hidden else {})
    return found, problems


# ---------------------------------------------------------------------------------------------- parsers


def _from_library(tool: str, pi) -> dict | None:
    """A sd-parsers ``PromptInfo`` -> our fields."""
    s = pi.samplers[0] if pi.samplers else None
    p = dict(s.parameters) if s else {}
    meta = pi.metadata if isinstance(pi.metadata, dict) else {}
    w, h = meta.get("width"), meta.get("height")
    if w is None:
        w, h = formats.size(meta.get("Size") or meta.get("resolution"))
    if w is None:  # ComfyUI: the latent-size node lands in metadata as {class_type: [inputs, ...]}
        sizes = [d for v in meta.values() if isinstance(v, list) for d in v
                 if isinstance(d, dict) and "width" in d and "height" in d]
        w, h = (sizes[0]["width"], sizes[0]["height"]) if sizes else (None, None)
    model = next((m.name or m.hash for m in pi.models), None)
    # not full_prompt: Fooocus's holds the style expansions; each text once (a refiner re-encodes the same prompt)
    prompt = ", ".join(dict.fromkeys(str(x) for x in pi.prompts))
    negative = ", ".join(dict.fromkeys(str(x) for x in pi.negative_prompts))
    p = {**meta, **p}  # some tools keep steps/seed beside the sampler's own parameters
    return formats.info(tool, prompt, negative, model, p.get("seed", p.get("noise_seed")),
                 p.get("steps"), s.name if s and s.name != "unknown" else None, p.get("cfg_scale"), w, h)


def _comfy_info(own: dict | None) -> dict | None:
    return formats.info("comfyui", **own) if own else None


def _parse(chunks: dict[str, str]) -> tuple[dict | None, str | None]:
    from sd_parsers.exceptions import ParserError
    from sd_parsers.parsers import AUTOMATIC1111Parser, ComfyUIParser, FooocusParser, InvokeAIParser, NovelAIParser

    def lib(tool, parser, params):
        try:
            return _from_library(tool, parser().parse(params)), None
        except (ParserError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            return None, f"{tool} metadata unreadable ({type(e).__name__}: {e})"

    weak = (chunks.get(WEAK) or chunks.get("comment") or "").strip()  # + JPEG COM: Fooocus writes its JSON there
    if "parameters" not in chunks and (weak.startswith("{") or formats.STEPS_RE.search(weak)):  # a generator's form
        info, warning = _parse({**chunks, "parameters": weak})
        if info or not weak.startswith("{"):  # other apps' JSON comments: no claim, no warning
            return info, warning
    params = chunks.get("parameters")
    if params is not None:
        s = params.strip()
        if not s:
            return None, "'parameters' metadata is empty"
        if s.startswith("{"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                return None, f"'parameters' metadata is malformed JSON ({e})"
            if isinstance(obj, dict) and isinstance(obj.get("sui_image_params"), dict):
                return formats.keyed("swarmui", obj["sui_image_params"]), None
            graph = obj.get("prompt") if isinstance(obj, dict) and isinstance(obj.get("prompt"), dict) else obj
            if isinstance(graph, dict) and any(isinstance(n, dict) and "class_type" in n for n in graph.values()):
                return _parse({"prompt": json.dumps(graph)})  # a ComfyUI graph that a custom save node put here
            if isinstance(obj, dict) and formats.keyed("other", obj):
                tool = formats.json_tool(obj)
                info = lib("fooocus", FooocusParser, {"parameters": s})[0] if tool == "fooocus" else None
                return info or formats.keyed(tool, obj), None
            return None, "'parameters' metadata is JSON of an unknown tool (no prompt field)"
        info, _ = lib("a1111", AUTOMATIC1111Parser, {"parameters": s})
        info = info or formats.a1111(s)
        if info and not info["model"]:  # Civitai's generator names the checkpoint only among its resources
            info["model"] = formats.civitai_model(s)
        return info, None if info else "'parameters' metadata holds settings but no positive prompt"
    invoke = {k: chunks[k] for k in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream") if k in chunks}
    if invoke:
        return lib("invokeai", InvokeAIParser, invoke)
    if "Job ID:" in chunks.get("Description", ""):
        return formats.midjourney(chunks["Description"]), None
    mochi = next((v for k in ("Description", WEAK, "comment") if "Include in Image:" in (v := chunks.get(k, ""))), None)
    if mochi:
        return formats.mochi(mochi), None
    if chunks.get("Software") == "NovelAI" or {"Description", "Comment", "Source"} <= chunks.keys():
        return lib("novelai", NovelAIParser, chunks)
    prompt = chunks.get("prompt", chunks.get("Prompt"))
    if prompt is not None:
        s = prompt.strip()
        if not s.startswith("{"):  # DiffusionDB: the prompt alone; Easy Diffusion: a chunk per setting
            easy = {"num_inference_steps", "Stable Diffusion model"} & chunks.keys()
            tool = "easydiffusion" if easy else "diffusiondb"
            return formats.keyed(tool, {**chunks, "prompt": s}), (None if s else "'prompt' metadata is empty")
        try:
            graph = json.loads(s)
        except json.JSONDecodeError as e:
            return None, f"'prompt' metadata is malformed JSON ({e})"
        if not isinstance(graph, dict) or not any(isinstance(n, dict) and "class_type" in n for n in graph.values()):
            return None, "'prompt' metadata is JSON but not a ComfyUI graph"
        own = comfy.read(graph)  # first: sd-parsers follows every conditioning link (see revsd.comfy)
        if own is None and "workflow" in chunks:  # e.g. samplers fed by text-embed nodes only sd-parsers knows
            return lib("comfyui", ComfyUIParser, {"prompt": s, "workflow": chunks["workflow"]})[0], None
        return _comfy_info(own), None  # a graph without a text prompt claims nothing
    if chunks.get("workflow") is not None:  # the UI's workflow without the API graph beside it
        try:
            wf = json.loads(chunks["workflow"])
        except json.JSONDecodeError as e:
            return None, f"'workflow' metadata is malformed JSON ({e})"
        return _comfy_info(comfy.read(comfy.from_workflow(wf)) if isinstance(wf, dict) else None), None
    return None, None


def read(path: str | Path) -> MetadataResult:
    """The generation metadata of one image file; never raises (problems come back as ``warning``)."""
    try:
        with Image.open(path) as im:
            chunks, problems = _chunks(im)
    except Exception as e:
        return MetadataResult(None, f"{path}: metadata not read ({type(e).__name__}: {e})")
    try:
        info, warning = _parse(chunks)
    except Exception as e:  # a parser bug on odd input must not stop a batch
        info, warning = None, f"metadata parser failed ({type(e).__name__}: {e})"
    if info is None and warning is None and problems and chunks:
        warning = "; ".join(problems)
    return MetadataResult(info, f"{path}: {warning}" if warning else None)
