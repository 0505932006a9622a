"""An experimental backbone-agnostic JBU that weighs whole feature cells (``jbu_cells``).

The shipped any-backbone JBU is :class:`~upfeat.upsamplers.JBUStack` with ``residual=False``;
this one is the alternative the scale objective (:mod:`upfeat.train.scale`) trains. On the
development probes it has not beaten that stack yet (docs/results.md).

:class:`CellJBU` gives every output pixel a convex combination of the ``k x k`` low-res cells
around its own cell (:func:`upfeat.ops.cell_kernel` / :func:`~upfeat.ops.cell_conv`, Kopf et al.'s
joint bilateral upsampling), weighted by

    exp(-t(p)·|g(p) - ḡ(q)|²/2 - |p - centre(q)|²/(2σ²))

where ``g = [RGB, enc(RGB)]`` is a small learned per-pixel embedding of the image, ``ḡ(q)`` its
mean over cell ``q`` and ``t(p)`` a per-pixel temperature. Nothing depends on the features: one
set of weights serves any dim and any stride (the cells are ``stride`` pixels wide), and the
output is a weighted mean of whole cells, so a pixel next to an edge can take the cell on its own
side instead of the bicubic blend of both that FeatUp's layers start from.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import cell_conv, cell_kernel
from ._registry import register_upsampler
from .base import Upsampler, resize_area


@register_upsampler("jbu_cells")
class CellJBU(Upsampler):
    """Backbone-agnostic joint bilateral upsampler (see the module docstring).

    Args:
        dim, stride: of the features it is used with; neither shapes a parameter, so a trained
            state dict loads for any ``dim`` and ``stride`` (:meth:`for_backbone`).
        k: odd window of cells around each pixel's cell.
        guide_dim: channels of the learned image embedding (added to RGB).
        temperature: initial range temperature t (RGB in [0, 1]: 100 = σ_range 0.1).
        sigma: initial spatial σ in cells.

    Shape:
        feats (B, dim, ceil(H/s), ceil(W/s)), image (B, 3, H, W) in [0, 1] -> (B, dim, H', W').
    """

    agnostic = True  # dim and stride are call-time properties, not learned ones

    def __init__(self, dim: int, stride: int, k: int = 3, guide_dim: int = 16,
                 temperature: float = 100.0, sigma: float = 0.5) -> None:
        super().__init__(dim, stride, k=k, guide_dim=guide_dim, temperature=temperature, sigma=sigma)
        if not (isinstance(k, int) and k >= 1 and k % 2 == 1):
            raise ValueError(f"k must be a positive odd int, got {k!r}")
        if not (temperature > 0 and sigma > 0):
            raise ValueError(f"temperature and sigma must be > 0, got {temperature!r}, {sigma!r}")
        self.k = k
        self.encoder = nn.Sequential(
            nn.Conv2d(3, guide_dim, 3, padding=1, padding_mode="replicate"), nn.GELU(),
            nn.Conv2d(guide_dim, guide_dim, 3, padding=1, padding_mode="replicate"), nn.GELU(),
            nn.Conv2d(guide_dim, guide_dim + 1, 1))
        with torch.no_grad():  # start as a colour bilateral filter: embedding and t offset ~ 0
            self.encoder[-1].weight.mul_(0.1)
            self.encoder[-1].bias.zero_()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))

    def for_backbone(self, dim: int, stride: int) -> CellJBU:
        """A copy sharing these weights, for features of another ``dim`` / ``stride``."""
        other = type(self)(dim, stride, **{k: v for k, v in self._cfg.items()})
        other.load_state_dict(self.state_dict())
        return other.train(self.training)

    def guidance(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, t)``: embedding (B, 3 + guide_dim, H, W) and temperature (B, 1, H, W)."""
        e = self.encoder(image)
        t = (self.log_temperature + e[:, :1]).clamp(-5.0, 12.0).exp()
        return torch.cat([image, e[:, 1:]], 1), t

    def kernel(self, image: torch.Tensor, stride: int) -> torch.Tensor:
        """Weights (B, H, W, k, k) from a padded image (B, 3, H, W), H and W multiples of stride."""
        g, t = self.guidance(image)
        keys = F.avg_pool2d(g, stride)
        return cell_kernel(g, keys, t, self.log_sigma.exp(), k=self.k)

    def upsample(self, feats: torch.Tensor, image: torch.Tensor, stride: int) -> torch.Tensor:
        """Core, no size checks: feats (B, C, h, w), padded image (B, 3, s·h, s·w) -> (B, C, s·h, s·w)."""
        w = self.kernel(image.to(feats.dtype), stride)
        return cell_conv(feats, w)

    def forward(self, feats: torch.Tensor, image: torch.Tensor,
                output_size: tuple[int, int] | None = None) -> torch.Tensor:
        geo = self.geometry(feats, image, output_size)
        out = self.upsample(feats, geo.pad_image(image), self.stride)
        return geo.crop(resize_area(out, geo.grid))
