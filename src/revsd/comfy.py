"""ComfyUI's API graph (the ``prompt`` chunk) traced by its input names: the image's positive prompt and settings.

sd-parsers (see :mod:`revsd.metadata`) finds a sampler only by its ``sampler_name``/``steps``/``cfg`` inputs, so it
reads nothing from the graphs ComfyUI's own Flux, SD3.5 and HiDream examples use: ``SamplerCustomAdvanced`` with
its ``guider`` (``BasicGuider``/``CFGGuider``), ``noise``, ``sampler`` and ``sigmas`` nodes; and it follows every
conditioning link, so behind a ``ControlNetApplyAdvanced`` (which carries both prompts) it returned the negative
prompt inside the positive one. :func:`read`:

- **the sampler**: a node with a ``positive``, ``guider``, ``latent_image`` or ``text_embeds`` link; of several (a
  hires-fix pass, a refiner), the one whose ``latent_image`` is an empty latent (the first pass), then any with a
  latent or guider (not a conditioning node such as a ControlNet's), then the lowest node id;
- **the prompt**: from the sampler back along every link but models, CLIPs, images, masks, latents and noise, to
  the nodes holding text (``text``, SDXL's ``text_g``/``text_l``, Flux's ``t5xxl``/``clip_l``, HiDream's
  ``clip_g``/``llama``, Lumina 2's ``user_prompt`` (not its system prompt), ...); a text input
  linked to a string node (``PrimitiveString``, prompt, styler or concatenation nodes) is resolved. A node with
  both a positive and a negative input (any input named ``*positive*`` and one ``*negative*``: samplers,
  ``ControlNetApplyAdvanced``, video/edit/inpaint conditioning, prompt stylers, loaders and tuples that carry both
  prompts) passes on only the one asked for; ``ConditioningZeroOut`` (SD3/Flux/Qwen's empty negative) holds no
  text. Text written at run time (a captioner reading an image, a language model) is not in the graph: its task
  prompt is never taken for the image's. Several texts (area composition, GLIGEN boxes, SDXL's two encoders) are
  joined with ", ", upstream first, each once;
- **the settings**: seed, steps, cfg and sampler from the sampler or the nodes it links to (``RandomNoise``,
  ``BasicScheduler``, ``CFGGuider``, ``KSamplerSelect``, seed nodes); the model from the first loader up its
  ``model`` links; the size from the empty latent;
- **no sampler**: a node holding its own prompt and seed (ComfyUI's nodes for hosted models, all-in-one nodes).

Checked on 63 real API-format graphs from public repositories (``bench/bench_comfy_graphs.py``; the graphs are not
stored here, the bench lists where they come from), against sd-parsers (links rebuilt from the graph): a prompt
from 56 of them, sd-parsers from 30; the other 7 hold no text (templates with empty prompts, background removal,
3D from an image). Where both found one (30 graphs), sd-parsers put the positive prompt inside the negative in 4
(behind ``ConditioningZeroOut`` or ControlNet nodes) and appended the negative to the positive in 2 (ControlNet;
one of those negatives was empty, leaving a trailing comma); this module did neither.

**The UI's workflow alone** (a file with a ``workflow`` chunk and no ``prompt``): :func:`from_workflow`
(:mod:`revsd.comfy_workflow`) rebuilds the API graph, which :func:`read` traces.
"""

from __future__ import annotations

from revsd.comfy_workflow import from_workflow  # noqa: F401  (the UI's workflow -> the API graph read here)

# inputs holding prompt text, in order of preference (``populated_text``: Impact Pack's wildcards, as resolved)
TEXT_KEYS = ("populated_text", "text", "text_g", "text_l", "t5xxl", "clip_l", "clip_g", "llama", "prompt",
             "positive_prompt", "user_prompt", "text_positive", "string", "value")
# links never followed when looking for the prompt: they lead to models, encoders, pixels, latents and noise
NOT_CONDITIONING = {"clip", "model", "vae", "image", "images", "pixels", "mask", "control_net", "clip_vision",
                    "clip_vision_output", "style_model", "upscale_model", "samples", "latent", "latent_image",
                    "noise", "sigmas", "sampler", "unet"}
