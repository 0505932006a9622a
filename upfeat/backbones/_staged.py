"""A CNN run stage by stage: feature level ``i`` is the output of stage ``i``.

The offline CNNs (``mobilenetv2``, ``efficientnet_lite0``, ``vgg16_hed``) keep their model's own
module names, so state dicts load as the original framework wrote them, and name their stages
by submodule path. ``layers`` picks levels as for timm backbones (:func:`resolve_layers`): an
index (negative from the end) or a list of levels of one stride, concatenated along channels.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._timm import Layers, resolve_layers
from .base import Backbone, BackboneCfg


@dataclass(frozen=True)
class Level:
    """One feature level: the submodules run to reach it (after the previous level), its stride
    in pixels and its channels."""

    modules: tuple[str, ...]
    stride: int
    dim: int


def level_table(levels: Sequence[Level]) -> str:
    """``'0: s2 16 ch, 1: s4 24 ch, ...'`` for error messages."""
    return ", ".join(f"{i}: s{lv.stride} {lv.dim} ch" for i, lv in enumerate(levels))


class StagedBackbone(Backbone):
    """``model``'s feature level(s) ``layers`` as ``(B, dim, H/stride, W/stride)``.

    Runs only the stages up to the last requested level. Several levels are concatenated along
    channels, so they must share one stride (else ``ValueError``).
    """

    def __init__(self, model: nn.Module, levels: Sequence[Level], name: str, layers: Layers,
                 mean: tuple[float, float, float], std: tuple[float, float, float],
                 timm_name: str | None = None) -> None:
        indices = resolve_layers(layers, len(levels))
        strides = sorted({levels[i].stride for i in indices})
        if len(strides) != 1:
            raise ValueError(f"layers={layers!r} mixes strides {strides}; choose levels of one "
                             f"stride ({name} levels: {level_table(levels)})")
        super().__init__(BackboneCfg(name, timm_name, strides[0],
                                     sum(levels[i].dim for i in indices), mean, std))
        self.model = model
        self.levels = tuple(levels)
        self.indices = indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised, sides multiples of the stride -> ``(B, dim, H/s, W/s)``."""
        out = {}
        for i, level in enumerate(self.levels[:max(self.indices) + 1]):
            for path in level.modules:
                x = self.model.get_submodule(path)(x)
            out[i] = x
        feats = [out[i] for i in self.indices]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)
