"""ComfyUI graphs that sd-parsers reads nothing from, traced by revsd.comfy; through metadata.read on real PNGs."""

from __future__ import annotations

import copy
import json

from test_comfy_workflow import _ui_node, ui_default
from test_metadata import COMFY_GRAPH, COMFY_PROMPT, write_png

from revsd import comfy, metadata

FLUX_PROMPT = "a cute anime girl with massive fluffy fennec ears and a big fluffy tail"
# the shape of ComfyUI's Flux dev example: no node has sampler_name + steps + cfg together
FLUX = {
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": FLUX_PROMPT, "clip": ["11", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    "10": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                      "clip_name2": "clip_l.safetensors", "type": "flux"}},
    "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
    "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["22", 0],
                                                             "sampler": ["16", 0], "sigmas": ["17", 0],
                                                             "latent_image": ["27", 0]}},
    "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
    "17": {"class_type": "BasicScheduler", "inputs": {"scheduler": "simple", "steps": 20, "denoise": 1.0,
                                                      "model": ["30", 0]}},
    "22": {"class_type": "BasicGuider", "inputs": {"model": ["30", 0], "conditioning": ["26", 0]}},
    "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 219670278747233}},
    "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
    "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
    "30": {"class_type": "ModelSamplingFlux", "inputs": {"max_shift": 1.15, "base_shift": 0.5, "width": 1024,
                                                         "height": 768, "model": ["12", 0]}},
}


def workflow_of(graph: dict) -> dict:
    """The ``workflow`` chunk's links as ComfyUI writes them (link type = the output's type)."""
    kinds = {"clip": "CLIP", "model": "MODEL", "vae": "VAE", "samples": "LATENT", "latent_image": "LATENT",
             "images": "IMAGE", "noise": "NOISE", "guider": "GUIDER", "sampler": "SAMPLER", "sigmas": "SIGMAS"}
    links = [[i, int(v[0]), v[1], int(nid), 0, kinds.get(name, "CONDITIONING")]
             for i, (nid, name, v) in enumerate((nid, name, v) for nid, node in graph.items()
                                                for name, v in node["inputs"].items() if isinstance(v, list))]
    return {"nodes": [{"id": int(k), "type": v["class_type"]} for k, v in graph.items()], "links": links}


def test_flux_sampler_custom_advanced_with_and_without_workflow(tmp_path):
    graph = {"prompt": json.dumps(FLUX)}
    for chunks in (graph, {**graph, "workflow": json.dumps(workflow_of(FLUX))}):
        r = metadata.read(write_png(tmp_path / "flux.png", chunks))
        assert r.warning is None
        assert r.info == {"prompt": FLUX_PROMPT, "negative_prompt": None, "model": "flux1-dev.safetensors",
                          "seed": 219670278747233, "steps": 20, "sampler": "euler", "cfg": None,
                          "width": 1024, "height": 768, "tool": "comfyui"}


