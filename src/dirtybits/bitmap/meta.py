"""The meta bitmap: which chunks of a bitmap's serialized form changed since the last flush.

A checkpoint (DESIGN.md, persistence protocol step 3) writes only the bitmap data clusters that
changed. The bitmap marks a chunk here whenever a bit inside it really flips, so a flush after
writes that only hit already-dirty granules writes nothing.

One byte per chunk, not one bit: a 512 MiB bitmap (QEMU's maximum) in 512-byte clusters has
2^20 chunks, so the flags cost at most 1 MiB, and marking one is a single ``bytearray`` store on
the write path instead of a read-modify-write of a packed word.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dirtybits.errors import DirtybitsError


class ChangeTracker:
    """Per-chunk "changed" flags for a bitmap whose serialized form is ``nchunks`` chunks.

    A chunk is ``chunk_bytes`` bytes of serialized bitmap data (the image's cluster size), so it
    holds ``chunk_bytes // 8`` 64-bit words; word ``i`` lies in chunk ``i >> shift``.
    ``flags`` is public so the bitmap's hot path can mark a chunk without a method call.
    """

    __slots__ = ("_view", "chunk_bytes", "flags", "nchunks", "shift")

    def __init__(self, chunk_bytes: int, nchunks: int, *, all_changed: bool = False) -> None:
        if chunk_bytes < 8 or chunk_bytes & (chunk_bytes - 1):
            raise DirtybitsError(f"chunk size must be a power of two >= 8, not {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.nchunks = nchunks
        self.shift = (chunk_bytes >> 3).bit_length() - 1
        self.flags = bytearray(b"\x01" * nchunks if all_changed else nchunks)
        self._view: npt.NDArray[np.uint8] = np.frombuffer(self.flags, dtype=np.uint8)

    def mark_words(self, first_word: int, changed: npt.NDArray[np.bool_]) -> None:
        """Mark the chunks holding words ``first_word + i`` for every ``changed[i]``.

        Reduces per chunk (``logical_or.reduceat``) rather than listing changed words, so a
        range that flips millions of words costs one pass and no index array.
        """
        n = changed.size
        if n == 0:
            return
        shift = self.shift
        c0 = first_word >> shift
        if c0 == (first_word + n - 1) >> shift:
            if changed.any():
                self.flags[c0] = 1
            return
        cw = 1 << shift
        starts = np.arange(-(first_word & (cw - 1)), n, cw)
        starts[0] = 0
        hit = np.logical_or.reduceat(changed, starts)
        self._view[c0 + np.flatnonzero(hit)] = 1

    def mark_chunks(self, chunks: list[int]) -> None:
        """Mark these chunks again (a flush that took them failed before they were durable)."""
        for c in chunks:
            if not 0 <= c < self.nchunks:
                raise DirtybitsError(f"chunk {c} is outside 0..{self.nchunks - 1}")
            self.flags[c] = 1

    def mark_all(self) -> None:
        """Every chunk must be written (a new bitmap, a resize, an unknown on-disk state)."""
        self._view[:] = 1

    def count(self) -> int:
        """How many chunks are marked: what a flush would write now."""
        return int(np.count_nonzero(self._view))

    def peek(self) -> list[int]:
        """Indices of the marked chunks, ascending, without clearing them."""
        return [int(i) for i in np.flatnonzero(self._view)]

    def take(self) -> list[int]:
        """Indices of the marked chunks, ascending; clears them (the flush has them now)."""
        marked = self.peek()
        if marked:
            self._view[:] = 0
        return marked
