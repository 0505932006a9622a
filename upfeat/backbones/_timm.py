"""Any timm model as a :class:`Backbone`, through timm's stable ``forward_intermediates`` API.

Stride and channels are read from ``model.feature_info`` (never parsed from names), the input
normalisation from ``model.pretrained_cfg``.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneCfg
from ._hub import timm_pretrained_kwargs
from ._registry import register_backbone

Layers = int | Sequence[int] | None


def resolve_layers(layers: Layers, num: int) -> list[int]:
    """Non-negative feature indices from ``None`` (last), an int (negative counts from the end),
    or a sequence of ints. Raises ``ValueError`` outside ``[-num, num)``."""
    if layers is None:
        layers = [-1]
    elif isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"layers must be None, an int or a non-empty sequence of ints, got {layers!r}")
    out = []
    for i in layers:
        if not isinstance(i, int) or not -num <= i < num:
            raise ValueError(f"layers entries must be ints in [{-num}, {num - 1}] (this model has "
                             f"{num} feature levels), got {i!r}")
        out.append(i % num)
    return out


class TimmBackbone(Backbone):
    """A timm model's feature level(s) ``layers`` as ``(B, dim, H/stride, W/stride)``.

    Several levels are concatenated along channels (``dim`` = their sum), so they must share one
    stride. ``norm=True`` applies the model's final norm to each level (ViTs; CNNs ignore it).
    """

    def __init__(self, model: nn.Module, name: str, timm_name: str | None,
                 layers: Layers = None, norm: bool = True) -> None:
        info = getattr(model, "feature_info", None)
        if not info or not hasattr(model, "forward_intermediates"):
            raise TypeError(f"timm model {timm_name!r} has no feature_info / forward_intermediates; "
                            f"wrap it yourself with upfeat.backbones.wrap(module, stride, dim)")
        info = [dict(f) for f in info]
        indices = resolve_layers(layers, len(info))
        strides = sorted({int(info[i]["reduction"]) for i in indices})
        if len(strides) != 1:
            raise ValueError(f"layers={layers!r} mixes strides {strides}; choose levels of one stride")
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        cfg = BackboneCfg(name, timm_name, strides[0], sum(int(info[i]["num_chs"]) for i in indices),
                          tuple(pcfg.get("mean", IMAGENET_MEAN)), tuple(pcfg.get("std", IMAGENET_STD)))
        super().__init__(cfg)
        self.model = model
        self.indices = indices
        self.norm = norm
        params = inspect.signature(model.forward_intermediates).parameters
        self._extra = {"norm": norm} if "norm" in params else {}
        if "stop_early" in params:  # skip blocks after the last requested level
            self._extra["stop_early"] = True

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_intermediates(x, indices=self.indices, output_fmt="NCHW",
                                                 intermediates_only=True, **self._extra)
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)


def _device_ctx(device: str | torch.device | None) -> contextlib.AbstractContextManager:
    # Building under a device context allocates there directly: 'meta' builds a 7B model in ms.
    return torch.device(device) if device is not None else contextlib.nullcontext()


def create_timm_model(timm_name: str, name: str, pretrained: bool = False,
                      weights: str | os.PathLike[str] | None = None,
                      device: str | torch.device | None = None, **model_kw) -> nn.Module:
    """``timm.create_model`` with ``dynamic_img_size=True`` when the model supports it, no
    classifier head, weights per :func:`~upfeat.backbones._hub.timm_pretrained_kwargs`, eval mode."""
    import timm

    if not timm.is_model(timm_name):
        arch = timm_name.split(".")[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm model {timm_name!r}.{hint} See timm.list_models().")
    kw = {"num_classes": 0, **model_kw, **timm_pretrained_kwargs(name, timm_name, pretrained, weights)}
    with _device_ctx(device):
        try:
            model = timm.create_model(timm_name, dynamic_img_size=True, **kw)
        except TypeError as err:  # CNNs take any size and have no such argument
            if "dynamic_img_size" not in str(err):
                raise
            model = timm.create_model(timm_name, **kw)
    return model.eval()


def create_timm(timm_name: str, name: str | None = None, pretrained: bool = True,
                weights: str | os.PathLike[str] | None = None, layers: Layers = None,
                norm: bool = True, device: str | torch.device | None = None,
                **model_kw) -> TimmBackbone:
    """Any timm model (``'convnext_tiny'``, ``'vit_small_patch14_dinov2.lvd142m'``) as a Backbone."""
    model = create_timm_model(timm_name, name or f"timm:{timm_name}", pretrained, weights, device,
                              **model_kw)
    backbone = TimmBackbone(model, name or f"timm:{timm_name}", timm_name, layers, norm)
    return backbone.to(device) if device is not None else backbone


def timm_entrypoint(cfg: BackboneCfg, doc: str, **fixed_kw) -> Callable[..., Backbone]:
    """Register and return the entrypoint building ``cfg.timm_name`` (``fixed_kw`` go to timm)."""
    assert cfg.timm_name is not None

    def entry(pretrained: bool = True, weights: str | os.PathLike[str] | None = None,
              layers: Layers = None, norm: bool = True, device: str | torch.device | None = None,
              **model_kw) -> Backbone:
        return create_timm(cfg.timm_name, cfg.name, pretrained, weights, layers, norm, device,
                           **{**fixed_kw, **model_kw})

    entry.__name__ = entry.__qualname__ = cfg.name
    entry.__doc__ = (
        f"{doc}: timm ``{cfg.timm_name}``, stride {cfg.stride}, dim {cfg.dim}.\n\n"
        "Args:\n"
        "    pretrained: load hub weights (cached or downloaded; offline raises with advice).\n"
        "    weights: a local .safetensors / timm / original checkpoint, instead of the hub.\n"
        "    layers: block index (negative from the end), or a list (concatenated); last if None.\n"
        "    norm: apply the final norm to the chosen blocks' tokens.\n"
        "    device: build directly on this device (``'meta'`` for shapes only).\n")
    return register_backbone(cfg)(entry)
