"""Held-out multi-view reconstruction error: how well ``σ↓(t(σ↑(f(x), x)))`` predicts ``f(t(x))``."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..jitter import apply_view, sample_views


@torch.no_grad()
def reconstruction_error(upsampler: nn.Module, downsampler: nn.Module, backbone: nn.Module,
                         images: Iterable[torch.Tensor], views: int = 4, seed: int = 0,
                         max_zoom: float = 2.0) -> dict[str, float]:
    """Mean over images and views of the full-channel squared error per token.

    Args:
        upsampler: ``(feats, image) -> (B, C, H, W)``.  downsampler: called as
            ``ds(hr, output_size)``.
        backbone: frozen ``f``.  images: ``(1, 3, H, W)`` tensors in [0, 1].
        views: jitters per image, drawn from ``seed`` (the same views for every upsampler).

    Returns:
        ``{"mse": mean ||Δ||²/C, "rel": mse / variance of the targets, "images": n}``.
    """
    gen = torch.Generator().manual_seed(seed)
    se, var, n = 0.0, 0.0, 0
    for img in images:
        hr = upsampler(backbone(img), img)
        for v in sample_views(views, gen, tuple(img.shape[-2:]), max_zoom=max_zoom):
            target = backbone(apply_view(img, v))
            pred = downsampler(apply_view(hr, v), output_size=tuple(target.shape[-2:]))
            se += (pred - target).square().mean().item()
            var += target.var(dim=(0, 2, 3)).mean().item()
        n += 1
    if n == 0:
        raise ValueError("reconstruction_error: no images")
    return {"mse": se / (n * views), "rel": se / var, "images": n}
