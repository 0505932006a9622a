"""Typer options generated from a dataclass, so an option is declared once: as a field.

A field ``batch_size: int = opt("Images per step.", 2)`` becomes ``--batch-size INTEGER`` with
that help; the field's ``metadata`` gives ``help`` and optionally ``cli`` (another option name).
Types: ``bool`` -> ``--x/--no-x``; ``dict`` -> a JSON object; ``list[T]`` -> a repeatable option;
``T | None`` -> ``T``; other unions (``int | str``) -> a string the dataclass converts itself.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Collection
from typing import Annotated, Any, Optional

import typer


def json_dict(text: Optional[str], option: str) -> Optional[dict]:
    """Parse an option's JSON object (``None`` stays ``None``); a bad one is a usage error."""
    if text is None:
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{option} must be a JSON object, e.g. '{{\"layers\": -2}}' ({e})")
    if not isinstance(d, dict):
        raise typer.BadParameter(f"{option} must be a JSON object, got {text!r}")
    return d


def _option_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return str if hint is dict else hint


def _shown(default: Any) -> str | bool:
    if default is None or default == [] or default == {}:
        return False
    return str(default).lower() if isinstance(default, bool) else str(default)


def dataclass_options(cls: type, always: Collection[str] = ()) -> Callable:
    """Decorator: the typer command gets one option per field of dataclass ``cls`` and is called
    with the dict of the options given (field name -> value; JSON options parsed).

    Options not given are left out, so a caller can layer them over other values (e.g. a resumed
    run's); fields in ``always`` are always passed, with the dataclass default.
    """
    hints = typing.get_type_hints(cls)
    params, parsers = [], {}
    for f in dataclasses.fields(cls):
        name = f.metadata.get("cli", "--" + f.name.replace("_", "-"))
        typ = _option_type(hints[f.name])
        if typ is bool:
            name = f"{name}/--no-{name[2:]}"
        if hints[f.name] is dict:
            parsers[f.name] = functools.partial(json_dict, option=name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.name in always:
            info = typer.Option(name, help=f.metadata.get("help"))
        else:  # None = not given; the help still shows the dataclass default
            info = typer.Option(name, help=f.metadata.get("help"), show_default=_shown(default))
            typ, default = Optional[typ], None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[typ, info]))

    def decorate(fn: Callable[[dict], Any]) -> Callable:
        @functools.wraps(fn)
        def command(**options: Any) -> Any:
            return fn({k: parsers[k](v) if k in parsers else v for k, v in options.items()
                       if v is not None})
        command.__signature__ = inspect.Signature(params)  # what typer reads
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
