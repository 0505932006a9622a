"""Tests of the JBU range x spatial kernel (upfeat.ops.jbu_kernel)."""
from __future__ import annotations

import pytest
import torch

from upfeat._checks import ShapeError
from upfeat.ops import jbu_kernel, jbu_kernel_reference, spatial_log_kernel

from ._utils import MaxNumel as _MaxNumel
from .test_ops_adaptive_conv import FAST


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,k", [((2, 8, 9, 13), 3), ((1, 32, 12, 40), 7), ((2, 5, 6, 7), 5), ((1, 4, 2, 3), 7)])
def test_matches_featup_formulation(backend, dtype, shape, k):
    g = torch.randn(*shape, dtype=dtype)
    for temp, sigma in [(1.0, 1.0), (4.0, 0.5), (0.1, 3.0)]:
        w = jbu_kernel(g, temp, sigma, k=k, backend=backend)
        ref = jbu_kernel_reference(g, temp, sigma, k=k)
        assert w.shape == (shape[0], shape[2], shape[3], k, k)
        torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.sum((-1, -2)), torch.ones(w.shape[:3], dtype=dtype))
        assert (w >= 0).all()


def test_constant_guidance_gives_the_spatial_gaussian():
    """Known answer: with flat guidance the range kernel is uniform, so w = normalised Gaussian."""
    w = jbu_kernel(torch.ones(1, 3, 8, 8), 2.0, 0.7, k=5)
    d = torch.arange(5.0) - 2
    gauss = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / 4 / (2 * 0.7**2))
    torch.testing.assert_close(w[0, 4, 4], gauss / gauss.sum())
    torch.testing.assert_close(spatial_log_kernel(5, 0.7).exp().view(5, 5), gauss)


def test_edge_stops_the_kernel():
    """A step edge in the guidance moves the weight to the pixel's own side (the point of a JBU)."""
    g = torch.zeros(1, 2, 10, 10)
    g[:, 0, :, :5] = 1.0  # left half: guidance vector (1, 0); right half: (0, 1)
    g[:, 1, :, 5:] = 1.0
    w = jbu_kernel(g, 5.0, 1.0, k=7)
    # pixel (5, 4) is dark, just left of the edge: taps with v > 3 land on the bright side
    left, right = w[0, 5, 4, :, :4].sum(), w[0, 5, 4, :, 4:].sum()
    assert left > 0.98 and right < 0.02


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck(backend):
    g = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    fn = lambda a, t, s: jbu_kernel(a, t, s, k=3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (g, temp, sigma))
    g2 = torch.randn(1, 4, 4, 37, dtype=torch.float64, requires_grad=True)
    fn7 = lambda a, t, s: jbu_kernel(a, t, s, k=7, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn7, (g2, temp, sigma), fast_mode=True)


def test_never_materialises_guidance_times_taps():
    B, D, H, W, k = 1, 32, 24, 40, 7
    g = torch.randn(B, D, H, W, requires_grad=True)
    with _MaxNumel() as m:
        jbu_kernel(g, 2.0, 1.0, k=k, backend="cpp").sum().backward()
    assert m.max <= max(B * k * k * H * W, B * D * (H + k - 1) * (W + k - 1)), m.max


def test_errors():
    with pytest.raises(ShapeError, match="odd"):
        jbu_kernel(torch.randn(1, 3, 8, 8), 1.0, 1.0, k=4)
    with pytest.raises(ShapeError, match=r"guidance must have shape \(B, D, H, W\)"):
        jbu_kernel(torch.randn(3, 8, 8), 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma must be one positive number, got 0.0"):
        jbu_kernel(torch.randn(1, 3, 8, 8), 1.0, 0.0)
    with pytest.raises(ValueError, match="temperature must be one finite number"):
        jbu_kernel(torch.randn(1, 3, 8, 8), float("inf"), 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        jbu_kernel(torch.ones(1, 3, 8, 8, dtype=torch.uint8), 1.0, 1.0)
