"""The CLI's one error boundary: user errors become one ``error: ...`` line and exit code 2.

Caught: upfeat's own errors (:class:`~upfeat.UpfeatError` and its subclasses), ``OSError``
(missing files, ports, permissions), ``ImportError`` (an optional extra not installed) and bad
values (``ValueError``, ``TypeError``, ``OverflowError``). ``UPFEAT_DEBUG=1`` re-raises them with
the traceback instead. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

from .._errors import UpfeatError

USER_ERRORS = (UpfeatError, OSError, ImportError, ValueError, TypeError, OverflowError)
F = TypeVar("F", bound=Callable)


def one_line(e: BaseException) -> str:
    """``str(e)`` on one line (an ``OSError``'s file name and reason when it has them)."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def user_errors(fn: F) -> F:
    """Decorate a typer command: :data:`USER_ERRORS` -> ``error: <one line>`` on stderr, exit 2."""
    import typer

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("UPFEAT_DEBUG", "").lower() in ("1", "true", "yes"):
                raise
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
