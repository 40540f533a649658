"""``revsd weights --profile NAME [--json] [--check]``: every model a profile needs and where it would load from.

For each model: where it would load from (an explicit path from the step's configuration, ``$REVSD_WEIGHTS``, a
packaged copy, or the hub id and whether its local cache holds it), found, size, and the steps that need it.
Backbones come from the 03/04/05 steps (``weights`` key); ``unet_enc`` adds the SD ``unet``, ``vae``,
``text_encoder`` + ``tokenizer`` (the step's ``weights``: an SD folder) and ``blip`` (``$REVSD_WEIGHTS`` or the
hub cache); ``minilm`` is always needed (01's embedding dedup, 02's targets: TargetsConfig ``model``). Random-init
(``pretrained: false``) and ``tiny`` steps need no weights. ``--check`` exits 1 when something is missing, with one
line per model saying where to put it. Nothing is downloaded. Layout and the offline routes: docs/weights.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from revsd.weights import MODELS, locate

TRAIN_STEPS = ("03_train", "04_difficulty", "05_curriculum")
SD_MODELS = ("unet", "vae", "text_encoder", "tokenizer")


def step_config(step) -> dict:
    """The step's resolved configuration (defaults, then profile, then --set)."""
    cfg = getattr(step, "config", None)
    if cfg is None:
        from revsd.pipeline import config_class

        cfg = config_class(step.notebook)(**step.params).to_dict()
    return dict(cfg)


def needs(profile) -> dict[tuple[str, str], list[str]]:
    """(model, explicit path) -> names of the steps that need it, in profile order."""
    out: dict[tuple[str, str], list[str]] = {}

    def add(model: str, explicit: str, step: str) -> None:
        out.setdefault((model, explicit or ""), []).append(step)

    for step in profile.steps:
        cfg = step_config(step)
        if step.notebook == "02_targets":
            add("minilm", cfg.get("model", ""), step.name)
        if step.notebook not in TRAIN_STEPS or not cfg.get("pretrained", True) or cfg.get("tiny", False):
            continue
        backbone = cfg["backbone"]
        if backbone == "unet_enc":
            for m in SD_MODELS:  # the SD folder: the step's weights for this backbone
                add(m, cfg.get("weights", ""), step.name)
            add("blip", "", step.name)
        elif MODELS.get(backbone) is not None:
            add(backbone, cfg.get("weights", ""), step.name)
    if not any(m == "minilm" for m, _ in out):
        add("minilm", "", "01_filter")
    return out


def rows(profile) -> list[dict]:
    order = list(MODELS)
    found = sorted(needs(profile).items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1]))
    return [{**locate(model, explicit).to_row(), "steps": steps} for (model, explicit), steps in found]


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def table(rs: list[dict]) -> str:
    head = ["model", "found", "size", "from", "source", "needed by"]
    body = [[r["model"], "yes" if r["found"] else "NO", _size(r["size_bytes"]), r["where"], r["source"],
             ", ".join(r["steps"][:3]) + (f" (+{len(r['steps']) - 3})" if len(r["steps"]) > 3 else "")]
            for r in rs]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body])


def missing_lines(rs: list[dict]) -> list[str]:
    return [f"missing: {r['model']} ({r['source']}): {r['hint']}" for r in rs if not r["found"]]


def main(argv: list[str] | None = None) -> int:
    from revsd.pipeline import load_profile

    ap = argparse.ArgumentParser(prog="revsd weights", description="the weights a profile needs, where each would "
                                 "load from (local path or hub id), found, size; nothing is downloaded")
    ap.add_argument("--profile", required=True, help="profile name (src/revsd/profiles) or YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="STEP.key=value",
                    help="override a step parameter, as in revsd pipeline (repeatable)")
    ap.add_argument("--json", action="store_true", help="a JSON array, one object per model")
    ap.add_argument("--check", action="store_true", help="exit 1 when a model is missing (one line per model)")
    a = ap.parse_args(argv)
    rs = rows(load_profile(a.profile, overrides=a.overrides))
    print(json.dumps(rs, indent=1) if a.json else table(rs))
    lost = missing_lines(rs)
    if a.check and lost:
        print("\n".join(lost), file=sys.stderr)
        return 1
    return 0

