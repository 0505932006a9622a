"""Name -> upsampler class registry (like timm's ``@register_model``).

A checkpoint is a safetensors state dict plus ``upsampler.config()`` saved as JSON; the config
holds the registered name and every constructor argument, so ``upfeat.upsamplers.create(**config)``
rebuilds the same module.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import TypeVar

from .._checks import unknown_name
from .base import Upsampler

U = TypeVar("U", bound=type[Upsampler])

_REGISTRY: dict[str, type[Upsampler]] = {}


def register_upsampler(name: str) -> Callable[[U], U]:
    """Class decorator registering an :class:`Upsampler` subclass under ``name``."""
    def decorator(cls: U) -> U:
        if name in _REGISTRY:
            warnings.warn(f"upsampler {name!r} registered again; the new class wins", stacklevel=2)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_upsamplers(pattern: str = "*") -> list[str]:
    """Sorted registered names matching a shell-style ``pattern`` (``'jbu*'``)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_upsampler_class(name: str) -> type[Upsampler]:
    """The class registered as ``name``; unknown names raise ``ValueError`` with close matches."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise unknown_name(name, _REGISTRY, "upsampler")
    return _REGISTRY[name]


def create(name: str, dim: int, stride: int, **kwargs) -> Upsampler:
    """Build a registered upsampler for ``dim``-channel features of a stride-``stride`` backbone.

    Example:
        >>> import torch
        >>> up = create("bilinear", dim=384, stride=14)
        >>> up(torch.rand(1, 384, 16, 23), torch.rand(1, 3, 224, 320)).shape
        torch.Size([1, 384, 224, 320])
        >>> create(**up.config()).config() == up.config()
        True
    """
    return get_upsampler_class(name)(dim=dim, stride=stride, **kwargs)
