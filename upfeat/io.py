"""Reading images for every entry point (training folders, CLI, Python API).

- :func:`find_images` lists the image files under files and folders, sorted.
- :func:`load_image` reads one file as an 8-bit RGB ``PIL.Image``, whatever its mode.
- :func:`iter_images` does both and yields ``(path, image_or_error)``, so a folder run can skip
  bad files and report them at the end.
- :func:`to_tensor` turns a PIL image, array, tensor or list of them into ``(B, 3, H, W)`` float32
  in ``[0, 1]``.

Conversions (the same for files and in-memory images): EXIF orientation applied (files only);
transparency (RGBA, LA, PA, palette or colour-key transparency) composited over ``background``,
white by default, as viewers show such images on a page; 16-bit grayscale (``I;16``, ``I``)
scaled by ``255 / 65535``, not clipped; float (``F``) images must hold values in ``[0, 1]``;
CMYK goes through its embedded ICC profile to sRGB when it has one, else the plain
``(255 - C)(255 - K) / 255`` formula; embedded RGB colour profiles are ignored (as in most training
pipelines). Multi-frame files (GIF, multi-page TIFF) give their first frame. Files are only ever
opened for reading.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ._checks import ShapeError, UpfeatError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageReadError", "find_images",
           "iter_images", "load_image", "to_tensor"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif",
                              ".tiff", ".webp", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"})
"""Extensions :func:`find_images` looks for in folders (lower case, matched case-insensitively)."""

DEFAULT_MAX_PIXELS = 250_000_000
"""Largest image :func:`load_image` decodes (750 MB as 8-bit RGB, 3 GB as a float32 tensor)."""

WHITE = (255, 255, 255)
PathLike = Union[str, os.PathLike]
ImageLike = Union[Image.Image, np.ndarray, torch.Tensor, Sequence]


class ImageReadError(UpfeatError, ValueError):
    """A file that cannot be read as an image; ``str(err)`` is one line naming file and problem.

    Attributes:
        path: the file.
        problem: what is wrong with it, e.g. ``'truncated or corrupt (image file is truncated)'``.
    """

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"cannot read image {self.path}: {self.problem}")

    def __reduce__(self):  # picklable, e.g. from DataLoader workers
        return type(self), (self.path, self.problem)


def find_images(paths: PathLike | Iterable[PathLike], recursive: bool = True) -> list[Path]:
    """The image files among ``paths`` (files and/or folders), in a deterministic order.

    Folders are searched (recursively by default, following symlinked folders once); their
    images come sorted by relative path, folders in the order given, duplicates dropped. Files
    without an :data:`IMAGE_EXTENSIONS` extension inside folders are skipped with one warning
    that counts them; hidden files and folders (``.name``) are skipped silently. Files given
    explicitly are always kept: a non-image fails later, in :func:`load_image`.

    Raises:
        FileNotFoundError: a path does not exist (checked for all before any search).
    """
    roots = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"no such image file or folder: {root}")
    found: list[Path] = []
    seen: set[str] = set()
    skipped: list[Path] = []
    unlisted: list[str] = []
    for root in roots:
        files = _search(root, recursive, skipped, unlisted) if root.is_dir() else [root]
        for f in files:
            key = os.path.normcase(os.path.abspath(f))
            if key not in seen:
                seen.add(key)
                found.append(f)
    if skipped:
        kinds = Counter(p.suffix.lower() or "no extension" for p in skipped)
        warnings.warn(
            f"skipped {len(skipped)} file(s) that are not images by extension "
            f"({', '.join(f'{k}: {n}' for k, n in kinds.most_common(5))}), e.g. "
            f"{', '.join(str(p) for p in skipped[:3])}; looked for "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))} (give a file explicitly to force it)",
            stacklevel=2)
    if unlisted:
        warnings.warn(f"could not list {len(unlisted)} folder(s): {'; '.join(unlisted[:3])}",
                      stacklevel=2)
    return found


def _search(root: Path, recursive: bool, skipped: list[Path], unlisted: list[str]) -> list[Path]:
    hits: list[tuple[tuple[str, ...], Path]] = []
    visited = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True,
                                                onerror=lambda e: unlisted.append(str(e))):
        keep = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if recursive and not d.startswith(".") and real not in visited:
                visited.add(real)
                keep.append(d)
        dirnames[:] = keep
        rel = Path(dirpath).relative_to(root).parts
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath, name)
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                hits.append(((*rel, name), p))
            else:
                skipped.append(p)
    return [p for _, p in sorted(hits, key=lambda h: h[0])]


# PIL guards against decompression bombs with a process-wide limit (~89 M pixels, error above
# 2x). Our reads lift it, under a lock and only while PIL parses the header (and decodes, for
# images over PIL's own limit), and enforce their own documented cap instead.
_PIL_LIMIT_LOCK = threading.RLock()


@contextlib.contextmanager
def _pil_limit_lifted() -> Iterator[int | None]:
    """Yield PIL's own limit while ``Image.MAX_IMAGE_PIXELS`` is ``None``; restored on exit."""
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield old
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _pixel_cap(max_pixels: float | None) -> float:
    source = "max_pixels"
    if max_pixels is None:
        text = os.environ.get("UPFEAT_MAX_PIXELS", "").strip()
        if not text:
            return DEFAULT_MAX_PIXELS
        source = "UPFEAT_MAX_PIXELS"
        try:
            max_pixels = float(text)
        except ValueError:
            max_pixels = math.nan
    if not (isinstance(max_pixels, (int, float)) and max_pixels > 0):
        raise ValueError(f"{source} must be a positive number of pixels (e.g. 400000000), "
                         f"got {max_pixels if source == 'max_pixels' else text!r}")
    return max_pixels


