"""Old public names kept working for a while, with a ``DeprecationWarning`` naming the new one."""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
UNSET: Any = object()


def renamed_keyword(old: str, new: str, old_value: Any, new_value: Any) -> Any:
    """The value of keyword ``new``, taking a deprecated ``old`` one if given (not both).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     renamed_keyword("size", "output_size", (4, 4), None), str(w[0].message)
        ((4, 4), 'size= is deprecated; use output_size=')
    """
    if old_value is UNSET:
        return new_value
    if new_value is not None:
        raise TypeError(f"give {new}= only ({old}= is its deprecated name), not both")
    warnings.warn(f"{old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return old_value


def deprecated_alias(fn: F, old: str) -> F:
    """``fn`` under its old name ``old``: same call, plus a ``DeprecationWarning``."""
    new = f"{fn.__module__.removesuffix('._registry')}.{fn.__name__}"

    @functools.wraps(fn)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        return fn(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated name of :func:`{new}`."
    return alias  # type: ignore[return-value]
