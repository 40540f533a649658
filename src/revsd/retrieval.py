"""Prompt banks and readable prompts: ``revsd bank build`` and the text side of ``revsd predict``.

A :class:`PromptBank` holds prompts, their L2-normalised all-MiniLM-L6-v2 embeddings and an exact faiss
inner-product index (IVF above ``IVF_MIN`` prompts). On disk a bank is a folder: ``prompts.parquet``,
``emb.npy``, ``meta.json`` (model, count, sources) and, for IVF banks only, ``index.faiss``.

Default bank (``working/banks/default/``): the 18k real DiffusionDB prompts in
``input/prompts/diffusiondb_prompts.parquet``, plus — for a model trained on experiment ``exp`` — the prompts
of that experiment's ``split == "train"`` rows (``working/banks/train_<exp>/``). Validation and test prompts
never enter a bank, so the held-out text report (:func:`revsd.predict.evaluate_text`) cannot look the answer up.

Readable prompts: :class:`TextChooser` (in :mod:`revsd.textsearch`, re-exported here) searches bank prompts and
modifier phrases (:func:`modifier_bank`) for the text whose own MiniLM embedding is closest to a predicted one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from revsd import paths
from revsd.artifacts import read_json, save_npy, save_parquet, write_json
from revsd.textsearch import Readable, TextChooser, _join, _segments  # noqa: F401  (re-exported)

IVF_MIN = 1_000_000  # banks at least this large get an IVF index (approximate, much faster to search)
ENCODE_CHUNK = 4096  # prompts per encode call while building a bank (one tqdm step each)


def encode(texts: Sequence[str], model: str = "") -> np.ndarray:
    """MiniLM embeddings (n, 384) float32, L2-normalised (``revsd.textenc.encode_prompts``)."""
    from revsd.textenc import encode_prompts

    if not len(texts):
        return np.zeros((0, 384), np.float32)
    return np.ascontiguousarray(encode_prompts(list(texts), model=model), dtype=np.float32)


def clean_prompts(prompts) -> list[str]:
    """Strip, drop empty / non-string entries, de-duplicate keeping the first occurrence."""
    seen: dict[str, None] = {}
    for p in prompts:
        if isinstance(p, str) and p.strip():
            seen.setdefault(" ".join(p.split()), None)
    return list(seen)


def make_index(emb: np.ndarray, ivf: bool | None = None):
    """Exact ``IndexFlatIP``; ``IndexIVFFlat`` (approximate, ~20x less work) when ``ivf`` or, by default, when
    the bank holds at least ``IVF_MIN`` prompts."""
    import faiss

    n, d = emb.shape
    if ivf if ivf is not None else n >= IVF_MIN:
        nlist = int(np.sqrt(n))  # ~1,200 lists for DiffusionDB 2M's 1.5M prompts; k-means on 40 points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(emb[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))])
        index.nprobe = 16
    else:
        index = faiss.IndexFlatIP(d)
    index.add(emb)
    return index


@dataclass
class PromptBank:
    """Prompts + normalised MiniLM embeddings + a faiss inner-product index."""

    prompts: list[str]
    emb: np.ndarray
    model: str = ""
    sources: list[str] = field(default_factory=list)
    index: object = None

    def __post_init__(self):
        self.emb = np.ascontiguousarray(self.emb, dtype=np.float32)
        if self.emb.ndim != 2 or len(self.emb) != len(self.prompts):
            raise ValueError(f"PromptBank: emb shape {self.emb.shape} does not match {len(self.prompts)} prompts")
        if self.index is None:
            self.index = make_index(self.emb)

    def __len__(self) -> int:
        return len(self.prompts)

    def search(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Cosine ``scores`` (q, k) float32 and row ``idx`` (q, k) int64 of the k nearest prompts, best first."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return self.index.search(q, min(k, len(self)))

    def __add__(self, other: "PromptBank") -> "PromptBank":
        """Union of two banks built with the same model (prompts already in ``self`` are not repeated)."""
        if other.model != self.model:
            raise ValueError(f"cannot merge banks of models {self.model!r} and {other.model!r}")
        have = set(self.prompts)
        keep = [i for i, p in enumerate(other.prompts) if p not in have]
        return PromptBank(self.prompts + [other.prompts[i] for i in keep],
                          np.concatenate([self.emb, other.emb[keep]]), self.model, self.sources + other.sources)

    def save(self, out: str | Path) -> Path:
        """Write the bank folder atomically (built in a temporary sibling, then renamed into place)."""
        import faiss

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bank folder is an ordinary folder
        try:
            save_parquet(tmp / "prompts.parquet", pd.DataFrame({"prompt": self.prompts}))
            save_npy(tmp / "emb.npy", self.emb)
            ivf = not isinstance(self.index, faiss.IndexFlat)
            if ivf:
                faiss.write_index(self.index, str(tmp / "index.faiss"))
            write_json(tmp / "meta.json", {"model": self.model or "all-MiniLM-L6-v2 (packaged)", "count": len(self),
                                           "dim": int(self.emb.shape[1]), "index": "ivf" if ivf else "flat",
                                           "sources": self.sources})
            old = out.with_name(f".{out.name}.old")
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def build_bank(prompts, out: str | Path | None = None, model: str = "", sources: Sequence[str] = (),
               progress: bool = True) -> PromptBank:
    """Clean (strip, dedupe), encode in chunks with a progress bar, index, and save to ``out`` if given."""
    prompts = clean_prompts(prompts)
    if not prompts:
        raise ValueError(f"no usable prompts for the bank {out or ''}: every entry is empty or not text")
    chunks = [prompts[i:i + ENCODE_CHUNK] for i in range(0, len(prompts), ENCODE_CHUNK)]
    emb = np.concatenate([encode(c, model) for c in tqdm(chunks, desc="encoding bank", unit="chunk",
                                                           disable=not progress or len(chunks) < 2)])
    bank = PromptBank(prompts, emb, model, list(sources))
    if out is not None:
        bank.save(out)
    return bank


def load_bank(folder: str | Path) -> PromptBank:
    """Load a bank folder written by :func:`build_bank` / ``revsd bank build``."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no prompt bank at {folder} (meta.json missing): "
                                f"build one with `revsd bank build PROMPTS.csv --out {folder}`")
    meta = read_json(meta_path)
    prompts = pd.read_parquet(folder / "prompts.parquet")["prompt"].tolist()
    emb = np.load(folder / "emb.npy", allow_pickle=False)
    index = None
    if (folder / "index.faiss").exists():
        import faiss

        index = faiss.read_index(str(folder / "index.faiss"))
    model = "" if meta.get("model", "").endswith("(packaged)") else meta.get("model", "")
    return PromptBank(prompts, emb, model, meta.get("sources", []), index)


