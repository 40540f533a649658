"""``revsd data import``: a folder of generations -> a DiffusionDB-format dataset that 01_filter trains on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_metadata import A1111, COMFY_GRAPH, COMFY_WORKFLOW, plain_jpeg, user_comment, write_exif, write_png

from revsd import filtering, importer
from revsd.data import load_dataset

A1111_PROMPTS = ["a red fox in the snow, golden hour, detailed fur",
                 "an old lighthouse keeper smoking a pipe, oil painting",
                 "isometric voxel city at dusk, neon signs, rain"]
COMFY_PROMPTS = ["a bowl of ramen on a wooden table, studio photo", "cyberpunk samurai, katana, night market"]


def a1111_text(prompt: str, seed: int) -> str:
    return A1111.replace(A1111.split("\nNegative prompt:")[0], prompt).replace("Seed: 1234567", f"Seed: {seed}")


def comfy_chunks(prompt: str, seed: int) -> dict[str, str]:
    graph = json.loads(json.dumps(COMFY_GRAPH))
    graph["6"]["inputs"]["text"], graph["3"]["inputs"]["seed"] = prompt, seed
    return {"prompt": json.dumps(graph), "workflow": json.dumps(COMFY_WORKFLOW)}


@pytest.fixture()
def gens(tmp_path) -> Path:
    """3 A1111 PNGs (one in a sub-folder), 2 ComfyUI PNGs, an A1111 JPEG, a byte-identical copy, a plain JPEG,
    a PNG without generation metadata and a file that is not an image."""
    d = tmp_path / "gens"
    (d / "sub").mkdir(parents=True)
    for i, p in enumerate(A1111_PROMPTS):
        write_png((d / "sub" if i == 2 else d) / f"a1111_{i}.png", {"parameters": a1111_text(p, 100 + i)})
    for i, p in enumerate(COMFY_PROMPTS):
        write_png(d / f"ComfyUI_{i:05d}_.png", comfy_chunks(p, 200 + i))
    write_exif(d / "forge.jpg", user_comment(a1111_text("a watercolor map of an imaginary island", 300)))
    shutil.copy(d / "a1111_0.png", d / "a1111_0 (copy).png")
    plain_jpeg(d / "photo.jpg")
    write_png(d / "screenshot.png", {"Software": "gnome-screenshot"})
    (d / "notes.png").write_text("not an image")
    return d


def test_import_then_filter_keeps_every_prompted_image(gens, tmp_path, capsys):
    ds = tmp_path / "ds"
    assert importer.main([str(gens), "--out", str(ds), "--recursive"]) == 0
    err = capsys.readouterr().err
    assert "6 imported into part-000001" in err and "2 without a prompt" in err
    assert "1 duplicate(s) in the input" in err and "1 unreadable" in err
    wanted = A1111_PROMPTS + COMFY_PROMPTS + ["a watercolor map of an imaginary island"]

    part = ds / "images" / "part-000001"
    index = json.loads((part / "part-000001.json").read_text())
    assert sorted(r["p"] for r in index.values()) == sorted(wanted)
    assert all((part / name).is_file() for name in index)
    meta = pd.read_parquet(ds / "metadata.parquet")
    row = meta.set_index("prompt").loc[A1111_PROMPTS[1]]
    assert (row["seed"], row["step"], row["cfg"], row["sampler"], row["model"], row["tool"]) == \
        (101, 28, 6.5, "DPM++ 2M Karras", "dreamshaper_8", "a1111")
    assert (row["width"], row["height"], row["negative_prompt"]) == (64, 48, "blurry, lowres, bad anatomy")
    assert meta.set_index("prompt").loc[COMFY_PROMPTS[0], "seed"] == 200

    df = filtering.run(filtering.FilterConfig(exp="imported", source=str(ds), val_size=0.2, test_size=0.2,
                                              n_folds=2))
    assert sorted(df["prompt"]) == sorted(wanted)  # every prompted image kept, nothing else
    assert not df["prompt"].str.contains("Negative prompt|Steps:|Sampler:").any()
    assert set(df["split"]) <= {"train", "val", "test"} and len(df) == 6


def test_rerun_adds_only_what_is_new(gens, tmp_path, capsys):
    ds = tmp_path / "ds"
    assert importer.main([str(gens), "--out", str(ds)]) == 0  # not recursive: the sub-folder image waits
    first = load_dataset(ds)
    assert len(first) == 5 and A1111_PROMPTS[2] not in set(first["prompt"])
    capsys.readouterr()
    assert importer.main([str(gens), "--out", str(ds), "--recursive", "--copy"]) == 0
    err = capsys.readouterr().err
    assert "1 imported into part-000002 (0 linked, 1 copied)" in err and "6 already in the dataset" in err
    again = load_dataset(ds)
    assert len(again) == 6 and again["image_id"].is_unique
    assert set(again.loc[again["part_id"] == 2, "prompt"]) == {A1111_PROMPTS[2]}
    assert importer.main([str(gens), "--out", str(ds), "--recursive"]) == 0
    assert "0 imported" in capsys.readouterr().err
    assert sorted(p.name for p in (ds / "images").iterdir()) == ["part-000001", "part-000002"]


def test_interrupted_run_is_completed(gens, tmp_path):
    ds = tmp_path / "ds"
    importer.import_images([gens], ds)
    (ds / "metadata.parquet").unlink()  # as if killed between the part rename and the parquet write
    s = importer.import_images([gens], ds)
    assert s["imported"] == 0 and s["already_in_dataset"] == 6  # 5 imported + their byte-identical copy
    assert len(pd.read_parquet(ds / "metadata.parquet")) == 5


def test_nothing_prompted_and_foreign_dataset(tmp_path, sample_dir, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    plain_jpeg(d / "a.jpg")
    assert importer.main([str(d), "--out", str(tmp_path / "ds")]) == 1
    assert "carries a prompt" in capsys.readouterr().err
    assert importer.main([str(d), "--out", str(sample_dir)]) == 1  # refuses to touch a non-import dataset
    assert "not written by `revsd data import`" in capsys.readouterr().err
    assert importer.main([str(tmp_path / "nope"), "--out", str(tmp_path / "ds")]) == 2
