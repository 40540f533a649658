"""``revsd`` console script: ``revsd <command> [args]`` dispatches to ``revsd.<module>.main(argv)``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pipeline": ("revsd.pipeline", "run the notebooks headless (revsd pipeline --profile demo; --list --json)"),
    "train": ("revsd.train", "train one run outside the notebooks (revsd train exp=demo backbone=effnet_lite2)"),
    "data": ("revsd.datacli", "fetch DiffusionDB 2M/Large part by part, import your own images (revsd data fetch)"),
    "weights": ("revsd.weightscheck", "the weights a profile needs and where each loads from (revsd weights "
                "--profile paper --check)"),
    "predict": ("revsd.predict", "images in, prompt embeddings and readable prompts out"),
    "bank": ("revsd.retrieval", "build a prompt bank for retrieval (revsd bank build PROMPTS.csv)"),
    "generate": ("revsd.generate", "SD generation with the trained U-Net encoder (paper §4)"),
    "study": ("revsd.study", "blind A/B human study: serve / tally"),
}


def usage() -> str:
    lines = ["usage: revsd <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"revsd: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
