"""Device resolution, shared by every stage and app (foundation: imports nothing from revsd)."""

from __future__ import annotations


def resolve_device(device: str | None = None) -> str:
    """``""``/``None`` -> ``"cuda"`` when available, else ``"cpu"``; anything else is returned as given."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
