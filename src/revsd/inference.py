"""A trained model for inference, separate from training (open_clip style: the library never imports the trainer).

- :class:`ModelSpec`: the typed, frozen rebuild contract of a run, saved as ``model.json`` next to
  ``model.safetensors`` and read only here (:meth:`ModelSpec.load`).
- :func:`build_model`: the :class:`revsd.heads.RevSDModel` a spec describes (frozen: heads only; finetune:
  backbone + heads).
- :func:`forward_batches`: THE eval forward and post-processing (L2-normalised embeddings, sigmoid
  probabilities, optionally the pooled features the heads read); the training loop's validation
  (``engine.validate``) and :class:`Predictor` both use it.
- :func:`load_predictor` → :class:`Predictor` with ``predict(images) -> (emb, probs[, feats])``.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from revsd.artifacts import atomic_path, read_json, write_json
from revsd.backbones import create_backbone, fuse_conv_bn, get_spec
from revsd.device import resolve_device
from revsd.heads import PromptHead, RevSDModel
from revsd.images import to_rgb
from revsd.transforms import Preprocess, pil_to_array, to_batch

MODEL_FILE, SPEC_FILE = "model.safetensors", "model.json"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a trained model and feed it images (``model.json``)."""

    backbone: str  # a name in revsd.backbones.REGISTRY
    mode: str  # frozen (the file holds the heads) or finetune (backbone + heads)
    head_config: str  # a name in revsd.variants.HEAD_CONFIGS
    in_dim: int  # pooled feature size the heads read
    emb_dim: int
    vocab_size: int  # 0: no vocabulary head
    hidden: int
    dropout: float
    head_norm: bool
    lam: float  # weight of the vocabulary loss it was trained with
    words: tuple  # the vocabulary head's words, in logit order
    preprocess: Preprocess
    pretrained: bool
    tiny: bool
    weights: str = ""  # local backbone weights file it was trained from ("" = hub / packaged)
    variant: str = ""
    best_epoch: int = 0

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "words": list(self.words), "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_json(cls, d: dict) -> "ModelSpec":
        """Also reads the untyped model.json of runs made before the spec existed (image_size/mean/std keys)."""
        d = dict(d)
        if "preprocess" not in d:
            d["preprocess"] = {"input_size": d["image_size"], "mean": d["mean"], "std": d["std"]}
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d.setdefault("head_norm", True)
        return cls(**{**d, "words": tuple(d["words"]), "preprocess": Preprocess.from_dict(d["preprocess"])})

    def save(self, run_dir: str | Path) -> Path:
        return write_json(Path(run_dir) / SPEC_FILE, self.to_json())

    @classmethod
    def load(cls, run_dir: str | Path) -> "ModelSpec":
        path = Path(run_dir) / SPEC_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished 03_train run (no {SPEC_FILE})")
        try:
            return cls.from_json(read_json(path))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid model description ({e}): retrain the run") from e


def build_model(spec: ModelSpec, pretrained_backbone: bool = True) -> RevSDModel:
    """The model ``spec`` describes (frozen: heads only; finetune: backbone + heads), freshly initialised."""
    head = PromptHead(spec.in_dim, spec.emb_dim, spec.vocab_size, spec.head_config, spec.hidden, spec.dropout,
                      spec.head_norm)
    backbone = None
    if spec.mode == "finetune":
        backbone = create_backbone(spec.backbone, pretrained=pretrained_backbone and spec.pretrained, tiny=spec.tiny,
                                   weights=spec.weights if pretrained_backbone else "")
    return RevSDModel(head, backbone, spec.lam)


# --- weights --------------------------------------------------------------------------------------------------