NO_TEXT = {"ConditioningZeroOut"}  # conditioning nodes whose output holds none of their input's text
OTHER = {"positive": "negative", "negative": "positive"}
# DualCFGGuider's middle condition: cond1 holds the prompt; cond2 an image's or (its text-only templates) the negative
SECONDARY = {"cond2"}
LLM_INPUTS = {"temperature", "top_p", "max_tokens", "max_new_tokens"}  # a node sampling text from a language model


def _link(graph: dict, v) -> str | None:
    """The node id a ``[node_id, output]`` input points at, if that node exists."""
    if isinstance(v, list) and len(v) == 2 and str(v[0]) in graph:
        return str(v[0])
    return None


def _inputs(graph: dict, nid: str | None) -> dict:
    node = graph.get(nid) if nid is not None else None
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _paired(inputs: dict) -> bool:
    """Whether a node carries both prompts (an input named like ``*positive*`` and one like ``*negative*``)."""
    return any("positive" in k for k in inputs) and any("negative" in k for k in inputs)


def _string(graph: dict, v, role: str, seen: set) -> str | None:
    """A text input's value: the string itself, or what the string node it links to holds for this role."""
    if isinstance(v, str):
        return v
    nid = _link(graph, v)
    if nid is None or nid in seen:
        return None
    seen.add(nid)
    inputs = _inputs(graph, nid)
    if any(_link(graph, inputs.get(k)) for k in ("image", "images", "pixels")) or LLM_INPUTS & inputs.keys():
        return None  # a captioner's or a language model's text: written at run time, not stored in the graph
    named = {k.lower(): k for k in inputs}  # text nodes of some packs name it "Text"
    keys = [k for k in inputs if role in k] if _paired(inputs) else [named[k] for k in TEXT_KEYS if k in named]
    for k in keys:
        if (s := _string(graph, inputs[k], role, seen)) is not None:
            return s
    parts = [_string(graph, x, role, seen) for k, x in inputs.items()
             if k.lower().startswith(("text", "string"))]  # concatenation nodes
    if None in parts:  # a part written at run time (or unreadable): the joined text is not in the graph
        return None
    sep = inputs.get("delimiter", ", ")
    return (sep if isinstance(sep, str) else ", ").join(p for p in parts if p) or None


def _texts(graph: dict, nid: str | None, role: str, seen: set, named: bool) -> list[str]:
    """Every ``role`` (positive/negative) prompt text reachable from a node, upstream texts first. ``named``: the
    path got here through an input named for the role; an unnamed conditioning (a ``BasicGuider``'s) is positive."""
    node = graph.get(nid) if nid is not None else None
    if nid in seen or not isinstance(node, dict) or str(node.get("class_type")) in NO_TEXT:
        return []
    seen.add(nid)
    inputs = _inputs(graph, nid)
    if _paired(inputs):  # take or follow this role's inputs only
        own = [v.strip() for k, v in inputs.items() if role in k and isinstance(v, str)]
        skip = NOT_CONDITIONING | {k for k, v in inputs.items() if OTHER[role] in k or isinstance(v, str)}
        follow = [(k, named or role in k) for k in inputs if k not in skip]
    else:
        own = [s.strip() for k in TEXT_KEYS if k in inputs and (s := _string(graph, inputs[k], role, set(seen)))]
        own = own if named or role == "positive" else []
        follow = [(k, named or role in k) for k in inputs
                  if k not in NOT_CONDITIONING | set(TEXT_KEYS) | SECONDARY and OTHER[role] not in k]
    upstream = [t for k, n in follow for t in _texts(graph, _link(graph, inputs[k]), role, seen, n)]
    return upstream + own


def _joined(texts: list[str]) -> str | None:
    unique = [t for i, t in enumerate(texts) if t and t not in texts[:i]]
    return ", ".join(unique) or None


def _value(graph: dict, inputs: dict, keys: tuple, via: tuple = (), depth: int = 8):
    """The first plain value under ``keys`` in ``inputs`` (or in the node such an input links to), else in the
    nodes linked by the inputs named ``via``."""
    for k in keys:
        v = inputs.get(k)
        if v is not None and not isinstance(v, list):
            return v
        linked = _inputs(graph, _link(graph, v)).get(k)  # e.g. a seed from a seed node
        if linked is not None and not isinstance(linked, list):
            return linked
    if depth:
        for name in via:
            nid = _link(graph, inputs.get(name))
            if nid is not None and (v := _value(graph, _inputs(graph, nid), keys, via, depth - 1)) is not None:
                return v
    return None


