"""Feature files of ``upfeat upsample``: one ``(C, H, W)`` array per image, written atomically.

- ``.safetensors``: tensor ``"features"``, metadata (all strings) ``format``, ``backbone``,
  ``upsampler``, ``source``, ``size`` (``"H W"`` of the features = the processed image),
  ``original_size``, ``stride``, ``dtype``, ``tiles`` (upsampler tiles), ``backbone_tiles``,
  ``upfeat_version``, ``settings`` (JSON of what made it: a re-run skips the file only when these
  match and the file is complete, :func:`complete_meta`).
- ``.npy``: the array, and the same metadata in ``<stem>.json`` beside it (written first).

The file is created at full size in a temporary file beside the target (disk space reserved up
front, so a full disk fails cleanly instead of crashing a memory-mapped write), filled through a
memory map (so outputs larger than RAM stream to disk tile by tile), fsync'ed and renamed.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write

__all__ = ["DTYPES", "FORMATS", "complete_meta", "read_features", "write_features"]

FORMATS = ("safetensors", "npy")
DTYPES = {"float16": (torch.float16, "F16"), "float32": (torch.float32, "F32")}
_NP = {torch.float16: np.float16, torch.float32: np.float32}


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` on disk now (``OSError`` ENOSPC here rather than SIGBUS later)."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except (AttributeError, OSError) as e:  # no fallocate (macOS, some file systems)
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            f.truncate(nbytes)


def _safetensors_map(path: Path, shape: tuple[int, ...], dtype: torch.dtype,
                     meta: dict[str, str]) -> np.memmap:
    code = {t: c for t, c in DTYPES.values()}[dtype]
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    header = {"features": {"dtype": code, "shape": list(shape), "data_offsets": [0, nbytes]},
              "__metadata__": meta}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data aligned to 8 bytes, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
    _reserve(path, 8 + len(text) + nbytes)
    return np.memmap(path, dtype=_NP[dtype], mode="r+", offset=8 + len(text), shape=shape)


def _npy_map(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> np.memmap:
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=_NP[dtype], shape=shape)
    _reserve(path, arr.offset + arr.nbytes)
    return arr


def write_features(path: str | os.PathLike[str], shape: tuple[int, int, int], dtype: torch.dtype,
                   meta: dict[str, str], fill: Callable[[torch.Tensor], None]) -> Path:
    """Create ``path`` (``.safetensors`` or ``.npy``) holding a ``shape`` array of ``dtype``.

    ``fill(t)`` gets a ``(C, H, W)`` CPU tensor mapped onto the temporary file and must write
    every element (it must not keep references to ``t``). The target appears only complete.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: feature files must end in .safetensors or .npy")
    meta = {k: str(v) for k, v in meta.items()}
    if fmt == "npy":
        atomic_write(path.with_suffix(".json"),
                     lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))

    def write(tmp: Path) -> None:
        if fmt == "npy":
            arr = _npy_map(tmp, shape, dtype)
        else:
            arr = _safetensors_map(tmp, shape, dtype, meta)
        fill(torch.from_numpy(arr))
        arr.flush()
        del arr

    return atomic_write(path, write)


def complete_meta(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The metadata of a finished feature file, or ``None`` when it is missing, truncated,
    unreadable or not a feature file (so a re-run redoes it). Reads headers only."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")  # raises when the data is shorter than the header says
            if arr.ndim != 3 or path.stat().st_size != arr.offset + arr.nbytes:
                return None
            side = path.with_suffix(".json")
            return json.loads(side.read_text()) if side.is_file() else None
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        info = header["features"]
        if path.stat().st_size != 8 + n + info["data_offsets"][1] or len(info["shape"]) != 3:
            return None
        meta = header.get("__metadata__") or {}
        return meta if meta.get("format") == "upfeat.features/1" else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def read_features(path: str | os.PathLike[str]) -> tuple[torch.Tensor, dict[str, str]]:
    """``(features (C, H, W), metadata)`` of a file written by :func:`write_features`."""
    path = Path(path)
    if path.suffix == ".npy":
        side = path.with_suffix(".json")
        meta = json.loads(side.read_text()) if side.is_file() else {}
        return torch.from_numpy(np.load(path)), meta
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("features"), dict(f.metadata() or {})
