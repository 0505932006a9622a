"""Name -> entrypoint registry for downsamplers (like timm's ``@register_model``)."""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import TypeVar

from .._checks import unknown_name
from .base import Downsampler

EntryFn = TypeVar("EntryFn", bound=Callable[..., Downsampler])
_ENTRYPOINTS: dict[str, Callable[..., Downsampler]] = {}


def register_downsampler(name: str) -> Callable[[EntryFn], EntryFn]:
    """Decorator registering ``fn(dim, stride, **kw) -> Downsampler`` under ``name``."""
    def decorator(fn: EntryFn) -> EntryFn:
        if name in _ENTRYPOINTS:
            warnings.warn(f"downsampler {name!r} registered again; the new entrypoint wins",
                          stacklevel=2)
        _ENTRYPOINTS[name] = fn
        return fn

    return decorator


def list_downsamplers(pattern: str = "*") -> list[str]:
    """Sorted registered names matching a shell-style ``pattern`` (``'att*'``)."""
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def create(name: str, dim: int, stride: int, **kwargs) -> Downsampler:
    """Build a downsampler by name.

    Args:
        name: ``'simple'`` or ``'attention'`` (see :func:`list_downsamplers`).
        dim: feature channels ``C`` (unused by ``'simple'``).
        stride: backbone stride ``s``.
        **kwargs: passed to the class (e.g. ``kernel_size``).

    Example:
        >>> create("attention", dim=8, stride=16)
        AttentionDownsampler(
          dim=8, stride=16, kernel_size=16
          (saliency): Conv2d(8, 1, kernel_size=(1, 1), stride=(1, 1), bias=False)
        )
    """
    if not isinstance(name, str) or name not in _ENTRYPOINTS:
        raise unknown_name(name, _ENTRYPOINTS, "downsampler")
    return _ENTRYPOINTS[name](dim, stride, **kwargs)


@register_downsampler("simple")
def simple(dim: int, stride: int, **kwargs) -> Downsampler:
    from .simple import SimpleDownsampler
    return SimpleDownsampler(stride, **kwargs)


@register_downsampler("attention")
def attention(dim: int, stride: int, **kwargs) -> Downsampler:
    from .attention import AttentionDownsampler
    return AttentionDownsampler(dim, stride, **kwargs)
