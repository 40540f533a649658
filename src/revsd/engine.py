"""Training loops and their tools (timm-style names): ``create_optimizer``, ``create_scheduler``, ``ModelEma``,
``train_one_epoch``, ``validate``, checkpoints (safetensors weights + a weights-only ``torch.save`` state file,
committed as one unit by a pointer file written last).

The eval forward is ``revsd.inference.forward_batches`` (shared with the predictor); this module only adds the
training side.

Batches are dicts with ``x`` (images or cached features), ``targets`` (B, 384), optional ``labels`` (B, m),
``context``, ``index`` (positions of the samples, for per-sample cosines) and, in multi-process training only,
``weight`` (a loss multiplier; 0 marks a stand-in batch that is left out of the statistics).
"""

from __future__ import annotations

import copy
import json
import math
import secrets
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from revsd.artifacts import atomic_path, read_json
from revsd.inference import autocast, forward_batches, load_weights, to_device
from revsd.metrics import row_cosines
from revsd.runs import CHECKPOINT


# --- optimizer / scheduler ------------------------------------------------------------------------------------

def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def create_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, llrd: float = 1.0,
                     backbone_lr_scale: float = 1.0, n_layers: int = 12, fused: bool = False
                     ) -> torch.optim.Optimizer:
    """AdamW (``fused``: the fused CUDA kernel); no decay on biases and norms. Backbone parameters
    (``model.backbone``) get ``lr * backbone_lr_scale * llrd ** (n_layers - 1 - layer)``, layers being ``n_layers``
    equal buckets of the backbone's parameters in registration order (input side first): layer-wise lr decay for
    any architecture."""
    groups: dict[tuple[float, bool], list] = {}
    backbone = getattr(model, "backbone", None)
    bb_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    bb_params = [p for p in backbone.parameters() if p.requires_grad] if backbone is not None else []
    layer_of = {id(p): min(n_layers - 1, i * n_layers // max(1, len(bb_params))) for i, p in enumerate(bb_params)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = backbone_lr_scale * llrd ** (n_layers - 1 - layer_of[id(p)]) if id(p) in bb_ids else 1.0
        groups.setdefault((scale, _no_decay(name, p)), []).append(p)
    param_groups = [{"params": ps, "lr": lr * scale, "lr_scale": scale, "weight_decay": 0.0 if nd else weight_decay}
                    for (scale, nd), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=lr, **({"fused": True} if fused else {}))


def create_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                     min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_ratio`` of the base lr, per optimizer step."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (evaluate with ``ema.module``)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1.0 - self.decay)
            else:
                e.copy_(m)


# --- loops ----------------------------------------------------------------------------------------------------

def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("x", "context", "targets", "labels") if k in batch}


def train_one_epoch(model: nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer, scheduler=None,
                    device="cpu", grad_accum: int = 1, amp: bool = False, scaler=None, ema: ModelEma | None = None,
                    max_grad_norm: float = 0.0, progress=None, accelerator=None) -> dict:
    """One pass over ``batches``; an optimizer step every ``grad_accum`` batches (and after the last).

    Returns ``{"loss", "cos" (mean train cosine), "steps", "index", "cosines"}``: the per-sample cosines seen
    during training (in training mode), keyed by the batches' ``index``; all of them local to this process.

    ``accelerator`` (an ``accelerate.Accelerator``; ``model``, ``optimizer`` and ``scheduler`` prepared by it, and
    ``scaler`` None): backward, gradient clipping and loss scaling go through it, and gradients are only
    all-reduced on the micro-batch that steps (``no_sync`` on the others). Accumulation stays here rather than in
    ``Accelerator.accumulate`` so that the last batch of an epoch always steps, as in one process.
    """
    model.train()
    tot_loss = tot_cos = 0.0
    n_seen = steps = 0
    idx_all, cos_all = [], []
    optimizer.zero_grad(set_to_none=True)
    it = iter(batches)
    upcoming = next(it, None)
    i = -1
    while upcoming is not None:  # streamed with one batch of look-ahead (the last one always steps)
        batch, upcoming, i = to_device(upcoming, device), next(it, None), i + 1
        sync = (i + 1) % grad_accum == 0 or upcoming is None
        with accelerator.no_sync(model) if accelerator is not None and not sync else nullcontext():
            with autocast(device, amp):
                out = model(**_model_inputs(batch))
            loss = out["loss"] / grad_accum
            if "weight" in batch:
                loss = loss * batch["weight"]
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                (scaler.scale(loss) if scaler is not None else loss).backward()
        if sync:
            if accelerator is not None:
                if max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
            else:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model) if accelerator is not None else model)
            steps += 1
        if batch.get("weight", 1.0) == 0:  # a stand-in (this process had no sample of this batch)
            if progress is not None:
                progress.update(1)
            continue
        with torch.no_grad():
            cos = F.cosine_similarity(out["emb"].float(), batch["targets"].float(), dim=-1)
        b = len(cos)
        tot_loss += float(out["loss"].detach()) * b
        tot_cos += float(cos.sum())
        n_seen += b
        if "index" in batch:
            idx_all.append(np.asarray(batch["index"]))
            cos_all.append(cos.cpu().numpy())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{tot_loss / n_seen:.4f}")
    return {"loss": tot_loss / max(1, n_seen), "cos": tot_cos / max(1, n_seen), "steps": steps,
            "index": np.concatenate(idx_all) if idx_all else np.zeros(0, int),
            "cosines": np.concatenate(cos_all) if cos_all else np.zeros(0, np.float32)}


