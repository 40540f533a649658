"""03_train finetune under ``accelerate launch`` with two CPU processes (gloo), against a one-process run.

With dropout 0 and a LayerNorm backbone (tiny ViT) the two-process run computes the same gradients as one process
(each process trains its slice of every batch, its loss weighted by its share of the batch), so the results agree
to float rounding: the only difference is the order of the sums (per-slice means, then the all-reduce). Observed
differences are ~1e-7; the tolerance (1e-5 on predictions and cosines) leaves a wide margin for that and still
catches a wrong loss weighting, a doubled scheduler step or a skipped batch, which move the results by >= 1e-3.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from revsd import artifacts, train

pytest.importorskip("accelerate")

EXP = "dist"
# 106 training rows / batch 15: 8 batches per epoch, the last one of a single row (the second process gets a
# stand-in), odd slices (8 + 7) everywhere else; grad_accum 2 exercises no_sync; EMA is updated on every process.
ARGS = dict(exp=EXP, backbone="vit_b16", mode="finetune", tiny=True, pretrained=False, epochs=3, batch_size=15,
            grad_accum=2, ema=0.5, lr=3e-3, dropout=0.0, hidden=32, lam=1.0, num_workers=1, device="cpu")
TOL = 1e-5


@pytest.fixture(scope="module")
def dist_exp(_isolated_working) -> str:
    from revsd import filtering, targets

    filtering.run(filtering.FilterConfig(exp=EXP, limit=120))
    targets.run(targets.TargetsConfig(exp=EXP, vocab_size=64))
    return EXP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run: str, **extra) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m revsd.train ...`` on CPU (no GPU: gloo)."""
    args = {**ARGS, **extra, "run": run}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "revsd.train",
           *[f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(dist_exp):
    single = train.run(train.TrainConfig(**ARGS, run="single"))
    proc = _launch("two")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return single, single.parent / "two", proc.stdout


def _assert_close_runs(a, b, tol=TOL):
    sa, sb = train.load_summary(a), train.load_summary(b)
    pd.testing.assert_frame_equal(sa[["epoch", "step"]], sb[["epoch", "step"]])
    np.testing.assert_allclose(sa["lr"], sb["lr"], rtol=1e-12)  # same schedule: one scheduler step per step
    np.testing.assert_allclose(sa[["train_loss", "train_cos", "val_cos"]], sb[["train_loss", "train_cos", "val_cos"]],
                               atol=tol)
    for name in ("preds_train.npz", "preds_oof.npz", "preds_test.npz"):
        pa, pb = artifacts.load_predictions(a / name), artifacts.load_predictions(b / name)
        assert pa.ids.tolist() == pb.ids.tolist(), name
        np.testing.assert_allclose(pa.emb, pb.emb, atol=tol, err_msg=name)
        if name == "preds_train.npz":  # lean: no vocabulary probabilities for the training rows
            assert pa.probs is None and pb.probs is None
        else:
            np.testing.assert_allclose(pa.probs, pb.probs, atol=tol, err_msg=name)
    ca, cb = (pd.read_csv(d / "sample_cosines.csv", dtype={"image_id": str}) for d in (a, b))
    assert ca[["image_id", "epoch"]].equals(cb[["image_id", "epoch"]])  # same rows, same order
    np.testing.assert_allclose(ca["cosine"], cb["cosine"], atol=tol + 1e-6)  # (rounded to 6 decimals)
    ma, mb = train.load_metrics(a), train.load_metrics(b)
    assert ma["steps"] == mb["steps"] and ma["epochs"] == mb["epochs"]
    assert mb["val_cosine"] == pytest.approx(ma["val_cosine"], abs=tol)
    assert mb["test_cosine"] == pytest.approx(ma["test_cosine"], abs=tol)


@pytest.mark.slow
def test_two_processes_write_the_artifacts_once(runs):
    from revsd import targets

    single, two, log = runs
    for name in ("config.json", "summary.csv", "model.safetensors", "model.json", "preds_train.npz", "preds_oof.npz",
                 "preds_test.npz", "sample_cosines.csv", "metrics.json", "DONE"):
        assert (two / name).exists(), name
    assert not [p.name for p in two.iterdir() if p.name.startswith((".", "last", "ckpt-"))]  # no temp files, no checkpoint
    ts = targets.load(EXP)
    cfg = train.TrainConfig(**ARGS)
    n_train = len(train.training_rows(cfg, ts))
    assert n_train % ARGS["batch_size"] == 1  # the data this test was sized for (see ARGS)
    m = train.load_metrics(two)
    assert m["mode"] == "finetune" and m["epochs"] == ARGS["epochs"]
    batches = train.steps_per_epoch(cfg, n_train)
    assert m["steps"] == ARGS["epochs"] * int(np.ceil(batches / ARGS["grad_accum"]))  # the one-process step count
    summary = train.load_summary(two)
    assert summary["epoch"].tolist() == list(range(1, ARGS["epochs"] + 1))  # one row per epoch (not per process)
    ids = ts.table["image_id"].astype(str).to_numpy()
    for name, rows in (("train", train.training_rows(cfg, ts)), ("oof", train.validation_rows(cfg, ts)),
                       ("test", train.heldout_rows(cfg, ts))):
        p = artifacts.load_predictions(two / f"preds_{name}.npz")
        assert p.ids.tolist() == ids[rows].tolist(), name
    sc = pd.read_csv(two / "sample_cosines.csv", dtype={"image_id": str})
    assert len(sc) == ARGS["epochs"] * n_train
    assert sc.groupby("epoch")["image_id"].nunique().eq(n_train).all()
    assert log.count(f"{two}: ") == 1  # the final metrics line comes from the main process only


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    single, two, _ = runs
    m = train.load_metrics(single)
    assert abs(m["val_cosine"] - m["const_mean_val"]) > 1e-3  # the model moved: the comparison is not vacuous
    _assert_close_runs(single, two)


@pytest.mark.slow
def test_two_processes_resume_after_interruption(runs):
    single, two, _ = runs
    stopped = _launch("two_resumed", stop_after_epoch=2)
    assert stopped.returncode != 0 and "stopped after epoch 2" in stopped.stdout + stopped.stderr
    part = single.parent / "two_resumed"
    assert (part / "last.json").exists() and not (part / "DONE").exists()
    assert train.load_summary(part)["epoch"].tolist() == [1, 2]
    resumed = _launch("two_resumed")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming two_resumed after epoch 2" in resumed.stdout
    _assert_close_runs(two, part, tol=1e-6)


@pytest.mark.slow
def test_two_processes_report_unreadable_images_like_one_process(dist_exp, tmp_path):
    """A broken training image and a broken test image read by the second process: both listed once in
    invalid_images.csv, left out of training on whichever process meets them, and the results still match."""
    import shutil

    from revsd import paths, targets

    exp = "dist_broken"
    for stage in ("01_filter", "02_targets"):
        shutil.copytree(paths.stage_dir(stage, dist_exp, create=False), paths.stage_dir(stage, exp),
                        dirs_exist_ok=True)
    ts = targets.load(dist_exp)
    table = ts.table.copy()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    victims = [int(ts.rows("train")[-1]), int(ts.rows("test")[-1])]  # the test row is in the 2nd process's share
    table.loc[table.index[victims], "image_path"] = str(bad)
    table.to_parquet(paths.filtered_table(exp), index=False)
    args = {**ARGS, "exp": exp, "epochs": 2}
    single = train.run(train.TrainConfig(**args, run="single"))
    proc = _launch("two", exp=exp, epochs=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = single.parent / "two"
    ids = table["image_id"].astype(str).to_numpy()
    for d in (single, two):
        invalid = pd.read_csv(d / "invalid_images.csv", dtype={"image_id": str})
        assert sorted(invalid["image_id"]) == sorted(ids[victims]), d.name
        assert ids[victims[0]] not in set(pd.read_csv(d / "sample_cosines.csv", dtype={"image_id": str})["image_id"])
    _assert_close_runs(single, two)


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_process_keeps_buffered_output_and_the_exit_code(world):
    """Under several processes a stage leaves with ``os._exit`` (no interpreter teardown, where gloo can abort);
    what it printed into the pipe's buffer still arrives, and the exit code is the stage's."""
    code = "import sys; print('last line', end=''); print('err', end='', file=sys.stderr); " \
           "from revsd import distributed; distributed.exit_process(3)"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WORLD_SIZE": world, "PYTHONUNBUFFERED": ""},
                          capture_output=True, text=True, timeout=120, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "last line", "err")