def test_cfg_guider_negative_and_text_from_string_nodes():
    g = copy.deepcopy(FLUX)
    g["22"] = {"class_type": "CFGGuider", "inputs": {"model": ["30", 0], "positive": ["26", 0],
                                                     "negative": ["40", 0], "cfg": 4.5}}
    g["40"] = {"class_type": "CLIPTextEncode", "inputs": {"text": ["41", 0], "clip": ["11", 0]}}
    g["41"] = {"class_type": "PrimitiveString", "inputs": {"value": "blurry, watermark"}}
    g["6"]["inputs"]["text"] = ["42", 0]
    g["42"] = {"class_type": "StringConcatenate", "inputs": {"string_a": ["43", 0], "string_b": "golden hour",
                                                             "delimiter": ", "}}
    g["43"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a red fox in the snow"}}
    info = comfy.read(g)
    assert info["prompt"] == "a red fox in the snow, golden hour"
    g["43"] = {"class_type": "ImpactWildcardProcessor", "inputs": {"wildcard_text": "a __animal__ in the snow",
                                                                   "populated_text": "a hare in the snow",
                                                                   "mode": "reproduce", "seed": 3}}
    assert comfy.read(g)["prompt"] == "a hare in the snow, golden hour"
    # a captioner's text is written at run time from an image: its task prompt is not the image's prompt
    g["6"]["inputs"]["text"] = ["44", 0]
    g["44"] = {"class_type": "VLMCaption", "inputs": {"prompt": "Describe this image in detail.", "seed": 1,
                                                      "image": ["45", 0], "vlm_model": ["46", 0]}}
    g["45"] = {"class_type": "LoadImage", "inputs": {"image": "ref.png"}}
    assert comfy.read(g) is None
    g["44"] = {"class_type": "OllamaGenerate", "inputs": {"prompt": "Write a prompt about a castle.", "seed": 1,
                                                          "model": "llama3.1:8b", "temperature": 0.8}}
    assert comfy.read(g) is None  # nor is a language model's instruction
    assert info["negative_prompt"] == "blurry, watermark"
    assert info["cfg"] == 4.5


def test_dual_cfg_guider_negative_stays_negative():
    """OmniGen2's text-to-image template: ``DualCFGGuider`` with cond1 = the prompt, cond2 = negative = the negative
    prompt (no input named positive). Before, both were followed as if positive: the negative was appended."""
    g = copy.deepcopy(FLUX)
    g["22"] = {"class_type": "DualCFGGuider", "inputs": {"model": ["30", 0], "cond1": ["6", 0], "cond2": ["40", 0],
                                                         "negative": ["40", 0], "cfg_conds": 5, "cfg_cond2_negative": 2}}
    g["40"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["11", 0]}}
    info = comfy.read(g)
    assert (info["prompt"], info["negative_prompt"]) == (FLUX_PROMPT, "blurry, low quality")
    g["6"]["inputs"]["text"] = ""  # no positive text: the negative is never taken for it
    assert comfy.read(g) is None


def test_sdxl_encoders_refiner_and_hires_pass():
    """text_g/text_l once each; the first pass (its latent is empty) gives the prompt, not the hires pass."""
    g = copy.deepcopy(COMFY_GRAPH)
    g["6"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": COMFY_PROMPT, "text_l": COMFY_PROMPT,
                                                             "width": 1024, "height": 1024, "clip": ["4", 1]}}
    g["20"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                         "width": 2048, "height": 2048, "crop": "disabled"}}
    g["2"] = {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 10, "cfg": 5.0, "sampler_name": "dpmpp_2m",
                                                   "scheduler": "karras", "denoise": 0.5, "model": ["4", 0],
                                                   "positive": ["21", 0], "negative": ["7", 0],
                                                   "latent_image": ["20", 0]}}
    g["21"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "sharp details", "clip": ["4", 1]}}
    info = comfy.read(g)
    assert info["prompt"] == COMFY_PROMPT
    assert (info["seed"], info["steps"], info["width"], info["height"]) == (156680208700286, 20, 512, 640)
    g["6"]["inputs"]["text_l"] = "oil painting"
    assert comfy.read(g)["prompt"] == f"{COMFY_PROMPT}, oil painting"


def test_area_composition_and_lora_chain():
    g = copy.deepcopy(COMFY_GRAPH)
    g["3"]["inputs"]["positive"] = ["30", 0]
    g["30"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["31", 0]}}
    g["31"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["32", 0], "width": 256, "height": 256,
                                                               "x": 0, "y": 0, "strength": 1.0}}
    g["32"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a full moon", "clip": ["4", 1]}}
    g["3"]["inputs"]["model"] = ["33", 0]
    g["33"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "detail.safetensors", "strength_model": 1.0,
                                                      "strength_clip": 1.0, "model": ["4", 0], "clip": ["4", 1]}}
    info = comfy.read(g)
    assert info["prompt"] == f"{COMFY_PROMPT}, a full moon"
    assert info["model"] == "v1-5-pruned-emaonly.safetensors"


