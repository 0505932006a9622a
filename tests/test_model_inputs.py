"""UpFeat accepts PIL images, numpy arrays and tensors; UpFeat.upsample tiles when over budget;
torch.hub loads it from the local clone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import upfeat
from upfeat.inference.planning import plan_memory
from upfeat import upsamplers


@pytest.fixture(scope="module")
def model() -> upfeat.UpFeat:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.Conv2d(8, 8, 1))
    return upfeat.UpFeat(upfeat.backbones.wrap(conv, stride=4, dim=8),
                         upsamplers.create("bilinear", dim=8, stride=4)).eval()


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (21, 30, 3), dtype=np.uint8)


def test_tensor_path_unchanged(model, rgb):
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x.requires_grad_(True)
    out = model(x)
    assert torch.equal(out, model.upsampler(model.backbone(x), x))
    assert out.requires_grad  # still differentiable with respect to the image
    assert model.as_input(x) is x  # tensors are not converted, copied or moved


@pytest.mark.parametrize("kind", ["pil", "uint8", "float", "pil_list", "chw_uint8", "chw_float"])
def test_pil_and_numpy_equal_the_tensor_path(model, rgb, kind):
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    img = {"pil": Image.fromarray(rgb), "uint8": rgb, "float": rgb.astype(np.float32) / 255,
           "pil_list": [Image.fromarray(rgb)] * 2,
           "chw_uint8": torch.from_numpy(rgb).permute(2, 0, 1), "chw_float": x[0]}[kind]
    with torch.no_grad():
        ref = model(x)
        out = model(img)
    assert out.shape == ((2,) if kind == "pil_list" else (1,)) + (8, 21, 30)
    torch.testing.assert_close(out, ref.expand_as(out), atol=1e-6, rtol=0)
    low = model.lowres(img)
    torch.testing.assert_close(low, model.backbone(x).expand_as(low), atol=1e-6, rtol=0)


def test_grayscale_rgba_and_dtype_follow_the_model(model):
    gray = Image.fromarray(np.full((12, 16), 128, np.uint8))
    with torch.no_grad():
        out = model(gray)
        ref = model(torch.full((1, 3, 12, 16), 128 / 255))
        torch.testing.assert_close(out, ref)
        rgba = np.zeros((12, 16, 4), np.uint8)  # fully transparent: white background
        torch.testing.assert_close(model(rgba), model(torch.ones(1, 3, 12, 16)))
        double = model.double()(gray)
    model.float()
    assert double.dtype == torch.float64


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(TypeError, match="read files with to_tensor\\(load_image\\(path\\)\\)"):
        model("photo.jpg")
    with pytest.raises(TypeError, match="must be a PIL image, numpy array, torch tensor"):
        model(3.0)
    with pytest.raises(ValueError, match="channels first"):
        model(np.zeros((3, 20, 20), np.uint8))


def test_upsample_tiles_over_budget_and_matches(model, rgb):
    big = np.tile(rgb, (10, 10, 1))  # 210 x 300
    budget = plan_memory(model, (210, 300), 10**12).untiled - 1
    plan = plan_memory(model, (210, 300), budget).plan
    assert plan.tiled  # one pass would not fit, so upsample() tiles
    out = model.upsample(Image.fromarray(big), max_memory=budget)
    assert not out.requires_grad and out.shape == (1, 8, 210, 300)
    with torch.no_grad():
        ref = model(big)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(model.upsample(big, tile=64), ref, atol=2e-5, rtol=0)
    with pytest.raises(MemoryError, match="output alone"):
        model.upsample(big, max_memory="100kB")


REPO = Path(__file__).resolve().parents[1]


def test_torch_hub_from_the_local_clone(tmp_path, monkeypatch):
    """``torch.hub`` finds hubconf.py's entry points; the models take PIL, numpy and tensors."""
    import upfeat.model
    from upfeat.checkpoint import CheckpointError

    from ._utils import save_untrained_model

    monkeypatch.setattr(upfeat.upsamplers.pretrained, "WEIGHTS", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="shipped weights 'vits14_focus_jbu' "
                                              r"\(jbu_stack:vits14_focus\) are not in this install"):
        torch.hub.load(str(REPO), "vits14_focus_jbu", source="local")
    save_untrained_model(tmp_path / "weights" / "vits14_focus_jbu.safetensors")
    monkeypatch.setattr(upfeat.upsamplers.pretrained, "WEIGHTS", tmp_path / "weights")
    up = torch.hub.load(str(REPO), "vits14_focus_jbu", source="local")
    assert isinstance(up, upfeat.UpFeat) and not up.training
    assert (up.dim, up.stride, up.upsampler.name) == (384, 14, "jbu_stack")

    rgb = np.random.default_rng(1).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        ref = up(x)
        assert ref.shape == (1, 384, 30, 44)
        for img in (Image.fromarray(rgb), rgb, x[0]):
            torch.testing.assert_close(up(img), ref)
    same = torch.hub.load(str(REPO), "upfeat_checkpoint",
                          str(tmp_path / "weights" / "vits14_focus_jbu.safetensors"),
                          source="local")
    with torch.inference_mode():
        torch.testing.assert_close(same(x), ref)
    with pytest.raises(ValueError, match="only exists trained"):
        torch.hub.load(str(REPO), "vits14_focus_jbu", pretrained=False, source="local")


def test_nan_empty_and_other_float_dtypes(model):
    """Issue 15: one NaN pixel is an error naming the count (not a NaN output); float16/64 and
    bfloat16 images are cast to the model's dtype; an empty image is a ShapeError."""
    from upfeat._checks import ShapeError
    x = torch.rand(1, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[0, 1, 3, 4] = float("nan")
    bad[0, 2, 5, 6] = float("inf")
    with pytest.raises(ValueError, match=r"img has 2 non-finite values \(1 NaN, 1 Inf\) of 1800"):
        model(bad)
    with pytest.raises(ShapeError, match="img is empty"):
        model(torch.rand(1, 3, 0, 30))
    with torch.no_grad():
        ref = model(x)
        for dtype, tol in ((torch.float64, 1e-6), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
            out = model(x.to(dtype))
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, ref, atol=tol * ref.abs().max().item(), rtol=0)
