"""Loaders on the embedded sample (DiffusionDB format), the Kaggle layout, errors, and the fetch pieces."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from revsd import data
from revsd.data import DataError


@pytest.fixture(scope="module")
def sample(sample_dir) -> pd.DataFrame:
    return data.load_dataset(sample_dir)


def copy_parts(sample_dir: Path, dest: Path, parts=(1,), metadata: bool = False) -> Path:
    for p in parts:
        name = f"part-{p:06d}"
        shutil.copytree(sample_dir / "images" / name, dest / "images" / name)
    if metadata:
        shutil.copyfile(sample_dir / "metadata.parquet", dest / "metadata.parquet")
    return dest


def kaggle_layout(sample: pd.DataFrame, dest: Path, n: int = 4) -> Path:
    (dest / "images").mkdir(parents=True)
    rows = []
    for k, r in enumerate(sample.head(n).itertuples()):
        img_id = f"{k:05d}"  # leading zeros must survive the CSV round trip
        Image.open(r.image_path).convert("RGB").save(dest / "images" / f"{img_id}.png")
        rows.append({"imgId": img_id, "prompt": r.prompt})
    pd.DataFrame(rows).to_csv(dest / "prompts.csv", index=False)
    return dest


# ---------------------------------------------------------------------------------------------- DiffusionDB


def test_sample_loads_with_metadata(sample, sample_dir):
    assert len(sample) == 300
    assert list(sample.columns[:3]) == ["image_id", "image_path", "prompt"]
    assert {"artist", "part_id", "seed", "sampler"} <= set(sample.columns)
    assert sample["image_id"].is_unique
    assert sample["artist"].nunique() == 100
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in sample["image_path"])
    index = json.loads((sample_dir / "images" / "part-000001" / "part-000001.json").read_text())
    row = sample[sample["image_name"] == next(iter(index))].iloc[0]
    assert row["prompt"] == next(iter(index.values()))["p"]
    assert row["image_id"] == Path(row["image_name"]).stem


def test_json_fallback_matches_metadata(sample, sample_dir, tmp_path):
    root = copy_parts(sample_dir, tmp_path, parts=(1, 2))
    df = data.load_dataset(root, fmt="diffusiondb")
    assert len(df) == 200 and "artist" not in df.columns
    merged = df.merge(sample, on="image_id", suffixes=("", "_meta"))
    assert len(merged) == 200
    assert (merged["prompt"] == merged["prompt_meta"]).all()
    assert (merged["part_id"] == merged["part_id_meta"]).all()


def test_metadata_restricted_to_parts_on_disk(sample_dir, tmp_path):
    df = data.load_dataset(copy_parts(sample_dir, tmp_path, parts=(2,), metadata=True))
    assert len(df) == 100 and set(df["part_id"]) == {2} and df["artist"].notna().all()


def test_part_without_metadata_rows_reads_its_json(sample_dir, tmp_path):
    root = copy_parts(sample_dir, tmp_path, parts=(1, 2))
    meta = pd.read_parquet(sample_dir / "metadata.parquet")
    meta[meta["part_id"] == 1].to_parquet(root / "metadata.parquet", index=False)
    df = data.load_dataset(root)
    assert len(df) == 200
    assert df.loc[df["part_id"] == 1, "artist"].notna().all()
    assert df.loc[df["part_id"] == 2, "artist"].isna().all()


# ---------------------------------------------------------------------------------------------- Kaggle


def test_kaggle_layout(sample, tmp_path):
    root = kaggle_layout(sample, tmp_path)
    assert data.detect_format(root) == "kaggle"
    df = data.load_dataset(root)
    assert df["image_id"].tolist() == ["00000", "00001", "00002", "00003"]
    assert df["prompt"].tolist() == sample["prompt"].head(4).tolist()
    assert all(Path(p).is_file() and p.endswith(".png") for p in df["image_path"])
    ok, bad = data.check_images(df)
    assert len(ok) == 4 and len(bad) == 0


# ---------------------------------------------------------------------------------------------- errors


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found.*revsd data fetch"):
        data.load_dataset(tmp_path / "nope")


def test_unrecognised_folder_and_format(tmp_path):
    with pytest.raises(DataError, match="neither prompts.csv"):
        data.load_dataset(tmp_path)
    with pytest.raises(DataError, match="unknown dataset format"):
        data.load_dataset(tmp_path, fmt="coco")


def test_empty_prompt_table(sample, tmp_path):
    root = kaggle_layout(sample, tmp_path, n=1)
    (root / "prompts.csv").write_text("imgId,prompt\n")
    with pytest.raises(DataError, match=r"prompts.csv: the prompt table is empty"):
        data.load_dataset(root)


def test_empty_metadata(sample_dir, tmp_path):
    root = copy_parts(sample_dir, tmp_path)
    pd.read_parquet(sample_dir / "metadata.parquet").head(0).to_parquet(root / "metadata.parquet")
    with pytest.raises(DataError, match=r"metadata.parquet: the prompt table is empty"):
        data.load_dataset(root)


def test_missing_column(sample, sample_dir, tmp_path):
    root = kaggle_layout(sample, tmp_path / "k", n=1)
    (root / "prompts.csv").write_text("imgId,text\n00000,a cat\n")
    with pytest.raises(DataError, match=r"prompts.csv: missing column\(s\) prompt"):
        data.load_dataset(root)
    root = copy_parts(sample_dir, tmp_path / "d")
    pd.read_parquet(sample_dir / "metadata.parquet").drop(columns="part_id").to_parquet(root / "metadata.parquet")
    with pytest.raises(DataError, match=r"metadata.parquet: missing column\(s\) part_id"):
        data.load_dataset(root)


def test_listed_image_absent(sample_dir, tmp_path):
    root = copy_parts(sample_dir, tmp_path, metadata=True)
    victim = sorted((root / "images" / "part-000001").glob("*.jpg"))[5]
    victim.unlink()
    with pytest.raises(DataError, match=rf"1 listed image\(s\) are absent, e.g. .*{victim.name}"):
        data.load_dataset(root)


def test_missing_part_index(sample_dir, tmp_path):
    root = copy_parts(sample_dir, tmp_path)
    (root / "images" / "part-000001" / "part-000001.json").unlink()
    with pytest.raises(DataError, match="part-000001.json: part index not found"):
        data.load_dataset(root)


def test_corrupt_image_reported_not_dropped(sample, tmp_path):
    df = sample.head(6).copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(df["image_path"].iloc[2]).read_bytes()[:300])  # truncated JPEG
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    df.loc[df.index[2], "image_path"] = str(broken)
    df.loc[df.index[4], "image_path"] = str(text)
    ok, bad = data.check_images(df, workers=2)
    assert len(ok) + len(bad) == 6
    assert bad["image_id"].tolist() == [df["image_id"].iloc[2], df["image_id"].iloc[4]]
    assert bad["error"].str.contains("broken.jpg").iloc[0] and "text.jpg" in bad["error"].iloc[1]
    assert not set(bad["image_id"]) & set(ok["image_id"])


# ---------------------------------------------------------------------------------------------- fetch


def test_subset_parts():
    assert data.subset_parts("2m_first_1k") == [1]
    assert data.subset_parts("2m_first_10k") == list(range(1, 11))
    r = data.subset_parts("2m_random_5k")
    assert r == data.subset_parts("2m_random_5k") and len(set(r)) == 5 and r == sorted(r)
    assert all(1 <= p <= 2000 for p in r) and r != [1, 2, 3, 4, 5]
    assert len(data.subset_parts("2m_all")) == 2000
    for bad in ("2m_first_0k", "2m_first_2001k", "large_first_1k", "first_10k"):
        with pytest.raises(DataError, match="unknown subset"):
            data.subset_parts(bad)


def make_part_zip(sample_dir: Path, part_id: int, dest: Path, nested: bool = True) -> Path:
    """A zip laid out like DiffusionDB's images/part-XXXXXX.zip, built from the sample's part folder."""
    src = sample_dir / "images" / f"part-{part_id:06d}"
    zpath = dest / f"part-{part_id:06d}.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in sorted(src.iterdir()):
            z.write(f, arcname=(f"part-{part_id:06d}/{f.name}" if nested else f.name))
    return zpath


def test_extract_part_layout(sample_dir, tmp_path):
    zpath = make_part_zip(sample_dir, 1, tmp_path, nested=True)
    dest = data.extract_part(zpath, tmp_path / "db", 1)
    assert dest == tmp_path / "db" / "images" / "part-000001"
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        p.name for p in (sample_dir / "images" / "part-000001").iterdir())
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert len(data.load_dataset(tmp_path / "db")) == 100


def test_extract_bad_zip(tmp_path):
    bad = tmp_path / "part-000003.zip"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a valid zip"):
        data.extract_part(bad, tmp_path / "db", 3)
    assert not (tmp_path / "db" / "images" / "part-000003").exists()


def test_fetch_offline_with_stubbed_hub(sample_dir, tmp_path, monkeypatch):
    """The real fetch code path, with hf_hub_download served from zips built from the sample."""
    import huggingface_hub

    served = {f"images/part-{p:06d}.zip": make_part_zip(sample_dir, p, tmp_path, nested=False) for p in (1, 2)}
    served["metadata.parquet"] = sample_dir / "metadata.parquet"
    calls = []

    def fake_download(repo_id, filename, repo_type=None, **kw):
        assert (repo_id, repo_type) == ("poloclub/diffusiondb", "dataset")
        calls.append(filename)
        return str(served[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = tmp_path / "diffusiondb"
    data.fetch_diffusiondb("2m_first_2k", out)
    df = data.load_dataset(out)
    assert len(df) == 200 and set(df["part_id"]) == {1, 2} and df["artist"].notna().all()
    assert len(pd.read_parquet(out / "metadata.parquet")) == 200  # trimmed to the fetched parts
    calls.clear()
    data.fetch_diffusiondb("2m_first_2k", out)  # resumes: parts already there are not downloaded again
    assert calls == ["metadata.parquet"]


def test_fetch_network_failure_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert data.main(["fetch", "--subset", "2m_first_1k", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (tqdm also writes to stderr)
    assert err.startswith("revsd data: could not download poloclub/diffusiondb/images/part-000001.zip")
    assert "internet" in err


def test_main_dry_run(capsys, tmp_path):
    assert data.main(["fetch", "--subset", "2m_first_10k", "--out", str(tmp_path), "--dry-run"]) == 0
    assert "10 parts (10,000 images)" in capsys.readouterr().out
    assert data.main(["fetch", "--subset", "nonsense", "--dry-run"]) == 1
