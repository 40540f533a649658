"""Sidecar text files next to images (``revsd predict --txt``): where each goes and how an existing one is treated."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from revsd.artifacts import write_text


def sidecar_paths(files: Sequence[str | Path]) -> dict[str, Path]:
    """``<stem>.txt`` per image; images sharing one (img.bmp, img.webp) get ``<name>.txt`` each instead."""
    by_txt: dict[Path, list[Path]] = defaultdict(list)
    for f in map(Path, files):
        by_txt[f.with_suffix(".txt")].append(f)
    out = {}
    for txt, group in by_txt.items():
        for f in group:
            out[str(f)] = txt if len(group) == 1 else f.with_name(f.name + ".txt")
    return out


def write_sidecar(image: str | Path, text: str, mode: str = "keep", txt: str | Path | None = None) -> str:
    """Write ``txt`` (default ``<image stem>.txt``); ``mode`` keep|overwrite|append.
    Returns written|kept|overwritten|appended."""
    txt = Path(txt) if txt else Path(image).with_suffix(".txt")
    if txt.exists():
        if mode == "keep":
            return "kept"
        if mode == "append":
            old = txt.read_text()
            write_text(txt, old + ("" if not old or old.endswith("\n") else "\n") + text + "\n")
            return "appended"
        write_text(txt, text + "\n")
        return "overwritten"
    write_text(txt, text + "\n")
    return "written"
