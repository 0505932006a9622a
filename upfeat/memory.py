"""How much memory an upsampling run needs, and the tile size that keeps it under a budget.

Estimates are in bytes, for float32 compute, on top of the process itself and the model weights
(~0.8 GB resident for vits14_focus + JBU, 0.5 GB of it torch alone; ``upfeat upsample`` measures
it, :func:`resident_memory`, and plans the rest of its budget: ``base`` of :func:`plan_memory`). Measured on this project's 2-core CPU machine with
``benchmarks/bench_memory.py`` (peak resident memory of one forward in a fresh process,
``benchmarks/results/memory.json``) and rounded up; they hold within ~10 % for ViT-S/14 +
bilinear / JBU from 224² to 896², and are rough for other backbones. For an ``H x W`` image with
``px = Hp * Wp`` pixels padded to the stride ``s``, ``N = px / s²`` tokens and ``C = dim``:

- backbone:   ``26 * N * C * 4`` (ViT-S/14 measured 20.5-25.4; attention is fused, so linear in N)
- upsampler:  nearest / bilinear / bicubic ``C * 4 * px`` (the output, measured exactly);
  JBU stack and other learned ones ``(2.2 * C * 4 + 1200) * px + 96 MiB`` (fitted
  ``(2.07 * C * 4 + 1130) * px + ~90 MiB`` from one-off runs of the same measurement at 448²
  and 896² for C = 16, 64, 384; the C = 384 rows are in memory.json)
- one forward: ``max(backbone, upsampler) + C * N * 4`` (the low-res features stay alive)
- image: ``15 * H * W`` (8-bit RGB + float32 tensor)

Untiled run = image + forward(H, W) (+ output, if kept in memory in another dtype). Tiled run =
the larger of its two stages (:mod:`upfeat.tiling`), both holding the image and the low-res
features ``C * N * 4``:

- stage 1: + backbone on the whole image, or on one backbone tile if that does not fit;
- stage 2: + upsampler on one tile of ``T x T`` px (its result included; the tile's owned part
  goes straight to the output), + the output if it is held in memory (``C * H * W * itemsize``)
  or, when it streams to a file (``upfeat upsample``), the pages of one written channel group
  (:data:`STREAM_BYTES`, :class:`upfeat.featfile.MappedFeatures`).

Whole ``upfeat upsample`` runs (peak RSS of the process, output streamed) are measured by
``bench_memory.py --cli`` (``benchmarks/results/memory_cli.md``): 2000x1500 at 1 GB with
bilinear peaked at 1.07 x the budget.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .tiling import BACKBONE_OVERLAP_CELLS, TilePlan, default_overlap, plan_tiles

__all__ = ["MemoryPlan", "available_memory", "backbone_bytes", "format_bytes", "forward_bytes",
           "parse_bytes", "plan_memory", "resident_memory", "upsampler_bytes"]

MiB = 2**20
K_BACKBONE = 26.0
_INTERP = ("nearest", "bilinear", "bicubic")
K_LEARNED, PER_PX_LEARNED, CONST_LEARNED = 2.2, 1200, 96 * MiB
IMAGE_BYTES_PER_PX = 15
# A ViT's attention costs ~tokens² (1.2e12 FLOP per 1000² tokens for ViT-S): past ~2000x1500 px
# one backbone pass takes minutes, so larger images get backbone tiles of <= 64x64 cells
# (896 px at stride 14, ~1.5 s each on 2 cores) even when one pass would fit in memory.
WHOLE_BACKBONE_TOKENS = 128 * 128
BACKBONE_TILE_CELLS = 64
STREAM_BYTES = 16 * MiB  # mapped output pages resident while one block is written
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def available_memory() -> int:
    """Bytes of RAM available now (Linux ``MemAvailable``; else total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_memory() -> int:
    """Bytes this process holds in RAM now (Linux ``VmRSS``; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def parse_bytes(text: str | int | float, name: str = "--max-memory") -> int:
    """``'4GB'``, ``'512MiB'``, ``'1.5g'``, ``'2000000'`` (bytes) or ``'50%'`` (of the RAM
    available now) -> bytes. Raises a one-line ``ValueError`` naming ``name``.

    Example:
        >>> parse_bytes("4GB"), parse_bytes("512 MiB"), parse_bytes(1000)
        (4000000000, 536870912, 1000)
    """
    s = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[kmgt]?i?b?)", s)
    if m is None or (m.group(2) not in _UNITS and m.group(2) != "%"):
        raise ValueError(f"{name} must be a size like 4GB, 512MB, 1.5GiB or 50% (of available "
                         f"RAM), got {text!r}")
    value = float(m.group(1))
    unit = m.group(2)
    if unit == "%" and value > 100:
        raise ValueError(f"{name} is a share of the available RAM: at most 100%, got {text!r}")
    n = int(value / 100 * available_memory()) if unit == "%" else int(value * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    return n


def format_bytes(n: float) -> str:
    """``3.2 GB``-style text (decimal units, as :func:`parse_bytes` reads them)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _learned(model: torch.nn.Module) -> bool:
    return getattr(model.upsampler, "name", "") not in _INTERP


def _grid(model: torch.nn.Module, height: int, width: int) -> tuple[int, int]:
    """``(pixels, tokens)`` of an image padded to the stride."""
    s = model.stride
    h, w = -(-height // s), -(-width // s)
    return h * w * s * s, h * w


def backbone_bytes(model: torch.nn.Module, height: int, width: int) -> int:
    """Estimated peak bytes of the backbone on one image (activations + its low-res result)."""
    _, tokens = _grid(model, height, width)
    return int((K_BACKBONE + 1) * tokens * model.dim * 4)


def upsampler_bytes(model: torch.nn.Module, height: int, width: int) -> int:
    """Estimated peak bytes of the upsampler on one image, including its float32 result."""
    px, _ = _grid(model, height, width)
    C = model.dim
    if not _learned(model):
        return C * 4 * px
    return int((K_LEARNED * C * 4 + PER_PX_LEARNED) * px + CONST_LEARNED)


def forward_bytes(model: torch.nn.Module, height: int, width: int) -> int:
    """Estimated peak bytes of ``model`` (backbone + upsampler) on one ``height x width`` image,
    float32, including its ``(dim, height, width)`` result (see the module docstring)."""
    _, tokens = _grid(model, height, width)
    low = model.dim * tokens * 4
    activations = backbone_bytes(model, height, width) - low
    return int(max(activations, upsampler_bytes(model, height, width)) + low)


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
                backbone_tile: int | None = None, base: int = 0) -> MemoryPlan:
    """Estimate one image's run; if it exceeds ``budget`` bytes, pick tiles for each stage.

    Args:
        model: an :class:`upfeat.UpFeat`.  size: ``(H, W)`` of the image.
        dtype: the output dtype.  output_in_memory: whether the whole ``(C, H, W)`` output is
            held in memory (``False`` when it is streamed to a memory-mapped file).
        tile: force the upsampler's tile side (pixels, a multiple of the stride).
        overlap: upsampler tile overlap in pixels (default
            :func:`~upfeat.tiling.default_overlap`).
        backbone_tile: force tiles for the backbone too (overlap
            :data:`~upfeat.tiling.BACKBONE_OVERLAP_CELLS` cells).
        base: bytes the process already holds (e.g. :func:`resident_memory` after loading the
            model); the run gets ``budget - base``.

    The backbone runs in one pass whenever that fits and has at most
    :data:`WHOLE_BACKBONE_TOKENS` tokens (it is the only stage whose features change when
    tiled), else in tiles of at most :data:`BACKBONE_TILE_CELLS` cells; each stage otherwise
    gets the largest tile (a multiple of the stride, at least twice its overlap) whose estimate
    fits. Raises ``MemoryError`` (one line) if even the smallest tiles do not fit.
    """
    (H, W), s, C = size, model.stride, model.dim
    output = C * H * W * torch.empty((), dtype=dtype).element_size()
    image, low = IMAGE_BYTES_PER_PX * H * W, C * _grid(model, H, W)[1] * 4
    converted = output_in_memory and dtype != torch.float32  # a second copy in another dtype
    untiled = image + forward_bytes(model, H, W) + (output if converted else 0)
    full = max(-(-H // s), -(-W // s)) * s
    one = plan_tiles((H, W), s, full, 0)
    total, budget = budget, budget - base  # what the run itself may use
    if budget <= 0:
        raise MemoryError(f"the process already uses {format_bytes(base)} (torch and the "
                          f"model), over the budget of {format_bytes(total)}; raise --max-memory")
    small = _grid(model, H, W)[1] <= WHOLE_BACKBONE_TOKENS
    if tile is None and backbone_tile is None and untiled <= budget and small:
        return MemoryPlan((H, W), total, output, untiled, untiled, one, one, output_in_memory,
                          base)
    if output_in_memory and output > budget:
        raise MemoryError(f"the {C}x{H}x{W} output alone is {format_bytes(output)}, over the "
                          f"budget of {format_bytes(budget)}; stream it to a file (upfeat "
                          f"upsample), shrink the image, or use float16")
    kept = output if output_in_memory else STREAM_BYTES

    def stage1(t: int) -> int:  # image + low-res features + the backbone on one tile
        return image + low + backbone_bytes(model, min(t, H), min(t, W))

    def stage2(t: int) -> int:  # ... + the upsampler on one tile (+ the output or its pages)
        return image + low + upsampler_bytes(model, min(t, H), min(t, W)) + kept

    ov_b = BACKBONE_OVERLAP_CELLS * s
    ov_u = default_overlap(getattr(model.upsampler, "name", ""), s) if overlap is None else overlap
    whole = stage1(full) <= budget and _grid(model, H, W)[1] <= WHOLE_BACKBONE_TOKENS
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
