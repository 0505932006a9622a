"""upfeat.eval.linear: closed-form losses and gradients vs autograd, and L-BFGS convergence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upfeat.eval import linear
from upfeat.eval.linear import lbfgs_linear, loss_grad


def _autograd(x, y, w, b, kind):
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    z = x @ w.T + b
    if kind == "ce":
        loss = F.cross_entropy(z, y)
    elif kind == "bce":
        loss = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / len(y)  # sum over labels
    elif kind == "l2":
        loss = 0.5 * (z[:, 0] - y).square().mean()
    else:
        loss = F.huber_loss(z[:, 0], y, delta=linear.HUBER_DELTA) / linear.HUBER_DELTA
    loss.backward()
    return loss, w.grad, b.grad


@pytest.mark.parametrize("kind,k", [("ce", 4), ("bce", 3), ("l2", 1), ("l1", 1)])
def test_loss_grad_matches_autograd(kind, k, monkeypatch):
    monkeypatch.setattr(linear, "CHUNK", 7)  # several blocks, the last one partial
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    w = torch.randn(k, 5, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
    y = {"ce": torch.randint(0, k, (30,), generator=g),
         "bce": torch.randint(0, 2, (30, k), generator=g).double(),
         "l2": torch.randn(30, generator=g, dtype=torch.float64),
         "l1": torch.randn(30, generator=g, dtype=torch.float64) * 0.02}[kind]  # both Huber zones
    loss, gw, gb = loss_grad(x, y, w, b, kind)
    ref = _autograd(x, y, w, b, kind)
    for got, want in zip((loss, gw, gb), ref):
        torch.testing.assert_close(got.double(), want.double())


def test_lbfgs_recovers_a_linear_map():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=g)
    w_true, b_true = torch.randn(1, 6, generator=g), torch.tensor([0.3])
    w, b, info = lbfgs_linear(x, (x @ w_true.T + b_true)[:, 0], "l2", torch.zeros(1), 100, 0.0)
    torch.testing.assert_close(w, w_true, atol=1e-4, rtol=0)
    torch.testing.assert_close(b, b_true, atol=1e-4, rtol=0)
    assert info["loss"] < 1e-8 and 0 < info["iterations"] <= 100
