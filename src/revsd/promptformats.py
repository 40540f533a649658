"""Generation-metadata text formats read by our own parsers (sd-parsers reads the rest, see :mod:`revsd.metadata`).

Each parser takes the text (or the named values) a tool wrote and returns :func:`info`'s dict of the fields
``revsd.metadata.FIELDS`` lists, or ``None`` when there is no positive prompt. Values are never guessed: a number
that does not parse is ``None``.
"""

from __future__ import annotations

import json
import re

STEPS_RE = re.compile(r"(?:^|\n|,\s*)Steps:\s*\d")  # an A1111 settings line
SETTINGS_RE = re.compile(r"(?:^|,\s*)([A-Za-z][\w ./-]*?):\s*(\"(?:[^\"\\]|\\.)*\"|[^,]*)")


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


def size(v) -> tuple[int | None, int | None]:
    m = re.search(r"(\d+)\D+(\d+)", str(v)) if v is not None else None
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def info(tool, prompt, negative_prompt=None, model=None, seed=None, steps=None, sampler=None, cfg=None,
         width=None, height=None) -> dict | None:
    """Our fields, cleaned (text stripped, numbers parsed), or ``None`` without a positive prompt."""
    prompt = _text(prompt)
    if not prompt:
        return None
    return {"prompt": prompt, "negative_prompt": _text(negative_prompt), "model": _text(model),
            "seed": _num(seed, int), "steps": _num(steps, int), "sampler": _text(sampler), "cfg": _num(cfg, float),
            "width": _num(width, int), "height": _num(height, int), "tool": tool}


def a1111(text: str) -> dict | None:
    """A1111 text the library refused: settings line without ``Sampler:``, or a prompt with no settings."""
    lines = text.strip().split("\n")
    idx = next((i for i in range(len(lines) - 1, -1, -1) if STEPS_RE.search(lines[i])), None)
    settings = {k.strip(): v.strip().strip('"') for k, v in SETTINGS_RE.findall(lines[idx])} if idx is not None else {}
    body = "\n".join(lines[:idx] if idx is not None else lines)
    prompt, _, negative = body.partition("Negative prompt:")
    w, h = size(settings.get("Size"))
    return info("a1111", prompt, negative, settings.get("Model") or settings.get("Model hash"), settings.get("Seed"),
                 settings.get("Steps"), settings.get("Sampler"), settings.get("CFG scale"), w, h)


def civitai_model(text: str) -> str | None:
    """The checkpoint in Civitai's ``Civitai resources: [{"type": "checkpoint", "modelName": ..., ...}]`` setting
    (its on-site generator writes no ``Model:``), as ``"<modelName> <modelVersionName>"``; ``None`` when absent."""
    m = re.search(r"Civitai resources:\s*(?=\[)", text)
    try:
        items = json.JSONDecoder().raw_decode(text, m.end())[0] if m else []
    except ValueError:
        return None
    for it in items if isinstance(items, list) else []:
        if isinstance(it, dict) and it.get("type") == "checkpoint" and it.get("modelName"):
            return " ".join(str(v) for v in (it["modelName"], it.get("modelVersionName")) if v)
    return None


# the names tools give each setting when they store settings as named values (a JSON object, or one PNG text chunk
# per setting): Fooocus, SwarmUI (``sui_image_params``), Draw Things (``c``/``uc``), Easy Diffusion; first found wins
ALIASES = {"prompt": ("prompt", "Prompt", "c"),
           "negative_prompt": ("negative_prompt", "negativeprompt", "Negative Prompt", "uc"),
           "model": ("base_model", "model", "use_stable_diffusion_model", "Stable Diffusion model"),
           "seed": ("seed", "Seed"), "steps": ("steps", "num_inference_steps", "Steps"),
           "sampler": ("sampler", "sampler_name", "Sampler"),
           "cfg": ("guidance_scale", "cfg_scale", "cfgscale", "scale", "Guidance Scale"),
           "width": ("width", "Width"), "height": ("height", "Height")}


def keyed(tool: str, d: dict) -> dict | None:
    """Our fields from settings stored under names (see ``ALIASES``); values that are not scalars are skipped."""
    def get(field):
        return next((d[k] for k in ALIASES[field] if isinstance(d.get(k), (str, int, float)) and d[k] != ""), None)

    w, h = (get("width"), get("height")) if get("width") is not None else size(d.get("resolution") or d.get("size"))
    return info(tool, get("prompt"), get("negative_prompt"), get("model"), get("seed"), get("steps"),
                 get("sampler"), get("cfg"), w, h)


def json_tool(obj: dict) -> str:
    fooocus = {"base_model", "full_prompt"} & obj.keys() or "Fooocus" in str(obj.get("version"))
    easy = {"use_stable_diffusion_model", "num_inference_steps"} & obj.keys()
    return "drawthings" if "c" in obj and "prompt" not in obj else "easydiffusion" if easy else \
        "fooocus" if fooocus else "other"


def midjourney(text: str) -> dict | None:
    """Midjourney's ``Description``: ``<image URLs> <prompt> --ar 2:1 --v 6 Job ID: <uuid>``."""
    body = text.split("Job ID:")[0]
    prompt = re.split(r"\s--[a-z]", " " + body, maxsplit=1)[0]
    prompt = re.sub(r"^\s*(<?https?://\S+>?\s+)*", "", prompt)
    seed = re.search(r"--seed\s+(\d+)", body)
    version = re.search(r"--(v|niji)\s+([\d.]+)", body)
    negative = re.search(r"--no\s+(.*?)(?=\s--|$)", body.strip())
    model = f"Midjourney {'niji ' if version.group(1) == 'niji' else 'v'}{version.group(2)}" if version else None
    return info("midjourney", prompt, negative.group(1) if negative else None, model, seed.group(1) if seed else None)


MOCHI_KEYS = ("Exclude from Image", "Model", "Steps", "Guidance Scale", "Seed", "Size", "Scheduler",
              "ML Compute Unit", "Generator", "Upscaler")


def mochi(text: str) -> dict | None:
    """Mochi Diffusion (macOS, Core ML): ``Include in Image: <prompt>; Exclude from Image: <negative>; Model: ...;
    Steps: 20; Guidance Scale: 7.5; Seed: 42; Size: 512x512; ...; Generator: Mochi Diffusion 4.x`` in the image
    description. A key is only a key after ``"; "`` (prompts contain semicolons too)."""
    keys = "|".join(re.escape(k) for k in MOCHI_KEYS)
    parts = re.split(rf";\s*(?=(?:{keys}):)", text.split("Include in Image:", 1)[-1])
    fields = dict(p.split(":", 1) for p in parts[1:])
    get = lambda k: fields.get(k, "").strip() or None
    w, h = size(get("Size"))
    return info("mochi", parts[0], get("Exclude from Image"), get("Model"), get("Seed"), get("Steps"),
                get("Scheduler"), get("Guidance Scale"), w, h)
