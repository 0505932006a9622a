"""Upsamplers: low-res backbone features + the image -> full-resolution features.

Every upsampler shares ``forward(feats (B, dim, h, w), image (B, 3, H, W) in [0, 1],
output_size=None) -> (B, dim, H', W')`` (default ``(H', W') = (H, W)``), where ``h, w =
ceil(H/stride), ceil(W/stride)`` as produced by :mod:`upfeat.backbones`; feature cell ``(i, j)``
stays aligned with pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)`` for any image size.

Example:
    >>> import torch
    >>> up = create("jbu_stack", dim=384, stride=14)
    >>> up(torch.rand(1, 384, 4, 5), torch.rand(1, 3, 44, 61)).shape  # h, w = ceil(H/14), ceil(W/14)
    torch.Size([1, 384, 44, 61])
    >>> list_upsamplers()
    ['bicubic', 'bilinear', 'jbu_cells', 'jbu_stack', 'nearest', 'resize_conv', 'upsample_anything']

Checkpoint = ``up.state_dict()`` (safetensors) + ``up.config()`` (JSON);
``create(**config)`` rebuilds the module. The three registries share their verbs:
``upfeat.backbones.create``, ``upfeat.upsamplers.create``, ``upfeat.downsamplers.create``
(``create_upsampler`` is the deprecated name).
"""
from __future__ import annotations

from . import interp, jbu, jbu_cells, upsample_anything  # noqa: F401  (registers the upsamplers)
from .._deprecation import deprecated_alias
from ._registry import create, get_upsampler_class, list_upsamplers, register_upsampler
from .base import Geometry, Upsampler, resize_area
from .interp import Bicubic, Bilinear, Nearest, ResizeConv
from .jbu import JBULayer, JBUStack
from .jbu_cells import CellJBU
from .upsample_anything import UpsampleAnything
from .pretrained import PARAMETER_FREE, list_pretrained, load_upsampler, resolve_name

create_upsampler = deprecated_alias(create, "create_upsampler")

__all__ = ["PARAMETER_FREE", "CellJBU", "Bicubic", "Bilinear", "Geometry", "JBULayer", "JBUStack",
           "Nearest", "ResizeConv", "UpsampleAnything", "Upsampler", "create", "get_upsampler_class",
           "list_pretrained", "list_upsamplers", "load_upsampler", "register_upsampler",
           "resize_area", "resolve_name"]
