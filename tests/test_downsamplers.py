"""Downsamplers: cell alignment, known answers, normalisation, gradients, registry, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ._utils import MaxNumel as _MaxNumel

from upfeat._checks import ShapeError
from upfeat import downsamplers
from upfeat.downsamplers import (AttentionDownsampler, SimpleDownsampler, attention_downsample,
                                 cell_pad, list_downsamplers)

STRIDES = [8, 14, 16, 32]
TOL = dict(atol=1e-5, rtol=1e-5)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise(module, seed=0):
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return module


def _both(dim, stride, k=None):
    return [_randomise(SimpleDownsampler(stride, k)), _randomise(AttentionDownsampler(dim, stride, k))]


def _reference(hr, weights, s):
    """Oracle: unfold every window (builds the big tensor, fine at test sizes)."""
    b, c = hr.shape[:2]
    k, h, w = weights.shape[1], weights.shape[3], weights.shape[4]
    win = F.unfold(cell_pad(hr, s, k), k, stride=s).view(b, c, k * k, h, w)
    return torch.einsum("bcphw,bphw->bchw", win, weights.reshape(b, k * k, h, w))


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("k_rel", [None, -3, 5, "2s"])
def test_constant_map_is_preserved(stride, k_rel):
    k = None if k_rel is None else (2 * stride if k_rel == "2s" else stride + k_rel)
    hr = torch.full((2, 3, 2 * stride + 5, 3 * stride - 1), -2.5)  # non-divisible H and W
    for ds in _both(3, stride, k):
        out = ds(hr)
        assert out.shape == (2, 3, 3, 3)
        torch.testing.assert_close(out, torch.full_like(out, -2.5), **TOL)


@pytest.mark.parametrize("stride", STRIDES)
def test_output_shapes_non_square(stride):
    hr = torch.rand(1, 4, 3 * stride, 2 * stride + 1, generator=_gen())
    for ds in _both(4, stride):
        assert ds(hr).shape == (1, 4, 3, 3)
        assert ds(hr, output_size=(3, 3)).shape == (1, 4, 3, 3)
        assert ds.output_size(3 * stride, 2 * stride + 1) == (3, 3)


@pytest.mark.parametrize("stride", STRIDES)
def test_init_equals_avg_pool(stride):
    hr = torch.rand(2, 5, 2 * stride, 3 * stride, generator=_gen())
    torch.testing.assert_close(SimpleDownsampler(stride)(hr), F.avg_pool2d(hr, stride), **TOL)
    att = AttentionDownsampler(5, stride)
    with torch.no_grad():
        att.saliency.weight.zero_()  # no saliency: softmax(b = 0) is the box filter
    torch.testing.assert_close(att(hr), F.avg_pool2d(hr, stride), **TOL)


def test_non_divisible_matches_backbone_padding_policy():
    # The backbone pads bottom/right by replication; the box downsampler must see the same cells.
    hr = torch.rand(1, 3, 37, 50, generator=_gen())
    ref = F.avg_pool2d(F.pad(hr, (0, 64 - 50, 0, 48 - 37), mode="replicate"), 16)
    torch.testing.assert_close(SimpleDownsampler(16)(hr), ref, **TOL)


@pytest.mark.parametrize("stride,k", [(8, 8), (8, 12), (14, 20), (16, 32)])
def test_window_is_centred_on_cell(stride, k):
    # A symmetric kernel centred on cell i averages the pixel-centre ramp u + 0.5 to the cell
    # centre i*s + s/2 (interior cells, where the window does not touch the border).
    n = 6
    ramp = (torch.arange(n * stride) + 0.5).view(1, 1, 1, -1).expand(1, 2, n * stride, -1)
    centres = torch.arange(n) * stride + stride / 2
    inner = slice(1, n - 1)
    for ds in (SimpleDownsampler(stride, k), AttentionDownsampler(2, stride, k)):
        if isinstance(ds, AttentionDownsampler):
            with torch.no_grad():
                ds.saliency.weight.zero_()
        out = ds(ramp.contiguous())[0, 0, 0]
        torch.testing.assert_close(out[inner], centres[inner].float(), **TOL)


@pytest.mark.parametrize("stride,k", [(8, 8), (8, 5), (14, 17), (16, 32), (4, 11)])
def test_attention_matches_unfold_reference(stride, k):
    ds = _randomise(AttentionDownsampler(3, stride, k), seed=1)
    hr = torch.randn(2, 3, 3 * stride + 2, 2 * stride, generator=_gen(2))
    torch.testing.assert_close(ds(hr), _reference(hr, ds.weights(hr), stride), **TOL)


def test_kernels_non_negative_and_normalised():
    simple = _randomise(SimpleDownsampler(14, 9))
    att = _randomise(AttentionDownsampler(4, 14, 9))
    for ker in (simple.kernel, simple.spatial_kernel(), att.spatial_kernel()):
        assert ker.shape == (9, 9) and (ker >= 0).all()
        torch.testing.assert_close(ker.sum(), torch.tensor(1.0))
    wts = att.weights(torch.randn(2, 4, 30, 45, generator=_gen()))
    assert wts.shape == (2, 9, 9, 3, 4) and (wts >= 0).all()
    torch.testing.assert_close(wts.sum((1, 2)), torch.ones(2, 3, 4))


@pytest.mark.parametrize("name", ["simple", "attention"])
def test_gradients_reach_every_parameter_and_input(name):
    ds = downsamplers.create(name, dim=6, stride=8)
    hr = torch.randn(2, 6, 24, 20, generator=_gen(), requires_grad=True)
    (ds(hr) * torch.randn(2, 6, 3, 3, generator=_gen(1))).sum().backward()
    assert hr.grad is not None and hr.grad.abs().sum() > 0
    for pname, p in ds.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_attention_gradcheck_float64():
    ds = _randomise(AttentionDownsampler(2, 3, 4)).double()
    hr = torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=_gen(), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ds(x), (hr,))
    wts = ds.weights(hr).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: attention_downsample(x, w, 3), (hr, wts))


def test_stride32_wide_features_runs():
    ds = AttentionDownsampler(384, 32)
    out = ds(torch.randn(1, 384, 224, 224, generator=_gen()))
    assert out.shape == (1, 384, 7, 7) and torch.isfinite(out).all()




@pytest.mark.parametrize("cls", [SimpleDownsampler, AttentionDownsampler])
def test_never_materialises_unfolded_features(cls):
    # k = 2s: unfolding the features would make a (B, C, k*k, h, w) tensor 4x the input.
    ds = cls(16, 32) if cls is SimpleDownsampler else cls(8, 16, 32)
    hr = torch.randn(1, 8, 96, 128, generator=_gen(), requires_grad=True)
    with _MaxNumel() as m:
        ds(hr).sum().backward()
    assert m.max < 1.5 * hr.numel(), m.max  # padded copy of hr at most
    with _MaxNumel() as m_ref:  # the probe works: the unfold oracle does build it
        _reference(hr, torch.ones(1, 32, 32, 6, 8), 16)
    assert m_ref.max >= 3.5 * hr.numel()


def test_registry():
    assert {"simple", "attention"} <= set(list_downsamplers())
    assert isinstance(downsamplers.create("simple", 8, 16, kernel_size=20), SimpleDownsampler)
    ds = downsamplers.create("attention", 8, 14)
    assert isinstance(ds, AttentionDownsampler) and ds.kernel_size == 14
    with pytest.raises(ValueError, match=r"unknown downsampler 'atention'.*Did you mean: attention"):
        downsamplers.create("atention", 8, 16)


def test_errors_name_argument():
    with pytest.raises(ShapeError, match=r"hr must have shape \(B, C, H, W\)"):
        SimpleDownsampler(8)(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="hr must be a floating-point"):
        SimpleDownsampler(8)(torch.zeros(1, 3, 16, 16, dtype=torch.int32))
    with pytest.raises(ShapeError, match=r"hr must have 4 channels \(B, 4, H, W\), got shape"):
        AttentionDownsampler(4, 8)(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ShapeError, match=r"output_size=\(2, 2\) does not match .* gives \(3, 2\)"):
        SimpleDownsampler(8)(torch.zeros(1, 3, 17, 16), output_size=(2, 2))
    with pytest.raises(ValueError, match="stride must be an int >= 1, got 0"):
        SimpleDownsampler(0)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        AttentionDownsampler(4, 8, kernel_size=0)
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        AttentionDownsampler(0, 8)
    assert math.isfinite(float(SimpleDownsampler(8)(torch.zeros(1, 1, 1, 1)).sum().detach()))
