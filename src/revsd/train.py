"""03_train: train a registered backbone with the paper's loss; writes predictions keyed by image id.

Reads ``working/01_filter/<exp>/filtered.parquet`` and ``working/02_targets/<exp>/`` (via ``revsd.targets.load``);
writes ``working/<stage>/<exp>/<run>/``: config.json, data.json, summary.csv, model.safetensors + model.json,
preds_{train,oof,test}.npz, sample_cosines.csv, metrics.json, invalid_images.csv (if any), DONE.

Modes: ``frozen`` trains the heads on cached backbone features (``revsd.features``); ``finetune`` trains end to
end (AMP on CUDA, grad accumulation, layer-wise lr decay, EMA). Command line: ``python -m revsd.train exp=demo
epochs=20``. :func:`run` reads top to bottom: claim the run directory, set up, one epoch at a time (train, score,
record, checkpoint), finish (predictions with the best weights, metrics, DONE).

Multi-GPU (finetune): ``accelerate launch --multi_gpu --num_processes 4 -m revsd.train exp=paper
backbone=clip_vit_h14 mode=finetune`` (``revsd.distributed``): the steps, the schedule and the artifacts are those
of a one-process run; only the main process writes. Frozen mode runs on the main process alone.

Resume: a run directory with a checkpoint and no DONE continues from its last finished epoch and gives the same
result as an uninterrupted run (per-epoch seeds; optimizer, scheduler and EMA state restored).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from revsd import distributed, paths, runs
from revsd.artifacts import read_json
from revsd.backbones import get_spec
from revsd.config import ConfigError, StageConfig, typed
from revsd.trainer import Schedule, Trainer
from revsd.variants import PLAIN, head_config

STAGE = "03_train"
SMOKE_ROWS = {"train": 48, "val": 24, "test": 24}
SAMPLE_COSINES = ("eval", "train")
# files a 03_train run writes (removed when a run that failed before its first checkpoint is reclaimed)
RUN_FILES = ("data.json", "summary.csv", "sample_cosines.csv", "model.safetensors", "model.json", "metrics.json",
             "invalid_images.csv", *runs.SPLIT_FILES.values())


@dataclasses.dataclass(frozen=True)
class TrainConfig(StageConfig):
    exp: str = "demo"  # experiment prepared by 01_filter + 02_targets
    backbone: str = "effnet_lite0"  # a name in revsd.backbones.REGISTRY
    weights: str = ""  # local backbone weights file (hub-backed backbones); empty: $REVSD_WEIGHTS, else the hub
    mode: str = "frozen"  # frozen (heads on cached features) or finetune (end to end)
    head_config: str = "concat"  # a name in revsd.variants.HEAD_CONFIGS: parallel, concat (cfg 2), emb2cls (cfg 3)
    vocab_head: bool = True  # train the vocabulary head (false: the plain model, embedding head only)
    lam: float = 1.0  # weight of the vocabulary BCE loss
    vocab_size: int = 0  # words of 02's vocabulary to predict; 0 uses all of them
    epochs: int = 20  # passes over the training rows
    batch_size: int = 32  # samples per optimizer step (times grad_accum)
    lr: float = 1e-3  # peak learning rate (heads; the backbone gets lr * backbone_lr_scale)
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norms)
    warmup_epochs: float = 1.0  # linear warm-up length, then cosine decay
    hidden: int = 256  # hidden width of the head MLPs (0: one linear layer per head)
    dropout: float = 0.8  # dropout on the head inputs and hidden layer (strong: few images per artist)
    head_norm: bool = True  # LayerNorm on the features the heads read (false: none, as in the paper)
    fold: int = -1  # -1 validates on split val; k validates on training fold k
    seed: int = 0  # seeds init, shuffling and dropout
    run: str = ""  # run name; empty is backbone_variant_f<fold>_s<seed>
    variant: str = ""  # label in reports; empty is plain (no vocabulary head) or the head configuration's variant
    pretrained: bool = True  # load the backbone's pretrained weights
    tiny: bool = False  # tiny random-init backbone (tests, offline smoke runs)
    smoke: bool = False  # a few rows, seconds on CPU
    sample_cosines: str = "eval"  # per-sample cosines after each epoch: eval (an eval-mode pass, the paper's) or train
    ema: float = 0.0  # EMA decay of the weights (0 disables), evaluated and saved instead of the raw weights
    grad_accum: int = 1  # micro-batches per optimizer step
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    compile: bool = False  # finetune: torch.compile the model for training
    grad_checkpointing: bool = False  # finetune: activation checkpointing in the backbone (less memory, slower)
    llrd: float = 1.0  # finetune: layer-wise lr decay per backbone layer bucket (1 disables)
    backbone_lr_scale: float = 0.1  # finetune: backbone lr relative to lr
    num_workers: int = 2  # image decoding threads
    image_cache: bool = True  # finetune: decode + resize each image once into working/imagecache/, read it after
    device: str = ""  # empty is cuda when available, else cpu
    stop_after_epoch: int = 0  # testing: raise Interrupted after this epoch (0 never) to exercise resume


class Interrupted(RuntimeError):
    """Raised by ``stop_after_epoch`` (simulated interruption)."""


def resolve_variant(cfg: TrainConfig) -> str:
    if cfg.variant:
        return cfg.variant
    return head_config(cfg.head_config).variant if cfg.vocab_head else PLAIN


def run_name(cfg: TrainConfig) -> str:
    return cfg.run or f"{cfg.backbone}_{resolve_variant(cfg)}_f{cfg.fold}_s{cfg.seed}"


def as_train_config(cfg: StageConfig, **changes) -> TrainConfig:
    """The plain :class:`TrainConfig` inside a stage config that extends it (04, 05), plus ``changes``, with the
    resolved run name (as :func:`run` saves it in config.json)."""
    fields = TrainConfig.field_names()
    tcfg = TrainConfig(**{**{k: v for k, v in cfg.to_dict().items() if k in fields}, **changes})
    return tcfg.replace(run=run_name(tcfg))


def check(cfg: TrainConfig) -> None:
    get_spec(cfg.backbone)
    head_config(cfg.head_config)
    if cfg.mode not in ("frozen", "finetune"):
        raise ConfigError(f"mode must be frozen or finetune, got {cfg.mode!r}")
    if cfg.sample_cosines not in SAMPLE_COSINES:
        raise ConfigError(f"sample_cosines must be one of {SAMPLE_COSINES}, got {cfg.sample_cosines!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("epochs, batch_size and grad_accum must be >= 1")
    if cfg.vocab_head and cfg.lam == 0:
        print("note: lam=0 keeps the vocabulary head (trained without its loss); vocab_head=false trains the plain "
              "model")


def comparable(config: dict) -> dict:
    """A saved or new TrainConfig dict in today's terms, for comparing runs: fields added since it was saved take
    the value that reproduces the old behaviour (``lam == 0`` meant no vocabulary head; finetune scored samples
    in training mode) or their default; without a vocabulary head ``lam``, ``head_config`` and ``vocab_size``
    cannot change the result and are blanked."""
    d = {k: v for k, v in config.items() if k != "class"}
    if "vocab_head" not in d and "lam" in d:
        d["vocab_head"] = d["lam"] != 0
    if "sample_cosines" not in d and "mode" in d:
        d["sample_cosines"] = "train" if d["mode"] == "finetune" else "eval"
    d = {**{k: v for k, v in TrainConfig().to_dict().items() if k not in d}, **d}
    if not d["vocab_head"]:
        d.update(lam=None, head_config=None, vocab_size=None)
    return d


# --- rows and schedule ------------------------------------------------------------------------------------------

def _smoke(rows: np.ndarray, cfg: TrainConfig, split: str) -> np.ndarray:
    return rows[:SMOKE_ROWS[split]] if cfg.smoke else rows


def training_rows(cfg: TrainConfig, targetset) -> np.ndarray:
    """Table row indices trained on, in the order batch samplers index into (split train minus fold k)."""
    t = targetset.table
    mask = t["split"].to_numpy() == "train"
    if cfg.fold >= 0:
        mask &= t["fold"].to_numpy() != cfg.fold
    return _smoke(np.flatnonzero(mask), cfg, "train")


def validation_rows(cfg: TrainConfig, targetset) -> np.ndarray:
    """The OOF rows: split val, or training fold k when ``cfg.fold = k``."""
    t = targetset.table
    if cfg.fold >= 0:
        rows = np.flatnonzero((t["split"].to_numpy() == "train") & (t["fold"].to_numpy() == cfg.fold))
    else:
        rows = targetset.rows("val")
    return _smoke(rows, cfg, "val")


def heldout_rows(cfg: TrainConfig, targetset) -> np.ndarray:
    return _smoke(targetset.rows("test"), cfg, "test")


def steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    return max(1, math.ceil(n_train / cfg.batch_size))


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    """Batches of the plain schedule (``epochs`` shuffled passes); a custom batch sampler has this length."""
    return cfg.epochs * steps_per_epoch(cfg, n_train)


def plain_batches(cfg: TrainConfig, n_train: int, epoch: int) -> list[np.ndarray]:
    """Shuffled position batches of one epoch (seeded by seed and epoch, so a resumed run matches)."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
    return [order[s:s + cfg.batch_size] for s in range(0, n_train, cfg.batch_size)]


