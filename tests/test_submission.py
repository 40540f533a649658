import numpy as np
import pandas as pd
import pytest

from revsd.submission import EMB_DIM, SubmissionError, read_submission, write_submission


def _emb(n, seed=0):
    e = np.random.default_rng(seed).normal(size=(n, EMB_DIM)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_round_trip_and_kaggle_format(tmp_path):
    ids = ["f9a1", "Tomma-Abts__TL", "x_12"]  # underscores stay unambiguous (eId is the trailing integer)
    emb = _emb(3)
    path = write_submission(ids, emb, tmp_path / "sub.csv")
    df = pd.read_csv(path)
    assert list(df.columns) == ["imgId_eId", "val"] and len(df) == 3 * EMB_DIM
    assert df.imgId_eId.iloc[0] == "f9a1_0" and df.imgId_eId.iloc[EMB_DIM - 1] == "f9a1_383"
    assert df.imgId_eId.iloc[EMB_DIM] == "Tomma-Abts__TL_0" and df.imgId_eId.iloc[-1] == "x_12_383"
    got_ids, got = read_submission(path)
    assert got_ids.tolist() == ids
    np.testing.assert_allclose(got, emb, rtol=1e-6, atol=1e-7)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temp file left behind


@pytest.mark.parametrize("ids,emb,msg", [
    (["a", "b"], _emb(3), "shape"),
    (["a", "b"], _emb(2)[:, :100], "shape"),
    (["a", "a"], _emb(2), "duplicate"),
    (["a", "b,c"], _emb(2), "commas"),
    (["a", ""], _emb(2), "non-empty"),
    ([], np.zeros((0, EMB_DIM)), "no images"),
])
def test_validation_errors(tmp_path, ids, emb, msg):
    with pytest.raises(SubmissionError, match=msg):
        write_submission(ids, emb, tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()


def test_non_finite_rejected(tmp_path):
    emb = _emb(2)
    emb[1, 5] = np.nan
    with pytest.raises(SubmissionError, match="NaN"):
        write_submission(["a", "b"], emb, tmp_path / "sub.csv")


def test_read_rejects_incomplete_file(tmp_path):
    path = write_submission(["a", "b"], _emb(2), tmp_path / "sub.csv")
    lines = path.read_text().splitlines()
    (tmp_path / "cut.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(SubmissionError, match="384 consecutive rows"):
        read_submission(tmp_path / "cut.csv")
