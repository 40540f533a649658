"""03_train: train a registered backbone with the paper's loss; writes predictions keyed by image id.

Reads ``working/01_filter/<exp>/filtered.parquet`` and ``working/02_targets/<exp>/`` (via ``revsd.targets.load``);
writes ``working/<stage>/<exp>/<run>/``: config.json, summary.csv, model.safetensors + model.json,
preds_{train,oof,test}.npz, sample_cosines.csv, metrics.json, invalid_images.csv (if any), DONE.

Modes: ``frozen`` trains the heads on cached backbone features (``revsd.features``); ``finetune`` trains end to
end (AMP on CUDA, grad accumulation, layer-wise lr decay, EMA). Command line: ``python -m revsd.train exp=demo
epochs=20``.

Multi-GPU (finetune): ``accelerate launch --multi_gpu --num_processes 4 -m revsd.train exp=paper
backbone=clip_vit_h14 mode=finetune``. ``batch_size`` stays the global batch: every process takes its slice of
each batch, so the steps, the schedule and the artifacts are those of a one-process run; only the main process
writes. Launched with several processes, frozen mode runs on the main process alone (the others exit at once).

Resume: a run directory with a checkpoint and no DONE continues from its last finished epoch and gives the same
result as an uninterrupted run (per-epoch seeds; optimizer, scheduler and EMA state restored).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from revsd import engine, features, paths, runs
from revsd.artifacts import Predictions, append_csv_row, read_json, save_csv, save_predictions, write_json, \
    write_text
from revsd.backbones import create_backbone, fuse_conv_bn, get_spec
from revsd.config import ConfigError, StageConfig
from revsd.metrics import mean_cosine, row_cosines
from revsd.device import resolve_device
from revsd.heads import HEAD_CONFIGS, PromptHead, RevSDModel
from revsd.images import to_rgb

STAGE = "03_train"
VARIANTS = {"parallel": "vocab", "concat": "cfg2", "emb2cls": "cfg3"}
SMOKE_ROWS = {"train": 48, "val": 24, "test": 24}


@dataclasses.dataclass(frozen=True)
class TrainConfig(StageConfig):
    exp: str = "demo"  # experiment prepared by 01_filter + 02_targets
    backbone: str = "effnet_lite0"  # a name in revsd.backbones.REGISTRY
    mode: str = "frozen"  # frozen (heads on cached features) or finetune (end to end)
    head_config: str = "concat"  # parallel, concat (paper config 2) or emb2cls (config 3)
    lam: float = 1.0  # weight of the vocabulary BCE loss; 0 trains the plain model (no vocabulary head)
    vocab_size: int = 0  # words of 02's vocabulary to predict; 0 uses all of them
    epochs: int = 20  # passes over the training rows
    batch_size: int = 32  # samples per optimizer step (times grad_accum)
    lr: float = 1e-3  # peak learning rate (heads; the backbone gets lr * backbone_lr_scale)
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norms)
    warmup_epochs: float = 1.0  # linear warm-up length, then cosine decay
    hidden: int = 256  # hidden width of the head MLPs (0: linear heads)
    dropout: float = 0.8  # dropout on the head inputs and hidden layer (strong: few images per artist)
    fold: int = -1  # -1 validates on split val; k validates on training fold k
    seed: int = 0  # seeds init, shuffling and dropout
    run: str = ""  # run name; empty is backbone_variant_f<fold>_s<seed>
    variant: str = ""  # label in reports; empty is plain (lam 0), vocab, cfg2 or cfg3 from the head config
    pretrained: bool = True  # load the backbone's pretrained weights
    tiny: bool = False  # tiny random-init backbone (tests, offline smoke runs)
    smoke: bool = False  # a few rows, seconds on CPU
    ema: float = 0.0  # EMA decay of the weights (0 disables), evaluated and saved instead of the raw weights
    grad_accum: int = 1  # micro-batches per optimizer step
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    llrd: float = 1.0  # finetune: layer-wise lr decay per backbone layer bucket (1 disables)
    backbone_lr_scale: float = 0.1  # finetune: backbone lr relative to lr
    num_workers: int = 2  # image decoding threads
    device: str = ""  # empty is cuda when available, else cpu
    stop_after_epoch: int = 0  # testing: raise Interrupted after this epoch (0 never) to exercise resume


class Interrupted(RuntimeError):
    """Raised by ``stop_after_epoch`` (simulated interruption)."""


def resolve_variant(cfg: TrainConfig) -> str:
    if cfg.variant:
        return cfg.variant
    return "plain" if cfg.lam == 0 else VARIANTS[cfg.head_config]


def run_name(cfg: TrainConfig) -> str:
    return cfg.run or f"{cfg.backbone}_{resolve_variant(cfg)}_f{cfg.fold}_s{cfg.seed}"


def check(cfg: TrainConfig) -> None:
    get_spec(cfg.backbone)
    if cfg.mode not in ("frozen", "finetune"):
        raise ConfigError(f"mode must be frozen or finetune, got {cfg.mode!r}")
    if cfg.head_config not in HEAD_CONFIGS:
        raise ConfigError(f"head_config must be one of {HEAD_CONFIGS}, got {cfg.head_config!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("epochs, batch_size and grad_accum must be >= 1")


# --- rows -----------------------------------------------------------------------------------------------------

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


# --- inputs ---------------------------------------------------------------------------------------------------

class Inputs:
    """Batches for table rows: cached features (frozen) or decoded images (finetune). Invalid images are
    excluded from batches and listed in ``errors`` (image_id -> message)."""

    def __init__(self, cfg: TrainConfig, targetset, rows: np.ndarray, labels, device: str):
        self.cfg, self.ts, self.labels, self.device = cfg, targetset, labels, device
        t = targetset.table
        self.ids = t["image_id"].astype(str).to_numpy()
        self.paths = t["image_path"].astype(str).to_numpy()  # absolute: targets.load resolves them
        self.spec = get_spec(cfg.backbone)
        self.valid = np.ones(len(t), bool)
        self.errors: dict[str, str] = {}
        self.feats = None
        if cfg.mode == "frozen":
            rows = np.unique(rows)
            fs = features.extract(cfg.backbone, self.ids[rows], self.paths[rows], cfg.pretrained, cfg.tiny,
                                  batch_size=64, num_workers=cfg.num_workers, device=device)
            self.feats = np.zeros((len(t), fs.feats.shape[1]), np.float32)
            self.feats[rows] = fs.feats
            self.valid[rows] = fs.valid
            self.errors.update(fs.errors)
            self.dim = fs.feats.shape[1]

    def _dict(self, rows, x, context=None) -> dict:
        rows = np.asarray(rows)
        d = {"x": x, "targets": torch.from_numpy(self.ts.emb[rows]), "index": rows}
        if self.labels is not None:
            d["labels"] = torch.from_numpy(self.labels[rows].toarray().astype(np.float32))
        if context is not None:
            d["context"] = context
        return d

    def batches(self, row_batches, keep_empty: bool = False):
        """Yield batch dicts (``index`` = table rows) for lists of table rows, skipping invalid images; a batch left
        with no rows is skipped, or yielded as None with ``keep_empty`` (then there is one item per batch)."""
        if self.feats is not None:
            for rows in row_batches:
                rows = np.asarray([r for r in rows if self.valid[r]], dtype=np.int64)
                if len(rows):
                    yield self._dict(rows, torch.from_numpy(self.feats[rows]))
                elif keep_empty:
                    yield None
            return
        size = self.spec.input_size(self.cfg.tiny)
        row_batches = [np.asarray(r, dtype=np.int64) for r in row_batches]
        loaded = features.iter_image_batches([self.paths[r] for r in row_batches], size, self.cfg.num_workers)
        for rows, (arrays, errs) in zip(row_batches, loaded):
            for r, e in zip(rows, errs):
                if e:
                    self.valid[r] = False
                    self.errors[self.ids[r]] = e
            keep = [i for i, a in enumerate(arrays) if a is not None]
            if not keep:
                if keep_empty:
                    yield None
                continue
            rows = rows[keep]
            x = features.to_batch([arrays[i] for i in keep], self.spec.mean, self.spec.std, self.device)
            ctx = None
            if self.spec.needs_context:
                ctx = self.spec.context_fn(self.ids[rows], self.paths[rows], tiny=self.cfg.tiny, device=self.device)
            yield self._dict(rows, x, ctx)

    def chunks(self, rows: np.ndarray, size: int = 256):
        return self.batches([rows[s:s + size] for s in range(0, len(rows), size)])


# --- model ----------------------------------------------------------------------------------------------------

def build_model(meta: dict, pretrained_backbone: bool = True) -> RevSDModel:
    """Rebuild the model from ``model.json``'s dict (frozen: heads only; finetune: backbone + heads)."""
    head = PromptHead(meta["in_dim"], meta["emb_dim"], meta["vocab_size"], meta["head_config"], meta["hidden"],
                      meta["dropout"])
    backbone = None
    if meta["mode"] == "finetune":
        backbone = create_backbone(meta["backbone"], pretrained=pretrained_backbone and meta["pretrained"],
                                   tiny=meta["tiny"])
    return RevSDModel(head, backbone, meta["lam"])


