"""``revsd predict`` on real sample images: bad inputs, sidecar rules, Kaggle format, exit codes, model choice.

Most tests drive the CLI with :class:`TinyPredictor`, a small real torch model behind the ``Predictor``
protocol of ``revsd.inference.load_predictor``; ``test_end_to_end_trained_run`` trains a real tiny run.
The domain guard on a real pretrained model is in ``tests/test_domain.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from revsd import predict, retrieval
from revsd.retrieval import build_bank, encode
from revsd.submission import read_submission

WORDS = ["woman", "painting", "portrait", "cat"]


class TinyPredictor:
    """16x16 grey thumbnail -> linear heads; embeddings lean towards a real prompt, 'woman'/'painting' likely."""

    backbone, input_size, words = "tiny-linear", 16, WORDS

    def __init__(self, fail_on_batch: int | None = None, exc: type[BaseException] = ValueError):
        g = torch.Generator().manual_seed(0)
        self.w_emb = torch.randn(256, 384, generator=g) * 0.05
        self.b_emb = torch.from_numpy(encode(["a painting of a woman in a garden"])[0]) * 3
        self.w_voc = torch.randn(256, len(WORDS), generator=g) * 0.05
        self.b_voc = torch.tensor([3.0, 2.0, -3.0, -4.0])
        self.calls, self.fail_on_batch, self.exc = 0, fail_on_batch, exc

    def predict(self, images, batch_size=32, with_features=False):
        self.calls += 1
        if self.calls == self.fail_on_batch:
            raise self.exc("simulated failure")
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("L").resize((16, 16)), np.float32).ravel() / 255)
                         for im in images])
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(x @ self.w_emb + self.b_emb, dim=1)
            probs = torch.sigmoid(x @ self.w_voc + self.b_voc)
        return (emb.numpy(), probs.numpy(), x.numpy()) if with_features else (emb.numpy(), probs.numpy())


@pytest.fixture(scope="module")
def small_bank(sample_dir, tmp_path_factory) -> Path:
    df = pd.read_parquet(sample_dir.parents[1] / "input/prompts/diffusiondb_prompts.parquet")
    prompts = df.loc[df["prompt"].str.len().between(20, 70), "prompt"].sample(80, random_state=1).tolist()
    out = tmp_path_factory.mktemp("bank") / "bank"
    build_bank(prompts, out, progress=False)
    return out


@pytest.fixture()
def tiny(monkeypatch):
    holder = {"model": TinyPredictor()}
    monkeypatch.setattr(predict, "load_predictor", lambda run_dir: holder["model"])
    return holder


@pytest.fixture()
def good_images(sample_dir, tmp_path) -> list[Path]:
    out = tmp_path / "imgs"
    out.mkdir()
    srcs = sorted((sample_dir / "images").rglob("*.jpg"))[:3]
    return [Path(shutil.copy(s, out / s.name)) for s in srcs]


def _run(tmp_path, files, *extra, bank) -> tuple[int, list[dict]]:
    out = tmp_path / "preds.jsonl"
    code = predict.main([*map(str, files), "--out", str(out), "--model", str(tmp_path), "--bank", str(bank),
                         "--no-modifiers", "--batch-size", "4", *extra])
    lines = [json.loads(s) for s in out.read_text().splitlines()] if out.exists() else []
    return code, lines


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` pixels (no pixel data: crafted cheaply)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _bad_and_odd_files(d: Path, good: Path) -> dict[str, Path]:
    d.mkdir()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    f = {}
    f["truncated_jpeg"] = d / "trunc.jpg"
    f["truncated_jpeg"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    Image.fromarray(noise).save(d / "full.png")
    f["truncated_png"] = d / "trunc.png"
    f["truncated_png"].write_bytes((d / "full.png").read_bytes()[:3000])
    f["text_as_png"] = d / "notes.png"
    f["text_as_png"].write_text("this is not an image\n")
    f["huge"] = _png_claiming(d / "huge.png", 9_000, 8_000)  # over revsd's limit, under PIL's own
    f["bomb"] = _png_claiming(d / "bomb.png", 100_000, 100_000)
    f["dangling_symlink"] = d / "link.png"
    os.symlink(d / "does-not-exist.png", f["dangling_symlink"])
    f["missing"] = d / "missing.jpg"
    ok = {}
    ok["rgba"] = d / "rgba.png"
    Image.fromarray(np.dstack([noise, noise[..., :1]])).save(ok["rgba"])
    ok["palette_transparent"] = d / "pal.png"
    Image.fromarray(noise).convert("P").save(ok["palette_transparent"], transparency=0)
    ok["gray16"] = d / "gray16.png"
    Image.fromarray((rng.integers(0, 65535, (64, 64))).astype(np.uint16)).save(ok["gray16"])
    ok["gray"] = d / "gray.png"
    Image.fromarray(noise[..., 0]).save(ok["gray"])
    assert Image.open(ok["gray16"]).mode.startswith("I;16") and Image.open(ok["palette_transparent"]).mode == "P"
    return f, ok


def test_bad_files_get_error_lines_and_the_batch_goes_on(tmp_path, tiny, good_images, small_bank, capsys):
    bad, odd = _bad_and_odd_files(tmp_path / "odd", good_images[0])
    files = [good_images[0], *bad.values(), *odd.values(), good_images[1]]
    code, lines = _run(tmp_path, files, bank=small_bank)
    assert code == 0
    assert [r["image"] for r in lines] == [str(p) for p in files]  # one line per input, in order
    by_image = {r["image"]: r for r in lines}
    for kind, p in bad.items():
        r = by_image[str(p)]
        assert r["error"] and str(p) in r["error"], kind
        assert r["embedding"] is None and r["prompt"] is None and r["neighbors"] == []
    assert "decompression-bomb guard" in by_image[str(bad["huge"])]["error"]
    assert "decompression bomb" in by_image[str(bad["bomb"])]["error"]
    assert "not found" in by_image[str(bad["missing"])]["error"]
    for p in [good_images[0], *odd.values(), good_images[1]]:
        r = by_image[str(p)]
        assert r["error"] is None, r["error"]
        e = np.asarray(r["embedding"])
        assert e.shape == (384,) and np.linalg.norm(e) == pytest.approx(1.0, abs=1e-4)
        assert r["prompt"] and len(r["neighbors"]) == 5
        assert [w["word"] for w in r["words"]] == ["woman", "painting"]
        assert r["prompt_cosine"] == pytest.approx(float(encode([r["prompt"]])[0] @ e), abs=1e-3)
    err = capsys.readouterr().err
    assert f"{len(files) - len(bad)} ok, {len(bad)} failed" in err and "images/s" in err


def test_directory_named_like_an_image_is_an_error(tmp_path, tiny, good_images, small_bank):
    (tmp_path / "x.png").mkdir()
    chooser = retrieval.TextChooser(retrieval.load_bank(small_bank), None)
    (recs,) = predict.predict_records(tiny["model"], [tmp_path / "x.png", good_images[0]], chooser, batch_size=8)
    assert "is a directory" in recs[0]["error"] and recs[1]["error"] is None


def test_model_failure_in_one_batch_spares_the_others(tmp_path, tiny, good_images, small_bank):
    tiny["model"] = TinyPredictor(fail_on_batch=1)
    files = good_images + good_images[:2]  # two batches of 4 and 1
    code, lines = _run(tmp_path, files + [good_images[2]], bank=small_bank)
    assert code == 0
    assert all("prediction failed" in r["error"] for r in lines[:4])
    assert all(r["error"] is None for r in lines[4:])


def test_ctrl_c_exits_130_keeping_finished_lines(tmp_path, tiny, good_images, small_bank, capsys):
    tiny["model"] = TinyPredictor(fail_on_batch=2, exc=KeyboardInterrupt)
    code, lines = _run(tmp_path, good_images * 3, bank=small_bank)
    assert code == 130
    assert len(lines) == 4 and all(r["error"] is None for r in lines)
    assert "interrupted; 4 line(s) written to" in capsys.readouterr().err


def test_exit_codes(tmp_path, tiny, small_bank, monkeypatch, capsys):
    bad, _ = _bad_and_odd_files(tmp_path / "bad", Path(__file__))
    code, lines = _run(tmp_path, bad.values(), bank=small_bank)
    assert code == 1 and len(lines) == len(bad)  # nothing could be processed
    code, _ = _run(tmp_path, bad.values(), bank=tmp_path / "no-bank")
    assert code == 1 and "revsd bank build" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert predict.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o.jsonl")]) == 2
    monkeypatch.setenv("REVSD_WORKING", str(tmp_path / "no-runs"))
    assert predict.main([str(bad["truncated_jpeg"]), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "no trained model" in err and "make demo" in err and "revsd pipeline --profile demo" in err

    def missing(run_dir):
        raise FileNotFoundError(f"{run_dir}/model.safetensors not found")
    def stale(run_dir):
        raise RuntimeError("Error(s) in loading state_dict: missing key(s)")
    for loader in (missing, stale):
        monkeypatch.setattr(predict, "load_predictor", loader)
        assert predict.main([str(bad["truncated_jpeg"]), "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
        assert "make demo" in capsys.readouterr().err


def test_sidecar_rules(tmp_path, tiny, good_images, small_bank, capsys):
    imgs = good_images[:2]
    txt = [p.with_suffix(".txt") for p in imgs]
    code, lines = _run(tmp_path, imgs, "--txt", bank=small_bank)
    assert code == 0 and [r["sidecar"] for r in lines] == ["written", "written"]
    assert [t.read_text() for t in txt] == [r["prompt"] + "\n" for r in lines]
    txt[0].write_text("my own caption\n")
    code, lines = _run(tmp_path, imgs, "--txt", bank=small_bank)
    assert [r["sidecar"] for r in lines] == ["kept", "kept"]
    assert txt[0].read_text() == "my own caption\n"  # default: never overwrite
    assert "left alone" in capsys.readouterr().err
    code, lines = _run(tmp_path, imgs, "--txt", "--append", bank=small_bank)
    assert lines[0]["sidecar"] == "appended"
    assert txt[0].read_text() == "my own caption\n" + lines[0]["prompt"] + "\n"
    code, lines = _run(tmp_path, imgs, "--txt", "--overwrite", bank=small_bank)
    assert lines[0]["sidecar"] == "overwritten" and txt[0].read_text() == lines[0]["prompt"] + "\n"
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, imgs, "--txt", "--append", "--overwrite", bank=small_bank)
    assert e.value.code == 2


def test_kaggle_submission(tmp_path, tiny, good_images, small_bank):
    sub = tmp_path / "submission.csv"
    code, lines = _run(tmp_path, [*good_images, tmp_path / "missing.png"], "--kaggle-submission", str(sub),
                       bank=small_bank)
    assert code == 0
    ids, emb = read_submission(sub)
    assert ids.tolist() == [p.stem for p in good_images]  # failed images are not in the submission
    assert pd.read_csv(sub).shape == (3 * 384, 2)
    np.testing.assert_allclose(emb, [r["embedding"] for r in lines[:3]], atol=1e-6)
    dup = tmp_path / "dup"
    dup.mkdir()
    shutil.copy(good_images[0], dup / (good_images[0].stem + ".png"))
    code, _ = _run(tmp_path, [good_images[0], dup / (good_images[0].stem + ".png")], "--kaggle-submission",
                   str(tmp_path / "s2.csv"), bank=small_bank)
    assert code == 1 and not (tmp_path / "s2.csv").exists()


def test_modifier_phrases_extend_the_prompt(tmp_path, tiny, good_images, small_bank, monkeypatch):
    monkeypatch.setenv("REVSD_WORKING", str(tmp_path / "w"))
    build_bank(retrieval.modifier_phrases()[::80], tmp_path / "w" / "banks" / "modifiers", progress=False)
    out = tmp_path / "p.jsonl"
    assert predict.main([str(good_images[0]), "--out", str(out), "--model", str(tmp_path), "--bank",
                         str(small_bank)]) == 0
    r = json.loads(out.read_text())
    assert r["prompt_cosine"] >= r["neighbors"][0]["cosine"] - 1e-5


def test_default_model_is_best_run_of_newest_exp(tmp_path, monkeypatch):
    monkeypatch.setenv("REVSD_WORKING", str(tmp_path))

    def run(stage, exp, name, val, t, done=True):
        d = tmp_path / stage / exp / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"val_cosine": val}))
        if done:
            (d / "DONE").touch()
            os.utime(d / "DONE", (t, t))
        return d

    assert predict.default_model_dir() is None
    run("03_train", "old", "r1", 0.9, 100)
    best = run("03_train", "new", "a", 0.7, 200)
    run("05_curriculum", "new", "b", 0.6, 300)
    run("03_train", "new", "c", 0.95, 400, done=False)  # incomplete: never chosen
    assert predict.default_model_dir() == best


def test_end_to_end_trained_run(prepared_exp, sample_dir, tmp_path, small_bank):
    from revsd import train

    cfg = train.TrainConfig(exp=prepared_exp, backbone="effnet_lite0", epochs=2, smoke=True, tiny=True)
    run_dir = Path(train.run(cfg))
    assert (run_dir / "DONE").exists()
    imgs = sorted((sample_dir / "images").rglob("*.jpg"))[:6]
    out = tmp_path / "e2e.jsonl"
    code = predict.main([*map(str, imgs), "--out", str(out), "--bank", str(small_bank), "--no-modifiers"])
    assert code == 0
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert len(lines) == 6 and all(r["error"] is None and len(r["embedding"]) == 384 for r in lines)
    table = predict.evaluate_text(run_dir, bank=retrieval.load_bank(small_bank),
                                  modifiers=build_bank(retrieval.modifier_phrases()[::200], progress=False))
    assert list(table["output"])[:2] == ["predicted embedding", "readable prompt (MiniLM of text)"]
    assert table["ratio_to_embedding"].iloc[0] == 1.0 and (table["n"] > 0).all()


def test_folders_and_recursive(tmp_path, tiny, good_images, small_bank):
    nested = tmp_path / "top" / "sub"
    nested.mkdir(parents=True)
    for p in good_images[:2]:
        shutil.copy(p, nested / p.name)
    (nested / "notes.txt").write_text("not an image, not listed")
    assert _run(tmp_path, [tmp_path / "top"], bank=small_bank)[0] == 2  # nothing at the top level
    code, lines = _run(tmp_path, [tmp_path / "top"], "--recursive", bank=small_bank)
    assert code == 0 and sorted(Path(r["image"]).name for r in lines) == sorted(p.name for p in good_images[:2])


# --- embedded prompts (issue 13), faults (issue 14) -----------------------------------------------------------

A1111_PROMPT = "a red fox in the snow, golden hour, (detailed fur:1.2)"
COMFY_PROMPT = "a portrait of a cat in a lighthouse at night, dramatic sky"
COMFY_GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": 20, "cfg": 8.0, "sampler_name": "euler",
                                               "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                               "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 640, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": COMFY_PROMPT, "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
}


def _png_with(path: Path, src: Path, chunks: dict[str, str]) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v)
    Image.open(src).convert("RGB").save(path, pnginfo=info)
    return path


@pytest.fixture()
def prompted(tmp_path, good_images) -> dict[str, Path]:
    d = tmp_path / "gens"
    d.mkdir()
    a1111 = f"{A1111_PROMPT}\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512"
    return {"a1111": _png_with(d / "a1111.png", good_images[0], {"parameters": a1111}),
            "comfyui": _png_with(d / "comfy.png", good_images[1], {"prompt": json.dumps(COMFY_GRAPH)}),
            "malformed": _png_with(d / "broken.png", good_images[2], {"prompt": '{"3": {"class_type": "KSa'}),
            "plain": Path(shutil.copy(good_images[2], d / "plain.jpg"))}


def test_embedded_prompts_are_used_exactly(tmp_path, tiny, prompted, small_bank, capsys, monkeypatch):
    from revsd import textsearch

    searched, search = [], textsearch.TextChooser.__call__
    monkeypatch.setattr(textsearch.TextChooser, "__call__",
                        lambda self, emb, words=None: searched.append(len(emb)) or search(self, emb, words))
    code, lines = _run(tmp_path, prompted.values(), bank=small_bank)
    assert code == 0
    assert sum(searched) == 2  # the text search runs for the two files without a prompt only
    r = {k: line for k, line in zip(prompted, lines)}
    bank = retrieval.load_bank(small_bank)
    for kind, prompt in (("a1111", A1111_PROMPT), ("comfyui", COMFY_PROMPT)):
        assert r[kind]["prompt"] == prompt and r[kind]["prompt_source"] == "metadata", kind
        assert r[kind]["metadata"]["prompt"] == prompt and r[kind]["error"] is None and r[kind]["prompt_cosine"] == 1
        np.testing.assert_allclose(r[kind]["embedding"], encode([prompt])[0], atol=1e-5)
        assert not np.allclose(r[kind]["embedding"], r[kind]["model_embedding"], atol=1e-3)
        scores, idx = bank.search(np.asarray([r[kind]["embedding"]], np.float32), 5)  # its nearest bank prompts
        assert [n["prompt"] for n in r[kind]["neighbors"]] == [bank.prompts[j] for j in idx[0]]
    assert r["a1111"]["metadata"]["seed"] == 42 and r["a1111"]["metadata"]["negative_prompt"] == "blurry"
    # words: the file's prompt holds them exactly (vocabulary order, prob 1); model_words stay the head's own
    assert r["comfyui"]["words"] == [{"word": "portrait", "prob": 1.0}, {"word": "cat", "prob": 1.0}]
    assert r["a1111"]["words"] == [] and {w["word"] for w in r["a1111"]["model_words"]} == {"woman", "painting"}
    assert r["plain"]["words"] == r["plain"]["model_words"] != []
    assert r["comfyui"]["metadata"]["tool"] == "comfyui" and r["comfyui"]["metadata"]["steps"] == 20
    for kind in ("plain", "malformed"):  # never a claimed prompt; a broken chunk is a warning, not a crash
        assert r[kind]["prompt_source"] == "model" and r[kind]["metadata"] is None and r[kind]["error"] is None
        assert r[kind]["embedding"] == r[kind]["model_embedding"]  # no guard for this run: the model's own
    assert r["plain"]["warning"] is None and "broken.png" in r["malformed"]["warning"]
    assert "2 prompt(s) from file metadata" in capsys.readouterr().err
    code, lines = _run(tmp_path, prompted.values(), "--ignore-metadata", bank=small_bank)
    assert code == 0 and {x["prompt_source"] for x in lines} == {"model"} and all(x["metadata"] is None for x in lines)


class NoVocabPredictor(TinyPredictor):
    """A run trained without the vocabulary head (the demo's ``plain`` runs): no words, ``probs`` None."""

    words = []

    def predict(self, images, batch_size=32, with_features=False):
        emb, _, x = super().predict(images, batch_size, with_features=True)
        return (emb, None, x) if with_features else (emb, None)


def test_a_run_without_a_vocabulary_head(tmp_path, tiny, prompted, small_bank):
    """Every file failed with ``IndexError`` on such a run (no words per image for the text search)."""
    tiny["model"] = NoVocabPredictor()
    code, lines = _run(tmp_path, prompted.values(), bank=small_bank)
    assert code == 0 and [x["error"] for x in lines] == [None] * 4
    assert [x["prompt_source"] for x in lines] == ["metadata", "metadata", "model", "model"]
    assert all(x["prompt"] and x["words"] == x["model_words"] == [] for x in lines)


def test_usage_errors_leave_outputs_untouched(tmp_path, tiny, good_images, small_bank, capsys):
    out = tmp_path / "preds.jsonl"
    out.write_text("earlier results\n")
    base = [str(good_images[0]), "--model", str(tmp_path), "--bank", str(small_bank)]
    cases = [(["--out", str(tmp_path)], "is a folder"), (["--out", str(out), "--batch-size", "0"], "--batch-size"),
             (["--out", str(out), "--k", "0"], "--k"), (["--out", str(out), "--word-threshold", "2"], "0..1"),
             (["--out", str(out), "--kaggle-submission", str(tmp_path)], "is a folder"),
             (["--out", str(out), "--guard-alpha", "0"], "--guard-alpha must be within 0..1"),
             (["--out", str(out), "--guard-alpha", "0.1", "--no-guard"], "cannot go with --no-guard"),
             (["--out", str(out), "--each-alone", "--no-guard"], "--each-alone is a way of guarding")]
    for extra, why in cases:
        assert predict.main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert predict.main([str(good_images[0]), "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert out.read_text() == "earlier results\n"


@pytest.mark.parametrize("damage", ["corrupt_weights", "list_model_json"])
def test_a_damaged_model_is_one_line(tmp_path, good_images, small_bank, capsys, damage):
    run = tmp_path / "run"
    run.mkdir()
    if damage == "corrupt_weights":
        (run / "model.json").write_text(json.dumps({"backbone": "effnet_lite0", "mode": "frozen", "head_config": "plain",
                                                    "in_dim": 8, "emb_dim": 384, "vocab_size": 0, "hidden": 0,
                                                    "dropout": 0.0, "head_norm": True, "lam": 0.0, "words": [],
                                                    "preprocess": {"input_size": 16, "mean": [0.5] * 3,
                                                                   "std": [0.5] * 3},
                                                    "pretrained": False, "tiny": True}))
        (run / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    else:
        (run / "model.json").write_text("[1, 2, 3]")
    out = tmp_path / "o.jsonl"
    assert predict.main([str(good_images[0]), "--model", str(run), "--out", str(out), "--bank", str(small_bank)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load the model" in err and str(run) in err
    assert not out.exists()


def test_sidecars_of_one_stem_never_collide(tmp_path, tiny, good_images, small_bank, capsys):
    d = tmp_path / "same"
    d.mkdir()
    imgs = []
    for ext in (".bmp", ".tiff", ".webp"):
        Image.open(good_images[0]).save(d / f"img{ext}")
        imgs.append(d / f"img{ext}")
    code, lines = _run(tmp_path, [d], "--txt", bank=small_bank)
    assert code == 0 and [r["sidecar"] for r in lines] == ["written"] * 3
    assert sorted(p.name for p in d.glob("*.txt")) == ["img.bmp.txt", "img.tiff.txt", "img.webp.txt"]
    for r in lines:
        assert Path(r["sidecar_file"]).read_text() == r["prompt"] + "\n"
    assert "3 image(s) share a stem" in capsys.readouterr().err
    assert predict.sidecar_paths([d / "a.png", d / "b.png"])[str(d / "a.png")] == d / "a.txt"


def test_recursive_follows_symlinked_folders_and_names_skips(tmp_path, tiny, good_images, small_bank, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(good_images[0], outside / "linked.jpg")
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    shutil.copy(good_images[1], top / "sub" / "real.jpg")
    (top / "sub" / "link").symlink_to(outside, target_is_directory=True)
    (top / "sub" / "loop").symlink_to(top, target_is_directory=True)  # would recurse forever
    (top / "self.png").symlink_to(top / "self.png")
    (top / "notes.md").write_text("x")
    code, lines = _run(tmp_path, [top], "--recursive", bank=small_bank)
    assert code == 0
    by = {Path(r["image"]).name: r for r in lines}
    assert sorted(by) == ["linked.jpg", "real.jpg", "self.png"]
    assert by["linked.jpg"]["error"] is None and "symlink loop" in by["self.png"]["error"]
    err = capsys.readouterr().err
    assert "skipped 2 input(s)" in err and "notes.md (not an image file extension)" in err
    assert f"{top / 'sub' / 'loop'} (folder already listed" in err
