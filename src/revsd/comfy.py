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

**The UI's workflow alone** (a file with a ``workflow`` chunk and no ``prompt``): :func:`from_workflow` rebuilds the
API graph (links, reroutes, bypassed and muted nodes, primitives, subgraphs expanded with the values their node
sets) and :func:`read` traces it. The UI stores widget values by position only: their names come from the node's
widget inputs (newer UIs list every widget) or from :data:`WIDGETS` (the core nodes the tracer reads); a node whose
names are unknown, or whose stored values do not match them, contributes no values (nothing is guessed). On 25
public UI workflows stored beside their API export (``bench/bench_comfy_workflows.py``) the API graph has a prompt
in 16; the UI workflow alone gave the same prompt in 13, another in 1 (whose API file was edited after export: its
prompt is nowhere in the UI file) and none in 2 (a custom text encoder the table does not know; a prompt typed into
the API file only). Never a prompt the API lacks. On 4 official templates built from subgraphs
(``bench/bench_comfy_subgraphs.py``; no API export beside them): a prompt from each (none before subgraphs were
expanded), each a text stored in the file.
"""

from __future__ import annotations

# inputs holding prompt text, in order of preference (``populated_text``: Impact Pack's wildcards, as resolved)
TEXT_KEYS = ("populated_text", "text", "text_g", "text_l", "t5xxl", "clip_l", "clip_g", "llama", "prompt",
             "positive_prompt", "user_prompt", "text_positive", "string", "value")
# links never followed when looking for the prompt: they lead to models, encoders, pixels, latents and noise
NOT_CONDITIONING = {"clip", "model", "vae", "image", "images", "pixels", "mask", "control_net", "clip_vision",
                    "clip_vision_output", "style_model", "upscale_model", "samples", "latent", "latent_image",
                    "noise", "sigmas", "sampler", "unet"}
NO_TEXT = {"ConditioningZeroOut"}  # conditioning nodes whose output holds none of their input's text
OTHER = {"positive": "negative", "negative": "positive"}
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
    if nid in seen or not isinstance(node, dict) or node.get("class_type") in NO_TEXT:
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
        follow = [(k, named) for k in inputs if k not in NOT_CONDITIONING | set(TEXT_KEYS)]
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


# --------------------------------------------------------------------------- the UI's workflow (``workflow`` chunk)

# Widget names of the nodes the tracer reads, in the order of their ``widgets_values`` (the UI stores values by
# position). A seed widget is followed by its "control after generate" value, which the UI stores too.
WIDGETS = {
    "CLIPTextEncode": ("text",),
    "CLIPTextEncodeSDXL": ("width", "height", "crop_w", "crop_h", "target_width", "target_height", "text_g", "text_l"),
    "CLIPTextEncodeSDXLRefiner": ("ascore", "width", "height", "text"),
    "CLIPTextEncodeFlux": ("clip_l", "t5xxl", "guidance"),
    "CLIPTextEncodeSD3": ("clip_l", "clip_g", "t5xxl", "empty_padding"),
    "CLIPTextEncodeHiDream": ("clip_l", "clip_g", "t5xxl", "llama"),
    "CLIPTextEncodeLumina2": ("system_prompt", "user_prompt"),
    "KSampler": ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "KSamplerAdvanced": ("add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "start_at_step",
                         "end_at_step", "return_with_leftover_noise"),
    "CheckpointLoaderSimple": ("ckpt_name",),
    "UNETLoader": ("unet_name", "weight_dtype"),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "EmptySD3LatentImage": ("width", "height", "batch_size"),
    "RandomNoise": ("noise_seed",),
    "KSamplerSelect": ("sampler_name",),
    "BasicScheduler": ("scheduler", "steps", "denoise"),
    "CFGGuider": ("cfg",),
    "SamplerCustom": ("add_noise", "noise_seed", "cfg"),
    "LTXVScheduler": ("steps", "max_shift", "base_shift", "stretch", "terminal"),
    "PhotoMakerEncode": ("text",),
    "FluxGuidance": ("guidance",),
    "PrimitiveString": ("value",),
    "PrimitiveStringMultiline": ("value",),
}
CONTROL = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
PASS_THROUGH = {"Reroute"}  # UI-only nodes that forward their input's link
MUTED, BYPASSED = 2, 4  # node modes: left out of the API graph; a bypassed node passes its input of the same type on


SUB_IN, SUB_OUT, SUB_DEPTH = -10, -20, 8  # a subgraph's input and output nodes; nesting expanded at most this deep


def _links(links) -> dict:
    """``link id -> [origin id, origin slot, target id, target slot, type]`` for both link layouts (lists; objects
    since v1, and inside subgraphs)."""
    out = {}
    for ln in links if isinstance(links, list) else []:
        if isinstance(ln, list) and len(ln) >= 6 and isinstance(ln[0], (int, str)):
            out[ln[0]] = list(ln[1:6])
        elif isinstance(ln, dict) and "origin_id" in ln:
            out[ln.get("id")] = [ln["origin_id"], ln.get("origin_slot", 0), ln.get("target_id"),
                                 ln.get("target_slot"), ln.get("type")]
    return out


def _instance_values(node: dict, d: dict) -> dict:
    """A subgraph instance's values by subgraph input name: the widgets it promotes (``proxyWidgets`` entries
    ``["-1", name]``, in the order of its stored values), its widget inputs (:func:`_widget_values`), or (frontend
    1.24) one value per subgraph input that feeds a widget inside, in the subgraph's input order."""
    values, proxy = node.get("widgets_values"), (node.get("properties") or {}).get("proxyWidgets")
    if isinstance(values, list) and isinstance(proxy, list) and len(proxy) == len(values):
        return {p[1]: v for p, v in zip(proxy, values) if isinstance(p, list) and len(p) == 2 and str(p[0]) == "-1"}
    rows = _links(d.get("links"))
    fed = {rows[i["link"]][1] for m in d.get("nodes") or [] if isinstance(m, dict) for i in m.get("inputs") or []
           if isinstance(i, dict) and isinstance(i.get("widget"), dict) and isinstance(i.get("link"), (int, str))
           and rows.get(i["link"], [None])[0] == SUB_IN}
    names = [i.get("name") for k, i in enumerate(d.get("inputs") or []) if k in fed and isinstance(i, dict)]
    return _widget_values(node) or (_by_position(names, values) if isinstance(values, list) else {})


