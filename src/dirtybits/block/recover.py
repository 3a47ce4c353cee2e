"""Rebuild a dirty bitmap by comparing the image with a backup (the "data-compare" recovery).

An ``in_use`` bitmap left by a crash cannot be trusted (DESIGN.md, persistence protocol step
4b). If the backup taken when the bitmap was created or last cleared still exists (a full
backup, or the image an incremental chain restores to), the granules that differ between it
and the image's guest-visible contents are exactly what the next incremental backup must copy.
The rebuilt bitmap is that set of differences and nothing else: the stored bits predate the
crash and may be stale, so they are not OR-ed in. Against any other reference the result is
the difference to *that* reference, which is why the reference must be the bitmap's own base.

Speed: both sides' allocation maps are read first. Where both read as zeros (unallocated in
the whole chain, zero clusters, holes of a raw file) nothing is read; elsewhere both are read
in 4 MiB chunks, compared with one ``memcmp`` per chunk, and only a differing chunk is split
into granules with numpy. A side that is all zeros in a chunk is not read.

Nothing is written until the whole compare is done; the new bits then replace the stored ones
in one copy-on-write directory switch (``Qcow2BitmapStore.replace_inconsistent``). An
interrupted run changes nothing and can simply be rerun.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
from dirtybits.block.driver import ImageDriver
from dirtybits.block.qcow2_bitmaps import BitmapOperationError, Qcow2BitmapStore

if TYPE_CHECKING:
    from dirtybits.block.registry import BitmapRegistry

log = logging.getLogger(__name__)

CHUNK = 4 << 20
_ZEROS = bytes(CHUNK)

Progress = Callable[[int], None]
Runs = list[tuple[int, int]]
Buffer = bytes | bytearray | memoryview


def data_runs(img: ImageDriver, end: int) -> Runs:
    """``[start, end)`` runs of ``img`` below ``end`` that may hold non-zero bytes (merged)."""
    runs: Runs = []
    if end <= 0:
        return runs
    for ext in img.block_status(0, end):
        if ext.zero:
            continue
        s, e = ext.start, ext.start + ext.length
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))
    return runs


def _union(a: Runs, b: Runs, unit: int, end: int) -> Runs:
    """Both sides' runs rounded out to ``unit`` (clipped at ``end``), merged."""
    out: Runs = []
    for s, e in sorted(a + b):
        s = s // unit * unit
        e = min(-(-e // unit) * unit, end)
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


class _Side:
    """One image of the pair: where it has data, and reads that skip its zero chunks.

    A driver with ``read_into(offset, view)`` is read into one reused buffer (no allocation,
    zero-fill or copy per chunk: at page-cache speed those cost more than the read itself);
    otherwise ``read`` is used.
    """

    def __init__(self, img: ImageDriver, runs: Runs, chunk: int):
        self.img = img
        self.starts = [s for s, _ in runs]
        self.ends = [e for _, e in runs]
        self._into: Callable[[int, memoryview], object] | None = getattr(img, "read_into",
                                                                          None)
        # two buffers: the next chunk is read into one while the other is compared
        self._bufs = ([memoryview(bytearray(chunk)) for _ in range(2)]
                      if self._into is not None else None)

    def has_data(self, start: int, end: int) -> bool:
        i = bisect_left(self.ends, start + 1)  # first run ending after ``start``
        return i < len(self.starts) and self.starts[i] < end

    def read(self, start: int, end: int, slot: int = 0) -> Buffer | None:
        """The bytes of ``[start, end)`` (valid until the next read into ``slot``), or None
        when they are known to be zeros."""
        if not self.has_data(start, end):
            return None
        if self._into is None or self._bufs is None:
            return self.img.read(start, end - start)
        view = self._bufs[slot][:end - start]
        self._into(start, view)
        return view


@dataclass
class CompareResult:
    bitmap: DirtyBitmap
    compared: int  # bytes of the common size read or known zero on one side and compared
    skipped: int  # bytes zero on both sides, never read


class DataCompare:
    """Which granules of ``img`` differ from ``ref``: plan on construction, ``run`` to read.

    ``total`` (bytes to compare) is known before any data is read, for a progress bar.
    """

    def __init__(self, img: ImageDriver, ref: ImageDriver, granularity: int, *,
                 chunk: int = CHUNK):
        if chunk & (chunk - 1) or chunk < 512:
            raise ValueError("chunk must be a power of two of at least 512")
        self.img = img
        self.ref = ref
        self.granularity = granularity
        self.size = img.size
        self.common = min(img.size, ref.size)
        # compare unit: a granule, or a whole chunk inside a larger granule
        self.unit = min(granularity, chunk)
        self.chunk = chunk
        a, b = data_runs(img, self.common), data_runs(ref, self.common)
        self._a, self._b = _Side(img, a, chunk), _Side(ref, b, chunk)
        self.runs = _union(a, b, self.unit, self.common)
        self.total = sum(e - s for s, e in self.runs)

    def _chunks(self, bm: DirtyBitmap) -> Iterator[tuple[int, int, bool]]:
        """(start, end, needed) of every chunk to compare, in order; not needed: inside a
        granule larger than a chunk that is already marked."""
        chunk = self.chunk
        skip_marked = self.granularity > chunk
        for start, end in self.runs:
            pos = start
            while pos < end:
                stop = min(end, (pos // chunk + 1) * chunk)
                yield pos, stop, not (skip_marked and bm.get(pos))
                pos = stop

    def run(self, progress: Progress | None = None) -> CompareResult:
        """Compare chunk by chunk; both sides' next chunk is read (two threads, one per image,
        so each image is only ever used by one thread at a time) while this one is compared."""
        from concurrent.futures import Future, ThreadPoolExecutor

        bm = DirtyBitmap(self.size, self.granularity)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="recover-read") as pool:

            def fetch(start: int, end: int, slot: int) -> tuple[Future[Buffer | None], ...]:
                return (pool.submit(self._a.read, start, end, slot),
                        pool.submit(self._b.read, start, end, slot))

            chunks = self._chunks(bm)
            current = next(chunks, None)
            slot = 0
            pending = fetch(*current[:2], slot) if current and current[2] else None
            while current is not None:
                start, end, _ = current
                got = [f.result() for f in pending] if pending is not None else None
                # the next chunk's "needed" is judged before this compare marks anything:
                # at worst one read that a larger granule made unnecessary
                current = next(chunks, None)
                slot ^= 1
                pending = fetch(*current[:2], slot) if current and current[2] else None
                if got is not None:
                    self._compare(bm, start, end, got[0], got[1])
                if progress is not None:
                    progress(end - start)
        if self.size > self.common:  # the image grew past the reference: all of it is new
            bm.set(self.common, self.size - self.common)
        return CompareResult(bm, self.total, self.common - self.total)

    def _compare(self, bm: DirtyBitmap, start: int, end: int, a: Buffer | None,
                 b: Buffer | None) -> None:
        if a is None and b is None:
            return
        n = end - start
        if a is None or b is None:
            other = a if b is None else b
            assert other is not None
            if _is_zero(other, n):
                return
        elif _equal(a, b, n):
            return
        for s, length in _differing(a, b, n, self.unit):
            bm.set(start + s, min(length, self.size - start - s))


def _equal(a: Buffer, b: Buffer, n: int) -> bool:
    if isinstance(a, bytes) and isinstance(b, bytes):
        return a == b  # memcmp
    if n % 8:
        return bytes(a) == bytes(b)
    return bool(np.array_equal(np.frombuffer(a, np.uint64), np.frombuffer(b, np.uint64)))


def _is_zero(a: Buffer, n: int) -> bool:
    if isinstance(a, bytes):
        return a == _ZEROS[:n]  # a full chunk compares with _ZEROS itself, no copy
    return not np.frombuffer(a, np.uint8).any()


def _words(data: Buffer | None, n: int, unit: int) -> np.ndarray | None:
    """``data`` as rows of 64-bit words, one row per ``unit`` (the tail padded with zeros)."""
    if data is None:
        return None
    m = -(-n // unit) * unit
    arr = np.frombuffer(data, np.uint8)
    if m != n:
        padded = np.zeros(m, np.uint8)
        padded[:n] = arr
        arr = padded
    return arr.view(np.uint64).reshape(-1, unit // 8)


def _differing(a: Buffer | None, b: Buffer | None, n: int, unit: int) -> list[tuple[int, int]]:
    """(offset, length) runs of whole units where ``a`` and ``b`` differ (None: zeros)."""
    wa, wb = _words(a, n, unit), _words(b, n, unit)
    if wa is None:
        assert wb is not None
        diff = wb.any(axis=1)
    elif wb is None:
        diff = wa.any(axis=1)
    else:
        diff = (wa != wb).any(axis=1)
    idx = np.flatnonzero(diff)
    if not idx.size:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    firsts = np.concatenate(([idx[0]], idx[breaks + 1]))
    lasts = np.concatenate((idx[breaks], [idx[-1]]))
    return [(int(f) * unit, (int(la) - int(f) + 1) * unit) for f, la in zip(firsts, lasts,
                                                                              strict=True)]


def differing_granules(img: ImageDriver, ref: ImageDriver, granularity: int,
                       progress: Progress | None = None) -> DirtyBitmap:
    """A bitmap of ``img``'s size marking every granule whose guest data differs from ``ref``
    (a granule partly past the end counts; past the end of a smaller ``ref``, everything)."""
    return DataCompare(img, ref, granularity).run(progress).bitmap


def recover_bitmap(store: Qcow2BitmapStore | None, name: str, ref: ImageDriver, *,
                   progress: Callable[[int], Progress | None] | None = None,
                   registry: BitmapRegistry | None = None) -> CompareResult:
    """Rebuild bitmap ``name`` of the store's image against ``ref`` and make it consistent.

    ``progress``, if given, is called with the number of bytes to compare and returns the
    per-chunk callback. The store is written only after the compare has finished, through
    ``registry`` when the image is open as a node (its bitmaps change only there).
    """
    if store is None:
        raise BitmapOperationError(f"Dirty bitmap '{name}' not found")
    sb = store.find(name)
    if sb is None:
        raise BitmapOperationError(f"Dirty bitmap '{name}' not found")
    if sb.problems:
        raise BitmapOperationError(
            f"Bitmap '{name}' is damaged and cannot be used ({'; '.join(sb.problems)}); "
            "it can only be removed")
    job = DataCompare(store.img, ref, sb.entry.granularity)
    log.info("%s: rebuilding bitmap '%s' against %s (%d bytes to compare)", store.img.path,
             name, ref.path, job.total)
    result = job.run(progress(job.total) if progress is not None else None)
    if registry is not None:
        registry.replace_inconsistent(name, result.bitmap)
    else:
        store.replace_inconsistent(name, result.bitmap)
    log.info("%s: bitmap '%s' rebuilt: %d bytes differ, %d compared, %d skipped",
             store.img.path, name, result.bitmap.count(), result.compared, result.skipped)
    return result
