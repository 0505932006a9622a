"""One learned blur kernel shared by every cell and channel (FeatUp's "simple" downsampler)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Downsampler, cell_pad


def simple_downsample(hr: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    """Blur with ``kernel`` and keep one value per backbone cell.

    Args:
        hr: ``(B, C, H, W)`` high-res features.
        kernel: ``(k, k)`` weights (normally non-negative, summing to 1), centred on each cell.
        stride: backbone stride ``s``.

    Returns:
        ``(B, C, ceil(H/s), ceil(W/s))``; cell ``(i, j)`` is aligned with pixels
        ``[i*s, (i+1)*s) x [j*s, (j+1)*s)`` (see :mod:`upfeat.downsamplers.base`).

    Example:
        >>> simple_downsample(torch.ones(1, 2, 30, 33), torch.full((8, 8), 1 / 64), 8).shape
        torch.Size([1, 2, 4, 5])
    """
    b, c = hr.shape[:2]
    k = kernel.shape[-1]
    x = cell_pad(hr, stride, k)
    # Depthwise blur as one single-channel conv over B*C maps: no (B, C, k*k, h, w) tensor.
    out = F.conv2d(x.reshape(b * c, 1, *x.shape[-2:]), kernel.to(x.dtype)[None, None], stride=stride)
    return out.view(b, c, *out.shape[-2:])


class SimpleDownsampler(Downsampler):
    """Learned non-negative ``k x k`` blur (softmax-normalised), applied with stride ``s``.

    At initialisation the kernel is the box ``1 / k²``; with ``k = s`` (default) the module equals
    ``F.avg_pool2d(hr, s)`` on sizes divisible by ``s``.

    Shape:
        - hr: ``(B, C, H, W)``
        - output: ``(B, C, ceil(H/s), ceil(W/s))``

    Example:
        >>> SimpleDownsampler(14)(torch.rand(2, 5, 224, 100)).shape
        torch.Size([2, 5, 16, 8])
    """

    def __init__(self, stride: int, kernel_size: int | None = None) -> None:
        super().__init__(stride, kernel_size)
        # Softmax parametrisation: positive, sums to 1, any real logits are valid.
        self.logits = nn.Parameter(torch.zeros(self.kernel_size, self.kernel_size))

    @property
    def kernel(self) -> torch.Tensor:
        """``(k, k)`` non-negative kernel summing to 1."""
        return self.logits.flatten().softmax(0).view_as(self.logits)

    def spatial_kernel(self) -> torch.Tensor:
        return self.kernel

    def forward(self, hr: torch.Tensor, output_size: tuple[int, int] | None = None,
                guidance: None = None) -> torch.Tensor:
        """``hr (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))``; ``output_size``, if given, must
        equal that size (a check that the high-res map and the low-res target cover the same
        pixels).
        ``guidance`` must be ``None`` (a blur's weights do not depend on ``hr``)."""
        if guidance is not None:
            raise ValueError("SimpleDownsampler takes no guidance (its guidance() is None)")
        self._check(hr, output_size)
        return simple_downsample(hr, self.kernel, self.stride)
