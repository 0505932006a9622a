"""The shipped backbone-agnostic JBU: ``create_model(<any backbone>, "jbu")`` for the offline
backbones, a timm CNN and a wrapped module, any dim, stride and image size."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import upfeat
from upfeat import backbones as bb
from upfeat.model import has_shipped_jbu

pytestmark = pytest.mark.skipif(not has_shipped_jbu(), reason="upfeat/weights/jbu.safetensors missing")


def _pretrained_or_skip(name: str) -> None:
    try:
        bb.create(name)
    except bb.MissingWheelError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("name", ["vits14_focus", "mobilenetv2", "efficientnet_lite0", "vgg16_hed"])
def test_jbu_for_every_offline_backbone(name: str) -> None:
    _pretrained_or_skip(name)
    model = upfeat.create_model(name, "jbu")
    assert model.upsampler.agnostic and model.config["backbones"]  # the one shared checkpoint
    x = torch.rand(1, 3, 101, 150)  # odd, non-square, not a multiple of any stride
    with torch.no_grad():
        out = model(x)
        low = model.backbone(x)
    assert out.shape == (1, model.dim, 101, 150) and torch.isfinite(out).all()
    # every step is a normalised average: the output stays within the range of the input features
    assert out.min() >= low.min() - 0.1 * low.abs().max() and out.max() <= low.max() + 0.1 * low.abs().max()


def test_jbu_for_timm_and_wrapped_modules() -> None:
    torch.manual_seed(0)
    model = upfeat.create_model(bb.create("timm:resnet18", pretrained=False), "jbu")
    with torch.no_grad():
        assert model(torch.rand(1, 3, 96, 130)).shape == (1, 512, 96, 130)
    conv = bb.wrap(torch.nn.Conv2d(3, 6, 8, stride=8), stride=8, dim=6)
    with torch.no_grad():
        assert upfeat.create_model(conv, "jbu")(torch.rand(1, 3, 40, 50)).shape == (1, 6, 40, 50)
