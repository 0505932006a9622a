"""Upsampler specs -> feature sources: ``image (B, 3, H, W) in [0, 1] -> hr feats (B, C, H, W)``.

Spec forms (comma-separated lists go through :func:`split_specs`):

- ``nearest`` / ``bilinear`` / ``bicubic``: parameter-free interpolation of the backbone features
  (``nearest`` is the "low-res" baseline: every pixel gets its patch's feature).
- ``upsample_anything``: the training-free Upsample Anything
  (:class:`~upfeat.upsamplers.UpsampleAnything`, paper settings), fitted on every image it
  upsamples (~1-3 CPU seconds per 224 x 294 image).
- ``large_image`` / ``large_image4``: the backbone runs on the image bicubic-upscaled 2x / 4x
  (clamped to [0, 1]), giving a 2x / 4x denser feature grid, which is then bilinearly resized to
  the image size (cell-aligned, like every upsampler). Costs 4x / 16x the backbone pixels.
- ``jbu``, ``resize_conv``: learned upsamplers; ``jbu`` alone is the shipped backbone-agnostic
  JBU (``jbu_stack:agnostic``, any backbone), ``resize_conv`` has no shipped weights (names are
  resolved by :func:`upfeat.upsamplers.resolve_name`); ``NAME=CHECKPOINT`` names the checkpoint
  (shipped weights such as ``jbu:vits14_focus``, a ``model.safetensors`` or a run folder), e.g.
  ``resize_conv=runs/rc``. An untrained ``resize_conv`` equals bilinear, so it is never built
  implicitly.
- ``implicit``: the per-image implicit upsampler, ``upfeat.upsamplers.implicit.fit_implicit``,
  fitted on every image it is asked for (fast schedule: ~25 CPU-seconds per 224 x 294 image);
  :class:`UpsamplerUnavailable` when that module cannot be imported.
- an :class:`~upfeat.upsamplers.Upsampler` or :class:`PerImageFit` object (tests, notebooks,
  e.g. ``implicit_upsampler(bb, steps=50)``), or a module with ``.backbone`` and ``.upsampler``
  (what ``upfeat.load`` returns).

Every source shares one :class:`~upfeat.eval.cache.CachedBackbone`, so the backbone runs once per
image and size however many upsamplers are compared.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ShapeError, UpfeatError, unknown_name
from .. import upsamplers
from ..upsamplers import Upsampler, load_upsampler, resolve_name
from .cache import CachedBackbone

INTERP = ("nearest", "bilinear", "bicubic")
TRAINING_FREE = ("upsample_anything",)  # no weights: built by name like INTERP
LARGE = {"large_image": 2, "large_image4": 4}
LEARNED = ("jbu", "resize_conv")
KNOWN = (*INTERP, *TRAINING_FREE, *LARGE, *LEARNED, "implicit")


class UpsamplerUnavailable(UpfeatError, ValueError):
    """An upsampler that cannot be built here: no usable checkpoint, or its module is missing."""


class FeatureSource:
    """One upsampler applied to cached backbone features.

    ``source(image (B, 3, H, W))`` -> ``(B, dim, H, W)``; ``source.lowres(image)`` -> the
    backbone features it upsamples, ``(B, dim, ceil(scale*H/s), ceil(scale*W/s))``.

    Attributes:
        label: row name in result tables.  spec: the spec it was built from (default: label).
        upsampler: the module called as ``upsampler(lowres, image, output_size=(H, W))``.
        scale: 1, or 2 / 4 for ``large_image`` / ``large_image4``.
    """

    def __init__(self, label: str, backbone: CachedBackbone, upsampler: nn.Module,
                 scale: int = 1, spec: str | None = None) -> None:
        self.label, self.backbone, self.upsampler, self.scale = label, backbone, upsampler, scale
        self.spec = spec or label
        self.upsampler.eval()

    @property
    def dim(self) -> int:
        return self.backbone.dim

    def _input(self, image: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return image
        size = (image.shape[-2] * self.scale, image.shape[-1] * self.scale)
        return F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp_(0, 1)

    def lowres(self, image: torch.Tensor) -> torch.Tensor:
        """Backbone features of the (possibly upscaled) image, from the cache when possible."""
        return self.backbone(self._input(image))

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        big = self._input(image)
        return self.upsampler(self.backbone(big), big, output_size=tuple(image.shape[-2:]))

    def __repr__(self) -> str:
        return f"FeatureSource({self.label!r}, backbone={self.backbone.name!r}, scale={self.scale})"


class PerImageFit(nn.Module):
    """Adapter for upsamplers fitted on each image (the implicit one), in the Upsampler call form.

    ``forward(feats, image (B, 3, H, W), output_size)`` fits ``fit(image[i:i+1], backbone,
    **fit_kwargs)`` per image (gradients enabled, ``feats`` unused: the fit computes its own
    views) and renders the result at ``output_size``: a ``(1, C, H', W')`` tensor is used as is,
    any other result is called as ``result(output_size)`` (``ImplicitFeatures`` is).
    """

    def __init__(self, fit: Callable, backbone: nn.Module, **fit_kwargs) -> None:
        super().__init__()
        self.fit, self.backbone, self.fit_kwargs = fit, backbone, fit_kwargs
        self.dim, self.stride = backbone.dim, backbone.stride
        self.name = getattr(fit, "__name__", "fit").removeprefix("fit_")

    def forward(self, feats: torch.Tensor, image: torch.Tensor,
                output_size: tuple[int, int] | None = None) -> torch.Tensor:
        size = tuple(output_size or image.shape[-2:])
        outs = []
        for i in range(image.shape[0]):
            with torch.enable_grad():
                fitted = self.fit(image[i:i + 1], self.backbone, **self.fit_kwargs)
            out = fitted if isinstance(fitted, torch.Tensor) else fitted(size)
            if tuple(out.shape) != (1, self.dim, *size):
                raise ShapeError(f"per-image fit gave {tuple(out.shape)}, expected "
                                 f"(1, {self.dim}, {size[0]}, {size[1]})")
            outs.append(out.detach())
        return torch.cat(outs)


def split_specs(text: str) -> list[str]:
    """``"nearest, bilinear,jbu=ckpt"`` -> ``["nearest", "bilinear", "jbu=ckpt"]``."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError(f"no upsampler given in {text!r}; known: {', '.join(KNOWN)}")
    return specs


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"jbu=path"`` -> ``("jbu", "path")``; ``"bilinear"`` -> ``("bilinear", None)``."""
    name, sep, ckpt = spec.partition("=")
    name, ckpt = name.strip(), ckpt.strip()
    if name not in KNOWN:
        raise unknown_name(name, KNOWN, "upsampler spec",
                           f"Known: {', '.join(KNOWN)} (learned ones also as NAME=CHECKPOINT)")
    if sep and not ckpt:
        raise ValueError(f"upsampler spec {spec!r}: empty checkpoint after '='")
    if ckpt and name not in LEARNED:
        raise ValueError(f"upsampler spec {spec!r}: {name} has no weights; only "
                         f"{', '.join(LEARNED)} take =CHECKPOINT")
    return name, (ckpt or None)


def load_learned(ckpt: str, backbone: CachedBackbone, label: str) -> nn.Module:
    """The upsampler of checkpoint ``ckpt`` (:func:`upfeat.upsamplers.load_upsampler`), checked to be
    trained on ``backbone``'s features (same name, no backbone keywords, same dim and stride)."""
    try:
        up, meta = load_upsampler(ckpt)
    except Exception as e:  # any failure to load means "no usable checkpoint": say which and why
        raise UpsamplerUnavailable(f"{label}: checkpoint {ckpt!r} cannot be loaded: "
                                   f"{type(e).__name__}: {e}") from e
    if getattr(up, "agnostic", False):  # kernels from the image only: any backbone
        return _checked(up.for_backbone(backbone.dim, backbone.stride).eval(), backbone, label)
    trained = meta["backbone"]
    if trained["name"] != backbone.name or trained.get("kwargs"):
        kw = f" with {trained['kwargs']}" if trained.get("kwargs") else ""
        raise ValueError(f"{label}: checkpoint {ckpt!r} was trained on {trained['name']!r}{kw} "
                         f"features, not on {backbone.name!r}; pass --backbone {trained['name']}")
    return _checked(up, backbone, label)


