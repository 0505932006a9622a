"""Losses: known answers, optimum of the uncertainty, projections, regularisers, MultiViewLoss."""
from __future__ import annotations

import pytest
import torch

from upfeat._checks import ShapeError
from upfeat.downsamplers import AttentionDownsampler, SimpleDownsampler
from upfeat.losses import (MultiViewLoss, ScaleNet, bilateral_smoothness, gaussian_nll,
                           kernel_magnitude, project, random_projection, tv_loss)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pair(b=2, c=5, h=4, w=6, seed=0):
    g = _gen(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)


def test_nll_unit_sigma_is_half_mean_squared_norm():
    t, p = _pair()
    expected = 0.5 * (t - p).square().sum(1).mean()
    torch.testing.assert_close(gaussian_nll(t, p), expected)
    torch.testing.assert_close(gaussian_nll(t, p, torch.zeros(2, 1, 4, 6)), expected)


def test_nll_known_value_with_sigma():
    t, p = torch.zeros(1, 2, 1, 1), torch.full((1, 2, 1, 1), 2.0)  # ‖Δ‖² = 8
    ls = torch.full((1, 1, 1, 1), 0.5 * torch.log(torch.tensor(2.0)).item())  # σ² = 2
    torch.testing.assert_close(gaussian_nll(t, p, ls), torch.tensor(8 / 4 + 0.5 * 0.6931472))


def test_constant_sigma_optimum_is_mean_squared_residual():
    t, p = _pair(seed=1)
    msr = (t - p).square().sum(1).mean()  # mean squared residual norm
    for offset, sign in ((0.0, 0), (0.2, 1), (-0.2, -1)):
        c = (0.5 * msr.log() + offset).clone().requires_grad_()
        gaussian_nll(t, p, c.expand(2, 1, 4, 6)).backward()
        if sign == 0:
            assert abs(c.grad.item()) < 1e-5
        else:
            assert torch.sign(c.grad).item() == sign


@pytest.mark.parametrize("scale", [1e-8, 1e6])
def test_extreme_inputs_give_finite_gradients(scale):
    t, p = _pair(seed=2)
    t, p = (t * scale), (p * scale).requires_grad_()
    net = ScaleNet(5)
    for hr_scale in (scale, -scale):
        ls = net(t * hr_scale / scale)
        assert ls.abs().max() <= 10.0
        loss = gaussian_nll(t, p, ls)
        loss.backward()
        assert torch.isfinite(loss)
    assert torch.isfinite(p.grad).all()
    for name, prm in net.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name


def test_scalenet_starts_near_unit_sigma():
    ls = ScaleNet(16)(torch.randn(2, 16, 5, 7, generator=_gen()))
    assert ls.shape == (2, 1, 5, 7) and ls.abs().max() < 1.0


def test_random_projection_shape_seed_and_isotropy():
    p = random_projection(20, 30, _gen(0))
    assert p.shape == (20, 30) and p.dtype == torch.float32
    assert torch.equal(p, random_projection(20, 30, _gen(0)))
    assert random_projection(4, 3, _gen(), dtype=torch.float64).dtype == torch.float64
    g = _gen(1)
    mean_ppt = sum(q @ q.T for q in (random_projection(20, 30, g) for _ in range(400))) / 400
    torch.testing.assert_close(mean_ppt, torch.eye(20), atol=0.08, rtol=0)
    # Hence the projected squared norm is unbiased.
    d = torch.randn(200, 20, generator=_gen(2))
    proj_sq = torch.stack([(d @ random_projection(20, 30, g)).square().sum(1) for _ in range(200)])
    torch.testing.assert_close(proj_sq.mean(), d.square().sum(1).mean(), rtol=0.03, atol=0)


def test_project_matches_matmul():
    x = torch.randn(2, 6, 3, 4, generator=_gen())
    p = random_projection(6, 2, _gen(1))
    ref = (x.permute(0, 2, 3, 1) @ p).permute(0, 3, 1, 2)
    torch.testing.assert_close(project(x, p), ref)


def test_tv_loss():
    assert tv_loss(torch.full((2, 3, 5, 7), 4.2)).item() == 0.0
    x = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 2, 3, 5)  # horizontal steps of 1
    torch.testing.assert_close(tv_loss(x), torch.tensor(1.0))
    assert tv_loss(torch.ones(1, 1, 1, 1)).item() == 0.0
    y = torch.randn(1, 2, 6, 6, generator=_gen(), requires_grad=True)
    tv_loss(y).backward()
    assert torch.isfinite(y.grad).all()