def test_nodes_carrying_both_prompts_pass_on_one(tmp_path):
    """ControlNetApplyAdvanced holds positive and negative: sd-parsers put the negative inside the prompt."""
    g = copy.deepcopy(COMFY_GRAPH)
    g["3"]["inputs"].update(positive=["12", 0], negative=["12", 1])
    g["12"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["13", 0], "image": ["14", 0], "strength": 0.8,
        "start_percent": 0.0, "end_percent": 1.0}}
    g["13"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}}
    g["14"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    r = metadata.read(write_png(tmp_path / "cn.png", {"prompt": json.dumps(g), "workflow": json.dumps(workflow_of(g))}))
    assert (r.info["prompt"], r.info["negative_prompt"]) == (COMFY_PROMPT, "text, watermark")
    # img2img: no sampler starts from an empty latent; the ControlNet node (lower id) is still not taken for one
    g["1"] = g.pop("12")
    g["3"]["inputs"].update(positive=["1", 0], negative=["1", 1], latent_image=["15", 0])
    g["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["14", 0], "vae": ["4", 2]}}
    info = comfy.read(g)
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["width"]) == \
        (COMFY_PROMPT, "text, watermark", 156680208700286, None)
    # a loader node that takes both prompts as strings (efficiency-nodes' "Efficient Loader")
    g = copy.deepcopy(COMFY_GRAPH)
    g["3"]["inputs"].update(positive=["20", 1], negative=["20", 2], model=["20", 0])
    g["20"] = {"class_type": "Efficient Loader", "inputs": {"ckpt_name": "dreamshaper_8.safetensors",
                                                            "positive": "a paper crane", "negative": "blurry",
                                                            "lora_stack": ["21", 0]}}
    g["21"] = {"class_type": "LoRA Stacker", "inputs": {"lora_count": 1, "lora_name_1": "None"}}
    info = comfy.read(g)
    assert (info["prompt"], info["negative_prompt"], info["model"]) == ("a paper crane", "blurry",
                                                                        "dreamshaper_8.safetensors")


def test_gligen_box_after_the_main_prompt_and_sampler_custom():
    g = copy.deepcopy(COMFY_GRAPH)
    g["3"]["inputs"]["positive"] = ["30", 0]
    g["30"] = {"class_type": "GLIGENTextBoxApply", "inputs": {"conditioning_to": ["6", 0], "clip": ["4", 1],
                                                              "gligen_textbox_model": ["31", 0], "text": "a red boat",
                                                              "width": 256, "height": 128, "x": 0, "y": 256}}
    g["31"] = {"class_type": "GLIGENLoader", "inputs": {"gligen_name": "gligen.safetensors"}}
    assert comfy.read(g)["prompt"] == f"{COMFY_PROMPT}, a red boat"
    # SDXL Turbo's graph: SamplerCustom with its own cfg and seed, steps from the scheduler node
    g = copy.deepcopy(COMFY_GRAPH)
    g["3"] = {"class_type": "SamplerCustom", "inputs": {"add_noise": True, "noise_seed": 7, "cfg": 1.0,
                                                        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                        "sampler": ["40", 0], "sigmas": ["41", 0],
                                                        "latent_image": ["5", 0]}}
    g["40"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
    g["41"] = {"class_type": "SDTurboScheduler", "inputs": {"steps": 1, "denoise": 1.0, "model": ["4", 0]}}
    info = comfy.read(g)
    assert (info["prompt"], info["seed"], info["steps"], info["sampler"], info["cfg"]) == \
        (COMFY_PROMPT, 7, 1, "euler_ancestral", 1.0)


def test_empty_negatives_stylers_tuples_and_video_encoders():
    # SD3/Flux/Qwen: the negative is the positive zeroed out, which holds no text
    g = copy.deepcopy(COMFY_GRAPH)
    g["7"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    assert (comfy.read(g)["prompt"], comfy.read(g)["negative_prompt"]) == (COMFY_PROMPT, None)
    # a prompt styler feeding both encoders from its two outputs; the seed from a seed node
    g = copy.deepcopy(COMFY_GRAPH)
    g["6"]["inputs"]["text"], g["7"]["inputs"]["text"] = ["8", 0], ["8", 1]
    g["8"] = {"class_type": "SDXLPromptStyler", "inputs": {"text_positive": ["9", 0], "text_negative": "ugly",
                                                           "style": "artstyle-hyperrealism", "log_prompt": False}}
    g["9"] = {"class_type": "CR Prompt Text", "inputs": {"prompt": "a noir street at night"}}
    g["3"]["inputs"]["seed"] = ["10", 0]
    g["10"] = {"class_type": "Seed (rgthree)", "inputs": {"seed": 77}}
    info = comfy.read(g)
    assert (info["prompt"], info["negative_prompt"], info["seed"]) == ("a noir street at night", "ugly", 77)
    # a sampler fed by a tuple that packs both prompts (efficiency-nodes' SDXL loader)
    g = {"1": {"class_type": "KSampler SDXL (Eff.)", "inputs": {"noise_seed": 5, "steps": 30, "cfg": 7.0,
                                                                "sampler_name": "euler", "sdxl_tuple": ["2", 0],
                                                                "latent_image": ["4", 0]}},
         "2": {"class_type": "Pack SDXL Tuple", "inputs": {"base_model": ["3", 0], "base_positive": ["3", 2],
                                                           "base_negative": ["3", 3]}},
         "3": {"class_type": "Eff. Loader SDXL", "inputs": {"base_ckpt_name": "xl.safetensors",
                                                            "positive": ["8", 0], "negative": ["8", 1],
                                                            "positive_ascore": 6, "negative_ascore": 2}},
         "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
         "8": {"class_type": "SDXLPromptStyler", "inputs": {"text_positive": "an archer", "text_negative": "animal"}}}
    info = comfy.read(g)
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["width"]) == ("an archer", "animal", 5, 1024)
    # a video sampler that reads text embeddings, not conditioning
    g = {"1": {"class_type": "WanVideoSampler", "inputs": {"steps": 30, "cfg": 6, "seed": 42, "model": ["2", 0],
                                                           "text_embeds": ["3", 0], "image_embeds": ["4", 0]}},
         "2": {"class_type": "WanVideoModelLoader", "inputs": {"model": "wan2.1_t2v_14B.safetensors"}},
         "3": {"class_type": "WanVideoTextEncode", "inputs": {"positive_prompt": "a fox runs through snow",
                                                              "negative_prompt": "blurry", "t5": ["5", 0]}},
         "4": {"class_type": "WanVideoEmptyEmbeds", "inputs": {"width": 832, "height": 480, "num_frames": 1}},
         "5": {"class_type": "LoadWanVideoT5TextEncoder", "inputs": {"model_name": "umt5-xxl.safetensors"}}}
    info = comfy.read(g)
    assert (info["prompt"], info["negative_prompt"], info["steps"]) == ("a fox runs through snow", "blurry", 30)


def test_nodes_that_generate_from_their_own_prompt(tmp_path):
    """ComfyUI's nodes for hosted models (and all-in-one nodes): no sampler, the prompt and seed on one node."""
    g = {"1": {"class_type": "FluxProUltraImageNode", "inputs": {"prompt": "a glass greenhouse in fog", "seed": 9,
                                                                 "aspect_ratio": "16:9", "raw": False}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "api"}}}
    r = metadata.read(write_png(tmp_path / "api.png", {"prompt": json.dumps(g)}))
    assert (r.info["prompt"], r.info["seed"], r.info["tool"]) == ("a glass greenhouse in fog", 9, "comfyui")
    g["1"]["inputs"]["prompt"] = "  "
    assert comfy.read(g) is None
    # a language model writing text in an upscale-only graph is no generator
    g = {"1": {"class_type": "OllamaGenerate", "inputs": {"prompt": "describe a castle", "seed": 3}},
         "2": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
         "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "scale_by": 2.0}},
         "4": {"class_type": "ShowText", "inputs": {"text": ["1", 0]}},
         "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}}}
    assert comfy.read(g) is None


def test_graph_saved_as_json_by_custom_save_nodes(tmp_path):
    """Custom save nodes put the API graph (alone, or beside the workflow) into a JPEG's UserComment."""
    from test_metadata import user_comment, write_exif

    for i, payload in enumerate((FLUX, {"prompt": FLUX, "workflow": workflow_of(FLUX)})):
        r = metadata.read(write_exif(tmp_path / f"g{i}.jpg", user_comment(json.dumps(payload))))
        assert (r.info["prompt"], r.info["tool"], r.info["seed"]) == (FLUX_PROMPT, "comfyui", 219670278747233)


def test_graphs_without_a_prompt_claim_nothing(tmp_path):
    upscale = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
               "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "lanczos",
                                                              "scale_by": 2.0}},
               "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "up"}}}
    assert comfy.read(upscale) is None
    cyclic = {"1": {"class_type": "KSampler", "inputs": {"positive": ["2", 0], "seed": 3}},
              "2": {"class_type": "Odd", "inputs": {"conditioning": ["1", 0]}}}
    assert comfy.read(cyclic) is None
    r = metadata.read(write_png(tmp_path / "up.png", {"prompt": json.dumps(upscale)}))
    assert (r.info, r.warning) == (None, None)


