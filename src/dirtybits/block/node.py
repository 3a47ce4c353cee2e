"""A block node: an image driver plus the persistent bitmaps that record its writes.

The persistence protocol (DESIGN.md): every write, write-zeroes and discard marks the enabled
bitmaps in memory before it reaches the driver. Before the first such request after a
checkpoint, the enabled bitmaps get ``in_use`` set on disk and synced, so a crash from then on
finds them inconsistent, never silently stale. A checkpoint writes only the bitmap clusters
whose bits changed, syncs, and clears ``in_use``; it runs on close, on flush, and per the
``CheckpointPolicy`` (timer, idle, threshold). Bitmap data is not read at open: the node records
the writes since open and merges them into the stored clusters at each checkpoint.

Bitmaps with the same granularity share one in-memory record of the writes, so a write costs
one bitmap update however many bitmaps it dirties.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from dirtybits.block.checkpoint import CheckpointPolicy, CheckpointTimer
from dirtybits.block.driver import Buffer, ImageDriver
from dirtybits.qcow2.extent import MapExtent

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore, StoredBitmap
    from dirtybits.block.write_intent import WriteIntentMap


@dataclass
class NodeStats:
    """What the persistence protocol did (for tests, benchmarks and ``info``)."""

    in_use_marks: int = 0  # times in_use was set and synced before a write
    checkpoints: int = 0  # checkpoints that cleared in_use
    bitmap_bytes_written: int = 0  # bitmap data and table bytes written by checkpoints


class _Recorder:
    """The writes since open, for the tracked bitmaps of one granularity."""

    __slots__ = ("bits", "names")

    def __init__(self, bits: DirtyBitmap, chunk_bytes: int) -> None:
        bits.track_changes(chunk_bytes)
        self.bits = bits
        self.names: list[str] = []


class BlockNode:
    """Delegates I/O to ``driver``; records writes in the enabled bitmaps first.

    Thread-safe: requests and background checkpoints are serialized by one lock.
    ``track=False`` (``--bitmaps=no``) records nothing; the enabled bitmaps are then marked
    in_use before the first write and left so: they would miss writes, so they say so.
    ``only`` limits the node to these bitmaps of ``store`` (a container holding bitmaps for
    several drives: the store may be in another file than ``driver``, and its disk size may
    exceed the driver's; bits past the drive's end simply stay clean).
    ``intent`` is the image's write-intent map (resilient mode): a tracked node recovers the
    in_use bitmaps it covers at open and marks regions before writes; an untracked one
    invalidates it before its first write.
    Enabled bitmaps the loader found damaged cannot record writes: they are marked in_use
    before the first write (``invalidated``), so no repair of the damage can make them read
    as consistent without the writes they missed.
    """

    def __init__(self, driver: ImageDriver, store: Qcow2BitmapStore | None = None, *,
                 policy: CheckpointPolicy | None = None, track: bool = True,
                 only: Collection[str] | None = None, intent: WriteIntentMap | None = None):
        self.driver = driver
        self.store = store
        self.format_name = driver.format_name
        self.path = driver.path
        self.readonly = driver.readonly
        self.policy = policy if policy is not None else CheckpointPolicy()
        self.stats = NodeStats()
        self._lock = threading.RLock()
        self._recorders: list[_Recorder] = []  # made at the first write (numpy is not cheap)
        self._plan: dict[int, list[str]] = {}  # granularity -> tracked bitmaps
        self._tracked: list[str] = []  # in_use while the node is "open" between checkpoints
        self._untracked: list[str] = []  # bitmaps=no: marked in_use once, never cleared
        self._untracked_intent = False  # bitmaps=no: invalidate the write-intent map first
        self._clean = True  # no tracked bitmap is in_use on disk
        self._flags_unknown = False  # a flag write failed: the disk may hold any mix
        self._last_write = self._in_use_since = time.monotonic()
        self._bits_at_checkpoint = 0
        self._timer: CheckpointTimer | None = None
        self._closed = False
        self._intent = intent if intent is not None and intent.enabled else None
        self.recovered: list[str] = []  # bitmaps made consistent from the write-intent map
        self._damaged: list[StoredBitmap] = []  # enabled but damaged: in_use before a write
        self.invalidated: list[str] = []  # damaged enabled bitmaps this node marked in_use
        if store is not None and not driver.readonly:
            self._setup(store, track, only)

    def _setup(self, store: Qcow2BitmapStore, track: bool,
               only: Collection[str] | None) -> None:
        intent = self._intent
        if track and intent is not None:
            self.recovered = intent.recover(store)
        enabled = [sb for sb in store.bitmaps if store.is_usable(sb) and sb.entry.auto
                   and (only is None or sb.name in only)]
        self._damaged = store.damaged_enabled(only)
        if not track:
            self._untracked = [sb.name for sb in enabled]
            if intent is not None and intent.valid:
                self._untracked_intent = True
            return
        for sb in enabled:
            self._plan.setdefault(sb.entry.granularity, []).append(sb.name)
        self._tracked = [sb.name for sb in enabled]
        if self._tracked and self.policy.timed:
            self._timer = CheckpointTimer(self.policy, self._due, self._timed_checkpoint)

    # ------------------------------------------------------------------ I/O
    @property
    def size(self) -> int:
        return self.driver.size

    def _in_range(self, offset: int, length: int) -> bool:
        """Requests the driver will refuse mark nothing (it raises its own error)."""
        return offset >= 0 and offset + length <= self.driver.size

    @property
    def _hooked(self) -> bool:
        """Does a write need the protocol's steps before it?"""
        return bool(self._tracked or self._untracked or self._untracked_intent
                    or self._damaged)

    @property
    def tracked_bitmaps(self) -> list[str]:
        return list(self._tracked)

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            return self.driver.read(offset, length)

    def read_into(self, offset: int, buf: Buffer) -> None:
        with self._lock:
            reader = getattr(self.driver, "read_into", None)
            if reader is not None:
                reader(offset, buf)
            else:
                view = memoryview(buf).cast("B")
                view[:] = self.driver.read(offset, len(view))

    def _before_write(self, offset: int, length: int) -> None:
        """Mark the bitmaps, then make sure they are in_use on disk (and, in resilient mode,
        the write's regions marked): all durable before the driver runs."""
        self._check_background_error()
        if self._plan and not self._recorders:
            self._make_recorders()
        for rec in self._recorders:
            rec.bits.set(offset, length)
        store = self.store
        assert store is not None
        if self._damaged:  # durable before anything else: these can record nothing
            store.invalidate(self._damaged)
            self.invalidated += [sb.name for sb in self._damaged]
            self._damaged = []
        intent = self._intent
        if self._tracked:
            if intent is not None and not intent.valid:
                intent.start(self._inconsistent_tables())
            if self._clean or self._flags_unknown:
                # from here on some flag may be set on disk: close must checkpoint
                self._clean = False
                self._flags_unknown = True
                store.set_in_use(self._tracked, True, force=True)  # durable on return
                self._flags_unknown = False
                self._in_use_since = time.monotonic()
                self.stats.in_use_marks += 1
            if intent is not None:
                intent.mark(offset, length)  # durable on return
        if self._untracked_intent and intent is not None:
            intent.invalidate()
            self._untracked_intent = False
        if self._untracked:
            store.set_in_use(self._untracked, True)
            self._untracked = []
        self._last_write = time.monotonic()

    def _make_recorders(self) -> None:
        from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

        store = self.store
        assert store is not None
        for gran, names in self._plan.items():
            rec = _Recorder(DirtyBitmap(store.disk_size, gran), store.cluster_size)
            rec.names.extend(names)
            self._recorders.append(rec)

    def _inconsistent_tables(self) -> list[int]:
        """Bitmaps inconsistent before this node wrote anything: a new map cannot cover them."""
        store = self.store
        assert store is not None
        return [sb.entry.bitmap_table_offset for sb in store.bitmaps
                if sb.entry.in_use and sb.name not in store.ours]

    def _after_write(self) -> None:
        limit = self.policy.threshold_bits
        if (limit is not None and self._recorders and not self._clean
                and self._dirty_bits() - self._bits_at_checkpoint >= limit):
            self._checkpoint()

    def _dirty_bits(self) -> int:
        return sum(rec.bits.count_bits() for rec in self._recorders)

    def write(self, offset: int, data: Buffer, *, compress: bool = False) -> None:
        """A guest write (``compress``: stored compressed, see the driver), recorded in
        every enabled bitmap like any other."""
        with self._lock:
            if self._hooked and len(data) and self._in_range(offset, len(data)):
                self._before_write(offset, len(data))
                self._driver_write(offset, data, compress)
                self._after_write()
            else:
                self._driver_write(offset, data, compress)

    def _driver_write(self, offset: int, data: Buffer, compress: bool) -> None:
        if compress:
            self.driver.write(offset, data, compress=True)
        else:
            self.driver.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        with self._lock:
            if self._hooked and length and self._in_range(offset, length):
                self._before_write(offset, length)
                self.driver.write_zeroes(offset, length, unmap=unmap)
                self._after_write()
            else:
                self.driver.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            if self._hooked and length and self._in_range(offset, length):
                self._before_write(offset, length)
                self.driver.discard(offset, length)
                self._after_write()
            else:
                self.driver.discard(offset, length)

    def flush(self) -> None:
        """Data and metadata durable, then a bitmap checkpoint."""
        with self._lock:
            self._check_background_error()
            self.driver.flush()
            self._checkpoint()

    def checkpoint(self) -> None:
        """Store the changed bitmap clusters and clear ``in_use`` (no data flush needed: the
        bits already cover every write issued so far, durable or not)."""
        with self._lock:
            self._check_background_error()
            self._checkpoint()

    def resize(self, new_size: int) -> None:
        """Resize the disk; persistent bitmaps follow the new size (the grown area clean),
        as in QEMU 7.2. The bits recorded so far are checkpointed first, then the bitmaps'
        tables and the size switch together (``Qcow2BitmapStore.resize``). In resilient mode
        the write-intent map is invalidated first and begins anew at the new size (every
        bitmap is consistent at that moment: nothing to recover). Raises what the store and
        the driver raise; a drive whose bitmaps live in a container is refused (resize the
        drive, then ``dirtybits container rebind``)."""
        with self._lock:
            self._check_background_error()
            store = self.store
            if store is None or not store.bitmaps or self.readonly:
                self.driver.resize(new_size)
                return
            if store.img is not self.driver:
                from dirtybits.errors import UnsupportedFeatureError

                raise UnsupportedFeatureError(
                    f"the bitmaps of '{self.path}' are kept in {store.img.path}: resize the "
                    "drive, then accept it there with 'dirtybits container rebind'")
            self._checkpoint()
            intent = self._intent
            region = intent.rec.region_size if intent is not None and intent.rec else None
            if intent is not None:
                intent.invalidate()
            store.resize(new_size)
            self._recorders = []  # made again for the new size at the next write
            self._bits_at_checkpoint = 0
            if intent is not None:
                self._intent = self._new_intent(region)

    def _new_intent(self, region: int | None) -> WriteIntentMap | None:
        """An empty map for the new size (the old region size if it still fits)."""
        from dirtybits.block import write_intent

        store = self.store
        assert store is not None
        for size in (region, None):
            try:
                write_intent.enable(store.img, size)
                return write_intent.WriteIntentMap(store.img)
            except write_intent.ResilientModeError:
                continue
        log.warning("%s: the write-intent map does not fit at the new size; resilient mode "
                    "is off", self.path)
        write_intent.disable(store.img)
        return None

    def block_status(self, offset: int, length: int) -> Iterator[MapExtent]:
        with self._lock:
            return iter(list(self.driver.block_status(offset, length)))

    # ------------------------------------------------------------------ bitmaps
    def load_bitmap(self, name: str) -> DirtyBitmap:
        """A bitmap's current bits: what is stored plus what was recorded since."""
        if self.store is None:
            from dirtybits.block.qcow2_bitmaps import BitmapOperationError

            raise BitmapOperationError(f"Dirty bitmap '{name}' not found")
        with self._lock:
            bm = self.store.load(name)
            for rec in self._recorders:
                if name in rec.names:
                    bm.merge_from(rec.bits)
            return bm

    def _checkpoint(self) -> None:
        if self._clean or self.store is None:
            return
        store = self.store
        taken: list[tuple[_Recorder, list[int]]] = []
        try:
            for rec in self._recorders:
                chunks = rec.bits.take_changed_chunks()
                taken.append((rec, chunks))
                for name in rec.names if chunks else ():
                    if name in store.ours:  # else never marked in use: nothing was written
                        self.stats.bitmap_bytes_written += store.write_changes(
                            name, rec.bits, chunks)
            store.img.sync()  # the bits are durable before in_use says they are complete
            self._flags_unknown = True  # until the clear is synced, any mix may be on disk
            store.set_in_use(self._tracked, False, force=True)
            self._flags_unknown = False
            if self._intent is not None and self._intent.valid:
                self._intent.end_epoch()
        except BaseException:
            for rec, chunks in taken:
                if chunks:
                    rec.bits.mark_chunks_changed(chunks)
            raise
        self._clean = True
        self._bits_at_checkpoint = self._dirty_bits()
        self.stats.checkpoints += 1

    # ------------------------------------------------------------------ timer
    def _due(self, now: float) -> float | None:
        """Seconds until the next timed checkpoint (<= 0: now), None when nothing is open."""
        if self._clean or self._closed:
            return None
        waits = []
        if self.policy.idle is not None:
            waits.append(self._last_write + self.policy.idle - now)
        if self.policy.interval is not None:
            waits.append(self._in_use_since + self.policy.interval - now)
        return min(waits) if waits else None

    def _timed_checkpoint(self) -> None:
        with self._lock:
            left = self._due(time.monotonic())
            if left is not None and left <= 0:
                self._checkpoint()

    def _check_background_error(self) -> None:
        timer = self._timer
        if timer is not None and timer.error is not None:
            exc, timer.error = timer.error, None
            raise exc

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        if self._closed:
            return
        if self._timer is not None:
            self._timer.stop()  # outside the lock: its checkpoint may be waiting for it
        with self._lock:
            self._closed = True
            try:
                self._checkpoint()
            finally:
                self.driver.close()

    def __enter__(self) -> BlockNode:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
