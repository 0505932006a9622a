"""Tests of the pixel-to-cell ops (upfeat.ops.cell_conv): equivalence to the literal formulation,
gradcheck, and known answers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upfeat._checks import ShapeError
from upfeat.ops.cell_conv import (cell_conv, cell_conv_reference, cell_dot, cell_kernel,
                                  cell_offsets, cell_valid)

from .test_ops_adaptive_conv import FAST

CASES = [((2, 3, 4, 5), 3, 3), ((1, 5, 3, 2), 14, 3), ((1, 2, 2, 3), 4, 5), ((2, 1, 1, 1), 2, 3)]


def _dot_reference(query, keys, k):
    """Literal: gather each tap's cell for every pixel."""
    B, D, H, W = query.shape
    h, w = keys.shape[-2:]
    s, r = H // h, k // 2
    cols = F.unfold(F.pad(keys, [r] * 4), k).view(B, D, k * k, h, w)
    cols = cols.repeat_interleave(s, 3).repeat_interleave(s, 4)
    return torch.einsum("bdthw,bdhw->bhwt", cols, query).reshape(B, H, W, k, k)


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("shape,s,k", CASES)
def test_cell_conv_and_dot_match_literal(backend, shape, s, k):
    B, C, h, w = shape
    f = torch.randn(B, C, h, w, dtype=torch.float64)
    wts = torch.randn(B, s * h, s * w, k, k, dtype=torch.float64)
    torch.testing.assert_close(cell_conv(f, wts, backend=backend), cell_conv_reference(f, wts))
    q = torch.randn(B, C, s * h, s * w, dtype=torch.float64)
    torch.testing.assert_close(cell_dot(q, f, k=k, backend=backend), _dot_reference(q, f, k))


def test_cell_conv_by_hand():
    """Pixel (y, x) = (4, 1) at stride 3 lies in cell (1, 0); tap (0, 2) is cell (0, 1)."""
    f = torch.arange(6.).view(1, 1, 2, 3)
    w = torch.zeros(1, 6, 9, 3, 3)
    w[0, 4, 1, 0, 2] = 2.0
    w[0, 4, 1, 1, 1] = 0.5  # own cell (1, 0) = 3
    w[0, 4, 1, 0, 0] = 7.0  # cell (0, -1): outside, reads zero
    out = cell_conv(f, w)
    assert out[0, 0, 4, 1] == 2.0 * 1 + 0.5 * 3
    assert out.abs().sum() == out[0, 0, 4, 1].abs()


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck(backend):
    f = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 6, 9, 3, 3, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 2, 6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cell_conv(a, b, backend=backend), (f, w))
    assert torch.autograd.gradcheck(lambda a, b: cell_dot(a, b, k=3, backend=backend), (q, f))
    t = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: cell_kernel(a, b, c, 0.7, backend=backend), (q, f, t))


def test_cell_kernel_matches_definition():
    torch.manual_seed(0)
    B, D, h, w, s, k = 2, 4, 3, 4, 5, 3
    q, keys = torch.rand(B, D, s * h, s * w, dtype=torch.float64), torch.rand(B, D, h, w, dtype=torch.float64)
    t, sigma = 20.0, 0.8
    wts = cell_kernel(q, keys, t, sigma, k=k)
    torch.testing.assert_close(wts.sum((-1, -2)), torch.ones(B, s * h, s * w, dtype=torch.float64))
    for (b, y, x) in [(0, 0, 0), (1, 7, 12), (1, s * h - 1, s * w - 1)]:
        expect = torch.zeros(k, k, dtype=torch.float64)
        for u in range(k):
            for v in range(k):
                cy, cx = y // s + u - 1, x // s + v - 1
                if 0 <= cy < h and 0 <= cx < w:
                    dy, dx = cy + 0.5 - (y + 0.5) / s, cx + 0.5 - (x + 0.5) / s
                    d2 = (q[b, :, y, x] - keys[b, :, cy, cx]).pow(2).sum()
                    expect[u, v] = torch.exp(-t * d2 / 2 - (dy**2 + dx**2) / (2 * sigma**2))
        torch.testing.assert_close(wts[b, y, x], expect / expect.sum())
    # per-pixel temperature equals the scalar one when constant
    tmap = torch.full((B, 1, s * h, s * w), t, dtype=torch.float64)
    torch.testing.assert_close(cell_kernel(q, keys, tmap, sigma, k=k), wts)


def test_offsets_and_valid():
    off = cell_offsets(4, 3)
    assert off.shape == (4, 4, 3, 3, 2)
    assert torch.allclose(off[0, 3, 1, 1], torch.tensor([0.375, -0.375]))
    v = cell_valid(2, 3, 2, 3)
    assert v.shape == (4, 6, 3, 3) and v[0, 0].sum() == 4 and v[2, 2].sum() == 6


def test_bad_shapes():
    with pytest.raises(ShapeError, match="integer stride"):
        cell_conv(torch.zeros(1, 2, 3, 3), torch.zeros(1, 7, 9, 3, 3))
    with pytest.raises(ShapeError, match="k odd"):
        cell_conv(torch.zeros(1, 2, 3, 3), torch.zeros(1, 6, 6, 2, 2))
    with pytest.raises(ShapeError, match="share B and D"):
        cell_dot(torch.zeros(1, 2, 6, 6), torch.zeros(1, 3, 3, 3))
