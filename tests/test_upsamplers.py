"""Tests of upfeat.upsamplers: shapes, cell alignment, JBU vs a literal reference, gradients, errors."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from upfeat._checks import ShapeError
from upfeat.ops import jbu_kernel_reference, spatial_log_kernel
from upfeat import upsamplers
from upfeat.upsamplers import JBULayer, JBUStack, list_upsamplers

NAMES = list_upsamplers()
SIZES = [(224, 224), (224, 320), (230, 333)]


def _inputs(dim: int, stride: int, H: int, W: int, B: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, dim, math.ceil(H / stride), math.ceil(W / stride), generator=g)
    return feats, torch.rand(B, 3, H, W, generator=g)


def test_registry():
    assert {"nearest", "bilinear", "bicubic", "resize_conv", "jbu_stack"} <= set(NAMES)
    with pytest.raises(ValueError, match="jbu_stack"):
        upsamplers.create("jbu_stak", dim=8, stride=16)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stride", [8, 14, 16, 32])
def test_output_shapes(name, stride):
    up = upsamplers.create(name, dim=4, stride=stride).eval()
    for H, W in SIZES:
        feats, img = _inputs(4, stride, H, W)
        with torch.no_grad():
            out = up(feats, img)
            assert out.shape == (1, 4, H, W) and torch.isfinite(out).all()
    # Another output size (fractional crop), batch of 2, on a small non-divisible image.
    feats, img = _inputs(4, stride, 70, 101, B=2)
    with torch.no_grad():
        assert up(feats, img, output_size=(36, 149)).shape == (2, 4, 36, 149)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    up = upsamplers.create(name, dim=6, stride=14)
    cfg = json.loads(json.dumps(up.config()))
    clone = upsamplers.create(**cfg)
    clone.load_state_dict(up.state_dict(), strict=True)
    feats, img = _inputs(6, 14, 60, 45)
    torch.testing.assert_close(clone.eval()(feats, img), up.eval()(feats, img))


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_interpolation_baselines_match_f_interpolate(mode):
    feats, img = _inputs(5, 16, 224, 320)
    kw = {} if mode == "nearest" else {"align_corners": False}
    out = upsamplers.create(mode, dim=5, stride=16)(feats, img)
    assert torch.equal(out, F.interpolate(feats, (224, 320), mode=mode, **kw))


def test_nearest_cell_alignment_non_divisible():
    """A per-cell indicator lands exactly on pixels [i*s, (i+1)*s) x [j*s, (j+1)*s), cropped."""
    s, H, W = 14, 230, 333
    h, w = math.ceil(H / s), math.ceil(W / s)
    feats = torch.eye(h * w).view(h * w, h, w)[None]  # channel c = indicator of cell c
    out = upsamplers.create("nearest", dim=h * w, stride=s)(feats, torch.rand(1, 3, H, W))
    ys, xs = torch.arange(H) // s, torch.arange(W) // s
    assert torch.equal(out[0].argmax(0), ys[:, None] * w + xs[None, :])
    assert torch.equal(out.sum(1), torch.ones(1, H, W))


def test_bilinear_alignment_non_divisible():
    """Bilinear on a non-divisible size = bilinear to the padded extent, then crop (no stretch)."""
    feats, img = _inputs(3, 16, 230, 333)
    padded = F.interpolate(feats, (240, 336), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsamplers.create("bilinear", 3, 16)(feats, img), padded[..., :230, :333])


def _jbu_reference(layer: JBULayer, feats: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """Literal FeatUp JBU step: unfold, softmax range x spatial kernel renormalised, fixup, einsum."""
    r, k = layer.radius, layer.k
    B, C, h, w = feats.shape
    H, W = 2 * h, 2 * w
    guidance = F.adaptive_avg_pool2d(guidance, (H, W))
    up = F.pad(F.interpolate(feats, (H, W), mode="bicubic", align_corners=False), [r] * 4, mode="reflect")
    q = layer.range_proj(guidance)
    if layer.range_kernel == "distance":  # the colour itself plus learned range features
        q = torch.cat([guidance, q], 1)
    keys = F.unfold(F.pad(q, [r] * 4, mode="reflect"), k).view(B, q.shape[1], k * k, H, W)
    if layer.range_kernel == "distance":
        logits = -0.5 * (keys - q[:, :, None]).pow(2).sum(1)
    else:
        logits = torch.einsum("bdphw,bdhw->bphw", keys, q)
    rng = torch.softmax(layer.temperature() * logits, dim=1)
    spatial = spatial_log_kernel(k, layer.sigma()).exp().view(1, k * k, 1, 1)
    kern = rng * spatial
    kern = kern / kern.sum(1, keepdim=True).clamp_min(1e-7)
    if layer.kernel_fixup is not None:
        fix = layer.kernel_fixup(torch.cat([kern, guidance], 1))
        kern = kern + 0.1 * (fix - fix.mean(1, keepdim=True) if layer.fixup_mode == "zero_sum" else fix)
    patches = F.unfold(up, k).view(B, C, k * k, H, W)
    return torch.einsum("bcphw,bphw->bchw", patches, kern)


@pytest.mark.parametrize("fixup,range_kernel", [("zero_sum", "dot"), ("featup", "dot"),
                                                ("none", "dot"), ("zero_sum", "distance")])
def test_jbu_layer_matches_reference(fixup, range_kernel):
    torch.manual_seed(0)
    layer = JBULayer(16, kernel_fixup=fixup, range_kernel=range_kernel).eval()
    with torch.no_grad():
        if range_kernel == "distance":  # trained-like state: non-zero learned range features;
            layer.range_proj[-1].weight.normal_()  # float64: |g|² - 2<g,g'> cancels in float32
            layer.double()
        layer.range_temp.fill_(0.7)
        layer.sigma_spatial.fill_(0.8)
        dt = layer.range_temp.dtype
        feats, img = torch.randn(2, 16, 9, 13, dtype=dt), torch.rand(2, 3, 36, 52, dtype=dt)
        torch.testing.assert_close(layer(feats, img), _jbu_reference(layer, feats, img), rtol=1e-5, atol=1e-5)


def test_distance_jbu_starts_as_colour_bilateral_filter():
    """Known answer: with the learned range features at zero, a distance-kernel layer is the
    classic bilateral filter exp(-t|c_p - c_q|²/2) x spatial Gaussian over the RGB guidance; at
    init (features x0.1) it is close to it."""
    torch.manual_seed(0)
    layer = JBULayer(4, range_kernel="distance", temperature=100.0, sigma=0.5,
                     kernel_fixup="none").eval()
    img = torch.rand(1, 3, 10, 12)
    expect = jbu_kernel_reference(img, 100.0, 0.5, k=7, range_kernel="distance")
    assert (layer.kernel(img) - expect).abs().max() < 0.05
    with torch.no_grad():
        layer.range_proj[-1].weight.zero_()
    torch.testing.assert_close(layer.kernel(img), expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="range_kernel"):
        JBULayer(4, range_kernel="gaussian")


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    init = upsamplers.create("jbu_stack", 8, 14)
    feats, img = _inputs(8, 14, 50, 61)
    init.train()(feats, img).square().mean().backward()
    for layer in init.layers:  # zero-initialised learned range features must get a gradient
        assert layer.range_proj[-1].weight.grad.abs().sum() > 0
    trained = upsamplers.create("jbu_stack", 8, 14)
    with torch.no_grad():  # as after a first step: the range MLP's first layer is reached too
        for layer in trained.layers:
            layer.range_proj[-1].weight.normal_(std=0.1)
    for up in (trained,
               upsamplers.create("jbu_stack", 8, 16, kernel_fixup="featup", range_kernel="dot"),
               upsamplers.create("resize_conv", 8, 14)):
        feats, img = _inputs(8, up.stride, 50, 61)
        feats.requires_grad_(True)
        up.train()(feats, img).square().mean().backward()
        for name, p in list(up.named_parameters()) + [("feats", feats)]:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_constant_features_stay_constant():
    """Known answer: every JBU step is a normalised per-pixel average, so constants pass through."""
    torch.manual_seed(0)
    up = JBUStack(6, 14).eval()
    c = torch.randn(1, 6, 1, 1)
    out = up(c.expand(1, 6, 17, 24).contiguous(), torch.rand(1, 3, 230, 333))
    expected = c + 0.1 * up.residual(c)
    torch.testing.assert_close(out, expected.expand_as(out), rtol=1e-5, atol=1e-5)


def test_early_residual_equals_featup_late_residual():
    """The residual runs at low res; it must equal FeatUp's order (residual after the last step)."""
    torch.manual_seed(0)
    up = JBUStack(6, 16).eval()
    feats, img = _inputs(6, 16, 70, 90)
    x, (h, w) = feats, feats.shape[-2:]
    pad = F.pad(img, (0, 96 - 90, 0, 80 - 70), mode="replicate")
    for i, layer in enumerate(up.layers):
        x = layer(x, pad, (h * 2 ** (i + 1), w * 2 ** (i + 1)))
    x = x[..., :70, :90]
    torch.testing.assert_close(up(feats, img), x + 0.1 * up.residual(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixup,residual,last_step", [
    ("zero_sum", True, "jbu"), ("featup", True, "jbu"), ("zero_sum", False, "jbu"),
    ("featup", False, "jbu"), ("zero_sum", True, "resize")])
