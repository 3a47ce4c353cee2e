"""Block-status extents as QEMU's NBD server builds them (``nbd/server.c``).

A reply lists ``(length, flags)`` pairs that start at the request's offset and cover at most
its length: zero-length extents are never sent, neighbours with equal flags are merged
(``nbd_extent_array_add``), at most ``NBD_MAX_BLOCK_STATUS_EXTENTS`` per reply (one with
``NBD_CMD_FLAG_REQ_ONE``), each at most ``UINT32_MAX`` bytes. A reply that would need more
extents covers less than asked, which the protocol allows.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

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


def pack(extents: list[tuple[int, int]]) -> bytes:
    """Extents as a BLOCK_STATUS chunk carries them: ``{u32 length, u32 flags}`` each."""
    return struct.pack(f">{2 * len(extents)}I", *(v for e in extents for v in e))


def window(first_dirty: bool, edges: Any, offset: int, length: int, *,
           req_one: bool = False) -> bytes:
    """A dirty bitmap's extents of ``[offset, offset+length)``, packed, from its runs as
    arrays (``DirtyBitmap.run_edges``, over a range that starts at or before ``offset``):
    the first run is dirty when ``first_dirty``, ``edges`` (ascending int64) are where each
    ends.
    The same extents as ``from_dirty`` (runs are maximal, so nothing merges), built without
    a Python step per run: a reply of thousands of extents costs microseconds."""
    import numpy as np

    end = offset + length
    if length <= 0 or not len(edges):
        return b""
    i = int(np.searchsorted(edges, offset, side="right"))  # the run holding offset
    j = int(np.searchsorted(edges, end, side="left"))  # the run holding end - 1
    j = min(j, len(edges) - 1)
    limit = 1 if req_one else NBD_MAX_BLOCK_STATUS_EXTENTS
    j = min(j, i + limit - 1)
    stops = np.array(edges[i:j + 1], dtype=np.int64)
    stops[-1] = min(int(stops[-1]), end)
    n = len(stops)
    out = np.empty((n, 2), dtype=">u4")
    out[:, 0] = np.diff(stops, prepend=np.int64(offset))
    dirty0 = first_dirty ^ bool(i & 1)
    out[:, 1] = (np.arange(n) + (1 if dirty0 else 0)) & 1
    if NBD_STATE_DIRTY != 1:  # pragma: no cover - the flag is bit 0
        out[:, 1] *= NBD_STATE_DIRTY
    return out.tobytes()


__all__ = ["ExtentArray", "from_dirty", "from_runs", "pack", "window"]
