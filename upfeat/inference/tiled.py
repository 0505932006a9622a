"""Tiled inference: full-resolution features of images too large for one pass.

Two stages, each tiled only when needed (:func:`upfeat.inference.planning.plan_memory` decides):

1. Backbone: one pass over the whole image when it fits (its activations are ~30x smaller than
   the full-resolution output), else overlapping tiles blended at cell level.
2. Upsampler: overlapping tiles, each given its window of the image and of the low-res
   features; each tile *owns* the pixels nearer to it than to its neighbours (the overlap is
   split in the middle) and hands only those on (:func:`upsample_tiled`'s ``write``), so the
   full output never needs to be in memory and every pixel is computed with at least
   ``overlap/2`` pixels of context on each inner side.

Tiles are squares whose origins and sides are multiples of the backbone stride ``s``, so each
sees the image's own feature grid: cell ``(i, j)`` of a tile at ``(y0, x0)`` is cell
``(i + y0/s, j + x0/s)`` of the image, and a tile clipped by the bottom/right border is padded
exactly as the whole image is. Backbone blend weights are separable; they are 0 within ``margin
= overlap/4`` pixels of a tile edge lying inside the image, rise along a raised-cosine ramp over
the next ``margin`` pixels and are 1 beyond; they are normalised to sum to 1 at every cell, so
there are no seams.

Exactness: the upsamplers are local (nearest: 0 cells, bilinear: 1, bicubic: 2, JBU stack: its
influence falls below 1e-6 within 4 cells), so the upsampler stage with the default overlaps
(twice that reach) reproduces the one-pass result up to float rounding
(``tests/test_tiling.py``). A tiled *backbone* is exact only if it is local too; a ViT attends
to the whole tile, so its features change (measured and bounded in the tests), which is why the
backbone is tiled last.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .._checks import ShapeError, check_image, check_shape
from .memory import takes_sink
from .planning import TilePlan, owned_spans

__all__ = ["axis_weights", "lowres_tiled", "pixels", "upsample_blocks", "upsample_tiled"]


def _ramp(d: torch.Tensor, margin: float) -> torch.Tensor:
    """0 for ``d <= margin``, raised cosine up to 1 at ``d = 2 * margin``."""
    if margin == 0:
        return torch.ones_like(d)
    t = ((d - margin) / margin).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def axis_weights(length: int, origins: tuple[int, ...], tile: int, margin: float,
                 unit: int = 1) -> list[torch.Tensor]:
    """Normalised 1-D blend weights of each tile along one axis, float32.

    ``unit=1``: one weight per pixel of the tile's (clipped) span; ``unit=s``: one per feature
    cell, evaluated at cell centres. At every pixel (cell) the weights of all tiles sum to 1.
    """
    spans = [(o, min(o + tile, length)) for o in origins]
    n_units = -(-length // unit)
    raw, total = [], torch.zeros(n_units, dtype=torch.float64)
    for o, e in spans:
        first, last = o // unit, -(-e // unit)
        x = (torch.arange(first, last, dtype=torch.float64) + 0.5) * unit  # pixel/cell centres
        d = torch.full_like(x, math.inf)
        if o > 0:
            d = torch.minimum(d, x - o)
        if e < length:
            d = torch.minimum(d, e - x)
        w = _ramp(d, margin)
        raw.append(w)
        total[first:last] += w
    if bool((total <= 0).any()):  # cannot happen for plans from plan_tiles
        raise ValueError(f"tiles {spans} leave part of the axis (length {length}) without weight")
    return [(w / total[o // unit:o // unit + len(w)]).float() for (o, _), w in zip(spans, raw)]


def pixels(img: torch.Tensor, y0: int = 0, y1: int | None = None, x0: int = 0,
           x1: int | None = None) -> torch.Tensor:
    """Window ``[y0:y1, x0:x1]`` of ``img`` ``(B, 3, H, W)`` as float32 in ``[0, 1]``: uint8
    images (``/ 255``, exactly as :func:`upfeat.io.to_tensor`) are converted one window at a
    time, so a large image is held at 3 bytes per pixel instead of 12.

    Example:
        >>> pixels(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8), 0, 2, 1, 4).unique()
        tensor([1.])
    """
    win = img[..., y0:y1, x0:x1]
    if win.dtype != torch.uint8:
        return win
    return torch.empty(win.shape, device=win.device).copy_(win).div_(255.0)


def _check_pixels(img: torch.Tensor) -> dict[str, int]:
    if isinstance(img, torch.Tensor) and img.dtype == torch.uint8:
        dims = check_shape(img, ["B", "C", "H", "W"], "img")
        if dims["C"] != 3 or img.numel() == 0:
            raise ShapeError(f"img must be a non-empty RGB batch (B, 3, H, W), got shape "
                             f"{tuple(img.shape)}")
        return dims
    return check_image(img)


def lowres_tiled(model: torch.nn.Module, img: torch.Tensor, plan: TilePlan | None = None,
                 progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Backbone features ``(B, dim, ceil(H/s), ceil(W/s))`` float32: one pass when ``plan`` is
    ``None`` or one tile, else per tile, blended with the weights at cell centres. ``img``:
    float in ``[0, 1]`` or uint8 (:func:`pixels`)."""
    if plan is None or not plan.tiled:
        return model.lowres(pixels(img))
    (H, W), s = plan.size, plan.stride
    lowres = torch.zeros(img.shape[0], model.dim, -(-H // s), -(-W // s), device=img.device)
    cy, cx = (axis_weights(n, o, plan.tile, plan.margin, s)
              for n, o in ((H, plan.ys), (W, plan.xs)))
    for (y0, y1, x0, x1), (i, j) in zip(plan.windows(), _indices(plan)):
        lr = model.lowres(pixels(img, y0, y1, x0, x1))
        lowres[..., y0 // s:y0 // s + lr.shape[-2], x0 // s:x0 // s + lr.shape[-1]] += (
            lr * (cy[i][:, None] * cx[j][None, :]).to(lr))
        if progress is not None:
            progress()
    return lowres


def _indices(plan: TilePlan) -> Iterator[tuple[int, int]]:
    return ((i, j) for i in range(len(plan.ys)) for j in range(len(plan.xs)))



Write = Callable[[torch.Tensor, int, int, int], None]  # write(block (B, c, h, w), y0, x0, c0)


def upsample_blocks(upsampler: torch.nn.Module, lowres: torch.Tensor, img: torch.Tensor,
                    emit: Callable[[torch.Tensor, int], None]) -> None:
    """``emit(block, c0)`` the upsampled features in channel blocks ``c0:c0 + block.shape[1]``:
    straight from the last step for upsamplers that take a ``sink`` (the JBU stack, one channel
    group at a time under ``torch.inference_mode``, so the whole tile's result is never held),
    else all channels at once."""
    if takes_sink(upsampler):
        upsampler(lowres, img, sink=emit)
    else:
        emit(upsampler(lowres, img), 0)


def upsample_tiled(model: torch.nn.Module, img: torch.Tensor, plan: TilePlan,
                   backbone_plan: TilePlan | None = None, out: torch.Tensor | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   write: Write | None = None, lowres: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Features of ``img`` in two tiled stages: ``(out (B, dim, H, W), lowres (B, dim, h, w))``.

    1. The backbone runs once on the whole image (``backbone_plan=None``), or on the tiles of
       ``backbone_plan`` (blended at cell level; a ViT's features then change, see the module
       docstring).
    2. The upsampler runs on the tiles of ``plan``, each given its window of the low-res
       features and of the image; each tile's owned pixels (:func:`owned_spans`) are stored.
       The upsamplers are local, so with the default overlaps this stage reproduces the
       one-pass result up to float rounding.

    Args:
        model: an :class:`upfeat.UpFeat` (anything with ``lowres``, ``upsampler``, ``dim``,
            ``stride``); call under ``torch.inference_mode()`` to keep memory low.
        img: ``(B, 3, H, W)`` RGB in ``[0, 1]``, or uint8 (converted per tile,
            :func:`pixels`), ``(H, W) == plan.size``.
        plan, backbone_plan: from :func:`plan_tiles` with the model's stride.
        out: optional ``(B, dim, H, W)`` tensor to fill (any float dtype, any device); every
            element is written once, so it need not be zeroed.
        progress: called as ``progress(done, total)`` after each tile of either stage.
        write: instead of ``out``, called as ``write(block, y0, x0, c0)`` with each tile's owned
            ``(B, c, h, w)`` float32 block of channels ``c0:c0+c`` (all of them, or one channel
            group of :func:`upsample_blocks`; e.g.
            :meth:`upfeat.inference.featfile.FeatureWriter.write` streaming to a file); the
            blocks partition the output and come tile by tile in raster order (each band of
            rows ends with its rightmost tile). ``out`` is then ``None``.
        lowres: the backbone's features if already computed (stage 1 is then skipped).

    Returns:
        ``out`` (``None`` with ``write``) and the low-res features
        ``(B, dim, ceil(H/s), ceil(W/s))`` float32.
    """
    dims = _check_pixels(img)
    for p in (plan, backbone_plan or plan):
        if (dims["H"], dims["W"]) != p.size or p.stride != model.stride:
            raise ValueError(f"plan for {p.size} at stride {p.stride} does not fit image "
                             f"{(dims['H'], dims['W'])} and model stride {model.stride}")
    (H, W), s, B, C = plan.size, plan.stride, dims["B"], model.dim
    if out is not None and tuple(out.shape) != (B, C, H, W):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(B, C, H, W)}")
    stage1 = lowres is None and backbone_plan is not None and backbone_plan.tiled
    total = plan.n_tiles + (backbone_plan.n_tiles if stage1 else 0)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if lowres is None:
        lowres = lowres_tiled(model, img, backbone_plan, tick)
    if write is None:
        if out is None:  # after stage 1, whose peak it would otherwise add to
            out = torch.empty(B, C, H, W, device=img.device)

        def write(block: torch.Tensor, y0: int, x0: int, c0: int) -> None:
            out[:, c0:c0 + block.shape[1], y0:y0 + block.shape[-2],
                x0:x0 + block.shape[-1]].copy_(block)
    oy, ox = owned_spans(H, plan.ys, plan.tile), owned_spans(W, plan.xs, plan.tile)
    for (y0, y1, x0, x1), (i, j) in zip(plan.windows(), _indices(plan)):
        lr = lowres[..., y0 // s:-(-y1 // s), x0 // s:-(-x1 // s)]
        (a, b), (c, d) = oy[i], ox[j]
        upsample_blocks(model.upsampler, lr, pixels(img, y0, y1, x0, x1),
                        lambda up, c0: write(up[..., a - y0:b - y0, c - x0:d - x0], a, c, c0))
        tick()
    return out, lowres
