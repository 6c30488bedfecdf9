"""The command line's option values converted without pydantic, where that gives what
typer gives.

typer (from 0.2x) converts every value through a pydantic ``TypeAdapter``: importing
pydantic and building an adapter for each option costs ~0.045 s of CPU, a sixteenth of
a one-shot ``streamdet process`` run on a small exposure. streamdet's options take
plain values — text, paths, whole and decimal numbers, lists of those — and for these
the conversion here gives what typer's does: the text itself, a path put through
typer's own path checks (the function its adapter calls), a plain decimal number
within the option's bounds. Any other value (bytes, an out-of-range or unusual number,
anything that fails) goes through typer's own conversion, so its results and its error
messages stay typer's. A typer without these internals (older, or changed) converts
everything itself, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, get_args

try:  # typer's conversion layer (private: absent in typer < 0.2x, may change)
    from typer._coercion import RuntimeParam, build_runtime_param
    from typer._param_types import coerce_cli_path
except ImportError:  # pragma: no cover - depends on the installed typer
    RuntimeParam = None

#: a whole number as typed (no sign, spaces, underscores or leading zeros)
_WHOLE = re.compile(r"0|[1-9][0-9]{0,17}")
#: a non-negative decimal number as typed (no exponent, sign, spaces or underscores)
_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?")


class _NotPlain(Exception):
    """The value is left to typer's own conversion."""


def _flag(value, info):
    if type(value) is not bool:
        raise _NotPlain
    return value


def _text(value, info):
    if type(value) is not str:
        raise _NotPlain
    return value


def _whole(value, info):
    if type(value) is int:
        number = value
    elif type(value) is str and _WHOLE.fullmatch(value):
        number = int(value)
    else:
        raise _NotPlain
    _check_bounds(number, info)
    return number


def _decimal(value, info):
    if type(value) is float:
        number = value
    elif type(value) is str and _DECIMAL.fullmatch(value):
        number = float(value)
    else:
        raise _NotPlain
    _check_bounds(number, info)
    return number


def _check_bounds(number, info) -> None:
    if ((info.min is not None and number < info.min)
            or (info.max is not None and number > info.max)):
        raise _NotPlain  # typer words the error


def _converter(annotation, info) -> Callable | None:
    """How a single value of ``annotation`` converts (``value, param, ctx -> result``),
    or None when it is not a plain type."""
    if info.parser is not None or getattr(info, "clamp", False):
        return None
    if annotation is bool:
        return lambda value, param, ctx: _flag(value, info)
    if annotation is str:
        return lambda value, param, ctx: _text(value, info)
    if annotation is int:
        return lambda value, param, ctx: _whole(value, info)
    if annotation is float:
        return lambda value, param, ctx: _decimal(value, info)
    if annotation is Path and getattr(info, "path_type", None) is None:
        def path(value, param, ctx):
            if type(value) is not str or not value:
                raise _NotPlain
            return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
        return path
    return None


if RuntimeParam is not None:
    @dataclass(frozen=True)
    class _PlainValues(RuntimeParam):
        """One option's conversion: plain values here, the rest through typer's own."""

        convert: Callable[[Any, Any, Any], Any] = None
        many: bool = False

        def _coerce_value(self, value, param, ctx):
            try:
                if not self.many:
                    return self.convert(value, param, ctx)
                if not isinstance(value, (list, tuple)):
                    raise _NotPlain
                return [self.convert(item, param, ctx) for item in value]
            except Exception:  # typer's conversion decides, and words any error
                typers = build_runtime_param(param.type_descriptor)
                return typers._coerce_value(value, param=param, ctx=ctx)


def convert_plainly(command, ctx) -> None:
    """Give the options of ``command`` (a typer command or group, about to parse its
    arguments in ``ctx`` or in a context under it) that take plain values the
    conversion of this module, its help option included (typer would make an adapter
    for that flag too)."""
    if RuntimeParam is None:
        return
    try:
        params = command.get_params(ctx)
    except Exception:  # pragma: no cover - a command of another kind
        params = getattr(command, "params", ())
    for param in params:
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or getattr(param, "_runtime_param", "unknown") is not None:
            continue
        if descriptor.file_annotation is not None or descriptor.is_choice:
            continue
        annotation, many = descriptor.annotation, descriptor.is_list
        if many:
            args = get_args(annotation)
            if len(args) != 1:
                continue
            annotation = args[0]
        convert = _converter(annotation, descriptor.parameter_info)
        if convert is not None:
            param._runtime_param = _PlainValues(descriptor.parameter_info,
                                                descriptor.annotation, convert, many)
