"""Shared pieces of the downsamplers: the :class:`Downsampler` interface and cell alignment.

Alignment contract (same as :meth:`upfeat.backbones.base.Backbone.forward`): output cell
``(i, j)`` summarises the high-res pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)`` (``s`` = stride); a
``k x k`` window is centred on that cell (it starts ``(k - s) // 2`` pixels before it), and pixels
outside the map are edge replicas, as the backbone pads the bottom / right of the image. The
output is ``(ceil(H / s), ceil(W / s))``, the backbone's grid for an ``H x W`` image.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import ShapeError, check_floating, check_shape


def _axis_index(size: int, stride: int, k: int, extent: int, device) -> torch.Tensor | None:
    n = math.ceil(size / stride)
    lo = -((k - stride) // 2)  # first source index of window 0 (floor: odd extra goes right)
    hi = lo + (n - 1) * stride + extent
    if lo == 0 and hi == size:
        return None  # already aligned: no copy
    return torch.arange(lo, hi, device=device).clamp_(0, size - 1)


def cell_pad(x: torch.Tensor, stride: int, k: int, extent: int | None = None) -> torch.Tensor:
    """Replicate-pad / crop ``x`` so that cell ``i``'s window is ``[i*s, i*s + extent)``.

    Args:
        x: ``(B, C, H, W)``.
        stride: cell size ``s``.
        k: window size that is centred on each cell.
        extent: taps kept per window, ``>= k`` (extra taps continue to the right / bottom);
            default ``k``.

    Returns:
        ``(B, C, (h-1)*s + extent, (w-1)*s + extent)`` with ``h, w = ceil(H/s), ceil(W/s)``.

    Example:
        >>> cell_pad(torch.zeros(1, 1, 30, 32), stride=8, k=8).shape
        torch.Size([1, 1, 32, 32])
    """
    extent = k if extent is None else extent
    iy = _axis_index(x.shape[-2], stride, k, extent, x.device)
    ix = _axis_index(x.shape[-1], stride, k, extent, x.device)
    # Clamped indices = edge replication, valid even when a window lies wholly outside a tiny map.
    if iy is not None:
        x = x.index_select(-2, iy)
    if ix is not None:
        x = x.index_select(-1, ix)
    return x


class Downsampler(nn.Module):
    """Base: ``forward(hr (B, C, H, W), output_size=None) -> (B, C, ceil(H/s), ceil(W/s))``."""

    def __init__(self, stride: int, kernel_size: int | None = None) -> None:
        super().__init__()
        if not (isinstance(stride, int) and stride >= 1):
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        kernel_size = stride if kernel_size is None else kernel_size
        if not (isinstance(kernel_size, int) and kernel_size >= 1):
            raise ValueError(f"kernel_size must be an int >= 1 (or None for stride), got "
                             f"{kernel_size!r}")
        self.stride = stride
        self.kernel_size = kernel_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(ceil(H / stride), ceil(W / stride))``."""
        return math.ceil(height / self.stride), math.ceil(width / self.stride)

    def _check(self, hr: torch.Tensor, output_size, dim: int | None = None) -> dict[str, int]:
        dims = check_shape(hr, ["B", "C", "H", "W"], "hr")
        check_floating(hr, "hr")
        if dim is not None and dims["C"] != dim:
            raise ShapeError(f"hr must have {dim} channels (B, {dim}, H, W), got shape "
                             f"{tuple(hr.shape)}")
        expected = self.output_size(dims["H"], dims["W"])
        if output_size is not None and tuple(int(s) for s in output_size) != expected:
            raise ShapeError(
                f"output_size={tuple(output_size)} does not match hr of size "
                f"{dims['H']}x{dims['W']} with stride {self.stride}, which gives {expected} = ceil(H/s), ceil(W/s); "
                f"the high-res map must cover the same pixels as the low-res target")
        return dims

    def spatial_kernel(self) -> torch.Tensor:
        """``(k, k)`` non-negative learned spatial kernel summing to 1 (for regularisers)."""
        raise NotImplementedError

    def guidance(self, hr: torch.Tensor) -> torch.Tensor | None:
        """``(B, g, H, W)`` per-pixel *linear* maps of ``hr`` that the pooling weights depend on,
        or ``None`` if the weights do not depend on ``hr`` (pure blur).

        Downsamplers pool every channel with the same weights, so pooling a channel projection
        ``P·hr`` gives ``P·pool(hr)``; passing ``guidance=self.guidance(hr)`` (warped like ``hr``,
        which is exact because it is linear per pixel) lets ``forward`` pool a projected or warped
        map with the weights the full one would have had.
        """
        return None

    def extra_repr(self) -> str:
        return f"stride={self.stride}, kernel_size={self.kernel_size}"
