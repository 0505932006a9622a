"""upsample_anything: the kernel against its literal definition, the per-image fit on a real photo,
edge sharpness on a synthetic image, shapes, inference mode, config, create_model / CLI / eval."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import upfeat
from upfeat.ops.cell_conv import cell_conv
from upfeat import upsamplers
from upfeat.upsamplers import PARAMETER_FREE, UpsampleAnything
from upfeat.upsamplers.upsample_anything import (downsample_image, fit_params, init_params,
                                                 mix_cells, ua_kernel, ua_kernel_reference)

from ._utils import skip_without_focus


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).pow(2).mean()))


@pytest.mark.parametrize("h,w,s,k", [(3, 4, 5, 3), (4, 3, 14, 5), (2, 5, 4, 7)])
def test_kernel_matches_literal_definition(h, w, s, k):
    """One cell_dot of the expanded quadratics == rotate, scale, per-tap colour distance."""
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(2, 3, h * s, w * s, dtype=torch.float64, generator=gen)
    g_lr = downsample_image(g, (h, w))
    scale = torch.tensor([3.0, 4.0, 1.0, 0.05], dtype=torch.float64).view(1, 4, 1, 1)
    p = init_params(g_lr, 1.3 * s, 0.2) + scale * torch.randn(2, 4, h, w, dtype=torch.float64, generator=gen)
    wts = ua_kernel(p, g, g_lr, k)
    torch.testing.assert_close(wts, ua_kernel_reference(p, g, g_lr, k))
    torch.testing.assert_close(wts.sum((-1, -2)), torch.ones(2, h * s, w * s, dtype=torch.float64))
    assert wts[:, 0, 0, : k // 2].abs().max() == 0  # taps above the map: weight 0
    feats = torch.randn(2, 6, h, w, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(mix_cells(feats, wts), cell_conv(feats, wts))


def test_rotation_turns_the_spatial_kernel():
    """An elongated Gaussian (σx >> σy) at θ = 0 spreads along x; at θ = π/2 along y."""
    s, k = 4, 5
    g = torch.zeros(1, 3, 5 * s, 5 * s)  # flat image: the range term is constant
    g_lr = downsample_image(g, (5, 5))
    p = init_params(g_lr, 1.0, 1.0)
    p[:, 0], p[:, 1] = 8.0, 1.0
    w0 = ua_kernel(p, g, g_lr, k)[0, 10, 10]  # centre pixel's taps (5 x 5 cells)
    p[:, 2] = torch.pi / 2
    w90 = ua_kernel(p, g, g_lr, k)[0, 10, 10]
    assert w0[2].sum() > 0.9 and w0[:, 2].sum() < 0.6  # the centre row of cells takes it
    torch.testing.assert_close(w90, w0.T, atol=1e-5, rtol=0)


def test_fit_lowers_the_reconstruction_error_on_a_photo(data_dir):
    img = Image.open(data_dir / "samples/featup/skate.jpg").convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    hist: list[float] = []
    params, x_lr = fit_params(x, (16, 16), history=hist)  # paper settings: 50 steps, lr 1e-3
    assert len(hist) == 51 and hist[-1] < 0.9 * hist[0]
    fit = _psnr(mix_cells(x_lr, ua_kernel(params, x, x_lr)), x)
    init = _psnr(mix_cells(x_lr, ua_kernel(init_params(x_lr, 16.0, 0.12), x, x_lr)), x)
    bilinear = _psnr(F.interpolate(x_lr, size=(224, 224), mode="bilinear", align_corners=False), x)
    assert fit > init + 0.5 and fit > bilinear + 5.0, (fit, init, bilinear)


def test_sharper_than_bilinear_at_an_edge():
    """Two regions (colour and one-hot feature) split by a slanted edge through the cells: near
    the edge the upsampled features are closer to the true high-res ones than bilinear's."""
    s, h, w = 8, 8, 10
    yy, xx = torch.meshgrid(torch.arange(s * h) + 0.5, torch.arange(s * w) + 0.5, indexing="ij")
    right = (xx > 33 + 0.3 * yy).float()  # crosses cell columns off their boundaries
    colour = torch.stack([0.8 - 0.6 * right, 0.3 + 0.0 * right, 0.2 + 0.6 * right])[None]
    truth = torch.stack([1 - right, right])[None]  # (1, 2, 64, 80)
    feats = F.adaptive_avg_pool2d(truth, (h, w))  # what a patch sees: a blend at the edge cells
    near = ((xx - 33 - 0.3 * yy).abs() < s)[None, None].expand_as(truth)
    ua = UpsampleAnything(2, s)(feats, colour)
    bil = upsamplers.create("bilinear", 2, s)(feats, colour)
    err_ua, err_bil = (ua - truth).abs()[near].mean(), (bil - truth).abs()[near].mean()
    assert err_ua < 0.6 * err_bil, (float(err_ua), float(err_bil))


