"""Generation metadata embedded in an image file: the exact prompt and the settings, when the file carries them.

:func:`read` returns a :class:`MetadataResult`: ``info`` (``None`` when the file carries no generation metadata)
with the keys ``prompt`` (the positive prompt, clean: no "Negative prompt:" or settings text),
``negative_prompt``, ``model``, ``seed``, ``steps``, ``sampler``, ``cfg``, ``width``, ``height`` (each ``None``
when the metadata does not state it; width/height are the *generation* size, which an upscaled file may not
have) and ``tool``; and ``warning`` (a one-line reason when something looked like metadata but could not be
read). :func:`read` never raises.

Formats (``tool``), where they are read from, and who parses them:

================ ======================================================= =========================================
tool             where                                                   parser
================ ======================================================= =========================================
``a1111``        PNG ``parameters``; JPEG/WebP EXIF UserComment or XMP   sd-parsers; own fallback for lines without
                 (AUTOMATIC1111, Forge, SD.Next, ...)                    a ``Sampler:`` and for prompt-only text
``comfyui``      PNG ``prompt`` (+ ``workflow``); WebP EXIF ``prompt:``  sd-parsers; links rebuilt from the prompt
                                                                         graph when ``workflow`` is absent
``invokeai``     PNG ``invokeai_metadata``, ``sd-metadata``, ``Dream``   sd-parsers
``novelai``      PNG ``Description`` + ``Comment`` (``Software: NovelAI``) sd-parsers
``fooocus``      PNG ``parameters`` / JPEG UserComment / comment, JSON    sd-parsers
``swarmui``      ``parameters`` / UserComment JSON ``sui_image_params``   own (small JSON reader)
``diffusiondb``  PNG ``prompt`` holding plain text (not a ComfyUI graph)  own
================ ======================================================= =========================================

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

FIELDS = ("prompt", "negative_prompt", "model", "seed", "steps", "sampler", "cfg", "width", "height", "tool")
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
EXIF_TEXT_TAGS = (0x010E, 0x010F, 0x0110)  # ImageDescription, Make, Model: ComfyUI/SwarmUI put "key:{json}" there
SETTINGS_RE = re.compile(r"(?:^|,\s*)([A-Za-z][\w ./-]*?):\s*(\"(?:[^\"\\]|\\.)*\"|[^,]*)")


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
            found.setdefault("parameters", _decode_user_comment(comment).strip("\0 "))
        for tag in EXIF_TEXT_TAGS:
            v = exif.get(tag)
            m = re.match(r"^(\w+):\s*(\{.*)$", v, re.DOTALL) if isinstance(v, str) else None
            if m:
                found.setdefault(m.group(1), m.group(2))
            elif isinstance(v, str) and "sui_image_params" in v:
                found.setdefault("parameters", v)
    except Exception as e:
        problems.append(f"EXIF unreadable ({type(e).__name__}: {e})")
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if xmp:
        try:
            texts = _xmp_texts(xmp)
            if texts:
                found.setdefault("parameters", texts[0])
        except Exception as e:
            problems.append(f"XMP unreadable ({type(e).__name__}: {e})")
    return found, problems


# ---------------------------------------------------------------------------------------------- values


def _num(v, kind):
    """``int``/``float`` from a number or numeric string, else ``None`` (never a guess)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(str(v).strip())
    except ValueError:
        return None
    if kind is int:
        return int(x) if x == int(x) else None
    return x


def _text(v) -> str | None:
    s = str(v).strip() if v is not None else ""
    return s or None


def _size(v) -> tuple[int | None, int | None]:
    m = re.search(r"(\d+)\D+(\d+)", str(v)) if v is not None else None
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _info(tool, prompt, negative=None, model=None, seed=None, steps=None, sampler=None, cfg=None,
          width=None, height=None) -> dict | None:
    prompt = _text(prompt)
    if not prompt:
        return None
    return {"prompt": prompt, "negative_prompt": _text(negative), "model": _text(model), "seed": _num(seed, int),
            "steps": _num(steps, int), "sampler": _text(sampler), "cfg": _num(cfg, float),
            "width": _num(width, int), "height": _num(height, int), "tool": tool}


# ---------------------------------------------------------------------------------------------- parsers


def _from_library(tool: str, pi) -> dict | None:
    """A sd-parsers ``PromptInfo`` -> our fields."""
    s = pi.samplers[0] if pi.samplers else None
    p = dict(s.parameters) if s else {}
    meta = pi.metadata if isinstance(pi.metadata, dict) else {}
    w, h = meta.get("width"), meta.get("height")
    if w is None:
        w, h = _size(meta.get("Size") or meta.get("resolution"))
    if w is None:  # ComfyUI: the latent-size node lands in metadata as {class_type: [inputs, ...]}
        sizes = [d for v in meta.values() if isinstance(v, list) for d in v
                 if isinstance(d, dict) and "width" in d and "height" in d]
        w, h = (sizes[0]["width"], sizes[0]["height"]) if sizes else (None, None)
    model = next((m.name or m.hash for m in pi.models), None)
    prompt = ", ".join(str(x) for x in pi.prompts)  # not full_prompt: Fooocus's holds the style expansions
    negative = ", ".join(str(x) for x in pi.negative_prompts)
    p = {**meta, **p}  # some tools keep steps/seed beside the sampler's own parameters
    return _info(tool, prompt, negative, model, p.get("seed", p.get("noise_seed")),
                 p.get("steps"), s.name if s and s.name != "unknown" else None, p.get("cfg_scale"), w, h)


