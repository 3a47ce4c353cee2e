"""The sparse copy of an image's guest contents into another image (qemu-img convert's).

Ranges the source (with its whole backing chain) reports as zero are not written, and inside
data ranges every block that reads as zeros is skipped too (``granularity``; 0 writes
everything). A qcow2 target is checked a cluster at a time by passing its cluster size, so a
cluster is allocated exactly when some of its bytes are non-zero, and is written whole, leaving
no holes inside it. The result reads the same as the source. Runs synchronously on the caller's
thread (a backup job submits it in chunks through the block thread later).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from dirtybits.block.status import ChainStatus, merged, qemu_size, read_padded

if TYPE_CHECKING:
    from dirtybits.block.driver import ImageDriver

log = logging.getLogger(__name__)

CHUNK = 2 << 20


class Progress(Protocol):
    """Where ``copy`` reports the bytes it has done (a progress bar, a job's counter)."""

    def update(self, n: int) -> None: ...


def data_ranges(src: ImageDriver, size: int, granularity: int) -> Iterator[tuple[int, int]]:
    """[start, end) ranges holding source data, widened to ``granularity`` and joined; with
    ``granularity`` 0 the whole disk is one range."""
    if not granularity:
        if size:
            yield 0, size
        return
    with ChainStatus(src, recurse=False) as status:
        runs = ((e.start, e.end) for e in merged(status.entries(0, size)) if not e.zero)
        yield from _widen(runs, granularity, size)


def _widen(runs: Iterable[tuple[int, int]], granularity: int, size: int
           ) -> Iterator[tuple[int, int]]:
    cur: tuple[int, int] | None = None
    for start, end in runs:
        start = start // granularity * granularity
        end = min(size, -(-end // granularity) * granularity)
        if cur is not None and start <= cur[1]:
            cur = (cur[0], max(cur[1], end))
            continue
        if cur is not None:
            yield cur
        cur = (start, end)
    if cur is not None:
        yield cur


def copy(src: ImageDriver, dst: ImageDriver, granularity: int, zero_init: bool,
         progress: Progress | None = None, *, compress: bool = False) -> None:
    """Write every non-zero ``granularity`` block of ``src`` into ``dst``; on a target that
    does not read as zeros already, zero the rest. ``compress``: the writes are compressed
    (``granularity`` must then be the target's cluster size, or 0). ``progress`` is told
    the bytes done as they are done."""
    size = qemu_size(src)
    update = progress.update if progress is not None else _no_progress
    log.debug("copy %s -> %s: %d bytes, granularity %d, zero_init %s, compress %s",
              src.path, dst.path, size, granularity, zero_init, compress)
    pos = 0
    ranges: Iterable[tuple[int, int]] = data_ranges(src, size, granularity)
    reads: Iterator[bytes] | None = None
    if compress:
        # the next chunk is read while this one is compressed and stored (the source is
        # then only touched by the reading thread: its ranges are listed first)
        ranges = list(ranges)
        reads = _read_ahead(src, [(off, min(CHUNK, end - off)) for start, end in ranges
                                  for off in range(start, end, CHUNK)])
    for start, end in ranges:
        if pos < start:
            _zero(dst, pos, start, zero_init)
            update(start - pos)
        for off in range(start, end, CHUNK):
            n = min(CHUNK, end - off)
            buf = next(reads) if reads is not None else read_padded(src, off, n)
            _write_blocks(dst, off, buf, granularity if zero_init else 0, compress)
            update(n)
        pos = end
    if pos < size:
        _zero(dst, pos, size, zero_init)
        update(size - pos)
    if compress:
        dst.write(0, b"", compress=True)  # qemu-img's last one: the file ends on a sector
    log.debug("copy %s -> %s: done", src.path, dst.path)
    # No fdatasync of our own: qemu-img convert writes with cache=unsafe. Closing a qcow2
    # target still writes its metadata in the engine's crash-safe order.


def _no_progress(n: int) -> None:
    pass


def _read_ahead(src: ImageDriver, jobs: list[tuple[int, int]]) -> Iterator[bytes]:
    """``read_padded`` of each (offset, length), one read ahead in a thread."""
    from concurrent.futures import Future, ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="dirtybits-read") as ex:
        nxt: Future[bytes] | None = None
        for i, (off, n) in enumerate(jobs):
            cur = nxt if nxt is not None else ex.submit(read_padded, src, off, n)
            nxt = ex.submit(read_padded, src, *jobs[i + 1]) if i + 1 < len(jobs) else None
            yield cur.result()


def _zero(dst: ImageDriver, start: int, end: int, zero_init: bool) -> None:
    if not zero_init:
        dst.write_zeroes(start, end - start, unmap=True)


def _write_blocks(dst: ImageDriver, offset: int, buf: bytes, granularity: int,
                  compress: bool = False) -> None:
    """Write ``buf`` at ``offset`` leaving out all-zero ``granularity`` blocks (0: write all)."""
    if not granularity:
        dst.write(offset, buf, compress=compress)
        return
    view = memoryview(buf)
    zero = bytes(granularity)
    run_start = -1
    for i in range(0, len(buf), granularity):
        block = buf[i:i + granularity]  # bytes == bytes is a memcmp; memoryview's is slow
        is_zero = block == zero[:len(block)]
        if not is_zero and run_start < 0:
            run_start = i
        elif is_zero and run_start >= 0:
            dst.write(offset + run_start, view[run_start:i], compress=compress)
            run_start = -1
    if run_start >= 0:
        dst.write(offset + run_start, view[run_start:], compress=compress)
