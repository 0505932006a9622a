"""Learned downsamplers ``σ↓``: high-res features ``(B, C, H, W)`` -> the backbone's grid
``(B, C, ceil(H/s), ceil(W/s))``, cell-aligned with :class:`upfeat.backbones.base.Backbone`."""
from ._registry import create_downsampler, list_downsamplers, register_downsampler
from .attention import AttentionDownsampler, attention_downsample
from .base import Downsampler, cell_pad
from .simple import SimpleDownsampler, simple_downsample

__all__ = ["AttentionDownsampler", "Downsampler", "SimpleDownsampler", "attention_downsample",
           "cell_pad", "create_downsampler", "list_downsamplers", "register_downsampler",
           "simple_downsample"]
