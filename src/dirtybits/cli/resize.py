"""``dirtybits resize [-f FMT] [-q] [--shrink] FILENAME [+|-]SIZE``: qemu-img resize.

Persistent bitmaps follow the new size, as with QEMU 7.2 (the grown area starts clean); an
inconsistent or damaged bitmap makes the resize fail, as in QEMU. Growing only: a smaller
size needs ``--shrink`` (qemu-img's rule) and is then refused for qcow2 and raw alike.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dirtybits.block.options import QemuError
from dirtybits.cli.options import ArgParser, add_command, cvtnum, report

SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken "
                  "image's end. Before performing such an operation, make sure there is no "
                  "important data there.")


def add_parser(sub: Any) -> None:
    add_command(sub, "resize", "change the virtual size of a disk image")


def _parser() -> ArgParser:
    p = ArgParser(prog="dirtybits resize", description=__doc__)
    p.add_argument("-f", dest="fmt", help="image format (qcow2, raw); probed when omitted")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet mode")
    p.add_argument("--shrink", action="store_true",
                   help="allow a smaller size (refused by this version: it would drop data)")
    p.add_argument("filename")
    p.add_argument("size", help="new size, or +SIZE / -SIZE relative to the current one")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return _run(_parser().parse_args(_split_negative(args.argv)))
    except QemuError as exc:
        return report("resize", exc)


def _split_negative(argv: list[str]) -> list[str]:
    """``-1G`` as the size operand, as qemu-img takes the last word before getopt sees it."""
    argv = [a for a in argv if a != "--"]
    operands = [a for a in argv if not a.startswith("-") or a[1:2].isdigit()]
    if len(operands) >= 2 and operands[-1].startswith("-"):
        rest = [a for a in argv if a is not operands[-1]]
        return [*rest, "--", operands[-1]]
    return argv


def _run(opts: argparse.Namespace) -> int:
    from dirtybits.block.checkpoint import CheckpointPolicy
    from dirtybits.block.open import open_image
    from dirtybits.errors import DirtybitsError

    text = opts.size
    sign = text[0] if text[:1] in ("+", "-") else ""
    amount = cvtnum("image size", text[1:] if sign else text)
    try:
        node = open_image(opts.filename, opts.fmt, always_node=True,
                          checkpoint=CheckpointPolicy(interval=None, idle=None,
                                                      threshold_bits=None))
    except DirtybitsError as exc:
        raise QemuError(f"Could not open '{opts.filename}': {exc}") from None
    try:
        current = node.size
        new = current + amount if sign == "+" else current - amount if sign == "-" else amount
        if new < 0:
            raise QemuError("New image size must be positive")
        if new < current and not opts.shrink:
            raise QemuError("Use the --shrink option to perform a shrink operation.",
                            SHRINK_WARNING)
        try:
            node.resize(new)
        except DirtybitsError as exc:
            raise QemuError(f"Error resizing image: {exc}") from None
    finally:
        node.close()
    if not opts.quiet:
        sys.stdout.write("Image resized.\n")
    return 0