def test_mix_commutes_with_the_stack(fixup, residual, last_step):
    """forward(mix=M) == M(forward): training projects before upsampling (C/30 times cheaper)."""
    torch.manual_seed(0)
    up = JBUStack(6, 14, kernel_fixup=fixup, residual=residual, last_step=last_step).double().eval()
    feats, img = _inputs(6, 14, 60, 75)
    feats, img = feats.double(), img.double()
    m = torch.randn(6, 2, dtype=torch.float64)
    mix = lambda x: torch.einsum("bchw,cd->bdhw", x, m)  # noqa: E731
    assert up.channel_separable == (fixup != "featup" or not residual)
    torch.testing.assert_close(up(feats, img, mix=mix), mix(up(feats, img)))


def test_resize_conv_starts_as_bilinear():
    feats, img = _inputs(5, 14, 100, 130)
    torch.testing.assert_close(upsamplers.create("resize_conv", 5, 14)(feats, img),
                               upsamplers.create("bilinear", 5, 14)(feats, img))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    up = upsamplers.create(name, dim=4, stride=16)
    feats, img = _inputs(4, 16, 64, 80)
    with pytest.raises(ShapeError, match="feats"):
        up(feats[0], img)
    with pytest.raises(ShapeError, match="dim=4"):
        up(torch.randn(1, 5, 4, 5), img)
    with pytest.raises(ShapeError, match="3 channels"):
        up(feats, torch.rand(1, 4, 64, 80))
    with pytest.raises(ShapeError, match="ceil"):
        up(feats, torch.rand(1, 3, 32, 80))  # image too small for a 4x5 grid at stride 16
    with pytest.raises(ShapeError, match="batch"):
        up(feats, torch.rand(2, 3, 64, 80))
    with pytest.raises(ValueError, match="output_size"):
        up(feats, img, output_size=(0, 10))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        up(feats, img * 255)


