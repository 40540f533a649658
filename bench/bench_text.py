"""Readable prompts vs the predicted embedding: text quality and speed, previous chooser vs the current one.

    REVSD_WORKING=/tmp/h3b_work .venv/bin/python bench/bench_text.py --model /tmp/h3b_work/03_train/demo/<run>

Needs a trained run (e.g. ``REVSD_WORKING=/tmp/w revsd pipeline --profile demo --only
01_filter,02_targets,03_train_effnet_lite2_plain``). On the run's held-out split (default test) it reports, for the
previous greedy chooser (frozen below as :class:`GreedyChooser`) and for :class:`revsd.retrieval.TextChooser`:

- ``text→truth``: mean cosine of the chosen text's own MiniLM embedding to the true prompt's, and its ratio to the
  predicted embedding's cosine (goal ≥ 0.9); ``text→pred``: cosine of the text to the predicted embedding;
- two oracle ratios that locate the limit (:func:`ceiling`): the best of all candidates the chooser scored, and
  the best of the 3 closest to the prediction, each judged against the truth (unknown at predict time);
- the chooser alone (images/s, from the saved predictions) and ``revsd predict``'s whole loop over the split's
  images (decode + model + readable prompt, batch 32; goal ≥ 15 images/s). Each chooser starts with an empty
  text cache. CPU seconds are reported too, since other jobs may share the CPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from revsd import paths, predict, retrieval, targets
from revsd.artifacts import load_predictions, write_text
from revsd.images import open_rgb
from revsd.textsearch import Readable, _join


class GreedyChooser(retrieval.TextChooser):
    """The chooser before issue 13 (k bank neighbours, words, 2 greedy rounds of 8 modifiers), kept to compare."""

    def __init__(self, bank, modifiers=None, k=5, rounds=2, per_round=8, max_words=6, model=""):
        super().__init__(bank, modifiers, k=k, rounds=rounds, per_round=per_round, max_words=max_words, model=model,
                         bf16=False)  # float32 encoding, as it was

    def __call__(self, emb: np.ndarray, words: Sequence[Sequence[str]] | None = None) -> list[Readable]:
        emb, words, neighbors, _ = self._nearest(emb, words, self.k)
        cands = [dict(nb) for nb in neighbors]
        pending = [dict.fromkeys([_join("", w)] * bool(w) + [_join(p, w) for p, _ in nb if w])
                   for nb, w in zip(neighbors, words)]
        self._score(pending, emb, cands)
        if self.modifiers is not None and self.rounds > 0:
            _, midx = self.modifiers.search(emb, self.per_round)
            phrases = [[self.modifiers.prompts[j] for j in row if j >= 0] for row in midx]
            best = [max(c, key=c.get) for c in cands]
            for _ in range(self.rounds):
                pending = [dict.fromkeys(t for t in (_join(b, [p]) for p in ph) if t != b)
                           for b, ph in zip(best, phrases)]
                self._score(pending, emb, cands)
                new_best = [max(c, key=c.get) for c in cands]
                if new_best == best:
                    break
                best = new_best
        return [Readable(max(c, key=c.get), max(c.values()), nb, c) for nb, c in zip(neighbors, cands)]


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]) + "\n"


def ceiling(chosen, truth, base: float, top: int = 3) -> dict:
    """Is the search or the choice the limit? The ratio of the candidate closest to the truth (an oracle: the
    truth is unknown at predict time), and of the best of the ``top`` candidates closest to the prediction."""
    texts = sorted({t for r in chosen for t in r.candidates})
    enc = dict(zip(texts, retrieval.encode(texts)))
    best = [max(float(enc[t] @ truth[i]) for t in r.candidates) for i, r in enumerate(chosen)]
    near = [max(float(enc[t] @ truth[i]) for t in sorted(r.candidates, key=r.candidates.get, reverse=True)[:top])
            for i, r in enumerate(chosen)]
    return {"oracle ratio (any candidate)": round(float(np.mean(best)) / base, 4),
            f"oracle ratio (top {top} by text→pred)": round(float(np.mean(near)) / base, 4)}


def measure(name: str, make, emb, words, truth, files, predictor, batch: int) -> dict:
    base = float((emb * truth).sum(1).mean())
    chooser = make()
    t, c = time.perf_counter(), time.process_time()
    chosen = [r for s in range(0, len(emb), batch) for r in chooser(emb[s:s + batch], words[s:s + batch])]
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    text_emb = retrieval.encode([r.prompt for r in chosen])
    to_truth = float((text_emb * truth).sum(1).mean())
    row = {"chooser": name, "n": len(emb), "embedding→truth": round(base, 4), "text→truth": round(to_truth, 4),
           "ratio": round(to_truth / base, 4), "text→pred": round(float(np.mean([r.cosine for r in chosen])), 4),
           "candidates/img": round(float(np.mean([len(r.candidates) for r in chosen])), 1),
           "chooser img/s": f"{len(emb) / dt:.1f} ({cpu / len(emb) * 1000:.0f} CPU-ms/img)"}
    row.update(ceiling(chosen, truth, base))
    if files:
        chooser = make()  # empty cache again
        t, c = time.perf_counter(), time.process_time()
        n = sum(len(r) for r in predict.predict_records(predictor, files, chooser, batch_size=batch))
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        row["whole loop img/s"] = f"{n / dt:.1f} ({cpu / n * 1000:.0f} CPU-ms/img)"
    return row, chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="run directory (default: the last pipeline run under working/)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-loop", action="store_true", help="skip the whole predict loop (chooser only)")
    ap.add_argument("--examples", type=int, default=6, help="example rows to print")
    ap.add_argument("--chooser", nargs="*", default=[], metavar="KEY=VALUE",
                    help="TextChooser settings for the 'beam (now)' row, e.g. rounds=3 swap=5 (ints/floats)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "text.md"))
    args = ap.parse_args(argv)
    settings = {k: float(v) if "." in v else int(v) for k, v in (kv.split("=", 1) for kv in args.chooser)}
    run_dir = Path(args.model) if args.model else predict.default_model_dir()
    if run_dir is None:
        print("no trained run: pass --model RUN_DIR (see the docstring)", file=sys.stderr)
        return 1
    exp = run_dir.parent.name
    ts = targets.load(exp)
    rows = ts.rows(args.split)
    preds = load_predictions(run_dir / f"preds_{args.split}.npz").align(ts.ids[rows])
    emb = preds.emb / np.linalg.norm(preds.emb, axis=1, keepdims=True)
    truth = ts.emb[rows]
    predictor = predict.load_predictor(run_dir)
    conf = predict.confident_words(preds.probs, predictor.words, 0.5) if preds.probs is not None else None
    words = [[w for w, _ in ws] for ws in conf] if conf else [[] for _ in emb]
    bank, mods = retrieval.default_bank(exp), retrieval.modifier_bank()
    retrieval.encode(["warm-up"])
    files = []
    if not args.no_loop:
        files = [paths.resolve_input(p) for p in ts.table["image_path"].to_numpy()[rows]]
        predictor.predict([open_rgb(files[0])], batch_size=1)  # warm-up
    out, chosen = [], {}
    for name, make in [("greedy (before)", lambda: GreedyChooser(bank, mods, k=5)),
                       ("beam (now)" + "".join(f" {k}={v}" for k, v in settings.items()),
                        lambda: retrieval.TextChooser(bank, mods, k=5, **settings))]:
        row, chosen[name] = measure(name, make, emb, words, truth, files, predictor, args.batch)
        print(row, flush=True)
        out.append(row)
    truth_text = ts.table["prompt"].to_numpy()[rows]
    ex = [{"true prompt": t, **{n: f"{c[i].prompt} ({c[i].cosine:.3f})" for n, c in chosen.items()}}
          for i, t in list(enumerate(truth_text))[: args.examples]]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} " \
              f"threads), load average {os.getloadavg()[0]:.1f} at the end (other jobs share these CPUs)"
    cmd = " ".join([".venv/bin/python bench/bench_text.py", *(sys.argv[1:] if argv is None else argv)])
    md = (f"# bench_text\n\n`{cmd}` on {machine}; run `{run_dir.name}` of experiment `{exp}`, split "
          f"`{args.split}`, bank {len(bank):,} prompts + {len(mods):,} modifier phrases\n\n{markdown(out)}\n"
          f"## Examples (text, its cosine to the predicted embedding)\n\n{markdown(ex)}")
    print(md)
    write_text(args.out, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
