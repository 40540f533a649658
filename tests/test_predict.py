"""``revsd predict`` on real sample images: bad inputs, sidecar rules, Kaggle format, exit codes, model choice.

Most tests drive the CLI with :class:`TinyPredictor`, a small real torch model behind the ``Predictor``
protocol of ``revsd.train.load_predictor``; ``test_end_to_end_trained_run`` trains a real tiny run.
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

    backbone, image_size, words = "tiny-linear", 16, WORDS

    def __init__(self, fail_on_batch: int | None = None, exc: type[BaseException] = ValueError):
        g = torch.Generator().manual_seed(0)
        self.w_emb = torch.randn(256, 384, generator=g) * 0.05
        self.b_emb = torch.from_numpy(encode(["a painting of a woman in a garden"])[0]) * 3
        self.w_voc = torch.randn(256, len(WORDS), generator=g) * 0.05
        self.b_voc = torch.tensor([3.0, 2.0, -3.0, -4.0])
        self.calls, self.fail_on_batch, self.exc = 0, fail_on_batch, exc

    def predict(self, images, batch_size=32):
        self.calls += 1
        if self.calls == self.fail_on_batch:
            raise self.exc("simulated failure")
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("L").resize((16, 16)), np.float32).ravel() / 255)
                         for im in images])
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(x @ self.w_emb + self.b_emb, dim=1)
            probs = torch.sigmoid(x @ self.w_voc + self.b_voc)
        return emb.numpy(), probs.numpy()


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


def test_a_crash_loses_no_finished_lines(tmp_path, tiny, good_images, small_bank):
    tiny["model"] = TinyPredictor(fail_on_batch=2, exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, good_images * 3, bank=small_bank)
    lines = (tmp_path / "preds.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(s)["error"] is None for s in lines)


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