def epoch_schedule(cfg: TrainConfig, n_train: int, batch_sampler=None):
    """``(n_epochs, batches_of(epoch))``: plain shuffled epochs, or a batch sampler's batches cut into epochs of
    the plain epoch's length."""
    spe = steps_per_epoch(cfg, n_train)
    if batch_sampler is None:
        return cfg.epochs, lambda e: plain_batches(cfg, n_train, e)
    all_batches = [np.asarray(b, dtype=np.int64) for b in batch_sampler]
    return max(1, math.ceil(len(all_batches) / spe)), lambda e: all_batches[e * spe:(e + 1) * spe]


# --- the stage ------------------------------------------------------------------------------------------------

def claim(cfg: TrainConfig, run_dir: Path, acc) -> tuple[object, bool]:
    """``(targetset, done)``: the run directory claimed for ``cfg`` (``runs.claim_run_dir``) and tied to its data;
    a finished run is reported, a new one gets its config.json."""
    from revsd import targets

    main = acc is None or acc.is_main_process  # only the main process writes into the run directory
    done = runs.claim_run_dir(run_dir, cfg.to_dict(), owned=RUN_FILES, normalise=comparable, reclaim=main)
    if acc is not None:
        acc.wait_for_everyone()  # the main process has reclaimed the directory (if it had to) before anyone goes on
    ts = targets.load(cfg.exp)
    if main:
        runs.check_data(run_dir, ts)
        if done:
            print(f"{run_dir} is finished (DONE): reusing it; delete the directory to retrain")
        else:
            cfg.replace(run=run_name(cfg)).save(run_dir / "config.json")
    if done and acc is not None:
        acc.end_training()
    return ts, done


