import math

import pytest
import torch

from revsd.losses import cosine_loss, revsd_loss


def test_cosine_loss_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    # cosines 1, 1/sqrt(2), -1  ->  1 - cos = 0, 1 - 0.7071, 2
    expected = (0 + (1 - 1 / math.sqrt(2)) + 2) / 3
    assert cosine_loss(pred, target).item() == pytest.approx(expected, abs=1e-6)


def test_revsd_loss_combines_cosine_and_bce():
    pred = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0]])  # cos 0 -> cosine part 1
    logits = torch.tensor([[0.0, 2.0]])
    labels = torch.tensor([[1.0, 0.0]])
    # BCE: -log(sigmoid(0)) = log 2 ; -log(1 - sigmoid(2)) = log(1 + e^2); mean over the two entries
    bce = (math.log(2) + math.log(1 + math.e ** 2)) / 2
    out = revsd_loss(pred, target, logits, labels, lam=0.5)
    assert out["cos"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["bce"].item() == pytest.approx(bce, abs=1e-5)
    assert out["loss"].item() == pytest.approx(1.0 + 0.5 * bce, abs=1e-5)


def test_plain_loss_ignores_vocabulary_when_lambda_zero():
    pred, target = torch.randn(4, 8), torch.randn(4, 8)
    logits, labels = torch.randn(4, 3), torch.ones(4, 3)
    out = revsd_loss(pred, target, logits, labels, lam=0.0)
    assert out["bce"].item() == 0.0
    assert out["loss"].item() == pytest.approx(cosine_loss(pred, target).item())


def test_bce_stable_for_extreme_logits():
    out = revsd_loss(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([[100.0, -100.0]]),
                     torch.tensor([[0.0, 1.0]]), lam=1.0)
    assert math.isfinite(out["loss"].item()) and out["bce"].item() == pytest.approx(100.0, rel=1e-4)
