"""ComfyUI's official templates: their prompts read from the UI workflows alone, and `revsd predict` scored on the
images they made (other generators than the demo's SD 1.5: Flux, SDXL, SD3.5, HiDream, Qwen-Image, ...).

    pip download --no-deps comfyui-workflow-templates-json==0.1.123 \\
        comfyui-workflow-templates-media-image==0.3.160 -d /tmp/templates          # two wheels, ~95 MB
    .venv/bin/python bench/bench_templates.py /tmp/templates        # writes bench/results/templates.md

The two wheels are the package index's copy of github.com/Comfy-Org/workflow_templates (MIT): the UI workflows and
their thumbnails; nothing of them is stored here and no prompt text is copied into the results. Templates taken: an
image thumbnail (``<name>-1.webp``, no before/after variant), not a hosted-API node, no node that loads an image,
video or audio (they generate from text alone).

1. **Prompts**: :func:`revsd.comfy.read` on :func:`revsd.comfy.from_workflow` of each workflow (a file with only the
   ``workflow`` chunk is read so): a prompt found or not, and whether it is a text stored in the file (or texts
   stored in it, joined with ", " as the tracer joins several encoders' texts).
2. **Images**: ``revsd predict --ignore-metadata`` with the demo's Lite2 cfg2 (its default model) and Lite0 cfg3 on
   three folders, each in one call: the thumbnails of the Image-category templates with a prompt (the image the
   template's workflow made, against the MiniLM embedding of its prompt; a few prompts are for a model with a system
   prompt and carry it), scikit-image's 15 photos and the demo's test split. The files judged together (the
   default: the guard's batch test, :func:`revsd.domain.shift_caps`) and each alone (``--each-alone``): images out
   of domain; mean cosine of ``embedding`` (what predict returns), ``model_embedding`` (the model alone), the
   bank's mean (the constant the guard must not fall below) and the image-conditioned prior (``revsd.prior``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from revsd import comfy, domain, predict, prior, retrieval
from revsd.artifacts import write_text
from revsd.images import open_rgb
from revsd.textenc import encode_prompts

sys.path.insert(0, str(Path(__file__).parent))
from bench_predict import markdown  # noqa: E402

LOADERS = ("LoadImage", "LoadImageMask", "LoadVideo", "LoadAudio", "LoadImageOutput")


def _wheel(folder: Path, stem: str) -> zipfile.ZipFile:
    found = sorted(folder.glob(f"{stem}-*.whl"))
    if not found:
        raise SystemExit(f"no {stem}-*.whl in {folder} (see the pip download line in this file's docstring)")
    return zipfile.ZipFile(found[-1])


def templates(folder: Path) -> list[dict]:
    """The text-only image templates: name, category, models, workflow (dict) and thumbnail bytes."""
    wj, wm = _wheel(folder, "comfyui_workflow_templates_json"), _wheel(folder, "comfyui_workflow_templates_media_image")
    jroot, mroot = "comfyui_workflow_templates_json/templates/", "comfyui_workflow_templates_media_image/templates/"
    thumbs, workflows = set(wm.namelist()), set(wj.namelist())
    out = []
    for cat in json.loads(wj.read(jroot + "index.json")):
        for t in cat.get("templates", []):
            name = t["name"]
            thumb, wf = f"{mroot}{name}-1.webp", f"{jroot}{name}.json"
            if (t.get("mediaType") != "image" or name.startswith("api_") or t.get("thumbnailVariant")
                    or thumb not in thumbs or wf not in workflows):
                continue
            w = json.loads(wj.read(wf))
            nodes = list(w.get("nodes") or []) + [n for d in (w.get("definitions") or {}).get("subgraphs") or []
                                                  for n in d.get("nodes") or []]
            if any(isinstance(n, dict) and n.get("type") in LOADERS for n in nodes):
                continue
            out.append({"name": name, "category": cat.get("title") or "", "models": ", ".join(t.get("models") or []),
                        "workflow": w, "thumbnail": wm.read(thumb)})
    return out


def read_prompts(items: list[dict]) -> list[dict]:
    rows = []
    for t in items:
        info = comfy.read(comfy.from_workflow(t["workflow"]))
        t["prompt"] = (info or {}).get("prompt")
        text = json.dumps(t["workflow"])
        stored = t["prompt"] is not None and ("yes" if json.dumps(t["prompt"])[1:-1] in text else "joined" if all(
            json.dumps(p)[1:-1] in text for p in t["prompt"].split(", ")) else "NO")
        rows.append({"template": t["name"], "category": t["category"], "models": t["models"],
                     "prompt": "found" if t["prompt"] else "–", "stored in the file": stored or "",
                     "negative": "found" if (info or {}).get("negative_prompt") else "–"})
    return rows


def image_sets(items: list[dict], tmp: Path) -> dict[str, tuple[list[Path], np.ndarray | None]]:
    """Folders to predict on, each with its truth (or None): the templates' thumbnails (Image category, with a
    prompt), scikit-image's 15 photos (the guard's check in ``bench/bench_predict.py``) and the demo's test split."""
    from bench_predict import SKIMAGE_PHOTOS

    from revsd import targets

    imgs = [t for t in items if t["prompt"] and t["category"] == "Image"]
    (tmp / "templates").mkdir()
    for t in imgs:
        (tmp / "templates" / f"{t['name']}.webp").write_bytes(t["thumbnail"])
    sets = {"templates": ([tmp / "templates" / f"{t['name']}.webp" for t in imgs],
                          encode_prompts([t["prompt"] for t in imgs]))}
    try:
        import skimage.data

        sets["scikit-image photos"] = ([Path(skimage.data.__file__).parent / n for n in SKIMAGE_PHOTOS], None)
    except ImportError:
        pass
    ts = targets.load("demo")
    r = ts.rows("test")
    sets["demo test split"] = ([Path(p) for p in ts.table["image_path"].to_numpy()[r]], ts.emb[r])
    return sets


