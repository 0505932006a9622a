"""Random geometric views (zoom, crop/translation, horizontal flip) that apply identically to an
image and to any feature map covering the same field of view.

A :class:`View` is stored in *fractions of the source image*, so it is resolution independent:
with ``align_corners=False`` a normalised coordinate ``n = 2 u / W - 1`` names the same physical
point at every resolution (``u`` = continuous pixel coordinate, pixel ``i`` covers ``[i, i+1)``,
its centre is ``i + 0.5``). ``apply_view(img, v)`` and ``apply_view(feats, v)`` are therefore
aligned whether ``feats`` is at the image's size or at the backbone's ``(h, w)`` grid.

Geometry (as FeatUp's jitter: reflect-pad, zoom, crop, then flip): the view shows the window of
the source whose top-left corner is ``offset = (top, left)`` (fractions of H, W; negative or past
the end = inside the reflection padding) and whose size is ``1 / zoom`` of the source; the window
is resampled to ``output_size`` (default: the input's size) and mirrored left-right if
``flip``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check_floating, check_shape

_MODES = ("bilinear", "nearest", "bicubic")
_PADDINGS = ("reflection", "border", "zeros")


@dataclass(frozen=True)
class View:
    """One geometric jitter.

    Attributes:
        zoom: magnification, ``> 0`` (``2`` shows half the height and width, twice as large).
        flip: mirror the view left-right (after cropping).
        offset: ``(top, left)`` of the crop window in fractions of the source ``(H, W)``.
    """

    zoom: float = 1.0
    flip: bool = False
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if not (isinstance(self.zoom, (int, float)) and math.isfinite(self.zoom) and self.zoom > 0):
            raise ValueError(f"zoom must be a finite number > 0, got {self.zoom!r}")
        if len(self.offset) != 2 or not all(math.isfinite(float(o)) for o in self.offset):
            raise ValueError(f"offset must be two finite fractions (top, left), got {self.offset!r}")

    @classmethod
    def from_pixels(cls, size: tuple[int, int], zoom: float = 1.0, flip: bool = False,
                    top: float = 0.0, left: float = 0.0) -> View:
        """A view whose crop window starts at pixel ``(top, left)`` of an image of ``size`` (H, W).

        Example:
            >>> View.from_pixels((32, 64), left=16)
            View(zoom=1.0, flip=False, offset=(0.0, 0.25))
        """
        return cls(float(zoom), bool(flip), (top / size[0], left / size[1]))

    @property
    def is_identity(self) -> bool:
        return self.zoom == 1.0 and not self.flip and tuple(self.offset) == (0.0, 0.0)

    def theta(self, device=None, dtype=None) -> torch.Tensor:
        """``(2, 3)`` affine mapping normalised view coordinates ``(x, y, 1)`` to source ones."""
        top, left = self.offset
        sx = (-1.0 if self.flip else 1.0) / self.zoom
        # source fraction = offset + window_fraction / zoom, written in [-1, 1] coordinates.
        return torch.tensor([[sx, 0.0, 2 * left - 1 + 1 / self.zoom],
                             [0.0, 1 / self.zoom, 2 * top - 1 + 1 / self.zoom]],
                            device=device, dtype=dtype)

    def inverse_theta(self, device=None, dtype=None) -> torch.Tensor:
        """``(2, 3)`` affine mapping normalised source coordinates back to view coordinates."""
        t = self.theta(dtype=torch.float64)
        a = torch.linalg.inv(torch.cat([t, t.new_tensor([[0.0, 0.0, 1.0]])]))[:2]
        return a.to(device=device, dtype=dtype or torch.get_default_dtype())


def sample_views(n: int, generator: torch.Generator, size: tuple[int, int], *,
                 max_zoom: float = 2.0, zoom_prob: float = 0.5, flip_prob: float = 0.5,
                 max_pad: int = 20) -> list[View]:
    """Draw ``n`` random views of an image of ``size = (H, W)``, reproducibly from ``generator``.

    Zoom is uniform in ``[1, max_zoom]`` with probability ``zoom_prob`` (else 1); the window's
    top-left is an integer position in the zoomed, ``max_pad``-padded image (as the authors), so
    un-zoomed views are integer-pixel shifts and need no interpolation; flip with ``flip_prob``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> len(sample_views(4, g, (224, 224)))
        4
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not (isinstance(n, int) and n >= 0):
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive sides, got {size!r}")
    if not max_zoom >= 1.0:
        raise ValueError(f"max_zoom must be >= 1, got {max_zoom!r}")
    if not max_pad >= 0:
        raise ValueError(f"max_pad must be >= 0, got {max_pad!r}")
    for name, p in (("zoom_prob", zoom_prob), ("flip_prob", flip_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    h, w = size
    u = torch.rand(n, 5, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    views = []
    for zp, z, fp, ty, tx in u.tolist():
        zoom = 1.0 + z * (max_zoom - 1.0) if zp < zoom_prob else 1.0
        # Integer crop positions in the zoomed padded image, as FeatUp's sample_transform.
        span_h = int((h + 2 * max_pad) * zoom) - h + 1
        span_w = int((w + 2 * max_pad) * zoom) - w + 1
        top = (min(int(ty * span_h), span_h - 1) / zoom - max_pad) / h
        left = (min(int(tx * span_w), span_w - 1) / zoom - max_pad) / w
        views.append(View(zoom, fp < flip_prob, (top, left)))
    return views


def warp_thetas(x: torch.Tensor, thetas: torch.Tensor,
                output_size: tuple[int, int] | None = None, mode: str = "bilinear",
                padding_mode: str = "reflection") -> torch.Tensor:
    """The one view warp: ``x`` ``(N, C, H, W)`` (or ``(1, C, H, W)``, shared) through ``N``
    affine ``thetas`` ``(N, 2, 3)`` (:meth:`View.theta`) -> ``(N, C, H', W')``; ``grid_sample``
    with ``align_corners=False``. Unchecked: the hot path of the implicit fit (all views in one
    call); :func:`apply_view` validates.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 1, 4)
        >>> warp_thetas(x, torch.stack([View().theta(), View(flip=True).theta()]))[:, 0, 0]
        tensor([[0., 1., 2., 3.],
                [3., 2., 1., 0.]])
    """
    n = thetas.shape[0]
    out = tuple(x.shape[-2:]) if output_size is None else tuple(output_size)
    grid = F.affine_grid(thetas.to(x.dtype), [n, 1, *out], align_corners=False)
    if x.shape[0] == 1 and n > 1:
        # One shared input: sample it once on the n grids stacked as one tall grid. Through
        # x.expand(n) the backward would zero and sum n input-sized gradients instead of one.
        y = F.grid_sample(x, grid.reshape(1, n * out[0], out[1], 2), mode=mode,
                          padding_mode=padding_mode, align_corners=False)
        return y.view(x.shape[1], n, *out).transpose(0, 1)
    return F.grid_sample(x.expand(n, -1, -1, -1), grid, mode=mode, padding_mode=padding_mode,
                         align_corners=False)


def _warp(x: torch.Tensor, view: View, inverse: bool, output_size, mode: str,
          padding_mode: str, name: str) -> torch.Tensor:
    """Validate, then resample ``x`` through ``view`` (or its inverse); identity returns ``x``."""
    if not isinstance(view, View):
        raise TypeError(f"view must be an upfeat.jitter.View, got {type(view).__name__}")
    dims = check_shape(x, ["B", "C", "H", "W"], name)
    check_floating(x, name)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDINGS:
        raise ValueError(f"padding_mode must be one of {_PADDINGS}, got {padding_mode!r}")
    out = (dims["H"], dims["W"]) if output_size is None else tuple(int(s) for s in output_size)
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"output_size must be (H', W') with positive sides, got {output_size!r}")
    if view.is_identity and out == (dims["H"], dims["W"]):
        return x
    theta = view.inverse_theta(dtype=torch.float64) if inverse else view.theta(dtype=torch.float64)
    # Sample in fp32 at least (affine_grid/grid_sample lack fp16 on CPU), return x's dtype.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    thetas = theta.to(device=x.device)[None].expand(work.shape[0], 2, 3)
    return warp_thetas(work, thetas, out, mode, padding_mode).to(x.dtype)


def apply_view(x: torch.Tensor, view: View, output_size: tuple[int, int] | None = None,
               mode: str = "bilinear", padding_mode: str = "reflection") -> torch.Tensor:
    """Resample ``x`` through ``view`` (same view for the whole batch).

    Args:
        x: ``(B, C, H, W)`` image or feature map covering the source field of view.
        view: the jitter.
        output_size: ``(H', W')`` of the result; default ``(H, W)`` (images and features keep
            their own resolution, and stay aligned because views are resolution independent).
        mode: ``'bilinear'``, ``'nearest'`` or ``'bicubic'`` (``grid_sample``, align_corners=False).
        padding_mode: what the view shows outside the source: ``'reflection'`` (default; mirror
            about the border edge, i.e. symmetric padding with the edge pixel repeated),
            ``'border'`` or ``'zeros'``.

    Returns:
        ``(B, C, H', W')``. The identity view with the default size returns ``x`` itself.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 1, 4)
        >>> apply_view(x, View(flip=True))
        tensor([[[[3., 2., 1., 0.]]]])
    """
    return _warp(x, view, False, output_size, mode, padding_mode, "x")


def invert_view(y: torch.Tensor, view: View, output_size: tuple[int, int] | None = None,
                mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Bring a view back to the source frame: the inverse of :func:`apply_view`.

    Args:
        y: ``(B, C, H', W')`` in the view's frame.
        view: the view ``y`` was made with.
        output_size: ``(H, W)`` of the source frame; default ``(H', W')``.
        padding_mode: fill for source pixels outside the view's window (default ``'zeros'``; use
            :func:`view_mask` to know which pixels are covered).

    Returns:
        ``(B, C, H, W)``; inside the window ``invert_view(apply_view(x, v), v) ≈ x`` (exact for
        flips and integer shifts, a bilinear round trip for zooms).
    """
    return _warp(y, view, True, output_size, mode, padding_mode, "y")


def view_mask(view: View, size: tuple[int, int], device=None) -> torch.Tensor:
    """``(1, 1, H, W)`` bool: source pixels whose centre falls inside the view's window."""
    h, w = size
    top, left = view.offset
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w
    in_y = (ys >= top) & (ys <= top + 1 / view.zoom)
    in_x = (xs >= left) & (xs <= left + 1 / view.zoom)
    return (in_y[:, None] & in_x[None, :])[None, None]
