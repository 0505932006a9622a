"""Feature files of ``upfeat upsample``: one ``(C, H, W)`` array per image, written atomically.

- ``.safetensors``: tensor ``"features"``, metadata (all strings) ``format``, ``backbone``,
  ``upsampler``, ``source``, ``size`` (``"H W"`` of the features = the processed image),
  ``original_size``, ``stride``, ``dtype``, ``tiles`` (upsampler tiles), ``backbone_tiles``,
  ``upfeat_version``, ``settings`` (JSON of what made it: a re-run skips the file only when these
  match and the file is complete, :func:`complete_meta`).
- ``.npy``: the array, and the same metadata in ``<stem>.json`` beside it (written first).

The file is created at full size in a temporary file beside the target (disk space reserved up
front, so a full disk fails before any tile is computed), filled block by block with ``pwrite``
(:class:`FeatureWriter`: tiles' blocks are rearranged per band of rows so that each byte reaches
the disk about once or twice, not once per neighbouring tile), fsync'ed and renamed. Nothing of
the file is mapped, so the resident memory of a run does not grow with the output: an 18 GB
output streams to disk through one channel's band at a time.
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

from ..checkpoint import atomic_write

__all__ = ["DTYPES", "FORMATS", "FeatureWriter", "complete_meta", "read_features", "write_features"]

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


class _Band:
    """Columns of one band of rows received so far: ``widths[x0] = w`` per tile, and per
    channel how many columns are written (the band is complete at ``W``)."""

    def __init__(self, channels: int) -> None:
        self.widths: dict[int, int] = {}
        self.filled = np.zeros(channels, dtype=np.int64)


class FeatureWriter:
    """The ``(C, H, W)`` array of a feature file being written, by ``pwrite`` in bands of rows.

    Tiles of one band (rows ``y0:y0+h``) each own columns ``x0:x0+w``. A channel's band is one
    contiguous run of ``h * W`` values in the file, but a tile holds only a slice of each of its
    rows: written in place, a page (4 KiB; a 6000 px float16 row is ~3 pages) is shared by
    neighbouring tiles, and the kernel writes it back between their visits (86 GB written for
    an 18 GB file). Rows are only complete after the band's last tile, and holding the band
    until then (``C * h * W`` values, 3.3 GB at 6000 px) does not fit a tight budget, so:

    - a block of a tile ending before column ``W`` is parked *tile-major* inside its own
      band's runs: channel ``k``'s ``h x w`` values contiguous at ``h * x0`` of run ``k`` (the
      tiles partition the run, so nothing else is touched, and its pages are whole);
    - the block ending at ``W`` (per channel group, as it arrives) completes its channels:
      each run's parked part is read back (usually from the page cache), assembled with the
      block into ``h x W`` rows and written over the run.

    So a byte is written twice at most (once more only if the kernel wrote the parked page
    back before the band completed), the last tile's once; full-width blocks go straight to
    their place. Memory: one channel's band twice, ``2 * h * W * itemsize``
    (:func:`~upfeat.inference.memory.stream_bytes`). Blocks of a band must all have its
    ``(y0, h)``, and per channel the block ending at ``W`` must come last. POSIX positioned
    I/O (``os.pwrite``, ``os.preadv``: Linux, macOS).
    """

    def __init__(self, path: Path, header: bytes, shape: tuple[int, int, int],
                 dtype: torch.dtype) -> None:
        self.shape, self.dtype, self.offset = shape, dtype, len(header)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        with open(path, "wb") as f:
            f.write(header)
        _reserve(path, len(header) + int(np.prod(shape)) * self.itemsize)
        self._fd = os.open(path, os.O_RDWR)
        self._bands: dict[tuple[int, int], _Band] = {}

    def write(self, block: torch.Tensor, y0: int = 0, x0: int = 0, c0: int = 0) -> None:
        """Store ``block`` ``(c, h, w)`` (any float dtype, any device) at channels ``c0:c0+c``,
        rows ``y0:y0+h``, columns ``x0:x0+w`` (cast to the file's dtype)."""
        C, H, W = self.shape
        c, h, w = block.shape
        if min(c0, y0, x0) < 0 or c0 + c > C or y0 + h > H or x0 + w > W:
            raise ValueError(f"block {tuple(block.shape)} at ({c0}, {y0}, {x0}) does not fit "
                             f"{self.shape}")
        # buffers shared by the block's channels: fresh ones per channel would each be new
        # pages to fault in (they are mmap'ed by malloc above 1 MiB)
        if w == W:  # whole rows: already in file order
            rows = np.empty((h, w), dtype=_NP[self.dtype])
            for k in range(c):
                torch.from_numpy(rows).copy_(block[k])  # the cast torch's .to() does
                self._pwrite(rows, self._run(c0 + k, y0))
            return
        band = self._bands.setdefault((y0, h), _Band(C))
        if band.widths.get(x0, w) != w:
            raise ValueError(f"rows {y0}:{y0 + h}: a block at column {x0} is {w} wide, an "
                             f"earlier one {band.widths[x0]}")
        filled = band.filled[c0:c0 + c] + w
        last = x0 + w == W
        if (filled > W).any() or (last and (filled < W).any()):
            raise ValueError(f"rows {y0}:{y0 + h}, channels {c0}:{c0 + c}: the block ending at "
                             f"column {W} must come after the others of its band, once each")
        band.widths[x0], band.filled[c0:c0 + c] = w, filled
        if not last:  # park it tile-major in its runs
            tile = np.empty((h, w), dtype=_NP[self.dtype])
            for k in range(c):
                torch.from_numpy(tile).copy_(block[k])
                self._pwrite(tile, self._run(c0 + k, y0) + h * x0 * self.itemsize)
            return
        parts = sorted((x, v) for x, v in band.widths.items() if x < x0)
        parked = np.empty(h * x0, dtype=_NP[self.dtype])
        rows = np.empty((h, W), dtype=parked.dtype)
        for k in range(c):
            run = self._run(c0 + k, y0)
            self._pread(parked, run)
            for x, v in parts:
                rows[:, x:x + v] = parked[h * x:h * (x + v)].reshape(h, v)
            torch.from_numpy(rows)[:, x0:].copy_(block[k])
            self._pwrite(rows, run)
        if (band.filled == W).all():
            del self._bands[(y0, h)]

    def _run(self, channel: int, y0: int) -> int:
        """File offset of row ``y0`` of ``channel``."""
        _, H, W = self.shape
        return self.offset + (channel * H + y0) * W * self.itemsize

    def _pwrite(self, arr: np.ndarray, offset: int) -> None:
        view = memoryview(arr).cast("B")
        while view:  # regular files write all at once; loop in case of a short write
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def _pread(self, arr: np.ndarray, offset: int) -> None:
        view = memoryview(arr).cast("B")
        while view:
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise OSError(f"feature file ends before byte {offset}")
            view, offset = view[n:], offset + n

    def check_complete(self) -> None:
        """``ValueError`` if a band still has parked blocks (its last block never came)."""
        if self._bands:
            (y0, h), *_ = self._bands
            raise ValueError(f"rows {y0}:{y0 + h} of the features were not all written")

    def close(self) -> None:
        """Close the file (the caller fsyncs it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_features(path: str | os.PathLike[str], shape: tuple[int, int, int], dtype: torch.dtype,
                   meta: dict[str, str], fill: Callable[[FeatureWriter], None]) -> Path:
    """Create ``path`` (``.safetensors`` or ``.npy``) holding a ``shape`` array of ``dtype``.

    ``fill(out)`` gets the :class:`FeatureWriter` of the temporary file and must write every
    element (``out.write(block, y0, x0, c0)``, bands as it says). The target appears only
    complete.
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
        out = FeatureWriter(tmp, header, shape, dtype)
        try:
            fill(out)
            out.check_complete()
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
