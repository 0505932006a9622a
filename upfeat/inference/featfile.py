"""Feature files of ``upfeat upsample``: one ``(C, H, W)`` array per image, written atomically.

- ``.safetensors``: tensor ``"features"``, metadata (all strings) ``format``, ``backbone``,
  ``upsampler``, ``source``, ``size`` (``"H W"`` of the features = the processed image),
  ``original_size``, ``stride``, ``dtype``, ``tiles`` (upsampler tiles), ``backbone_tiles``,
  ``upfeat_version``, ``settings`` (JSON of what made it: a re-run skips the file only when these
  match and the file is complete, :func:`complete_meta`).
- ``.npy``: the array, and the same metadata in ``<stem>.json`` beside it (written first).

The file is created at full size in a temporary file beside the target (disk space reserved up
front, so a full disk fails before any tile is computed), filled block by block with ``pwrite``
(:class:`FeatureWriter`: tiles' blocks are parked in a scratch file and rearranged per band of
rows, so that the output's pages are written once, not once per neighbouring tile), fsync'ed
and renamed. Nothing of the file is mapped, so the resident memory of a run does not grow with
the output: an 18 GB output streams to disk through one channel's band at a time.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
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


def _write_at(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, view, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows: no positioned I/O; one writer, so seek + write
    return os.write(fd, view)


def _read_at(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    data = os.read(fd, len(view))
    view[:len(data)] = data
    return len(data)


class _Band:
    """One band of rows being written: where its parked blocks start in the scratch file,
    ``widths[x0] = w`` of its tiles so far, and per channel how many columns are written (the
    band is complete at ``W``)."""

    def __init__(self, channels: int, base: int) -> None:
        self.base = base
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

    - a block of a tile ending before column ``W`` is parked *tile-major* in an unnamed scratch
      file beside the output (gone with the process, even when killed): channel ``k``'s
      ``h x w`` values contiguous at ``h * x0`` of its ``h * W`` run of the band;
    - the block ending at ``W`` (per channel group, as it arrives) completes its channels:
      each run's parked part is read back (usually from the page cache), assembled with the
      block into ``h x W`` rows and written to the output once, as whole pages;
    - when no band is left open the scratch file is truncated, which drops its pages without
      writing them: parked data reaches the disk only if the kernel flushed it first (its
      timer, 30 s by default, restarts with each band; or more than ~10 % of RAM is dirty).

    So the output's bytes are written once (twice for the page shared by two bands of a
    channel), plus at most once more for parked bytes the kernel flushed; full-width blocks go
    straight to their place. Memory: one channel's band twice, ``2 * h * W * itemsize``
    (:func:`~upfeat.inference.memory.stream_bytes`); disk: one band more. Blocks of a band must
    all have its ``(y0, h)``, and per channel the block ending at ``W`` must come last.
    Positioned I/O (``os.pwrite``, ``os.preadv``; seek + write where there is none: Windows).
    """

    def __init__(self, path: Path, header: bytes, shape: tuple[int, int, int],
                 dtype: torch.dtype) -> None:
        self.shape, self.dtype, self.offset = shape, dtype, len(header)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        with open(path, "wb") as f:
            f.write(header)
        _reserve(path, len(header) + int(np.prod(shape)) * self.itemsize)
        self._fd = os.open(path, os.O_RDWR)
        self._scratch = tempfile.TemporaryFile(dir=path.parent)
        self._scratch_end = 0
        self._bands: dict[tuple[int, int], _Band] = {}

    def write(self, block: torch.Tensor, y0: int = 0, x0: int = 0, c0: int = 0) -> None:
        """Store ``block`` ``(c, h, w)`` (any float dtype, any device) at channels ``c0:c0+c``,
        rows ``y0:y0+h``, columns ``x0:x0+w`` (cast to the file's dtype)."""
        C, H, W = self.shape
        c, h, w = block.shape
        if min(c0, y0, x0) < 0 or c0 + c > C or y0 + h > H or x0 + w > W:
            raise ValueError(f"block {tuple(block.shape)} at ({c0}, {y0}, {x0}) does not fit "
                             f"{self.shape}")
        if w == W:  # whole rows: already in file order
            for k, values in self._cast(block, c0):
                self._pwrite(values, self._run(k, y0))
            return
        band = self._bands.get((y0, h))
        if band is None:
            band = self._bands[(y0, h)] = _Band(C, self._scratch_end)
            self._scratch_end += C * h * W * self.itemsize
        if band.widths.get(x0, w) != w:
            raise ValueError(f"rows {y0}:{y0 + h}: a block at column {x0} is {w} wide, an "
                             f"earlier one {band.widths[x0]}")
        filled = band.filled[c0:c0 + c] + w
        last = x0 + w == W
        if (filled > W).any() or (last and (filled < W).any()):
            raise ValueError(f"rows {y0}:{y0 + h}, channels {c0}:{c0 + c}: the block ending at "
                             f"column {W} must come after the others of its band, once each")
        band.widths[x0], band.filled[c0:c0 + c] = w, filled
        scratch = self._scratch.fileno()
        if not last:  # park it tile-major
            for k, values in self._cast(block, c0):
                self._pwrite(values, band.base + (k * W + x0) * h * self.itemsize, scratch)
            return
        parts = sorted((x, v) for x, v in band.widths.items() if x < x0)
        # one pair of buffers for all channels (fresh ones are new pages to fault in)
        parked = np.empty(h * x0, dtype=_NP[self.dtype])
        rows = np.empty((h, W), dtype=parked.dtype)
        for k, values in self._cast(block, c0):
            self._pread(parked, band.base + k * W * h * self.itemsize, scratch)
            for x, v in parts:
                rows[:, x:x + v] = parked[h * x:h * (x + v)].reshape(h, v)
            rows[:, x0:] = values
            self._pwrite(rows, self._run(k, y0))
        if (band.filled == W).all():
            del self._bands[(y0, h)]
            if not self._bands:  # drop the parked pages, flushed or not
                os.ftruncate(scratch, 0)
                self._scratch_end = 0

    def _cast(self, block: torch.Tensor, c0: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(channel, its (h, w) values in the file's dtype)`` for each channel of ``block``,
        in one buffer. numpy casts (IEEE round to nearest even, as torch's ``.to()``: equal for
        every non-NaN float32): torch's multi-threaded copies of ~1 MB cost ~10x more CPU on a
        busy machine (the threads wait for each other), and casting the whole block at once
        would hold it twice."""
        block = block.detach()
        if block.dtype not in (torch.float16, torch.float32, torch.float64):
            block = block.float()  # e.g. bfloat16: exact in float32
        block = block.cpu()
        buf = np.empty(block.shape[1:], dtype=_NP[self.dtype])
        for k in range(block.shape[0]):
            with np.errstate(over="ignore"):  # > 65504 is inf in float16, as with torch
                np.copyto(buf, block[k].numpy(), casting="same_kind")
            yield c0 + k, buf

    def _run(self, channel: int, y0: int) -> int:
        """File offset of row ``y0`` of ``channel``."""
        _, H, W = self.shape
        return self.offset + (channel * H + y0) * W * self.itemsize

    def _pwrite(self, arr: np.ndarray, offset: int, fd: int | None = None) -> None:
        view = memoryview(arr).cast("B")
        while view:  # regular files write all at once; loop in case of a short write
            n = _write_at(self._fd if fd is None else fd, view, offset)
            view, offset = view[n:], offset + n

    def _pread(self, arr: np.ndarray, offset: int, fd: int) -> None:
        view = memoryview(arr).cast("B")
        while view:
            n = _read_at(fd, view, offset)
            if n == 0:
                raise OSError(f"scratch file ends before byte {offset}")
            view, offset = view[n:], offset + n

    def check_complete(self) -> None:
        """``ValueError`` if a band still has parked blocks (its last block never came)."""
        if self._bands:
            (y0, h), *_ = self._bands
            raise ValueError(f"rows {y0}:{y0 + h} of the features were not all written")

    def close(self) -> None:
        """Close the file (the caller fsyncs it) and drop the scratch file."""
        self._scratch.close()
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
