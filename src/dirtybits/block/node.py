"""A block node: an image driver, its bitmap registry and the persistence protocol around it.

Every open image is one ``BlockNode`` (qcow2, raw, read-only, a raw drive whose bitmaps live
in a container). Every write, write-zeroes and discard is recorded by the node's registry
(``node.bitmaps``) before it reaches the driver; before the first such request after a
checkpoint the recording persistent bitmaps get ``in_use`` set on disk and synced, so a crash
from then on finds them inconsistent, never silently stale (DESIGN.md). Checkpoints run on
close, on flush, past a threshold of new bits, and when the owner (the block thread) finds
one due by the ``CheckpointPolicy`` (``next_due``/``run_due``: pure scheduling, no timer
thread per node). A background checkpoint that fails becomes an event and a bitmap state,
never an exception raised into someone else's next request.

All of a node's calls run as its owner (``dirtybits.block.owner``): inline under the owner's
lock for a synchronous caller, or on the block thread for services (``dirtybits.block.aio``).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from dirtybits.block.checkpoint import CheckpointPolicy
from dirtybits.block.driver import Buffer, ImageDriver
from dirtybits.block.owner import BlockOwner, default_owner
from dirtybits.block.registry import BitmapInfo, BitmapRegistry, RegistryStats, StoreView
from dirtybits.errors import CorruptImageError, DirtybitsError, ImageError
from dirtybits.qcow2.extent import MapExtent

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.block.status import Entry
    from dirtybits.block.write_intent import WriteIntentMap
    from dirtybits.filelock import FileLock, Perms

NodeStats = RegistryStats
RETRY_AFTER = 1.0  # seconds before a failed background checkpoint is tried again


class NodeEventKind(enum.Enum):
    CORRUPTED = "corrupted"  # the image is corrupt: the node went read-only
    CHECKPOINT_FAILED = "checkpoint-failed"  # bitmaps stay in_use; retried later
    BITMAP_STATE = "bitmap-state"  # a bitmap's state changed


@dataclass(frozen=True)
class NodeEvent:
    kind: NodeEventKind
    node: str
    message: str
    bitmap: str | None = None
    fatal: bool = False
    offset: int | None = None  # CORRUPTED: the host range of the refused write, if any
    size: int | None = None


@dataclass(frozen=True)
class NodeInfo:
    """What a query reports about an open node, from the live objects (never re-read)."""

    node_name: str
    format: str
    path: str
    size: int
    readonly: bool
    cache: str
    cluster_size: int | None
    backing: str | None
    data_file: str | None
    corrupt: bool
    inactive: bool
    bitmaps: list[BitmapInfo] = field(default_factory=list)


class NodeInactiveError(ImageError):
    """A request to a node that was inactivated (its bitmaps stored, locks released)."""


class BlockNode:
    """The one typed node returned for every open.

    ``store``: where persistent bitmaps live (the image's own, or a container's); ``prefix``
    picks a drive's bitmaps in a container. ``track=False`` (``bitmaps=no``) loads none:
    the enabled ones are marked in_use before the first write and left so. ``intent`` is the
    image's write-intent map (resilient mode).
    """

    def __init__(self, driver: ImageDriver, store: Qcow2BitmapStore | None = None, *,
                 policy: CheckpointPolicy | None = None, track: bool = True,
                 prefix: str = "", intent: WriteIntentMap | None = None,
                 owner: BlockOwner | None = None, node_name: str | None = None,
                 cache: str = "writeback"):
        self.driver = driver
        self.store = store
        self.format_name = driver.format_name
        self.path = driver.path
        self.readonly = driver.readonly
        self.cache = cache
        self.unmap = True  # discards reach the image (QMP's discard=unmap); False: ignored
        self.node_name = node_name or os.path.basename(driver.path)
        self.policy = policy if policy is not None else CheckpointPolicy()
        self.owner = owner if owner is not None else default_owner()
        self._lock = self.owner.lock
        self._closed = False
        self._inactive = False
        self._corrupt: str | None = None
        self._retry_at = 0.0
        self._held: list[tuple[FileLock, Perms]] = []
        self._stamp = (0, 0)
        self.listeners: list[Callable[[NodeEvent], None]] = []
        view = StoreView(store, prefix) if store is not None else None
        if store is not None:
            store.owners += 1  # from now on its bitmaps change only through self.bitmaps
        cs = getattr(driver, "cluster_size", None)
        self.bitmaps = BitmapRegistry(self.node_name, driver.size, view,
                                      readonly=driver.readonly, track=track, intent=intent,
                                      cluster_size=cs if isinstance(cs, int) else None,
                                      flush_data=driver.flush, lock=self._lock)
        self.bitmaps.listeners.append(self._bitmap_changed)
        if self.policy.timed and not self.readonly:
            self.owner.adopt(self)
        log.debug("%s: opened %s (%s, %s)", self.node_name, self.path, self.format_name,
                  "read-only" if self.readonly else "read-write")

    # ------------------------------------------------------------------ compat views
    @property
    def stats(self) -> RegistryStats:
        return self.bitmaps.stats

    @property
    def tracked_bitmaps(self) -> list[str]:
        """Stored names of the persistent bitmaps recording writes."""
        view = self.bitmaps.view
        names = self.bitmaps.tracked
        return [view.full(n) for n in names] if view is not None else names

    @property
    def recovered(self) -> list[str]:
        return self.bitmaps.recovered

    @property
    def invalidated(self) -> list[str]:
        return self.bitmaps.invalidated

    @property
    def intent(self) -> WriteIntentMap | None:
        """The write-intent map of resilient mode, when on."""
        return self.bitmaps.intent

    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def cluster_size(self) -> int | None:
        cs = getattr(self.driver, "cluster_size", None)
        return cs if isinstance(cs, int) else None

    # ------------------------------------------------------------------ events
    def subscribe(self, fn: Callable[[NodeEvent], None]) -> None:
        """Call ``fn`` (on the owner's thread) for every event of this node."""
        self.listeners.append(fn)

    def _emit(self, event: NodeEvent) -> None:
        for fn in list(self.listeners):
            try:
                fn(event)
            except Exception:
                log.exception("%s: event listener failed", self.node_name)

    def _bitmap_changed(self, what: str, lb: object) -> None:
        name = getattr(lb, "name", None)
        self._emit(NodeEvent(NodeEventKind.BITMAP_STATE, self.node_name,
                             f"bitmap '{name}' changed", bitmap=name))

    def _corrupted(self, exc: CorruptImageError) -> None:
        if self._corrupt is None:
            self._corrupt = str(exc)
            self.readonly = True
            log.error("%s: image corrupt, the node is read-only now: %s", self.node_name, exc)
            self._emit(NodeEvent(NodeEventKind.CORRUPTED, self.node_name, exc.reason,
                                 fatal=True, offset=exc.offset, size=exc.size))

    # ------------------------------------------------------------------ I/O
    def _in_range(self, offset: int, length: int) -> bool:
        """Requests the driver will refuse mark nothing (it raises its own error)."""
        return offset >= 0 and offset + length <= self.driver.size

    def _writable(self) -> None:
        if self._inactive:
            raise NodeInactiveError(f"node '{self.node_name}' is inactive")
        if self._corrupt is not None:
            raise CorruptImageError(f"node '{self.node_name}' is read-only after corruption: "
                                    f"{self._corrupt}")

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

    def write(self, offset: int, data: Buffer, *, compress: bool = False,
              fua: bool = False) -> None:
        """A guest write (``compress``: stored compressed, see the driver; ``fua``: durable
        on return), recorded in every recording bitmap first."""
        with self._lock:
            if self._inactive or self._corrupt is not None:
                self._writable()  # raises why the node takes no writes
            reg = self.bitmaps
            try:
                if reg.hooked and len(data) and self._in_range(offset, len(data)):
                    reg.before_write(offset, len(data))
                    self._driver_write(offset, data, compress)
                    self._after_write()
                else:
                    self._driver_write(offset, data, compress)
                if fua:
                    self.driver.flush()
            except CorruptImageError as exc:
                self._corrupted(exc)
                raise

    def _driver_write(self, offset: int, data: Buffer, compress: bool) -> None:
        if compress:
            self.driver.write(offset, data, compress=True)
        else:
            self.driver.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False,
                     fua: bool = False) -> None:
        with self._lock:
            if self._inactive or self._corrupt is not None:
                self._writable()  # raises why the node takes no writes
            reg = self.bitmaps
            try:
                if reg.hooked and length and self._in_range(offset, length):
                    reg.before_write(offset, length)
                    self.driver.write_zeroes(offset, length, unmap=unmap)
                    self._after_write()
                else:
                    self.driver.write_zeroes(offset, length, unmap=unmap)
                if fua:
                    self.driver.flush()
            except CorruptImageError as exc:
                self._corrupted(exc)
                raise

    def discard(self, offset: int, length: int) -> None:
        """Discard a range; with ``unmap`` off (QEMU's ``discard=ignore``) nothing happens and
        nothing is marked, as in QEMU."""
        if not self.unmap:
            return
        with self._lock:
            if self._inactive or self._corrupt is not None:
                self._writable()  # raises why the node takes no writes
            reg = self.bitmaps
            try:
                if reg.hooked and length and self._in_range(offset, length):
                    reg.before_write(offset, length)
                    self.driver.discard(offset, length)
                    self._after_write()
                else:
                    self.driver.discard(offset, length)
            except CorruptImageError as exc:
                self._corrupted(exc)
                raise

    def _after_write(self) -> None:
        if self.bitmaps.threshold_crossed(self.policy.threshold_bits):
            self.bitmaps.checkpoint()

    def flush(self) -> None:
        """Data and metadata durable, then a bitmap checkpoint."""
        with self._lock:
            self.driver.flush()
            self.bitmaps.checkpoint()

    def checkpoint(self) -> None:
        """Store every persistent bitmap's changes now and clear ``in_use`` (no data flush
        needed: the bits already cover every write issued so far, durable or not)."""
        with self._lock:
            self.bitmaps.checkpoint()

    def resize(self, new_size: int) -> None:
        """Resize the disk; bitmaps follow the new size (the grown area clean), as in QEMU
        7.2. The bits recorded so far are checkpointed first, then the stored bitmaps'
        tables and the size switch together (``Qcow2BitmapStore.resize``). In resilient mode
        the write-intent map is invalidated first and begins anew at the new size. Raises
        what the store and the driver raise; a drive whose bitmaps live in a container is
        refused (resize the drive, then ``dirtybits container rebind``)."""
        with self._lock:
            if self._inactive or self._corrupt is not None:
                self._writable()  # raises why the node takes no writes
            store = self.store
            reg = self.bitmaps
            if store is None or not store.bitmaps or self.readonly:
                self.driver.resize(new_size)
                reg.resized(new_size)
                return
            if store.img is not self.driver:
                from dirtybits.errors import UnsupportedFeatureError

                raise UnsupportedFeatureError(
                    f"the bitmaps of '{self.path}' are kept in {store.img.path}: resize the "
                    "drive, then accept it there with 'dirtybits container rebind'")
            reg.checkpoint()
            intent = reg.intent
            region = intent.rec.region_size if intent is not None and intent.rec else None
            if intent is not None:
                intent.invalidate()
            with store.by_owner():
                store.resize(new_size)
            reg.resized(store.disk_size)
            if intent is not None:
                reg.intent = self._new_intent(region)

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

    def block_status(self, offset: int, length: int) -> list[MapExtent]:
        """The driver's allocation status of ``[offset, offset+length)``, as a list."""
        with self._lock:
            return list(self.driver.block_status(offset, length))

    def allocation(self, offset: int = 0, length: int | None = None) -> list[Entry]:
        """Chain-aware block status with allocation depth over ``[offset, offset+length)``:
        qemu-img map's entries (``dirtybits.block.status``), as a list."""
        from dirtybits.block.status import map_entries

        with self._lock:
            if length is None:
                return list(map_entries(self.driver, offset))
            return list(map_entries(self.driver, offset, length))

    # ------------------------------------------------------------------ bitmaps (compat)
    def load_bitmap(self, name: str) -> DirtyBitmap:
        """A copy of a bitmap's current bits (``node.bitmaps.bits``)."""
        with self._lock:
            return self.bitmaps.bits(name)

    # ------------------------------------------------------------------ info
    def info(self) -> NodeInfo:
        """The node as queries report it, from the live objects."""
        with self._lock:
            hc = getattr(self.driver, "hc", None)
            backing = getattr(hc, "backing_file", None) if hc is not None else None
            data_file = getattr(hc, "data_file", None) if hc is not None else None
            return NodeInfo(self.node_name, self.format_name, self.path, self.driver.size,
                            self.readonly, self.cache, self.cluster_size,
                            backing if isinstance(backing, str) else None,
                            data_file if isinstance(data_file, str) else None,
                            self._corrupt is not None, self._inactive,
                            self.bitmaps.query())

    # ------------------------------------------------------------------ scheduling
    def next_due(self, now: float) -> float | None:
        """Seconds until the next timed checkpoint (<= 0: now), None when nothing is owed."""
        reg = self.bitmaps
        if not reg.open or self._closed:
            return None
        waits = []
        if self.policy.idle is not None:
            waits.append(reg.last_write + self.policy.idle - now)
        if self.policy.interval is not None:
            waits.append(reg.in_use_since + self.policy.interval - now)
        if not waits:
            return None
        return max(min(waits), self._retry_at - now)

    def run_due(self, now: float) -> None:
        """Run the timed checkpoint if it is due (called by the owner, under its lock). A
        failure is logged and emitted as an event; the bitmaps stay in_use and it is tried
        again ``RETRY_AFTER`` seconds later."""
        left = self.next_due(now)
        if left is None or left > 0:
            return
        try:
            self.bitmaps.checkpoint()
        except DirtybitsError as exc:
            self._retry_at = now + RETRY_AFTER
            log.warning("%s: checkpoint failed, bitmaps stay in use: %s", self.node_name, exc)
            self._emit(NodeEvent(NodeEventKind.CHECKPOINT_FAILED, self.node_name, str(exc)))

    # ------------------------------------------------------------------ activation
    def inactivate(self) -> None:
        """Store every persistent bitmap clean, release the image locks and refuse writes
        until ``activate`` (what QEMU does before a migration hands the image over)."""
        from dirtybits.filelock import PERM_ALL, Perms

        with self._lock:
            if self._inactive:
                return
            if not self.readonly:
                self.driver.flush()
                self.bitmaps.checkpoint()
            self._stamp = self._file_stamp()
            self._held = [(lk, lk.perms) for lk in self.driver.locks()]
            for lk, _ in self._held:
                lk.apply(Perms(0, PERM_ALL))  # hold nothing, share everything
            self._inactive = True
            log.info("%s: inactive (bitmaps stored, locks released)", self.node_name)

    def activate(self) -> None:
        """Take the locks back (``LockError`` if another process has the image now: the
        node stays inactive) and accept writes again. An image that was written meanwhile
        is refused (``NodeInactiveError``): reopen it."""
        from dirtybits.filelock import PERM_ALL, Perms

        with self._lock:
            if not self._inactive:
                return
            done = []
            try:
                for lk, perms in self._held:
                    lk.apply(perms)
                    done.append(lk)
            except BaseException:
                for lk in done:
                    lk.apply(Perms(0, PERM_ALL))
                raise
            if self._file_stamp() != self._stamp:
                for lk in done:
                    lk.apply(Perms(0, PERM_ALL))
                raise NodeInactiveError(
                    f"'{self.path}' changed while node '{self.node_name}' was inactive: its "
                    "cached metadata and bitmaps may be stale; close and open it again")
            self._held = []
            self._inactive = False

    def _file_stamp(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns

    def locks(self) -> list[FileLock]:
        return self.driver.locks()

    @property
    def inactive(self) -> bool:
        return self._inactive

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        if self._closed:
            return
        self.owner.release(self)
        with self._lock:
            self._closed = True
            if self.store is not None:
                self.store.owners -= 1
            try:
                if not self._inactive:
                    self.bitmaps.checkpoint()
            finally:
                self.driver.close()
                log.debug("%s: closed", self.node_name)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> BlockNode:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["BlockNode", "NodeEvent", "NodeEventKind", "NodeInfo", "NodeStats"]
