"""``revsd predict``: images in; predicted prompt embeddings, readable prompts and vocabulary words out.

Default model: the best run (highest ``val_cosine`` in ``metrics.json``, newest on ties) of the experiment
whose complete run finished last, among ``working/{03_train,05_curriculum}/<exp>/<run>/`` (complete = ``DONE``).
``--model RUN_DIR`` picks one. Weights are read by ``revsd.train.load_predictor`` (safetensors, no pickle).

Output: one JSON line per input file, in input order, written and flushed per batch (a crash loses no finished
line): ``image``, ``embedding`` (384 floats), ``prompt``, ``prompt_cosine`` (cosine of the prompt's own MiniLM
embedding to ``embedding``), ``neighbors`` [{prompt, cosine}], ``words`` [{word, prob}] and ``error`` (null, or
why this file failed; the other fields are then null/empty). A bad file never stops the batch.

Sidecars (``--txt``): ``<image>.txt`` with the prompt. An existing sidecar is left alone and reported unless
``--overwrite`` (replace it) or ``--append`` (add the prompt as a new line) is given.

Exit status: 0 when at least one image was processed; 1 when none was, when no model is found, or when the
requested Kaggle submission could not be written; 2 for usage errors (no input files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from revsd import paths, runs
from revsd.artifacts import write_text
from revsd.images import ImageError, list_images, open_rgb
from revsd.retrieval import PromptBank, TextChooser, default_bank, encode, load_bank, modifier_bank

NO_MODEL_HELP = ("no trained model found under {where}: train one with `make demo` "
                 "(or `revsd pipeline --profile demo`), or pass --model RUN_DIR")


def default_model_dir() -> Path | None:
    """Best ``val_cosine`` run of the experiment whose run finished last (``revsd.runs.latest_best_run``)."""
    return runs.latest_best_run()


def confident_words(probs: np.ndarray | None, words: Sequence[str], threshold: float) -> list[list[tuple[str, float]]]:
    """Per image, ``(word, prob)`` with ``prob >= threshold``, most probable first."""
    if probs is None or not len(words):
        return [[] for _ in range(0 if probs is None else len(probs))]
    out = []
    for row in np.asarray(probs, dtype=np.float32):
        keep = np.flatnonzero(row >= threshold)
        keep = keep[np.argsort(-row[keep], kind="stable")]
        out.append([(words[j], float(row[j])) for j in keep])
    return out


def load_predictor(run_dir: str | Path):
    """The run's model behind the ``Predictor`` protocol (``revsd.train.load_predictor``)."""
    from revsd import train

    return train.load_predictor(Path(run_dir))


def _load(path: Path):
    try:
        return open_rgb(path), None
    except ImageError as e:
        return None, str(e)
    except Exception as e:  # anything else about one file must not stop the batch
        return None, f"{path}: {type(e).__name__}: {e}"


