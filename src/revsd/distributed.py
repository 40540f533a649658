"""03_train under ``accelerate launch`` (several processes, finetune mode): sharding, gathering, evaluation.

``batch_size`` stays the global batch: every process takes its contiguous slice of each batch, weighted so that
DDP's averaged gradient is the one-process batch gradient; per-sample results are gathered back into the order one
process would write them. With one process every function here is the plain path (``accelerator`` is None).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from revsd import engine
from revsd.metrics import row_cosines


def launched_processes() -> int:
    """How many processes this run was launched with (``accelerate launch`` / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerator(cfg):
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


def shard_batches(inputs, row_batches, acc, counts: list):
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


def gather_epoch(res: dict, counts: list, acc) -> dict:
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


def evaluate(net, inputs, rows: np.ndarray, device: str, amp: bool, acc=None, block: int = 2048) -> dict:
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


def idle_process(cfg) -> bool:
    """A secondary process of a multi-process launch in frozen mode (which runs on the main process alone)."""
    return launched_processes() > 1 and cfg.mode != "finetune" and int(os.environ.get("RANK", "0")) != 0


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def exit_process(code: int) -> None:
    """Leave a stage entry point with ``code``. Under ``accelerate launch`` / torchrun (several processes) the
    process leaves at once (``os._exit`` after flushing), without the interpreter's teardown: by then the stage has
    written and flushed its files, gone through the final barrier and destroyed the process group, and a gloo
    process can still abort during teardown (SIGABRT, "terminate called without an active exception", seen once in
    CI on the last line of a finished two-process run), which fails the whole launch. One process: ``SystemExit``."""
    if launched_processes() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