def test_bilateral_smoothness():
    img = torch.rand(2, 3, 16, 20, generator=_gen())
    const = torch.full((2, 4, 16, 20), 3.0)
    assert bilateral_smoothness(const, img, 200, _gen()).abs().item() < 1e-4
    feats = torch.randn(2, 4, 16, 20, generator=_gen(1), requires_grad=True)
    a = bilateral_smoothness(feats, img, 200, _gen(5))
    assert a.item() > 0 and torch.equal(a, bilateral_smoothness(feats, img, 200, _gen(5)))
    a.backward()
    assert torch.isfinite(feats.grad).all()
    # Features following the image's colours cost less than features that cut across them.
    smooth = img.mean(1, keepdim=True).expand(2, 4, 16, 20)
    assert bilateral_smoothness(smooth.contiguous(), img, 300, _gen()) < a


def test_kernel_magnitude():
    torch.testing.assert_close(kernel_magnitude(torch.full((4, 4), 1 / 16)), torch.tensor(1 / 16))
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1
    torch.testing.assert_close(kernel_magnitude(delta), torch.tensor(1.0))


@pytest.mark.parametrize("ds_cls", [SimpleDownsampler, AttentionDownsampler])
def test_multiview_loss_backward_reaches_everything(ds_cls):
    ds = ds_cls(8) if ds_cls is SimpleDownsampler else ds_cls(6, 8)
    crit = MultiViewLoss(6, proj_dim=4, tv_weight=0.1, crf_weight=0.001, kernel_weight=0.01)
    lr = torch.randn(2, 6, 3, 4, generator=_gen())
    hr = torch.randn(2, 6, 24, 30, generator=_gen(1), requires_grad=True)  # 30 -> 4 cells
    img = torch.rand(2, 3, 24, 30, generator=_gen(2))
    out = crit(lr, hr, ds, generator=_gen(3), image=img)
    assert set(out) == {"loss", "nll", "tv", "crf", "kernel", "log_sigma"}
    assert out["log_sigma"].shape == (2, 1, 3, 4) and not out["log_sigma"].requires_grad
    assert all(out[k].ndim == 0 and torch.isfinite(out[k]) for k in ("loss", "nll", "tv", "crf"))
    out["loss"].backward()
    assert hr.grad.abs().sum() > 0
    for mod in (ds, crit):
        for name, prm in mod.named_parameters():
            assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    again = crit(lr, hr, ds, generator=_gen(3), image=img)["loss"]
    torch.testing.assert_close(again, out["loss"])


def test_multiview_loss_without_projection_is_half_mse():
    ds = SimpleDownsampler(4)
    lr, hr = torch.randn(1, 3, 2, 2, generator=_gen()), torch.randn(1, 3, 8, 8, generator=_gen(1))
    out = MultiViewLoss(3, proj_dim=None, uncertainty=False)(lr, hr, ds)
    torch.testing.assert_close(out["nll"], 0.5 * (lr - ds(hr)).square().sum(1).mean())
    torch.testing.assert_close(out["loss"], out["nll"])
    # With projection, the loss is unbiased for the full one.
    crit = MultiViewLoss(3, proj_dim=2, uncertainty=False)
    g = _gen(7)
    mean_proj = torch.stack([crit(lr, hr, ds, generator=g)["nll"] for _ in range(400)]).mean()
    torch.testing.assert_close(mean_proj, out["nll"], rtol=0.1, atol=0)  # ~3 std errors


def test_errors_name_argument():
    t, p = _pair()
    with pytest.raises(ShapeError, match=r"pred must have the shape of target \(2, 5, 4, 6\)"):
        gaussian_nll(t, p[:, :3])
    with pytest.raises(ShapeError, match=r"log_sigma must have shape \(2, 1, 4, 6\)"):
        gaussian_nll(t, p, torch.zeros(2, 5, 4, 6))
    with pytest.raises(ShapeError, match=r"target must have shape \(B, C, h, w\)"):
        gaussian_nll(t[0], p)
    with pytest.raises(ShapeError, match=r"proj must have shape \(5, D\)"):
        project(t, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="out_dim must be an int >= 1, got 0"):
        random_projection(5, 0)
    with pytest.raises(ShapeError, match=r"feats must have 5 channels"):
        ScaleNet(5)(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ShapeError, match="image must have shape"):
        bilateral_smoothness(torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 8, 9))
    crit = MultiViewLoss(4, crf_weight=0.001)
    lr, hr = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="crf_weight > 0 needs image"):
        crit(lr, hr, SimpleDownsampler(8))
    with pytest.raises(ShapeError, match="output_size=.* does not match"):
        MultiViewLoss(4)(lr, torch.zeros(1, 4, 24, 24), SimpleDownsampler(8))
    with pytest.raises(ShapeError, match=r"hr_view must have 4 channels"):
        MultiViewLoss(4)(lr, torch.zeros(1, 3, 16, 16), SimpleDownsampler(8))
