"""Feature files of ``upfeat upsample``: one ``(C, H, W)`` array per image, written atomically.

- ``.safetensors``: tensor ``"features"``, metadata (all strings) ``format``, ``backbone``,
  ``upsampler``, ``source``, ``size`` (``"H W"`` of the features = the processed image),
  ``original_size``, ``stride``, ``dtype``, ``tiles`` (upsampler tiles), ``backbone_tiles``,
  ``upfeat_version``, ``settings`` (JSON of what made it: a re-run skips the file only when these
  match and the file is complete, :func:`complete_meta`).
- ``.npy``: the array, and the same metadata in ``<stem>.json`` beside it (written first).

The file is created at full size in a temporary file beside the target (disk space reserved up
front, so a full disk fails cleanly instead of crashing a memory-mapped write), filled block by
block through a memory map (:class:`MappedFeatures`), fsync'ed and renamed. Written pages are
dropped from the process right away (they stay in the kernel's page cache until written back),
so the resident memory of a run does not grow with the output: an 18 GB output streams to disk
with a few MB of it mapped at any time.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write

__all__ = ["DTYPES", "FORMATS", "MappedFeatures", "complete_meta", "read_features", "write_features"]

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


def _safetensors_header(shape: tuple[int, ...], dtype: torch.dtype, meta: dict[str, str]) -> bytes:
    code = {t: c for t, c in DTYPES.values()}[dtype]
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    header = {"features": {"dtype": code, "shape": list(shape), "data_offsets": [0, nbytes]},
              "__metadata__": meta}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data aligned to 8 bytes, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def _npy_header(shape: tuple[int, ...], dtype: torch.dtype) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(_NP[dtype]).str,
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


class MappedFeatures:
    """The ``(C, H, W)`` array of a feature file being written, memory-mapped.

    :meth:`write` copies a block in groups of channels and drops each group's pages from this
    process right after (``madvise(MADV_DONTNEED)``: dirty pages stay in the page cache and
    are written back by the kernel), so resident memory stays at ~``group_bytes`` however
    large the file. :attr:`tensor` is the whole mapped array (pages touched through it stay
    resident until :meth:`write` or :meth:`release` drops them).
    """

    def __init__(self, path: Path, header: bytes, shape: tuple[int, int, int],
                 dtype: torch.dtype, group_bytes: int = 16 * 2**20) -> None:
        self.shape, self.dtype, self.offset = shape, dtype, len(header)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.group_bytes = group_bytes
        with open(path, "wb") as f:
            f.write(header)
        _reserve(path, len(header) + int(np.prod(shape)) * self.itemsize)
        with open(path, "r+b") as f:
            self._mm = mmap.mmap(f.fileno(), 0)
        arr = np.frombuffer(self._mm, dtype=_NP[dtype], count=int(np.prod(shape)),
                            offset=self.offset)
        self.tensor = torch.from_numpy(arr.reshape(shape))

    def write(self, block: torch.Tensor, y0: int = 0, x0: int = 0, c0: int = 0) -> None:
        """Store ``block`` ``(c, h, w)`` (any float dtype, any device) at channels ``c0:c0+c``,
        rows ``y0:y0+h``, columns ``x0:x0+w`` (cast to the file's dtype)."""
        C, H, W = self.shape
        c, h, w = block.shape
        if min(c0, y0, x0) < 0 or c0 + c > C or y0 + h > H or x0 + w > W:
            raise ValueError(f"block {tuple(block.shape)} at ({c0}, {y0}, {x0}) does not fit "
                             f"{self.shape}")
        # bytes one channel touches: whole pages of each of its h row segments
        per_channel = h * (w * self.itemsize if w == W else w * self.itemsize + mmap.PAGESIZE)
        step = max(1, self.group_bytes // max(1, per_channel))
        for i in range(0, c, step):
            j = min(c, i + step)
            self.tensor[c0 + i:c0 + j, y0:y0 + h, x0:x0 + w].copy_(block[i:j])
            self.release(c0 + i, c0 + j, y0, y0 + h)

    def release(self, c0: int = 0, c1: int | None = None, y0: int = 0, y1: int | None = None,
                ) -> None:
        """Drop the pages of channels ``c0:c1``, rows ``y0:y1`` from this process."""
        C, H, W = self.shape
        c1, y1 = C if c1 is None else c1, H if y1 is None else y1
        page = mmap.PAGESIZE
        start = self.offset + (c0 * H + y0) * W * self.itemsize
        end = self.offset + ((c1 - 1) * H + y1) * W * self.itemsize
        start -= start % page
        end = min(len(self._mm), -(-end // page) * page)
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Flush and unmap (``tensor`` must no longer be used)."""
        self._mm.flush()
        del self.tensor
        try:
            self._mm.close()
        except BufferError:  # a caller kept a view: the map closes when that is collected
            pass


def write_features(path: str | os.PathLike[str], shape: tuple[int, int, int], dtype: torch.dtype,
                   meta: dict[str, str], fill: Callable[[MappedFeatures], None]) -> Path:
    """Create ``path`` (``.safetensors`` or ``.npy``) holding a ``shape`` array of ``dtype``.

    ``fill(out)`` gets the :class:`MappedFeatures` of the temporary file and must write every
    element (``out.write(block, y0, x0)``; it must not keep references to ``out.tensor``). The
    target appears only complete.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: feature files must end in .safetensors or .npy")
    meta = {k: str(v) for k, v in meta.items()}
    if fmt == "npy":
        atomic_write(path.with_suffix(".json"),
                     lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    header = (_npy_header(shape, dtype) if fmt == "npy" else
              _safetensors_header(shape, dtype, meta))

    def write(tmp: Path) -> None:
        out = MappedFeatures(tmp, header, shape, dtype)
        try:
            fill(out)
        finally:
            out.close()

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