def test_jbu_layer_bad_inputs():
    layer = JBULayer(4)
    with pytest.raises(ShapeError, match="guidance"):
        layer(torch.randn(1, 4, 5, 5), torch.rand(1, 4, 10, 10))
    with pytest.raises(ShapeError, match="feats"):
        layer(torch.randn(4, 5, 5), torch.rand(1, 3, 10, 10))
    with pytest.raises(ValueError, match="kernel_fixup"):
        JBULayer(4, kernel_fixup="bogus")


def test_jbu_stack_size_and_speed():
    """~0.2 M parameters for dim 384 (FeatUp: 4 layers + a 384x384 1x1 conv); timing printed."""
    counts = {s: sum(p.numel() for p in JBUStack(384, s).parameters()) for s in (8, 14, 16, 32)}
    print(f"\nJBUStack(384, stride) parameters: {counts}")
    assert 150_000 < counts[16] < 250_000
    up = JBUStack(384, 14)
    feats, img = _inputs(384, 14, 224, 224)
    feats.requires_grad_(True)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        up(feats, img).square().mean().backward()
        times.append(time.perf_counter() - t)
    print(f"JBUStack(384, 14) forward+backward at 224x224: {min(times):.2f} s (best of 2)")


def test_agnostic_stack_serves_any_dim_and_stride():
    """residual=False: no parameter depends on dim or stride; a stride needing n steps runs the
    last n layers, so one state dict gives exactly what a stack of those layers gives."""
    torch.manual_seed(0)
    up = JBUStack(7, 32, residual=False, steps=5, range_dim=4).eval()
    assert up.agnostic and not JBUStack(7, 32).agnostic
    assert {k: v.shape for k, v in up.state_dict().items()} == {
        k: v.shape for k, v in JBUStack(300, 8, residual=False, steps=5, range_dim=4).state_dict().items()}
    vit = up.for_backbone(384, 14)  # 4 steps: layers 1..4
    four = JBUStack(384, 14, residual=False, range_dim=4).eval()
    four.load_state_dict({k.replace(f"layers.{i}.", f"layers.{i - 1}."): v
                          for k, v in up.state_dict().items()
                          for i in [int(k.split(".")[1])] if i > 0})
    feats, img = _inputs(384, 14, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(vit(feats, img), four(feats, img), rtol=0, atol=0)
        c = torch.randn(1, 5, 1, 1)  # constants pass through (no residual)
        out = up.for_backbone(5, 8)(c.expand(1, 5, 9, 12).contiguous(), img)
        torch.testing.assert_close(out, c.expand_as(out), rtol=1e-5, atol=1e-5)
    shared = up.for_backbone(16, 16, share=True)
    assert shared.layers[0].range_temp is up.layers[0].range_temp
    assert vit.layers[0].range_temp is not up.layers[1].range_temp  # a copy by default
    with pytest.raises(ValueError, match="stride 64 needs 6 steps"):
        up.for_backbone(4, 64)
    with pytest.raises(ValueError, match="residual=False"):
        JBUStack(4, 16).for_backbone(8, 16)
    with pytest.raises(ValueError, match="steps must be"):
        JBUStack(4, 32, steps=3)


def test_inference_paths_equal_the_autograd_path(real_image):
    """Without autograd a JBU layer takes in-place / fused paths (the fixup on its fresh taps,
    the one-pass softmax): same output as with autograd, on a real photo at the shipped
    sharpness, batch 2."""
    torch.manual_seed(0)
    layer = JBULayer(8, range_kernel="distance", temperature=400.0, sigma=0.5).eval()
    img = torch.cat([real_image(40, 56), real_image(40, 56, "davis/images/cows/00000.jpg")])
    feats = torch.nn.functional.avg_pool2d(img.repeat(1, 3, 1, 1)[:, :8], 4)
    with_grad = layer(feats, img)
    assert with_grad.requires_grad
    with torch.inference_mode():
        fast = layer(feats, img)
    torch.testing.assert_close(fast, with_grad.detach(), rtol=1e-5, atol=1e-6)