def score_images(sets: dict, run_dirs: list[Path], tmp: Path) -> tuple[list[dict], list[dict]]:
    """Per run, guard mode and folder: images out of domain and mean cosines; per template image: in_domain and
    cosines (first run, the files judged together as ``revsd predict`` does by default)."""
    rows, per_image = [], []
    for run in run_dirs:
        pred = predict.load_predictor(run)
        bank = retrieval.default_bank(run.parent.name)
        broad = domain.bank_prior(bank.emb)
        image_prior = prior.ImagePrior.for_run(getattr(pred, "spec", None), bank)
        for mode, flags in (("together", []), ("each alone", ["--each-alone"])):
            for name, (files, truth) in sets.items():
                out = tmp / "preds.jsonl"
                t0 = time.perf_counter()
                rc = predict.main([*map(str, files), "--model", str(run), "--out", str(out), "--ignore-metadata",
                                   *flags])
                took = time.perf_counter() - t0
                recs = [json.loads(x) for x in out.read_text().splitlines()]
                if rc != 0 or len(recs) != len(files) or any(r.get("error") for r in recs):
                    raise SystemExit(f"revsd predict failed on {run} (exit {rc})")
                ind = np.array([r["in_domain"] for r in recs], np.float32)
                row = {"run": run.name, "files": mode, "folder": name, "images": len(files),
                       "out of domain": int((ind < domain.OUT_OF_DOMAIN).sum())}
                if truth is not None:
                    emb, raw = (np.array([r[k] for r in recs], np.float32) for k in ("embedding", "model_embedding"))
                    pil = [open_rgb(f, min_side=predict.min_side(pred)) for f in files]
                    feats = pred.predict(pil, with_features=True)[2]
                    pri = image_prior(pil, feats) if image_prior is not None else np.broadcast_to(broad, emb.shape)
                    cos = {k: (v * truth).sum(1) for k, v in (("embedding", emb), ("model_embedding", raw),
                                                              ("bank mean", broad[None, :]), ("image prior", pri))}
                    row.update({k: f"{v.mean():.4f}" for k, v in cos.items()})
                    row["embedding − bank mean"] = f"{(cos['embedding'] - cos['bank mean']).mean():+.4f}"
                    if name == "templates" and not per_image:
                        per_image = [{"template": f.stem, "in_domain": f"{ind[i]:.3f}",
                                      **{k: f"{v[i]:.3f}" for k, v in cos.items()}} for i, f in enumerate(files)]
                else:
                    row.update({k: "" for k in ("embedding", "model_embedding", "bank mean", "image prior",
                                                "embedding − bank mean")})
                row["predict s"] = f"{took:.1f}"
                rows.append(row)
    return rows, per_image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheels", help="folder with the two downloaded wheels")
    ap.add_argument("--model", action="append", default=None,
                    help="run folder (repeatable; default: the demo's Lite2 cfg2, its default, and Lite0 cfg3)")
    ap.add_argument("--prompts-only", action="store_true", help="part 1 only (no model needed)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "templates.md"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    items = templates(Path(args.wheels))
    prompt_rows = read_prompts(items)
    found = [r for r in prompt_rows if r["prompt"] == "found"]
    summary = (f"{len(items)} templates that generate from text alone: a prompt read from the UI workflow in "
               f"{len(found)}; a text stored in the file in {sum(r['stored in the file'] == 'yes' for r in found)}, "
               f"texts stored in the file joined with ', ' (several encoders) in "
               f"{sum(r['stored in the file'] == 'joined' for r in found)}, neither in "
               f"{sum(r['stored in the file'] == 'NO' for r in found)}.")
    parts = [f"## 1. Prompts from the UI workflow\n\n{summary}\n\n{markdown(prompt_rows)}"]
    print(summary)
    if not args.prompts_only:
        runs = [Path(m) for m in args.model] if args.model else [
            Path("working/03_train/demo") / r for r in ("effnet_lite2_cfg2_f-1_s0", "effnet_lite0_cfg3_f-1_s0")]
        with tempfile.TemporaryDirectory() as tmp:
            run_rows, image_rows = score_images(image_sets(items, Path(tmp)), runs, Path(tmp))
        parts.append("## 2. `revsd predict --ignore-metadata` on three folders\n\n"
                     "Each folder in one call, the files judged together (the default) and each alone "
                     "(`--each-alone`); mean cosine to the MiniLM embedding of each image's prompt:\n\n"
                     f"{markdown(run_rows)}\nPer template image, first run, files together:\n\n"
                     f"{markdown(image_rows)}")
        print(markdown(run_rows))
    cmd = " ".join([".venv/bin/python bench/bench_templates.py", *(sys.argv[1:] if argv is None else argv)])
    write_text(args.out, f"# bench_templates\n\n`{cmd}` (wheels: comfyui-workflow-templates-json 0.1.123, "
               f"-media-image 0.3.160); {time.perf_counter() - t0:.0f} s\n\n" + "\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
