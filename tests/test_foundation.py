"""paths, config, artifacts: the contracts every stage relies on."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from revsd import paths
from revsd.artifacts import (Predictions, append_csv_row, atomic_path, load_predictions, read_json,
                             save_predictions, write_json)
from revsd.config import ConfigError, StageConfig


@dataclasses.dataclass(frozen=True)
class DemoConfig(StageConfig):
    exp: str = "demo"
    epochs: int = 3  # passes over the data
    lr: float = 1e-3


def test_paths_follow_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("REVSD_WORKING", str(tmp_path / "w"))
    monkeypatch.setenv("REVSD_INPUT", str(tmp_path / "i"))
    assert paths.working_dir() == tmp_path / "w"
    assert paths.sample_dir() == tmp_path / "i" / "sample"
    d = paths.stage_dir("03_train", "demo", "run1")
    assert d == tmp_path / "w" / "03_train" / "demo" / "run1" and d.is_dir()
    assert paths.filtered_table("demo") == tmp_path / "w" / "01_filter" / "demo" / "filtered.parquet"


def test_repo_root_has_the_sample():
    assert (paths.repo_root() / "input" / "sample" / "metadata.parquet").exists()


def test_config_rejects_unknown_keys_with_a_hint():
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        DemoConfig.from_dict({"epoch": 5})
    assert DemoConfig.from_dict({"epochs": 5}).epochs == 5
    with pytest.raises(ConfigError):
        DemoConfig().replace(lrr=1.0)


def test_config_from_namespace_takes_only_fields_and_round_trips(tmp_path):
    cfg = DemoConfig.from_namespace({"exp": "x", "lr": 0.5, "In": [], "get_ipython": None})
    assert cfg == DemoConfig(exp="x", lr=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    cfg.save(tmp_path / "config.json")
    assert read_json(tmp_path / "config.json")["class"] == "DemoConfig"
    assert DemoConfig.load(tmp_path / "config.json") == cfg


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash mid-write")
    assert read_json(target) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_predictions_round_trip_and_align(tmp_path):
    rng = np.random.default_rng(0)
    p = Predictions(["b", "a", "c"], rng.normal(size=(3, 384)), rng.random((3, 7)))
    save_predictions(tmp_path / "p.npz", p)
    q = load_predictions(tmp_path / "p.npz")
    np.testing.assert_array_equal(q.ids, ["b", "a", "c"])
    np.testing.assert_allclose(q.emb, p.emb)
    r = q.align(["a", "c"])
    np.testing.assert_allclose(r.emb, p.emb[[1, 2]])
    np.testing.assert_allclose(r.probs, p.probs[[1, 2]])
    with pytest.raises(KeyError, match="1 ids missing"):
        q.align(["a", "zz"])
    with pytest.raises(ValueError, match="duplicate"):
        Predictions(["a", "a"], np.zeros((2, 384)))
    with pytest.raises(FileNotFoundError, match="run the stage"):
        load_predictions(tmp_path / "nope.npz")


def test_append_csv_row_writes_header_once(tmp_path):
    f = tmp_path / "summary.csv"
    append_csv_row(f, {"epoch": 1, "val_cos": 0.5})
    append_csv_row(f, {"epoch": 2, "val_cos": 0.6})
    assert f.read_text().splitlines() == ["epoch,val_cos", "1,0.5", "2,0.6"]


def test_atomic_writes_get_normal_permissions(tmp_path):
    p = write_json(tmp_path / "x.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_portable_paths_are_relative_to_input_and_resolve_back(tmp_path, monkeypatch):
    monkeypatch.setenv("REVSD_INPUT", str(tmp_path / "in"))
    inside = tmp_path / "in" / "sample" / "images" / "a.jpg"
    assert paths.portable(inside) == "sample/images/a.jpg"
    assert paths.resolve_input("sample/images/a.jpg") == inside
    outside = tmp_path / "elsewhere" / "b.png"
    assert paths.portable(outside) == str(outside)
    assert paths.resolve_input(str(outside)) == outside
