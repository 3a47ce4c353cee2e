"""What the qemu-img-style commands share: qemu-img's way of parsing its arguments and of
failing, its number syntax (``cvtnum``), opening an image for a command, a progress bar.

Usage errors exit 1, as qemu-img's ``error_exit`` does, rather than argparse's 2. The ``-o``
option lists and creation options themselves are the block layer's
(``dirtybits.block.options``).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from dirtybits.block.options import FORMATS, INT64_MAX, QemuError
from dirtybits.errors import DirtybitsError
from dirtybits.sizes import SizeError, parse_size

if TYPE_CHECKING:
    from dirtybits.block.driver import ImageDriver

_SUFFIX_HINT = ("You may use k, M, G, T, P or E suffixes for",
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")


def report(command: str, exc: QemuError) -> int:
    """Print ``exc`` as qemu-img would (``dirtybits CMD:`` for ``qemu-img:``); its status."""
    sys.stdout.flush()
    for line in exc.lines:
        sys.stderr.write(f"dirtybits {command}: {line}\n")
    sys.stderr.write(exc.hint)
    sys.stderr.flush()
    return exc.status


class ArgParser(argparse.ArgumentParser):
    """argparse that fails with ``QemuError`` (exit 1 and qemu-img's hint) instead of exit 2."""

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):  # getopt's wording, for the first offender
            message = f"unrecognized option '{message[len(prefix):].split()[0]}'"
        raise QemuError(message, hint=f"Try '{self.prog} --help' for more information\n")


def add_command(subparsers: Any, name: str, help: str) -> None:
    """Register ``name`` so that its words reach ``run`` unparsed (``args.argv``): the command
    parses them with its own ``ArgParser`` and so controls its usage errors and exit codes."""
    p = subparsers.add_parser(name, help=help, add_help=False, prefix_chars="\x00")
    p.add_argument("argv", nargs=argparse.REMAINDER)


def cvtnum(name: str, text: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """qemu-img's ``cvtnum_full``: a size with qemu's suffixes, or its two-line complaint."""
    try:
        value = parse_size(text)
    except SizeError as exc:
        if not exc.too_large:
            raise QemuError(f"Invalid {name} specified. {_SUFFIX_HINT[0]}",
                            _SUFFIX_HINT[1]) from None
        value = maximum + 1
    if not minimum <= value <= maximum:
        raise QemuError(f"Invalid {name} specified. Must be between {minimum} and {maximum}.")
    return value


def open_qemu(filename: str, fmt: str | None, *, readonly: bool = True,
              force_share: bool = False) -> ImageDriver:
    """Open an image for a command; failures read as qemu-img's ``Could not open 'F': ...``.

    Locked as qemu-img locks it; ``force_share`` is its -U (read-only opens).
    """
    from dirtybits.block.open import open_image

    if fmt is not None and fmt not in FORMATS:
        raise QemuError(f"Could not open '{filename}': Unknown driver '{fmt}'")
    try:
        return open_image(filename, fmt, readonly=readonly, force_share=force_share)
    except DirtybitsError as exc:
        raise QemuError(f"Could not open '{filename}': {exc}") from None


class Progress:
    """A tqdm byte counter on stderr when asked for (tqdm is imported only then)."""

    def __init__(self, total: int, enabled: bool, desc: str = ""):
        self._bar: Any = None
        if enabled:
            import importlib

            tqdm = importlib.import_module("tqdm").tqdm  # untyped package: keep it Any
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=desc or None, file=sys.stderr, leave=True)

    def update(self, n: int) -> None:
        if self._bar is not None and n > 0:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def parse_output(text: str) -> str:
    if text not in ("human", "json"):
        raise QemuError("--output must be used with human or json as argument.")
    return text
