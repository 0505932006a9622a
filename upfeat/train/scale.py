"""The scale objective: real high-resolution targets for a backbone-agnostic upsampler.

FeatUp's multi-view loss only sees what survives the backbone's own downsampling. JAFAR and AnyUp
instead take an image ``x`` and its half-size copy ``x↓``: the backbone features of ``x`` are a
grid twice as dense as those of ``x↓``, so upsampling ``f(x↓)`` guided by ``x↓`` and pooling the
result to that denser grid must reproduce ``f(x)``. The kernel must decide, for every half-cell,
which of the neighbouring cells it belongs to: the decision that makes edges sharp.

Optionally (``recon_weight``), Upsample Anything's signal too: the same kernel must rebuild ``x↓``
from its cell-averaged copy, a target at full resolution. Both terms are scale-free (features
standardised by the target's per-image channel statistics, plus a cosine term), so backbones of
any dim can share one upsampler.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import cell_conv
from .. import upsamplers
from ..upsamplers.jbu_cells import CellJBU


def scale_crop(size: int, stride: int) -> int:
    """The largest low-res side ``S <= size // 2`` divisible by ``stride`` (the crop is ``2S``)."""
    S = (size // 2) // stride * stride
    if S < 2 * stride:
        raise ValueError(f"crop {size} is too small for stride {stride}: need >= {4 * stride}")
    return S


def feature_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Standardised MSE + (1 - cosine), (B, C, h, w) each; 0 iff equal."""
    mu = target.mean((2, 3), keepdim=True)
    sd = target.std((2, 3), keepdim=True).clamp_min(1e-4)
    mse = ((pred - target) / sd).pow(2).mean()
    cos = F.cosine_similarity(pred - mu, target - mu, dim=1, eps=1e-6).mean()
    return mse + (1 - cos)


def half_size(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, 2S, 2S) -> (B, 3, S, S), antialiased (what a camera at half the resolution sees)."""
    S = image.shape[-1] // 2
    return F.interpolate(image, size=(S, S), mode="bilinear", antialias=True,
                         align_corners=False).clamp_(0, 1)


@torch.no_grad()
def scale_targets(backbone: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(small, feats, target)`` for ``(B, 3, 2S, 2S)`` crops, ``S`` a multiple of the stride:
    ``x↓`` (B, 3, S, S), ``f(x↓)`` (B, C, S/s, S/s) and ``f(x)`` (B, C, 2S/s, 2S/s)."""
    s, S = backbone.stride, image.shape[-1] // 2
    if tuple(image.shape[-2:]) != (2 * S, 2 * S) or S % s:
        raise ValueError(f"the scale objective needs square crops of side 2S, S a multiple of "
                         f"{s}; got {tuple(image.shape)}")
    small = half_size(image)
    return small, backbone(small), backbone(image)


class ScaleObjective(nn.Module):
    """``forward`` = the scale loss of one batch; the module DDP wraps (see the module docstring)."""

    def __init__(self, upsampler: CellJBU, recon_weight: float = 0.0) -> None:
        super().__init__()
        if not getattr(upsampler, "agnostic", False):
            raise ValueError(f"the scale objective trains a backbone-agnostic upsampler "
                             f"(jbu_cells), not {upsampler.name!r}")
        self.upsampler, self.recon_weight = upsampler, recon_weight

    @classmethod
    def from_config(cls, cfg, dim: int, stride: int) -> ScaleObjective:
        up = upsamplers.create(cfg.upsampler, dim=dim, stride=stride, **cfg.upsampler_kwargs)
        return cls(up, cfg.recon_weight)

    def forward(self, small: torch.Tensor, feats: torch.Tensor, target: torch.Tensor,
                stride: int) -> dict[str, torch.Tensor]:
        """``{"loss", "feat", "recon"}`` (``loss = feat + recon_weight * recon``); inputs from
        :func:`scale_targets`."""
        w = self.upsampler.kernel(small, stride)
        pred = F.adaptive_avg_pool2d(cell_conv(feats, w), target.shape[-2:])
        feat = feature_loss(pred, target)
        recon = torch.zeros((), device=small.device, dtype=feat.dtype)
        if self.recon_weight > 0:
            recon = (cell_conv(F.avg_pool2d(small, stride), w) - small).abs().mean()
        return {"loss": feat + self.recon_weight * recon, "feat": feat, "recon": recon}


def scale_loss(up: CellJBU, backbone: nn.Module, image: torch.Tensor,
               recon_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The scale loss of ``(B, 3, 2S, 2S)`` crops in one call (see :class:`ScaleObjective`)."""
    return ScaleObjective(up, recon_weight)(*scale_targets(backbone, image), backbone.stride)
