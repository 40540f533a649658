"""Embedding head (→ 384) and vocabulary head (→ m logits) in the paper's three configurations.

- ``parallel``: both heads read the backbone features;
- ``concat`` (config 2): the vocabulary head's sigmoid probabilities are concatenated to the features that feed
  the embedding head;
- ``emb2cls`` (config 3): the vocabulary head reads the predicted embedding.

``vocab_size=0`` gives the plain model (embedding head only). :class:`RevSDModel` wraps an optional backbone
(``None`` in frozen mode: inputs are cached features) and returns a dict, with the loss when targets are given.
"""

from __future__ import annotations

import torch
from torch import nn

from revsd.losses import revsd_loss

HEAD_CONFIGS = ("parallel", "concat", "emb2cls")


def mlp(in_dim: int, out_dim: int, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """Linear (``hidden=0``) or Linear-GELU-Dropout-Linear."""
    if hidden <= 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class PromptHead(nn.Module):
    """``forward(features) -> (emb (B, emb_dim), logits (B, m) or None)``."""

    def __init__(self, in_dim: int, emb_dim: int = 384, vocab_size: int = 0, config: str = "parallel",
                 hidden: int = 1024, dropout: float = 0.1):
        super().__init__()
        if config not in HEAD_CONFIGS:
            raise ValueError(f"head config {config!r} not in {HEAD_CONFIGS}")
        self.config, self.vocab_size, self.emb_dim, self.in_dim = config, int(vocab_size), emb_dim, in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.drop = nn.Dropout(dropout)  # on the backbone features only, never on the class probabilities
        concat = self.vocab_size if (self.vocab_size and config == "concat") else 0
        self.emb_head = mlp(in_dim + concat, emb_dim, hidden, dropout)
        self.vocab_head = None
        if self.vocab_size:
            cls_in = emb_dim if config == "emb2cls" else in_dim
            self.vocab_head = mlp(cls_in, self.vocab_size, hidden if config != "emb2cls" else 0, dropout)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.drop(self.norm(feats.float()))
        if self.vocab_head is None:
            return self.emb_head(f), None
        if self.config == "parallel":
            return self.emb_head(f), self.vocab_head(f)
        if self.config == "concat":
            logits = self.vocab_head(f)
            return self.emb_head(torch.cat([f, torch.sigmoid(logits)], dim=-1)), logits
        emb = self.emb_head(f)  # emb2cls
        return emb, self.vocab_head(emb)


class RevSDModel(nn.Module):
    """Backbone (optional) + :class:`PromptHead`; ``forward`` returns ``{"emb", "logits", ["loss", "cos", "bce"]}``."""

    def __init__(self, head: PromptHead, backbone: nn.Module | None = None, lam: float = 0.0):
        super().__init__()
        self.backbone, self.head, self.lam = backbone, head, float(lam)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict:
        feats = x if self.backbone is None else (
            self.backbone(x, context) if context is not None else self.backbone(x))
        emb, logits = self.head(feats)
        out = {"emb": emb, "logits": logits}
        if targets is not None:
            out.update(revsd_loss(emb, targets, logits, labels, self.lam))
        return out
