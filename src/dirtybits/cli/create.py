"""``dirtybits create``: qemu-img create's options, ``Formatting ...`` line, errors and exit codes.

The steps run in ``bdrv_img_create``'s order, so the first complaint about a bad command line
is the one qemu-img would print, and it comes before or after the ``Formatting`` line as in
qemu-img: option syntax, size and backing-file problems before; the format driver's checks
after. Every failure exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from dirtybits.block.options import (
    FORMATS,
    SECTOR,
    QemuError,
    QemuOpts,
    check_option_list,
    create_opts,
    has_help_option,
    option_help,
    qcow2_create_args,
    raw_preallocation,
)
from dirtybits.cli.options import ArgParser, add_command, cvtnum, report
from dirtybits.errors import DirtybitsError

USAGE = "dirtybits create [-q] [-f FMT] [-b BACKING] [-F BACKING_FMT] [-u] [-o OPTIONS] FILE [SIZE]"


def add_parser(subparsers: Any) -> None:
    add_command(subparsers, "create", "create a new disk image")


def _parser() -> ArgParser:
    p = ArgParser(prog="dirtybits create", usage=USAGE,
                  description="Create a new disk image (qemu-img create's options).")
    p.add_argument("-f", dest="fmt", default="raw", help="image format: qcow2 or raw (default)")
    p.add_argument("-b", dest="backing", help="backing file (SIZE defaults to its size)")
    p.add_argument("-F", dest="backing_fmt", help="backing file format")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="format options key=value,...; '-o help' lists them")
    p.add_argument("-q", dest="quiet", action="store_true", help="do not print 'Formatting'")
    p.add_argument("words", nargs="*", metavar="FILE [SIZE]")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return _run(_parser().parse_intermixed_args(args.argv))
    except QemuError as exc:
        return report("create", exc)


def _run(a: argparse.Namespace) -> int:
    for text in a.options:
        check_option_list(text)
    options = ",".join(a.options)
    filename: str | None = a.words[0] if a.words else None
    if options and has_help_option(options):
        if a.fmt not in FORMATS:
            raise QemuError(f"Unknown file format '{a.fmt}'")
        sys.stdout.write(option_help(a.fmt, filename))
        return 0
    if filename is None:
        raise QemuError("Expecting image file name",
                        hint="Try 'dirtybits create --help' for more information\n")
    size = cvtnum("image size", a.words[1]) if len(a.words) > 1 else None
    if len(a.words) > 2:
        raise QemuError(f"Unexpected argument: {a.words[2]}",
                        hint="Try 'dirtybits create --help' for more information\n")
    try:
        opts = prepare(filename, a.fmt, options, size, a.backing, a.backing_fmt, a.unsafe)
    except QemuError as exc:
        raise exc.prefixed(f"{filename}: ") from None
    if not a.quiet:
        print(f"Formatting '{filename}', fmt={a.fmt} {opts.format()}", flush=True)
    try:
        create(filename, a.fmt, opts)
    except QemuError as exc:
        raise exc.prefixed(f"{filename}: ") from None
    except DirtybitsError as exc:
        raise QemuError(f"{filename}: {exc}") from None
    return 0


def prepare(filename: str, fmt: str, options: str, size: int | None, backing: str | None,
            backing_fmt: str | None, unsafe: bool) -> QemuOpts:
    """``bdrv_img_create`` up to the ``Formatting`` line: parse, resolve backing and size."""
    if fmt not in FORMATS:
        raise QemuError(f"Unknown file format '{fmt}'")
    opts = QemuOpts(create_opts(fmt))
    if options:
        opts.parse(options)
    if opts.is_set("size"):
        if size is not None:
            raise QemuError("The image size must be specified only once")
        size = int(opts.get("size"))
    if backing is not None:
        if fmt != "qcow2":
            raise QemuError(f"Backing file not supported for file format '{fmt}'")
        opts.set("backing_file", backing)
    if backing_fmt is not None:
        if fmt != "qcow2":
            raise QemuError(f"Backing file format not supported for file format '{fmt}'")
        opts.set("backing_fmt", backing_fmt)
    backing_file = opts.get("backing_file") if fmt == "qcow2" else None
    backing_fmt = opts.get("backing_fmt") if fmt == "qcow2" else None
    if backing_file is not None:
        if backing_file == filename:
            raise QemuError("Error: Trying to create an image with the same filename as the "
                            "backing file")
        if not backing_file:
            raise QemuError("Expected backing file name, got empty string")
    if backing_file is not None and not unsafe:
        backing_size = _backing_size(filename, backing_file, backing_fmt)
        if size is None:
            size = backing_size
    elif backing_file is not None and backing_fmt is None:
        raise QemuError("Backing file specified without backing format")
    data_file = opts.get("data_file") if fmt == "qcow2" else None
    if size is None and data_file and opts.get("data_file_raw"):
        # a raw drive getting a metadata image: its size is the drive's (resolved as
        # Qcow2Image.create resolves the name)
        dpath = data_file if os.path.isabs(data_file) else os.path.join(
            os.path.dirname(filename), data_file)
        with contextlib.suppress(OSError):
            size = -(-os.stat(dpath).st_size // SECTOR) * SECTOR
    if size is None:
        raise QemuError("Image creation needs a size parameter")
    opts.set_number("size", size)
    return opts


def _backing_size(filename: str, backing_file: str, backing_fmt: str | None) -> int:
    """Open the backing file the way qemu-img does (relative to the new image) for its size."""
    from dirtybits.block.open import open_image, probe_format

    path = backing_file if os.path.isabs(backing_file) else os.path.join(
        os.path.dirname(filename), backing_file)
    hint = "Could not open backing image.\n"
    if backing_fmt is not None and backing_fmt not in FORMATS:
        raise QemuError(f"Unknown driver '{backing_fmt}'", hint=hint)
    try:
        detected = backing_fmt or probe_format(path)
        with open_image(path, detected, readonly=True) as img:
            size = img.size
    except DirtybitsError as exc:
        raise QemuError(str(exc), hint=hint) from None
    if backing_fmt is None:
        raise QemuError("Backing file specified without backing format",
                        hint=f"Detected format of {detected}.\n")
    return -(-size // SECTOR) * SECTOR


def create(filename: str, fmt: str, opts: QemuOpts) -> None:
    """Create the image the options describe (the format driver's part, after Formatting)."""
    if fmt == "raw":
        from dirtybits.block.raw import RawImage

        RawImage.create(filename, int(opts.get("size")), raw_preallocation(opts))
        return
    from dirtybits.qcow2.image import Qcow2Image

    c = qcow2_create_args(opts)
    Qcow2Image.create(filename, c.size, cluster_size=c.cluster_size,
                      refcount_bits=c.refcount_bits, compat=c.compat,
                      backing_file=c.backing_file, backing_format=c.backing_format,
                      data_file=c.data_file, data_file_raw=c.data_file_raw,
                      lazy_refcounts=c.lazy_refcounts, extended_l2=c.extended_l2,
                      compression_type=c.compression_type)
