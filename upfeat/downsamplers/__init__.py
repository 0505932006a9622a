"""Learned downsamplers ``σ↓``: high-res features ``(B, C, H, W)`` -> the backbone's grid
``(B, C, ceil(H/s), ceil(W/s))``, cell-aligned with :class:`upfeat.backbones.base.Backbone`.

``create(name, dim, stride, **kwargs)`` builds one by registered name (:func:`list_downsamplers`),
as ``upfeat.backbones.create`` and ``upfeat.upsamplers.create`` do (``create_downsampler`` is the
deprecated name)."""
from .._deprecation import deprecated_alias
from ._registry import create, list_downsamplers, register_downsampler
from .attention import AttentionDownsampler, attention_downsample
from .base import Downsampler, cell_pad
from .simple import SimpleDownsampler, simple_downsample

create_downsampler = deprecated_alias(create, "create_downsampler")

__all__ = ["AttentionDownsampler", "Downsampler", "SimpleDownsampler", "attention_downsample",
           "cell_pad", "create", "list_downsamplers", "register_downsampler", "simple_downsample"]