# --- the UI's workflow alone (no API graph beside it) ---------------------------------------------------------------


def test_concatenation_with_a_run_time_part_claims_nothing():
    """Text boxes ("Text", capitalised) joined by a concatenation node are the prompt; when one part is a tagger's
    output (written at run time from an image) the joined prompt is not in the graph, and no part of it is claimed."""
    g = copy.deepcopy(COMFY_GRAPH)
    g["6"]["inputs"]["text"] = ["20", 0]
    g["20"] = {"class_type": "Text Concatenate", "inputs": {"linebreak_addition": "false", "text_a": ["21", 0],
                                                            "text_b": ["22", 0], "delimiter": ", "}}
    g["21"] = {"class_type": "Text box", "inputs": {"Text": "(disney style)"}}
    g["22"] = {"class_type": "Text box", "inputs": {"Text": "a girl reading"}}
    assert comfy.read(g)["prompt"] == "(disney style), a girl reading"
    g["20"]["inputs"]["text_c"] = ["23", 0]
    g["23"] = {"class_type": "WD14Tagger|pysssss", "inputs": {"model": "wd-v1-4-moat-tagger-v2", "threshold": 0.35,
                                                               "tags": "1girl, solo, book", "image": ["24", 0]}}
    g["24"] = {"class_type": "LoadImage", "inputs": {"image": "input.png"}}
    assert comfy.read(g) is None