def init_from_mean(model: RevSDModel, mean_emb: np.ndarray) -> None:
    """Start exactly at the constant-mean prediction (the embedding head's last layer: zero weights, bias = the
    normalised mean training target), so training learns deviations from that strong baseline."""
    last = model.head.emb_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.from_numpy(mean_emb))


# --- the stage ------------------------------------------------------------------------------------------------

def _vocabulary(cfg: TrainConfig, targetset):
    if cfg.lam == 0:
        return [], None
    m = len(targetset.words) if cfg.vocab_size <= 0 else min(cfg.vocab_size, len(targetset.words))
    if m == 0:
        raise ValueError(f"exp {cfg.exp!r} has an empty vocabulary (02_targets vocab.json): rerun 02 with "
                         "vocab_size > 0, or train the plain model with lam=0")
    return list(targetset.words[:m]), targetset.labels[:, :m].tocsr()


def _prepare_run_dir(cfg: TrainConfig, stage: str) -> tuple[Path, bool]:
    """``(run_dir, done)``; raises if the directory holds a different configuration."""
    run_dir = paths.stage_dir(stage, cfg.exp, run_name(cfg))
    saved = run_dir / "config.json"
    if saved.exists():
        old = read_json(saved)
        old.pop("class", None)
        ignore = {"run", "stop_after_epoch", "num_workers", "device"}
        diff = {k: (old.get(k), v) for k, v in cfg.to_dict().items() if k not in ignore and old.get(k) != v}
        if diff:
            raise ConfigError(f"{run_dir} holds a run with other settings {diff} (saved, new): pick another run "
                              "name (run=...) or delete that directory")
    return run_dir, (run_dir / "DONE").exists()