def _a1111_own(text: str) -> dict | None:
    """A1111 text the library refused: settings line without ``Sampler:``, or a prompt with no settings."""
    lines = text.strip().split("\n")
    idx = next((i for i in range(len(lines) - 1, -1, -1) if re.search(r"(^|,\s*)Steps:\s*\d", lines[i])), None)
    settings = {k.strip(): v.strip().strip('"') for k, v in SETTINGS_RE.findall(lines[idx])} if idx is not None else {}
    body = "\n".join(lines[:idx] if idx is not None else lines)
    prompt, _, negative = body.partition("Negative prompt:")
    w, h = _size(settings.get("Size"))
    return _info("a1111", prompt, negative, settings.get("Model") or settings.get("Model hash"), settings.get("Seed"),
                 settings.get("Steps"), settings.get("Sampler"), settings.get("CFG scale"), w, h)


def _fooocus_own(p: dict) -> dict | None:
    """Fooocus JSON the library refused (e.g. no ``base_model_hash``)."""
    w, h = _size(p.get("resolution"))
    return _info("fooocus", p.get("prompt"), p.get("negative_prompt"), p.get("base_model"), p.get("seed"),
                 p.get("steps"), p.get("sampler"), p.get("guidance_scale"), w, h)


def _swarmui(obj: dict) -> dict | None:
    p = obj.get("sui_image_params") or {}
    return _info("swarmui", p.get("prompt"), p.get("negativeprompt"), p.get("model"), p.get("seed"), p.get("steps"),
                 p.get("sampler"), p.get("cfgscale"), p.get("width"), p.get("height"))


def _comfy_links(graph: dict) -> dict:
    """A ``workflow`` dict with the links rebuilt from the API graph (input name as the link type)."""
    links = [[0, str(v[0]), v[1], str(nid), 0, name.upper()] for nid, node in graph.items() if isinstance(node, dict)
             for name, v in (node.get("inputs") or {}).items() if isinstance(v, list) and len(v) == 2]
    return {"links": links}


def _parse(chunks: dict[str, str]) -> tuple[dict | None, str | None]:
    from sd_parsers.exceptions import ParserError
    from sd_parsers.parsers import AUTOMATIC1111Parser, ComfyUIParser, FooocusParser, InvokeAIParser, NovelAIParser

    def lib(tool, parser, params):
        try:
            return _from_library(tool, parser().parse(params)), None
        except (ParserError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            return None, f"{tool} metadata unreadable ({type(e).__name__}: {e})"

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
            if isinstance(obj, dict) and "sui_image_params" in obj:
                return _swarmui(obj), None
            if isinstance(obj, dict) and "prompt" in obj:
                info, err = lib("fooocus", FooocusParser, {"parameters": s})
                return (info, None) if info else (_fooocus_own(obj), None if _fooocus_own(obj) else err)
            return None, "'parameters' metadata is JSON of an unknown tool (no prompt field)"
        info, _ = lib("a1111", AUTOMATIC1111Parser, {"parameters": s})
        info = info or _a1111_own(s)
        return info, None if info else "'parameters' metadata holds settings but no positive prompt"
    invoke = {k: chunks[k] for k in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "Dream") if k in chunks}
    if invoke:
        return lib("invokeai", InvokeAIParser, invoke)
    if chunks.get("Software") == "NovelAI" or {"Description", "Comment", "Source"} <= chunks.keys():
        return lib("novelai", NovelAIParser, chunks)
    if "comment" in chunks and chunks["comment"].lstrip().startswith("{"):  # Fooocus JPEG
        return _parse({"parameters": chunks["comment"]})
    prompt = chunks.get("prompt")
    if prompt is not None:
        s = prompt.strip()
        if not s.startswith("{"):
            return _info("diffusiondb", s), (None if s else "'prompt' metadata is empty")
        try:
            graph = json.loads(s)
        except json.JSONDecodeError as e:
            return None, f"'prompt' metadata is malformed JSON ({e})"
        if not isinstance(graph, dict) or not any(isinstance(n, dict) and "class_type" in n for n in graph.values()):
            return None, "'prompt' metadata is JSON but not a ComfyUI graph"
        info = None
        if "workflow" in chunks:
            info, _ = lib("comfyui", ComfyUIParser, {"prompt": s, "workflow": chunks["workflow"]})
        if info is None:  # no/unusable workflow, or reroute nodes hid the links: rebuild them from the graph
            info, err = lib("comfyui", ComfyUIParser, {"prompt": graph, "workflow": _comfy_links(graph)})
            return info, err  # a valid graph without a text prompt (e.g. upscale only) is no metadata claim
        return info, None
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
