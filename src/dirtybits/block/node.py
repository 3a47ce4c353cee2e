"""A block node: an image driver plus the persistent bitmaps that record its writes.

This is QEMU's protocol, kept deliberately simple for now: at a writable open every usable
bitmap is marked ``in_use`` on disk (so a crash leaves them visibly inconsistent, never
silently stale), enabled (``auto``) bitmaps record every write, write-zeroes and discard
before the request reaches the image, and a clean close stores the bits and clears
``in_use``. Shorter in-use windows (checkpoints) come with the tracking work.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from dirtybits.block.driver import Buffer, ImageDriver
from dirtybits.qcow2.extent import MapExtent

if TYPE_CHECKING:
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore


class BlockNode:
    """Delegates I/O to ``driver``; marks the enabled bitmaps first."""

    def __init__(self, driver: ImageDriver, store: Qcow2BitmapStore | None = None):
        self.driver = driver
        self.store = store
        self.format_name = driver.format_name
        self.path = driver.path
        self.readonly = driver.readonly
        self.recording: dict[str, DirtyBitmap] = {}
        self._marked: list[str] = []
        if store is not None and not driver.readonly:
            self._start_tracking(store)

    def _start_tracking(self, store: Qcow2BitmapStore) -> None:
        usable = [sb for sb in store.bitmaps if sb.usable]
        if not usable:
            return
        for sb in usable:
            if sb.entry.auto:
                bm = store.load(sb.name)
                bm.track_changes(store.cluster_size)
                self.recording[sb.name] = bm
        store.mark_in_use()
        self._marked = [sb.name for sb in usable]

    @property
    def size(self) -> int:
        return self.driver.size

    def read(self, offset: int, length: int) -> bytes:
        return self.driver.read(offset, length)

    def _mark(self, offset: int, length: int) -> None:
        for bm in self.recording.values():
            bm.set(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        if self.recording and len(data):
            self._mark(offset, len(data))
        self.driver.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        if self.recording and length:
            self._mark(offset, length)
        self.driver.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        if self.recording and length:
            self._mark(offset, length)
        self.driver.discard(offset, length)

    def flush(self) -> None:
        self.driver.flush()

    def resize(self, new_size: int) -> None:
        if self._marked:
            from dirtybits.errors import UnsupportedFeatureError

            raise UnsupportedFeatureError(
                "Cannot resize an image with persistent bitmaps (not supported yet)")
        self.driver.resize(new_size)

    def block_status(self, offset: int, length: int) -> Iterator[MapExtent]:
        return self.driver.block_status(offset, length)

    def close(self) -> None:
        try:
            if self.store is not None and self._marked:
                self.driver.flush()  # data and metadata durable before bitmaps claim them
                self.store.finish_tracking(self.recording, set(self._marked))
                self._marked = []
        finally:
            self.driver.close()

    def __enter__(self) -> BlockNode:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