def data_fingerprint(ts) -> str:
    """Identifies the 01/02 outputs a run was trained on (ids, splits, folds, targets, vocabulary)."""
    import hashlib

    h = hashlib.sha1()
    t = ts.table
    for col in ("image_id", "split", "fold"):
        h.update("\x1f".join(map(str, t[col].tolist())).encode())
    h.update(np.ascontiguousarray(ts.emb[:: max(1, len(ts.emb) // 4096)]).tobytes())
    h.update("\x1f".join(ts.words).encode())
    return h.hexdigest()


def _check_data(run_dir: Path, ts) -> None:
    """A run is only reused/resumed on the data it was trained on; otherwise say so instead of mixing them."""
    f = run_dir / "data.json"
    fp = data_fingerprint(ts)
    if f.exists() and read_json(f).get("fingerprint") != fp:
        raise ConfigError(f"{run_dir} was trained on other 01_filter/02_targets outputs of this exp: delete the "
                          "directory to retrain, or pick another run name (run=...)")
    if not f.exists():
        write_json(f, {"fingerprint": fp, "rows": int(len(ts.table))})


def _rewrite_until(path: Path, epoch: int) -> None:
    """Drop rows of epochs after ``epoch`` (written before an interruption, redone on resume)."""
    if path.exists() and path.stat().st_size:
        df = pd.read_csv(path, dtype={"image_id": str})
        save_csv(path, df[df["epoch"] <= epoch])


# --- several processes (accelerate launch) --------------------------------------------------------------------

def launched_processes() -> int:
    """How many processes this run was launched with (``accelerate launch`` / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _accelerator(cfg: TrainConfig):
    """An ``accelerate.Accelerator`` for a finetune run launched with several processes, else None (one process:
    the plain path, untouched). One GPU per process (NCCL); without CUDA, or with ``device=cpu``, CPU processes
    (gloo). Mixed precision follows ``amp`` as in one process (bf16 where supported, else fp16; CUDA only).
    ``split_batches``: ``batch_size`` is the global batch, so the prepared scheduler steps once per optimizer step
    (not once per process)."""
    n = launched_processes()
    if n <= 1 or cfg.mode != "finetune":
        return None
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    dev = PartialState(cpu=cpu).device
    precision = "no"
    if cfg.amp and dev.type == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    acc = Accelerator(cpu=cpu, mixed_precision=precision,
                      dataloader_config=DataLoaderConfiguration(split_batches=True))
    if acc.num_processes != n:  # every process would train alone and write the same files
        raise RuntimeError(f"launched with WORLD_SIZE={n} but accelerate set up {acc.num_processes} process(es) "
                           f"({acc.distributed_type}); launch with `accelerate launch --multi_gpu --num_processes {n}`")
    return acc


def _shard_batches(inputs: Inputs, row_batches, acc, counts: list):
    """This process's share of each global batch: its contiguous slice (``np.array_split``), weighted by
    ``valid_here * processes / valid_all`` so that the gradient DDP averages is the one-process batch gradient
    (the loss is a batch mean). A process whose slice is empty or unreadable trains a stand-in with weight 0 so
    that every process steps together; a batch with no readable image anywhere is skipped everywhere, as in one
    process. ``counts`` gets the samples each batch contributed here (to put gathered cosines in batch order)."""
    n, me = acc.num_processes, acc.process_index
    row_batches = [np.asarray(b, dtype=np.int64) for b in row_batches]
    parts = [np.array_split(b, n)[me] for b in row_batches]
    stand_in = None
    for rows, got in zip(row_batches, inputs.batches(parts, keep_empty=True)):
        k = 0 if got is None else len(got["index"])
        total = int(acc.reduce(torch.tensor([k], device=acc.device), reduction="sum").item())
        counts.append(k)
        if total == 0:
            continue
        if got is None:
            if stand_in is None:  # any readable image of this batch (another process has one)
                stand_in = next(inputs.batches([[r] for r in rows]))
            yield {**stand_in, "weight": 0.0}
            continue
        stand_in = got
        yield {**got, "weight": k * n / total}


def _gather_epoch(res: dict, counts: list, acc) -> dict:
    """``train_one_epoch``'s result over all processes: mean loss/cosine over every sample, and the per-sample
    cosines in the order of the global batches (as one process writes them)."""
    from accelerate.utils import gather_object

    n_here = len(res["index"])
    parts = gather_object([(res["loss"] * n_here, res["cos"] * n_here, n_here, res["index"], res["cosines"],
                            counts)])
    n_all = max(1, sum(p[2] for p in parts))
    index, cosines, offset = [], [], [0] * len(parts)
    for b in range(len(counts)):
        for r, p in enumerate(parts):
            c = p[5][b]
            index.append(p[3][offset[r]:offset[r] + c])
            cosines.append(p[4][offset[r]:offset[r] + c])
            offset[r] += c
    return {"loss": sum(p[0] for p in parts) / n_all, "cos": sum(p[1] for p in parts) / n_all,
            "steps": res["steps"], "index": np.concatenate(index) if index else np.zeros(0, int),
            "cosines": np.concatenate(cosines) if cosines else np.zeros(0, np.float32)}


def _evaluate(net, inputs: Inputs, rows: np.ndarray, device: str, amp: bool, acc=None, block: int = 2048) -> dict:
    """``engine.validate`` on ``rows``. With several processes each one takes a contiguous share of every block of
    ``block * processes`` rows, and every process gets the results of all of them in row order (unreadable
    images found anywhere are marked in ``inputs``); blocks bound what one gather carries."""
    if acc is None:
        return engine.validate(net, inputs.chunks(rows), device, amp)
    from accelerate.utils import gather_object

    rows = np.asarray(rows, dtype=np.int64)
    embs, probs, kept = [], [], []
    step = block * acc.num_processes
    for s in range(0, len(rows), step):
        part = np.array_split(rows[s:s + step], acc.num_processes)[acc.process_index]
        got = engine.validate(net, inputs.chunks(part), device, amp) if len(part) else None
        ok = part[inputs.valid[part]]
        bad = {int(r): inputs.errors.get(inputs.ids[r], "unreadable") for r in part[~inputs.valid[part]]}
        mine = (ok, got["emb"], got["probs"]) if got is not None and len(ok) else None
        for shard, errors in gather_object([(mine, bad)]):
            for r, e in errors.items():
                inputs.valid[r] = False
                inputs.errors[inputs.ids[r]] = e
            if shard is not None:
                kept.append(shard[0])
                embs.append(shard[1])
                if shard[2] is not None:
                    probs.append(shard[2])
    if not kept:
        return {"cos": float("nan"), "cosines": np.zeros(0, np.float32), "emb": np.zeros((0, 0), np.float32),
                "probs": None}
    emb = np.concatenate(embs)
    cosines = row_cosines(emb, inputs.ts.emb[np.concatenate(kept)])
    return {"cos": float(cosines.mean()), "cosines": cosines, "emb": emb,
            "probs": np.concatenate(probs) if probs else None}


def run(cfg: TrainConfig, batch_sampler=None, stage: str = STAGE) -> Path:
    """Train (or resume, or return the finished run); returns the run directory."""
    from tqdm.auto import tqdm

    from revsd import targets

    check(cfg)
    if launched_processes() > 1 and cfg.mode != "finetune" and int(os.environ.get("RANK", "0")) != 0:
        print(f"{cfg.mode} mode runs on the main process only (several processes are for finetune): exiting")
        return _prepare_run_dir(cfg, stage)[0]
    acc = _accelerator(cfg)  # None unless a finetune run launched with several processes
    main = acc is None or acc.is_main_process  # only the main process writes into the run directory
    run_dir, done = _prepare_run_dir(cfg, stage)
    ts = targets.load(cfg.exp)
    if main:
        _check_data(run_dir, ts)
    if done:
        if main:
            print(f"{run_dir} is finished (DONE): reusing it; delete the directory to retrain")
        if acc is not None:
            acc.end_training()
        return run_dir
    if main:
        cfg.replace(run=run_name(cfg)).save(run_dir / "config.json")
    device = resolve_device(cfg.device) if acc is None else str(acc.device)
    words, labels = _vocabulary(cfg, ts)
    tr, va, te = training_rows(cfg, ts), validation_rows(cfg, ts), heldout_rows(cfg, ts)
    if len(tr) == 0:
        raise ValueError(f"exp {cfg.exp!r}: no training rows (split == train, fold != {cfg.fold}); check 01_filter")
    torch.manual_seed(cfg.seed)
    inputs = Inputs(cfg, ts, np.concatenate([tr, va, te]), labels, device)
    mean_emb = ts.emb[tr].mean(0)
    mean_emb = (mean_emb / np.linalg.norm(mean_emb)).astype(np.float32)

    spec = get_spec(cfg.backbone)
    in_dim = inputs.dim if cfg.mode == "frozen" else (
        create_backbone(cfg.backbone, False, True).feature_dim if cfg.tiny else spec.feature_dim)
    meta = {"backbone": cfg.backbone, "mode": cfg.mode, "head_config": cfg.head_config, "in_dim": int(in_dim),
            "emb_dim": int(ts.emb.shape[1]), "vocab_size": len(words), "hidden": cfg.hidden, "dropout": cfg.dropout,
            "lam": cfg.lam, "words": words, "image_size": spec.input_size(cfg.tiny), "mean": list(spec.mean),
            "std": list(spec.std), "pretrained": cfg.pretrained, "tiny": cfg.tiny, "variant": resolve_variant(cfg)}
    torch.manual_seed(cfg.seed)
    model = build_model(meta).to(device)
    init_from_mean(model, mean_emb)
    if cfg.mode == "finetune":
        model = model.to(memory_format=torch.channels_last)

    # schedule: plain shuffled epochs, or a batch sampler's batches cut into epochs of the same length
    spe = steps_per_epoch(cfg, len(tr))
    if batch_sampler is not None:
        all_batches = [np.asarray(b, dtype=np.int64) for b in batch_sampler]
        n_epochs = max(1, math.ceil(len(all_batches) / spe))
        epoch_batches = lambda e: all_batches[e * spe:(e + 1) * spe]  # noqa: E731
    else:
        n_epochs = cfg.epochs
        epoch_batches = lambda e: plain_batches(cfg, len(tr), e)  # noqa: E731
    opt_steps = sum(math.ceil(len(epoch_batches(e)) / cfg.grad_accum) for e in range(n_epochs))
    optimizer = engine.create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.llrd, cfg.backbone_lr_scale)
    scheduler = engine.create_scheduler(optimizer, opt_steps, int(cfg.warmup_epochs * spe / cfg.grad_accum))
    ema = engine.ModelEma(model, cfg.ema) if cfg.ema > 0 else None
    use_amp = cfg.amp and device.startswith("cuda")
    if acc is None:
        scaler = torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None
    else:
        scaler = acc.scaler  # fp16 only; accelerate scales the loss and steps through it

    state = engine.load_checkpoint(run_dir, model, optimizer, scheduler, ema, scaler) or {}
    start, step = state.get("epoch", 0), state.get("step", 0)
    best, best_epoch = state.get("best_val", -float("inf")), state.get("best_epoch", 0)
    if start and main:
        print(f"resuming {run_dir.name} after epoch {start}")
    if main:
        for name in ("summary.csv", "sample_cosines.csv"):
            (_rewrite_until(run_dir / name, start) if start else (run_dir / name).unlink(missing_ok=True))
    # several processes: DDP model, optimizer and scheduler for training; `model` (unwrapped) for evaluation/saving
    ddp_model, ddp_opt, ddp_sched = (model, optimizer, scheduler) if acc is None else acc.prepare(
        model, optimizer, scheduler)
    rank = 0 if acc is None else acc.process_index

    ids = inputs.ids
    for epoch in range(start, n_epochs):
        t0 = time.time()
        # dropout/augmentation per epoch (resume-exact); several processes: a stream per process (rank 0 = one process)
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * rank)
        batches = [tr[b] for b in epoch_batches(epoch)]
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{n_epochs}", leave=False, disable=not main)
        counts: list[int] = []
        stream = inputs.batches(batches) if acc is None else _shard_batches(inputs, batches, acc, counts)
        res = engine.train_one_epoch(ddp_model, stream, ddp_opt, ddp_sched, device, cfg.grad_accum, use_amp,
                                     None if acc is not None else scaler, ema, max_grad_norm=1.0, progress=bar,
                                     accelerator=acc)
        bar.close()
        if acc is not None:
            res = _gather_epoch(res, counts, acc)
        step += res["steps"]
        net = ema.module if ema is not None else model
        if cfg.mode == "frozen":  # every training sample, eval mode
            tv = engine.validate(net, inputs.chunks(tr), device, use_amp)
            cos_rows = [r for r in tr if inputs.valid[r]]
            cosines = tv["cosines"]
        else:  # the cosines seen while training this epoch
            cos_rows, cosines = res["index"], res["cosines"]
        val = _evaluate(net, inputs, va, device, use_amp, acc) if len(va) else {"cos": float("nan")}
        val_cos = val["cos"]
        improved = not math.isfinite(val_cos) or val_cos > best
        if improved:
            best, best_epoch = (val_cos if math.isfinite(val_cos) else best), epoch + 1
        if main:
            with open(run_dir / "sample_cosines.csv", "a", newline="") as f:
                pd.DataFrame({"image_id": ids[np.asarray(cos_rows, dtype=np.int64)], "epoch": epoch + 1,
                              "cosine": np.round(cosines, 6)}).to_csv(f, index=False, header=f.tell() == 0)
            if improved:
                engine.save_weights(run_dir / "model.safetensors", net)
            append_csv_row(run_dir / "summary.csv", {
                "epoch": epoch + 1, "step": step, "train_loss": round(res["loss"], 6),
                "train_cos": round(res["cos"], 6), "val_cos": round(val_cos, 6), "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.time() - t0, 3)})
            print(f"epoch {epoch + 1}/{n_epochs}  loss {res['loss']:.4f}  train cos {res['cos']:.4f}  val cos "
                  f"{val_cos:.4f}")
            engine.save_checkpoint(run_dir, model, optimizer, scheduler, ema, scaler, epoch=epoch + 1, step=step,
                                   best_val=best, best_epoch=best_epoch)
        if acc is not None:
            acc.wait_for_everyone()  # the checkpoint and best weights are on disk before anyone goes on
        if cfg.stop_after_epoch and epoch + 1 == cfg.stop_after_epoch:
            raise Interrupted(f"stopped after epoch {epoch + 1} (stop_after_epoch); rerun to resume")

    # final predictions with the best weights
    engine.load_weights(run_dir / "model.safetensors", model)
    if main:
        write_json(run_dir / "model.json", {**meta, "best_epoch": best_epoch})
    fallback_probs = None if labels is None else np.asarray(labels[tr].mean(0)).ravel().astype(np.float32)
    out = {}
    for name, rows in (("train", tr), ("oof", va), ("test", te)):
        preds = _predict_rows(model, inputs, rows, mean_emb, fallback_probs, device, use_amp, acc)
        if main:
            save_predictions(run_dir / f"preds_{name}.npz", preds)
        out[name] = mean_cosine(preds.emb, ts.emb[rows])
    if main:  # only the main process writes
        if inputs.errors:
            save_csv(run_dir / "invalid_images.csv",
                     pd.DataFrame({"image_id": list(inputs.errors), "error": list(inputs.errors.values())}))
            print(f"WARNING: {len(inputs.errors)} unreadable images (listed in {run_dir / 'invalid_images.csv'}); "
                  "they were left out of training and predicted as the constant mean embedding")
        write_json(run_dir / "metrics.json", {
            "run": run_dir.name, "stage": stage, "backbone": cfg.backbone, "variant": resolve_variant(cfg),
            "head_config": cfg.head_config if words else "none", "lambda": cfg.lam, "vocab_size": len(words),
            "mode": cfg.mode, "epochs": n_epochs, "steps": step, "val_cosine": out["oof"], "test_cosine": out["test"],
            "const_mean_val": _const_cosine(mean_emb, ts.emb[va]), "const_mean_test": _const_cosine(mean_emb, ts.emb[te]),
        })
        for name in ("last.safetensors", "last_ema.safetensors", "last_state.pt", "last.json"):
            (run_dir / name).unlink(missing_ok=True)
        write_text(run_dir / "DONE", "")
    if acc is not None:
        acc.wait_for_everyone()  # everyone leaves together, after the main process has written DONE
        acc.end_training()
    return run_dir


def _const_cosine(mean_emb: np.ndarray, targets: np.ndarray) -> float:
    """Mean cosine of the constant-mean-embedding baseline (nan for no rows)."""
    return mean_cosine(np.broadcast_to(mean_emb, targets.shape), targets)


def _predict_rows(model, inputs: Inputs, rows, mean_emb, fallback_probs, device, amp, acc=None) -> Predictions:
    """Predictions for ``rows`` (all of them: invalid images get the constant mean / label frequencies)."""
    rows = np.asarray(rows, dtype=np.int64)
    emb = np.tile(mean_emb, (len(rows), 1))
    probs = None if fallback_probs is None else np.tile(fallback_probs, (len(rows), 1))
    got = _evaluate(model, inputs, rows, device, amp, acc) if len(rows) else None
    ok = np.array([inputs.valid[r] for r in rows], bool)
    if got is not None and ok.any():
        emb[ok] = got["emb"]
        if probs is not None:
            probs[ok] = got["probs"]
    return Predictions(inputs.ids[rows], emb, probs)


# --- results (for notebooks and the report) -------------------------------------------------------------------

def load_summary(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "summary.csv")


def load_metrics(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "metrics.json")


def metrics_table(exp: str, stage: str = STAGE) -> pd.DataFrame:
    """One row per finished run of ``exp``: the metrics.json fields."""
    return pd.DataFrame([load_metrics(p) for p in runs.finished_runs(exp, stage)])


# --- inference ------------------------------------------------------------------------------------------------

class Predictor:
    """A trained run for inference: ``predict(images) -> (emb (n, 384) normalised, probs (n, m) or None)``."""

    def __init__(self, model: RevSDModel, backbone, meta: dict, device: str):
        self.model, self.backbone_module, self.meta, self.device = model.eval(), backbone, meta, device
        self.words: list[str] = list(meta["words"])
        self.backbone: str = meta["backbone"]
        self.image_size: int = int(meta["image_size"])
        self.spec = get_spec(self.backbone)

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        embs, probs = [], []
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size]
            arrays = [features.pil_to_array(to_rgb(im), self.image_size) for im in chunk]
            x = features.to_batch(arrays, self.meta["mean"], self.meta["std"], self.device)
            ctx = self._context(chunk) if self.spec.needs_context else None
            if self.backbone_module is not None:
                x = self.backbone_module(x, ctx) if ctx is not None else self.backbone_module(x)
                ctx = None
            out = self.model(x, ctx)
            embs.append(torch.nn.functional.normalize(out["emb"].float(), dim=-1).cpu().numpy())
            if out["logits"] is not None:
                probs.append(torch.sigmoid(out["logits"].float()).cpu().numpy())
        d = self.meta["emb_dim"]
        emb = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, d), np.float32)
        return emb, (np.concatenate(probs).astype(np.float32) if probs else None)

    def _context(self, images):
        """Captions need files: write the images to a temp folder, ids from their content hashes."""
        import hashlib
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ids, files = [], []
            for im in images:
                h = hashlib.sha1(im.tobytes()).hexdigest()[:16]
                f = Path(tmp) / f"{h}.png"
                im.save(f)
                ids.append(f"predict-{h}")
                files.append(str(f))
            return self.spec.context_fn(ids, files, tiny=self.meta["tiny"], device=self.device)


def load_predictor(run_dir: str | Path, device: str = "") -> Predictor:
    """Rebuild a finished run (model.json + model.safetensors; no pickle)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: {run_dir} is not a finished 03_train run (no model.json)")
    meta = read_json(meta_path)
    device = resolve_device(device)
    model = build_model(meta, pretrained_backbone=False)
    engine.load_weights(run_dir / "model.safetensors", model)
    backbone = None
    if meta["mode"] == "frozen":
        backbone = create_backbone(meta["backbone"], pretrained=meta["pretrained"], tiny=meta["tiny"]).eval()
        backbone = fuse_conv_bn(backbone).to(device).to(memory_format=torch.channels_last)
    return Predictor(model.to(device), backbone, meta, device)


# --- command line ---------------------------------------------------------------------------------------------

def parse_overrides(pairs: list[str]) -> dict:
    """``["epochs=5", "tiny=true"]`` -> typed TrainConfig fields (types from the defaults)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {pair!r}")
        TrainConfig.check_keys([key])
        default = fields[key].default
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"{key}: expected true/false, got {value!r}")
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m revsd.train exp=demo backbone=effnet_lite0 epochs=20`` (key=value TrainConfig overrides); the same
    arguments after ``accelerate launch [--multi_gpu --num_processes N] -m revsd.train`` for multi-GPU finetuning."""
    import argparse

    ap = argparse.ArgumentParser(prog="revsd.train", description="03_train: " + __doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help=f"key=value, keys: {', '.join(TrainConfig.field_names())}")
    args = ap.parse_args(argv)
    run_dir = run(TrainConfig.from_dict(parse_overrides(args.overrides)))
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, also under accelerate launch
        print(f"{run_dir}: {json.dumps(load_metrics(run_dir))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
