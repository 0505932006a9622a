"""Where the tiles go: the one place an image's run is planned.

:func:`plan_memory` estimates one image's run (:mod:`upfeat.inference.memory`) and, when it would
exceed the budget, picks tiles for each of the two stages (:mod:`upfeat.inference.tiled` runs
them): the largest tiles whose estimate fits, as a :class:`MemoryPlan` holding two
:class:`TilePlan` s. :func:`plan_tiles` places the tiles of one stage; :func:`owned_spans` says
which pixels each upsampler tile writes.

Tiled run = the larger of its two stages, both holding the image and the low-res features
``C * N * 4``:

- stage 1: + backbone on the whole image, or on one backbone tile if that does not fit;
- stage 2: + upsampler on one tile of ``T x T`` px (the tile's owned part goes straight to
  the output: one channel group at a time for the JBU stack, else its whole result), + the output if it is held in memory (``C * H * W * itemsize``)
  or, when it streams to a file (``upfeat upsample``), one channel's band of rows being
  completed (:func:`~upfeat.inference.memory.stream_bytes`,
  :class:`upfeat.inference.featfile.FeatureWriter`).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .memory import (IMAGE_BYTES_PER_PX, UINT8_IMAGE_BYTES_PER_PX, backbone_bytes, format_bytes,
                     forward_bytes, grid_size, stream_bytes, upsampler_bytes)

__all__ = ["BACKBONE_OVERLAP_CELLS", "MemoryPlan", "TilePlan", "default_overlap", "owned_spans",
           "plan_memory", "plan_tiles"]

# Upsampler overlap in feature cells: each tile keeps half of it as context, which must cover
# the reach of the upsampler (nearest: 0 cells, bilinear: 1, bicubic: 2, JBU stack: ~4 before
# its influence is < 1e-6) plus that of the backbone (0 for a patchify layer, 1 for a 3x3 conv
# after it, ...).
_OVERLAP_CELLS = {"nearest": 2, "bilinear": 4, "bicubic": 4, "resize_conv": 4}
_OVERLAP_CELLS_LEARNED = 8
BACKBONE_OVERLAP_CELLS = 8
"""Overlap of backbone tiles, in cells (only used when the backbone itself must be tiled)."""


def default_overlap(upsampler_name: str, stride: int) -> int:
    """Default upsampler tile overlap in pixels: 2 cells for nearest, 4 for
    bilinear/bicubic/resize_conv, 8 for the JBU stack (and any other upsampler)."""
    return _OVERLAP_CELLS.get(upsampler_name, _OVERLAP_CELLS_LEARNED) * stride


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of an ``H x W`` image go.

    Attributes:
        size: ``(H, W)`` of the image.  stride: backbone stride ``s``.
        tile: tile side in pixels (multiple of ``s``); tiles clipped by the image are smaller.
        overlap: minimum overlap of neighbouring tiles in pixels (multiple of ``s``).
        margin: backbone tiles: pixels next to an inner tile edge with weight 0
            (``overlap / 4``); the weight reaches 1 at ``2 * margin``.
        ys, xs: tile origins (multiples of ``s``, increasing); tiles are ``ys x xs``.
    """

    size: tuple[int, int]
    stride: int
    tile: int
    overlap: int
    margin: float
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def tiled(self) -> bool:
        """Whether there is more than one tile."""
        return self.n_tiles > 1

    def windows(self) -> Iterator[tuple[int, int, int, int]]:
        """``(y0, y1, x0, x1)`` of each tile in raster order, clipped to the image."""
        (H, W), t = self.size, self.tile
        for y in self.ys:
            for x in self.xs:
                yield y, min(y + t, H), x, min(x + t, W)