def _checked(up: nn.Module, backbone: CachedBackbone, label: str) -> nn.Module:
    dim, stride = getattr(up, "dim", None), getattr(up, "stride", None)
    if (dim, stride) != (backbone.dim, backbone.stride):
        raise ValueError(f"{label}: upsampler built for dim {dim}, stride {stride}, but backbone "
                         f"{backbone.name!r} has dim {backbone.dim}, stride {backbone.stride}")
    return up


def implicit_upsampler(backbone: CachedBackbone, label: str = "implicit", **fit_kwargs) -> PerImageFit:
    """:class:`PerImageFit` over ``upfeat.upsamplers.implicit.fit_implicit`` (its default, fast
    schedule; ``fit_kwargs`` override, e.g. ``steps``), or :class:`UpsamplerUnavailable` (with the
    reason) when that module cannot be imported."""
    try:
        from ..upsamplers.implicit import fit_implicit
    except ImportError as e:
        raise UpsamplerUnavailable(f"{label}: upfeat.upsamplers.implicit is not available in this "
                                   f"installation ({e})") from None
    return PerImageFit(fit_implicit, backbone.backbone, **{"progress": False, **fit_kwargs})


def resolve(spec: str | nn.Module, backbone: CachedBackbone, label: str | None = None) -> FeatureSource:
    """Build the :class:`FeatureSource` of one spec (see the module docstring).

    Raises:
        ValueError: unknown name, bad ``=CHECKPOINT`` use, dim/stride/backbone mismatch.
        UpsamplerUnavailable: a checkpoint that cannot be loaded, a missing implicit module.
    """
    dev = next(backbone.backbone.parameters(), torch.empty(0)).device
    if isinstance(spec, (Upsampler, PerImageFit)):
        label = label or f"{spec.name}(object)"
        return FeatureSource(label, backbone, _checked(spec, backbone, label).to(dev))
    if isinstance(spec, nn.Module) and hasattr(spec, "upsampler"):
        label = label or f"{type(spec).__name__}(object)"
        return FeatureSource(label, backbone, _checked(spec.upsampler, backbone, label).to(dev))
    if not isinstance(spec, str):
        raise TypeError(f"upsampler spec must be a str or an Upsampler, got {type(spec).__name__}")
    name, ckpt = parse_spec(spec)
    spec = spec.strip()
    label = label or spec
    if name in INTERP or name in TRAINING_FREE:
        up = upsamplers.create(name, backbone.dim, backbone.stride)
    elif name in LARGE:
        up = upsamplers.create("bilinear", backbone.dim, backbone.stride)
    elif name == "implicit":
        up = implicit_upsampler(backbone, label)
    else:
        if ckpt is None:  # the shipped weights of that name, or a one-line reason
            try:
                resolve_name(name)
            except ValueError as e:
                raise UpsamplerUnavailable(f"{label}: {e}") from None
        up = load_learned(ckpt or name, backbone, label).to(dev)
    return FeatureSource(label, backbone, up, scale=LARGE.get(name, 1), spec=spec)
