"""``dirtybits bitmap --recover --reference BACKUP IMAGE NAME``: rebuild a bitmap from the data.

After a crash a bitmap is ``in_use`` (inconsistent); QEMU's only way out is to drop it and
take a full backup. ``--recover`` compares the image with the backup the bitmap started from
(the full backup taken when it was created or last cleared, or what the incremental chain
restores to; a qcow2 chain or a raw image), marks every granule that differs, and stores that
as the bitmap's bits with ``in_use`` cleared, in one crash-safe switch. Nothing is written
before the compare ends: an interrupted run can simply be rerun. On a consistent bitmap it is
a rebuild with the same result. See ``dirtybits.block.recover``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from dirtybits.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--recover`` (an ordered action like the others), ``--reference``,
    ``--reference-format`` and ``-p``."""
    from dirtybits.cli.bitmap import _Ordered

    parser.add_argument("--recover", dest="recover", action=_Ordered, nargs=0,
                        help="rebuild the bitmap as the granules where the image differs from "
                             "--reference, and make it consistent")
    parser.add_argument("--reference", dest="reference", metavar="FILE",
                        help="--recover: the backup the bitmap started from (qcow2 or raw)")
    parser.add_argument("--reference-format", dest="reference_format", metavar="FMT",
                        help="format of --reference (default: probed)")
    parser.add_argument("-p", dest="progress", action="store_true",
                        help="--recover: show a progress bar (shown anyway on a terminal)")


def check_arguments(args: argparse.Namespace, kinds: set[str]) -> None:
    """Usage errors, before the image is opened."""
    if "recover" in kinds and not getattr(args, "reference", None):
        raise UsageError("--recover needs --reference FILE (the backup the bitmap started from)")
    if getattr(args, "reference", None) and "recover" not in kinds:
        raise UsageError("--reference only supported with --recover")
    if getattr(args, "reference_format", None) and not getattr(args, "reference", None):
        raise UsageError("--reference-format only supported with --reference")


def apply_recover(node: Any, name: str, args: argparse.Namespace, out: TextIO) -> None:
    """Rebuild bitmap ``name`` of ``node`` against ``args.reference``; print a summary."""
    check_arguments(args, {"recover"})
    from dirtybits.block.open import open_image
    from dirtybits.block.recover import recover_bitmap
    from dirtybits.cli.options import Progress

    show = bool(getattr(args, "progress", False)) or sys.stderr.isatty()
    bars: list[Progress] = []

    def start(total: int) -> Any:
        bars.append(Progress(total, show, desc="recover"))
        return bars[-1].update

    with open_image(args.reference, args.reference_format, readonly=True) as ref:
        try:
            result = recover_bitmap(node.store, name, ref, progress=start,
                                    registry=node.bitmaps)
        finally:
            for bar in bars:
                bar.close()
    bm = result.bitmap
    out.write(f"Bitmap '{name}' rebuilt: {bm.count_bits()} granules of {bm.granularity} "
              f"bytes differ ({bm.count()} bytes); compared {result.compared} bytes, "
              f"skipped {result.skipped} bytes zero on both sides\n")
