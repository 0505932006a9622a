"""Fit an implicit feature field to one image with FeatUp's multi-view consistency loss.

1. Pool (:mod:`.views`): ``schedule.pool`` random jitters ``t`` of the image (the identity first)
   and their backbone features ``f(t(x))`` ``(P, C, h, w)``, computed once without gradients.
2. PCA of the first ``pca_views`` views' features -> unit-variance ``k``-dim codes; targets are
   stored as codes ``(P, k, h, w)``.
3. Steps (:mod:`.loop`): the network gives the codes ``F`` of every pixel of a grid; ``V`` pool
   views are drawn; ``t(F)`` (all views in one ``grid_sample``) goes through the attention
   downsampler and the Gaussian NLL with a learned per-cell σ
   (:class:`upfeat.losses.MultiViewLoss`) against the stored codes, plus ``tv_weight * tv(F)``. ``F`` is compared in a fresh random
   ``proj_dim``-dim subspace, projected *before* warping (warp and pooling act per channel, so
   this is the projected loss at ``proj_dim / k`` of the cost; as :mod:`upfeat.train.objective`).
   The ``coarse`` part of the steps runs on a half-resolution grid with half the stride.
4. Base (``schedule.base`` or ``base=``): the network's codes are added to the PCA codes of another
   upsampler's output for the un-jittered image (e.g. the shipped JBU), and its last layer starts at
   zero, so the fit starts from that output and learns a per-image correction.
"""
from __future__ import annotations

import copy
import time

import torch

from ..._checks import check_tensor
from ..._checks import check_image
from ..._device import bf16_fast
from ...jitter import View, sample_views
from .encoding import ImplicitMLP
from .features import ImplicitFeatures
from .loop import train
from .schedules import Schedule, get_schedule
from .views import view_pool