def _order(nid: str) -> tuple:
    """Node ids in the order ComfyUI numbers them (numeric ids first, by value)."""
    return int(nid) if nid.isdigit() else float("inf"), nid


def _samplers(graph: dict) -> list[str]:
    links = ("positive", "guider", "latent_image", "text_embeds")
    found = [nid for nid in graph if isinstance(graph[nid], dict)
             and any(_link(graph, _inputs(graph, nid).get(k)) for k in links)]

    def rank(nid):  # first-pass samplers, then other samplers, then conditioning nodes with a positive input
        latent_id = _link(graph, _inputs(graph, nid).get("latent_image"))
        latent = graph[latent_id] if latent_id is not None else {}
        empty = isinstance(latent, dict) and "Empty" in str(latent.get("class_type", ""))
        sampler = latent_id is not None or _link(graph, _inputs(graph, nid).get("guider")) is not None
        return not empty, not sampler, *_order(nid)

    return sorted(found, key=rank)


def read(graph: dict) -> dict | None:
    """``{"prompt", "negative_prompt", "model", "seed", "steps", "sampler", "cfg", "width", "height"}`` of the
    graph's first-pass sampler, or ``None`` when no sampler's positive side reaches a text."""
    for nid in _samplers(graph):
        prompt = _joined(_texts(graph, nid, "positive", set(), True))
        if not prompt:
            continue
        inputs = _inputs(graph, nid)
        cond = {**_inputs(graph, _link(graph, inputs.get("guider"))), **inputs}
        latent = _inputs(graph, _link(graph, inputs.get("latent_image")))
        return {"prompt": prompt, "negative_prompt": _joined(_texts(graph, nid, "negative", set(), False)),
                "model": _value(graph, cond, ("ckpt_name", "unet_name"), ("model",)),
                "seed": _value(graph, inputs, ("seed", "noise_seed"), ("noise",)),
                "steps": _value(graph, inputs, ("steps",), ("sigmas",)),
                "sampler": _value(graph, inputs, ("sampler_name",), ("sampler",)),
                "cfg": _value(graph, cond, ("cfg",)),
                "width": _value(graph, latent, ("width",)), "height": _value(graph, latent, ("height",))}
    return _generator(graph)


def _generator(graph: dict) -> dict | None:
    """No sampler: a node that generates from its own prompt and seed (ComfyUI's nodes for hosted models, such as
    ``FluxProUltraImageNode`` or ``OpenAIGPTImage1``, and all-in-one custom nodes) and whose output is an image
    (another node's ``images``/``image`` input: not, say, a language model writing text)."""
    makes_images = {_link(graph, _inputs(graph, n).get(k)) for n in graph for k in ("images", "image", "pixels")}
    for nid in sorted(graph, key=_order):
        inputs = _inputs(graph, nid)
        if nid not in makes_images:
            continue
        prompt = next((inputs[k] for k in ("prompt", "positive_prompt", "positive") if isinstance(inputs.get(k), str)
                       and inputs[k].strip()), None)
        if prompt and ("seed" in inputs or "noise_seed" in inputs):
            negative = next((inputs[k] for k in ("negative_prompt", "negative") if isinstance(inputs.get(k), str)),
                            None)
            model = next((inputs[k] for k in ("model", "ckpt_name") if isinstance(inputs.get(k), str)), None)
            return {"prompt": prompt.strip(), "negative_prompt": (negative or "").strip() or None, "model": model,
                    "seed": _value(graph, inputs, ("seed", "noise_seed")), "steps": _value(graph, inputs, ("steps",)),
                    "sampler": _value(graph, inputs, ("sampler_name",)),
                    "cfg": _value(graph, inputs, ("cfg", "cfg_scale", "guidance")),
                    "width": _value(graph, inputs, ("width",)), "height": _value(graph, inputs, ("height",))}
    return None