def run(cfg: TrainConfig, batch_sampler=None, stage: str = STAGE) -> Path:
    """Train (or resume, or return the finished run); returns the run directory."""
    check(cfg)
    run_dir = paths.stage_dir(stage, cfg.exp, run_name(cfg))
    if distributed.idle_process(cfg):
        print(f"{cfg.mode} mode runs on the main process only (several processes are for finetune): exiting")
        return run_dir
    acc = distributed.accelerator(cfg)  # None unless a finetune run launched with several processes
    ts, done = claim(cfg, run_dir, acc)
    if done:
        return run_dir
    tr, va, te = training_rows(cfg, ts), validation_rows(cfg, ts), heldout_rows(cfg, ts)
    if len(tr) == 0:
        raise ValueError(f"exp {cfg.exp!r}: no training rows (split == train, fold != {cfg.fold}); check 01_filter")
    schedule = Schedule(*epoch_schedule(cfg, len(tr), batch_sampler), steps_per_epoch(cfg, len(tr)))
    t = Trainer.setup(cfg, ts, run_dir, stage, acc, (tr, va, te), schedule, resolve_variant(cfg))
    for epoch in range(t.start, schedule.n_epochs):
        t0 = time.time()
        res = t.train_epoch(epoch)
        cos_rows, cosines = t.sample_cosines(res)
        val_cos = t.validate()
        t.record_epoch(epoch, res, val_cos, cos_rows, cosines, t0)
        if cfg.stop_after_epoch and epoch + 1 == cfg.stop_after_epoch:
            raise Interrupted(f"stopped after epoch {epoch + 1} (stop_after_epoch); rerun to resume")
    t.finish()
    return run_dir


# --- results (for notebooks and the report) -------------------------------------------------------------------

def load_summary(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "summary.csv")


def load_metrics(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "metrics.json")


def metrics_table(exp: str, stage: str = STAGE) -> pd.DataFrame:
    """One row per finished run of ``exp``: the metrics.json fields."""
    return pd.DataFrame([load_metrics(p) for p in runs.finished_runs(exp, stage)])


# --- command line ---------------------------------------------------------------------------------------------

def parse_overrides(pairs: list[str]) -> dict:
    """``["epochs=5", "tiny=true"]`` -> typed TrainConfig fields (``revsd.config.typed``, as the runner's ``--set``)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {pair!r}")
        out[key] = typed(TrainConfig, key, value)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m revsd.train exp=demo backbone=effnet_lite0 epochs=20`` (key=value TrainConfig overrides); the same
    arguments after ``accelerate launch [--multi_gpu --num_processes N] -m revsd.train`` for multi-GPU finetuning."""
    import argparse

    ap = argparse.ArgumentParser(prog="revsd.train", description="03_train: " + __doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help=f"key=value, keys: {', '.join(TrainConfig.field_names())}")
    args = ap.parse_args(argv)
    run_dir = run(TrainConfig.from_dict(parse_overrides(args.overrides)))
    if distributed.is_main_process():  # one line per run, also under accelerate launch
        print(f"{run_dir}: {json.dumps(load_metrics(run_dir))}")
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())