def predict_records(predictor, files: Sequence[Path], chooser: TextChooser | None, batch_size: int = 32,
                    word_threshold: float = 0.5, workers: int = 4) -> Iterator[list[dict]]:
    """Yield one list of JSON-ready records per batch of ``files`` (input order; failures carry ``error``)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = list(files[start:start + batch_size])
            loaded = list(pool.map(_load, chunk))
            recs = [{"image": str(f), "embedding": None, "prompt": None, "prompt_cosine": None, "neighbors": [],
                     "words": [], "error": err} for f, (_, err) in zip(chunk, loaded)]
            ok = [i for i, (img, _) in enumerate(loaded) if img is not None]
            if ok:
                try:
                    emb, probs = predictor.predict([loaded[i][0] for i in ok], batch_size=batch_size)
                    words = confident_words(probs, predictor.words, word_threshold)
                    texts = chooser(emb, [[w for w, _ in ws] for ws in words]) if chooser else [None] * len(ok)
                except Exception as e:  # a failing batch is reported per image; the next batch still runs
                    for i in ok:
                        recs[i]["error"] = f"{chunk[i]}: prediction failed ({type(e).__name__}: {e})"
                else:
                    for j, i in enumerate(ok):
                        r = recs[i]
                        r["embedding"] = np.round(emb[j].astype(np.float64), 7).tolist()
                        r["words"] = [{"word": w, "prob": round(p, 4)} for w, p in words[j]]
                        if texts[j] is not None:
                            r["prompt"], r["prompt_cosine"] = texts[j].prompt, round(texts[j].cosine, 5)
                            r["neighbors"] = [{"prompt": p, "cosine": round(c, 5)} for p, c in texts[j].neighbors]
            yield recs


def write_sidecar(image: str | Path, text: str, mode: str = "keep") -> str:
    """Write ``<image stem>.txt``; ``mode`` keep|overwrite|append. Returns written|kept|overwritten|appended."""
    txt = Path(image).with_suffix(".txt")
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


def _parser() -> argparse.ArgumentParser:
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(prog="revsd predict", description=__doc__.replace("``", ""), formatter_class=Fmt)
    ap.add_argument("paths", nargs="+", help="image files and/or folders")
    ap.add_argument("--out", default="preds.jsonl", help="JSON lines output, replaced if it exists")
    ap.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    ap.add_argument("--model", default=None, help="run directory (default: the last pipeline run under working/)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=5, help="bank neighbours per image")
    ap.add_argument("--word-threshold", type=float, default=0.5, help="vocabulary probability to report a word")
    ap.add_argument("--bank", default=None, help="prompt bank folder (default: working/banks/default + train split)")
    ap.add_argument("--no-modifiers", action="store_true", help="do not extend prompts with modifier phrases")
    ap.add_argument("--txt", action="store_true", help="write the prompt to <image>.txt next to each image")
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--overwrite", action="store_true", help="with --txt: replace existing sidecars")
    side.add_argument("--append", action="store_true", help="with --txt: append to existing sidecars")
    ap.add_argument("--kaggle-submission", default=None, help="also write Kaggle's imgId_eId,val CSV here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    files = list_images(args.paths, recursive=args.recursive)
    if not files:
        print(f"revsd predict: no image files in {' '.join(args.paths)} (folders are read by extension; "
              "--recursive descends into sub-folders)", file=sys.stderr)
        return 2
    model_dir = Path(args.model) if args.model else default_model_dir()
    if model_dir is None:
        print("revsd predict: " + NO_MODEL_HELP.format(where=f"{paths.working_dir()}/{{{','.join(runs.RUN_STAGES)}}}"),
              file=sys.stderr)
        return 1
    try:
        predictor = load_predictor(model_dir)
    except (FileNotFoundError, OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: stale checkpoint
        print(f"revsd predict: cannot load the model in {model_dir} ({e}); " + NO_MODEL_HELP.format(where=model_dir),
              file=sys.stderr)
        return 1
    try:
        bank = load_bank(args.bank) if args.bank else default_bank(model_dir.parent.name)
        chooser = TextChooser(bank, None if args.no_modifiers else modifier_bank(), k=args.k)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"revsd predict: cannot load the prompt bank: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    mode = "overwrite" if args.overwrite else "append" if args.append else "keep"

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_ok, failed, kept, ids, embs = 0, [], [], [], []
    t0 = time.perf_counter()
    print(f"revsd predict: {len(files)} file(s), model {model_dir} ({predictor.backbone}), bank of {len(bank):,} "
          f"prompts -> {out}", file=sys.stderr)
    with open(out, "w") as f, tqdm(total=len(files), desc="predict", unit="img") as bar:
        for recs in predict_records(predictor, files, chooser, args.batch_size, args.word_threshold):
            for r in recs:
                if r["error"]:
                    failed.append(r)
                else:
                    n_ok += 1
                    ids.append(Path(r["image"]).stem)
                    embs.append(r["embedding"])
                    if args.txt:
                        r["sidecar"] = write_sidecar(r["image"], r["prompt"], mode)
                        if r["sidecar"] == "kept":
                            kept.append(r["image"])
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(recs))
    dt = time.perf_counter() - t0
    print(f"revsd predict: {n_ok} ok, {len(failed)} failed, {len(files) / max(dt, 1e-9):.1f} images/s "
          f"({dt:.1f} s) -> {out}", file=sys.stderr)
    for r in failed[:20]:
        print(f"  failed: {r['error']}", file=sys.stderr)
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more (see 'error' in {out})", file=sys.stderr)
    if kept:
        print(f"  {len(kept)} sidecar .txt file(s) already existed and were left alone (e.g. "
              f"{Path(kept[0]).with_suffix('.txt')}); --overwrite replaces them, --append adds a line",
              file=sys.stderr)
    status = 0 if n_ok else 1
    if args.kaggle_submission and n_ok:
        from revsd.submission import SubmissionError, write_submission

        try:
            write_submission(ids, np.asarray(embs, dtype=np.float32), args.kaggle_submission)
            print(f"  Kaggle submission ({n_ok} images x 384 rows) -> {args.kaggle_submission}", file=sys.stderr)
        except SubmissionError as e:
            print(f"revsd predict: Kaggle submission not written: {e}", file=sys.stderr)
            status = 1
    return status


def evaluate_text(run_dir: str | Path, exp: str | None = None, bank: PromptBank | None = None,
                  modifiers: PromptBank | None = None, k: int = 5, word_threshold: float = 0.5,
                  split: str = "test"):
    """Held-out report: mean cosine to the true prompt embedding of the predicted embedding, of the chosen
    readable text's own MiniLM embedding, and of the top-1 bank prompt, with their ratio to the first.

    Uses the run's saved ``preds_<split>.npz`` (no re-inference). The default bank holds no val/test prompt.
    """
    import pandas as pd

    from revsd import targets
    from revsd.artifacts import load_predictions

    run_dir = Path(run_dir)
    exp = exp or run_dir.parent.name
    ts = targets.load(exp)
    rows = ts.rows(split)
    preds = load_predictions(run_dir / f"preds_{split}.npz").align(ts.ids[rows])
    truth = ts.emb[rows]
    words = load_predictor(run_dir).words if preds.probs is not None else []
    bank = bank if bank is not None else default_bank(exp)
    modifiers = modifiers if modifiers is not None else modifier_bank()
    chooser = TextChooser(bank, modifiers, k=k)
    conf = confident_words(preds.probs, words, word_threshold) if preds.probs is not None else None
    chosen = chooser(preds.emb, [[w for w, _ in ws] for ws in conf] if conf else None)
    text_emb = encode([c.prompt for c in chosen])
    top1 = encode([c.neighbors[0][0] for c in chosen])
    emb = preds.emb / np.linalg.norm(preds.emb, axis=1, keepdims=True)
    cos = {"predicted embedding": (emb * truth).sum(1), "readable prompt (MiniLM of text)": (text_emb * truth).sum(1),
           "top-1 bank prompt": (top1 * truth).sum(1)}
    base = float(cos["predicted embedding"].mean())
    return pd.DataFrame([{"output": name, "split": split, "n": len(v), "mean_cosine": round(float(v.mean()), 4),
                          "ratio_to_embedding": round(float(v.mean()) / base, 4)} for name, v in cos.items()])