def read_prompt_table(path: str | Path, column: str = "prompt") -> list[str]:
    """Prompts from a ``.csv`` / ``.parquet`` / ``.txt`` (one per line) file, with errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text().splitlines()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r}; use .csv, .parquet or .txt")
    df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    if column not in df.columns:
        raise KeyError(f"{path}: no column {column!r} (columns: {', '.join(map(str, df.columns))}); "
                       "pass --column NAME")
    return df[column].tolist()


def _cached_bank(name: str, prompts_fn, sources: list[str], model: str = "") -> PromptBank:
    """Load ``working/banks/<name>/`` or build it once from ``prompts_fn()``."""
    folder = paths.working_dir() / "banks" / name
    if (folder / "meta.json").exists():
        return load_bank(folder)
    print(f"building the prompt bank {folder} (once) ...", file=sys.stderr)
    return build_bank(prompts_fn(), folder, model=model, sources=sources)


def default_bank(exp: str | None = None, model: str = "") -> PromptBank:
    """The embedded DiffusionDB prompts, plus the train-split prompts of ``exp`` when its filtered table exists."""
    src = paths.input_dir() / "prompts" / "diffusiondb_prompts.parquet"
    bank = _cached_bank("default", lambda: read_prompt_table(src), [str(src.relative_to(paths.input_dir()))], model)
    table = paths.filtered_table(exp) if exp else None
    if table is not None and table.exists():
        def train_prompts():
            df = pd.read_parquet(table, columns=["prompt", "split"])
            return df.loc[df["split"] == "train", "prompt"].tolist()

        bank = bank + _cached_bank(f"train_{exp}", train_prompts, [f"01_filter/{exp} split=train"], model)
    return bank


def modifier_phrases() -> list[str]:
    """CLIP-Interrogator-style modifiers from ``input/modifiers/`` (artists as ``by <name>``)."""
    folder = paths.input_dir() / "modifiers"

    def lines(name):
        f = folder / name
        return [s.strip() for s in f.read_text().splitlines() if s.strip()] if f.exists() else []

    phrases = [f"by {a}" for a in lines("artists.txt")] + lines("mediums.txt") + lines("movements.txt")
    phrases += [f"trending on {t}" for t in lines("trendings.txt")]
    counts = folder / "diffusiondb_phrase_counts.csv"
    if counts.exists():
        df = pd.read_csv(counts)
        phrases += df.loc[df["kind"] != "root", "phrase"].astype(str).tolist()
    return clean_prompts(phrases)


def modifier_bank(model: str = "") -> PromptBank:
    """Modifier phrases as a bank, cached under ``working/banks/modifiers/``."""
    return _cached_bank("modifiers", modifier_phrases, ["modifiers/"], model)


def main(argv: list[str] | None = None) -> int:
    """``revsd bank build PROMPTS.csv|.parquet|.txt [--column prompt] [--out DIR] [--model NAME]``."""
    ap = argparse.ArgumentParser(prog="revsd bank", description="build a prompt bank for `revsd predict --bank`")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode a prompt table into a bank folder (stripped, de-duplicated)")
    b.add_argument("prompts", help="a .csv / .parquet (column --column) or .txt (one prompt per line)")
    b.add_argument("--column", default="prompt")
    b.add_argument("--out", default=None, help="bank folder (default: working/banks/<file stem>)")
    b.add_argument("--model", default="", help="sentence-transformers model (default: packaged all-MiniLM-L6-v2)")
    args = ap.parse_args(argv)
    src = Path(args.prompts)
    out = Path(args.out) if args.out else paths.working_dir() / "banks" / src.stem
    try:
        raw = read_prompt_table(src, args.column)
        bank = build_bank(raw, out, model=args.model, sources=[src.name])
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"revsd bank: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    print(json.dumps({"bank": str(out), "prompts": len(bank), "read": len(raw)}))
    return 0
