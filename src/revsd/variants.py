"""The one registry of head configurations and run variants: names, labels, wiring. Plain data (no torch), so
the report and the meta stage read it without importing models.

A head configuration is described by how its two heads are wired, and ``revsd.heads`` builds any such
description; adding a configuration is one entry in :data:`HEAD_CONFIGS`:

- ``vocab_reads``: what the vocabulary head reads, ``"features"`` (the backbone's) or ``"embedding"`` (the
  predicted embedding: the paper's configuration 3);
- ``probs_to_embedding``: the vocabulary head's sigmoid probabilities are concatenated to the features that feed
  the embedding head (the paper's configuration 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from revsd.config import ConfigError


@dataclass(frozen=True)
class HeadConfig:
    name: str  # the value of TrainConfig.head_config
    variant: str  # short label in run names and metrics.json
    paper: int  # the paper's configuration number (0: not in the paper)
    label: str  # how the report names it
    vocab_reads: str = "features"  # features | embedding
    probs_to_embedding: bool = False


HEAD_CONFIGS: dict[str, HeadConfig] = {h.name: h for h in [
    HeadConfig("parallel", "vocab", 1, "+ vocabulary head (cfg 1, parallel)"),
    HeadConfig("concat", "cfg2", 2, "+ vocabulary head, cfg 2 (class probs → embedding head)",
               probs_to_embedding=True),
    HeadConfig("emb2cls", "cfg3", 3, "+ vocabulary head, cfg 3 (classes read from the embedding)",
               vocab_reads="embedding"),
]}

PLAIN = "plain"  # the variant without a vocabulary head (λ = 0 in the paper's Table 1)
CURRICULUM_HEURISTICS = ("equal", "thresholds")

VARIANT_LABELS: dict[str, str] = {
    PLAIN: "plain (embedding head only)",
    **{h.variant: h.label for h in HEAD_CONFIGS.values()},
    "curriculum_equal": "+ curriculum (equal chunks)",
    "curriculum_thresholds": "+ curriculum (cosine thresholds)",
}


def head_config(name: str) -> HeadConfig:
    if name not in HEAD_CONFIGS:
        raise ConfigError(f"head_config must be one of {', '.join(HEAD_CONFIGS)}, got {name!r}")
    return HEAD_CONFIGS[name]


def curriculum_variant(heuristic: str) -> str:
    return f"curriculum_{heuristic}"


def variant_label(variant: str) -> str:
    """The report's label for a run variant (the variant itself when it is not registered)."""
    return VARIANT_LABELS.get(variant, variant)
