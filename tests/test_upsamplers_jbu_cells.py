"""Tests of the backbone-agnostic JBU (upfeat.upsamplers.jbu_cells) and its scale objective."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upfeat import upsamplers
from upfeat.train.scale import feature_loss, scale_crop, scale_loss


def _two_regions(H=56, W=84, edge=37):
    """Image: dark left / bright right, the edge inside a cell (not on a cell border)."""
    img = torch.full((1, 3, H, W), 0.2)
    img[..., edge:] = 0.8
    return img


@pytest.mark.parametrize("stride,dim,size", [(14, 5, (56, 84)), (8, 3, (40, 33)), (32, 7, (70, 100)),
                                             (16, 1, (16, 16)), (7, 2, (29, 50))])
def test_any_dim_stride_size(stride, dim, size):
    up = upsamplers.create("jbu_cells", dim=dim, stride=stride)
    H, W = size
    feats = torch.randn(2, dim, -(-H // stride), -(-W // stride))
    out = up(feats, torch.rand(2, 3, H, W))
    assert out.shape == (2, dim, H, W)
    assert up(feats, torch.rand(2, 3, H, W), output_size=(H // 2 + 1, W * 2)).shape == (2, dim, H // 2 + 1, W * 2)


def test_convex_combination_of_cells():
    """Every output is a convex combination of neighbouring cells: constants stay constant, and
    outputs stay inside the range of the cells."""
    up = upsamplers.create("jbu_cells", dim=4, stride=14).eval()
    img = torch.rand(1, 3, 56, 84)
    const = torch.full((1, 4, 4, 6), 3.0)
    torch.testing.assert_close(up(const, img), torch.full((1, 4, 56, 84), 3.0))
    feats = torch.randn(1, 4, 4, 6)
    out = up(feats, img)
    assert out.min() >= feats.min() - 1e-5 and out.max() <= feats.max() + 1e-5


def test_sharper_than_bilinear_at_an_edge():
    """Features constant per colour region: at init (a colour bilateral filter over cells) the
    output follows the image edge that falls inside a cell, which bilinear smears."""
    s, img = 14, _two_regions()
    truth = torch.where(img[:, :1] > 0.5, 1.0, -1.0)  # (1, 1, H, W)
    feats = F.adaptive_avg_pool2d(truth, (4, 6))  # the cells straddling the edge are mixtures
    up = upsamplers.create("jbu_cells", dim=1, stride=s).eval()
    with torch.no_grad():
        err_any = (up(feats, img) - truth).abs()[..., 28:56]
        err_bil = (upsamplers.create("bilinear", dim=1, stride=s)(feats, img) - truth).abs()[..., 28:56]
    assert err_any.mean() < 0.5 * err_bil.mean()


def test_state_dict_shared_across_backbones():
    up = upsamplers.create("jbu_cells", dim=384, stride=14)
    other = up.for_backbone(1280, 32)
    assert (other.dim, other.stride) == (1280, 32)
    for (k, a), (_, b) in zip(up.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert upsamplers.create(**up.config()).config() == up.config()


def test_gradients_reach_every_parameter():
    up = upsamplers.create("jbu_cells", dim=3, stride=8)
    out = up(torch.randn(1, 3, 4, 5), torch.rand(1, 3, 32, 40))
    out.pow(2).mean().backward()
    for name, p in up.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_feature_loss_and_crop():
    x = torch.randn(2, 5, 6, 7)
    assert feature_loss(x, x).abs() < 1e-6
    assert feature_loss(x + 0.1 * torch.randn_like(x), x) > 0
    assert scale_crop(360, 14) == 168 and scale_crop(360, 32) == 160
    with pytest.raises(ValueError, match="too small"):
        scale_crop(100, 32)


class _PoolBackbone(torch.nn.Module):
    """A tiny deterministic 'backbone': box-averaged colour and its square at stride 8."""
    stride, dim = 8, 6

    def forward(self, x):
        return F.avg_pool2d(torch.cat([x, x * x], 1), 8)


def test_scale_objective_trains_toward_sharp_targets():
    """On a real photo, a few steps of the scale objective lower its loss below the untrained
    kernel's, and the trained kernel beats bilinear on the same objective."""
    from PIL import Image
    import numpy as np
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples" / "skimage" / "astronaut.jpg"
    if not path.is_file():
        pytest.skip(f"sample photo missing: {path}")
    img = torch.from_numpy(np.array(Image.open(path).convert("RGB").resize((128, 128)))).permute(2, 0, 1)
    img = img[None].float() / 255
    torch.manual_seed(0)
    bb, up = _PoolBackbone(), upsamplers.create("jbu_cells", dim=6, stride=8)
    first = float(scale_loss(up, bb, img, recon_weight=0.1)["loss"].detach())
    opt = torch.optim.Adam(up.parameters(), lr=1e-2)
    for _ in range(15):
        loss = scale_loss(up, bb, img, recon_weight=0.1)["loss"]
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        last = scale_loss(up, bb, img, recon_weight=0.1)
        small = F.interpolate(img, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        bil = F.interpolate(bb(small), size=(64, 64), mode="bilinear", align_corners=False)
        bil_loss = feature_loss(F.adaptive_avg_pool2d(bil, (16, 16)), bb(img))
    assert float(last["loss"]) < first
    assert float(last["feat"]) < float(bil_loss)
