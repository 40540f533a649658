"""``revsd predict``: images in; predicted prompt embeddings, readable prompts and vocabulary words out.

Default model: the best run (highest ``val_cosine`` in ``metrics.json``, newest on ties) of the experiment
whose complete run finished last, among ``working/{03_train,05_curriculum}/<exp>/<run>/`` (complete = ``DONE``).
``--model RUN_DIR`` picks one. Weights are read by ``revsd.inference.load_predictor`` (safetensors, no pickle).
Images are decoded no larger than the model needs (``revsd.images.open_rgb(min_side=...)``).

Output: one JSON line per input file, in input order, written and flushed per batch (a crash loses no finished
line): ``image``; ``prompt`` and ``prompt_source`` (``"metadata"``: the exact positive prompt the file carries,
read by ``revsd.metadata``; ``"model"``: the readable prompt closest to ``embedding``); ``metadata`` (what the
file carries: prompt, negative_prompt, model, seed, steps, sampler, cfg, width, height, tool; null when none);
``embedding`` (384 floats: the metadata prompt's MiniLM embedding, else the guarded model embedding);
``model_embedding`` (the model's own); ``in_domain`` (0-1: how much the image looks like the run's training
images; below 1 the model embedding is moved towards the image-conditioned prior of ``revsd.prior``, or the
prompt bank's mean with ``--broad-prior`` or without the packaged classifier, see ``revsd.domain``; null without
a guard); ``prompt_cosine`` (cosine of the prompt's own MiniLM embedding to ``embedding``); ``neighbors``
[{prompt, cosine}]; ``words`` [{word, prob}] (the metadata prompt's vocabulary words at prob 1; else moved like
the embedding, towards each word's share of the bank's prompts) and ``model_words`` (the vocabulary head's own);
``warning`` (null, or e.g. a malformed metadata chunk) and ``error`` (null, or why this file failed; the rest
null/empty). A bad file never stops the batch.

Sidecars (``--txt``): ``<image stem>.txt`` with the prompt; images of one run that would share one (``img.bmp``,
``img.webp``) get ``<image name>.txt`` each (``img.bmp.txt``). An existing sidecar is left alone and reported
unless ``--overwrite`` (replace it) or ``--append`` (add the prompt as a new line) is given.

Exit status: 0 when at least one image was processed; 1 when none was, when the model cannot be loaded, or when
the requested Kaggle submission could not be written; 2 for usage errors (no input files, a bad option value,
--out a folder), checked before any output is touched; 130 on Ctrl-C (after saying how many lines were written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from revsd import domain, metadata, paths, runs
from revsd.images import ImageError, open_rgb, return_big_buffers_to_os, scan_images
from revsd.prior import ImagePrior
from revsd.retrieval import PromptBank, TextChooser, default_bank, encode, load_bank, modifier_bank
from revsd.sidecars import sidecar_paths, write_sidecar
from revsd.vocab import confident_words, prompt_words

NO_MODEL_HELP = ("no trained model found under {where}: train one with `make demo` "
                 "(or `revsd pipeline --profile demo`), or pass --model RUN_DIR")


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit 2, nothing written."""


def default_model_dir() -> Path | None:
    """Best ``val_cosine`` run of the experiment whose run finished last (``revsd.runs.latest_best_run``)."""
    return runs.latest_best_run()


def load_predictor(run_dir: str | Path):
    """The run's model behind the ``Predictor`` protocol (``revsd.inference.load_predictor``)."""
    from revsd import inference

    return inference.load_predictor(Path(run_dir))


def min_side(predictor) -> int | None:
    """The shorter image side the model's preprocessing resizes to (decode no larger than a margin above it)."""
    pp = getattr(predictor, "preprocess", None)
    size = getattr(predictor, "input_size", None) or (pp.input_size if pp else None)
    return math.ceil(size / (getattr(pp, "crop_pct", 1.0) or 1.0)) if size else None


