"""Typed options: every recipe option and config field is checked against its declared type annotation, and
command-line strings are parsed by that type.

Supported annotations: ``str``, ``bool``, ``int``, ``float`` (an int is accepted and converted), ``None``, unions
(``int | None``), ``Literal[...]``, ``tuple[X, ...]`` / ``tuple`` / ``list[X]`` / ``list``, ``dict`` /
``dict[K, V]`` and ``Any`` (not checked). Python values must already have the declared type (``True`` is not an int,
``"no"`` is not a bool, ``"in_proj"`` is not a tuple); strings from the command line (``strings=True``) are parsed:
``true/false/yes/no/on/off/1/0`` for bools, ``none``/``null`` for None, ints, floats, comma-separated (or JSON) lists,
JSON dicts, and strings with or without JSON quotes.

Hand-written rather than pydantic: recipe ``Args`` stay plain dataclasses, the set of types is small, and the base
install gains no dependency.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


class OptionTypeError(ValueError):
    """An option value does not have its declared type (or a command-line string does not parse as it)."""


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def describe(tp) -> str:
    """Human wording of an annotation ("an int or None", "a tuple of strings", ...)."""
    if tp is Any:
        return "anything"
    if tp is type(None) or tp is None:
        return "None"
    if _is_union(tp):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {typing.get_args(tp)!r}"
    if origin in (tuple, list) or tp in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        kind = "tuple" if (origin or tp) is tuple else "list"
        inner = f" of {describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if len(args) == 1 else ""
        return f"a {kind}{inner} (comma-separated on the command line)"
    if origin is dict or tp is dict:
        return "a dict"
    return {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def supported(tp) -> bool:
    """Whether :func:`coerce` knows ``tp`` (used by tests to keep every recipe's Args checkable)."""
    if tp in (Any, bool, int, float, str, tuple, list, dict, type(None), None):
        return True
    origin = typing.get_origin(tp)
    if _is_union(tp) or origin in (tuple, list):
        return all(a is Ellipsis or supported(a) for a in typing.get_args(tp))
    if origin is dict:
        return all(supported(a) for a in typing.get_args(tp))
    return origin is Literal


def _fail(name: str, tp, value, owner: str, text: str | None):
    where = f"{owner} option {name!r}" if owner else f"option {name!r}"
    got = f"{text!r} (from the command line)" if text is not None else f"{value!r} ({type(value).__name__})"
    raise OptionTypeError(f"{where} must be {describe(tp)}; got {got}")


def _split_list(text: str) -> list:
    text = text.strip()
    if text.startswith("["):
        try:
            return list(json.loads(text))
        except json.JSONDecodeError:
            pass
    return [p.strip() for p in text.split(",") if p.strip()]


def coerce(value, tp, name: str, owner: str = "", strings: bool = False):
    """``value`` checked against annotation ``tp`` (and converted: int -> float, list -> tuple); with ``strings``,
    a str value is parsed as a command-line string. Raises :class:`OptionTypeError` with what is expected."""
    text = value if strings and isinstance(value, str) else None
    try:
        return _coerce(value, tp, strings)
    except (OptionTypeError, ValueError, TypeError):
        _fail(name, tp, value, owner, text)


def _coerce(value, tp, strings: bool):
    if tp is Any:
        return value
    parse = strings and isinstance(value, str)
    if tp is type(None) or tp is None:
        if value is None or (parse and value.strip().lower() in _NONE):
            return None
        raise ValueError
    if _is_union(tp):
        members = typing.get_args(tp)
        if type(None) in members and (value is None or (parse and value.strip().lower() in _NONE)):
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, strings)
            except (ValueError, TypeError):
                continue
        raise ValueError
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return choice
            if parse:
                try:
                    if _coerce(value, type(choice), True) == choice:
                        return choice
                except (ValueError, TypeError):
                    continue
        raise ValueError
    if tp is bool:
        if isinstance(value, bool):
            return value
        if parse and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if parse:
            return int(value.strip())
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if parse:
            return float(value.strip())
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            if parse and len(value) >= 2 and value[0] == value[-1] == '"':
                return json.loads(value)  # a JSON-quoted string, as older command lines wrote them
            return value
        raise ValueError
    if origin in (tuple, list) or tp in (tuple, list):
        kind = origin or tp
        if parse:
            value = _split_list(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError
        args = typing.get_args(tp)
        if kind is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):  # fixed-length tuple
            if len(args) != len(value):
                raise ValueError
            return tuple(_coerce(v, a, strings) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, strings) for v in value]
        return tuple(items) if kind is tuple else items
    if origin is dict or tp is dict:
        if parse:
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        return {_coerce(k, args[0], False): _coerce(v, args[1], False) for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ValueError
    return value  # an annotation this checker does not know: not checked


def field_types(cls) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields (or a function's parameters)."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:  # a developer error: say which class, not a bare NameError at the user's call
        raise TypeError(f"the type annotations of {cls.__qualname__} cannot be resolved ({err}); names used in "
                        "option annotations must be importable from the module that defines it") from err
    if dataclasses.is_dataclass(cls):
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    return {k: v for k, v in hints.items() if k != "return"}


def coerce_fields(types_: dict[str, Any], values: dict, owner: str = "", strings: bool = False) -> dict:
    """Every ``values[k]`` checked against ``types_[k]`` (keys must be known to the caller)."""
    return {k: coerce(v, types_.get(k, Any), k, owner, strings) for k, v in values.items()}