def _expand(nodes: list, links: dict, defs: dict, depth: int = 0) -> tuple[list, dict]:
    """``(nodes, links)`` with every subgraph instance replaced by its nodes, recursively: inner ids become
    ``"<instance>:<inner>"`` (as in ComfyUI's API export), an inner input fed by the subgraph's input takes the
    instance's link or value there (no value: none, never the inner node's stale one), the instance's outputs come
    from the inner nodes that feed them, and a muted or bypassed instance mutes or bypasses its nodes."""
    out, links = [], dict(links)
    for n in nodes:
        d = defs.get(n.get("type")) if isinstance(n.get("type"), str) and depth < SUB_DEPTH else None
        if not isinstance(d, dict):
            out.append(n)
            continue
        iid, pre = n.get("id"), (lambda x, i=n.get("id"): f"{i}:{x}")
        inner, rows = _expand([m for m in d.get("nodes") or [] if isinstance(m, dict) and "id" in m],
                              _links(d.get("links")), defs, depth + 1)
        rows = {pre(k): [o if o == SUB_IN else pre(o), os_, t if t == SUB_OUT else pre(t), ts, typ]
                for k, (o, os_, t, ts, typ) in rows.items()}
        names = [i.get("name") if isinstance(i, dict) else None for i in d.get("inputs") or []]
        fed = {i.get("name"): i.get("link") for i in n.get("inputs") or [] if isinstance(i, dict)}
        values = _instance_values(n, d)
        for m in inner:
            m = {**m, "id": pre(m["id"]), "inputs": [dict(i) for i in m.get("inputs") or [] if isinstance(i, dict)]}
            if n.get("mode") in (MUTED, BYPASSED):
                m["mode"] = n["mode"]
            for i in m["inputs"]:
                row = rows.get(pre(i.get("link"))) if i.get("link") is not None else None
                i["link"] = None if row is None else pre(i["link"])
                if row is not None and row[0] == SUB_IN:
                    name = names[row[1]] if isinstance(row[1], int) and 0 <= row[1] < len(names) else None
                    i["link"] = fed.get(name)
                    if i["link"] is None:
                        m["_values"] = {**m.get("_values", {}), i.get("name"): values.get(name)}
            out.append(m)
        outputs = {r[3]: r[:2] for r in rows.values() if r[2] == SUB_OUT and r[0] != SUB_IN}
        links.update((k, r) for k, r in rows.items() if r[0] != SUB_IN and r[2] != SUB_OUT)
        for k, r in links.items():
            if r[0] == iid:
                links[k] = [*outputs.get(r[1], (None, 0)), *r[2:]]
    return out, links


