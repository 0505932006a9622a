"""Visualisation helpers: PCA of feature maps as RGB, side-by-side panels, and PNG grids.

Functions over tensors; matplotlib is imported inside :func:`save_grid` only, so importing upfeat
never needs it (:func:`save_row` writes with Pillow).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ._checks import ShapeError, check_floating, check_tensor


@dataclass(frozen=True)
class PcaBasis:
    """A fitted 3-component PCA: ``rgb = clamp((x - mean) @ components.T - lo) / (hi - lo)``.

    Attributes:
        mean: ``(C,)`` feature mean.  components: ``(3, C)`` principal directions.
        lo, hi: ``(3,)`` robust range (1st / 99th percentile) mapped to ``[0, 1]``.
    """

    mean: torch.Tensor
    components: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


def _as_batch(feats: torch.Tensor, name: str = "feats") -> torch.Tensor:
    check_tensor(feats, name)
    if feats.ndim not in (3, 4):
        raise ShapeError(f"{name} must have shape (B, C, h, w) or (C, h, w), got {tuple(feats.shape)}")
    check_floating(feats, name)
    return feats if feats.ndim == 4 else feats[None]


def principal_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one PCA: ``x`` ``(n, C)`` -> ``mean (C,)``, ``components (k, C)`` (orthonormal rows,
    largest variance first), ``variances (k,)``, all float64. Exact eigendecomposition of the
    covariance (deterministic); each component's sign makes its largest loading positive.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
        >>> mean, comps, var = principal_components(x, 1)
        >>> mean.tolist(), comps.tolist(), var.tolist()
        ([2.0, 0.0], [[1.0, 0.0]], [4.0])
    """
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    vals, vecs = torch.linalg.eigh(xc.T @ xc / max(1, xc.shape[0] - 1))
    comps = vecs[:, -k:].flip(1).T  # (k, C), largest variance first
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return mean, comps * torch.where(signs == 0, 1.0, signs), vals[-k:].flip(0)


