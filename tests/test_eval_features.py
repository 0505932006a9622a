"""upfeat.eval.features: spec parsing and the feature sources built from specs."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upfeat.backbones import wrap
from upfeat.eval.cache import CachedBackbone
from upfeat.checkpoint import save_checkpoint
from upfeat.eval.features import (UpsamplerUnavailable, implicit_upsampler, parse_spec, resolve,
                                  split_specs)
from upfeat import upsamplers


@pytest.fixture
def bb() -> CachedBackbone:
    torch.manual_seed(0)
    return CachedBackbone(wrap(nn.Conv2d(3, 8, 4, stride=4), stride=4, dim=8, name="tiny"))


@pytest.fixture
def img() -> torch.Tensor:
    return torch.rand(2, 3, 30, 41, generator=torch.Generator().manual_seed(1))


def test_parse_spec():
    assert parse_spec("bilinear") == ("bilinear", None)
    assert parse_spec(" jbu = runs/a=b.safetensors ") == ("jbu", "runs/a=b.safetensors")
    assert split_specs("nearest, bilinear,,jbu=x") == ["nearest", "bilinear", "jbu=x"]
    with pytest.raises(ValueError, match="Did you mean: bilinear"):
        parse_spec("bilinar")
    with pytest.raises(ValueError, match="bilinear has no weights"):
        parse_spec("bilinear=ckpt")
    with pytest.raises(ValueError, match="empty checkpoint"):
        parse_spec("jbu=")
    with pytest.raises(ValueError, match="no upsampler given"):
        split_specs(" , ")


@pytest.mark.parametrize("name", ["nearest", "bilinear", "bicubic"])
def test_interpolation_specs(bb, img, name):
    src = resolve(name, bb)
    out = src(img)
    assert out.shape == (2, 8, 30, 41) and src.label == name
    with torch.no_grad():
        ref = upsamplers.create(name, 8, 4)(bb.backbone(img), img)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name,scale", [("large_image", 2), ("large_image4", 4)])
def test_large_image(bb, img, name, scale):
    src = resolve(name, bb)
    assert src.scale == scale
    assert src.lowres(img).shape == (2, 8, -(-30 * scale // 4), -(-41 * scale // 4))
    big = F.interpolate(img, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        ref = upsamplers.create("bilinear", 8, 4)(bb.backbone(big), big, output_size=(30, 41))
    torch.testing.assert_close(src(img), ref)


def test_upsampler_object_hook(bb, img):
    up = upsamplers.create("jbu_stack", 8, 4)
    src = resolve(up, bb)
    assert src.label == "jbu_stack(object)" and src(img).shape == (2, 8, 30, 41)
    with pytest.raises(ValueError, match="built for dim 16, stride 4, but backbone 'tiny' has dim 8"):
        resolve(upsamplers.create("bilinear", 16, 4), bb)
    with pytest.raises(TypeError, match="must be a str or an Upsampler"):
        resolve(3, bb)


def _save(path, up, backbone="tiny", kwargs=None):
    """A checkpoint as ``upfeat train`` writes it (only the parts the loader reads)."""
    meta = {"backbone": {"name": backbone, "kwargs": kwargs or {}, "dim": 8, "stride": 4},
            "upsampler": up.config()}
    save_checkpoint(path, {f"upsampler.{k}": v for k, v in up.state_dict().items()}, meta)
    return str(path)


def test_learned_spec_loads_the_checkpoint(bb, img, tmp_path):
    up = upsamplers.create("resize_conv", 8, 4, kernel_size=1)
    with torch.no_grad():
        up.conv.weight.normal_()  # trained-looking: differs from bilinear
    path = _save(tmp_path / "rc.safetensors", up)
    src = resolve(f"resize_conv={path}", bb)
    assert src.label == f"resize_conv={path}" and src.upsampler.conv.kernel_size == (1, 1)
    with torch.no_grad():
        torch.testing.assert_close(src(img), up(bb.backbone(img), img))
    assert not torch.allclose(src(img), resolve("bilinear", bb)(img))
    other = _save(tmp_path / "other.safetensors", up, backbone="other")
    with pytest.raises(ValueError, match="trained on 'other' features, not on 'tiny'"):
        resolve(f"jbu={other}", bb)
    layered = _save(tmp_path / "layers.safetensors", up, kwargs={"layers": -2})
    with pytest.raises(ValueError, match=r"trained on 'tiny' with \{'layers': -2\} features"):
        resolve(f"jbu={layered}", bb)


def test_missing_checkpoint_is_a_clear_error(bb, tmp_path, monkeypatch):
    # without the shipped backbone-agnostic JBU, the default name is <backbone>_<name>
    import upfeat.model
    monkeypatch.setattr(upfeat.upsamplers.pretrained, "WEIGHTS", tmp_path)
    with pytest.raises(UpsamplerUnavailable, match=r"jbu: checkpoint 'jbu' cannot be loaded: .*shipped weights 'jbu' \(jbu_stack:agnostic\) are not in this install"):
        resolve("jbu", bb)
    with pytest.raises(UpsamplerUnavailable, match=r"/no/such/run\.safetensors"):
        resolve("jbu=/no/such/run.safetensors", bb)


def test_implicit_hook(bb, img, monkeypatch):
    """``implicit`` fits per image through upfeat.upsamplers.implicit.fit_implicit, or is
    unavailable with the reason while that module is missing."""
    mod = types.ModuleType("upfeat.upsamplers.implicit")
    seen = []

    def fit_implicit(image, backbone, progress=True):
        assert torch.is_grad_enabled() and image.shape == (1, 3, 30, 41) and not progress
        seen.append(backbone)
        return lambda size: torch.full((1, 8, *size), float(len(seen)))

    mod.fit_implicit = fit_implicit
    monkeypatch.setitem(sys.modules, "upfeat.upsamplers.implicit", mod)
    out = resolve("implicit", bb)(img)
    assert out.shape == (2, 8, 30, 41) and seen == [bb.backbone] * 2
    assert out[0].eq(1).all() and out[1].eq(2).all()  # one fit per image
    monkeypatch.setitem(sys.modules, "upfeat.upsamplers.implicit", None)  # import fails
    with pytest.raises(UpsamplerUnavailable, match="implicit is not available"):
        resolve("implicit", bb)


def test_implicit_with_the_real_module(bb, img):
    pytest.importorskip("upfeat.upsamplers.implicit")
    src = resolve(implicit_upsampler(bb, steps=2, views=2), bb)
    out = src(img)
    assert src.label == "implicit(object)" and out.shape == (2, 8, 30, 41)
    assert torch.isfinite(out).all() and not torch.equal(out[0], out[1])