def _widget_values(node: dict) -> dict:
    """A node's widget values by name: from its widget inputs (``"widget": {"name": ...}``, which newer UIs list for
    every widget, in order), else from :data:`WIDGETS`. Only when the names account for every stored value (a seed's
    "control after generate" value included): a node of another version, whose values would shift, gives ``{}``."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        return dict(values)
    if not isinstance(values, list):
        return {}
    listed = [i["widget"]["name"] for i in node.get("inputs") or [] if isinstance(i, dict)
              and isinstance(i.get("widget"), dict) and i["widget"].get("name")]
    return _by_position(listed, values) or _by_position(WIDGETS.get(node.get("type"), ()), values)


def _by_position(names, values: list) -> dict:
    """``values`` named in order by ``names`` (a seed's "control after generate" value skipped), or ``{}`` unless
    the names account for every value."""
    out, pos = {}, 0
    for name in names:
        if pos >= len(values):
            break
        out[name] = values[pos]
        pos += 1
        if "seed" in str(name) and pos < len(values) and isinstance(values[pos], str) and values[pos] in CONTROL:
            pos += 1
    return out if names and len(out) == len(names) and pos == len(values) else {}


def from_workflow(wf: dict) -> dict:
    """The API graph that ComfyUI would queue for a UI ``workflow``: node id -> ``{"class_type", "inputs"}``, links
    as ``[node id, slot]``, widget values by name (:func:`_widget_values`), reroutes and bypassed nodes passed
    through, muted nodes and UI-only primitives left out (a primitive's value is copied into the inputs it feeds).
    Subgraphs (``definitions.subgraphs``) are expanded first (:func:`_expand`)."""
    defs = (wf.get("definitions") or {}).get("subgraphs") if isinstance(wf.get("definitions"), dict) else None
    defs = {d.get("id"): d for d in defs if isinstance(d, dict)} if isinstance(defs, list) else {}
    found, rows = _expand([n for n in wf.get("nodes") or [] if isinstance(n, dict)], _links(wf.get("links")), defs)
    nodes = {n["id"]: n for n in found if isinstance(n.get("id"), (int, str))}
    links = {k: (r[0], r[1], r[4]) for k, r in rows.items()}

    def origin(link_id, want=None, depth=0):
        """The real node and slot behind a link, through reroutes and bypassed nodes; a primitive's value."""
        if link_id not in links or depth > 50:
            return None
        nid, slot, typ = links[link_id]
        node = nodes.get(nid)
        if node is None or node.get("mode") == MUTED:
            return None
        ins = [i for i in node.get("inputs") or [] if isinstance(i, dict)]
        if node.get("type") in PASS_THROUGH or node.get("mode") == BYPASSED:
            same = [i for i in ins if i.get("link") is not None and i.get("type") in (typ, want, "*")]
            return origin(same[0]["link"], typ, depth + 1) if same else None
        if node.get("type") == "PrimitiveNode":
            v = node.get("widgets_values")
            return ("value", v[0]) if isinstance(v, list) and v else None
        return ("link", [str(nid), slot])

    graph = {}
    for nid, node in nodes.items():
        if node.get("mode") in (MUTED, BYPASSED) or node.get("type") in PASS_THROUGH | {"PrimitiveNode"}:
            continue
        inputs = _widget_values(node)
        for k, v in (node.get("_values") or {}).items():  # set on the subgraph instance (None: unknown there)
            inputs.pop(k, None) if v is None else inputs.__setitem__(k, v)
        for i in node.get("inputs") or []:
            if isinstance(i, dict) and i.get("name") and i.get("link") is not None:
                got = origin(i["link"], i.get("type"))
                if got is not None:
                    inputs[i["name"]] = got[1]
        graph[str(nid)] = {"class_type": node.get("type"), "inputs": inputs}
    return graph