@pytest.mark.parametrize("stride,H,W,out", [(8, 40, 56, None), (14, 45, 31, (20, 70)),
                                            (16, 64, 48, (100, 77)), (32, 33, 97, None)])
def test_shapes(stride, H, W, out):
    up = UpsampleAnything(5, stride, steps=3)
    feats = torch.randn(2, 5, -(-H // stride), -(-W // stride))
    y = up(feats, torch.rand(2, 3, H, W), output_size=out)
    assert y.shape == (2, 5, *(out or (H, W))) and torch.isfinite(y).all()


def test_fits_under_inference_mode_and_no_grad():
    torch.manual_seed(0)
    up = UpsampleAnything(4, 8, steps=5, lr=0.01)
    feats, img = torch.randn(1, 4, 4, 5), torch.rand(1, 3, 32, 40)
    ref = up(feats, img)
    with torch.inference_mode():
        hist: list[float] = []
        params, _ = up.fit(img, (4, 5), history=hist)
        out = up(feats, img)
    assert hist[-1] < hist[0] and not params.is_inference()
    assert (params[:, 0] != 16.0).any()  # the fit moved the parameters
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        torch.testing.assert_close(up(feats, img), ref)
    # Outside no_grad the output is differentiable in the features (fixed kernel).
    f = feats.clone().requires_grad_(True)
    up(f, img).sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()


def test_config_round_trip_and_bad_options():
    up = upsamplers.create("upsample_anything", dim=3, stride=14, steps=7, k=3, downsample="area")
    cfg = json.loads(json.dumps(up.config()))
    assert cfg == {"name": "upsample_anything", "dim": 3, "stride": 14, "steps": 7, "lr": 1e-3,
                   "k": 3, "sigma_spatial": 16.0, "sigma_range": 0.12, "downsample": "area",
                   "loss": "l1", "backend": None}
    clone = upsamplers.create(**cfg)
    feats, img = torch.randn(1, 3, 3, 4), torch.rand(1, 3, 42, 56)
    torch.testing.assert_close(clone(feats, img), up(feats, img))
    assert list(up.state_dict()) == [] and "upsample_anything" in PARAMETER_FREE
    for bad in ({"k": 4}, {"steps": -1}, {"sigma_range": 0.0}, {"downsample": "nearest"}, {"loss": "l3"}):
        with pytest.raises(ValueError):
            UpsampleAnything(3, 14, **bad)


def test_create_model_cli_and_eval_spec(tmp_path, monkeypatch):
    skip_without_focus()
    from upfeat.apps.cli import app
    from upfeat.eval.features import parse_spec
    from upfeat.inference.featfile import read_features

    model = upfeat.create_model("vits14_focus", "upsample_anything")
    assert isinstance(model.upsampler, UpsampleAnything)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (42, 70, 3), dtype=np.uint8)
    with torch.inference_mode():
        assert model(Image.fromarray(pixels)).shape == (1, 384, 42, 70)
    monkeypatch.chdir(tmp_path)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    r = CliRunner().invoke(app, ["upsample", "a.png", "--out", "o", "--upsampler", "upsample_anything",
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    feats, meta = read_features(tmp_path / "o" / "a.safetensors")
    assert feats.shape == (384, 42, 70) and meta["upsampler"] == "upsample_anything"
    assert parse_spec("upsample_anything") == ("upsample_anything", None)