def fit_pca(feats: torch.Tensor, max_samples: int = 200_000) -> PcaBasis:
    """Fit a PCA basis on all pixels of ``feats`` ``(B, C, h, w)`` or ``(C, h, w)`` jointly.

    Exact (eigendecomposition of the ``C x C`` covariance, deterministic); each component's sign
    is fixed so its largest loading is positive. At most ``max_samples`` evenly spaced pixels are
    used.
    """
    f = _as_batch(feats)
    if f.shape[1] < 3:
        raise ShapeError(f"feats needs at least 3 channels for an RGB PCA, got {f.shape[1]}")
    B, C, h, w = f.shape
    idx = torch.arange(0, B * h * w, max(1, B * h * w // max_samples), device=f.device)
    x = f.detach().flatten(2)[idx // (h * w), :, idx % (h * w)].double()  # (n, C), no full copy
    mean, comps, _ = principal_components(x, 3)
    proj = (x - mean) @ comps.T
    lo, hi = torch.quantile(proj.float(), torch.tensor([0.01, 0.99]), dim=0).double()
    return PcaBasis(mean.float(), comps.float(), lo.float(), hi.float())


def pca_rgb(feats: torch.Tensor, basis: PcaBasis | None = None) -> torch.Tensor:
    """First three principal components of ``feats`` as colours in ``[0, 1]``.

    Args:
        feats: ``(B, C, h, w)`` or ``(C, h, w)`` feature maps.
        basis: a basis from :func:`fit_pca` to reuse (same colours across images); fitted on
            ``feats`` (all images jointly) if ``None``.

    Returns:
        ``(B, 3, h, w)``, or ``(3, h, w)`` for an unbatched input.

    Example:
        >>> pca_rgb(torch.randn(2, 16, 5, 7)).shape
        torch.Size([2, 3, 5, 7])
    """
    f = _as_batch(feats)
    basis = fit_pca(f) if basis is None else basis
    if basis.mean.shape[0] != f.shape[1]:
        raise ShapeError(f"basis was fitted on {basis.mean.shape[0]} channels, feats has {f.shape[1]}")
    x = f.detach().float()
    b = PcaBasis(*(t.to(x.device) for t in (basis.mean, basis.components, basis.lo, basis.hi)))
    # components @ (x - mean) without a centred copy of x: (3, C) x (B, C, h*w) -> (B, 3, h*w)
    proj = torch.matmul(b.components, x.flatten(2)) - (b.components @ b.mean)[:, None]
    rgb = ((proj - b.lo[:, None]) / (b.hi - b.lo).clamp_min(1e-12)[:, None]).clamp(0, 1)
    rgb = rgb.view(f.shape[0], 3, *f.shape[-2:])
    return rgb if feats.ndim == 4 else rgb[0]


def pca_panels(image: torch.Tensor, lowres: torch.Tensor, upsampled: Sequence[torch.Tensor],
               stride: int, basis: PcaBasis | None = None, step: int = 1) -> list[torch.Tensor]:
    """``[image, low-res, *upsampled]`` as CPU RGB panels ``(3, ceil(H/step), ceil(W/step))`` in
    ``[0, 1]``, all features coloured with one PCA basis, pixel-aligned.

    Args:
        image: ``(3, H, W)`` in ``[0, 1]``.
        lowres: ``(C, ceil(H/stride), ceil(W/stride))``; drawn as ``stride``-pixel squares, cell
            ``(i, j)`` over pixels ``[i*stride, (i+1)*stride)`` (cropped at the image border).
        upsampled: feature maps ``(C, H, W)`` (any float dtype; may be memory-mapped).
        stride: the backbone stride.  basis: default fitted on ``lowres``.
        step: keep every ``step``-th pixel (for large images).

    Example:
        >>> low, up = torch.randn(8, 3, 4), torch.randn(8, 30, 45)  # stride 14
        >>> [tuple(p.shape) for p in pca_panels(torch.rand(3, 30, 45), low, [up], 14)]
        [(3, 30, 45), (3, 30, 45), (3, 30, 45)]
    """
    H, W = image.shape[-2:]
    basis = fit_pca(lowres) if basis is None else basis
    rows, cols = torch.arange(0, H, step) // stride, torch.arange(0, W, step) // stride
    low = pca_rgb(lowres, basis).cpu()[:, rows][:, :, cols]
    return [image[:, ::step, ::step].detach().float().cpu(), low,
            *(pca_rgb(u[:, ::step, ::step], basis).cpu() for u in upsampled)]


def save_row(panels: Sequence[torch.Tensor], path: str | os.PathLike[str] | BinaryIO,
             gap: int = 4) -> None:
    """Save RGB panels ``(3, H, W)`` in ``[0, 1]`` side by side as one PNG, pixel for pixel
    (white ``gap`` between them, shorter panels top-aligned)."""
    from PIL import Image

    H = max(p.shape[-2] for p in panels)
    W = sum(p.shape[-1] for p in panels) + gap * (len(panels) - 1)
    canvas = torch.ones(3, H, W)
    x = 0
    for p in panels:
        canvas[:, :p.shape[-2], x:x + p.shape[-1]] = p.detach().float().cpu().clamp(0, 1)
        x += p.shape[-1] + gap
    arr = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path, format="PNG")


def save_grid(rows: Sequence[Sequence[torch.Tensor]], path: str | os.PathLike[str],
              titles: Sequence[str] | Sequence[Sequence[str]] | None = None,
              cell_inches: float = 3.0) -> None:
    """Save a PNG grid: ``rows[i][j]`` is an RGB image ``(3, H, W)`` in ``[0, 1]`` (any sizes).

    Low-resolution feature images are drawn with nearest-neighbour pixels so patches stay visible.
    ``titles``: column titles over the first row, or one list of titles per row.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    nrows, ncols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell_inches * ncols, cell_inches * nrows),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                img = row[j].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
                ax.imshow(img, interpolation="nearest")
            per_row = bool(titles) and not isinstance(titles[0], str)
            row_titles = titles[i] if per_row else (titles if i == 0 else None)
            if row_titles and j < len(row_titles):
                ax.set_title(row_titles[j])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
