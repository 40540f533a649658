"""ComfyUI's UI ``workflow`` chunk rebuilt as the API graph ComfyUI would queue, for :func:`revsd.comfy.read`.

**The UI's workflow alone** (a file with a ``workflow`` chunk and no ``prompt``): :func:`from_workflow` rebuilds the
API graph (links, reroutes, bypassed and muted nodes, primitives, subgraphs expanded with the values their node
sets) and :func:`revsd.comfy.read` traces it. The UI stores widget values by position only: their names come from
the node's widget inputs (newer UIs list every widget) or from :data:`WIDGETS` (the core nodes the tracer reads);
a node whose names are unknown, or whose stored values do not match them, contributes no values (nothing is
guessed); fields of other shapes than ComfyUI writes are left out, never raised on. On 25 public UI workflows
stored beside their API export (``bench/bench_comfy_workflows.py``) the API graph has a prompt in 16; the UI
workflow alone gave the same prompt in 13, another in 1 (whose API file was edited after export: its prompt is
nowhere in the UI file) and none in 2 (a custom text encoder the table does not know; a prompt typed into the API
file only). Never a prompt the API lacks. On 4 official templates built from subgraphs
(``bench/bench_comfy_subgraphs.py``; no API export beside them): a prompt from each (none before subgraphs were
expanded), each a text stored in the file.
"""

from __future__ import annotations

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


def _key(v):
    """``v`` when it can be a node or link id (an int or a string), else ``None``."""
    return v if isinstance(v, (int, str)) and not isinstance(v, bool) else None


def _text(v):
    return v if isinstance(v, str) else None


def _links(links) -> dict:
    """``link id -> [origin id, origin slot, target id, target slot, type]`` for both link layouts (lists; objects
    since v1, and inside subgraphs); links of other shapes are left out."""
    out = {}
    for ln in links if isinstance(links, list) else []:
        if isinstance(ln, list) and len(ln) >= 6:
            lid, row = ln[0], ln[1:6]
        elif isinstance(ln, dict):
            lid, row = ln.get("id"), [ln.get(k) for k in ("origin_id", "origin_slot", "target_id", "target_slot",
                                                          "type")]
        else:
            continue
        if _key(lid) is not None and _key(row[0]) is not None:
            out[lid] = [row[0], _key(row[1]), _key(row[2]), _key(row[3]), _text(row[4])]
    return out


def _nodes(nodes) -> list[dict]:
    """The nodes of a UI graph in the shapes read here (a node without an id is left out; odd fields become empty)."""
    out = []
    for n in nodes if isinstance(nodes, list) else []:
        if isinstance(n, dict) and _key(n.get("id")) is not None:
            ins = [{**i, "name": _text(i.get("name")), "type": _text(i.get("type")), "link": _key(i.get("link")),
                    "widget": i["widget"] if isinstance(i.get("widget"), dict) else None}
                   for i in n.get("inputs") if isinstance(i, dict)] if isinstance(n.get("inputs"), list) else []
            props = n.get("properties") if isinstance(n.get("properties"), dict) else {}
            out.append({**n, "type": _text(n.get("type")), "inputs": ins, "properties": props,
                        "mode": n.get("mode") if isinstance(n.get("mode"), int) else 0})
    return out


def _sub_inputs(d: dict) -> list:
    """A subgraph definition's inputs (their slots are their positions; an odd entry keeps its slot, unnamed)."""
    return [i if isinstance(i, dict) else {} for i in d.get("inputs")] if isinstance(d.get("inputs"), list) else []


def _instance_values(node: dict, d: dict, nodes: list[dict], rows: dict) -> dict:
    """A subgraph instance's values by subgraph input name: the widgets it promotes (``proxyWidgets`` entries
    ``["-1", name]``, in the order of its stored values), its widget inputs (:func:`_widget_values`), or (frontend
    1.24) one value per subgraph input that feeds a widget inside, in the subgraph's input order (``nodes``,
    ``rows``: the definition's own nodes and links, as :func:`_nodes` and :func:`_links` read them)."""
    values, proxy = node.get("widgets_values"), (node.get("properties") or {}).get("proxyWidgets")
    if isinstance(values, list) and isinstance(proxy, list) and len(proxy) == len(values):
        return {p[1]: v for p, v in zip(proxy, values)
                if isinstance(p, list) and len(p) == 2 and str(p[0]) == "-1" and isinstance(p[1], str)}
    fed = {rows[i["link"]][1] for m in nodes for i in m["inputs"]
           if i["widget"] is not None and rows.get(i["link"], [None])[0] == SUB_IN}
    names = [_text(i.get("name")) for k, i in enumerate(_sub_inputs(d)) if k in fed]
    return _widget_values(node) or (_by_position(names, values) if isinstance(values, list) else {})


def _expand(nodes: list, links: dict, defs: dict, depth: int = 0) -> tuple[list, dict]:
    """``(nodes, links)`` with every subgraph instance replaced by its nodes, recursively: inner ids become
    ``"<instance>:<inner>"`` (as in ComfyUI's API export), an inner input fed by the subgraph's input takes the
    instance's link or value there (an instance that stores no values at all, as the 2026 templates save them:
    the interior node's own; else none, never a stale interior value), the instance's outputs come
    from the inner nodes that feed them, and a muted or bypassed instance mutes or bypasses its nodes."""
    out, links = [], dict(links)
    for n in nodes:
        d = defs.get(n["type"]) if depth < SUB_DEPTH else None
        if d is None:
            out.append(n)
            continue
        iid, pre = n["id"], (lambda x, i=n["id"]: f"{i}:{x}")
        own_nodes, own_rows = _nodes(d.get("nodes")), _links(d.get("links"))
        values = _instance_values(n, d, own_nodes, own_rows)
        inner, rows = _expand(own_nodes, own_rows, defs, depth + 1)
        rows = {pre(k): [o if o == SUB_IN else pre(o), os_, t if t == SUB_OUT else pre(t), ts, typ]
                for k, (o, os_, t, ts, typ) in rows.items()}
        names = [_text(i.get("name")) for i in _sub_inputs(d)]
        fed = {i["name"]: i["link"] for i in n["inputs"] if i["name"] is not None}
        inside = not n.get("widgets_values")  # newer UIs keep the values on the interior nodes, the instance none
        for m in inner:
            m = {**m, "id": pre(m["id"]), "inputs": [dict(i) for i in m["inputs"]]}
            if n.get("mode") in (MUTED, BYPASSED):
                m["mode"] = n["mode"]
            for i in m["inputs"]:
                row = rows.get(pre(i["link"])) if i["link"] is not None else None
                i["link"] = None if row is None else pre(i["link"])
                if row is not None and row[0] == SUB_IN:
                    name = names[row[1]] if isinstance(row[1], int) and 0 <= row[1] < len(names) else None
                    i["link"] = fed.get(name)
                    if i["link"] is None and i["name"] is not None and not inside:
                        m["_values"] = {**m.get("_values", {}), i["name"]: values.get(name)}
            out.append(m)
        outputs = {r[3]: r[:2] for r in rows.values() if r[2] == SUB_OUT and r[0] != SUB_IN and r[3] is not None}
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
    listed = [i["widget"]["name"] for i in node["inputs"] if i["widget"] and _text(i["widget"].get("name"))]
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
    defs = {d["id"]: d for d in defs if isinstance(d, dict) and _text(d.get("id"))} if isinstance(defs, list) else {}
    found, rows = _expand(_nodes(wf.get("nodes")), _links(wf.get("links")), defs)
    nodes = {n["id"]: n for n in found}
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
