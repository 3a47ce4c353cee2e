"""Command arguments checked as QEMU's QAPI input visitor checks them, with its texts.

A command's arguments are a ``Struct`` of members, each with a type: a scalar (``STR``,
``BOOL``, ``INT``, ``UINT32``, ``UINT64``, ``NUMBER``, ``SIZE``, ``ANY``), an ``Enum``, a
``List`` of a type, a nested ``Struct``, a flat ``Union`` (base members, one of them the
discriminator enum, then the members of the variant it names: ``BlockdevOptions``), or an
``Alternate`` (QAPI's "one of", chosen by the JSON type: a struct or union for an object, a
string or enum for a string, optionally null: ``BlockdevRefOrNull``). ``check`` visits the
members in schema order, as QEMU does, so the first error is QEMU's first error::

    Parameter 'name' is missing
    Parameter 'bogus' is unexpected                  (after every known member is fine)
    Invalid parameter type for 'persistent', expected: boolean
    Parameter 'granularity' expects uint64           (not an integer at all)
    Parameter 'granularity' expects uint32_t         (an integer out of range)
    Parameter 'bitmaps[0].name' is missing           (inside a list of structs)
    Parameter 'driver' does not accept value 'bogus' (enums name the member, not its path)
    Invalid parameter type for 'file', expected: BlockdevRef   (alternates likewise)

Two input modes, as QEMU has two visitors. JSON (QMP, a ``{``-prefixed ``--blockdev``): values
have their JSON types. keyval (``check(..., keyval=True)``, a ``--blockdev`` in ``KEY=VALUE``
form, see ``dirtybits.proto.keyval``): every scalar is a string, converted as the keyval
visitor converts it (``on``/``yes``/``true``/``y`` and ``off``/``no``/``false``/``n`` for
booleans; ``strtoll`` base 0 for integers, so ``0x10`` and ``010`` (octal) are numbers; QEMU's
size suffixes for sizes), with its own texts (``Parameter 'x' expects integer``, ``Parameter
'x' expects 'on' or 'off'``, ``Parameters 'x.*' are unexpected``).

When several members are unexpected QEMU names the first its hash table yields: the order
depends on the keys, not on how they were written, and ``check`` reproduces it (QEMU's
``QDict`` bucket order, then GLib 2.74's ``GHashTable`` of the keys not yet visited).

One deliberate difference: arguments nested more than ``MAX_NESTING`` (100) objects and lists
deep are refused (QEMU has no limit of its own short of its JSON parser's 1024).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dirtybits.proto.qmp.core import QmpError
from dirtybits.sizes import SizeError, _strtosz


class Scalar(enum.Enum):
    STR = "string"
    BOOL = "boolean"
    INT = "integer"
    UINT32 = "uint32_t"
    UINT64 = "uint64"
    NUMBER = "number"
    SIZE = "size"
    ANY = "any"


STR, BOOL, INT, UINT32, UINT64, NUMBER, SIZE, ANY = (
    Scalar.STR, Scalar.BOOL, Scalar.INT, Scalar.UINT32, Scalar.UINT64, Scalar.NUMBER,
    Scalar.SIZE, Scalar.ANY)


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
class Enum:
    """A QAPI enum: a string from ``values``."""

    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Union:
    """A QAPI flat union: ``base`` members (``discriminator`` among them, an ``Enum``), then
    the members of the variant its value names (none when it names no variant).

    ``variants`` may be filled in after construction, for unions that contain themselves
    (``BlockdevOptions`` through ``BlockdevRef``); it takes no part in comparisons."""

    name: str
    base: tuple[Member, ...]
    discriminator: str
    variants: Mapping[str, Struct] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class List:
    of: Type


@dataclass(frozen=True)
class Alternate:
    """One of several types, chosen by the JSON type (``BlockDirtyBitmapOrStr``,
    ``BlockdevRef``, ``BlockdevRefOrNull``): an object takes ``struct``, a string takes
    ``string`` (``STR`` or an ``Enum``), null is allowed when ``null``. In keyval mode every
    scalar is a string."""

    name: str
    struct: Struct | Union | None = None
    string: Scalar | Enum | None = Scalar.STR
    null: bool = False


Type = Scalar | Enum | Struct | Union | List | Alternate

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_LIMIT = 1 << 64
UINT32_MAX = (1 << 32) - 1
_M32 = 0xFFFFFFFF
# QEMU takes any depth (its JSON parser stops at 1024); a check that recursed that deep would
# overflow Python's stack, so arguments nested deeper than this are refused, with a clear text
MAX_NESTING = 100


def _fail(desc: str) -> QmpError:
    return QmpError(desc)


# ---------------------------------------------------------------------------- QEMU's key order

def _tdb_hash(key: bytes) -> int:
    """``tdb_hash`` (qobject/qdict.c)."""
    value = (0x238F13AF * len(key)) & _M32
    for i, c in enumerate(key):
        value = (value + (c << (i * 5 % 24))) & _M32
    return (1103515243 * value + 12345) & _M32


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def qdict_order(keys: Iterable[str]) -> list[str]:
    """The order QEMU's ``QDict`` iterates keys inserted in ``keys`` order: by hash bucket
    (of 512), the latest-inserted first within one."""
    listed = list(keys)
    ranked = [(_tdb_hash(_key_bytes(k)) % 512, -i, k) for i, k in enumerate(listed)]
    return [k for _, _, k in sorted(ranked)]


_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
              65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213,
              33554393, 67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647)
_MIN_SHIFT = 3
_UNUSED, _TOMBSTONE = 0, 1


def _g_str_hash(key: bytes) -> int:
    """GLib's ``g_str_hash`` (djb2 over signed chars)."""
    h = 5381
    for c in key:
        h = (h * 33 + (c - 256 if c > 127 else c)) & _M32
    return h


