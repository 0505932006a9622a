"""Backbone registry, shapes, size policy, options and input checks (random weights, no network)."""
from __future__ import annotations

import math
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upfeat import backbones as bb
from upfeat._checks import ShapeError
from upfeat.backbones.clip import MaskClipBackbone

NAMES = bb.list_backbones()
# Timm ViTs this large are built on 'meta' (shapes only: ViT-7B needs 28 GB, and the random init
# of a ViT-B costs more than its forward). Their forward code is the one the ViT-S of each family
# runs on CPU with real numbers; other backbone classes (MaskCLIP, the CNNs) always run on CPU.
BIG_PARAMS = 50_000_000
REQUIRED = {
    "dino_vits8", "dino_vits16", "dino_vitb16", "vits16", "clip_vitb16", "maskclip_vitb16",
    *(f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")),
    "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vit7b16",
    "resnet50", "resnet50_os16", "resnet50_os8", "vits14_focus",
    "mobilenetv2", "efficientnet_lite0", "vgg16_hed",
}
# documented (stride, dim) per name, written out independently of the registry
DOC_SHAPES = {"dino_vits8": (8, 384), "dino_vitb16": (16, 768), "dinov2_vitg14_reg": (14, 1536),
              "dinov3_vith16plus": (16, 1280), "dinov3_vit7b16": (16, 4096),
              "maskclip_vitb16": (16, 512), "clip_vitb16": (16, 768), "resnet50": (32, 2048),
              "resnet50_os16": (16, 2048), "resnet50_os8": (8, 2048), "vits14_focus": (14, 384),
              "mobilenetv2": (32, 1280), "efficientnet_lite0": (32, 1280), "vgg16_hed": (16, 512)}


def test_required_names_registered() -> None:
    assert REQUIRED <= set(NAMES), REQUIRED - set(NAMES)
    for name, (stride, dim) in DOC_SHAPES.items():
        cfg = bb.backbone_cfg(name)
        assert (cfg.stride, cfg.dim) == (stride, dim), name


# feature grid for 224 x 224 and 224 x 320 per stride, written out (sides not divisible: padded)
GRIDS = {8: [(28, 28), (28, 40)], 14: [(16, 16), (16, 23)], 16: [(14, 14), (14, 20)],
         32: [(7, 7), (7, 10)]}


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_shapes(name: str) -> None:
    cfg = bb.backbone_cfg(name)
    b = bb.create(name, pretrained=False, device="meta")
    device = "meta" if (type(b) is bb.TimmBackbone
                        and sum(p.numel() for p in b.parameters()) >= BIG_PARAMS) else "cpu"
    if device == "cpu":
        torch.manual_seed(0)
        b = bb.create(name, pretrained=False)
    # stride, dim and mean/std read from the built model match the documented config
    assert b.cfg == cfg
    assert not b.training
    for (h, w), grid in zip([(224, 224), (224, 320)], GRIDS[cfg.stride]):
        with torch.inference_mode():
            out = b(torch.rand(1, 3, h, w, device=device))
        assert out.shape == (1, cfg.dim, *grid)
        if device == "cpu":
            assert torch.isfinite(out).all() and out.std() > 0


def test_odd_sizes() -> None:
    b = bb.create("timm:vit_tiny_patch16_224", pretrained=False)
    with torch.inference_mode():
        assert b(torch.rand(2, 3, 15, 33)).shape == (2, 192, 1, 3)
        assert b(torch.rand(1, 3, 1, 1)).shape == (1, 192, 1, 1)
    assert b.feature_size(224, 320) == (14, 20) and b.feature_size(225, 321) == (15, 21)


@pytest.mark.parametrize("name, close", [("dinov2_vit_s14", "dinov2_vits14"), ("resnet_50", "resnet50"),
                                         ("timm:resnet5O", "resnet50")])
def test_unknown_name_lists_close_matches(name: str, close: str) -> None:
    with pytest.raises(ValueError, match=close):
        bb.create(name, pretrained=False)


@pytest.fixture(scope="module")
def vit() -> bb.Backbone:
    torch.manual_seed(0)
    return bb.create("dino_vits16", pretrained=False)


@pytest.mark.parametrize("img, exc, msg", [
    (torch.rand(224, 224), ShapeError, r"\(B, C, H, W\).*got 2 dims"),
    (torch.rand(3, 32, 32), ShapeError, "got 3 dims"),
    (torch.rand(1, 1, 32, 32), ShapeError, "3 channels.*got 1 channels"),
    (torch.rand(1, 4, 32, 32), ShapeError, "3 channels.*got 4 channels"),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, r"float.*/ 255"),
    (torch.ones(1, 3, 32, 32, dtype=torch.int64), TypeError, "floating-point.*int64"),
    (torch.rand(1, 3, 32, 32) * 255, ValueError, r"\[0, 1\]"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_wrong_inputs(vit: bb.Backbone, img: object, exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg):
        vit(img)


def test_size_policy_alignment() -> None:
    """Bottom/right padding keeps cell (i, j) on pixels [i*s, (i+1)*s) x [j*s, (j+1)*s)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=8, stride=8)
    b = bb.wrap(conv, stride=8, dim=5, mean=(0, 0, 0), std=(1, 1, 1))
    img = torch.rand(2, 3, 30, 37)
    with torch.no_grad():
        out = b(img)
        assert out.shape == (2, 5, 4, 5)
        torch.testing.assert_close(out[..., :3, :4], conv(img[..., :24, :32]))
        torch.testing.assert_close(out, conv(F.pad(img, (0, 3, 0, 2), mode="replicate")))


def test_wrap_checks() -> None:
    b = bb.wrap(nn.Conv2d(3, 4, 4, stride=4), stride=8, dim=4)  # declared stride is wrong
    with pytest.raises(ShapeError, match=r"expected \(1, 4, 4, 4\)"):
        b(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="stride"):
        bb.wrap(nn.Identity(), stride=0, dim=3)
    with pytest.raises(TypeError, match="nn.Module"):
        bb.wrap(lambda x: x, stride=1, dim=3)  # type: ignore[arg-type]


def test_layers_option() -> None:
    torch.manual_seed(0)
    last = bb.create("timm:vit_tiny_patch16_224", pretrained=False)
    both, third = (bb.TimmBackbone(last.model, "tiny", None, layers) for layers in ([3, -1], 3))
    x = torch.rand(1, 3, 64, 48)
    with torch.no_grad():
        assert both.dim == 384 and both(x).shape == (1, 384, 4, 3)
        torch.testing.assert_close(both(x), torch.cat([third(x), last(x)], 1))
    with pytest.raises(ValueError, match=r"layers.*\[-12, 11\].*12"):
        bb.create("dino_vits16", pretrained=False, layers=12)
    with pytest.raises(ValueError, match="mixes strides"):
        bb.create("resnet50", pretrained=False, layers=[3, 4])
    os8 = bb.create("resnet50_os8", pretrained=False, layers=[2, 3, -1])
    assert (os8.stride, os8.dim) == (8, 512 + 1024 + 2048)


def test_norm_option(vit: bb.Backbone) -> None:
    raw = bb.create("dino_vits16", pretrained=False, norm=False)
    raw.load_state_dict(vit.state_dict())
    img = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        normed, unnormed = vit(img), raw(img)
        # norm=True equals timm's own forward_features (final norm), patch tokens only
        x = (img - vit._mean) / vit._std
        ref = vit.model.forward_features(x)[:, 1:].transpose(1, 2).reshape(1, 384, 4, 5)
        torch.testing.assert_close(normed, ref)
        renormed = vit.model.norm(unnormed.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(normed, renormed)


def test_maskclip_is_value_path() -> None:
    """MaskCLIP == the last attention block with each token attending only to itself."""
    torch.manual_seed(0)
    mc = bb.create("maskclip_vitb16", pretrained=False, norm=False)
    img = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        m = mc.model
        t = m.norm_pre(m._pos_embed(m.patch_embed((img - mc._mean) / mc._std)))
        for blk in m.blocks[:-1]:
            t = blk(t)
        eye = torch.eye(t.shape[1], dtype=torch.bool)
        v = m.blocks[-1].attn(m.blocks[-1].norm1(t), attn_mask=eye)[:, 1:]
        out = mc(img)
        assert out.shape == (1, 768, 2, 3)
        torch.testing.assert_close(out, v.transpose(1, 2).reshape(1, 768, 2, 3))
        proj = MaskClipBackbone(m, "maskclip_vitb16", mc.cfg.timm_name, norm=True)  # same weights
        assert proj.dim == 512
        ref = m.head(m.norm(v)).transpose(1, 2).reshape(1, 512, 2, 3)
        torch.testing.assert_close(proj(img), ref)
    with pytest.raises(TypeError):
        bb.create("maskclip_vitb16", pretrained=False, layers=3)


@pytest.mark.parametrize("name, stride, dim", [("resnet18", 32, 512), ("convnext_atto", 32, 320),
                                               ("vit_tiny_patch16_224", 16, 192)])
def test_any_timm_model(name: str, stride: int, dim: int) -> None:
    b = bb.create(f"timm:{name}", pretrained=False)
    assert (b.stride, b.dim, b.cfg.timm_name) == (stride, dim, name)
    with torch.inference_mode():
        assert b(torch.rand(1, 3, 64, 100)).shape == (1, dim, 64 // stride, math.ceil(100 / stride))


def test_offline_error_is_fast_and_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb._hub, "_cached_hub_file", lambda hub_id: None)  # ignore any HF cache
    assert not bb._hub.hub_reachable()
    start = time.perf_counter()
    with pytest.raises(bb.OfflineError, match=r"weights=PATH.*pretrained=False.*vits14_focus"):
        bb.create("dinov2_vits14")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_path(tmp_path, vit: bb.Backbone, suffix: str) -> None:
    path = tmp_path / f"dino{suffix}"
    sd = {k: v.contiguous() for k, v in vit.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    loaded = bb.create("dino_vits16", weights=path)
    img = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(img), vit(img))
    with pytest.raises(FileNotFoundError, match="weights="):
        bb.create("dino_vits16", weights=tmp_path / "missing.pth")


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("UPFEAT_CACHE", str(tmp_path))
    assert bb.cache_dir() == tmp_path
    monkeypatch.delenv("UPFEAT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bb.cache_dir() == tmp_path / "xdg" / "upfeat"
