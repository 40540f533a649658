import math

import numpy as np
import pytest
import torch
from torch import nn

from revsd import engine
from revsd.heads import PromptHead, RevSDModel


def _model(seed=0, vocab=0, backbone=None):
    torch.manual_seed(seed)
    return RevSDModel(PromptHead(8, 16, vocab, "parallel", hidden=0, dropout=0.0), backbone, lam=1.0)


def _batches(n=32, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 16, generator=g)
    y = x @ w
    return [{"x": x[s:s + bs], "targets": y[s:s + bs], "index": np.arange(s, min(n, s + bs))}
            for s in range(0, n, bs)]


def test_training_improves_cosine():
    model = _model()
    batches = _batches()
    opt = engine.create_optimizer(model, lr=0.05)
    before = engine.validate(model, batches)["cos"]
    for _ in range(30):
        res = engine.train_one_epoch(model, batches, opt)
    after = engine.validate(model, batches)
    assert after["cos"] > before + 0.3 and after["cos"] > 0.9
    assert sorted(res["index"].tolist()) == list(range(32)) and res["steps"] == 4
    assert np.linalg.norm(after["emb"], axis=1) == pytest.approx(1.0, abs=1e-5)


def test_grad_accumulation_matches_large_batch():
    a, b = _model(), _model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    small = _batches(16, 8)
    engine.train_one_epoch(a, small, opt_a, grad_accum=2)
    engine.train_one_epoch(b, _batches(16, 16), opt_b)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_layerwise_lr_decay_and_no_decay_groups():
    backbone = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    model = RevSDModel(PromptHead(8, 16, 0, hidden=0), backbone)
    opt = engine.create_optimizer(model, lr=1.0, weight_decay=0.1, llrd=0.5, backbone_lr_scale=1.0, n_layers=4)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    first, last = backbone[0].weight, backbone[3].weight
    assert lr_of[id(first)] == pytest.approx(0.125) and lr_of[id(last)] == pytest.approx(1.0)
    assert lr_of[id(model.head.emb_head[-1].weight)] == 1.0
    assert wd_of[id(first)] == 0.1 and wd_of[id(backbone[0].bias)] == 0.0


def test_scheduler_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.create_scheduler(opt, total_steps=12, warmup_steps=2, min_ratio=0.0)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(x >= y for x, y in zip(lrs[2:], lrs[3:]))


def test_ema_update():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = engine.ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.2))


def test_checkpoint_roundtrip(tmp_path):
    model = _model(vocab=3)
    opt = engine.create_optimizer(model, lr=0.01)
    sched = engine.create_scheduler(opt, 10)
    batches = [dict(b, labels=torch.ones(len(b["x"]), 3)) for b in _batches()]
    engine.train_one_epoch(model, batches, opt, sched)
    ema = engine.ModelEma(model, 0.5)
    engine.save_checkpoint(tmp_path, model, opt, sched, ema, epoch=3, step=12, best_val=0.5)
    other = _model(seed=1, vocab=3)
    opt2 = engine.create_optimizer(other, lr=0.01)
    sched2 = engine.create_scheduler(opt2, 10)
    ema2 = engine.ModelEma(other, 0.5)
    state = engine.load_checkpoint(tmp_path, other, opt2, sched2, ema2)
    assert state == {"epoch": 3, "step": 12, "best_val": 0.5}
    for p, q in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(p, q)
    assert sched2.last_epoch == sched.last_epoch
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert engine.load_checkpoint(tmp_path / "none", other) is None


def _fresh(seed=0):
    model = _model(seed, vocab=3)
    opt = engine.create_optimizer(model, lr=0.01)
    return model, opt, engine.create_scheduler(opt, 12), engine.ModelEma(model, 0.5)


def _train_to(directory, epochs: int, until_fault=None):
    """Resume from ``directory``'s checkpoint (if any) and train to ``epochs``, checkpointing after each epoch."""
    model, opt, sched, ema = _fresh(seed=1)  # other init: only a restored checkpoint can make it match
    state = engine.load_checkpoint(directory, model, opt, sched, ema) or {}
    batches = [dict(b, labels=torch.ones(len(b["x"]), 3)) for b in _batches()]
    for epoch in range(state.get("epoch", 0), epochs):
        torch.manual_seed(epoch)
        engine.train_one_epoch(model, batches, opt, sched, ema=ema)
        engine.save_checkpoint(directory, model, opt, sched, ema, epoch=epoch + 1)
    return model, opt, ema


def test_checkpoint_interrupted_at_every_write_resumes_exactly(tmp_path, monkeypatch):
    """A save killed at its k-th write (a half-written temp file left behind, nothing renamed) for every k: the
    resumed run equals the uninterrupted one, and the stray files are cleaned up."""
    ref_model, ref_opt, ref_ema = _train_to(tmp_path / "ref", 3)
    real_write, writes = engine._write, []
    monkeypatch.setattr(engine, "_write", lambda path, write: (writes.append(path), real_write(path, write)))
    _train_to(tmp_path / "count", 1)
    n_writes = len(writes)
    assert n_writes == 4  # weights, EMA weights, state, pointer

    for k in range(n_writes):
        d = tmp_path / f"fault{k}"
        _train_to(d, 1)  # a first, complete checkpoint
        calls = []

        def faulty(path, write, k=k):
            calls.append(path)
            if len(calls) == k + 1:  # killed mid-write: a partial temp file, no rename
                (path.parent / f".{path.name}.x1y2.tmp{path.suffix}").write_bytes(b"partial")
                raise KeyboardInterrupt("killed")
            real_write(path, write)

        monkeypatch.setattr(engine, "_write", faulty)
        with pytest.raises(KeyboardInterrupt):
            _train_to(d, 3)
        monkeypatch.setattr(engine, "_write", real_write)
        assert engine.load_checkpoint(d, _fresh()[0]) == {"epoch": 1}  # the last complete checkpoint
        model, opt, ema = _train_to(d, 3)
        for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b), k
        for a, b in zip(ref_ema.module.state_dict().values(), ema.module.state_dict().values()):
            assert torch.equal(a, b), k
        assert opt.state_dict()["state"][0]["step"] == ref_opt.state_dict()["state"][0]["step"]
        left = sorted(p.name for p in d.iterdir())
        assert len(left) == 4 and "last.json" in left and not [n for n in left if ".tmp" in n], left


def test_damaged_checkpoint_is_refused(tmp_path):
    model, opt, sched, ema = _fresh()
    engine.save_checkpoint(tmp_path, model, opt, sched, ema, epoch=1)
    weights = next(tmp_path.glob("ckpt-*[0-9a-f].safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="damaged checkpoint"):
        engine.load_checkpoint(tmp_path, _fresh()[0])
    engine.remove_checkpoint(tmp_path)
    assert not list(tmp_path.iterdir())
