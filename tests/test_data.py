"""Loaders on the embedded sample (DiffusionDB format), the Kaggle layout, errors, skipped inputs, and the fetch
(part by part from a fake hub served from zips built from the sample: archives deleted, resumable, filtered)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from revsd import data, datacli, filtering
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
    assert df.attrs["skipped"] == []
    ok, bad = filtering.check_images(df)
    assert len(ok) == 4 and len(bad) == 0


def test_kaggle_image_without_row_is_named_not_silent(sample, tmp_path, caplog):
    root = kaggle_layout(sample, tmp_path)
    Image.new("RGB", (8, 8)).save(root / "images" / "orphan.png")
    Image.new("RGB", (8, 8)).save(root / "images" / "stray.webp")
    with caplog.at_level("WARNING", logger="revsd.data"):
        df = data.load_dataset(root)
    assert len(df) == 4
    assert [Path(s["path"]).name for s in df.attrs["skipped"]] == ["orphan.png", "stray.webp"]
    assert all(s["reason"] == "no row in prompts.csv" for s in df.attrs["skipped"])
    line = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(line) == 1 and "skipped 2 image file(s)" in line[0] and "orphan.png, stray.webp" in line[0]


def test_kaggle_two_files_one_stem_is_an_error_naming_both(sample, tmp_path):
    root = kaggle_layout(sample, tmp_path)
    Image.new("RGB", (8, 8)).save(root / "images" / "00001.jpg")  # 00001.png exists too
    with pytest.raises(DataError, match=r"images: 1 image id\(s\) have more than one file, e.g. '00001': "
                                        r"00001.jpg, 00001.png; keep one file per id"):
        data.load_dataset(root)


def test_diffusiondb_unlisted_file_is_skipped_by_name(sample_dir, tmp_path):
    root = copy_parts(sample_dir, tmp_path, parts=(1,), metadata=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "part-000001" / "extra.png")
    df = data.load_dataset(root)
    assert len(df) == 100
    assert [(Path(s["path"]).name, s["reason"]) for s in df.attrs["skipped"]] == [
        ("extra.png", "no row in metadata.parquet")]


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


# ---------------------------------------------------------------------------------------------- fetch


def test_parse_subset_2m_and_large():
    assert data.parse_subset("2m_first_1k") == ("2m", [1])
    assert data.parse_subset("2m_first_10k") == ("2m", list(range(1, 11)))
    rel, r = data.parse_subset("2m_random_5k")
    assert r == data.parse_subset("2m_random_5k")[1] and len(set(r)) == 5 and r == sorted(r)
    assert all(1 <= p <= 2000 for p in r) and r != [1, 2, 3, 4, 5]
    assert len(data.parse_subset("2m_all")[1]) == 2000
    assert data.parse_subset("large_first_3k") == ("large", [1, 2, 3])
    assert data.parse_subset("large_all")[1] == list(range(1, 14001))
    rel, r = data.parse_subset("large_random_50k")
    assert rel == "large" and len(set(r)) == 50 and max(r) > 2000  # drawn from all 14,000 parts
    for bad in ("2m_first_0k", "2m_first_2001k", "large_first_14001k", "first_10k", "2m_all_1k", "xl_all"):
        with pytest.raises(DataError, match="unknown subset"):
            data.parse_subset(bad)


def test_release_table_names_the_hub_files():
    large, two_m = data.RELEASES["large"], data.RELEASES["2m"]
    assert two_m.part_file(2000) == "images/part-002000.zip" and two_m.metadata == "metadata.parquet"
    assert large.part_file(1) == "diffusiondb-large-part-1/part-000001.zip"
    assert large.part_file(10000) == "diffusiondb-large-part-1/part-010000.zip"
    assert large.part_file(10001) == "diffusiondb-large-part-2/part-010001.zip"
    assert large.part_file(14000) == "diffusiondb-large-part-2/part-014000.zip"
    assert large.metadata == "metadata-large.parquet" and large.n_parts == 14000


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


def test_extract_part_keeps_only_listed_images(sample_dir, tmp_path):
    zpath = make_part_zip(sample_dir, 2, tmp_path)
    index = json.loads((sample_dir / "images" / "part-000002" / "part-000002.json").read_text())
    keep = set(sorted(index)[:7])
    dest = data.extract_part(zpath, tmp_path / "db", 2, keep=keep)
    assert {p.name for p in dest.iterdir()} == keep | {"part-000002.json"}
    assert set(json.loads((dest / "part-000002.json").read_text())) == keep
    assert len(data.load_dataset(tmp_path / "db")) == 7  # the cut index loads without "absent image" errors


def test_extract_bad_zip(tmp_path):
    bad = tmp_path / "part-000003.zip"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a valid zip"):
        data.extract_part(bad, tmp_path / "db", 3)
    assert not (tmp_path / "db" / "images" / "part-000003").exists()


class FakeHub:
    """hf_hub_download served from local files: copies into ``local_dir`` like the hub does, records calls, and
    checks that every archive handed out before is already deleted (peak extra disk: one part)."""

    def __init__(self, monkeypatch, served: dict[str, Path]):
        import huggingface_hub

        self.served, self.calls, self.handed_out = served, [], []
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self)

    def __call__(self, repo_id, filename, repo_type=None, local_dir=None, **kw):
        assert (repo_id, repo_type) == ("poloclub/diffusiondb", "dataset")
        assert local_dir is not None, "downloads must not go to the shared hub cache"
        assert not [p for p in self.handed_out if p.exists()], "an earlier download was not deleted"
        self.calls.append(filename)
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(Path(self.served[filename]).read_bytes())
        self.handed_out.append(dst)
        return str(dst)


def serve_sample(sample_dir: Path, tmp_path: Path, release: str = "2m", meta: pd.DataFrame | None = None) -> dict:
    rel = data.RELEASES[release]
    served = {rel.part_file(p): make_part_zip(sample_dir, p, tmp_path, nested=False) for p in (1, 2)}
    meta_file = tmp_path / "served_metadata.parquet"
    (pd.read_parquet(sample_dir / "metadata.parquet") if meta is None else meta).to_parquet(meta_file)
    served[rel.metadata] = meta_file
    return served


def test_fetch_streams_deletes_archives_and_resumes(sample_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, serve_sample(sample_dir, tmp_path))
    out = tmp_path / "diffusiondb"
    data.fetch_diffusiondb("2m_first_2k", out)
    assert hub.calls == ["metadata.parquet", "images/part-000001.zip", "images/part-000002.zip"]
    assert not [p for p in hub.handed_out if p.exists()] and not (out / data.TMP_NAME).exists()
    df = data.load_dataset(out)
    assert len(df) == 200 and set(df["part_id"]) == {1, 2} and df["artist"].notna().all()
    assert len(pd.read_parquet(out / "metadata.parquet")) == 200  # trimmed to the fetched parts
    hub.calls.clear()
    data.fetch_diffusiondb("2m_first_2k", out)  # resumes: parts already there are not downloaded again
    assert hub.calls == ["metadata.parquet"]


def test_fetch_interrupted_mid_part_redoes_it_cleanly(sample_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, serve_sample(sample_dir, tmp_path))
    out = tmp_path / "db"
    copies = {"n": 0}
    real_copy = shutil.copyfileobj

    def dying_copy(src, dst, *a):
        copies["n"] += 1
        if copies["n"] == 101 + 40:  # part 1 = 100 images + its index; die 40 files into part 2
            raise KeyboardInterrupt
        return real_copy(src, dst, *a)

    monkeypatch.setattr(shutil, "copyfileobj", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        data.fetch_diffusiondb("2m_first_2k", out)
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    assert (out / "images" / "part-000001" / "part-000001.json").exists()
    assert not (out / "images" / "part-000002").exists()  # a half part is never visible under its name
    (out / "images" / ".part-000002.killed").mkdir()  # what a kill -9 (no finally) leaves behind
    (out / "images" / ".part-000002.killed" / "half.jpg").write_bytes(b"x")
    hub.calls.clear()
    data.fetch_diffusiondb("2m_first_2k", out)
    assert hub.calls == ["metadata.parquet", "images/part-000002.zip"]  # part 1 skipped, part 2 redone
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".")] and not (out / data.TMP_NAME).exists()
    assert len(data.load_dataset(out)) == 200


def test_fetch_filter_writes_only_rows_passing_the_text_rules(sample_dir, tmp_path, monkeypatch):
    meta = pd.read_parquet(sample_dir / "metadata.parquet")
    p1 = meta.index[meta["part_id"] == 1]
    meta.loc[p1[3], "prompt"] = "nan"  # rule 2
    meta.loc[p1[5], "prompt"] = "  "  # rule 2 (no word)
    meta.loc[[p1[6], p1[7]], "prompt"] = "a cat"  # rule 3: exact duplicate, shorter than 50 characters
    hub = FakeHub(monkeypatch, serve_sample(sample_dir, tmp_path, meta=meta))
    out = tmp_path / "db"
    assert datacli.main(["fetch", "--subset", "2m_first_2k", "--out", str(out), "--filter"]) == 0
    subset = meta[meta["part_id"].isin([1, 2])].assign(image_id=lambda d: d["image_name"].str.rsplit(".", n=1).str[0])
    expected = subset[filtering.text_rules_keep(subset)]
    assert 0 < len(expected) <= 200 - 4
    on_disk = {p.name for d in (out / "images").iterdir() for p in d.iterdir() if p.suffix == ".jpg"}
    assert on_disk == set(expected["image_name"])  # images of dropped rows were never written
    dropped = set(subset["image_name"]) - set(expected["image_name"])
    assert {meta.loc[p1[i], "image_name"] for i in (3, 5)} <= dropped
    assert len({meta.loc[p1[i], "image_name"] for i in (6, 7)} & dropped) == 1
    df = data.load_dataset(out)
    assert set(df["image_name"]) == set(expected["image_name"]) and df.attrs["skipped"] == []
    assert filtering.text_rules_keep(df).all()  # 01 re-applying the rules drops nothing more
    assert data.read_json(out / "fetch.json") == {"release": "2m", "filter_near_dup_chars": 50}
    assert not [p for p in hub.handed_out if p.exists()]


def test_fetch_large_uses_its_folders_and_metadata(sample_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, serve_sample(sample_dir, tmp_path, release="large"))
    out = tmp_path / "large"
    data.fetch_diffusiondb("large_first_2k", out)
    assert hub.calls == ["metadata-large.parquet", "diffusiondb-large-part-1/part-000001.zip",
                         "diffusiondb-large-part-1/part-000002.zip"]
    assert len(data.load_dataset(out)) == 200
    with pytest.raises(DataError, match="fetch.json: this folder holds a fetch with other settings"):
        data.fetch_diffusiondb("2m_first_1k", out)  # never mix releases (their part ids overlap)


def test_fetch_network_failure_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert datacli.main(["fetch", "--subset", "2m_first_1k", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (tqdm also writes to stderr)
    assert err.startswith("revsd data: could not download poloclub/diffusiondb/metadata.parquet")
    assert "internet" in err and not (tmp_path / "x" / data.TMP_NAME).exists()


def test_main_dry_run(capsys, tmp_path):
    assert datacli.main(["fetch", "--subset", "2m_first_10k", "--out", str(tmp_path), "--dry-run"]) == 0
    assert "10 parts (10,000 images)" in capsys.readouterr().out
    assert datacli.main(["fetch", "--subset", "large_first_2k", "--out", str(tmp_path), "--dry-run"]) == 0
    assert "DiffusionDB Large" in capsys.readouterr().out
    assert datacli.main(["fetch", "--subset", "nonsense", "--dry-run"]) == 1


def test_main_import_forwards_to_the_importer(monkeypatch, capsys):
    import sys
    import types

    seen = []
    fake = types.ModuleType("revsd.importer")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "revsd.importer", fake)
    import revsd

    monkeypatch.setattr(revsd, "importer", fake, raising=False)
    assert datacli.main(["import", "photos", "--out", "ds", "--recursive"]) == 7
    assert seen == [["photos", "--out", "ds", "--recursive"]]
    with pytest.raises(SystemExit):
        datacli.main(["--help"])
    assert "import" in capsys.readouterr().out