def _as_image(image: object) -> torch.Tensor:
    check_tensor(image, "image")
    assert isinstance(image, torch.Tensor)
    x = image[None] if image.ndim == 3 else image
    check_image(x, "image")
    if x.shape[0] != 1:
        raise ValueError(f"fit_implicit fits one image: expected (3, H, W) or (1, 3, H, W), got "
                         f"{tuple(image.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("image holds NaN or infinite values")
    return x.float()


def resolve_backbone(backbone: object) -> torch.nn.Module:
    """A backbone module from a registered name, or ``backbone`` itself after a check."""
    if isinstance(backbone, str):
        from ... import backbones
        return backbones.create(backbone)
    if not (isinstance(backbone, torch.nn.Module) and hasattr(backbone, "stride")
            and hasattr(backbone, "dim")):
        raise TypeError(f"backbone must be a registered name or an upfeat Backbone (with .stride "
                        f"and .dim), got {type(backbone).__name__}")
    return backbone


def base_upsampler(kind: str, backbone: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """The upsampler a schedule's ``base`` names for ``backbone``, and its label."""
    from ...checkpoint import CheckpointError
    from ... import upsamplers
    from ..pretrained import shipped_upsampler
    if kind == "none":
        return None, "none"
    if kind == "jbu":
        try:
            return shipped_upsampler("jbu", backbone), "jbu"
        except CheckpointError:  # the shipped JBU is not in this install: fall back to bilinear
            pass
    return upsamplers.create("bilinear", dim=backbone.dim, stride=backbone.stride), "bilinear"


@torch.no_grad()
def _base_codes(up: torch.nn.Module, bb: torch.nn.Module, img: torch.Tensor,
                pca) -> torch.Tensor:
    """``(1, k, H, W)`` PCA codes of ``up``'s output for the un-jittered image, rounded to float16
    values: the saved field stores them at half the size, exactly."""
    out = up(bb(img).float(), img)
    if tuple(out.shape) != (1, bb.dim, *img.shape[-2:]):
        raise ValueError(f"base upsampler gave {tuple(out.shape)}, expected "
                         f"{(1, bb.dim, *img.shape[-2:])} (backbone features at image size)")
    return pca.encode(out.float()).half().float()


def fit_implicit(image: torch.Tensor, backbone: torch.nn.Module | str, *,
                 schedule: str | Schedule = "fast", pca_dim: int = 128, steps: int | None = None,
                 views: int | None = None, seed: int = 0, progress: bool = True,
                 init: ImplicitFeatures | None = None,
                 base: str | torch.nn.Module | None = None) -> ImplicitFeatures:
    """Fit FeatUp's implicit upsampler to one image.

    Args:
        image: ``(3, H, W)`` or ``(1, 3, H, W)`` RGB in ``[0, 1]``.
        backbone: an :class:`upfeat.backbones.Backbone` (or its registered name); frozen.
        schedule: ``"fast"`` (default), ``"reference"`` (the authors' 3000 views, 1200 steps x 10
            views) or a :class:`Schedule`.
        pca_dim: PCA dimension ``k`` of the targets (capped by the feature dim).
        steps, views: override the schedule's steps / views per step.
        seed: seeds the views, the projections, the initialisation and dropout (the caller's
            global RNG is left untouched).
        progress: show progress bars.
        init: a fitted field to start from: its network (weights, frequencies, width) and PCA
            basis are reused, e.g. to refine a fast fit or to fit the next frame of a video.
            A network fitted without a base continues without one; one fitted on a base
            continues on this image's base (the schedule's, or ``base``).
        base: instead of the schedule's ``base``: ``"none"``, ``"bilinear"``, ``"jbu"``, or an
            upsampler ``(lr (1, C, h, w), image (1, 3, H, W)) -> (1, C, H, W)`` whose output the
            network corrects.

    Returns:
        :class:`ImplicitFeatures` in eval mode; ``.meta["fit"]`` holds timings and final losses.

    Example:
        >>> f = fit_implicit(torch.rand(3, 224, 224), "vits14_focus")  # doctest: +SKIP
        >>> f.query((448, 448)).shape                                    # doctest: +SKIP
        torch.Size([1, 384, 448, 448])
    """
    t0, c0 = time.perf_counter(), time.process_time()
    img = _as_image(image)
    bb = resolve_backbone(backbone).eval()
    sched = get_schedule(schedule).replace(steps=steps, views=views)
    if isinstance(base, str):
        sched, base = sched.replace(base=base), None
    elif base is not None and not isinstance(base, torch.nn.Module):
        raise TypeError(f"base must be 'none', 'bilinear', 'jbu' or an upsampler module, got "
                        f"{type(base).__name__}")
    if not (isinstance(pca_dim, int) and not isinstance(pca_dim, bool) and pca_dim >= 1):
        raise ValueError(f"pca_dim must be an int >= 1, got {pca_dim!r}")
    if init is not None and not isinstance(init, ImplicitFeatures):
        raise TypeError(f"init must be ImplicitFeatures or None, got {type(init).__name__}")
    if init is not None and init.dim != bb.dim:
        raise ValueError(f"init was fitted on {init.dim}-dim features, the backbone gives {bb.dim}")
    dev = next((p.device for p in bb.parameters()), img.device)
    img = img.to(dev)
    H, W = img.shape[-2:]
    g = torch.Generator().manual_seed(seed)
    pad = round(sched.max_pad * min(H, W))
    pool = [View()] + sample_views(sched.pool - 1, g, (H, W), max_zoom=sched.max_zoom, max_pad=pad)
    bf16 = sched.bf16 and bf16_fast(dev)
    pca, thetas, targets = view_pool(img, bb, pool, sched.pca_views, pca_dim,
                                     None if init is None else init.pca.to(dev), progress, bf16)
    t1, c1 = time.perf_counter(), time.process_time()
    if init is not None and init.base is None:
        base, base_name = None, "none"  # its network was fitted alone: continue without a base
    elif base is None:
        base, base_name = base_upsampler(sched.base, bb)
    else:
        base_name = type(base).__name__
    codes = None if base is None else _base_codes(base.to(dev).eval(), bb, img, pca)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init is None:
            mlp = ImplicitMLP(pca.k, sched.n_freqs, sched.hidden, sched.dropout, sched.log_max)
            if codes is not None:  # start exactly at the base output
                torch.nn.init.zeros_(mlp.fc3.weight)
                torch.nn.init.zeros_(mlp.fc3.bias)
        else:  # continue from its network (its frequencies and width too)
            mlp = copy.deepcopy(init.mlp)
            mlp.dropout = sched.dropout
        field = ImplicitFeatures(mlp, pca, img, base=codes).to(dev).train()
        last = train(field, bb.stride, thetas, targets, sched, g, progress, bf16)
    field.eval()
    t2, c2 = time.perf_counter(), time.process_time()
    name = getattr(getattr(bb, "cfg", None), "name", type(bb).__name__)
    field.meta = {"backbone": {"name": name, "stride": bb.stride, "dim": bb.dim},
                  "schedule": sched.to_dict(), "seed": seed, "base": base_name, "bf16": bf16,
                  "fit": {"seconds": {"views": t1 - t0, "steps": t2 - t1, "total": t2 - t0},
                          # CPU time of this process: less sensitive to other jobs on the machine
                          "cpu_seconds": {"views": c1 - c0, "steps": c2 - c1, "total": c2 - c0},
                          **last}}
    return field
