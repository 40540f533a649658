"""The paper's two-objective loss: L = mean(1 − cos(f(x), s(y))) + λ · BCE(vocabulary logits, word labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cos over the batch (inputs need not be normalised)."""
    return (1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def revsd_loss(pred: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, lam: float = 0.0) -> dict[str, torch.Tensor]:
    """Return ``{"loss", "cos", "bce"}``; ``bce`` is 0 without logits/labels or with λ = 0.

    BCE is the standard mean over batch × vocabulary, computed from logits for numerical stability.
    """
    cos = cosine_loss(pred, target)
    if logits is None or labels is None or lam == 0:
        bce = cos.new_zeros(())
    else:
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return {"loss": cos + lam * bce, "cos": cos, "bce": bce}
