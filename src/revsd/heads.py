"""Embedding head (→ 384) and vocabulary head (→ m logits), wired as a registered head configuration says.

The configurations are plain data in :data:`revsd.variants.HEAD_CONFIGS`; :class:`PromptHead` builds any of them
from their two wiring flags:

- ``vocab_reads="features"`` (the paper's configurations 1 and 2) or ``"embedding"`` (configuration 3: the
  vocabulary head classifies the predicted embedding);
- ``probs_to_embedding`` (configuration 2): the vocabulary head's sigmoid probabilities are concatenated to the
  features that feed the embedding head.

``vocab_size=0`` gives the plain model (embedding head only). ``hidden=0, dropout=0, norm=False`` gives the
paper's heads exactly: one fully connected layer each, nothing else. :class:`RevSDModel` wraps an optional
backbone (``None`` in frozen mode: inputs are cached features) and returns a dict, with the loss when targets are
given.
"""

from __future__ import annotations

import torch
from torch import nn

from revsd.losses import revsd_loss
from revsd.variants import head_config


def mlp(in_dim: int, out_dim: int, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """Linear (``hidden=0``) or Linear-GELU-Dropout-Linear."""
    if hidden <= 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class PromptHead(nn.Module):
    """``forward(features) -> (emb (B, emb_dim), logits (B, m) or None)``."""

    def __init__(self, in_dim: int, emb_dim: int = 384, vocab_size: int = 0, config: str = "parallel",
                 hidden: int = 1024, dropout: float = 0.1, norm: bool = True):
        super().__init__()
        wiring = head_config(config)  # ConfigError (a ValueError) for an unregistered name
        if wiring.vocab_reads == "embedding" and wiring.probs_to_embedding:
            raise ValueError(f"head config {config!r}: vocab_reads='embedding' with probs_to_embedding is a cycle "
                             "(each head would need the other's output first); fix its entry in revsd.variants")
        self.config, self.vocab_size, self.emb_dim, self.in_dim = config, int(vocab_size), emb_dim, in_dim
        self.reads_embedding = wiring.vocab_reads == "embedding"
        self.probs_to_embedding = bool(self.vocab_size) and wiring.probs_to_embedding
        self.norm = nn.LayerNorm(in_dim) if norm else nn.Identity()
        # on the backbone features only, never on the class probabilities
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.emb_head = mlp(in_dim + (self.vocab_size if self.probs_to_embedding else 0), emb_dim, hidden, dropout)
        self.vocab_head = None
        if self.vocab_size:
            cls_in = emb_dim if self.reads_embedding else in_dim
            self.vocab_head = mlp(cls_in, self.vocab_size, 0 if self.reads_embedding else hidden, dropout)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.drop(self.norm(feats.float()))
        if self.vocab_head is None:
            return self.emb_head(f), None
        if self.reads_embedding:
            emb = self.emb_head(f)
            return emb, self.vocab_head(emb)
        if self.probs_to_embedding:
            logits = self.vocab_head(f)
            return self.emb_head(torch.cat([f, torch.sigmoid(logits)], dim=-1)), logits
        return self.emb_head(f), self.vocab_head(f)  # (in this order: dropout masks are drawn in call order)


class RevSDModel(nn.Module):
    """Backbone (optional) + :class:`PromptHead`; ``forward`` returns ``{"emb", "logits", ["loss", "cos", "bce"]}``.

    ``lam`` is the weight of the vocabulary loss only (whether there is a vocabulary head is the head's
    ``vocab_size``)."""

    def __init__(self, head: PromptHead, backbone: nn.Module | None = None, lam: float = 0.0):
        super().__init__()
        self.backbone, self.head, self.lam = backbone, head, float(lam)

    def features(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled features the heads read: ``x`` itself in frozen mode (cached features), else the backbone's."""
        if self.backbone is None:
            return x
        return self.backbone(x, context) if context is not None else self.backbone(x)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict:
        emb, logits = self.head(self.features(x, context))
        out = {"emb": emb, "logits": logits}
        if targets is not None:
            out.update(revsd_loss(emb, targets, logits, labels, self.lam))
        return out
