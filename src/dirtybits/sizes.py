"""QEMU's size syntax (``qemu_strtosz``), shared by every language that takes a byte count.

``4k``, ``1.5M``, ``0x1000``, ``64``: what qemu-io's and qemu-img's ``cvtnum`` and the ``size``
options of QemuOpts accept, with glibc's ``strtoull``/``strtod`` corner cases (a hex number with
a suffix is accepted with a deprecation warning; a fraction needs a suffix above bytes). The
qemu-io command language (``dirtybits.proto.qemu_io``) and the block layer's option lists
(``dirtybits.block.options``) both read sizes here. Pure: text in, a number or ``SizeError``
out.
"""

from __future__ import annotations

from collections.abc import Callable

from dirtybits.errors import UsageError

INT64_MAX = (1 << 63) - 1
_UINT64_LIMIT = 1 << 64

Warn = Callable[[str], None]


class SizeError(UsageError):
    """Text that is not a size: ``message`` is qemu's ``Parsing error: ...`` text;
    ``too_large`` tells a number out of range (ERANGE) from one that does not parse."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.too_large = message.startswith("Parsing error: argument too large")


_WHITESPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale
_SUFFIX_SHIFT = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SUFFIX_MUL = {
    c: 1 << shift for s, shift in _SUFFIX_SHIFT.items() for c in (s, s.lower())
}
_EINVAL = "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {}"
_ERANGE = "Parsing error: argument too large -- {}"


def _strtoull(s: str, pos: int, base: int) -> tuple[int | None, int, bool]:
    """glibc ``strtoull`` from ``pos``: (value or None if nothing converted, end, overflowed)."""
    n = len(s)
    i = pos
    while i < n and s[i] in _WHITESPACE:
        i += 1
    if i < n and s[i] in "+-":
        i += 1
    if base == 16 and i + 1 < n and s[i] == "0" and s[i + 1] in "xX":
        j = i + 2
        digits_start = j
        while j < n and s[j] in "0123456789abcdefABCDEF":
            j += 1
        if j == digits_start:  # "0x" with no hex digit: only the "0" converts
            return 0, i + 1, False
        value = int(s[digits_start:j], 16)
    else:
        j = i
        valid = "0123456789" if base == 10 else "0123456789abcdefABCDEF"
        while j < n and s[j] in valid:
            j += 1
        if j == i:
            return None, pos, False
        value = int(s[i:j], base)
    if value >= _UINT64_LIMIT:
        return _UINT64_LIMIT - 1, j, True
    return value, j, False


def _strtod_fraction(s: str, pos: int) -> tuple[float | None, int]:
    """C ``strtod`` on text starting with ``.``: (value or None if nothing converted, end)."""
    n = len(s)
    j = pos + 1
    while j < n and s[j].isascii() and s[j].isdigit():
        j += 1
    if j == pos + 1:
        return None, pos
    if j < n and s[j] in "eE":
        k = j + 1
        if k < n and s[k] in "+-":
            k += 1
        exp_start = k
        while k < n and s[k].isascii() and s[k].isdigit():
            k += 1
        if k > exp_start:
            j = k
    return float(s[pos:j]), j


def parse_size(text: str, warn: Warn | None = None) -> int:
    """qemu-io's ``cvtnum``: a byte count with an optional binary suffix (b k m g t p e).

    Raises SizeError with qemu-io's ``Parsing error: ...`` text. ``warn`` receives the
    deprecation warning qemu prints for a hex number with a suffix (``0x10k``).
    """
    if text.isdigit() and text.isascii():  # the common cases, kept cheap for long scripts
        value = int(text)
    elif text[:-1].isdigit() and text.isascii() and text[-1] in _SUFFIX_MUL:  # "64k"
        value = int(text[:-1])
        if value >= _UINT64_LIMIT:  # qemu stops at the overflowing digits: the suffix is junk
            raise SizeError(_EINVAL.format(text))
        value *= _SUFFIX_MUL[text[-1]]
        if value >= _UINT64_LIMIT:
            raise SizeError(_ERANGE.format(text))
    else:
        value = _strtosz(text, warn)
    if value > INT64_MAX:
        raise SizeError(_ERANGE.format(text))
    return value


def _strtosz(s: str, warn: Warn | None) -> int:
    """``qemu_strtosz`` with no end pointer (the whole string must be consumed)."""
    val, end, overflow = _strtoull(s, 0, 10)
    if val is None or "-" in s[:end]:
        raise SizeError(_EINVAL.format(s))
    _check_overflow(s, end, overflow)
    hexadecimal = False
    frac = 0  # 0.64 fixed point, like qemu's valf
    if val == 0 and end < len(s) and s[end] in "xX":
        val, end, overflow = _strtoull(s, 0, 16)
        assert val is not None
        _check_overflow(s, end, overflow)
        if end < len(s) and s[end] == ".":
            raise SizeError(_EINVAL.format(s))
        hexadecimal = True
    elif end < len(s) and s[end] == ".":
        fraction, fend = _strtod_fraction(s, end)
        if fraction is None:
            end += 1  # "1." and "1.k" are fine: no fractional digits
        elif "e" in s[end:fend] or "E" in s[end:fend]:
            raise SizeError(_EINVAL.format(s))
        else:
            frac = int(fraction * 2.0**64)
            if frac >= _UINT64_LIMIT:  # a fraction that rounds to 1.0: x86 converts it to 0
                frac = 0
            end = fend
    mul = _SUFFIX_MUL.get(s[end]) if end < len(s) else None
    if mul is not None:
        if hexadecimal and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {s}")
        end += 1
    else:
        mul = 1
    if end != len(s):
        raise SizeError(_EINVAL.format(s))
    if mul == 1:
        if frac:
            raise SizeError(_EINVAL.format(s))  # a fraction needs a suffix above bytes
        return val
    fixed = ((val << 64) | frac) * mul
    result = (fixed >> 64) + ((fixed >> 63) & 1)  # round half up, as qemu does
    if result >= _UINT64_LIMIT:
        raise SizeError(_ERANGE.format(s))
    return result


def _check_overflow(s: str, end: int, overflow: bool) -> None:
    """qemu gives up at an overflowing integer part: too large, or invalid if text follows."""
    if overflow:
        raise SizeError((_EINVAL if end != len(s) else _ERANGE).format(s))
