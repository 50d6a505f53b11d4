"""What each field of a file bayesprune reads back must be, checked before anything uses it.

A schema is written in Python's own shapes::

    {"step": Integer(0), "history": [dict], "vocabulary?": ([int], None), "units": {str: Integer(1)}}

``int`` / ``float`` / ``str`` / ``bool`` / ``dict`` / ``list`` are values of that JSON type (a float
is finite, a bool is no number); ``[s]`` is a list of ``s``; ``{"key": s}`` an object holding those
keys (``"key?"``: it may lack it; other keys are let through); ``{str: s}`` an object of any keys
whose values are ``s``; a tuple is any one of its schemas; ``None`` is null; :class:`Integer`,
:class:`Number` and :class:`OneOf` bound a value.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass


class SchemaError(ValueError):
    """A value that is not what its schema says; the message names where it is."""


@dataclass(frozen=True)
class Integer:
    """An integer in ``[low, high]`` (``None``: unbounded)."""

    low: int | None = None
    high: int | None = None

    def accepts(self, value) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and (self.low is None or value >= self.low) and (self.high is None or value <= self.high))

    def __str__(self):
        return "an integer" + _bounds(self.low, self.high)


@dataclass(frozen=True)
class Number:
    """A finite number in ``[low, high]`` (``None``: unbounded)."""

    low: float | None = None
    high: float | None = None

    def accepts(self, value) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (self.low is None or value >= self.low) and (self.high is None or value <= self.high))

    def __str__(self):
        return "a finite number" + _bounds(self.low, self.high)


@dataclass(frozen=True)
class OneOf:
    """One of the given values."""

    values: tuple

    def accepts(self, value) -> bool:
        return value in self.values

    def __str__(self):
        return "one of " + ", ".join(repr(v) for v in self.values)


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    return f" ≥ {low}" if low is not None else f" ≤ {high}" if high is not None else ""


_SIMPLE = {int: Integer(), float: Number(), str: "a string", bool: "true or false", dict: "an object",
           list: "a list", None: "null"}


def _accepts_simple(value, schema) -> bool:
    if schema in (int, float):
        return _SIMPLE[schema].accepts(value)
    if schema is None:
        return value is None
    return isinstance(value, schema)


def _described(schema) -> str:
    if isinstance(schema, tuple):
        return " or ".join(_described(s) for s in schema)
    if isinstance(schema, list):
        return f"a list of items each {_described(schema[0])}"
    if isinstance(schema, dict):
        return "an object"
    return str(_SIMPLE.get(schema, schema))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _wrong(value, schema, where: str) -> SchemaError:
    return SchemaError(f"{where or 'it'} must be {_described(schema)}, got {_shown(value)}")


def validate(value, schema, where: str = "") -> None:
    """Raise :class:`SchemaError` naming the first place (a path of keys from ``where``) where ``value`` is
    not what ``schema`` says."""
    if isinstance(schema, tuple):
        for option in schema:
            try:
                validate(value, option, where)
                return
            except SchemaError:
                continue
        raise _wrong(value, schema, where)
    if isinstance(schema, list):
        if not isinstance(value, (list, tuple)):  # a tuple: the same settings given from Python
            raise _wrong(value, schema, where)
        for index, item in enumerate(value):
            validate(item, schema[0], f"{where}[{index}]")
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise _wrong(value, schema, where)
        if set(schema) == {str}:
            for key, item in value.items():
                validate(item, schema[str], f"{where}[{key!r}]")
            return
        for key, item_schema in schema.items():
            name = key.removesuffix("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                raise SchemaError(f"{where or 'it'} lacks {name!r}")
            validate(value[name], item_schema, f"{where}.{name}" if where else name)
        return
    accepted = schema.accepts(value) if hasattr(schema, "accepts") else _accepts_simple(value, schema)
    if not accepted:
        raise _wrong(value, schema, where)


def of_annotation(hint, choices=None):
    """The schema of a dataclass field's type (``int``, ``float | None``, ``tuple[str, ...]``, …) as JSON holds
    it; ``choices`` narrows it to those values."""
    if choices is not None:
        nullable = type(None) in typing.get_args(hint)
        return (OneOf(tuple(choices)), None) if nullable else OneOf(tuple(choices))
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(None if a is type(None) else of_annotation(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (tuple, list):
        return [of_annotation(typing.get_args(hint)[0])]
    if hint is float:
        return Number()
    return hint
