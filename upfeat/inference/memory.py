"""How much memory an upsampling run needs: byte estimates, and reading/printing budgets.

Estimates are in bytes, for float32 compute, on top of the process itself and the model weights
(~0.8 GB resident for vits14_focus + JBU, 0.5 GB of it torch alone; ``upfeat upsample`` measures
it, :func:`resident_memory`, and plans the rest of its budget: ``base`` of
:func:`upfeat.inference.planning.plan_memory`). Measured on this project's 2-core CPU machine with
``benchmarks/bench_memory.py`` (peak resident memory of one forward in a fresh process,
``benchmarks/results/memory.json``) and rounded up; they hold within ~10 % for ViT-S/14 +
bilinear / JBU from 224² to 896², and are rough for other backbones. For an ``H x W`` image with
``px = Hp * Wp`` pixels padded to the stride ``s``, ``N = px / s²`` tokens and ``C = dim``:

- backbone:   ``26 * N * C * 4`` (ViT-S/14 measured 20.5-25.4; attention is fused, so linear in N)
- upsampler:  nearest / bilinear / bicubic ``C * 4 * px`` (the output, measured exactly).
  JBU stack (any upsampler whose ``forward`` takes a ``sink``, :func:`takes_sink`):
  ``(0.4 * C + 1.2 * G) * 4 * px + 900 * px + 72 MiB`` with ``G = min(C, 64)``, plus the
  ``C * 4 * px`` result when it is held (``result=True``). Under ``torch.inference_mode`` each
  JBU step upsamples :data:`~upfeat.upsamplers.jbu.CHANNEL_GROUP` = 64 channels at a time, and
  with a sink the last step's groups go straight to the output file, so only the last step's
  input (``0.33 * C * 4`` per px) grows with C. Measured for the shipped stack (vits14_focus, C =
  384, streamed, output-buffer pool off, ``tests/test_memory_estimate.py`` checks one tile):
  135 / 396 / 789 MB at 224² / 448² / 672² (~1650 B/px + ~60 MB; estimate 167 / 441 / 897 MB).
  Other learned upsamplers: ``(2.2 * C * 4 + 1200) * px + 96 MiB`` (fitted ``(2.07 * C * 4 +
  1130) * px + ~90 MiB`` at 448² and 896² for C = 16, 64, 384 before the channel groups;
  the C = 384 rows are in memory.json).
- one forward: ``max(backbone, upsampler) + C * N * 4`` (the low-res features stay alive)
- image: ``15 * H * W`` (8-bit RGB + float32 tensor); tiled runs of ``upfeat upsample`` hold it
  as uint8 (``3 * H * W``) and convert one tile at a time (``12 * t²``)

Untiled run = image + forward(H, W) (+ output, if kept in memory in another dtype); tiled runs:
:mod:`upfeat.inference.planning`.

Whole ``upfeat upsample`` runs (peak RSS of the process, output streamed) are measured by
``bench_memory.py --cli`` (``benchmarks/results/memory_cli.md``): 2000x1500 at 1 GB with the
JBU peaked at 1.03 x the budget (238-px tiles: ~850 MB of the 1 GB is torch and the model).
"""
from __future__ import annotations

import inspect
import os
import re

import torch

from ..upsamplers.jbu import CHANNEL_GROUP

__all__ = ["available_memory", "backbone_bytes", "format_bytes", "forward_bytes", "grid_size",
           "parse_bytes", "resident_memory", "stream_bytes", "takes_sink", "upsampler_bytes"]

MiB = 2**20
K_BACKBONE = 26.0
_INTERP = ("nearest", "bilinear", "bicubic")
K_LEARNED, K_GROUP, PER_PX_LEARNED, CONST_LEARNED = 0.4, 1.0, 800, 8 * MiB
K_OTHER, PER_PX_OTHER, CONST_OTHER = 2.2, 1200, 96 * MiB
IMAGE_BYTES_PER_PX = 15
UINT8_IMAGE_BYTES_PER_PX = 3
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


def grid_size(model: torch.nn.Module, height: int, width: int) -> tuple[int, int]:
    """``(pixels, tokens)`` of an image padded to the stride."""
    s = model.stride
    h, w = -(-height // s), -(-width // s)
    return h * w * s * s, h * w


def backbone_bytes(model: torch.nn.Module, height: int, width: int) -> int:
    """Estimated peak bytes of the backbone on one image (activations + its low-res result)."""
    _, tokens = grid_size(model, height, width)
    return int((K_BACKBONE + 1) * tokens * model.dim * 4)


def stream_bytes(rows: int, width: int, itemsize: int) -> int:
    """Bytes :class:`~upfeat.inference.featfile.FeatureWriter` holds while it completes a band
    of ``rows`` rows of a ``width``-wide output: one channel's parked part read back plus the
    assembled rows (the channel being cast included), ``2 * rows * width * itemsize`` (14 MB
    for 600 x 6000 float16)."""
    return 2 * rows * width * itemsize


def takes_sink(upsampler: torch.nn.Module) -> bool:
    """Whether ``upsampler(feats, image, sink=...)`` hands its result over in channel blocks
    (:meth:`upfeat.upsamplers.JBUStack.forward`) instead of returning it."""
    return "sink" in inspect.signature(upsampler.forward).parameters


def upsampler_bytes(model: torch.nn.Module, height: int, width: int, result: bool = True) -> int:
    """Estimated peak bytes of the upsampler on one image; ``result``: including its float32
    result (``False``: the result goes to a sink channel group by group, :func:`takes_sink`)."""
    px, _ = grid_size(model, height, width)
    C = model.dim
    if not _learned(model):
        return C * 4 * px
    if not takes_sink(model.upsampler):
        return int((K_OTHER * C * 4 + PER_PX_OTHER) * px + CONST_OTHER)
    per_px = (K_LEARNED * C + K_GROUP * min(C, CHANNEL_GROUP)) * 4 + PER_PX_LEARNED
    return int(per_px * px + CONST_LEARNED + (C * 4 * px if result else 0))


def forward_bytes(model: torch.nn.Module, height: int, width: int) -> int:
    """Estimated peak bytes of ``model`` (backbone + upsampler) on one ``height x width`` image,
    float32, including its ``(dim, height, width)`` result (see the module docstring)."""
    _, tokens = grid_size(model, height, width)
    low = model.dim * tokens * 4
    activations = backbone_bytes(model, height, width) - low
    return int(max(activations, upsampler_bytes(model, height, width)) + low)
