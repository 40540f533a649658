"""ComfyUI's API graph (the ``prompt`` chunk) traced by its input names: the image's positive prompt and settings.

sd-parsers (see :mod:`revsd.metadata`) finds a sampler only by its ``sampler_name``/``steps``/``cfg`` inputs, so it
reads nothing from the graphs ComfyUI's own Flux, SD3.5 and HiDream examples use: ``SamplerCustomAdvanced`` with
its ``guider`` (``BasicGuider``/``CFGGuider``), ``noise``, ``sampler`` and ``sigmas`` nodes. :func:`read` handles
those and every ``KSampler``-style graph:

- **the sampler**: a node with a ``positive`` or ``guider`` link; of several (a hires-fix pass, a refiner), the one
  whose ``latent_image`` is an empty latent (the first pass), then any with a latent or guider (not a conditioning
  node such as a ControlNet's), then the lowest node id;
- **the prompt**: from its ``positive`` (or the guider's ``positive``/``conditioning``) back along every link but
  models, CLIPs, images, masks and latents, to the nodes holding text (``text``, SDXL's ``text_g``/``text_l``,
  Flux's ``t5xxl``/``clip_l``, ...); a text input linked to a string node (``PrimitiveString``, a text or
  concatenation node) is resolved. A node that carries both prompts (``ControlNetApplyAdvanced``, video and edit
  conditioning, loaders taking both as strings) passes on only the one asked for: sd-parsers followed both, and
  behind a ControlNet returned the negative inside the positive. Several texts (area composition, GLIGEN boxes,
  SDXL's two encoders) are joined with ", ", upstream first, each once;
- **the settings**: seed, steps, cfg and sampler from the sampler or the nodes it links to (``RandomNoise``,
  ``BasicScheduler``, ``CFGGuider``, ``KSamplerSelect``); the model from the first loader up its ``model`` links;
  the size from the empty latent.
"""

from __future__ import annotations

# inputs holding prompt text, in order of preference (``populated_text``: Impact Pack's wildcards, as resolved)
TEXT_KEYS = ("populated_text", "text", "text_g", "text_l", "t5xxl", "clip_l", "prompt", "positive_prompt",
             "text_positive", "string", "value")
# links never followed when looking for the prompt: they lead to models, encoders, pixels and latents
NOT_CONDITIONING = {"clip", "model", "vae", "image", "images", "pixels", "mask", "control_net", "clip_vision",
                    "clip_vision_output", "style_model", "upscale_model", "samples", "latent", "latent_image",
                    "noise", "sigmas", "sampler", "unet"}


def _link(graph: dict, v) -> str | None:
    """The node id a ``[node_id, output]`` input points at, if that node exists."""
    if isinstance(v, list) and len(v) == 2 and str(v[0]) in graph:
        return str(v[0])
    return None


def _inputs(graph: dict, nid: str | None) -> dict:
    node = graph.get(nid) if nid is not None else None
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _string(graph: dict, v, seen: set) -> str | None:
    """A text input's value: the string itself, or what the string node it links to holds."""
    if isinstance(v, str):
        return v
    nid = _link(graph, v)
    if nid is None or nid in seen:
        return None
    seen.add(nid)
    inputs = _inputs(graph, nid)
    for k in TEXT_KEYS:
        if k in inputs and (s := _string(graph, inputs[k], seen)) is not None:
            return s
    parts = [s for k, x in inputs.items() if k.startswith(("text", "string"))  # concatenation nodes
             if (s := _string(graph, x, seen))]
    sep = inputs.get("delimiter", ", ")
    return (sep if isinstance(sep, str) else ", ").join(parts) or None


def _texts(graph: dict, nid: str | None, role: str, seen: set) -> list[str]:
    """Every ``role`` (positive/negative) prompt text reachable from a conditioning node, upstream texts first.

    A node carrying both a ``positive`` and a ``negative`` input (``ControlNetApplyAdvanced``, video and edit
    conditioning nodes, loaders that take both prompts as strings) passes on only the one of this role."""
    if nid is None or nid in seen:
        return []
    seen.add(nid)
    inputs = _inputs(graph, nid)
    paired = "positive" in inputs and "negative" in inputs
    if paired:
        own = [inputs[role].strip()] if isinstance(inputs[role], str) else []
        skip = NOT_CONDITIONING | {"positive", "negative"} - ({role} if not own else set())
    else:
        own = [s.strip() for k in TEXT_KEYS if k in inputs and (s := _string(graph, inputs[k], set(seen)))]
        skip = NOT_CONDITIONING | set(TEXT_KEYS)
    upstream = [t for k, v in inputs.items() if k not in skip for t in _texts(graph, _link(graph, v), role, seen)]
    return upstream + own


def _joined(texts: list[str]) -> str | None:
    unique = [t for i, t in enumerate(texts) if t and t not in texts[:i]]
    return ", ".join(unique) or None


def _value(graph: dict, inputs: dict, keys: tuple, via: tuple = (), depth: int = 8):
    """The first plain value under ``keys`` in ``inputs``, else in the nodes linked by the inputs named ``via``."""
    for k in keys:
        if k in inputs and not isinstance(inputs[k], list):
            return inputs[k]
    if depth:
        for name in via:
            nid = _link(graph, inputs.get(name))
            if nid is not None and (v := _value(graph, _inputs(graph, nid), keys, via, depth - 1)) is not None:
                return v
    return None


def _samplers(graph: dict) -> list[str]:
    found = [nid for nid in graph if any(_link(graph, _inputs(graph, nid).get(k)) for k in ("positive", "guider"))]

    def rank(nid):  # first-pass samplers, then other samplers, then conditioning nodes with a positive input
        latent_id = _link(graph, _inputs(graph, nid).get("latent_image"))
        latent = graph[latent_id] if latent_id is not None else {}
        empty = isinstance(latent, dict) and "Empty" in str(latent.get("class_type", ""))
        sampler = latent_id is not None or _link(graph, _inputs(graph, nid).get("guider")) is not None
        return not empty, not sampler, int(nid) if nid.isdigit() else float("inf"), nid

    return sorted(found, key=rank)


def read(graph: dict) -> dict | None:
    """``{"prompt", "negative_prompt", "model", "seed", "steps", "sampler", "cfg", "width", "height"}`` of the
    graph's first-pass sampler, or ``None`` when no sampler's positive conditioning reaches a text."""
    for nid in _samplers(graph):
        inputs = _inputs(graph, nid)
        guider = _inputs(graph, _link(graph, inputs.get("guider")))
        cond = {**guider, **inputs}
        positive = cond.get("positive", guider.get("conditioning"))
        prompt = _joined(_texts(graph, _link(graph, positive), "positive", set()))
        if not prompt:
            continue
        negative = _joined(_texts(graph, _link(graph, cond.get("negative")), "negative", set()))
        latent = _inputs(graph, _link(graph, inputs.get("latent_image")))
        return {"prompt": prompt, "negative_prompt": negative,
                "model": _value(graph, cond, ("ckpt_name", "unet_name"), ("model",)),
                "seed": _value(graph, inputs, ("seed", "noise_seed"), ("noise", "seed")),
                "steps": _value(graph, inputs, ("steps",), ("sigmas",)),
                "sampler": _value(graph, inputs, ("sampler_name",), ("sampler",)),
                "cfg": _value(graph, cond, ("cfg",)),
                "width": _value(graph, latent, ("width",)), "height": _value(graph, latent, ("height",))}
    return None
