"""Jitter views: alignment between images and features, inverses, reproducibility, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upfeat._checks import ShapeError
from upfeat.jitter import View, apply_view, invert_view, sample_views, view_mask, warp_thetas

TOL = dict(atol=1e-5, rtol=1e-5)


def _img(h=32, w=48, seed=0):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_identity_view_is_exact():
    x = _img()
    assert torch.equal(apply_view(x, View()), x)
    assert torch.equal(invert_view(x, View()), x)


def test_flip_matches_torch_flip_and_twice_is_identity():
    x = _img()
    v = View(flip=True)
    torch.testing.assert_close(apply_view(x, v), x.flip(-1), **TOL)
    torch.testing.assert_close(apply_view(apply_view(x, v), v), x, **TOL)


@pytest.mark.parametrize("top,left", [(0, 5), (-3, 2), (4, -7)])
def test_integer_shift_is_a_crop(top, left):
    x = _img()
    y = apply_view(x, View.from_pixels((32, 48), top=top, left=left), padding_mode="zeros")
    ref = torch.zeros_like(x)
    ys, xs = slice(max(top, 0), 32 + min(top, 0)), slice(max(left, 0), 48 + min(left, 0))
    yd, xd = slice(max(-top, 0), 32 - max(top, 0)), slice(max(-left, 0), 48 - max(left, 0))
    ref[..., yd, xd] = x[..., ys, xs]
    torch.testing.assert_close(y, ref, **TOL)


@pytest.mark.parametrize("view", [View(flip=True), View(zoom=1.7, offset=(0.1, 0.2)),
                                  View(zoom=1.3, flip=True, offset=(-0.05, 0.3))])
def test_pointwise_backbone_commutes_with_view(view):
    # A 1x1 conv whose weights sum to 1 per output is affine and preserves constants, so it
    # commutes with bilinear resampling: f(t(x)) == t(f(x)) for any zoom / crop / flip.
    conv = torch.nn.Conv2d(3, 5, 1)
    with torch.no_grad():
        wt = torch.rand(5, 3, 1, 1, generator=torch.Generator().manual_seed(1)) + 0.1
        conv.weight.copy_(wt / wt.sum(1, keepdim=True))
        conv.bias.fill_(0.3)
    x = _img()
    with torch.no_grad():
        torch.testing.assert_close(conv(apply_view(x, view)), apply_view(conv(x), view), **TOL)


@pytest.mark.parametrize("top,left,flip", [(8, 16, False), (-8, 8, True), (0, -16, True)])
def test_strided_backbone_commutes_with_stride_multiple_shift(top, left, flip):
    # Views are resolution independent: the same View moves the 8x-pooled map by top/8, left/8
    # cells. Reflection (symmetric) padding of pixels pools to reflection of cells, so the whole
    # map matches, borders included.
    x = _img(32, 48)
    v = View.from_pixels((32, 48), top=top, left=left, flip=flip)
    feats_of_view = F.avg_pool2d(apply_view(x, v), 8)
    view_of_feats = apply_view(F.avg_pool2d(x, 8), v)
    torch.testing.assert_close(feats_of_view, view_of_feats, **TOL)


def test_inverse_of_zoom_in_interior():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 56), indexing="ij")
    x = torch.stack([torch.sin(3 * xx + 2 * yy), torch.cos(2 * xx - yy), xx * yy])[None]
    v = View(zoom=1.6, flip=True, offset=(0.15, 0.2))
    back = invert_view(apply_view(x, v), v)
    m = view_mask(v, (40, 56))
    m[..., :, :2] = False  # stay one pixel away from the window's edge
    m = F.max_pool2d((~m).float(), 3, 1, 1) == 0
    assert m.sum() > 200
    err = (back - x).abs()[m.expand_as(x)]
    assert err.max() < 0.02


def test_invert_view_exact_for_shift_and_flip():
    x = _img()
    v = View.from_pixels((32, 48), top=3, left=-5, flip=True)
    back = invert_view(apply_view(x, v), v)
    m = view_mask(v, (32, 48)).expand_as(x)
    torch.testing.assert_close(back[m], x[m], **TOL)
    assert (back[~m] == 0).all()


def test_out_size_resamples_same_window():
    x = _img(32, 48)
    v = View(zoom=2.0, offset=(0.25, 0.25))
    small = apply_view(x, v, output_size=(16, 24))
    # The window is source pixels [8, 24) x [12, 36); at its native size it samples their centres.
    torch.testing.assert_close(small, x[..., 8:24, 12:36], **TOL)
    assert apply_view(x, v, output_size=(5, 7), mode="nearest").shape == (2, 3, 5, 7)


def test_sample_views_reproducible_and_in_range():
    a = sample_views(50, torch.Generator().manual_seed(3), (64, 80))
    b = sample_views(50, torch.Generator().manual_seed(3), (64, 80))
    c = sample_views(50, torch.Generator().manual_seed(4), (64, 80))
    assert a == b and a != c
    pad_h, pad_w = 20 / 64, 20 / 80
    for v in a:
        assert 1.0 <= v.zoom <= 2.0
        assert -pad_h - 1e-9 <= v.offset[0] <= 1 + pad_h - 1 / v.zoom + 1e-9
        assert -pad_w - 1e-9 <= v.offset[1] <= 1 + pad_w - 1 / v.zoom + 1e-9
        if v.zoom == 1.0:  # un-zoomed views are integer-pixel shifts
            assert abs(v.offset[0] * 64 - round(v.offset[0] * 64)) < 1e-9
    assert 10 < sum(v.flip for v in a) < 40 and 10 < sum(v.zoom > 1 for v in a) < 40
    never = sample_views(20, torch.Generator().manual_seed(0), (8, 8), zoom_prob=0, flip_prob=0,
                         max_pad=0)
    assert all(v.is_identity for v in never)


def test_shared_input_warp_matches_per_view_warp():
    # One input, n views: sampled on one stacked grid; must equal n independent grid_samples,
    # values and the input's gradient.
    x = _img(seed=3)[:1].requires_grad_(True)
    views = [View()] + sample_views(4, torch.Generator().manual_seed(1), (32, 48), max_pad=5)
    thetas = torch.stack([v.theta() for v in views])
    gy = torch.randn(5, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    out = warp_thetas(x, thetas)
    (g,) = torch.autograd.grad(out, x, gy)
    grid = F.affine_grid(thetas, [5, 1, 32, 48], align_corners=False)
    want = F.grid_sample(x.expand(5, -1, -1, -1), grid, padding_mode="reflection",
                         align_corners=False)
    (g_want,) = torch.autograd.grad(want, x, gy)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(g, g_want, **TOL)


def test_dtype_and_grad_pass_through():
    x = _img().double().requires_grad_()
    y = apply_view(x, View(zoom=1.5))
    assert y.dtype == torch.float64
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_errors_name_argument():
    with pytest.raises(ShapeError, match=r"x must have shape \(B, C, H, W\)"):
        apply_view(torch.zeros(3, 8, 8), View(zoom=2))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        apply_view(torch.zeros(1, 3, 8, 8, dtype=torch.long), View())
    with pytest.raises(TypeError, match="view must be an upfeat.jitter.View"):
        apply_view(torch.zeros(1, 3, 8, 8), {"zoom": 2})
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_view(torch.zeros(1, 3, 8, 8), View(zoom=2), mode="area")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        apply_view(torch.zeros(1, 3, 8, 8), View(zoom=2), padding_mode="reflect")
    with pytest.raises(ValueError, match="zoom must be a finite number > 0, got 0"):
        View(zoom=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_views(2, 0, (8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_zoom must be >= 1"):
        sample_views(2, torch.Generator(), (8, 8), max_zoom=0.5)
