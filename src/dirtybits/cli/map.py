"""``dirtybits map``: qemu-img map's JSON and table, byte for byte.

The entries (with QEMU's block-layer corrections, allocation depth and JSON form) come from
``dirtybits.block.status``; this module reads the arguments and prints them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dirtybits.block.options import INT64_MAX, QemuError
from dirtybits.block.status import Entry, map_entries, map_json
from dirtybits.cli.options import (
    ArgParser,
    add_command,
    cvtnum,
    open_qemu,
    parse_output,
    report,
)


def human_line(e: Entry) -> str:
    def x(v: int) -> str:
        return f"{v:#x}" if v else "0"

    return f"{x(e.start):<16}{x(e.length):<16}{x(e.offset or 0):<16}{e.filename or ''}\n"


# ---------------------------------------------------------------------------- command

USAGE = ("dirtybits map [-f FMT] [--output=human|json] [--start-offset=OFFSET] "
         "[--max-length=LEN] [-U] FILE")


def add_parser(subparsers: Any) -> None:
    add_command(subparsers, "map", "show the allocation map of a disk image")


def _parser() -> ArgParser:
    p = ArgParser(prog="dirtybits map", usage=USAGE,
                  description="Print where the guest data of an image lives (qemu-img map).")
    p.add_argument("-f", "--format", dest="fmt", help="image format (default: probed)")
    p.add_argument("--output", default="human", help="human (default) or json")
    p.add_argument("-s", "--start-offset", dest="start", default="0",
                   help="first guest byte to map")
    p.add_argument("-l", "--max-length", dest="max_length", help="map at most this many bytes")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image shared, even while a writer holds it (qemu-img -U)")
    p.add_argument("files", nargs="*", metavar="FILE")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return _run(_parser().parse_intermixed_args(args.argv))
    except QemuError as exc:
        return report("map", exc)


def _run(a: argparse.Namespace) -> int:
    if len(a.files) != 1:
        raise QemuError("Expecting one image file name",
                        hint="Try 'dirtybits map --help' for more information\n")
    output = parse_output(a.output)
    start = cvtnum("start offset", a.start)
    max_length = INT64_MAX if a.max_length is None else cvtnum("max length", a.max_length)
    img = open_qemu(a.files[0], a.fmt, force_share=a.force_share)
    out = sys.stdout
    with img:
        entries = map_entries(img, start, max_length)
        if output == "json":
            out.write(map_json(entries))
            return 0
        out.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")
        for e in entries:
            if e.data and e.offset is None:
                raise QemuError("File contains external, encrypted or compressed clusters.")
            if e.data and not e.zero:
                out.write(human_line(e))
    return 0