def _load(path: Path, side: int | None, read_metadata: bool):
    """``(image, metadata result or None, error or None)``; metadata only for readable images."""
    try:
        img = open_rgb(path, min_side=side)
    except ImageError as e:
        return None, None, str(e)
    except Exception as e:  # anything else about one file must not stop the batch
        return None, None, f"{path}: {type(e).__name__}: {e}"
    return img, metadata.read(path) if read_metadata else None, None


def _blank(image, err: str | None, warning: str | None) -> dict:
    return {"image": str(image), "prompt": None, "prompt_source": None, "metadata": None, "embedding": None,
            "model_embedding": None, "in_domain": None, "prompt_cosine": None, "neighbors": [], "words": [],
            "model_words": [], "warning": warning, "error": err}


def _vec(v: np.ndarray) -> list[float]:
    return np.round(v.astype(np.float64), 7).tolist()


def predict_records(predictor, files: Sequence[Path], chooser: TextChooser | None, batch_size: int = 32,
                    word_threshold: float = 0.5, workers: int = 4, guard: domain.DomainGuard | None = None,
                    prior: np.ndarray | None = None, read_metadata: bool = True,
                    word_prior: domain.WordPrior | None = None, shift: dict | None = None) -> Iterator[list[dict]]:
    """Yield one list of JSON-ready records per batch of ``files`` (input order; failures carry ``error``).

    ``guard`` + ``prior``: give ``in_domain`` and move out-of-domain embeddings towards ``prior`` (a vector, or
    ``prior(images, feats) -> (n, D)``: ``revsd.prior.ImagePrior``); ``word_prior``: move their word
    probabilities alike (``words``; ``model_words`` keeps the head's own). ``shift``: a dict to judge the files
    together too (:func:`revsd.domain.shift_caps` over every image read so far; it holds ``p`` and ``share``).
    ``read_metadata``: use the exact prompt a file carries (``prompt_source: "metadata"``)."""
    side = min_side(predictor)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = list(files[start:start + batch_size])
            loaded = list(pool.map(lambda f: _load(f, side, read_metadata), chunk))
            recs = [_blank(f, err, meta.warning if meta else None) for f, (_, meta, err) in zip(chunk, loaded)]
            ok = [i for i, (img, _, _) in enumerate(loaded) if img is not None]
            if ok:
                try:
                    _fill(predictor, [loaded[i] for i in ok], [recs[i] for i in ok], chooser, batch_size,
                          word_threshold, guard, prior, word_prior, shift)
                except Exception as e:  # a failing batch is reported per image; the next batch still runs
                    for i in ok:
                        recs[i].update(_blank(chunk[i], f"{chunk[i]}: prediction failed ({type(e).__name__}: {e})",
                                              recs[i]["warning"]))
            yield recs


