"""Command arguments checked as QEMU's QAPI input visitor checks them, with its texts.

A command's arguments are a ``Struct`` of members, each with a type: ``STR``, ``BOOL``,
``INT``, ``UINT32``, ``UINT64``, a ``List`` of a type, a nested ``Struct``, or an
``Alternate`` (QAPI's "one of": a string or a struct, by JSON type). ``check`` visits the
members in schema order, as QEMU does, so the first error is QEMU's first error::

    Parameter 'name' is missing
    Parameter 'bogus' is unexpected                  (after every known member is fine)
    Invalid parameter type for 'persistent', expected: boolean
    Parameter 'granularity' expects uint64           (not an integer at all)
    Parameter 'granularity' expects uint32_t         (an integer out of range)
    Parameter 'bitmaps[0].name' is missing           (inside a list of structs)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dirtybits.proto.qmp.core import QmpError


class Scalar(enum.Enum):
    STR = "string"
    BOOL = "boolean"
    INT = "integer"
    UINT32 = "uint32_t"
    UINT64 = "uint64"
    ANY = "any"


STR, BOOL, INT, UINT32, UINT64, ANY = (Scalar.STR, Scalar.BOOL, Scalar.INT, Scalar.UINT32,
                                       Scalar.UINT64, Scalar.ANY)


@dataclass(frozen=True)
class Member:
    name: str
    type: Type
    optional: bool = False


@dataclass(frozen=True)
class Struct:
    name: str
    members: tuple[Member, ...]


@dataclass(frozen=True)
class List:
    of: Type


@dataclass(frozen=True)
class Alternate:
    """A string or a struct, chosen by the JSON type (``BlockDirtyBitmapOrStr``)."""

    name: str
    struct: Struct


Type = Scalar | Struct | List | Alternate


def _fail(desc: str) -> QmpError:
    return QmpError(desc)


def _value(path: str, t: Type, v: Any) -> Any:
    if isinstance(t, Scalar):
        return _scalar(path, t, v)
    if isinstance(t, List):
        if not isinstance(v, list):
            raise _fail(f"Invalid parameter type for '{path}', expected: array")
        return [_value(f"{path}[{i}]", t.of, item) for i, item in enumerate(v)]
    if isinstance(t, Alternate):
        if isinstance(v, str):
            return v
        if isinstance(v, dict):
            return _struct(path, t.struct, v)
        # QEMU 7.2 names no member here (its visitor's name for a list element is NULL)
        raise _fail(f"Invalid parameter type for 'null', expected: {t.name}")
    if not isinstance(v, dict):
        raise _fail(f"Invalid parameter type for '{path}', expected: object")
    return _struct(path, t, v)


def _scalar(path: str, t: Scalar, v: Any) -> Any:
    if t is Scalar.ANY:
        return v
    if t is Scalar.STR:
        if not isinstance(v, str):
            raise _fail(f"Invalid parameter type for '{path}', expected: string")
        return v
    if t is Scalar.BOOL:
        if not isinstance(v, bool):
            raise _fail(f"Invalid parameter type for '{path}', expected: boolean")
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        if t is Scalar.INT:
            raise _fail(f"Invalid parameter type for '{path}', expected: integer")
        raise _fail(f"Parameter '{path}' expects uint64")  # QEMU reads uint32 as uint64 first
    if t is Scalar.UINT64 and not 0 <= v < 1 << 64:
        raise _fail(f"Parameter '{path}' expects uint64")
    if t is Scalar.UINT32 and not 0 <= v < 1 << 32:
        raise _fail(f"Parameter '{path}' expects uint32_t")
    if t is Scalar.INT and not -(1 << 63) <= v < 1 << 63:
        raise _fail(f"Parameter '{path}' expects int64")
    return v


def _struct(path: str, s: Struct, obj: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prefix = f"{path}." if path else ""
    for m in s.members:
        if m.name not in obj:
            if not m.optional:
                raise _fail(f"Parameter '{prefix}{m.name}' is missing")
            continue
        out[m.name] = _value(f"{prefix}{m.name}", m.type, obj[m.name])
    for key in obj:
        if key not in out and not any(m.name == key for m in s.members):
            raise _fail(f"Parameter '{prefix}{key}' is unexpected")
    return out


def check(arguments: Mapping[str, Any], spec: Struct) -> dict[str, Any]:
    """The arguments, checked against ``spec`` (only the members given come back).
    Raises ``QmpError`` (GenericError) with QEMU's text for the first problem."""
    return _struct("", spec, arguments)


def command(name: str, *members: Member) -> Struct:
    """A command's argument struct (``q_obj_NAME_arg`` in QEMU)."""
    return Struct(name, members)


__all__ = ["ANY", "BOOL", "INT", "STR", "UINT32", "UINT64", "Alternate", "List", "Member",
           "Scalar", "Struct", "check", "command"]
