"""The state and the named steps of one 03_train run; ``revsd.train.run`` calls them in order:

``Trainer.setup`` (inputs, model, optimizer, schedule, resume from the checkpoint) → per epoch ``train_epoch``,
``sample_cosines``, ``validate``, ``record_epoch`` (CSVs, best weights, checkpoint) → ``finish`` (predictions with
the best weights, model.json, metrics.json, DONE). Only the main process writes (``revsd.distributed``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch

from revsd import distributed, engine
from revsd.artifacts import Predictions, append_csv_row, save_csv, save_predictions, write_json, write_text
from revsd.backbones import create_backbone, get_spec
from revsd.device import resolve_device
from revsd.heads import RevSDModel
from revsd.inference import ModelSpec, build_model, load_weights, save_weights
from revsd.inputs import Inputs
from revsd.metrics import mean_cosine


class Schedule(NamedTuple):
    n_epochs: int
    batches_of: Callable[[int], list]  # epoch -> position batches (indices into the training rows)
    steps_per_epoch: int  # batches of a plain epoch (sets the warm-up length)


def vocabulary(cfg, targetset):
    """``(words, labels (n, m) CSR)`` the vocabulary head predicts; ``([], None)`` without a vocabulary head."""
    if not cfg.vocab_head:
        return [], None
    m = len(targetset.words) if cfg.vocab_size <= 0 else min(cfg.vocab_size, len(targetset.words))
    if m == 0:
        raise ValueError(f"exp {cfg.exp!r} has an empty vocabulary (02_targets vocab.json): rerun 02 with "
                         "vocab_size > 0, or train the plain model with vocab_head=false")
    return list(targetset.words[:m]), targetset.labels[:, :m].tocsr()


def init_from_mean(model: RevSDModel, mean_emb: np.ndarray) -> None:
    """Start exactly at the constant-mean prediction (the embedding head's last layer: zero weights, bias = the
    normalised mean training target), so training learns deviations from that strong baseline."""
    last = model.head.emb_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.from_numpy(mean_emb))


def model_spec(cfg, inputs: Inputs, emb_dim: int, words: list, variant: str) -> ModelSpec:
    bspec = get_spec(cfg.backbone)
    in_dim = inputs.dim if cfg.mode == "frozen" else (
        create_backbone(cfg.backbone, False, True).feature_dim if cfg.tiny else bspec.feature_dim)
    return ModelSpec(cfg.backbone, cfg.mode, cfg.head_config, int(in_dim), int(emb_dim), len(words), cfg.hidden,
                     cfg.dropout, cfg.head_norm, cfg.lam, tuple(words), bspec.preprocessing(cfg.tiny), cfg.pretrained,
                     cfg.tiny, cfg.weights, variant)


def _rewrite_until(path: Path, epoch: int) -> None:
    """Drop rows of epochs after ``epoch`` (written before an interruption, redone on resume)."""
    if path.exists() and path.stat().st_size:
        df = pd.read_csv(path, dtype={"image_id": str})
        save_csv(path, df[df["epoch"] <= epoch])


def _const_cosine(mean_emb: np.ndarray, targets: np.ndarray) -> float:
    """Mean cosine of the constant-mean-embedding baseline (nan for no rows)."""
    return mean_cosine(np.broadcast_to(mean_emb, targets.shape), targets)


@dataclasses.dataclass
class Trainer:
    cfg: object  # revsd.train.TrainConfig
    ts: object  # revsd.targets.TargetSet
    run_dir: Path
    stage: str
    acc: object  # accelerate.Accelerator or None
    device: str
    rows: tuple  # (train, oof, test) table rows
    labels: object
    inputs: Inputs
    mean_emb: np.ndarray
    spec: ModelSpec
    model: RevSDModel  # unwrapped: evaluation and saving
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: engine.ModelEma | None
    scaler: object
    use_amp: bool
    schedule: Schedule
    train_parts: tuple  # (model, optimizer, scheduler) as trained: compiled and/or prepared by accelerate
    start: int = 0
    step: int = 0
    best: float = -float("inf")
    best_epoch: int = 0

    @property
    def main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    @property
    def net(self) -> torch.nn.Module:
        """The weights that are evaluated and saved (the EMA when there is one)."""
        return self.ema.module if self.ema is not None else self.model

    @classmethod
    def setup(cls, cfg, ts, run_dir: Path, stage: str, acc, rows: tuple, schedule: Schedule, variant: str
              ) -> "Trainer":
        """Inputs, model (initialised at the constant mean), optimizer, scheduler, EMA, resumed state."""
        device = resolve_device(cfg.device) if acc is None else str(acc.device)
        words, labels = vocabulary(cfg, ts)
        tr, va, te = rows
        torch.manual_seed(cfg.seed)
        inputs = Inputs(cfg, ts, np.concatenate([tr, va, te]), labels, device)
        mean_emb = ts.emb[tr].mean(0)
        mean_emb = (mean_emb / np.linalg.norm(mean_emb)).astype(np.float32)
        spec = model_spec(cfg, inputs, ts.emb.shape[1], words, variant)
        torch.manual_seed(cfg.seed)
        model = build_model(spec).to(device)
        init_from_mean(model, mean_emb)
        if cfg.mode == "finetune":
            model = model.to(memory_format=torch.channels_last)
            if cfg.grad_checkpointing and not model.backbone.set_grad_checkpointing(True):
                print(f"note: backbone {cfg.backbone} has no activation checkpointing; grad_checkpointing ignored")
        opt_steps = sum(math.ceil(len(schedule.batches_of(e)) / cfg.grad_accum) for e in range(schedule.n_epochs))
        optimizer = engine.create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.llrd, cfg.backbone_lr_scale,
                                            fused=device.startswith("cuda"))
        scheduler = engine.create_scheduler(optimizer, opt_steps,
                                            int(cfg.warmup_epochs * schedule.steps_per_epoch / cfg.grad_accum))
        ema = engine.ModelEma(model, cfg.ema) if cfg.ema > 0 else None
        use_amp = cfg.amp and device.startswith("cuda")
        if acc is None:
            scaler = torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None
        else:
            scaler = acc.scaler  # fp16 only; accelerate scales the loss and steps through it
        state = engine.load_checkpoint(run_dir, model, optimizer, scheduler, ema, scaler) or {}
        trained = torch.compile(model) if cfg.compile and cfg.mode == "finetune" else model
        parts = (trained, optimizer, scheduler) if acc is None else tuple(acc.prepare(trained, optimizer, scheduler))
        t = cls(cfg, ts, run_dir, stage, acc, device, rows, labels, inputs, mean_emb, spec, model, optimizer,
                scheduler, ema, scaler, use_amp, schedule, parts, state.get("epoch", 0), state.get("step", 0),
                state.get("best_val", -float("inf")), state.get("best_epoch", 0))
        if t.main:
            if t.start:
                print(f"resuming {run_dir.name} after epoch {t.start}")
            for name in ("summary.csv", "sample_cosines.csv"):
                (_rewrite_until(run_dir / name, t.start) if t.start else (run_dir / name).unlink(missing_ok=True))
        return t

    def train_epoch(self, epoch: int) -> dict:
        """One pass of optimizer steps over the epoch's batches (``engine.train_one_epoch``), all processes."""
        from tqdm.auto import tqdm

        cfg, acc, tr = self.cfg, self.acc, self.rows[0]
        rank = 0 if acc is None else acc.process_index
        # dropout/augmentation per epoch (resume-exact); several processes: a stream per process (rank 0 = one process)
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * rank)
        batches = [tr[b] for b in self.schedule.batches_of(epoch)]
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{self.schedule.n_epochs}", leave=False,
                   disable=not self.main)
        counts: list[int] = []
        stream = self.inputs.batches(batches) if acc is None else distributed.shard_batches(self.inputs, batches,
                                                                                            acc, counts)
        model, optimizer, scheduler = self.train_parts
        res = engine.train_one_epoch(model, stream, optimizer, scheduler, self.device, cfg.grad_accum, self.use_amp,
                                     None if acc is not None else self.scaler, self.ema, max_grad_norm=1.0,
                                     progress=bar, accelerator=acc)
        bar.close()
        if acc is not None:
            res = distributed.gather_epoch(res, counts, acc)
        self.step += res["steps"]
        return res

    def sample_cosines(self, res: dict) -> tuple[np.ndarray, np.ndarray]:
        """``(table rows, cosines)`` of every training sample after this epoch: a pass in eval mode (the paper's
        difficulty), or the cosines seen while training (``sample_cosines="train"``, cheaper)."""
        if self.cfg.sample_cosines == "train":
            return np.asarray(res["index"], dtype=np.int64), res["cosines"]
        tr = self.rows[0]
        got = distributed.evaluate(self.net, self.inputs, tr, self.device, self.use_amp, self.acc)
        return tr[self.inputs.valid[tr]], got["cosines"]

    def validate(self) -> float:
        va = self.rows[1]
        if not len(va):
            return float("nan")
        return distributed.evaluate(self.net, self.inputs, va, self.device, self.use_amp, self.acc)["cos"]

    def record_epoch(self, epoch: int, res: dict, val_cos: float, cos_rows, cosines, t0: float) -> None:
        """Per-sample cosines, the best weights, the summary row and the checkpoint (main process), then a barrier."""
        improved = not math.isfinite(val_cos) or val_cos > self.best
        if improved:
            self.best, self.best_epoch = (val_cos if math.isfinite(val_cos) else self.best), epoch + 1
        if self.main:
            run_dir, n_epochs = self.run_dir, self.schedule.n_epochs
            with open(run_dir / "sample_cosines.csv", "a", newline="") as f:
                pd.DataFrame({"image_id": self.inputs.ids[np.asarray(cos_rows, dtype=np.int64)], "epoch": epoch + 1,
                              "cosine": np.round(cosines, 6)}).to_csv(f, index=False, header=f.tell() == 0)
            if improved:
                save_weights(run_dir / "model.safetensors", self.net)
            append_csv_row(run_dir / "summary.csv", {
                "epoch": epoch + 1, "step": self.step, "train_loss": round(res["loss"], 6),
                "train_cos": round(res["cos"], 6), "val_cos": round(val_cos, 6),
                "lr": self.scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 3)})
            print(f"epoch {epoch + 1}/{n_epochs}  loss {res['loss']:.4f}  train cos {res['cos']:.4f}  val cos "
                  f"{val_cos:.4f}")
            engine.save_checkpoint(run_dir, self.model, self.optimizer, self.scheduler, self.ema, self.scaler,
                                   epoch=epoch + 1, step=self.step, best_val=self.best, best_epoch=self.best_epoch)
        if self.acc is not None:
            self.acc.wait_for_everyone()  # the checkpoint and best weights are on disk before anyone goes on

    def predict_rows(self, rows, fallback_probs) -> Predictions:
        """Predictions for ``rows`` (all of them: invalid images get the constant mean / label frequencies)."""
        rows = np.asarray(rows, dtype=np.int64)
        emb = np.tile(self.mean_emb, (len(rows), 1))
        probs = None if fallback_probs is None else np.tile(fallback_probs, (len(rows), 1))
        got = distributed.evaluate(self.model, self.inputs, rows, self.device, self.use_amp, self.acc) \
            if len(rows) else None
        ok = self.inputs.valid[rows] if len(rows) else np.zeros(0, bool)
        if got is not None and ok.any():
            emb[ok] = got["emb"]
            if probs is not None:
                probs[ok] = got["probs"]
        return Predictions(self.inputs.ids[rows], emb, probs)

    def finish(self) -> None:
        """Predictions with the best weights, model.json, metrics.json; the checkpoint removed; DONE last."""
        cfg, run_dir, ts, (tr, va, te) = self.cfg, self.run_dir, self.ts, self.rows
        load_weights(run_dir / "model.safetensors", self.model)
        if self.main:
            dataclasses.replace(self.spec, best_epoch=self.best_epoch).save(run_dir)
        fallback = None if self.labels is None else np.asarray(self.labels[tr].mean(0)).ravel().astype(np.float32)
        out = {}
        for name, rows in (("train", tr), ("oof", va), ("test", te)):
            preds = self.predict_rows(rows, fallback)
            if self.main:  # the training rows' probabilities are read by no one: not stored
                save_predictions(run_dir / f"preds_{name}.npz",
                                 Predictions(preds.ids, preds.emb) if name == "train" else preds)
            out[name] = mean_cosine(preds.emb, ts.emb[rows])
        if self.main:
            errors = self.inputs.errors
            if errors:
                save_csv(run_dir / "invalid_images.csv", pd.DataFrame({"image_id": list(errors),
                                                                       "error": list(errors.values())}))
                print(f"WARNING: {len(errors)} unreadable images (listed in {run_dir / 'invalid_images.csv'}); "
                      "they were left out of training and predicted as the constant mean embedding")
            words = self.spec.words
            write_json(run_dir / "metrics.json", {
                "run": run_dir.name, "stage": self.stage, "backbone": cfg.backbone, "variant": self.spec.variant,
                "head_config": cfg.head_config if words else "none", "lam": cfg.lam if words else 0.0,
                "vocab_size": len(words), "mode": cfg.mode, "epochs": self.schedule.n_epochs, "steps": self.step,
                "val_cosine": out["oof"], "test_cosine": out["test"],
                "const_mean_val": _const_cosine(self.mean_emb, ts.emb[va]),
                "const_mean_test": _const_cosine(self.mean_emb, ts.emb[te]),
            })
            engine.remove_checkpoint(run_dir)
            write_text(run_dir / "DONE", "")
        if self.acc is not None:
            self.acc.wait_for_everyone()  # everyone leaves together, after the main process has written DONE
            self.acc.end_training()