def _fill(predictor, loaded, recs, chooser, batch_size, word_threshold, guard, prior, word_prior, shift) -> None:
    imgs = [img for img, _, _ in loaded]
    if guard is not None:
        raw, probs, feats = predictor.predict(imgs, batch_size=batch_size, with_features=True)
        ind = guard.in_domain_from_scores(scores := guard.score(feats))
        if shift is not None:
            shift.setdefault("p", []).extend(guard.p_values(scores))
            caps, shift["share"] = domain.shift_caps(shift["p"], guard.n_calibration)
            ind = np.minimum(ind, caps[-len(imgs):])
        emb = domain.guard(raw, ind, domain.priors_for(prior, imgs, feats, ind))
    else:
        (raw, probs), ind = predictor.predict(imgs, batch_size=batch_size), None
        emb = raw.copy()
    infos = [meta.info if meta else None for _, meta, _ in loaded]
    from_meta = [j for j, info in enumerate(infos) if info and (info.get("prompt") or "").strip()]
    emb[from_meta] = encode([infos[j]["prompt"] for j in from_meta])  # (none: an empty array, no model loaded)
    model_words = words = confident_words(probs, predictor.words, word_threshold, len(imgs))
    if ind is not None and probs is not None and word_prior is not None and (ind < 1).any():
        words = confident_words(domain.guard_probs(probs, ind, word_prior.rates), predictor.words, word_threshold)
    if from_meta and probs is not None:  # a prompt read from the file: its own vocabulary words (prob 1)
        try:
            held = dict(zip(from_meta, prompt_words([infos[j]["prompt"] for j in from_meta], predictor.words)))
            words = [[(w, 1.0) for w in held[j]] if j in held else ws for j, ws in enumerate(words)]
        except Exception as e:  # e.g. no spaCy model here: the model's words stay
            warnings.warn(f"words of the metadata prompts not found ({type(e).__name__}: {e})", stacklevel=2)
    known = [infos[j]["prompt"] if j in from_meta else None for j in range(len(recs))]  # no text search for these
    texts = chooser.choose(emb, [[w for w, _ in ws] for ws in words], known) if chooser else [None] * len(recs)
    for j, r in enumerate(recs):
        r.update(embedding=_vec(emb[j]), model_embedding=_vec(raw[j]), metadata=infos[j],
                 in_domain=None if ind is None else round(float(ind[j]), 4), prompt_source="model",
                 words=[{"word": w, "prob": round(p, 4)} for w, p in words[j]],
                 model_words=[{"word": w, "prob": round(p, 4)} for w, p in model_words[j]])
        if texts[j] is not None:
            r["prompt"], r["prompt_cosine"] = texts[j].prompt, round(texts[j].cosine, 5)
            r["neighbors"] = [{"prompt": p, "cosine": round(c, 5)} for p, c in texts[j].neighbors]
        if j in from_meta:
            r["prompt"], r["prompt_source"], r["prompt_cosine"] = infos[j]["prompt"], "metadata", 1.0


