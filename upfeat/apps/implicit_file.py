"""Fit one image file end to end (what ``upfeat implicit`` runs): read, fit, save, visualise."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io import load_image, to_tensor
from ..upsamplers.pretrained import check_backbone, load_upsampler
from ..upsamplers.implicit.features import ImplicitFeatures
from ..upsamplers.implicit.fit import fit_implicit, resolve_backbone
from ..upsamplers.implicit.schedules import BASES


def fit_file(image: str | os.PathLike[str], backbone: str, out: str | os.PathLike[str], *,
             size: tuple[int, int] | None = None, viz: str | os.PathLike[str] | None = None,
             schedule: str = "fast", steps: int | None = None, views: int | None = None,
             pca_dim: int = 128, seed: int = 0, progress: bool = True,
             base: str | None = None) -> ImplicitFeatures:
    """Fit the implicit upsampler to an image file and write ``out`` (+ ``<stem>.json``).

    Args:
        image: any file :func:`upfeat.io.load_image` reads.
        backbone: registered backbone name (``timm:<name>`` too).
        size: resize the image to ``(H, W)`` first (bilinear, antialiased).
        viz: also write a PNG: image | low-res features | implicit features (one PCA).
        schedule, steps, views, pca_dim, seed, progress: see :func:`fit_implicit`.
        base: the upsampler the network corrects, instead of the schedule's: ``none``,
            ``bilinear``, ``jbu`` (the shipped ``<backbone>_jbu``, else bilinear), or an
            ``upfeat train`` checkpoint (file or run folder) for this backbone.

    Raises:
        FileNotFoundError, upfeat.io.ImageReadError, ValueError: bad inputs (one-line messages).
    """
    x = to_tensor(load_image(image))                                   # (1, 3, H, W) in [0, 1]
    if size is not None:
        if not (len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError(f"size must be two positive ints H W, got {size!r}")
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear",
                                            align_corners=False, antialias=True).clamp_(0, 1)
    bb = resolve_backbone(backbone)
    if min(x.shape[-2:]) < bb.stride:
        raise ValueError(f"image {tuple(x.shape[-2:])} (H, W) is smaller than the backbone "
                         f"stride {bb.stride}; use --size to enlarge it")
    up: str | torch.nn.Module | None = base
    if base is not None and base not in BASES:
        if not Path(base).exists():
            raise ValueError(f"base must be none, bilinear, jbu or an `upfeat train` checkpoint "
                             f"(file or run folder), got {base!r}")
        up, meta = load_upsampler(base)
        check_backbone(meta, bb, base)
    field = fit_implicit(x, bb, schedule=schedule, steps=steps, views=views, pca_dim=pca_dim,
                         seed=seed, progress=progress, base=up)
    field.meta["source"] = str(image)
    if isinstance(up, torch.nn.Module):
        field.meta["base"] = str(base)
    field.save(out)
    if viz is not None:
        save_viz(field, bb, viz)
    return field


@torch.no_grad()
def save_viz(field: ImplicitFeatures, backbone: torch.nn.Module,
             path: str | os.PathLike[str]) -> None:
    """PNG of image | low-res backbone features | implicit features, one PCA for both."""
    from ..viz import pca_panels, save_row

    img = field.image
    low = backbone(img)[0]
    panels = pca_panels(img[0], low, [field.query()[0]], backbone.stride)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_row(panels, path)