def validate(model: nn.Module, batches: Iterable[dict], device="cpu", amp: bool = False) -> dict:
    """``{"cos": mean cosine, "cosines": per sample, "emb", "probs"}`` (eval mode; batches streamed once)."""
    out = forward_batches(model, batches, device, amp)
    emb, probs, tgt = out["emb"], out["probs"], out["targets"]
    if tgt is None or len(emb) == 0:
        return {"cos": float("nan"), "cosines": np.zeros(0, np.float32), "emb": emb, "probs": probs}
    cosines = row_cosines(emb, tgt)
    return {"cos": float(cosines.mean()), "cosines": cosines, "emb": emb, "probs": probs}


# --- checkpoints ----------------------------------------------------------------------------------------------
# One checkpoint = weights (+ EMA weights) + a state file (optimizer, scheduler, scaler, epoch/step/best), under
# fresh names ``ckpt-<token>.*``, committed by the pointer ``last.json`` written last (atomically): it names the
# files and their sizes. A save killed at any write leaves the previous pointer and its files intact; files no
# pointer names (and temp files of a killed write) are removed by the next save or load.

def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Every checkpoint file is written through here: to a temp sibling, then renamed into place."""
    with atomic_path(path) as tmp:
        write(tmp)


def _weights_to(tmp: Path, module: nn.Module) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))


def _clean(directory: Path, keep: set[str]) -> None:
    for p in list(directory.glob("ckpt-*")) + list(directory.glob(".ckpt-*.tmp*")) + \
            list(directory.glob(f".{CHECKPOINT}.*.tmp*")):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer, scheduler=None, ema: ModelEma | None = None,
                    scaler=None, **state) -> Path:
    """Write a checkpoint (see above) holding ``state`` (JSON-able, e.g. epoch/step/best); returns the pointer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"ckpt-{secrets.token_hex(6)}"
    files = {"weights": f"{tag}.safetensors", "state": f"{tag}.state.pt"}
    if ema is not None:
        files["ema"] = f"{tag}.ema.safetensors"
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler is not None else None, "state": state, "tag": tag}
    _write(directory / files["weights"], lambda tmp: _weights_to(tmp, model))
    if ema is not None:
        _write(directory / files["ema"], lambda tmp: _weights_to(tmp, ema.module))
    _write(directory / files["state"], lambda tmp: torch.save(blob, tmp))
    sizes = {k: (directory / f).stat().st_size for k, f in files.items()}
    pointer = json.dumps({"files": files, "sizes": sizes, "state": state}, indent=2)
    _write(directory / CHECKPOINT, lambda tmp: tmp.write_text(pointer + "\n"))
    _clean(directory, set(files.values()))
    return directory / CHECKPOINT


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer=None, scheduler=None,
                    ema: ModelEma | None = None, scaler=None) -> dict | None:
    """Restore what :func:`save_checkpoint` committed; returns its ``state``, or None if there is none. A pointer
    whose files are missing or of another size raises (the checkpoint is damaged) instead of mixing epochs."""
    directory = Path(directory)
    pointer = directory / CHECKPOINT
    if not pointer.exists():
        _clean(directory, set())
        return None
    meta = read_json(pointer)
    files, sizes = meta.get("files", {}), meta.get("sizes", {})
    bad = [f for k, f in files.items()
           if not (directory / f).exists() or (directory / f).stat().st_size != sizes.get(k)]
    if not files or bad:
        raise RuntimeError(f"{pointer}: damaged checkpoint, or one from an older revsd (missing or changed: "
                           f"{bad or 'no files listed'}); delete {pointer} to restart this run from scratch")
    _clean(directory, set(files.values()))
    blob = torch.load(directory / files["state"], map_location="cpu", weights_only=True)
    if blob.get("tag") != files["state"][:-len(".state.pt")]:
        raise RuntimeError(f"{pointer}: {files['state']} belongs to another checkpoint; delete {pointer} to restart")
    load_weights(directory / files["weights"], model)
    if ema is not None and "ema" in files:
        load_weights(directory / files["ema"], ema.module)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    return blob["state"]


def remove_checkpoint(directory: str | Path) -> None:
    """Delete the checkpoint (a finished run keeps only its best weights, model.safetensors)."""
    directory = Path(directory)
    (directory / CHECKPOINT).unlink(missing_ok=True)
    _clean(directory, set())