def load_image(path: PathLike, *, max_pixels: float | None = None,
               background: tuple[int, int, int] = WHITE, min_side: int | None = None
               ) -> Image.Image:
    """Read an image file as an 8-bit RGB ``PIL.Image`` (``size == (W, H)`` after EXIF rotation).

    Any mode is converted as described in the module docstring; transparent pixels are
    composited over ``background`` (white). Images over ``max_pixels`` pixels (default: the
    environment variable ``UPFEAT_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS` = 250 M) are
    refused before decoding; below it, PIL's decompression-bomb limit does not apply.
    ``min_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode, several times
    faster) as long as both sides stay >= ``min_side`` (for callers that shrink it anyway).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: not an image, truncated or corrupt, too large, unsupported mode,
            unreadable (a folder, no permission); the message names the file.
    """
    path = Path(path)
    cap = _pixel_cap(max_pixels)
    try:
        with open(path, "rb") as f:  # our handle: closed here, the file is never written
            try:
                with _pil_limit_lifted() as pil_limit:
                    im = Image.open(f)
            except UnidentifiedImageError:
                empty = os.fstat(f.fileno()).st_size == 0
                raise ImageReadError(path, "file is empty (0 bytes)" if empty else
                                     "not an image (unrecognised format)") from None
            except Exception as e:
                raise ImageReadError(path, f"corrupt image header ({e})") from None
            w, h = im.size
            if w * h > cap:
                raise ImageReadError(
                    path, f"image is {w} x {h} = {w * h / 1e6:.3g} M pixels, over the cap of "
                    f"{cap / 1e6:.3g} M pixels; raise it with load_image(..., max_pixels=N) or the "
                    f"environment variable UPFEAT_MAX_PIXELS=N if it fits in memory")
            if min_side is not None and im.format == "JPEG":
                im.draft(None, (min_side, min_side))
            try:
                if pil_limit is not None and w * h > pil_limit:
                    with _pil_limit_lifted():
                        im.load()
                else:
                    im.load()
            except MemoryError:
                raise ImageReadError(path, f"out of memory decoding {w} x {h} pixels") from None
            except Exception as e:
                raise ImageReadError(path, f"truncated or corrupt ({e})") from None
            try:
                ImageOps.exif_transpose(im, in_place=True)
            except Exception as e:  # malformed EXIF: the pixels are still fine
                warnings.warn(f"{path}: ignoring unreadable EXIF orientation ({e})", stacklevel=2)
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    return _to_rgb(im, background, path)


