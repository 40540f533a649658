"""ComfyUI's UI ``workflow`` alone (revsd.comfy_workflow): the API graph rebuilt from it (links, reroutes, bypassed
and muted nodes, primitives, subgraphs) and traced by revsd.comfy; through metadata.read on real PNGs."""

from __future__ import annotations

import json

from test_metadata import write_png

from revsd import comfy, metadata

UI_PROMPT = "beautiful scenery nature glass bottle landscape, purple galaxy bottle"


def ui_default() -> dict:
    """ComfyUI's default text-to-image workflow as the UI saves it (the ``workflow`` chunk)."""
    def node(nid, typ, inputs=(), widgets=None):
        return {"id": nid, "type": typ, "mode": 0, "outputs": [],
                "inputs": [{"name": n, "type": t, "link": ln} for n, t, ln in inputs],
                **({"widgets_values": widgets} if widgets is not None else {})}

    return {"last_node_id": 9, "last_link_id": 9, "version": 0.4, "nodes": [
        node(3, "KSampler", [("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
                             ("latent_image", "LATENT", 2)],
             [156680208700286, "randomize", 20, 8, "euler", "normal", 1]),
        node(4, "CheckpointLoaderSimple", widgets=["v1-5-pruned-emaonly.safetensors"]),
        node(5, "EmptyLatentImage", widgets=[512, 640, 1]),
        node(6, "CLIPTextEncode", [("clip", "CLIP", 3)], [UI_PROMPT]),
        node(7, "CLIPTextEncode", [("clip", "CLIP", 5)], ["text, watermark"]),
        node(8, "VAEDecode", [("samples", "LATENT", 7), ("vae", "VAE", 8)]),
        node(9, "SaveImage", [("images", "IMAGE", 9)], ["ComfyUI"])],
        "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
                  [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
                  [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]]}


UI_INFO = {"prompt": UI_PROMPT, "negative_prompt": "text, watermark", "model": "v1-5-pruned-emaonly.safetensors",
           "seed": 156680208700286, "steps": 20, "sampler": "euler", "cfg": 8, "width": 512, "height": 640}


def _ui_node(wf, nid):
    return next(n for n in wf["nodes"] if n["id"] == nid)


def _relink(wf, link_id, origin):
    """Point link ``link_id`` at another origin node (slot 0)."""
    for ln in wf["links"]:
        if ln[0] == link_id:
            ln[1], ln[2] = origin, 0


def test_ui_workflow_alone_through_metadata_read(tmp_path):
    r = metadata.read(write_png(tmp_path / "ui.png", {"workflow": json.dumps(ui_default())}))
    assert r.warning is None and r.info == {**UI_INFO, "tool": "comfyui"}
    objects = ui_default()  # the v1 layout: links as objects
    objects["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), ln))
                        for ln in objects["links"]]
    assert comfy.read(comfy.from_workflow(objects)) == UI_INFO


def test_ui_workflow_reroutes_primitives_bypassed_and_muted_nodes():
    wf = ui_default()
    wf["nodes"] += [{"id": 10, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 4}]},
                    {"id": 11, "type": "PrimitiveNode", "mode": 0, "inputs": [], "widgets_values": ["a red fox"]},
                    {"id": 12, "type": "LoraLoader", "mode": 4, "inputs": [  # bypassed: the checkpoint's model
                        {"name": "model", "type": "MODEL", "link": 13}, {"name": "clip", "type": "CLIP", "link": 14}],
                     "widgets_values": ["detail.safetensors", 1, 1]},
                    {"id": 13, "type": "KSampler", "mode": 2, "inputs": [  # muted: not part of the graph
                        {"name": "positive", "type": "CONDITIONING", "link": 15}],
                     "widgets_values": [1, "fixed", 5, 2, "euler", "normal", 1]},
                    {"id": 14, "type": "CLIPTextEncode", "mode": 0, "inputs": [], "widgets_values": ["muted text"]}]
    wf["links"] += [[10, 10, 0, 3, 1, "CONDITIONING"], [11, 11, 0, 6, 1, "STRING"], [12, 12, 0, 3, 0, "MODEL"],
                    [13, 4, 0, 12, 0, "MODEL"], [14, 4, 1, 12, 1, "CLIP"], [15, 14, 0, 13, 0, "CONDITIONING"]]
    _ui_node(wf, 3)["inputs"][1]["link"] = 10  # positive through the reroute
    _ui_node(wf, 3)["inputs"][0]["link"] = 12  # model through the bypassed LoRA
    _ui_node(wf, 6)["inputs"].append({"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 11})
    graph = comfy.from_workflow(wf)
    assert set(graph) == {"3", "4", "5", "6", "7", "8", "9", "14"}
    assert graph["3"]["inputs"]["model"] == ["4", 0] and graph["3"]["inputs"]["positive"] == ["6", 0]
    assert comfy.read(graph) == {**UI_INFO, "prompt": "a red fox"}  # the primitive's text, not the stale widget


def test_ui_workflow_widget_names_listed_or_unknown():
    wf = ui_default()  # newer UIs list every widget as an input: a node type the table does not know is read too
    enc = _ui_node(wf, 6)
    enc["type"] = "MyTextEncoder"
    enc["inputs"].append({"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": None})
    assert comfy.read(comfy.from_workflow(wf))["prompt"] == UI_PROMPT
    wf = ui_default()
    _ui_node(wf, 3)["widgets_values"].append("extra")  # another version of the node: its values would shift
    _ui_node(wf, 6)["type"] = "MyTextEncoder"  # unknown and unnamed: its text is not guessed
    assert comfy.read(comfy.from_workflow(wf)) is None
    _ui_node(wf, 6)["type"] = "CLIPTextEncode"
    info = comfy.read(comfy.from_workflow(wf))
    assert info["prompt"] == UI_PROMPT and info["seed"] is None and info["steps"] is None  # no shifted values


def test_ui_workflow_without_a_readable_prompt_claims_nothing(tmp_path):
    wf = ui_default()
    _ui_node(wf, 6)["type"] = "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"  # a subgraph whose definition is missing
    r = metadata.read(write_png(tmp_path / "sub.png", {"workflow": json.dumps(wf)}))
    assert r == metadata.MetadataResult(None, None)
    r = metadata.read(write_png(tmp_path / "bad.png", {"workflow": "{\"nodes\": ["}))
    assert r.info is None and "'workflow' metadata is malformed JSON" in r.warning
    odd = {"nodes": [{"id": [3]}, {"id": 3, "type": "KSampler", "widgets_values": [1, [2], 20, 8, "euler", "n", 1]}],
           "links": [[[1], 1, 0, 3, 0, "X"], "x"]}  # odd shapes: no values guessed, no exception
    assert comfy.from_workflow(odd) == {"3": {"class_type": "KSampler", "inputs": {}}}


def subgraphed(text_value=None, values=("a lighthouse at dusk", 42)) -> dict:
    """ComfyUI's default workflow packed into a subgraph as the UI (frontend ≥ 1.24) saves it: the instance promotes
    the subgraph's ``text`` and ``seed`` inputs (``proxyWidgets``), ``steps`` is an input it sets no value for, and the
    positive encoder sits in a nested subgraph fed from the outer one's ``text``. ``text_value``: feed ``text`` from an
    outer primitive instead of a promoted value."""
    wf = ui_default()
    inner = [n for n in wf["nodes"] if n["id"] != 9]
    sampler, pos = _ui_node(wf, 3), _ui_node(wf, 6)
    sampler["inputs"] += [{"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 30},
                          {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 31}]
    pos["widgets_values"] = ["stale text inside"]
    pos["inputs"].append({"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 1})
    nested = {"id": "sg-enc", "inputs": [{"name": "clip", "type": "CLIP"}, {"name": "text", "type": "STRING"}],
              "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING"}], "nodes": [{**pos, "inputs": [
                  {"name": "clip", "type": "CLIP", "link": 1}, {**pos["inputs"][1], "link": 2}]}],
              "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 6, "target_slot": 0, "type": "CLIP"},
                        {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 6, "target_slot": 1,
                         "type": "STRING"},
                        {"id": 3, "origin_id": 6, "origin_slot": 0, "target_id": -20, "target_slot": 0,
                         "type": "CONDITIONING"}]}
    enc = {"id": 16, "type": "sg-enc", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3},
                                                            {"name": "text", "type": "STRING", "link": 32}],
           "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}]}
    links = [ln for ln in wf["links"] if ln[0] != 9] + [
        [30, -10, 1, 3, 4, "INT"], [31, -10, 2, 3, 5, "INT"], [32, -10, 0, 16, 1, "STRING"],
        [33, 8, 0, -20, 0, "IMAGE"]]
    for ln in links:
        if ln[0] == 4:
            ln[1] = 16  # the positive conditioning now comes out of the nested subgraph
    outer = {"id": "sg-t2i", "inputs": [{"name": "text", "type": "STRING"}, {"name": "seed", "type": "INT"},
                                        {"name": "steps", "type": "INT"}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE"}], "nodes": [n for n in inner if n["id"] != 6] + [enc],
             "links": [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), ln))
                       for ln in links]}
    instance = {"id": 75, "type": "sg-t2i", "mode": 0, "inputs": [], "widgets_values": list(values),
                "properties": {"proxyWidgets": [["-1", "text"], ["-1", "seed"]]},
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [40]}]}
    top = {"nodes": [instance, {**_ui_node(wf, 9), "inputs": [{"name": "images", "type": "IMAGE", "link": 40}]}],
           "links": [[40, 75, 0, 9, 0, "IMAGE"]], "definitions": {"subgraphs": [outer, nested]}, "version": 0.4}
    if text_value is not None:
        instance["properties"]["proxyWidgets"], instance["widgets_values"] = [["-1", "seed"]], [values[1]]
        instance["inputs"] = [{"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 41}]
        top["nodes"].append({"id": 11, "type": "PrimitiveNode", "mode": 0, "widgets_values": [text_value]})
        top["links"].append([41, 11, 0, 75, 0, "STRING"])
    return top


def test_ui_workflow_subgraphs_are_expanded(tmp_path):
    wf = subgraphed()
    graph = comfy.from_workflow(wf)
    assert {"75:3", "75:16:6", "9"} <= set(graph) and "75" not in graph  # ids as ComfyUI's API export names them
    assert graph["9"]["inputs"]["images"] == ["75:8", 0] and graph["75:3"]["inputs"]["positive"] == ["75:16:6", 0]
    info = comfy.read(graph)
    assert info == {**UI_INFO, "prompt": "a lighthouse at dusk", "seed": 42, "steps": None}  # no stale value
    r = metadata.read(write_png(tmp_path / "sub.png", {"workflow": json.dumps(wf)}))
    assert r.warning is None and r.info == {**info, "tool": "comfyui"}
    assert comfy.read(comfy.from_workflow(subgraphed(text_value="a fox in snow")))["prompt"] == "a fox in snow"
    muted = subgraphed()
    muted["nodes"][0]["mode"] = 2
    assert comfy.read(comfy.from_workflow(muted)) is None
    unnamed = subgraphed()  # promoted values that do not match the names: none taken
    unnamed["nodes"][0]["properties"] = {}
    assert comfy.read(comfy.from_workflow(unnamed)) is None
    looped = subgraphed()  # a definition that contains itself: expanded to a bounded depth, no exception
    looped["definitions"]["subgraphs"][1]["nodes"].append({"id": 99, "type": "sg-enc", "inputs": []})
    assert comfy.read(comfy.from_workflow(looped))["prompt"] == "a lighthouse at dusk"


def test_ui_workflow_subgraph_values_kept_on_the_interior_nodes():
    """The UI of the 2026 official templates stores no values on a subgraph instance (``widgets_values`` empty, with
    ``proxyWidgets`` naming interior widgets or ``["-1", name]``): the interior nodes' own values are the ones used."""
    wf = subgraphed()
    wf["definitions"]["subgraphs"][1]["nodes"][0]["widgets_values"] = ["a lighthouse inside"]
    for proxy in ([["16", "text"], ["3", "seed"], ["3", "control_after_generate"]], [["-1", "text"], ["-1", "seed"]]):
        wf["nodes"][0]["properties"]["proxyWidgets"], wf["nodes"][0]["widgets_values"] = proxy, []
        assert comfy.read(comfy.from_workflow(wf)) == {**UI_INFO, "prompt": "a lighthouse inside"}
    wf["nodes"][0]["widgets_values"] = ["the instance's own text", 42]  # values on the instance: only those
    assert comfy.read(comfy.from_workflow(wf)) == {**UI_INFO, "prompt": "the instance's own text", "seed": 42,
                                                   "steps": None}


def test_ui_workflow_subgraph_values_in_the_frontend_1_24_layout():
    """No ``proxyWidgets``: the instance stores one value per subgraph input that feeds a widget inside, in the
    subgraph's input order (inner inputs listed in any order, as ComfyUI's frontend test fixtures have them)."""
    wf = ui_default()
    _ui_node(wf, 6)["inputs"].append({"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 30})
    _ui_node(wf, 3)["inputs"].insert(0, {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 31})
    links = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), ln))
             for ln in wf["links"] if ln[0] != 9] + [
        {"id": 30, "origin_id": -10, "origin_slot": 0, "target_id": 6, "target_slot": 1, "type": "STRING"},
        {"id": 31, "origin_id": -10, "origin_slot": 2, "target_id": 3, "target_slot": 4, "type": "INT"},
        {"id": 32, "origin_id": 8, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"}]
    sub = {"id": "sg", "inputs": [{"name": "text", "type": "STRING"}, {"name": "vae", "type": "VAE"},
                                  {"name": "seed", "type": "INT"}], "outputs": [{"name": "IMAGE", "type": "IMAGE"}],
           "nodes": [n for n in wf["nodes"] if n["id"] != 9], "links": links}
    top = {"nodes": [{"id": 11, "type": "sg", "mode": 0, "inputs": [{"name": "vae", "type": "VAE", "link": None}],
                      "widgets_values": ["Alpha", 5], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [40]}]},
                     {**_ui_node(wf, 9), "inputs": [{"name": "images", "type": "IMAGE", "link": 40}]}],
           "links": [[40, 11, 0, 9, 0, "IMAGE"]], "definitions": {"subgraphs": [sub]}}
    assert comfy.read(comfy.from_workflow(top)) == {**UI_INFO, "prompt": "Alpha", "seed": 5}
    top["nodes"][0]["widgets_values"] = ["Alpha", 5, 7]  # a value the inputs do not account for: none taken
    assert comfy.read(comfy.from_workflow(top)) is None


def test_ui_workflow_of_any_shape_never_raises():
    """Seeded random damage to real-shaped workflows (a field replaced by a value of another type: lists or objects
    where ids, names or links belong, negative ids, nulls): never an exception, and an untouched file still reads."""
    import random

    odd = [None, 1, "x", [], {}, [1, 2], {"a": 1}, -10, -20, 3.5, True, [[1]], [None] * 6]

    def paths(o, p=()):
        yield p
        for k, v in (o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()):
            yield from paths(v, p + (k,))

    rng = random.Random(0)
    for wf in (subgraphed(), subgraphed(text_value="a fox"), ui_default()):
        spots = list(paths(wf))[1:]
        for _ in range(400):
            w = json.loads(json.dumps(wf))
            for _ in range(rng.choice((1, 2))):
                *where, last = rng.choice(spots)
                try:
                    o = w
                    for k in where:
                        o = o[k]
                    o[last] = json.loads(json.dumps(rng.choice(odd)))
                except (KeyError, IndexError, TypeError):  # an earlier change removed this spot
                    pass
            comfy.read(comfy.from_workflow(w))
        assert comfy.read(comfy.from_workflow(wf))["prompt"]
