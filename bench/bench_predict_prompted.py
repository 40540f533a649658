"""``revsd predict`` on files that carry their prompt: the readable-prompt search skipped vs run for every file.

    .venv/bin/python bench/bench_predict_prompted.py [--model RUN_DIR] [--n 96]   # writes results/predict_prompted.md

Writes ``--n`` PNGs from the sample's images into a temporary folder, each with an A1111 ``parameters`` chunk
holding its prompt, and times ``predict.predict_records`` over them (batch 32, no domain guard) twice per round,
two rounds: with ``TextChooser.choose`` as ``revsd predict`` uses it (a prompt read from the file needs no text
search; its neighbours come from the bank) and with a chooser that searches every row first, as before. The JSON
records of the two must be identical.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from revsd import paths, predict, retrieval, targets
from revsd.artifacts import write_text

sys.path.insert(0, str(Path(__file__).parent))
from bench_predict import markdown


class SearchEveryRow(retrieval.TextChooser):
    """The chooser before the change: the text search runs for every row, known prompts included."""

    def choose(self, emb, words=None, known=None):
        out = super().choose(emb, words, None)
        for i, k in enumerate(known or []):
            if k is not None:  # predict then replaces the chosen text with the file's prompt
                out[i] = retrieval.Readable(k, 1.0, out[i].neighbors, {})
        return out


def prompted_pngs(exp: str, n: int, folder: Path) -> list[Path]:
    table = targets.load(exp).table.iloc[:n]
    files = []
    for i, (src, prompt) in enumerate(zip(table["image_path"], table["prompt"])):
        info = PngInfo()
        info.add_text("parameters", f"{prompt}\nNegative prompt: blurry\n"
                                    f"Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: {i}, Size: 512x512")
        files.append(folder / f"{i:04d}.png")
        Image.open(paths.resolve_input(src)).convert("RGB").save(files[-1], pnginfo=info)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="run directory (default: revsd predict's default model)")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "predict_prompted.md"))
    args = ap.parse_args(argv)
    run_dir = Path(args.model) if args.model else predict.default_model_dir()
    if run_dir is None:
        print("no trained run: `make demo` first, or pass --model RUN_DIR", file=sys.stderr)
        return 1
    pred = predict.load_predictor(run_dir)
    bank, mods = retrieval.default_bank(run_dir.parent.name), retrieval.modifier_bank()
    rows, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        files = prompted_pngs(run_dir.parent.name, args.n, Path(tmp))
        list(predict.predict_records(pred, files[:4], retrieval.TextChooser(bank, mods, k=5)))  # warm-up
        for rnd in (1, 2):
            for name, cls in (("search skipped for known prompts (now)", retrieval.TextChooser),
                              ("search for every row (before)", SearchEveryRow)):
                t = time.perf_counter()
                recs = [r for b in predict.predict_records(pred, files, cls(bank, mods, k=5), batch_size=32) for r in b]
                dt = time.perf_counter() - t
                outputs.setdefault(name, recs)
                rows.append({"round": rnd, "chooser": name, "images": len(recs),
                             "prompts from metadata": sum(r["prompt_source"] == "metadata" for r in recs),
                             "images/s": f"{len(recs) / dt:.1f}"})
                print(rows[-1], flush=True)
    same = len({repr(v) for v in outputs.values()}) == 1
    cmd = " ".join([".venv/bin/python bench/bench_predict_prompted.py", *(sys.argv[1:] if argv is None else argv)])
    write_text(args.out, f"# bench_predict_prompted\n\n`{cmd}`; model `{run_dir.name}`, bank {len(bank):,} prompts "
                         f"+ {len(mods):,} modifier phrases\n\n{markdown(rows)}\nIdentical records: {same}\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