# --- command line ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(prog="revsd predict", description=__doc__.replace("``", ""), formatter_class=Fmt)
    ap.add_argument("paths", nargs="+", help="image files and/or folders")
    ap.add_argument("--out", default="preds.jsonl", help="JSON lines output, replaced if it exists")
    ap.add_argument("--recursive", action="store_true",
                    help="descend into sub-folders (symlinked ones too, each folder once)")
    ap.add_argument("--model", default=None, help="run directory (default: the last pipeline run under working/)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=5, help="bank neighbours per image")
    ap.add_argument("--word-threshold", type=float, default=0.5, help="vocabulary probability to report a word")
    ap.add_argument("--bank", default=None, help="prompt bank folder (default: working/banks/default + train split)")
    ap.add_argument("--no-modifiers", action="store_true", help="do not extend prompts with modifier phrases")
    ap.add_argument("--ignore-metadata", action="store_true",
                    help="score the model alone, even for files that carry their own prompt")
    ap.add_argument("--no-guard", action="store_true",
                    help="no domain guard: embedding = the model's own, in_domain null")
    ap.add_argument("--guard-alpha", type=float, default=argparse.SUPPRESS, metavar="A",
                    help=f"the guard's strictness (default: the run's, {domain.ALPHA}): images beyond the (1 - A) "
                    "quantile of the run's own held-out scores move towards the prior; larger A moves more images, in "
                    "domain ones too (trade-off: bench/results/guard_scores.md)")
    ap.add_argument("--each-alone", action="store_true", help="guard each image on its own, not also the files "
                    "as a batch (a folder whose images are shifted as a whole: revsd.domain.shift_caps)")
    ap.add_argument("--broad-prior", action="store_true", help="guard towards the bank's mean embedding, not "
                    "the image-conditioned prior (ImageNet classes -> bank prompts, revsd.prior)")
    ap.add_argument("--txt", action="store_true", help="write the prompt to <image>.txt next to each image")
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--overwrite", action="store_true", help="with --txt: replace existing sidecars")
    side.add_argument("--append", action="store_true", help="with --txt: append to existing sidecars")
    ap.add_argument("--kaggle-submission", default=None, help="also write Kaggle's imgId_eId,val CSV here")
    return ap


def _check(args) -> None:
    """Every option value, before anything is read or written (raises :class:`UsageError`)."""
    a = args.guard_alpha = getattr(args, "guard_alpha", None)  # suppressed default: the run's own
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.k < 1:
        raise UsageError(f"--k must be ≥ 1, got {args.k}")
    if not 0.0 <= args.word_threshold <= 1.0:
        raise UsageError(f"--word-threshold must be within 0..1, got {args.word_threshold}")
    if args.each_alone and args.no_guard:
        raise UsageError("--each-alone is a way of guarding; it cannot go with --no-guard")
    if a is not None and (args.no_guard or not 0.0 < a < 1.0):
        raise UsageError("--guard-alpha sets the domain guard's strictness; it cannot go with --no-guard"
                         if args.no_guard else f"--guard-alpha must be within 0..1 (exclusive), got {a}")
    for flag, value in (("--out", args.out), ("--kaggle-submission", args.kaggle_submission)):
        if value is None:
            continue
        p = Path(value)
        if p.is_dir():
            raise UsageError(f"{flag} {p} is a folder; give a file name (e.g. {p / 'preds.jsonl'})")
        parent = next((q for q in [p.parent, *p.parent.parents] if q.exists()), Path("."))
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UsageError(f"{flag} {p}: cannot create it ({parent} is not a writable folder)")
    if args.model is not None and not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such run folder (give working/03_train/<exp>/<run>)")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _examples(items: list[str], n: int = 10) -> str:
    return "; ".join(items[:n]) + (f"; ... and {len(items) - n} more" if len(items) > n else "")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
    except UsageError as e:
        _say(f"revsd predict: {e}")
        return 2
    files, skipped = scan_images(args.paths, recursive=args.recursive)
    skipped_txt = [f"{p} ({why})" for p, why in skipped]
    if not files:
        _say(f"revsd predict: no image files in {' '.join(args.paths)} (folders are read by extension; "
             "--recursive descends into sub-folders)" + (f"; skipped: {_examples(skipped_txt)}" if skipped else ""))
        return 2
    model_dir = Path(args.model) if args.model else default_model_dir()
    if model_dir is None:
        _say("revsd predict: " + NO_MODEL_HELP.format(where=f"{paths.working_dir()}/{{{','.join(runs.RUN_STAGES)}}}"))
        return 1
    out, written = Path(args.out), [0]
    return_big_buffers_to_os()
    try:
        return _run(args, files, skipped_txt, model_dir, out, written)
    except KeyboardInterrupt:
        _say(f"revsd predict: interrupted; {written[0]} line(s) written to {out}" if written[0] or out.exists()
             else "revsd predict: interrupted before any output was written")
        return 130


def _run(args, files, skipped_txt, model_dir: Path, out: Path, written: list) -> int:
    try:
        predictor = load_predictor(model_dir)
    except Exception as e:  # a corrupt or foreign model file: one line, never a traceback
        _say(f"revsd predict: cannot load the model in {model_dir} ({_one_line(e)}); "
             + NO_MODEL_HELP.format(where=model_dir))
        return 1
    try:
        bank = load_bank(args.bank) if args.bank else default_bank(model_dir.parent.name)
        chooser = TextChooser(bank, None if args.no_modifiers else modifier_bank(), k=args.k)
    except (FileNotFoundError, KeyError, ValueError) as e:
        _say(f"revsd predict: cannot load the prompt bank: {e.args[0] if e.args else e}")
        return 1
    guard = image_prior = None
    if not args.no_guard:
        try:
            guard = domain.load_or_fit(model_dir, predictor, min_side(predictor))
            guard.alpha = args.guard_alpha or guard.alpha  # --guard-alpha: this call only, never saved
        except Exception as e:  # no train/val rows for this run (e.g. a copied model): predict unguarded
            _say(f"revsd predict: no domain guard for {model_dir} ({_one_line(e)}); in_domain is null and "
                 "embeddings are the model's own (--no-guard silences this)")
    if guard is not None and not args.broad_prior:
        try:
            image_prior = ImagePrior.for_run(getattr(predictor, "spec", None), bank)
        except Exception as e:  # the guard still works with the bank's mean
            _say(f"revsd predict: no image-conditioned prior ({_one_line(e)}); guarding towards the bank's mean")
    mode = "overwrite" if args.overwrite else "append" if args.append else "keep"
    sidecars = sidecar_paths(files) if args.txt else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    n_ok, n_out, n_meta, failed, kept, ids, embs = 0, 0, 0, [], [], [], []
    t0 = time.perf_counter()
    _say(f"revsd predict: {len(files)} file(s), model {model_dir} ({predictor.backbone}), bank of {len(bank):,} "
         f"prompts -> {out}")
    with open(out, "w") as f, tqdm(total=len(files), desc="predict", unit="img") as bar:
        prior = image_prior if image_prior is not None else domain.bank_prior(bank.emb)
        word_prior = domain.WordPrior(bank.prompts, predictor.words) if guard is not None else None
        shift = None if args.each_alone else {}
        for recs in predict_records(predictor, files, chooser, args.batch_size, args.word_threshold, guard=guard,
                                    prior=prior, read_metadata=not args.ignore_metadata,
                                    word_prior=word_prior, shift=shift):
            for r in recs:
                if r["error"]:
                    failed.append(r)
                else:
                    n_ok += 1
                    n_out += r["in_domain"] is not None and r["in_domain"] < domain.OUT_OF_DOMAIN
                    n_meta += r["prompt_source"] == "metadata"
                    ids.append(Path(r["image"]).stem)
                    embs.append(r["embedding"])
                    if args.txt:
                        txt = sidecars[r["image"]]
                        r["sidecar"], r["sidecar_file"] = write_sidecar(r["image"], r["prompt"], mode, txt), str(txt)
                        if r["sidecar"] == "kept":
                            kept.append(str(txt))
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
            written[0] += len(recs)
            bar.update(len(recs))
    dt = time.perf_counter() - t0
    towards = "the image-conditioned prior" if image_prior is not None else "the bank's mean"
    strict = f", guard alpha {guard.alpha:g}" if guard is not None and args.guard_alpha is not None else ""
    share = (shift or {}).get("share")
    strict += "" if share is None else f"; the files as a whole look shifted, in-domain share ≈ {share:.2f}"
    guarded = (f", {n_out} out of domain (in_domain < {domain.OUT_OF_DOMAIN}{strict}: moved towards {towards})"
               if guard is not None else ", no domain guard")
    _say(f"revsd predict: {n_ok} ok, {len(failed)} failed{guarded}, {n_meta} prompt(s) from file metadata, "
         f"{len(files) / max(dt, 1e-9):.1f} images/s ({dt:.1f} s) -> {out}")
    for r in failed[:20]:
        _say(f"  failed: {r['error']}")
    if len(failed) > 20:
        _say(f"  ... and {len(failed) - 20} more (see 'error' in {out})")
    if skipped_txt:
        _say(f"  skipped {len(skipped_txt)} input(s): {_examples(skipped_txt)}")
    renamed = [f"{Path(i).name} -> {t.name}" for i, t in sidecars.items() if t != Path(i).with_suffix(".txt")]
    if renamed:
        _say(f"  {len(renamed)} image(s) share a stem, so their sidecars are named after the whole file name: "
             + _examples(renamed))
    if kept:
        _say(f"  {len(kept)} sidecar .txt file(s) already existed and were left alone (e.g. {kept[0]}); "
             "--overwrite replaces them, --append adds a line")
    status = 0 if n_ok else 1
    if args.kaggle_submission and n_ok:
        from revsd.submission import SubmissionError, write_submission

        try:
            write_submission(ids, np.asarray(embs, dtype=np.float32), args.kaggle_submission)
            _say(f"  Kaggle submission ({n_ok} images x 384 rows) -> {args.kaggle_submission}")
        except SubmissionError as e:
            _say(f"revsd predict: Kaggle submission not written: {e}")
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
