"""The human monitor's argument syntax, for the one HMP command the daemon has: ``qemu-io``.

QEMU's monitor reads ``qemu-io [-d] DEVICE COMMAND``: ``-d`` says DEVICE is a guest device
(qdev) rather than a block node, and DEVICE and COMMAND are monitor strings: a word, or a
double-quoted string with the escapes ``\\n``, ``\\r``, ``\\\\``, ``\\'`` and ``\\"``
(QEMU's ``get_str``). Anything left on the line is an error. The texts are the monitor's.
"""

from __future__ import annotations

from dirtybits.errors import DirtybitsError

_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


class HmpError(DirtybitsError):
    """The command line does not parse; ``printed`` is what QEMU prints on stdout first."""

    def __init__(self, message: str, printed: str = "") -> None:
        super().__init__(message)
        self.printed = printed


def _get_str(text: str, pos: int) -> tuple[str | None, int, str]:
    """One monitor string from ``pos``: (value or None when there is none or it is bad,
    the position after it, what QEMU prints about a bad one)."""
    n = len(text)
    while pos < n and text[pos].isspace():
        pos += 1
    if pos >= n:
        return None, pos, ""
    if text[pos] != '"':
        end = pos
        while end < n and not text[end].isspace():
            end += 1
        return text[pos:end], end, ""
    out: list[str] = []
    pos += 1
    while pos < n and text[pos] != '"':
        c = text[pos]
        if c == "\\":
            pos += 1
            esc = text[pos] if pos < n else ""
            if esc not in _ESCAPES:
                return None, pos, f"unsupported escape code: '\\{esc}'"
            out.append(_ESCAPES[esc])
        else:
            out.append(c)
        pos += 1
    if pos >= n:
        return None, pos, "unterminated string"
    return "".join(out), pos + 1, ""


def parse_qemu_io(args: str) -> tuple[bool, str, str]:
    """``(qdev, device, command)`` from what follows ``qemu-io``. Raises ``HmpError``."""
    pos, qdev = 0, False
    stripped = args.lstrip()
    if stripped.startswith("-d") and (len(stripped) == 2 or stripped[2].isspace()):
        qdev = True
        pos = len(args) - len(stripped) + 2
    device, pos, printed = _get_str(args, pos)
    if device is None:
        raise HmpError("qemu-io: block device name expected", printed)
    command, pos, printed = _get_str(args, pos)
    if command is None:
        raise HmpError("qemu-io: string expected", printed)
    if args[pos:].strip():
        raise HmpError("qemu-io: extraneous characters at the end of line")
    return qdev, device, command


__all__ = ["HmpError", "parse_qemu_io"]