class _GHashSet:
    """GLib 2.74's ``GHashTable`` as far as its iteration order goes: open addressing with
    quadratic probing, tombstones, and the in-place resize."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[bytes | None] = [None] * self.size
        self.nnodes = self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, h: int) -> int:
        return ((h * 11) & _M32) % self.mod

    def _lookup(self, key: bytes) -> tuple[int, int]:
        h = max(_g_str_hash(key), 2)
        i = self._index(h)
        step = 0
        tombstone = -1
        while self.hashes[i] != _UNUSED:
            if self.hashes[i] == h and self.keys[i] == key:
                return i, h
            if self.hashes[i] == _TOMBSTONE and tombstone < 0:
                tombstone = i
            step += 1
            i = (i + step) & self.mask
        return (tombstone if tombstone >= 0 else i), h

    def insert(self, key: bytes) -> None:
        i, h = self._lookup(key)
        if self.hashes[i] >= 2:
            return
        old = self.hashes[i]
        self.hashes[i], self.keys[i] = h, key
        self.nnodes += 1
        if old == _UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: bytes) -> None:
        i, _ = self._lookup(key)
        if self.hashes[i] < 2:
            return
        self.hashes[i], self.keys[i] = _TOMBSTONE, None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        occ = self.noccupied
        if (self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT) or \
                self.size <= occ + occ // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        wanted = int(self.nnodes * 1.333)
        self._set_shift(max(wanted.bit_length(), _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = _UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i] = _UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                j = self._index(node_hash)
                step = 0
                while moved[j]:
                    step += 1
                    j = (j + step) & self.mask
                moved[j] = True
                replaced, replaced_key = self.hashes[j], self.keys[j]
                self.hashes[j], self.keys[j] = node_hash, key
                if replaced < 2:
                    break
                node_hash, key = replaced, replaced_key
        if self.size < old_size:
            del self.hashes[self.size:]
            del self.keys[self.size:]
        self.noccupied = self.nnodes

    def first(self) -> bytes | None:
        for h, k in zip(self.hashes, self.keys, strict=True):
            if h >= 2:
                return k
        return None


def first_unvisited(keys: Sequence[str], visited: Iterable[str]) -> str | None:
    """The key QEMU reports as unexpected: of ``keys`` (a dict's keys in insertion order), the
    first its visitor's table of unvisited keys yields once ``visited`` (in visiting order)
    are taken out; None when every key was visited."""
    table = _GHashSet()
    names = {_key_bytes(k): k for k in keys}
    for k in qdict_order(keys):
        table.insert(_key_bytes(k))
    for k in visited:
        table.remove(_key_bytes(k))
    found = table.first()
    return None if found is None else names[found]


# ---------------------------------------------------------------------------- keyval scalars

_WS = " \t\n\v\f\r"  # C isspace() in the "C" locale
_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _strtox(text: str) -> tuple[bool, int] | None:
    """``strto[u]ll(text, &end, 0)`` consuming all of ``text``: (negative, magnitude), or
    None when it does not convert (no digits, anything left over)."""
    s = text.lstrip(_WS)
    neg = s[:1] == "-"
    if s[:1] in ("+", "-"):
        s = s[1:]
    if s[:2] in ("0x", "0X") and s[2:3] and s[2] in _DIGITS[16]:
        digits, base = s[2:], 16
    elif s[:1] == "0":
        digits, base = s, 8
    else:
        digits, base = s, 10
    if not digits or any(c not in _DIGITS[base] for c in digits):
        return None
    return neg, int(digits, base)


def _strtoi64(text: str) -> int | None:
    """``qemu_strtoi64(text, NULL, 0)``: None on a parse error or out of range."""
    parsed = _strtox(text)
    if parsed is None:
        return None
    value = -parsed[1] if parsed[0] else parsed[1]
    return value if INT64_MIN <= value <= INT64_MAX else None


def _strtou64(text: str) -> int | None:
    """``qemu_strtou64(text, NULL, 0)`` (QEMU 7.2: ``strtoull``, which negates a negative
    number modulo 2^64)."""
    parsed = _strtox(text)
    if parsed is None or parsed[1] >= UINT64_LIMIT:
        return None
    return (-parsed[1]) % UINT64_LIMIT if parsed[0] else parsed[1]


_DEC_FLOAT = re.compile(r"[+-]?(?P<m>\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z", re.ASCII)
_HEX_FLOAT = re.compile(
    r"[+-]?0[xX](?P<m>[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)([pP][+-]?\d+)?\Z", re.ASCII)
DBL_MIN = 2.2250738585072014e-308


def _strtod_finite(text: str) -> float | None:
    """``qemu_strtod_finite(text, NULL, ...)``: a finite double, None otherwise (an overflow
    or an underflow, which set ERANGE, included)."""
    s = text.lstrip(_WS)
    if m := _DEC_FLOAT.match(s):
        value = float(s)
    elif m := _HEX_FLOAT.match(s):
        value = float.fromhex(s)
    else:
        return None
    nonzero = any(c not in "0." for c in m.group("m"))
    if not math.isfinite(value) or (nonzero and abs(value) < DBL_MIN):
        return None
    return value


_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


# ---------------------------------------------------------------------------- the visitor

class _Visitor:
    def __init__(self, keyval: bool) -> None:
        self.keyval = keyval
        self.depth = 0  # objects and lists open

    def enter(self, path: str) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _fail(f"Parameter '{path}' nests objects and lists more than {MAX_NESTING} "
                        "deep")

    def value(self, path: str, name: str | None, t: Type, v: Any) -> Any:
        """``v`` checked against ``t``: ``path`` is its full name in messages, ``name`` the
        member's own name (None for a list element: QEMU then says 'null')."""
        if isinstance(t, Scalar):
            return self.scalar(path, name, t, v)
        if isinstance(t, Enum):
            return self.enum(path, name, t, v)
        if isinstance(t, List):
            if not isinstance(v, list):
                raise _fail(f"Invalid parameter type for '{path}', expected: array")
            sep = "{}.{}" if self.keyval else "{}[{}]"
            self.enter(path)
            items = [self.value(sep.format(path, i), None, t.of, item)
                     for i, item in enumerate(v)]
            self.depth -= 1
            return items
        if isinstance(t, Alternate):
            return self.alternate(path, name, t, v)
        if not isinstance(v, dict):
            raise _fail(f"Invalid parameter type for '{path}', expected: object")
        return self.object(path, t, v)

    def alternate(self, path: str, name: str | None, t: Alternate, v: Any) -> Any:
        if isinstance(v, dict) and t.struct is not None:
            return self.object(path, t.struct, v)
        if isinstance(v, str) and t.string is not None:
            if isinstance(t.string, Enum):
                return self.enum(path, name, t.string, v)
            return self.scalar(path, name, t.string, v)
        if v is None and t.null and not self.keyval:
            return None
        raise _fail(f"Invalid parameter type for '{name or 'null'}', expected: {t.name}")

    def object(self, path: str, t: Struct | Union, obj: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        visited: list[str] = []
        prefix = f"{path}." if path else ""
        self.enter(path)
        if isinstance(t, Struct):
            self.members(prefix, t.members, obj, out, visited)
        else:
            self.members(prefix, t.base, obj, out, visited)
            variant = t.variants.get(out.get(t.discriminator, ""))
            if variant is not None:
                self.members(prefix, variant.members, obj, out, visited)
        if len(visited) < len(obj):
            extra = first_unvisited(list(obj), visited)
            raise _fail(f"Parameter '{prefix}{extra}' is unexpected")
        self.depth -= 1
        return out

    def members(self, prefix: str, members: Iterable[Member], obj: Mapping[str, Any],
                out: dict[str, Any], visited: list[str]) -> None:
        for m in members:
            if m.name not in obj:
                if not m.optional:
                    raise _fail(f"Parameter '{prefix}{m.name}' is missing")
                continue
            visited.append(m.name)
            out[m.name] = self.value(f"{prefix}{m.name}", m.name, m.type, obj[m.name])

    def string(self, path: str, v: Any) -> str:
        """``visit_type_str``."""
        if self.keyval:
            return self.keyval_string(path, v)
        if not isinstance(v, str):
            raise _fail(f"Invalid parameter type for '{path}', expected: string")
        return v

    @staticmethod
    def keyval_string(path: str, v: Any) -> str:
        """``qobject_input_get_keyval``."""
        if isinstance(v, str):
            return v
        if isinstance(v, dict | list):
            raise _fail(f"Parameters '{path}.*' are unexpected")
        raise _fail(f"Internal error: parameter {path} invalid")

    def enum(self, path: str, name: str | None, t: Enum, v: Any) -> str:
        s = self.string(path, v)
        if s not in t.values:
            raise _fail(f"Parameter '{name or 'null'}' does not accept value '{s}'")
        return s

    def scalar(self, path: str, name: str | None, t: Scalar, v: Any) -> Any:
        if t is Scalar.ANY:
            return v
        if t is Scalar.STR:
            return self.string(path, v)
        if self.keyval:
            return self.keyval_scalar(path, name, t, self.keyval_string(path, v))
        if t is Scalar.BOOL:
            if not isinstance(v, bool):
                raise _fail(f"Invalid parameter type for '{path}', expected: boolean")
            return v
        if t is Scalar.NUMBER:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _fail(f"Invalid parameter type for '{path}', expected: number")
            try:
                return float(v)
            except OverflowError:  # a huge JSON integer: QEMU's strtod makes it infinite
                return math.inf if v > 0 else -math.inf
        integer = isinstance(v, int) and not isinstance(v, bool)
        if t is Scalar.INT:
            if not integer or not INT64_MIN <= v <= INT64_MAX:
                raise _fail(f"Invalid parameter type for '{path}', expected: integer")
            return v
        # UINT64, SIZE (a size is a uint64 to the JSON visitor), UINT32 (read as a uint64);
        # a negative int64 is taken modulo 2^64, as QEMU does for compatibility
        if not integer or not INT64_MIN <= v < UINT64_LIMIT:
            raise _fail(f"Parameter '{path}' expects uint64")
        value = v % UINT64_LIMIT
        return self.uint_range(name, t, value)

    def keyval_scalar(self, path: str, name: str | None, t: Scalar, s: str) -> Any:
        if t is Scalar.BOOL:
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise _fail(f"Parameter '{path}' expects 'on' or 'off'")
        if t is Scalar.INT:
            value = _strtoi64(s)
            if value is None:
                raise _fail(f"Parameter '{path}' expects integer")
            return value
        if t is Scalar.NUMBER:
            number = _strtod_finite(s)
            if number is None:
                raise _fail(f"Invalid parameter type for '{path}', expected: number")
            return number
        if t is Scalar.SIZE:
            try:
                return _strtosz(s, None)
            except SizeError:
                raise _fail(f"Parameter '{path}' expects size") from None
        value = _strtou64(s)
        if value is None:
            raise _fail(f"Parameter '{path}' expects integer")
        return self.uint_range(name, t, value)

    @staticmethod
    def uint_range(name: str | None, t: Scalar, value: int) -> int:
        if t is Scalar.UINT32 and value > UINT32_MAX:  # visit_type_uintN names the member
            raise _fail(f"Parameter '{name or 'null'}' expects uint32_t")
        return value


def check(arguments: Mapping[str, Any], spec: Struct | Union, *,
          keyval: bool = False) -> dict[str, Any]:
    """The arguments, checked against ``spec`` (only the members given come back), typed.

    ``keyval``: the scalars are strings from ``dirtybits.proto.keyval.parse``, converted as
    QEMU's keyval visitor converts them. Raises ``QmpError`` (GenericError) with QEMU's text
    for the first problem."""
    return _Visitor(keyval).object("", spec, arguments)


def command(name: str, *members: Member) -> Struct:
    """A command's argument struct (``q_obj_NAME_arg`` in QEMU)."""
    return Struct(name, members)


__all__ = ["ANY", "BOOL", "INT", "NUMBER", "SIZE", "STR", "UINT32", "UINT64", "Alternate",
           "Enum", "List", "Member", "Scalar", "Struct", "Type", "Union", "check", "command",
           "first_unvisited", "qdict_order"]
