"""The ``--viz`` preview of ``upfeat upsample``, built while the tiles stream to disk.

``image | low-res PCA | upsampled PCA`` side by side, the PCA basis fitted on the low-res
features. The upsampled panel is coloured block by block as each tile's owned pixels are
written (:meth:`Preview.add`), keeping every ``step``-th pixel, so the full-resolution output is
never read back: the preview holds only its three small panels (:func:`preview_bytes`,
counted in the memory plan).
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["Preview", "preview_bytes", "preview_step"]


def preview_step(height: int, width: int, max_side: int = 1024) -> int:
    """Keep every ``step``-th pixel so the panels are at most ``max_side`` px.

    Example:
        >>> preview_step(4000, 6000), preview_step(500, 300)
        (6, 1)
    """
    return max(1, -(-max(height, width) // max_side))


def preview_bytes(height: int, width: int, max_side: int = 1024) -> int:
    """Bytes the preview holds: three float32 RGB panels, and the PNG canvas (float32 + uint8)
    when it is saved."""
    s = preview_step(height, width, max_side)
    px = -(-height // s) * -(-width // s)
    return 3 * px * (3 * 4 + 4 + 1)


class Preview:
    """Collects the ``--viz`` panels of one image.

    Args:
        image: ``(3, H, W)`` float in ``[0, 1]`` or uint8.  lowres: ``(C, h, w)`` backbone
            features.  stride: the backbone stride.  max_side: panel size limit (pixels are
            subsampled by :func:`preview_step`).
    """

    def __init__(self, image: torch.Tensor, lowres: torch.Tensor, stride: int,
                 max_side: int = 1024) -> None:
        from ..viz import fit_pca, pca_rgb
        H, W = image.shape[-2:]
        self.step = s = preview_step(H, W, max_side)
        self.basis = fit_pca(lowres)
        rows, cols = torch.arange(0, H, s) // stride, torch.arange(0, W, s) // stride
        img = image[:, ::s, ::s].cpu()
        self.image = img.float() / 255 if img.dtype == torch.uint8 else img.float()
        self.low = pca_rgb(lowres, self.basis).cpu()[:, rows][:, :, cols]
        self.proj = torch.zeros(3, len(rows), len(cols))  # components @ features, summed

    def add(self, block: torch.Tensor, y0: int, x0: int, c0: int = 0) -> None:
        """Add channels ``c0:c0+c`` of the features at rows ``y0:y0+h``, columns ``x0:x0+w`` of
        the image, ``block`` ``(c, h, w)``: the PCA projection is linear in the channels, so
        channel groups of one pixel add up to its colour."""
        s, (c, h, w) = self.step, block.shape
        ry, rx = -y0 % s, -x0 % s  # first kept row / column inside the block
        if ry >= h or rx >= w:
            return
        sub = block[:, ry::s, rx::s].float()
        comps = self.basis.components[:, c0:c0 + c].to(sub.device)
        proj = (comps @ sub.flatten(1)).view(3, *sub.shape[-2:]).cpu()
        i, j = (y0 + ry) // s, (x0 + rx) // s
        self.proj[:, i:i + proj.shape[-2], j:j + proj.shape[-1]] += proj

    def upsampled(self) -> torch.Tensor:
        """The upsampled panel ``(3, h, w)`` in ``[0, 1]`` (all channels added)."""
        b = self.basis
        rgb = self.proj - (b.components @ b.mean)[:, None, None] - b.lo[:, None, None]
        return (rgb / (b.hi - b.lo).clamp_min(1e-12)[:, None, None]).clamp(0, 1)

    def save(self, path: Path) -> None:
        """Write the PNG atomically."""
        from ..checkpoint import atomic_write
        from ..viz import save_row
        atomic_write(path, lambda tmp: save_row([self.image, self.low, self.upsampled()], tmp))
