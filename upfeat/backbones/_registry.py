"""Name -> entrypoint registry (like timm's ``@register_model``).

Each entry keeps the *documented* :class:`~upfeat.backbones.base.BackboneCfg` (stride, channels,
normalisation) next to the entrypoint, so ``backbone_cfg(name)`` answers without building a model
and tests can check that the built model matches its documentation.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import TypeVar

from .._checks import unknown_name
from .base import Backbone, BackboneCfg

EntryFn = TypeVar("EntryFn", bound=Callable[..., Backbone])

_ENTRYPOINTS: dict[str, Callable[..., Backbone]] = {}
_CFGS: dict[str, BackboneCfg] = {}


def register_backbone(cfg: BackboneCfg) -> Callable[[EntryFn], EntryFn]:
    """Decorator registering ``fn(**kw) -> Backbone`` under ``cfg.name``.

    Example (registering is global, so not run as a doctest):
        >>> @register_backbone(BackboneCfg("my_net", None, stride=8, dim=64))  # doctest: +SKIP
        ... def my_net(pretrained: bool = False, **kw) -> Backbone:
        ...     return wrap(MyNet(), stride=8, dim=64, name="my_net")
    """
    def decorator(fn: EntryFn) -> EntryFn:
        if cfg.name in _ENTRYPOINTS:
            warnings.warn(f"backbone {cfg.name!r} registered again; the new entrypoint wins",
                          stacklevel=2)
        _ENTRYPOINTS[cfg.name] = fn
        _CFGS[cfg.name] = cfg
        return fn

    return decorator


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted registered names matching a shell-style ``pattern`` (``'dinov2*'``)."""
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def is_backbone(name: str) -> bool:
    """Whether ``name`` is registered (``timm:`` names are not listed here)."""
    return name in _ENTRYPOINTS


def get_entrypoint(name: str) -> Callable[..., Backbone]:
    """The entrypoint of ``name``; unknown names raise ``ValueError`` listing close matches."""
    if not isinstance(name, str) or name not in _ENTRYPOINTS:
        raise unknown_name(name, _ENTRYPOINTS, "backbone",
                       "See upfeat.backbones.list_backbones(), use 'timm:<timm model name>' for "
                       "any timm model, or upfeat.backbones.wrap(module, stride, dim).")
    return _ENTRYPOINTS[name]


def backbone_cfg(name: str) -> BackboneCfg:
    """Documented config (stride, dim, mean/std, timm name) of a registered backbone."""
    get_entrypoint(name)
    return _CFGS[name]
