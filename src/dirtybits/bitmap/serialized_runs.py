"""Dirty extents straight from a bitmap's serialized form, without the numpy engine.

``dirtybits bitmap --dump`` of a sparse bitmap is a one-shot process whose cost is start-up:
importing numpy alone takes longer than qemu-nbd + nbdinfo need for the whole job. A bitmap
whose data clusters are mostly 0x00 and 0xff bytes is scanned here with a byte regex (C speed
over the zeros and ones, Python only at run edges). Dense bitmaps (many edges) are the numpy
engine's job: ``serialized_edges`` gives up past ``max_edges``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# The outer scan: non-zero bytes become 1, then memchr (``find``) jumps over the zeros; a regex
# over the zeros would crawl (about 100 MB/s against a few GB/s).
_NONZERO = bytes([0] + [1] * 255)
_TOKENS = re.compile(rb"\xff+|[\x01-\xfe]")  # inside a nonzero stretch
ZEROS = 0  # a cluster of the serialized form that is all zero (table entry 0)
ONES = 1  # all ones (the all-ones table entry)


def serialized_edges(clusters: Iterable[bytes | int], cluster_size: int, nbits: int,
                     max_edges: int | None = None) -> list[int] | None:
    """Bit indices where the bitmap flips, starting clean (None: more than ``max_edges``,
    a dense bitmap the numpy engine should handle).

    ``clusters`` is the serialized bitmap cluster by cluster: bytes, or ``ZEROS``/``ONES``.
    Bits at or past ``nbits`` (padding, or the tail of an all-ones cluster) are ignored.
    """
    edges: list[int] = []
    dirty = False

    def flip(at: int) -> None:
        nonlocal dirty
        if at < nbits:
            if edges and edges[-1] == at:
                edges.pop()  # flipped back at the same bit: no run in between
            else:
                edges.append(at)
            dirty = not dirty

    pos = 0
    for cluster in clusters:
        if pos >= nbits:
            break
        if cluster is ZEROS or cluster is ONES:
            if dirty != (cluster is ONES):
                flip(pos)
            pos += cluster_size * 8
            continue
        assert isinstance(cluster, bytes)
        marks = cluster.translate(_NONZERO)
        start = marks.find(1)
        while start >= 0:
            stop = marks.find(0, start)
            if stop < 0:
                stop = len(cluster)
            base = pos + start * 8
            if dirty:
                flip(base)  # the zeros before this stretch
            sub = cluster[start:stop]
            for m in _TOKENS.finditer(sub):
                first = sub[m.start()]
                bit = base + m.start() * 8
                if first == 0xFF:
                    if not dirty:
                        flip(bit)
                    continue
                # a mixed byte: the bits where it differs from the bit before
                t = (first ^ ((first << 1) | dirty)) & 0xFF
                while t:
                    low = t & -t
                    flip(bit + low.bit_length() - 1)
                    t ^= low
            if dirty:
                flip(pos + stop * 8)  # zeros (or the cluster's end) after it
            start = marks.find(1, stop)
        pos += len(cluster) * 8
        if max_edges is not None and len(edges) > max_edges:
            return None
    return edges


def runs_from_edges(edges: list[int], nbits: int, granularity: int,
                    end: int) -> Iterator[tuple[int, int, bool]]:
    """Alternating ``(start, length, dirty)`` byte runs covering ``[0, end)`` (an NBD
    export: the disk size aligned down to 512)."""
    bounds = [0, *edges, nbits]
    for i in range(len(bounds) - 1):
        start, stop = bounds[i] * granularity, min(bounds[i + 1] * granularity, end)
        if start >= end:
            break
        if start < stop:  # a bitmap dirty from bit 0 starts with an empty clean run
            yield start, stop - start, bool(i & 1)


def serialized_extents(clusters: Iterable[bytes | int], cluster_size: int, nbits: int,
                       granularity: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``runs_from_edges`` of ``serialized_edges``: the extents, however many."""
    edges = serialized_edges(clusters, cluster_size, nbits)
    assert edges is not None
    return runs_from_edges(edges, nbits, granularity, end)