def _to_rgb(im: Image.Image, background: tuple[int, int, int], path: Path | None) -> Image.Image:
    """Any-mode PIL image -> RGB; errors name ``path`` (``ImageReadError``) or say 'img'."""
    def fail(problem: str) -> ValueError:
        return ImageReadError(path, problem) if path is not None else ValueError(f"img: {problem}")

    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):  # 16-bit grayscale (PNG, TIFF)
        a = np.asarray(im)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise fail(f"integer image (mode {mode}) with values in [{lo}, {hi}]; only 16-bit "
                       "0..65535 is supported")
        im = Image.fromarray(((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    elif mode == "F":
        a = np.asarray(im, dtype=np.float32)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (lo >= -0.5 and hi <= 1.5):  # also catches NaN
            raise fail(f"float image with values in [{lo:.3g}, {hi:.3g}]; expected [0, 1]")
        im = Image.fromarray(np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8))
    elif mode == "CMYK":
        return _cmyk_to_rgb(im, path)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        bg = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(bg, im.convert("RGBA")).convert("RGB")
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise fail(f"unsupported image mode {mode} ({e})") from None


def _cmyk_to_rgb(im: Image.Image, path: Path | None) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception as e:  # broken or non-CMYK profile, or PIL built without littlecms
            warnings.warn(f"{path or 'img'}: cannot apply its CMYK colour profile ({e}); using "
                          "the plain (255 - C)(255 - K) / 255 conversion", stacklevel=3)
    return im.convert("RGB")


def iter_images(paths: PathLike | Iterable[PathLike], *, recursive: bool = True,
                max_pixels: float | None = None, background: tuple[int, int, int] = WHITE,
                ) -> Iterator[tuple[Path, Image.Image | ImageReadError]]:
    """Yield ``(path, image)`` for each file of :func:`find_images`, or ``(path, error)``.

    A file that cannot be read yields its :class:`ImageReadError` instead of raising, so a run
    over a folder continues. ``paths`` are searched at the call, so a missing path raises
    ``FileNotFoundError`` here, not at the first ``next``. To know the count first, call
    :func:`find_images` and pass its list (explicit files are never filtered again).

    Example:
        >>> bad = []
        >>> for path, img in iter_images("photos/"):  # doctest: +SKIP
        ...     if isinstance(img, ImageReadError):
        ...         bad.append(img)
        ...         continue
        ...     feats = model(to_tensor(img))
        >>> print(f"skipped {len(bad)} file(s):", *bad, sep="\\n")  # doctest: +SKIP
    """
    files = find_images(paths, recursive)

    def generate() -> Iterator[tuple[Path, Image.Image | ImageReadError]]:
        for p in files:
            try:
                item: Image.Image | ImageReadError = load_image(
                    p, max_pixels=max_pixels, background=background)
            except ImageReadError as e:
                item = e
            except OSError as e:  # removed or unreadable since it was listed
                item = ImageReadError(p, e.strerror or str(e))
            yield p, item

    return generate()


def to_tensor(img: ImageLike, *, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """An image or a list of same-size images as ``(B, 3, H, W)`` float32 in ``[0, 1]``.

    Args:
        img: one of
            - ``PIL.Image`` of any mode, converted as :func:`load_image` does (EXIF orientation
              is a file property: read files with :func:`load_image`);
            - ``np.ndarray`` ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (RGBA over
              ``background``): uint8 / 255, uint16 / 65535, bool as 0 / 1, float taken as
              ``[0, 1]``;
            - ``torch.Tensor`` ``(3, H, W)``, ``(B, 3, H, W)``, or grayscale ``(H, W)``,
              ``(1, H, W)``, ``(B, 1, H, W)`` (repeated to 3 channels), with the same dtype
              rules; stays on its device and in the autograd graph;
            - a list or tuple of the above, all the same ``H x W``: concatenated along ``B``.

    Float inputs may overshoot ``[0, 1]`` a little (resampling) and are clamped; a range past
    ``[-0.5, 1.5]`` (0..255 values, mean/std-normalised images) or NaN raises ``ValueError``.

    Example:
        >>> to_tensor(np.zeros((20, 30, 3), np.uint8)).shape
        torch.Size([1, 3, 20, 30])
        >>> to_tensor([Image.new("L", (30, 20)), Image.new("RGBA", (30, 20))]).shape
        torch.Size([2, 3, 20, 30])
    """
    if isinstance(img, (list, tuple)):
        if not img:
            raise ValueError("img is an empty list: give at least one image")
        parts = [_one_tensor(x, f"img[{i}]", background) for i, x in enumerate(img)]
        for i, t in enumerate(parts[1:], 1):
            if t.shape[-2:] != parts[0].shape[-2:]:
                raise ShapeError(f"images in a list must share one size (H, W), got img[0] "
                                 f"{tuple(parts[0].shape[-2:])} and img[{i}] "
                                 f"{tuple(t.shape[-2:])}; resize or crop them first")
        return torch.cat([t.to(parts[0].device) for t in parts])
    return _one_tensor(img, "img", background)


def _one_tensor(img: object, name: str, background: tuple[int, int, int]) -> torch.Tensor:
    if isinstance(img, Image.Image):
        x = torch.from_numpy(np.array(_to_rgb(img, background, None), dtype=np.uint8))
        return _finish(x.permute(2, 0, 1)[None], name)
    if isinstance(img, np.ndarray):
        a = img[..., None] if img.ndim == 2 else img
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            hint = (" (channels first? use to_tensor(torch.from_numpy(a)))"
                    if a.ndim == 3 and a.shape[0] in (1, 3) else "")
            raise ShapeError(f"{name} must be an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                             f"got shape {img.shape}{hint}")
        a = np.ascontiguousarray(a) if a.flags.writeable else a.copy()  # torch warns on read-only
        x = _finish(torch.from_numpy(a).permute(2, 0, 1)[None], name)
        if x.shape[1] == 4:  # straight (not premultiplied) alpha over the background
            alpha = x[:, 3:]
            bg = torch.tensor(background, dtype=x.dtype).view(1, 3, 1, 1) / 255
            x = x[:, :3] * alpha + bg * (1 - alpha)
        return x
    if isinstance(img, torch.Tensor):
        x = img[None, None] if img.ndim == 2 else img[None] if img.ndim == 3 else img
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            hint = (" (channels last? use x.permute(2, 0, 1))"
                    if img.ndim == 3 and img.shape[-1] in (1, 3, 4) else "")
            raise ShapeError(f"{name} must be a tensor (3, H, W) or (B, 3, H, W) (1 channel or "
                             f"(H, W) for grayscale), got shape {tuple(img.shape)}{hint}")
        return _finish(x, name)
    extra = "; read files with to_tensor(load_image(path))" if isinstance(img, (str, Path)) else ""
    raise TypeError(f"{name} must be a PIL image, numpy array, torch tensor or a list of them, "
                    f"got {type(img).__name__}{extra}")


def _finish(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, C, H, W)`` of any supported dtype -> float32 in [0, 1], 1 channel repeated to 3."""
    if x.shape[-2] == 0 or x.shape[-1] == 0 or x.shape[0] == 0:
        raise ShapeError(f"{name} is empty: shape {tuple(x.shape)} (B, C, H, W)")
    scale = {torch.uint8: 255.0, torch.uint16: 65535.0, torch.bool: 1.0}.get(x.dtype)
    if scale is None and not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}: use uint8 (0..255), uint16 (0..65535) or "
                        "float in [0, 1]")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device) if scale else None
    if out is not None:  # one allocation, contiguous, then scaled in place
        out.copy_(x).div_(scale)
    else:
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if not (lo >= -0.5 and hi <= 1.5):
            why = ("contains NaN" if math.isnan(lo) or math.isnan(hi) else
                   "looks normalised with a mean/std: pass un-normalised RGB" if lo < -0.5 else
                   "looks like 0..255: divide by 255 or pass uint8" if hi < 256 else
                   "not an image in [0, 1]")
            raise ValueError(f"{name} must hold float values in [0, 1], got range "
                             f"[{lo:.3g}, {hi:.3g}] ({why})")
        out = x.to(torch.float32).clamp(0, 1).contiguous()
    return out.expand(-1, 3, -1, -1).contiguous() if out.shape[1] == 1 else out
