"""``dirtybits compare``: qemu-img compare's verdicts, messages and exit codes.

Exit codes (qemu-img's): 0 identical, 1 different (and usage errors), 2 an image could not be
opened, 3 allocation could not be read, 4 data could not be read.

Like qemu-img, two images of different size compare equal when the larger one's extra area
reads as zeros (``Warning: Image size mismatch!``); ``-s`` makes a size difference, or any
difference in allocation, a mismatch. A mismatch is reported at the first differing 512-byte
sector. Ranges that read as zeros in both images are skipped without reading; the rest is read
in 4 MiB chunks.

Strict mode compares what QEMU's ``bdrv_block_status_above`` answers at each offset where
either image's answer changes: allocated, zero, data, host offset known, and whether the answer
reaches the end of the image. QEMU's answers stop at the end of each qcow2 L2 table and after
every compressed cluster; ``_Side.answer_end`` models that, so the first offset reported is the
one qemu-img reports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from dirtybits.block.options import SECTOR, QemuError
from dirtybits.block.status import ChainStatus, Entry, merged, read_padded
from dirtybits.cli.options import (
    ArgParser,
    Progress,
    add_command,
    open_qemu,
    report,
)
from dirtybits.errors import DirtybitsError

if TYPE_CHECKING:
    from dirtybits.block.driver import ImageDriver

EXIT_IDENTICAL = 0
EXIT_DIFFERENT = 1
EXIT_OPEN_FAILED = 2
EXIT_STATUS_FAILED = 3
EXIT_READ_FAILED = 4
CHUNK = 4 << 20
_ZEROS = bytes(CHUNK)

USAGE = "dirtybits compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILE1 FILE2"


def add_parser(subparsers: Any) -> None:
    add_command(subparsers, "compare", "compare the guest-visible contents of two images")


def _parser() -> ArgParser:
    p = ArgParser(prog="dirtybits compare", usage=USAGE,
                  description="Compare the guest-visible contents of two images "
                              "(qemu-img compare).")
    p.add_argument("-f", dest="fmt1", help="format of FILE1 (default: probed)")
    p.add_argument("-F", dest="fmt2", help="format of FILE2 (default: probed)")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict: different sizes or allocation are a mismatch")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing, only exit")
    p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open both images shared, even while a writer holds them (qemu-img -U)")
    p.add_argument("files", nargs="*", metavar="FILE")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        a = _parser().parse_intermixed_args(args.argv)
        if len(a.files) != 2:
            raise QemuError("Expecting two image file names",
                            hint="Try 'dirtybits compare --help' for more information\n")
        return _run(a)
    except QemuError as exc:
        return report("compare", exc)


def _run(a: argparse.Namespace) -> int:
    name1, name2 = a.files
    try:
        img1 = open_qemu(name1, a.fmt1, force_share=a.force_share)
    except QemuError as exc:
        exc.status = EXIT_OPEN_FAILED
        raise
    try:
        img2 = open_qemu(name2, a.fmt2, force_share=a.force_share)
    except QemuError as exc:
        img1.close()
        exc.status = EXIT_OPEN_FAILED
        raise
    quiet = a.quiet

    def say(text: str) -> None:
        if not quiet:
            sys.stdout.write(text)

    with img1, img2, _Side(name1, img1, a.strict) as s1, _Side(name2, img2, a.strict) as s2:
        progress = Progress(max(s1.size, s2.size), a.progress and not quiet)
        try:
            return compare(s1, s2, a.strict, say, progress)
        finally:
            progress.close()


class _Side:
    """One image being compared: its allocation runs and guarded reads."""

    def __init__(self, name: str, img: ImageDriver, strict: bool):
        self.name = name
        self.img = img
        self.status = ChainStatus(img, recurse=strict)
        self.size = self.status.size
        # (cluster size, L2 table span) of each layer, None for raw layers
        self.geometry: list[tuple[int, int] | None] = []
        for layer in self.status.layers:
            cs = int(getattr(layer, "cluster_size", 0) or 0)
            self.geometry.append((cs, cs * (cs // 8)) if cs else None)

    def __enter__(self) -> _Side:
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.close()

    def entries(self, start: int, end: int) -> Iterator[Entry]:
        try:
            yield from merged(self.status.entries(start, end))
        except QemuError:
            raise
        except DirtybitsError:
            raise QemuError(f"Sector allocation test failed for {self.name}",
                            status=EXIT_STATUS_FAILED) from None

    def read(self, offset: int, length: int) -> bytes:
        try:
            return read_padded(self.img, offset, length)
        except DirtybitsError as exc:
            raise QemuError(f"Error while reading offset {offset} of {self.name}: {exc}",
                            status=EXIT_READ_FAILED) from None

    def answer_end(self, e: Entry, pos: int) -> int:
        """Where QEMU's block-status answer for ``pos`` ends (L2 tables, compressed clusters)."""
        end = e.end
        for geo in self.geometry[:e.depth + 1]:
            if geo is not None:
                end = min(end, (pos // geo[1] + 1) * geo[1])
        geo = self.geometry[e.depth]
        if e.data and e.offset is None and geo is not None:
            end = min(end, (pos // geo[0] + 1) * geo[0])
        return end

    def answer(self, e: Entry, pos: int) -> tuple[bool, bool, bool, bool, bool]:
        return (e.allocated, e.zero, e.data, e.offset is not None,
                self.answer_end(e, pos) == self.size)


class _Walk:
    """Step through merged runs in offset order, keeping the one that covers ``pos``."""

    def __init__(self, entries: Iterable[Entry]):
        self._it = iter(entries)
        self.cur: Entry | None = None

    def at(self, pos: int) -> Entry:
        while self.cur is None or self.cur.end <= pos:
            self.cur = next(self._it)
        return self.cur


def compare(s1: _Side, s2: _Side, strict: bool, say: Any, progress: Progress) -> int:
    """qemu-img compare's walk; returns the exit code after printing the verdict."""
    if strict and s1.size != s2.size:
        say("Strict mode: Image size mismatch!\n")
        return EXIT_DIFFERENT
    common = min(s1.size, s2.size)
    w1, w2 = _Walk(s1.entries(0, common)), _Walk(s2.entries(0, common))
    pos = 0
    while pos < common:
        e1, e2 = w1.at(pos), w2.at(pos)
        if strict:
            if s1.answer(e1, pos) != s2.answer(e2, pos):
                say(f"Strict mode: Offset {pos} block status mismatch!\n")
                return EXIT_DIFFERENT
            end = min(s1.answer_end(e1, pos), s2.answer_end(e2, pos))
        else:
            end = min(e1.end, e2.end)
        if not (e1.zero and e2.zero):
            bad = _first_mismatch(s1, s2, pos, end, e1.zero, e2.zero)
            if bad is not None:
                say(f"Content mismatch at offset {bad}!\n")
                return EXIT_DIFFERENT
        progress.update(end - pos)
        pos = end
    if s1.size != s2.size:
        say("Warning: Image size mismatch!\n")
        over = s1 if s1.size > s2.size else s2
        for e in over.entries(common, over.size):
            if not e.zero:
                for off in range(e.start, e.end, CHUNK):
                    n = min(CHUNK, e.end - off)
                    buf = over.read(off, n)
                    if buf != _ZEROS[:n]:
                        say(f"Content mismatch at offset {off + _sector(buf, _ZEROS[:n])}!\n")
                        return EXIT_DIFFERENT
            progress.update(e.length)
    say("Images are identical.\n")
    return EXIT_IDENTICAL


def _first_mismatch(s1: _Side, s2: _Side, start: int, end: int, zero1: bool,
                    zero2: bool) -> int | None:
    """The first differing sector of ``[start, end)``; a side known to be zero is not read."""
    for off in range(start, end, CHUNK):
        n = min(CHUNK, end - off)
        a = _ZEROS[:n] if zero1 else s1.read(off, n)
        b = _ZEROS[:n] if zero2 else s2.read(off, n)
        if a != b:
            return off + _sector(a, b)
    return None


def _sector(a: bytes, b: bytes) -> int:
    """Offset of the first 512-byte sector where ``a`` and ``b`` (unequal) differ."""
    lo, hi = 0, len(a)
    while hi - lo > SECTOR:  # invariant: the first difference lies in [lo, hi)
        mid = lo + ((hi - lo) // 2 // SECTOR or 1) * SECTOR
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo
