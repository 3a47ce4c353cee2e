"""``dirtybits convert``: copy an image's guest contents into a new qcow2 or raw image.

The copy is sparse the way qemu-img's is: ranges the source (with its whole backing chain)
reports as zero are not written, and inside data ranges every block that reads as zeros is
skipped too (``-S``, 4 KiB by default; ``-S 0`` writes everything). A qcow2 target is checked a
cluster at a time, so a cluster is allocated exactly when some of its bytes are non-zero, and
is written whole, leaving no holes inside it. Backing chains are flattened: the target has no
backing file. The result reads the same as the source (``qemu-img compare``) and is clean under
``qemu-img check``.

Options and messages are qemu-img's. ``-c`` compresses every non-zero cluster of a qcow2
target (``-o compression_type=zlib|zstd`` picks the method), as qemu-img convert -c: clusters
are checked for zeros whole and written whole. Only one source image is taken (qemu-img
concatenates several). The copy itself is ``dirtybits.block.copy``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from dirtybits.block.copy import copy
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
    split_option_list,
)
from dirtybits.block.status import qemu_size
from dirtybits.cli.options import (
    ArgParser,
    Progress,
    add_command,
    cvtnum,
    open_qemu,
    report,
)
from dirtybits.errors import DirtybitsError

if TYPE_CHECKING:
    from dirtybits.block.driver import ImageDriver

DEFAULT_SPARSE = 4096
MAX_SPARSE = 16 << 20

USAGE = ("dirtybits convert [-c] [-p] [-q] [-n] [-f FMT] [-O OUTPUT_FMT] [-o OPTIONS] [-S SIZE] "
         "[-U] [-l SNAPSHOT_PARAM] SRC DST")


def add_parser(subparsers: Any) -> None:
    add_command(subparsers, "convert", "copy an image to a new image of a given format")


def _parser() -> ArgParser:
    p = ArgParser(prog="dirtybits convert", usage=USAGE,
                  description="Copy the guest contents of SRC into a new image DST "
                              "(qemu-img convert).")
    p.add_argument("-f", dest="fmt", help="source format (default: probed)")
    p.add_argument("-O", dest="out_fmt", default="raw", help="target format: raw (default), qcow2")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="target creation options key=value,... ('-o help' lists them)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the target's clusters (qcow2)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT_PARAM",
                   help="copy an internal snapshot: NAME (an ID, else a name) or "
                        "snapshot.id=ID,snapshot.name=NAME")
    p.add_argument("-n", dest="skip_create", action="store_true",
                   help="write into an existing DST instead of creating it")
    p.add_argument("-S", dest="sparse", default=str(DEFAULT_SPARSE),
                   help="skip zero blocks of this size (default 4k, 0 = write everything)")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet (no progress bar)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the source shared, even while a writer holds it (qemu-img -U)")
    p.add_argument("files", nargs="*", metavar="SRC DST")
    return p


def _load_snapshot(src: ImageDriver, param: str) -> None:
    """``-l``: qemu-img's snapshot parameter, loaded into the (read-only) source."""
    from dirtybits.block.snapshot import load_snapshot
    from dirtybits.qcow2.snapshots import SnapshotError

    keys = ("snapshot.id=", "snapshot.name=")
    try:
        if param.startswith(keys):
            fields = dict(split_option_list(param))
            unknown = set(fields) - {"snapshot.id", "snapshot.name"}
            if unknown:
                raise QemuError(f"Invalid parameter '{sorted(unknown)[0]}'")
            load_snapshot(src, snapshot_id=fields.get("snapshot.id"),
                          name=fields.get("snapshot.name"))
        else:
            load_snapshot(src, id_or_name=param)
    except SnapshotError as exc:
        raise QemuError(f"Failed to load snapshot: {exc}") from None


def run(args: argparse.Namespace) -> int:
    try:
        return _run(_parser().parse_intermixed_args(args.argv))
    except QemuError as exc:
        return report("convert", exc)