def test_hidream_and_lumina2_encoders():
    """HiDream's four text inputs (joined when they differ, once when equal); Lumina 2's user prompt, never its
    system prompt (a fixed instruction chosen from a list); both from the API graph and from the UI workflow."""
    g = copy.deepcopy(COMFY_GRAPH)
    g["6"] = {"class_type": "CLIPTextEncodeHiDream", "inputs": {"clip": ["4", 1], "clip_l": COMFY_PROMPT,
                                                                "clip_g": COMFY_PROMPT, "t5xxl": COMFY_PROMPT,
                                                                "llama": "a lighthouse, seen from a boat"}}
    assert comfy.read(g)["prompt"] == f"{COMFY_PROMPT}, a lighthouse, seen from a boat"
    g["6"] = {"class_type": "CLIPTextEncodeLumina2", "inputs": {"clip": ["4", 1], "system_prompt": "superior",
                                                                "user_prompt": COMFY_PROMPT}}
    assert comfy.read(g)["prompt"] == COMFY_PROMPT
    wf = ui_default()
    _ui_node(wf, 6).update(type="CLIPTextEncodeLumina2", widgets_values=["alignment", COMFY_PROMPT])
    assert comfy.read(comfy.from_workflow(wf))["prompt"] == COMFY_PROMPT


def test_api_graph_of_any_shape_never_raises():
    """Seeded random damage to API graphs (a field replaced by a value of another type, e.g. a list as a node's
    class): never an exception, and the untouched graphs still read."""
    import random

    odd = [None, 1, "x", [], {}, [1, 2], {"a": 1}, ["999", 0], [["1"], 0], 3.5, True]

    def paths(o, p=()):
        yield p
        for k, v in (o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()):
            yield from paths(v, p + (k,))

    rng = random.Random(0)
    for g in (COMFY_GRAPH, FLUX):
        spots = list(paths(g))[1:]
        for _ in range(400):
            w = copy.deepcopy(g)
            *where, last = rng.choice(spots)
            o = w
            for k in where:
                o = o[k]
            o[last] = copy.deepcopy(rng.choice(odd))
            comfy.read(w)
        assert comfy.read(g)["prompt"]
