"""Baselines: parameter-free interpolation and resize-conv, cell-aligned like every upsampler.

Features are resized to the output-resolution grid over the padded extent ``ceil(H/s)*s`` and
cropped (see :mod:`upfeat.upsamplers.base`); for sides divisible by the stride this is exactly
``F.interpolate(feats, (H, W), mode=...)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_upsampler
from .base import Upsampler, resize_area


class Interpolate(Upsampler):
    """``F.interpolate`` (``mode``: nearest / bilinear / bicubic) with the cell-aligned crop.

    Shape:
        feats (B, dim, ceil(H/s), ceil(W/s)), image (B, 3, H, W) -> (B, dim, H', W').
    """

    mode = "bilinear"

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__(dim, stride)

    def forward(self, feats: torch.Tensor, image: torch.Tensor,
                output_size: tuple[int, int] | None = None) -> torch.Tensor:
        geo = self.geometry(feats, image, output_size)
        kw = {} if self.mode == "nearest" else {"align_corners": False}
        up = F.interpolate(feats, size=geo.grid, mode=self.mode, **kw)
        # A fractional crop resamples once more; keep nearest piecewise constant.
        return geo.crop(up, mode="nearest" if self.mode == "nearest" else "bilinear")


@register_upsampler("nearest")
class Nearest(Interpolate):
    """Each pixel takes the feature of the cell that covers it (the "low-res" baseline)."""

    mode = "nearest"


@register_upsampler("bilinear")
class Bilinear(Interpolate):
    """Bilinear interpolation between cell centres."""

    mode = "bilinear"


@register_upsampler("bicubic")
class Bicubic(Interpolate):
    """Bicubic interpolation between cell centres (may overshoot)."""

    mode = "bicubic"


@register_upsampler("resize_conv")
class ResizeConv(Upsampler):
    """Bilinear upsampling, then a learned ``k x k`` conv of (features, image) added as a residual.

    ``out = up + conv([up, image])`` at the output resolution. The conv is zero-initialised, so an
    untrained ResizeConv equals :class:`Bilinear` (a clean baseline start); its weights still get
    gradients because its input is non-zero.

    Args:
        dim: feature channels.  stride: backbone stride.
        kernel_size: odd conv size (3; 1 gives the paper's 1x1 variant).
        use_image: also feed the RGB guidance to the conv (3 extra input channels).
    """

    def __init__(self, dim: int, stride: int, kernel_size: int = 3, use_image: bool = True) -> None:
        if not (isinstance(kernel_size, int) and kernel_size % 2 == 1 and kernel_size > 0):
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        super().__init__(dim, stride, kernel_size=kernel_size, use_image=bool(use_image))
        self.use_image = bool(use_image)
        # Replicate padding: zero padding would darken the border features after the residual.
        self.conv = nn.Conv2d(dim + 3 * self.use_image, dim, kernel_size, padding=kernel_size // 2,
                              padding_mode="replicate")
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor, image: torch.Tensor,
                output_size: tuple[int, int] | None = None) -> torch.Tensor:
        geo = self.geometry(feats, image, output_size)
        up = geo.crop(F.interpolate(feats, size=geo.grid, mode="bilinear", align_corners=False))
        x = torch.cat([up, resize_area(image, geo.output).to(up.dtype)], 1) if self.use_image else up
        return up + self.conv(x)
