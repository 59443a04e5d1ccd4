"""Values checked against the type a run-config field declares: int, float, bool, str, None (Optional), Literal,
list[X], dict[K, V] and unions of these; and each field's one-line doc, read from its class body (`field_docs`).

A command-line override arrives as text (`CommandLineValue`) and is converted by the field's type, so "2024"
stays a string for a str field and "abc" for an int field is "--train.steps: expected an integer, got 'abc'".
A YAML value is already typed and only checked (YAML 1.1 reads `2e-4` as a string: a float field accepts it).
Floats must be finite everywhere: inf and nan are never a sensible rate, ratio or weight.
"""

from __future__ import annotations

import ast
import math
import types
import typing
from typing import Any, Literal, Union

import yaml

from lorakit.checks import is_int, is_number, short
from lorakit.errors import ConfigError

_NULLS = ("null", "none", "~", "")
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


class CommandLineValue(str):
    """The text of a `--section.key value` override, converted once its field's type is known."""


class _Mismatch(Exception):
    """The value does not fit this type (the caller says what was expected)."""


def check(value: Any, tp: Any, where: str) -> Any:
    """`value` as field type `tp` wants it (text converted, ints widened to floats); ConfigError otherwise."""
    try:
        return _convert(value, tp)
    except _Mismatch:
        got = str(value) if isinstance(value, CommandLineValue) else value
        expected = describe(tp)
        if _is_float(tp) and _non_finite(value):
            expected = "a finite number"
        raise ConfigError(f"{where}: expected {expected}, got {short(got)}") from None


def describe(tp: Any) -> str:
    """What a value of type `tp` is, in words: "an integer", "a list of strings or null"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a mapping of {_noun(args[0])} -> {_noun(args[1])}" if args else "a mapping"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _noun(tp: Any) -> str:
    return describe(tp).removeprefix("an ").removeprefix("a ")


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(tp, describe(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _is_float(tp: Any) -> bool:
    return tp is float or (_is_union(tp) and float in typing.get_args(tp))


def _non_finite(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _convert(value: Any, tp: Any) -> Any:
    cli = isinstance(value, CommandLineValue)
    if tp is Any:
        return _parse(value) if cli else value
    if _is_union(tp):
        return _union(value, typing.get_args(tp), cli)
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice or (cli and str(choice) == value):
                return choice
        raise _Mismatch
    if origin in (list, dict):
        return _container(value, origin, typing.get_args(tp), cli)
    if tp in _SCALARS:
        return _SCALARS[tp](value, cli)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _union(value: Any, args: tuple[Any, ...], cli: bool) -> Any:
    """The first arm of the union that takes `value` (None for null); strings last: "[a, b]" for
    `str | list[str]` is the list (never the string), "q_proj" the string."""
    if type(None) in args and (value is None or (cli and value.strip().lower() in _NULLS)):
        return None
    arms = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
    if cli and isinstance(_parse(value), (list, dict)):
        arms = [a for a in arms if a is not str]
    elif cli and str in arms and isinstance(_parse(value), str):
        arms = [str]  # "q_proj" for `str | list[str]` is the string, not a list split at commas
    for arm in arms:
        try:
            return _convert(value, arm)
        except _Mismatch:
            pass
    raise _Mismatch


def _container(value: Any, origin: type, args: tuple[Any, ...], cli: bool) -> Any:
    """A list or dict, its items converted by their declared types."""
    parsed = _parse(value) if cli else value
    if cli and origin is list and not isinstance(parsed, (list, dict, type(None))):
        # "--x a,b" (or "--x a"): the list [a, b], each item text as on the command line (YAML reads "64,32" as 6432)
        parsed = [CommandLineValue(p.strip()) for p in str(value).split(",") if p.strip()]
    if not isinstance(parsed, origin):
        raise _Mismatch
    if not args:
        return parsed
    if origin is list:
        return [_convert(x, args[0]) for x in parsed]
    return {_convert(k, args[0]): _convert(v, args[1]) for k, v in parsed.items()}


def _to_bool(value: Any, cli: bool) -> bool:
    if isinstance(value, bool):
        return value
    if cli and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Mismatch


def _to_int(value: Any, cli: bool) -> int:
    if cli:
        try:
            return int(value)
        except ValueError:
            raise _Mismatch from None
    if is_int(value):
        return value
    raise _Mismatch


def _to_float(value: Any, cli: bool) -> float:
    if isinstance(value, str):  # the command line, or YAML 1.1's "2e-4"
        try:
            value = float(value)
        except ValueError:
            raise _Mismatch from None
    if is_number(value):
        return float(value)
    raise _Mismatch


def _to_str(value: Any, cli: bool) -> str:
    if isinstance(value, str):
        return str(value)
    raise _Mismatch


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _parse(text: str) -> Any:
    """An override's text read as a YAML value ("[q_proj, v_proj]", "{q_proj: 2}", "3"); the text if not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return str(text)


def field_docs(cls: type) -> dict[str, str]:
    """The string literal after each field in the class body: our one-line field docs ({} for a class made by
    `section_from`, whose fields carry their docs in their metadata)."""
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
        ):
            out[node.target.id] = " ".join(str(nxt.value.value).split())
    return out
