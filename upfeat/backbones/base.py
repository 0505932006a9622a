"""The :class:`Backbone` interface: an image in ``[0, 1]`` in, a patch-feature map out.

Every backbone (timm ViTs, ResNets, MaskCLIP, the offline ViT-S/14, a user's module) shares one
``forward``: validate the image, normalise it with the backbone's own mean/std, pad it to a
multiple of the stride, then call the subclass's :meth:`Backbone.forward_features`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ShapeError, check_image  # noqa: F401  (check_image re-exported: it lived here)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneCfg:
    """What a caller needs to know about a backbone, read from the built model.

    Attributes:
        name: upfeat name (``'dinov2_vits14'``, ``'timm:convnext_tiny'``, ``'wrap'`` ...).
        timm_name: the timm model (with pretrained tag) it builds, or ``None``.
        stride: pixels per feature cell (patch size of a ViT, total stride of a CNN).
        dim: channels of the returned feature map.
        mean, std: per-channel RGB normalisation applied to the ``[0, 1]`` input.
    """

    name: str
    timm_name: str | None
    stride: int
    dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class Backbone(nn.Module):
    """Base class: ``forward(img (B, 3, H, W) in [0, 1]) -> (B, dim, ceil(H/stride), ceil(W/stride))``.

    Subclasses implement :meth:`forward_features` on a normalised image whose sides are multiples
    of ``stride``. ``mean``/``std`` are tuples; the matching ``(1, 3, 1, 1)`` buffers follow the
    module's device.
    """

    def __init__(self, cfg: BackboneCfg) -> None:
        super().__init__()
        if not (isinstance(cfg.stride, int) and cfg.stride > 0):
            raise ValueError(f"stride must be a positive int, got {cfg.stride!r}")
        if not (isinstance(cfg.dim, int) and cfg.dim > 0):
            raise ValueError(f"dim must be a positive int, got {cfg.dim!r}")
        for key in ("mean", "std"):
            if len(getattr(cfg, key)) != 3:
                raise ValueError(f"{key} must have 3 values (R, G, B), got {getattr(cfg, key)!r}")
        self.cfg = cfg
        self.register_buffer("_mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    @property
    def stride(self) -> int:
        return self.cfg.stride

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.cfg.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.cfg.std

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map size for an ``height x width`` image: ``(ceil(H/stride), ceil(W/stride))``."""
        return math.ceil(height / self.stride), math.ceil(width / self.stride)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Patch features of an RGB image.

        Args:
            img: ``(B, 3, H, W)`` floating point, RGB in ``[0, 1]`` (not normalised), any ``H, W``;
                any float dtype, cast to the backbone's (float32 unless converted). NaN / Inf
                values are a ``ValueError``, an empty image a ``ShapeError``.

        Returns:
            ``(B, dim, ceil(H / stride), ceil(W / stride))`` feature map; prefix (CLS / register)
            tokens are dropped.

        Size policy: the normalised image is padded on the bottom and right only, by edge
        replication, up to the next multiple of ``stride``; no resizing. Feature cell ``(i, j)``
        therefore describes pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)`` of the input (``s`` =
        stride), the top-left cell is aligned with the top-left pixel, and the last row / column
        also sees replicated edge pixels when ``H`` / ``W`` is not a multiple of ``s``. For sides
        divisible by ``s`` the output is exactly ``(H / s, W / s)``. ViT positional embeddings are
        interpolated to the padded grid.
        """
        dims = check_image(img)
        img = img.to(self._mean.dtype)  # float16/bfloat16/float64 in: the backbone's own dtype
        x = (img - self._mean) / self._std
        pad_h, pad_w = -dims["H"] % self.stride, -dims["W"] % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        feats = self.forward_features(x)
        expected = (dims["B"], self.dim, *self.feature_size(dims["H"], dims["W"]))
        if tuple(feats.shape) != expected:
            raise ShapeError(f"{type(self).__name__} '{self.cfg.name}' returned features of shape "
                             f"{tuple(feats.shape)}, expected {expected} (B, dim, H/stride, "
                             f"W/stride) for stride={self.stride}, dim={self.dim}")
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised, ``H, W`` multiples of stride -> ``(B, dim, H/s, W/s)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.cfg.name!r}, stride={self.stride}, dim={self.dim}"


class ModuleBackbone(Backbone):
    """A user's ``nn.Module`` mapping a normalised ``(B, 3, H, W)`` image to ``(B, dim, H/s, W/s)``."""

    def __init__(self, module: nn.Module, cfg: BackboneCfg) -> None:
        super().__init__(cfg)
        self.module = module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the wrapped module must return a tensor (B, dim, H/stride, W/stride), "
                            f"got {type(out).__name__}")
        return out


def wrap(module: nn.Module, stride: int, dim: int,
         mean: tuple[float, float, float] = IMAGENET_MEAN,
         std: tuple[float, float, float] = IMAGENET_STD, name: str = "wrap") -> Backbone:
    """Make a :class:`Backbone` from any module.

    ``module`` receives the image normalised with ``mean``/``std`` (pass ``(0, 0, 0)`` and
    ``(1, 1, 1)`` for raw ``[0, 1]`` input), padded to multiples of ``stride``, ``(B, 3, H, W)``,
    and must return ``(B, dim, H / stride, W / stride)``; a wrong shape raises ``ShapeError``.

    Example:
        >>> conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        >>> wrap(conv, stride=4, dim=8)(torch.rand(1, 3, 30, 32)).shape
        torch.Size([1, 8, 8, 8])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    cfg = BackboneCfg(name, None, stride, dim, tuple(float(v) for v in mean),  # type: ignore[arg-type]
                      tuple(float(v) for v in std))  # type: ignore[arg-type]
    return ModuleBackbone(module, cfg)