def _axis_origins(length: int, tile: int, overlap: int, stride: int) -> tuple[int, ...]:
    """Fewest stride-aligned origins such that neighbours overlap by >= ``overlap`` and the last
    tile ends at the padded length; spread evenly (steps differ by at most one cell)."""
    padded = -(-length // stride) * stride
    if padded <= tile:
        return (0,)
    n = -(-(padded - overlap) // (tile - overlap))
    cells = (padded - tile) // stride
    return tuple(sorted({stride * ((2 * k * cells + n - 1) // (2 * (n - 1))) for k in range(n)}))


def plan_tiles(size: tuple[int, int], stride: int, tile: int, overlap: int,
               margin: float | None = None) -> TilePlan:
    """Tiles of side ``tile`` over an image of ``size = (H, W)``.

    Neighbouring tiles overlap by at least ``overlap`` pixels; the fewest tiles that allow it
    are spread evenly, so some overlaps are up to one cell larger. ``tile >= 2 * overlap``.

    Example:
        >>> p = plan_tiles((500, 300), stride=14, tile=224, overlap=56)
        >>> p.ys, p.xs, p.n_tiles
        ((0, 140, 280), (0, 84), 6)
    """
    H, W = size
    for name, v in (("H", H), ("W", W), ("stride", stride), ("tile", tile)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if tile % stride:
        raise ValueError(f"tile={tile} px must be a multiple of the backbone stride {stride}")
    if not isinstance(overlap, int) or overlap < 0 or overlap % stride:
        raise ValueError(f"overlap={overlap!r} px must be a non-negative multiple of the stride "
                         f"{stride}")
    if tile < 2 * overlap:
        raise ValueError(f"tile={tile} px must be at least 2 x overlap ({2 * overlap} px)")
    margin = overlap / 4 if margin is None else float(margin)
    if not 0 <= margin <= overlap / 4:
        raise ValueError(f"margin={margin} px must be in [0, overlap/4 = {overlap / 4}]")
    return TilePlan((H, W), stride, tile, overlap, margin, _axis_origins(H, tile, overlap, stride),
                    _axis_origins(W, tile, overlap, stride))



def owned_spans(length: int, origins: tuple[int, ...], tile: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the pixels each tile writes along one axis: neighbours split
    their overlap in the middle, so the spans partition ``[0, length)``.

    Example:
        >>> owned_spans(500, (0, 140, 280), 224)
        [(0, 182), (182, 322), (322, 500)]
    """
    ends = [min(o + tile, length) for o in origins]
    cuts = [0, *((origins[k + 1] + ends[k]) // 2 for k in range(len(origins) - 1)), length]
    return list(itertools.pairwise(cuts))



# A ViT's attention costs ~tokens² (1.2e12 FLOP per 1000² tokens for ViT-S): past ~2000x1500 px
# one backbone pass takes minutes, so larger images get backbone tiles of <= 64x64 cells
# (896 px at stride 14, ~1.5 s each on 2 cores) even when one pass would fit in memory.
WHOLE_BACKBONE_TOKENS = 128 * 128
BACKBONE_TILE_CELLS = 64


@dataclass(frozen=True)
class MemoryPlan:
    """Untiled and tiled estimates for one image, and the chosen tiles of both stages.

    Attributes:
        size: ``(H, W)``.  budget: the allowed bytes (``base`` included).  base: bytes the
        process held before the run (counted against ``budget``).  output: bytes of the ``(C, H, W)`` result
        in the output dtype.  untiled: estimated bytes of one pass.  tiled: estimated peak of
        the two tiled stages (equal to ``untiled`` when nothing is tiled).
        plan: the upsampler's tiles.  backbone_plan: the backbone's tiles (usually one).
        output_in_memory: whether ``output`` is counted (else it streams to a file).
    """

    size: tuple[int, int]
    budget: int
    output: int
    untiled: int
    tiled: int
    plan: TilePlan
    backbone_plan: TilePlan
    output_in_memory: bool = True
    base: int = 0

    @property
    def is_tiled(self) -> bool:
        """Whether either stage runs in more than one tile."""
        return self.plan.tiled or self.backbone_plan.tiled

    @property
    def bytes(self) -> int:
        """Estimated bytes of the chosen run (``base`` not included)."""
        return self.tiled if self.is_tiled else self.untiled

    def message(self, what: str = "image") -> str:
        """One line: size, output, estimates, budget, tiles."""
        (H, W), p, b = self.size, self.plan, self.backbone_plan
        where = "" if self.output_in_memory else " (streamed to disk)"
        head = f"{what}: {H}x{W} px, output {format_bytes(self.output)}{where}"
        one = f"one pass {'would need' if self.is_tiled else 'needs'} ~{format_bytes(self.untiled)}"
        over = " >" if self.untiled + self.base > self.budget else ","
        budget = f"budget {format_bytes(self.budget)}" + (
            f" - {format_bytes(self.base)} already in use" if self.base else "")
        if not self.is_tiled:
            return f"{head}; {one}{over} {budget}"
        return (f"{head}; {one}{over} {budget}: upsampler in {_tiles(p)}, backbone in "
                f"{_tiles(b)}, ~{format_bytes(self.tiled)}")


def _tiles(p: TilePlan) -> str:
    if not p.tiled:
        return "one pass"
    return f"{len(p.ys)}x{len(p.xs)} tiles of {p.tile} px (overlap {p.overlap} px)"


def _largest(cost: Callable[[int], int], budget: int, lo: int, hi: int, s: int) -> int | None:
    """Largest multiple of ``s`` in ``[lo, hi]`` with ``cost <= budget`` (cost grows with it)."""
    lo = -(-lo // s) * s
    if lo >= hi:
        return hi if cost(hi) <= budget else None
    if cost(lo) > budget:
        return None
    while hi - lo > s:
        mid = (lo + hi) // 2 // s * s
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return hi if cost(hi) <= budget else lo


def plan_memory(model: torch.nn.Module, size: tuple[int, int], budget: int,
                dtype: torch.dtype = torch.float32, output_in_memory: bool = True,
                tile: int | None = None, overlap: int | None = None,
                backbone_tile: int | None = None, base: int = 0, extra: int = 0,
                uint8_image: bool = False) -> MemoryPlan:
    """Estimate one image's run; if it exceeds ``budget`` bytes, pick tiles for each stage.

    Args:
        model: an :class:`upfeat.UpFeat`.  size: ``(H, W)`` of the image.
        dtype: the output dtype.  output_in_memory: whether the whole ``(C, H, W)`` output is
            held in memory (``False`` when it is streamed to a file).
        tile: force the upsampler's tile side (pixels, a multiple of the stride).
        overlap: upsampler tile overlap in pixels (default
            :func:`default_overlap`).
        backbone_tile: force tiles for the backbone too (overlap
            :data:`BACKBONE_OVERLAP_CELLS` cells).
        base: bytes the process already holds (e.g. :func:`~upfeat.inference.memory.resident_memory` after loading the
            model); the run gets ``budget - base``.
        extra: bytes held through the whole run besides (e.g. the ``--viz`` preview panels).
        uint8_image: the image is held as uint8 and converted one tile at a time
            (:func:`upfeat.inference.tiled.pixels`), instead of held as float32.

    The backbone runs in one pass whenever that fits and has at most
    :data:`WHOLE_BACKBONE_TOKENS` tokens (it is the only stage whose features change when
    tiled), else in tiles of at most :data:`BACKBONE_TILE_CELLS` cells; each stage otherwise
    gets the largest tile (a multiple of the stride, at least twice its overlap) whose estimate
    fits. Raises ``MemoryError`` (one line) if even the smallest tiles do not fit.
    """
    (H, W), s, C = size, model.stride, model.dim
    output = C * H * W * torch.empty((), dtype=dtype).element_size()
    image, low = IMAGE_BYTES_PER_PX * H * W, C * grid_size(model, H, W)[1] * 4
    held = (UINT8_IMAGE_BYTES_PER_PX if uint8_image else IMAGE_BYTES_PER_PX) * H * W + extra
    window = IMAGE_BYTES_PER_PX - UINT8_IMAGE_BYTES_PER_PX if uint8_image else 0  # per tile px
    converted = output_in_memory and dtype != torch.float32  # a second copy in another dtype
    untiled = image + extra + forward_bytes(model, H, W) + (output if converted else 0)
    full = max(-(-H // s), -(-W // s)) * s
    one = plan_tiles((H, W), s, full, 0)
    total, budget = budget, budget - base  # what the run itself may use
    if budget <= 0:
        raise MemoryError(f"the process already uses {format_bytes(base)} (torch and the "
                          f"model), over the budget of {format_bytes(total)}; raise --max-memory")
    small = grid_size(model, H, W)[1] <= WHOLE_BACKBONE_TOKENS
    if tile is None and backbone_tile is None and untiled <= budget and small:
        return MemoryPlan((H, W), total, output, untiled, untiled, one, one, output_in_memory,
                          base)
    if output_in_memory and output > budget:
        raise MemoryError(f"the {C}x{H}x{W} output alone is {format_bytes(output)}, over the "
                          f"budget of {format_bytes(budget)}; stream it to a file (upfeat "
                          f"upsample), shrink the image, or use float16")
    itemsize = torch.empty((), dtype=dtype).element_size()

    def kept(t: int) -> int:  # the output, or the writer's band of rows (at most a tile high)
        return output if output_in_memory else stream_bytes(min(t, H), W, itemsize)

    def stage1(t: int) -> int:  # image + low-res features + the backbone on one tile
        h, w = min(t, H), min(t, W)
        return held + window * h * w + low + backbone_bytes(model, h, w)

    def stage2(t: int) -> int:  # ... + the upsampler on one tile (+ the output or its pages)
        h, w = min(t, H), min(t, W)
        return held + window * h * w + low + upsampler_bytes(model, h, w, result=False) + kept(t)

    ov_b = BACKBONE_OVERLAP_CELLS * s
    ov_u = default_overlap(getattr(model.upsampler, "name", ""), s) if overlap is None else overlap
    whole = stage1(full) <= budget and grid_size(model, H, W)[1] <= WHOLE_BACKBONE_TOKENS
    cap = max(BACKBONE_TILE_CELLS * s, 2 * ov_b)
    tb = backbone_tile or (full if whole else _largest(stage1, budget, 2 * ov_b, min(full, cap), s))
    tu = tile or _largest(stage2, budget, 2 * ov_u, full, s)
    if tb is None or tu is None:
        need = max(stage1(2 * ov_b), stage2(2 * ov_u))
        raise MemoryError(
            f"{H}x{W} px needs ~{format_bytes(need)} even in the smallest tiles "
            f"({2 * ov_u} px; one pass: ~{format_bytes(untiled)}), over the budget of "
            f"{format_bytes(budget)}{f' left of {format_bytes(total)}' if base else ''}; raise "
            f"--max-memory or shrink the image (--max-side)")
    plan = plan_tiles((H, W), s, tu, min(ov_u, tu // 2 // s * s))
    bplan = plan_tiles((H, W), s, tb, min(ov_b, tb // 2 // s * s))
    return MemoryPlan((H, W), total, output, untiled, max(stage1(tb), stage2(tu)), plan, bplan,
                      output_in_memory, base)
