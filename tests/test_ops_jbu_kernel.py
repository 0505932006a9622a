"""Tests of the JBU range x spatial kernel (upfeat.ops.jbu_kernel)."""
from __future__ import annotations

import pytest
import torch

from upfeat._checks import ShapeError
from upfeat.ops import can_run, jbu_kernel, jbu_kernel_reference, spatial_log_kernel

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


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,k", [((2, 8, 9, 13), 3), ((1, 3, 12, 40), 7), ((1, 4, 2, 3), 7)])
def test_distance_kernel_matches_literal_formulation(backend, dtype, shape, k):
    """range_kernel="distance": the local_dot trick equals exp(-t |g_p - g_q|²/2) x spatial."""
    g = torch.rand(*shape, dtype=dtype)
    for temp, sigma in [(1.0, 1.0), (50.0, 0.5), (0.1, 3.0)]:
        w = jbu_kernel(g, temp, sigma, k=k, backend=backend, range_kernel="distance")
        ref = jbu_kernel_reference(g, temp, sigma, k=k, range_kernel="distance")
        torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    # known answer at one pixel, written out by hand from the definition
    r, (i, j) = k // 2, (shape[2] // 2, shape[3] // 2)
    pad = torch.nn.functional.pad(g, [r] * 4, mode="reflect" if min(shape[2:]) > r else "replicate")
    win = pad[0, :, i:i + k, j:j + k]
    d2 = (torch.arange(k, dtype=dtype) - r) ** 2
    spatial = torch.exp(-(d2[:, None] + d2[None, :]) / r**2 / (2 * 0.5**2))
    expect = torch.exp(-50.0 * (win - g[0, :, i, j, None, None]).pow(2).sum(0) / 2) * spatial
    w = jbu_kernel(g, 50.0, 0.5, k=k, backend=backend, range_kernel="distance")
    torch.testing.assert_close(w[0, i, j], expect / expect.sum(), rtol=1e-5, atol=1e-6)


def test_distance_kernel_ignores_brightness_unlike_dot():
    """On a dark pixel next to a bright region, the dot kernel leaks toward the bright side (a
    larger |g_q| raises <g_p, g_q>); the distance kernel keeps the weight on the pixel's side."""
    g = torch.full((1, 3, 10, 10), 0.2)
    g[:, :, :, 5:] = 0.9
    wd = jbu_kernel(g, 30.0, 1.0, k=7, range_kernel="distance")
    wp = jbu_kernel(g, 30.0, 1.0, k=7, range_kernel="dot")
    assert wd[0, 5, 4, :, :4].sum() > 0.95 > wp[0, 5, 4, :, :4].sum()
    with pytest.raises(ValueError, match="range_kernel"):
        jbu_kernel(g, 1.0, 1.0, range_kernel="cosine")


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
    fnd = lambda a, t, s: jbu_kernel(a, t, s, k=3, backend=backend, range_kernel="distance")  # noqa: E731
    assert torch.autograd.gradcheck(fnd, (g, temp, sigma))


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


@pytest.mark.parametrize("backend", FAST)
def test_sharp_kernel_has_no_subnormal_taps(backend):
    """Under the shipped JBU's sharpness (distance kernel, temperature 400) colour differences
    make far taps underflow; they must be exact zeros, not subnormals (10x slower products on
    CPU), and the rows still sum to 1 and match the reference."""
    # A colour ramp, 0.2 per pixel in each channel: logits -400 * 3 * (0.2 dj)² / 2 = -24 dj², so
    # taps 2 columns away (about -96) fall in float32's subnormal range, 3 away underflow to 0.
    g = (0.2 * (torch.arange(16.0) - 7.5)).expand(1, 3, 16, 16).clone()
    g += 0.01 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    w = jbu_kernel(g, 400.0, 0.5, k=7, backend=backend, range_kernel="distance")
    tiny = torch.finfo(w.dtype).tiny
    assert not ((w > 0) & (w < tiny)).any()
    assert (w == 0).any()  # the ramp does cut taps off
    torch.testing.assert_close(w.sum((-1, -2)), torch.ones(1, 16, 16))
    ref = jbu_kernel_reference(g, 400.0, 0.5, k=7, range_kernel="distance")
    assert ((ref > 0) & (ref < tiny)).any()  # the plain formula does produce subnormals here
    # Against float64 (logits of ~1e3 carry ~1e-4 of float32 rounding into the weights).
    ref64 = jbu_kernel_reference(g.double(), 400.0, 0.5, k=7, range_kernel="distance").float()
    torch.testing.assert_close(w, ref64, rtol=1e-3, atol=1e-6)


def test_inference_softmax_matches_the_differentiable_path(real_image):
    """Without autograd the cpp backend normalises the logits in one fused pass
    (``tap_softmax_``); it gives the autograd path's weights on a real photo (sizes that leave
    partial 64-pixel tiles, batch 2, the shipped sharpness) and zeroes the same negligible taps."""
    img = torch.cat([real_image(37, 53), real_image(37, 53, "davis/images/cows/00000.jpg")])
    g = torch.cat([img, torch.nn.Conv2d(3, 5, 1)(img).detach() * 0.1], 1)
    with torch.no_grad():
        fused = jbu_kernel(g, 400.0, 0.5, k=7, range_kernel="distance")
    plain = jbu_kernel(g.requires_grad_(), 400.0, 0.5, k=7, range_kernel="distance").detach()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    assert ((fused == 0) == (plain == 0)).float().mean() > 0.999 and (fused == 0).any()
    tiny = torch.finfo(torch.float32).tiny
    assert not ((fused > 0) & (fused < tiny)).any()


@pytest.mark.skipif(not can_run("cpp", torch.device("cpu")), reason="no C++ kernel")
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_tap_softmax_op_against_torch(scale):
    """The raw op on random logits, mild and extreme (exp underflows for most taps)."""
    from upfeat.ops.adaptive_conv import cpu
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 49, 9, 15, generator=gen) * scale
    log_s = spatial_log_kernel(7, 0.7)
    want = torch.softmax(logits + log_s.view(1, -1, 1, 1), 1)
    want = want.masked_fill(want < 1e-19, 0.0)
    got = logits.clone()
    cpu.tap_softmax_(got, log_s, 1e-19)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-12)
