import pytest
import torch
from torch import nn

from revsd.heads import PromptHead, RevSDModel
from revsd.variants import HEAD_CONFIGS, HeadConfig


@pytest.mark.parametrize("config", HEAD_CONFIGS)
def test_shapes_and_gradient_flow(config):
    torch.manual_seed(0)
    head = PromptHead(in_dim=16, emb_dim=384, vocab_size=7, config=config, hidden=32, dropout=0.0)
    model = RevSDModel(head, lam=1.0)
    x = torch.randn(5, 16, requires_grad=True)
    out = model(x, targets=torch.randn(5, 384), labels=(torch.rand(5, 7) > 0.5).float())
    assert out["emb"].shape == (5, 384) and out["logits"].shape == (5, 7)
    out["loss"].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{config}: no gradient reaches {name}"


def test_config_wiring():
    """concat feeds the class probabilities into the embedding head; emb2cls classifies the embedding."""
    torch.manual_seed(0)
    concat = PromptHead(16, 384, 7, "concat", hidden=0)
    assert concat.emb_head[-1].in_features == 16 + 7
    emb2cls = PromptHead(16, 384, 7, "emb2cls", hidden=32)
    assert emb2cls.vocab_head[-1].in_features == 384
    # in emb2cls the logits are a function of the embedding only: equal embeddings -> equal logits
    emb2cls.eval()
    e, logits = emb2cls(torch.randn(2, 16))
    assert torch.allclose(emb2cls.vocab_head(e), logits)
    # in concat, changing the vocabulary head changes the embedding
    concat.eval()
    x = torch.randn(3, 16)
    e1, _ = concat(x)
    with torch.no_grad():
        concat.vocab_head[-1].bias.add_(5.0)
    e2, _ = concat(x)
    assert not torch.allclose(e1, e2)


@pytest.mark.parametrize("config", HEAD_CONFIGS)
def test_plain_model_has_no_vocabulary_head(config):
    head = PromptHead(16, 384, vocab_size=0, config=config)
    out = RevSDModel(head)(torch.randn(2, 16), targets=torch.randn(2, 384))
    assert out["logits"] is None and head.vocab_head is None
    assert out["bce"].item() == 0.0


def test_unknown_config_rejected():
    with pytest.raises(ValueError, match="head_config must be one of"):
        PromptHead(16, 384, 3, "sideways")


@pytest.mark.parametrize("config", HEAD_CONFIGS)
def test_paper_heads_are_one_linear_layer_each(config):
    """hidden=0, dropout=0, norm=False: exactly one fully connected layer per head, nothing else."""
    head = PromptHead(16, 384, 7, config, hidden=0, dropout=0.0, norm=False)
    layers = [m for m in head.modules() if not isinstance(m, (PromptHead, nn.Sequential, nn.Identity))]
    assert len(layers) == 2 and all(isinstance(m, nn.Linear) for m in layers)
    # no normalisation: the embedding is an affine function of the features (concat: of features + probs)
    x = torch.randn(3, 16)
    emb, logits = head(x)
    if config == "parallel":
        torch.testing.assert_close(emb, x @ head.emb_head[0].weight.T + head.emb_head[0].bias)
        torch.testing.assert_close(logits, x @ head.vocab_head[0].weight.T + head.vocab_head[0].bias)


def test_a_new_registry_entry_is_built_from_its_flags(monkeypatch):
    """A head configuration is one entry of revsd.variants.HEAD_CONFIGS: heads builds it from its wiring flags."""
    from revsd import variants

    entry = HeadConfig("cls_from_emb", "cfg3b", 0, "test", vocab_reads="embedding")
    monkeypatch.setitem(variants.HEAD_CONFIGS, entry.name, entry)
    head = PromptHead(16, 384, 7, entry.name, hidden=8, dropout=0.0)
    assert head.vocab_head[-1].in_features == 384 and head.emb_head[-1].in_features == 8
    emb, logits = head.eval()(torch.randn(2, 16))
    torch.testing.assert_close(head.vocab_head(emb), logits)
    cyclic = HeadConfig("cyclic", "cyc", 0, "test", vocab_reads="embedding", probs_to_embedding=True)
    monkeypatch.setitem(variants.HEAD_CONFIGS, cyclic.name, cyclic)
    with pytest.raises(ValueError, match="cycle"):
        PromptHead(16, 384, 7, cyclic.name)