def save_weights(path: str | Path, model: nn.Module) -> Path:
    """safetensors file of the model's state dict (atomic)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)


def load_weights(path: str | Path, model: nn.Module, strict: bool = True) -> nn.Module:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run has no saved weights (train it first)")
    model.load_state_dict(load_file(str(path)), strict=strict)
    return model


# --- the eval forward -------------------------------------------------------------------------------------------

def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device, amp: bool):
    dev = torch.device(device)
    if amp and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return nullcontext()


@torch.no_grad()
def forward_batches(model: RevSDModel, batches: Iterable[dict], device="cpu", amp: bool = False,
                    extractor: nn.Module | None = None, with_features: bool = False) -> dict:
    """Eval-mode forward over batch dicts (``x``, optional ``context`` and ``targets``), streamed once.

    ``extractor``: a separate backbone turning ``x`` into features first (a frozen run's predictor). Returns
    ``{"emb": (n, D) L2-normalised float32, "probs": (n, m) or None, "feats": (n, F) or None, "targets"}``."""
    model.eval()
    embs, probs, feats, tgts = [], [], [], []
    for batch in batches:
        if "targets" in batch:
            tgts.append(batch["targets"].float().cpu().numpy())
        batch = to_device(batch, device)
        x, ctx = batch["x"], batch.get("context")
        with autocast(device, amp):
            if extractor is not None:
                x, ctx = (extractor(x, ctx) if ctx is not None else extractor(x)), None
            f = model.features(x, ctx)
            emb, logits = model.head(f)
        embs.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
        if logits is not None:
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        if with_features:
            feats.append(f.float().cpu().numpy())

    def cat(parts):
        return np.concatenate(parts).astype(np.float32) if parts else None

    emb = cat(embs)
    return {"emb": emb if emb is not None else np.zeros((0, 0), np.float32), "probs": cat(probs),
            "feats": cat(feats), "targets": cat(tgts)}


# --- the predictor ----------------------------------------------------------------------------------------------

class Predictor:
    """A trained run for inference: ``predict(images) -> (emb (n, 384) normalised, probs (n, m) or None)``."""

    def __init__(self, model: RevSDModel, extractor: nn.Module | None, spec: ModelSpec, device: str,
                 run_dir: Path | None = None):
        self.model, self.extractor, self.spec, self.device = model.eval(), extractor, spec, device
        self.run_dir = run_dir
        self.words: list[str] = list(spec.words)
        self.backbone: str = spec.backbone
        self.preprocess: Preprocess = spec.preprocess
        self.input_size: int = int(spec.preprocess.input_size)
        self.image_size = self.input_size  # older name
        self._backbone_spec = get_spec(spec.backbone)

    def _batches(self, images, batch_size: int):
        pp = self.preprocess
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size]
            x = to_batch([pil_to_array(to_rgb(im), pp) for im in chunk], pp.mean, pp.std, self.device)
            batch = {"x": x}
            if self._backbone_spec.needs_context:
                batch["context"] = self._context(chunk)
            yield batch

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 32, with_features: bool = False):
        """``(emb, probs)``; with ``with_features``: ``(emb, probs, feats)``, feats (n, F) float32 the pooled backbone
        features the heads read."""
        out = forward_batches(self.model, self._batches(list(images), batch_size), self.device,
                              extractor=self.extractor, with_features=with_features)
        emb = out["emb"] if len(out["emb"]) else np.zeros((0, self.spec.emb_dim), np.float32)
        if not with_features:
            return emb, out["probs"]
        feats = out["feats"] if out["feats"] is not None else np.zeros((0, self.spec.in_dim), np.float32)
        return emb, out["probs"], feats

    def _context(self, images):
        """Captions need files: write the images to a temp folder, ids from their content hashes."""
        import hashlib
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ids, files = [], []
            for im in images:
                h = hashlib.sha1(im.tobytes()).hexdigest()[:16]
                f = Path(tmp) / f"{h}.png"
                im.save(f)
                os.utime(f, ns=(0, 0))  # the caption/latent caches key on size + mtime: stable for the same pixels
                ids.append(f"predict-{h}")
                files.append(str(f))
            return self._backbone_spec.context_fn(ids, files, tiny=self.spec.tiny, device=self.device,
                                                  weights=self.spec.weights)


def load_predictor(run_dir: str | Path, device: str = "") -> Predictor:
    """Rebuild a finished run (model.json + model.safetensors; no pickle)."""
    run_dir = Path(run_dir)
    spec = ModelSpec.load(run_dir)
    device = resolve_device(device)
    model = load_weights(run_dir / MODEL_FILE, build_model(spec, pretrained_backbone=False))
    extractor = None
    if spec.mode == "frozen":
        extractor = create_backbone(spec.backbone, pretrained=spec.pretrained, tiny=spec.tiny,
                                    weights=spec.weights).eval()
        extractor = fuse_conv_bn(extractor).to(device).to(memory_format=torch.channels_last)
    return Predictor(model.to(device), extractor, spec, device, run_dir)
