"""``dirtybits amend -o resilient=on|off[,resilient-region=SIZE] IMAGE``: resilient mode.

qemu-img's ``amend`` changes format options of an existing image; here it takes dirtybits'
own qcow2 options. Resilient mode keeps a write-intent map in the image's header cluster so that
bitmaps left in use by a crash are recovered (a superset of the changed granules) at the next
tracked open instead of forcing a full backup. See README, "Resilient mode".
"""

from __future__ import annotations

import argparse
from typing import Any

from dirtybits.errors import UsageError

OPTIONS = ("resilient", "resilient-region")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("amend", help="change dirtybits options of a qcow2 image",
                       description=__doc__)
    p.add_argument("-o", dest="options", action="append", required=True,
                   help="resilient=on|off, resilient-region=SIZE (a power of two, 64K..1T)")
    p.add_argument("-f", dest="fmt")
    p.add_argument("filename")


def run(args: argparse.Namespace) -> int:
    from dirtybits.block.options import QemuError, check_option_list, split_option_list
    from dirtybits.sizes import parse_size

    if args.fmt not in (None, "qcow2"):
        raise UsageError(f"Format driver '{args.fmt}' does not support these options")
    wanted: dict[str, str] = {}
    for text in args.options:
        try:
            check_option_list(text)
        except QemuError as exc:
            raise UsageError(str(exc)) from None
        for name, value in split_option_list(text):
            if name not in OPTIONS:
                raise UsageError(f"Invalid parameter '{name}' (amend takes: "
                                 f"{', '.join(OPTIONS)})")
            wanted[name] = value
    mode = wanted.get("resilient")
    if mode not in (None, "on", "off"):
        raise UsageError(f"resilient must be 'on' or 'off', not '{mode}'")
    region = None
    if "resilient-region" in wanted:
        if mode == "off":
            raise UsageError("resilient-region needs resilient=on")
        region = int(parse_size(wanted["resilient-region"]))
    from dirtybits.block import write_intent
    from dirtybits.block.children import open_qcow2

    with open_qcow2(args.filename, keep_bitmaps=True) as img:
        if mode == "off":
            write_intent.disable(img)
        elif mode == "on" or region is not None:
            write_intent.enable(img, region)
    return 0
