"""Block-status extents as QEMU's NBD server builds them (``nbd/server.c``).

A reply lists ``(length, flags)`` pairs that start at the request's offset and cover at most
its length: zero-length extents are never sent, neighbours with equal flags are merged
(``nbd_extent_array_add``), at most ``NBD_MAX_BLOCK_STATUS_EXTENTS`` per reply (one with
``NBD_CMD_FLAG_REQ_ONE``), each at most ``UINT32_MAX`` bytes. A reply that would need more
extents covers less than asked, which the protocol allows.
"""

from __future__ import annotations

from collections.abc import Iterable

from dirtybits.proto.nbd.constants import NBD_MAX_BLOCK_STATUS_EXTENTS, NBD_STATE_DIRTY

UINT32_MAX = (1 << 32) - 1


class ExtentArray:
    """QEMU's ``NBDExtentArray``: collects extents, merging equal neighbours."""

    def __init__(self, req_one: bool = False) -> None:
        self.limit = 1 if req_one else NBD_MAX_BLOCK_STATUS_EXTENTS
        self.extents: list[tuple[int, int]] = []
        self.full = False

    def add(self, length: int, flags: int) -> bool:
        """Add one run; False once the array is full (the run was not taken)."""
        if length <= 0:
            return True
        ext = self.extents
        if ext and ext[-1][1] == flags and ext[-1][0] + length <= UINT32_MAX:
            ext[-1] = (ext[-1][0] + length, flags)
            return True
        if len(ext) >= self.limit:
            self.full = True
            return False
        ext.append((length, flags))
        return True

    def total(self) -> int:
        return sum(n for n, _ in self.extents)


def from_runs(runs: Iterable[tuple[int, int, int]], offset: int, length: int, *,
              req_one: bool = False) -> list[tuple[int, int]]:
    """Extents of ``[offset, offset+length)`` from ``(start, length, flags)`` runs that
    cover it in order (runs may reach past either edge; they are clipped)."""
    arr = ExtentArray(req_one)
    end = offset + length
    pos = offset
    for start, n, flags in runs:
        stop = min(start + n, end)
        if stop <= pos:
            continue
        if not arr.add(stop - pos, flags):
            break
        pos = stop
        if pos >= end:
            break
    return arr.extents


def from_dirty(dirty: Iterable[tuple[int, int]], offset: int, length: int, *,
               req_one: bool = False) -> list[tuple[int, int]]:
    """A dirty bitmap's extents (``bitmap_to_extents``): clean (0) and dirty
    (``NBD_STATE_DIRTY``) runs alternating, from the dirty runs ``(start, length)`` in
    order, clipped to the request."""
    arr = ExtentArray(req_one)
    end = offset + length
    pos = offset
    for start, n in dirty:
        s, e = max(start, pos), min(start + n, end)
        if e <= s:
            if start >= end:
                break
            continue
        if not arr.add(s - pos, 0) or not arr.add(e - s, NBD_STATE_DIRTY):
            return arr.extents
        pos = e
    if pos < end:
        arr.add(end - pos, 0)
    return arr.extents


__all__ = ["ExtentArray", "from_dirty", "from_runs"]
