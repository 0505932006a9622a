"""Attention downsampler: each cell is a saliency-weighted average of its k x k window.

``logit[p] = w[p] * sal[p] + b[p]`` for tap ``p`` of the window, with ``sal`` a 1x1-conv saliency
map of the high-res features and ``(w, b)`` learned per tap (``b`` is a log spatial kernel, ``w``
how much saliency matters at that tap), as FeatUp's AttentionDownsampler; weights are the
softmax of the logits over the window; the output is the weighted sum of the window's features.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ShapeError
from .base import Downsampler, cell_pad


def attention_downsample(hr: torch.Tensor, weights: torch.Tensor, stride: int) -> torch.Tensor:
    """Per-cell weighted sum over each cell's window with per-cell weights.

    Args:
        hr: ``(B, C, H, W)`` high-res features.
        weights: ``(B, k, k, h, w)`` window weights of every output cell, ``(h, w)`` =
            ``(ceil(H/s), ceil(W/s))``; windows are centred on cells as in :func:`cell_pad`.
        stride: backbone stride ``s``.

    Returns:
        ``(B, C, h, w)``.

    Memory: the window is split into ``ceil(k/s)²`` blocks of ``s x s`` taps; for each block the
    features are only *viewed* as ``(B, C, h, s, w, s)`` and contracted with the block's weights,
    so no ``(B, C, k*k, h, w)`` tensor is built (intermediates are about the size of ``hr``).
    The contraction is a broadcast product and a sum, not an ``einsum``: that one becomes
    ``B*h*w`` tiny matrix products behind two layout copies, twice as slow forward and backward.

    Example:
        >>> wts = torch.full((1, 16, 16, 2, 3), 1 / 256)
        >>> attention_downsample(torch.ones(1, 4, 32, 48), wts, 16).shape
        torch.Size([1, 4, 2, 3])
    """
    b, k, h, w = weights.shape[0], weights.shape[1], weights.shape[-2], weights.shape[-1]
    s = stride
    nb = math.ceil(k / s)
    x = cell_pad(hr, s, k, extent=nb * s)
    # Zero weights for the taps that round the window up to whole s x s blocks.
    wt = F.pad(weights, (0, 0, 0, 0, 0, nb * s - k, 0, nb * s - k)).to(x.dtype)
    wt = wt.view(b, nb, s, nb, s, h, w)
    out = None
    for a in range(nb):
        for c in range(nb):
            block = x[:, :, a * s:a * s + h * s, c * s:c * s + w * s]
            block = block.unflatten(2, (h, s)).unflatten(4, (w, s))  # views, no copy
            wb = wt[:, a, :, c].permute(0, 3, 1, 4, 2).unsqueeze(1)   # (B, 1, h, s, w, s)
            term = (block * wb).sum((3, 5))
            out = term if out is None else out + term
    return out


class AttentionDownsampler(Downsampler):
    """Saliency-weighted ``k x k`` pooling with stride ``s`` (FeatUp's attention downsampler).

    Args:
        dim: channels ``C`` of the high-res features.
        stride: backbone stride ``s`` (8, 14, 16, 32, ...).
        kernel_size: window ``k``, centred on each cell; default ``s`` (authors: 16 for /16).

    Shape:
        - hr: ``(B, C, H, W)``
        - output: ``(B, C, ceil(H/s), ceil(W/s))``

    Example:
        >>> AttentionDownsampler(6, 14)(torch.rand(1, 6, 224, 100)).shape
        torch.Size([1, 6, 16, 8])
    """

    def __init__(self, dim: int, stride: int, kernel_size: int | None = None) -> None:
        super().__init__(stride, kernel_size)
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.dim = dim
        k = self.kernel_size
        # No bias: a saliency offset c only adds c * w[p] to the logits, which b already covers.
        self.saliency = nn.Conv2d(dim, 1, 1, bias=False)
        with torch.no_grad():  # start close to a box filter, but with non-zero gradients
            self.saliency.weight.mul_(0.1)
        self.w = nn.Parameter(torch.ones(k, k))
        self.b = nn.Parameter(torch.zeros(k, k))

    def spatial_kernel(self) -> torch.Tensor:
        """``(k, k)`` saliency-free part of the weights: ``softmax(b)``."""
        return self.b.flatten().softmax(0).view_as(self.b)

    def guidance(self, hr: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` saliency map (a 1x1 conv without bias: linear in ``hr``)."""
        return self.saliency(hr)

    def weights(self, hr: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, k, k, h, w)`` window weights (non-negative, each window sums to 1), from
        ``guidance`` (the saliency map) if given, else from ``hr``."""
        k, s = self.kernel_size, self.stride
        h, w = self.output_size(*hr.shape[-2:])
        sal = self.guidance(hr) if guidance is None else guidance
        sal = cell_pad(sal, s, k)                                  # (B, 1, Hp, Wp), 1 channel only
        sal = F.unfold(sal, k, stride=s).view(hr.shape[0], k * k, h, w)
        logits = sal * self.w.reshape(1, -1, 1, 1) + self.b.reshape(1, -1, 1, 1)
        return logits.softmax(1).view(hr.shape[0], k, k, h, w)

    def forward(self, hr: torch.Tensor, output_size: tuple[int, int] | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """``hr (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))``; ``output_size``, if given, must
        equal that size (a check that the high-res map and the low-res target cover the same
        pixels).
        With ``guidance`` (``(B, 1, H, W)``, see :meth:`guidance`) ``hr`` may have any number of
        channels, e.g. a random projection of the features the saliency was computed from."""
        d = self._check(hr, output_size, self.dim if guidance is None else None)
        if guidance is not None and tuple(guidance.shape) != (d["B"], 1, d["H"], d["W"]):
            raise ShapeError(f"guidance must have shape ({d['B']}, 1, {d['H']}, {d['W']}) "
                             f"(the saliency of hr), got {tuple(guidance.shape)}")
        return attention_downsample(hr, self.weights(hr, guidance), self.stride)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, " + super().extra_repr()
