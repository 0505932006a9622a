"""The work list of a batch run: input images, their output paths, and reading them.

The output of ``SRC_ROOT/a/b.jpg`` is always ``OUT/a/b.<format>`` (``OUT/b.<format>`` for a file
given directly): a name depends on the input's own path only, never on which other files are
there. Two inputs that would get the same name (``b.jpg`` and ``b.png`` in one folder, or two
given files ``x/b.png`` and ``y/b.png``) are an error before anything runs; process them into
separate ``--out`` folders. Files under ``OUT`` are never inputs (a re-run would otherwise pick
up the ``--viz`` PNGs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..io import find_images, load_image

__all__ = ["Item", "list_items", "prepare"]


@dataclass(frozen=True)
class Item:
    """One input image and its outputs (``png`` is ``None`` without ``--viz``)."""

    src: Path
    out: Path
    png: Path | None

    def done(self, settings: str | None = None) -> bool:
        """Outputs complete and readable, and (``settings`` given) made with these settings."""
        return self.redo_reason(settings) is None

    def redo_reason(self, settings: str | None = None) -> str | None:
        """Why the outputs must be (re)made, or ``None`` when they are done."""
        from .featfile import complete_meta
        if not self.out.is_file():
            return "missing"
        meta = complete_meta(self.out)
        if meta is None:
            return "incomplete or unreadable"
        if settings is not None and meta.get("settings") != settings:
            return "made with other settings"
        if self.png is not None and not self.png.is_file():
            return "no --viz image"
        return None


def list_items(inputs: tuple[str, ...], out: str | os.PathLike[str], fmt: str,
               viz: bool) -> list[Item]:
    """The images under ``inputs`` (files and folders, searched recursively, in
    :func:`~upfeat.io.find_images` order) with their output paths (see the module docstring).

    Raises ``FileNotFoundError`` for a missing input, ``ValueError`` for clashing outputs.
    """
    out = Path(out)
    out_real = os.path.realpath(out)
    found: list[tuple[Path, Path]] = []  # (src, path relative to its root)
    seen: set[str] = set()
    for root in (Path(p) for p in inputs):
        files = find_images(root) if root.is_dir() else find_images([root])
        for f in files:
            real = os.path.realpath(f)
            if real in seen or os.path.commonpath([real, out_real]) == out_real:
                continue
            seen.add(real)
            found.append((f, f.relative_to(root) if root.is_dir() else Path(f.name)))
    names = [rel.with_suffix("") for _, rel in found]
    clash: dict[Path, Path] = {}
    for (src, _), name in zip(found, names):
        if name in clash:
            raise ValueError(f"{clash[name]} and {src} would both be written to "
                             f"{out / name}.{fmt}; process them with separate --out folders")
        clash[name] = src
    return [Item(src, out / f"{name}.{fmt}", out / f"{name}.pca.png" if viz else None)
            for (src, _), name in zip(found, names)]


def prepare(path: Path, size: tuple[int, int] | None, max_side: int | None
            ) -> tuple[Image.Image, tuple[int, int]]:
    """Read ``path`` as RGB and resize it: ``(image, original (H, W))``."""
    img = load_image(path)
    w, h = img.size
    if size is not None:
        new = (size[1], size[0])
    elif max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
    else:
        return img, (h, w)
    return img.resize(new, Image.BICUBIC, reducing_gap=3.0), (h, w)