def _run(a: argparse.Namespace) -> int:
    for text in a.options:
        check_option_list(text)
    options = ",".join(a.options)
    if options and has_help_option(options):
        if a.out_fmt not in FORMATS:
            raise QemuError(f"Unknown file format '{a.out_fmt}'")
        sys.stdout.write(option_help(a.out_fmt, a.files[-1] if a.files else None))
        return 0
    sparse = cvtnum("buffer size for sparse output", a.sparse)
    if sparse % SECTOR or sparse > MAX_SPARSE:
        raise QemuError("Invalid buffer size for sparse output specified. Valid sizes are "
                        f"multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse "
                        "detection (fully allocates output).")
    if len(a.files) < 2:
        raise QemuError("Must specify image file name")
    if len(a.files) > 2:
        raise QemuError("only one source image is supported (qemu-img would concatenate them)")
    src_name, dst_name = a.files
    if a.skip_create and options:
        raise QemuError("-o has no effect when skipping image creation")
    if a.out_fmt not in FORMATS:
        raise QemuError(f"Unknown file format '{a.out_fmt}'")
    if a.compress and a.out_fmt == "raw":
        raise QemuError("Compression not supported for this file format")
    with open_qemu(src_name, a.fmt, force_share=a.force_share) as src:
        if a.snapshot is not None:
            _load_snapshot(src, a.snapshot)
        size = qemu_size(src)
        zero_init = True
        if a.skip_create:
            dst = open_qemu(dst_name, a.out_fmt, readonly=False)
            zero_init = False
            if qemu_size(dst) < size:
                dst.close()
                raise QemuError("output file is smaller than input file")
        else:
            zero_init = _create_target(dst_name, a.out_fmt, options, size)
            dst = open_qemu(dst_name, a.out_fmt, readonly=False)
        granularity = sparse
        if sparse and a.out_fmt == "qcow2":
            # the unit a write allocates: a cluster, a subcluster with extended L2 entries;
            # compressed clusters are written whole: only a whole zero cluster is skipped
            cluster = int(getattr(dst, "cluster_size", 0) or 0)
            unit = getattr(dst, "subcluster_size", 0) or cluster
            granularity = cluster if a.compress else max(sparse, int(unit or 0))
        progress = Progress(size, a.progress and not a.quiet)
        try:
            with dst:
                copy(src, dst, granularity, zero_init, progress, compress=a.compress)
        except QemuError:
            raise
        except DirtybitsError as exc:
            raise QemuError(f"error while converting {a.out_fmt}: {exc}") from None
        finally:
            progress.close()
    return 0


def _create_target(name: str, fmt: str, options: str, size: int) -> bool:
    """Create the target as ``qemu-img convert`` does (no ``Formatting`` line); True when it
    reads as zeros afterwards, so zero ranges need not be written."""
    opts = QemuOpts(create_opts(fmt))
    if options:
        opts.parse(options)
    opts.set_number("size", size)
    backing = opts.get("backing_file") if fmt == "qcow2" else None
    if backing is not None:
        if opts.get("backing_fmt") is None:
            raise QemuError("Use of backing file requires explicit backing format")
        raise QemuError("backing_file is not supported: the target is a standalone copy")
    try:
        if fmt == "raw":
            from dirtybits.block.raw import RawImage

            RawImage.create(name, size, raw_preallocation(opts))
            return True
        from dirtybits.qcow2.image import Qcow2Image

        c = qcow2_create_args(opts)
        zero_init = True
        if c.data_file_raw and c.data_file is not None:
            dpath = c.data_file if os.path.isabs(c.data_file) else os.path.join(
                os.path.dirname(name), c.data_file)
            zero_init = not os.path.exists(dpath) or os.path.getsize(dpath) == 0
        Qcow2Image.create(name, c.size, cluster_size=c.cluster_size,
                          refcount_bits=c.refcount_bits, compat=c.compat,
                          data_file=c.data_file, data_file_raw=c.data_file_raw,
                          lazy_refcounts=c.lazy_refcounts, extended_l2=c.extended_l2,
                          compression_type=c.compression_type)
        return zero_init
    except QemuError as exc:
        raise exc.prefixed(f"{name}: error while converting {fmt}: ") from None
    except DirtybitsError as exc:
        raise QemuError(f"{name}: error while converting {fmt}: {exc}") from None
