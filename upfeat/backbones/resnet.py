"""ResNet-50 (torchvision ImageNet weights via timm): stride 32, or dilated stride 16 / 8.

The default level is the last stage (``layer4``, 2048 channels). The /16 and /8 variants keep
the ImageNet weights and replace the strides of the last stage(s) by dilation (DeepLab style),
so features stay semantic at a finer grid. ``layers`` index timm's five feature levels
(stem, layer1..layer4); ``norm`` is ignored (ResNets have no final norm).
"""
from __future__ import annotations

from .base import BackboneCfg
from ._timm import timm_entrypoint

_TIMM = "resnet50.tv_in1k"

resnet50 = timm_entrypoint(BackboneCfg("resnet50", _TIMM, 32, 2048), "ResNet-50, last stage")
resnet50_os16 = timm_entrypoint(BackboneCfg("resnet50_os16", _TIMM, 16, 2048),
                                "ResNet-50, last stage dilated to stride 16", output_stride=16)
resnet50_os8 = timm_entrypoint(BackboneCfg("resnet50_os8", _TIMM, 8, 2048),
                               "ResNet-50, last two stages dilated to stride 8", output_stride=8)
