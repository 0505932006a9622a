"""Tiled inference: tile geometry, blend weights, tiled == untiled, memory estimates and plans."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import upfeat
from upfeat.inference.memory import format_bytes, forward_bytes, parse_bytes
from upfeat.inference.planning import default_overlap, plan_memory, plan_tiles
from upfeat.inference.tiled import axis_weights, upsample_tiled
from upfeat import upsamplers


def local_model(upsampler: str, stride: int = 14, dim: int = 16) -> upfeat.UpFeat:
    """A backbone whose cell (i, j) sees only its own pixels (patchify conv + 1x1 conv)."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, dim, stride, stride=stride), nn.GELU(),
                         nn.Conv2d(dim, dim, 1))
    up = upsamplers.create(upsampler, dim=dim, stride=stride)
    with torch.no_grad():  # move the JBU away from its near-identity initialisation
        for p in up.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return upfeat.UpFeat(upfeat.backbones.wrap(conv, stride=stride, dim=dim), up).eval()


@pytest.mark.parametrize("size", [(1, 1), (230, 333), (500, 297), (14 * 37, 14 * 20)])
@pytest.mark.parametrize("tile,overlap", [(112, 28), (224, 56), (168, 84)])
def test_plan_tiles_geometry(size, tile, overlap):
    s = 14
    p = plan_tiles(size, s, tile, overlap)
    for origins, n in ((p.ys, size[0]), (p.xs, size[1])):
        padded = -(-n // s) * s
        assert origins[0] == 0 and all(o % s == 0 for o in origins)
        assert list(origins) == sorted(set(origins))
        assert origins[-1] + tile >= padded  # the last tile reaches the (padded) end
        for a, b in zip(origins, origins[1:]):
            assert a + tile - b >= overlap  # neighbours overlap enough
        if padded > tile:  # fewest tiles: one less could not keep the overlap
            n_min = math.ceil((padded - overlap) / (tile - overlap))
            assert len(origins) == n_min
    covered = torch.zeros(size, dtype=torch.int32)
    for y0, y1, x0, x1 in p.windows():
        assert y1 - y0 <= tile and x1 - x0 <= tile
        covered[y0:y1, x0:x1] += 1
    assert int(covered.min()) >= 1


def test_plan_tiles_rejects_bad_sizes():
    with pytest.raises(ValueError, match="tile=100 px must be a multiple of the backbone stride"):
        plan_tiles((300, 300), 14, 100, 28)
    with pytest.raises(ValueError, match="at least 2 x overlap"):
        plan_tiles((300, 300), 14, 112, 70)
    with pytest.raises(ValueError, match="overlap=30 px must be a non-negative multiple"):
        plan_tiles((300, 300), 14, 112, 30)


def test_axis_weights_partition_of_unity_zero_margins_and_smooth():
    length, tile, overlap = 701, 224, 56
    p = plan_tiles((length, length), 14, tile, overlap)
    ws = axis_weights(length, p.ys, tile, p.margin)
    total = torch.zeros(length)
    for o, w in zip(p.ys, ws):
        total[o:o + len(w)] += w
    assert torch.allclose(total, torch.ones(length), atol=1e-6)
    m = int(p.margin)
    for k, (o, w) in enumerate(zip(p.ys, ws)):
        if o > 0:  # inner edge: no weight next to it
            assert float(w[:m].abs().max()) == 0
        if o + tile < length:
            assert float(w[-m:].abs().max()) == 0
    assert float(ws[0][0]) == 1 and float(ws[-1][-1]) == 1  # image borders keep full weight
    # raised-cosine ramp over `margin` px: slope <= pi / (2 margin), no jumps (no seams)
    for w in ws:
        assert float(w.diff().abs().max()) <= math.pi / (2 * p.margin) + 1e-6
    cells = axis_weights(length, p.ys, tile, p.margin, unit=14)
    total = torch.zeros(-(-length // 14))
    for o, w in zip(p.ys, cells):
        total[o // 14:o // 14 + len(w)] += w
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


@pytest.mark.parametrize("upsampler,size,atol", [
    ("nearest", (230, 333), 1e-6),
    ("bilinear", (230, 333), 2e-5),  # float rounding of the interpolation coordinates (7e-6)
    ("bicubic", (230, 333), 2e-5),
    ("jbu_stack", (252, 700), 2e-5),  # reach < 1e-6 beyond the 4-cell margin; fp32 sums
])
def test_both_stages_tiled_equal_untiled_with_a_local_backbone(upsampler, size, atol):
    """Every pixel's features depend on < margin pixels: tiles must reproduce the one pass."""
    model = local_model(upsampler)
    ov = default_overlap(upsampler, 14)
    plan = plan_tiles(size, 14, 2 * ov, ov)
    backbone_plan = plan_tiles(size, 14, 112, 56)
    assert plan.n_tiles >= (2 if upsampler == "jbu_stack" else 4) and backbone_plan.n_tiles >= 6
    img = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, ref_low = model(img), model.lowres(img)
        out, low = upsample_tiled(model, img, plan, backbone_plan)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    torch.testing.assert_close(low, ref_low, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def vit_bilinear() -> upfeat.UpFeat:
    bb = upfeat.backbones.create("vits14_focus")
    return upfeat.UpFeat(bb, upsamplers.create("bilinear", dim=384, stride=14)).eval()


def test_vit_with_upsampler_tiles_equals_one_pass(vit_bilinear, real_image):
    """The default: the ViT sees the whole image once, only the (local) upsampler is tiled."""
    img = real_image(224, 448)
    plan = plan_tiles((224, 448), 14, 224, 112)
    assert plan.n_tiles == 3
    with torch.inference_mode():
        ref = vit_bilinear(img)
        out, _ = upsample_tiled(vit_bilinear, img, plan)
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=0)  # measured 1e-5 (|ref| <= ~10)


def test_tiled_into_a_float16_buffer():
    """``out`` of another dtype (as a float16 output file is): every element is written, the
    blend accumulates in float16 (at most a few roundings)."""
    model = local_model("bilinear")
    img = torch.rand(1, 3, 230, 333, generator=torch.Generator().manual_seed(2))
    plan = plan_tiles((230, 333), 14, 224, 112)
    half = torch.full((1, 16, 230, 333), float("nan"), dtype=torch.float16)
    with torch.inference_mode():
        ref = model(img)
        out, _ = upsample_tiled(model, img, plan, out=half)
    assert out is half
    torch.testing.assert_close(half.float(), ref, atol=2e-3, rtol=2e-3)


def test_tiled_vit_backbone_difference_is_bounded(vit_bilinear, real_image):
    """A ViT attends to the whole tile, so tiling the backbone changes its features. Measured on
    this DAVIS frame (224x448, backbone in two 336-px tiles, overlap 112): relative L2 error
    0.216, mean cosine 0.978, less than cropping the image to one tile does by itself (0.239):
    the difference comes from the lost context and the rescaled position embeddings, not from
    the blending. (With 224-px backbone tiles: 0.322, mean cosine 0.950.)"""
    img = real_image(224, 448)
    plan = plan_tiles((224, 448), 14, 224, 112)
    backbone_plan = plan_tiles((224, 448), 14, 336, 112)
    assert backbone_plan.n_tiles == 2 and backbone_plan.xs == (0, 112)
    with torch.inference_mode():
        ref = vit_bilinear(img)
        out, _ = upsample_tiled(vit_bilinear, img, plan, backbone_plan)
        crop = vit_bilinear(img[..., :, :336])[..., :, :112]  # left tile alone, where weight = 1

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    err, crop_err = rel(out, ref), rel(crop, ref[..., :, :112])
    cos = F.cosine_similarity(out, ref, dim=1)
    assert err < 0.3 and float(cos.mean()) > 0.96, (err, float(cos.mean()))
    assert err < 1.1 * crop_err, (err, crop_err)
    # seamless: across the blend zone, neighbouring columns differ no more than elsewhere
    step = (out[..., 1:] - out[..., :-1]).norm(dim=1).mean(dim=(0, 1))
    zone = slice(backbone_plan.xs[1], backbone_plan.xs[0] + backbone_plan.tile)
    assert float(step[zone].max()) <= float(step.max())
    assert float(step[zone].mean()) < 2 * float(step.mean())


def test_parse_and_format_bytes():
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes("512m") == 512 * 10**6
    assert parse_bytes(123) == 123
    assert 0 < parse_bytes("10%") < parse_bytes("100%")
    for bad in ("lots", "-1GB", "0", "4 GBs"):
        with pytest.raises(ValueError, match="--max-memory"):
            parse_bytes(bad)
    assert format_bytes(3.2e9) == "3.2 GB" and format_bytes(512) == "512 B"


def test_plan_memory_for_a_10000px_image():
    """The plan the CLI makes for a 10000x10000 image with vits14_focus-sized features + JBU."""
    model = local_model("jbu_stack", dim=384)
    budget = parse_bytes("4GB")
    mem = plan_memory(model, (10000, 10000), budget, torch.float16, output_in_memory=False)
    assert mem.output == 384 * 10000 * 10000 * 2
    assert mem.untiled > 50 * budget  # one pass: ~0.3 TB
    assert mem.is_tiled and mem.tiled <= budget
    p, b = mem.plan, mem.backbone_plan
    assert p.tile % 14 == 0 and p.tile >= 2 * p.overlap and p.overlap == 8 * 14
    assert b.tiled and b.tile == 64 * 14  # the backbone's tiles: as large as attention allows
    for forced in ({"tile": p.tile + 14},):
        bigger = plan_memory(model, (10000, 10000), budget, torch.float16,
                             output_in_memory=False, **forced)
        assert bigger.tiled > budget  # the largest tiles that fit were chosen
    msg = mem.message("huge.png")
    assert msg.startswith("huge.png: 10000x10000 px, output 76.8 GB (streamed to disk); one pass")
    n = len(p.ys)
    assert f"upsampler in {n}x{n} tiles of {p.tile} px (overlap 112 px), backbone in 13x13" in msg
    assert "\n" not in msg
    with pytest.raises(MemoryError, match="output alone is 76.8 GB"):
        plan_memory(model, (10000, 10000), budget, torch.float16, output_in_memory=True)
    with pytest.raises(MemoryError, match="even in the smallest tiles"):
        plan_memory(model, (10000, 10000), parse_bytes("2GB"), output_in_memory=False)
    small = plan_memory(model, (224, 224), budget)
    assert not small.is_tiled and small.bytes == small.untiled
    assert small.untiled == 15 * 224**2 + forward_bytes(model, 224, 224)
    mid = plan_memory(model, (1500, 2000), budget, output_in_memory=False)
    assert mid.plan.tiled and not mid.backbone_plan.tiled  # the backbone still sees it whole
    big = plan_memory(model, (2000, 3000), budget * 10, output_in_memory=False)
    assert big.backbone_plan.tiled  # would fit, but 43k tokens of attention take minutes
    # what the process holds already counts against the budget
    based = plan_memory(model, (1500, 2000), budget, output_in_memory=False, base=budget // 2)
    assert based.tiled <= budget // 2 < mid.tiled and based.plan.tile < mid.plan.tile
    assert "budget 4.0 GB - 2.0 GB already in use" in based.message()
    with pytest.raises(MemoryError, match="the process already uses 4.0 GB"):
        plan_memory(model, (100, 100), budget, base=budget)
