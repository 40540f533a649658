"""revsd.runs: claiming a run directory (the one rule for 03/04/05) and the data fingerprint."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from revsd import runs
from revsd.config import ConfigError


def _saved(run_dir, config, *extra):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"class": "TrainConfig", **config}))
    for name in extra:
        (run_dir / name).write_text("x")


def test_claim_new_and_same_settings(tmp_path):
    assert runs.claim_run_dir(tmp_path / "new", {"lr": 1}) is False
    _saved(tmp_path / "r", {"lr": 1, "device": "cpu"}, "DONE")
    assert runs.claim_run_dir(tmp_path / "r", {"lr": 1, "device": "cuda"}) is True  # device never changes a result


@pytest.mark.parametrize("marker", ["DONE", runs.CHECKPOINT])
def test_claim_refuses_other_settings_of_a_finished_or_resumable_run(tmp_path, marker):
    _saved(tmp_path / "r", {"lr": 1}, marker, "summary.csv")
    with pytest.raises(ConfigError, match=r"holds a run with other settings \{'lr': \(1, 2\)\}"):
        runs.claim_run_dir(tmp_path / "r", {"lr": 2}, owned=("summary.csv",))
    assert (tmp_path / "r" / "summary.csv").exists()


def test_claim_reclaims_a_run_that_failed_before_its_first_checkpoint(tmp_path, capsys):
    d = tmp_path / "r"
    _saved(d, {"lr": 1}, "summary.csv", "chunks.csv")
    assert runs.claim_run_dir(d, {"lr": 2}, reclaim=False) is False  # checked only: nothing removed
    assert (d / "config.json").exists()
    assert runs.claim_run_dir(d, {"lr": 2}, owned=("summary.csv",)) is False
    assert not (d / "config.json").exists() and not (d / "summary.csv").exists() and (d / "chunks.csv").exists()
    assert "reclaiming" in capsys.readouterr().out


def test_claim_compares_normalised_configs(tmp_path):
    _saved(tmp_path / "r", {"lam": 0.0}, "DONE")
    norm = lambda d: {"vocab_head": d.get("vocab_head", d.get("lam") != 0)}  # noqa: E731
    assert runs.claim_run_dir(tmp_path / "r", {"lam": 1.0, "vocab_head": False}, normalise=norm) is True


def _targetset(split=("train", "val", "test"), words=("a", "b")):
    table = pd.DataFrame({"image_id": ["1", "2", "3"], "split": list(split), "fold": [0, -1, -1]})
    return SimpleNamespace(table=table, emb=np.eye(3, 4, dtype=np.float32), words=list(words))


def test_data_fingerprint_sees_splits_targets_and_words(tmp_path):
    base = runs.data_fingerprint(_targetset())
    assert base == runs.data_fingerprint(_targetset())
    assert base != runs.data_fingerprint(_targetset(split=("val", "train", "test")))
    assert base != runs.data_fingerprint(_targetset(words=("a", "c")))
    other = _targetset()
    other.emb = other.emb * 2
    assert base != runs.data_fingerprint(other)


def test_check_data_refuses_other_data_only_for_started_runs(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    runs.check_data(d, _targetset())
    runs.check_data(d, _targetset(words=("z",)))  # nothing trained yet: the new data is taken
    saved = json.loads((d / runs.DATA_FILE).read_text())["fingerprint"]
    assert saved == runs.data_fingerprint(_targetset(words=("z",)))
    (d / "DONE").write_text("")
    with pytest.raises(ConfigError, match="trained on other 01_filter/02_targets outputs"):
        runs.check_data(d, _targetset())
