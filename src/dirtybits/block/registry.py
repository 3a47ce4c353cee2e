"""The bitmap registry of one block node: the only way to create, change or read its bitmaps.

Every node has one (qcow2 with or without bitmaps, raw, read-only, a drive in a container).
The CLI, the Python API and (next) QMP, exports and jobs all go through it, so it knows each
bitmap's state as QEMU reports it (recording or disabled, busy with its owner, readonly,
inconsistent) and, beyond QEMU, what is on disk and why (``DiskState`` with a reason).

How the bits are held (DESIGN.md, persistence protocol):

* Opening reads no bitmap data. An enabled persistent bitmap found at open is *grouped*: its
  bits are what is stored plus the writes since open, which are recorded once per
  granularity in a shared group bitmap (8 bitmaps of one granularity cost one update per
  write). A checkpoint ORs the group's changed chunks into each member's stored clusters.
* Anything that needs a bitmap's own bits (a query, clear, merge, disable, a successor, a
  bitmap added while open) *materializes* it: stored bits plus the group's bits, read once and
  kept; from then on the bitmap records writes itself and a checkpoint overwrites its changed
  chunks with the live bits, so a clear stays cleared.
* A persistent bitmap that has changes not yet stored is ``in_use`` on disk (marked durably
  before the first write after a checkpoint, and before an operation changes it): a crash
  leaves it inconsistent, never silently stale. Operations on persistent bitmaps end with a
  checkpoint, so what returned is on disk.

Every mutating operation is also a transaction action (``prepare``/``commit``/``abort``), and
``transaction`` runs a list of them all or nothing. Every public call runs as the node's
owner (under the owner's lock, ``BitmapRegistry.lock``): a script calling
``node.bitmaps.merge`` waits while the block thread runs a timed checkpoint, and the reverse.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from dirtybits.block.qcow2_bitmaps import BitmapOperationError, default_granularity
from dirtybits.errors import DirtybitsError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore, StoredBitmap
    from dirtybits.block.write_intent import WriteIntentMap

log = logging.getLogger(__name__)

DEFAULT_RAW_GRANULARITY = 65536  # QEMU's default when the node has no cluster size

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _owned(fn: Callable[Concatenate[BitmapRegistry, _P], _R]
           ) -> Callable[Concatenate[BitmapRegistry, _P], _R]:
    """Run the call as the node's owner (under ``lock``, re-entrant). Without it a caller's
    thread and the block thread's timed checkpoint interleave: a merge marked, the
    checkpoint cleared in_use and forgot the mark, the merged bits were never stored, and the
    bitmap read consistent on disk without them."""
    def run(self: BitmapRegistry, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return fn(self, *args, **kwargs)
    functools.update_wrapper(run, fn)
    return run


class BitmapStatus(enum.Enum):
    """What a bitmap does now (QEMU's former ``DirtyBitmapStatus``, still its meaning)."""

    ACTIVE = "active"  # recording writes
    DISABLED = "disabled"  # kept, not recording
    FROZEN = "frozen"  # has a successor (a job): the successor records, the bitmap is busy
    LOCKED = "locked"  # busy with an export or another user
    INCONSISTENT = "inconsistent"  # may miss writes: only remove (and queries) allowed


class DiskState(enum.Enum):
    """What the stored copy of a bitmap is worth, with ``BitmapInfo.reason`` saying why."""

    NONE = "none"  # not persistent
    CLEAN = "clean"  # in_use clear: the stored bits cover every write that reached the disk
    OPEN = "open"  # in_use set by this node: changes since the last checkpoint are in memory
    INCONSISTENT = "inconsistent"  # found in_use at open (a crash): may miss writes
    RECOVERED = "recovered"  # rebuilt at open from the write-intent map: a superset
    REBUILT = "rebuilt"  # rebuilt by comparing the data with a backup (``bitmap --recover``)
    DAMAGED = "damaged"  # its directory entry or table is damaged: quarantined, remove only


class Check(enum.Flag):
    """QEMU's ``bdrv_dirty_bitmap_check`` flags."""

    BUSY = enum.auto()
    READONLY = enum.auto()
    INCONSISTENT = enum.auto()
    DEFAULT = BUSY | READONLY | INCONSISTENT  # clear, merge target
    ALLOW_RO = BUSY | INCONSISTENT  # enable, disable, merge source, export


@dataclass(frozen=True)
class BitmapInfo:
    """One bitmap as queries report it (QEMU's ``BlockDirtyInfo`` plus the disk state)."""

    name: str
    granularity: int
    count: int
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool
    readonly: bool
    status: BitmapStatus
    disk_state: DiskState
    reason: str
    owner: str | None  # who holds it busy ("job backup0", "export exp0")

    def qmp(self) -> dict[str, object]:
        """The ``dirty-bitmaps`` entry of ``query-named-block-nodes``, key for key."""
        out: dict[str, object] = {"name": self.name, "recording": self.recording,
                                  "persistent": self.persistent, "busy": self.busy,
                                  "granularity": self.granularity, "count": self.count}
        if self.inconsistent:
            out["inconsistent"] = True
        return out


class ChangeFeed:
    """Independent consumers of one bitmap's changed chunks.

    The bitmap keeps one cheap change tracker (the write path's); each consumer (the
    checkpoint writer, a migration stream) holds a ``ChangeCursor``. Taking from one cursor
    drains the tracker into every cursor first, so two consumers never steal each other's
    changes.
    """

    def __init__(self, bits: DirtyBitmap, chunk_bytes: int) -> None:
        self.bits = bits
        if bits.chunk_bytes != chunk_bytes:
            bits.track_changes(chunk_bytes)
        self.nchunks = bits.cluster_count(chunk_bytes)
        self.cursors: list[ChangeCursor] = []

    def cursor(self, *, all_changed: bool = False) -> ChangeCursor:
        self.drain()
        cur = ChangeCursor(self, all_changed)
        self.cursors.append(cur)
        return cur

    def drain(self) -> None:
        chunks = self.bits.take_changed_chunks()
        if chunks:
            for cur in self.cursors:
                cur.pending[chunks] = True

    def close(self, cursor: ChangeCursor) -> None:
        self.cursors = [c for c in self.cursors if c is not cursor]


class ChangeCursor:
    """One consumer's view of which chunks changed since it last took them."""

    def __init__(self, feed: ChangeFeed, all_changed: bool) -> None:
        import numpy as np

        self.feed = feed
        self.pending: npt.NDArray[np.bool_] = np.full(feed.nchunks, all_changed, dtype=bool)

    def take(self) -> list[int]:
        """Changed chunks, ascending, forgotten here (``give_back`` if writing them fails)."""
        import numpy as np

        self.feed.drain()
        idx = [int(i) for i in np.flatnonzero(self.pending)]
        self.pending[:] = False
        return idx

    def give_back(self, chunks: Sequence[int]) -> None:
        if chunks:
            self.pending[list(chunks)] = True

    def count(self) -> int:
        import numpy as np

        self.feed.drain()
        return int(np.count_nonzero(self.pending))


class StoreView:
    """A node's window on a bitmap store: the image's own bitmaps (``prefix`` empty), or one
    drive's bitmaps inside a container (stored as ``DRIVE/NAME``; names unique per file)."""

    def __init__(self, store: Qcow2BitmapStore, prefix: str = "") -> None:
        self.store = store
        self.prefix = prefix

    def full(self, name: str) -> str:
        return self.prefix + name

    def entries(self) -> list[tuple[str, StoredBitmap]]:
        p = self.prefix
        return [(sb.name[len(p):], sb) for sb in self.store.bitmaps
                if sb.name.startswith(p) and len(sb.name) > len(p)]

    @property
    def bits_size(self) -> int:
        return self.store.disk_size


class _Group:
    """The writes since open for the grouped bitmaps of one granularity."""

    def __init__(self, granularity: int) -> None:
        self.granularity = granularity
        self.members: list[LiveBitmap] = []
        self.bits: DirtyBitmap | None = None  # made at the first write (numpy is not cheap)
        self.feed: ChangeFeed | None = None
        self.cursor: ChangeCursor | None = None


@dataclass(eq=False)
class LiveBitmap:
    """One bitmap of a node. Only the registry changes it."""

    name: str
    granularity: int
    persistent: bool
    enabled: bool
    readonly: bool = False
    inconsistent: bool = False
    disk_state: DiskState = DiskState.NONE
    reason: str = ""
    busy: str | None = None
    bits: DirtyBitmap | None = None  # None: lazy (stored, plus the group's bits if grouped)
    group: _Group | None = None
    feed: ChangeFeed | None = None
    cursor: ChangeCursor | None = None  # the checkpoint writer's
    successor: DirtyBitmap | None = None
    successor_cursor: ChangeCursor | None = None
    successor_feed: ChangeFeed | None = None
    sha: str | None = None  # the last sha256, valid while ``sha_cursor`` sees no change
    sha_cursor: ChangeCursor | None = None
    hidden: bool = False  # removed in a transaction not yet committed
    seq: int = 0

    @property
    def recording(self) -> bool:
        """QEMU's rule: enabled, or frozen with an enabled successor."""
        return self.enabled and not self.inconsistent

    @property
    def status(self) -> BitmapStatus:
        if self.inconsistent:
            return BitmapStatus.INCONSISTENT
        if self.successor is not None:
            return BitmapStatus.FROZEN
        if self.busy:
            return BitmapStatus.LOCKED
        return BitmapStatus.ACTIVE if self.enabled else BitmapStatus.DISABLED


@dataclass
class Action:
    """One step of a transaction: ``prepare`` does it (undoably), ``abort`` undoes it,
    ``commit`` makes it final. QEMU's ``TransactionActionDrv``."""

    name: str
    prepare: Callable[[], None]
    commit: Callable[[], None] = lambda: None
    abort: Callable[[], None] = lambda: None
    extra: dict[str, object] = field(default_factory=dict)
    targets: tuple[str, ...] = ()  # the bitmaps it changes (its registry's names)


class _UnionBits:
    """A frozen bitmap and its successor, serialized as their OR (what is stored meanwhile)."""

    def __init__(self, a: DirtyBitmap, b: DirtyBitmap) -> None:
        self.a, self.b = a, b

    def to_bytes(self, start: int = 0, length: int | None = None) -> bytes:
        x, y = self.a.to_bytes(start, length), self.b.to_bytes(start, length)
        return (int.from_bytes(x, "little") | int.from_bytes(y, "little")).to_bytes(
            len(x), "little")


@dataclass
class RegistryStats:
    """What the persistence protocol did (for tests, benchmarks and ``info``)."""

    in_use_marks: int = 0  # times in_use was set and synced before a write
    checkpoints: int = 0  # checkpoints that cleared in_use
    bitmap_bytes_written: int = 0  # bitmap data and table bytes written by checkpoints


class BitmapRegistry:
    """Every bitmap of one node, persistent or not, and their persistence.

    ``view`` is where persistent bitmaps live (None: nowhere, e.g. a plain raw file).
    ``track=False`` (``bitmaps=no``) loads none of the stored bitmaps: the enabled ones are
    marked in_use before the first write and left so (they would miss writes, so they say
    so). ``intent`` is the image's write-intent map (resilient mode). ``flush_data``: makes
    every write issued to the node durable, its mapping included (the driver's flush).
    ``lock``: the owner's lock (the node passes its owner's), taken by every public call.
    """

    def __init__(self, node_name: str, size: int, view: StoreView | None, *,
                 readonly: bool, track: bool = True, intent: WriteIntentMap | None = None,
                 cluster_size: int | None = None,
                 flush_data: Callable[[], None] | None = None,
                 lock: AbstractContextManager[object] | None = None) -> None:
        self.node_name = node_name
        self.flush_data = flush_data
        self.lock: AbstractContextManager[object] = lock if lock is not None \
            else threading.RLock()
        self._size = size
        self.view = view
        self.readonly = readonly
        self.stats = RegistryStats()
        self._cluster_size = cluster_size
        self._bitmaps: dict[str, LiveBitmap] = {}
        self._groups: dict[int, _Group] = {}
        self._sinks: list[DirtyBitmap] = []
        self._marked: set[str] = set()  # stored names this registry set in_use
        self._flags_unknown = False  # a flag write failed: the disk may hold any mix
        self.checkpoint_error: str | None = None  # why the last checkpoint failed
        self._slow = True  # the next write must run _prepare_write first
        self._seq = 0
        self._tx_depth = 0
        self._shared: set[str] = set()  # changed by several actions of this transaction
        self.intent = intent if intent is not None and intent.enabled else None
        self._untracked: list[str] = []  # bitmaps=no: full names marked in_use once
        self._untracked_intent = False
        self._damaged: list[StoredBitmap] = []  # enabled but damaged: in_use before a write
        self.invalidated: list[str] = []  # damaged enabled bitmaps marked in_use here
        self.recovered: list[str] = []  # bitmaps made consistent from the write-intent map
        self._bits_at_checkpoint = 0
        self.listeners: list[Callable[[str, LiveBitmap], None]] = []
        self.last_write = self.in_use_since = time.monotonic()
        if view is not None:
            self._load(view, track)
        self.hooked = False
        self._update_hooked()

    # ------------------------------------------------------------------ open
    def _load(self, view: StoreView, track: bool) -> None:
        store = view.store
        writable = not self.readonly
        intent = self.intent
        if writable and track and intent is not None:
            self.recovered = [n[len(view.prefix):] for n in intent.recover(store)
                              if n.startswith(view.prefix)]
        entries = view.entries()
        if writable:
            self._damaged = [sb for _, sb in entries if sb.problems and sb.entry.auto
                             and not sb.entry.in_use]
        if not track:
            if writable:
                self._untracked = [sb.name for _, sb in entries
                                   if store.is_usable(sb) and sb.entry.auto]
                self._untracked_intent = intent is not None and intent.valid
            return
        for name, sb in entries:
            lb = LiveBitmap(name, sb.entry.granularity, True, sb.entry.auto,
                            readonly=self.readonly, seq=self._next_seq())
            if sb.problems:
                lb.inconsistent, lb.enabled = True, False
                lb.disk_state, lb.reason = DiskState.DAMAGED, "; ".join(sb.problems)
            elif sb.in_use and sb.name not in store.ours:
                lb.inconsistent, lb.enabled = True, False
                lb.disk_state = DiskState.INCONSISTENT
                lb.reason = ("in use at open: the image was not closed cleanly, so the stored "
                             "bits may miss writes")
            elif name in self.recovered:
                lb.disk_state = DiskState.RECOVERED
                lb.reason = ("recovered at open from the write-intent map: a superset of the "
                             "writes")
            else:
                lb.disk_state, lb.reason = DiskState.CLEAN, "stored consistent"
            if lb.enabled and writable:
                g = self._groups.setdefault(lb.granularity, _Group(lb.granularity))
                g.members.append(lb)
                lb.group = g
            self._bitmaps[name] = lb

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _update_hooked(self) -> None:
        """Does a write need the registry before it reaches the driver?"""
        self.hooked = bool(any(lb.recording for lb in self._bitmaps.values())
                           or self._untracked or self._untracked_intent or self._damaged)

    def _changed(self, lb: LiveBitmap | None = None) -> None:
        self._slow = True
        self._update_hooked()
        if lb is not None:
            for fn in list(self.listeners):
                try:
                    fn("bitmap-state", lb)
                except Exception:  # a listener's bug is logged, never the request's error
                    log.exception("bitmap listener failed")

    # ------------------------------------------------------------------ lookups
    @property
    def size(self) -> int:
        return self._size

    @property
    def _bits_size(self) -> int:
        return self.view.bits_size if self.view is not None else self._size

    @property
    def chunk_bytes(self) -> int:
        return self.view.store.cluster_size if self.view is not None else 65536

    @_owned
    def names(self) -> list[str]:
        """Bitmap names, oldest first (stored ones in directory order, then added ones)."""
        return [lb.name for lb in self._live()]

    def _live(self) -> list[LiveBitmap]:
        return sorted((lb for lb in self._bitmaps.values() if not lb.hidden),
                      key=lambda b: b.seq)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def find(self, name: str) -> LiveBitmap | None:
        lb = self._bitmaps.get(name)
        return None if lb is None or lb.hidden else lb

    def get(self, name: str) -> LiveBitmap:
        """Raises ``BitmapOperationError`` ("Dirty bitmap 'N' not found"). A bitmap removed
        earlier in a transaction not yet committed is busy (QEMU: removal sets it busy until
        the commit), not missing; its name is still taken."""
        lb = self._bitmaps.get(name)
        if lb is None:
            raise BitmapOperationError(f"Dirty bitmap '{name}' not found")
        if lb.hidden:
            raise BitmapOperationError(f"Bitmap '{name}' is currently in use by another "
                                       "operation and cannot be used")
        return lb

    @property
    def tracked(self) -> list[str]:
        """Persistent bitmaps recording writes (the ones in_use between checkpoints)."""
        return [lb.name for lb in self._live() if lb.persistent and lb.recording]

    def check(self, lb: LiveBitmap, flags: Check) -> None:
        """QEMU's ``bdrv_dirty_bitmap_check``, with its texts."""
        if Check.BUSY in flags and (lb.busy or lb.successor is not None):
            raise BitmapOperationError(f"Bitmap '{lb.name}' is currently in use by another "
                                       "operation and cannot be used")
        if Check.READONLY in flags and lb.readonly:
            raise BitmapOperationError(f"Bitmap '{lb.name}' is readonly and cannot be modified")
        if Check.INCONSISTENT in flags and lb.inconsistent:
            if lb.disk_state is DiskState.DAMAGED:
                raise BitmapOperationError(
                    f"Bitmap '{lb.name}' is damaged and cannot be used ({lb.reason}); it can "
                    "only be removed")
            raise BitmapOperationError(f"Bitmap '{lb.name}' is inconsistent and cannot be used")

    # ------------------------------------------------------------------ reading
    def _materialize(self, lb: LiveBitmap) -> DirtyBitmap:
        """The bitmap's own live bits, read from disk once (plus the group's writes)."""
        if lb.bits is not None:
            return lb.bits
        from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

        if lb.inconsistent or not lb.persistent or self.view is None:
            bits = DirtyBitmap(self._bits_size, lb.granularity)
        else:
            bits = self.view.store.load(self.view.full(lb.name))
        feed = ChangeFeed(bits, self.chunk_bytes)
        lb.bits, lb.feed = bits, feed
        lb.cursor = feed.cursor()  # before the merge: it must see the chunks it changes
        g = lb.group
        if g is not None:
            if g.bits is not None:
                bits.merge_from(g.bits)  # marks the chunks the disk lacks
            g.members.remove(lb)
            lb.group = None
            if not g.members:
                del self._groups[g.granularity]
        self._slow = True
        return bits

    @_owned
    def bits(self, name: str) -> DirtyBitmap:
        """A copy of the bitmap's current bits (over the node's size). Raises
        ``BitmapOperationError`` for an unknown or inconsistent bitmap."""
        lb = self.get(name)
        self.check(lb, Check.INCONSISTENT)
        bm = self._materialize(lb).copy()
        if lb.successor is not None:
            bm.merge_from(lb.successor)
        if bm.size != self._size:
            bm.truncate(self._size)
        return bm

    def _view_bits(self, lb: LiveBitmap) -> DirtyBitmap:
        bm = self._materialize(lb)
        if lb.successor is None and bm.size == self._size:
            return bm
        out = bm.copy()
        if lb.successor is not None:
            out.merge_from(lb.successor)
        if out.size != self._size:
            out.truncate(self._size)
        return out

    @_owned
    def count(self, name: str) -> int:
        """Dirty bytes as QEMU counts them (dirty granules x granularity)."""
        lb = self.get(name)
        if lb.inconsistent:
            return 0
        return self._view_bits(lb).count()

    @_owned
    def count_bytes(self, name: str) -> int:
        """Dirty bytes within the node (runs clipped at its end), not QEMU's granule count."""
        return sum(n for _, n in self.extents(name))

    @_owned
    def sha256(self, name: str) -> str:
        """``x-debug-block-dirty-bitmap-sha256`` (works on busy and inconsistent bitmaps).

        The digest is kept with its own change cursor: asked again with no chunk changed
        since, it is not recomputed (hashing 32 MiB of a 16 TiB bitmap costs ~20 ms)."""
        lb = self.get(name)
        if lb.successor is not None:
            return self._view_bits(lb).sha256()
        bits = self._view_bits(lb)
        cur = lb.sha_cursor
        if cur is not None and cur.feed is lb.feed and lb.sha is not None and not cur.take():
            return lb.sha
        if lb.feed is not None and (cur is None or cur.feed is not lb.feed):
            if cur is not None:
                cur.feed.close(cur)
            cur = lb.sha_cursor = lb.feed.cursor()
        elif cur is not None:
            cur.take()
        lb.sha = bits.sha256()
        return lb.sha

    @_owned
    def extents(self, name: str, offset: int = 0, length: int | None = None
                ) -> list[tuple[int, int]]:
        """The dirty runs ``(offset, length)`` within ``[offset, offset+length)``, as a list
        (nothing lazy leaves the registry)."""
        lb = self.get(name)
        end = self._size if length is None else min(self._size, offset + length)
        if lb.inconsistent or offset >= end:
            return []
        return list(self._view_bits(lb).dirty_extents(offset, end - offset))

    @_owned
    def run_edges(self, name: str, offset: int, length: int) -> tuple[bool, Any]:
        """``DirtyBitmap.run_edges`` of the bitmap's current bits over ``[offset,
        offset+length)`` clipped to the node: (first run dirty, int64 array of run ends).
        Raises ``BitmapOperationError`` for an unknown or inconsistent bitmap."""
        lb = self.get(name)
        self.check(lb, Check.INCONSISTENT)
        end = min(self._size, offset + length)
        return self._view_bits(lb).run_edges(offset, max(0, end - offset))

    @_owned
    def runs(self, name: str, end: int) -> list[tuple[int, int, bool]]:
        """Alternating clean/dirty runs ``(offset, length, dirty)`` over ``[0, end)``.

        A bitmap not yet read is scanned from its stored clusters without the numpy engine
        (a one-shot dump starts about as fast as qemu-nbd); otherwise the live bits."""
        lb = self.get(name)
        self.check(lb, Check.INCONSISTENT)
        if lb.bits is None and lb.persistent and self.view is not None and (
                lb.group is None or lb.group.bits is None):
            return list(self.view.store.extents(self.view.full(name), end))
        return list(self._view_bits(lb).extents(0, end))

    @_owned
    def info(self, name: str) -> BitmapInfo:
        lb = self.get(name)
        return self._info(lb)

    def _info(self, lb: LiveBitmap) -> BitmapInfo:
        disk = lb.disk_state
        if lb.persistent and disk is DiskState.CLEAN and self.view is not None and \
                self.view.full(lb.name) in self._marked:
            disk = DiskState.OPEN
        return BitmapInfo(
            name=lb.name, granularity=lb.granularity,
            count=0 if lb.inconsistent else self._view_bits(lb).count(),
            recording=lb.recording, busy=bool(lb.busy or lb.successor is not None),
            persistent=lb.persistent, inconsistent=lb.inconsistent, readonly=lb.readonly,
            status=lb.status, disk_state=disk,
            reason=self._open_reason() if disk is DiskState.OPEN else lb.reason,
            owner=lb.busy)

    def _open_reason(self) -> str:
        if self.checkpoint_error is not None:
            return (f"in_use: the last checkpoint failed ({self.checkpoint_error}); the changes "
                    "are in memory and it is retried")
        return "changes since the last checkpoint are in memory (in_use set)"

    @_owned
    def query(self) -> list[BitmapInfo]:
        """Every bitmap, newest first (QEMU's ``dirty-bitmaps`` order)."""
        return [self._info(lb) for lb in reversed(self._live())]

    def state(self, name: str) -> BitmapInfo:
        return self.info(name)

    # ------------------------------------------------------------------ the write path
    def before_write(self, offset: int, length: int) -> None:
        """Record ``[offset, offset+length)`` in every recording bitmap and make sure each
        persistent one is in_use on disk (and, in resilient mode, the region marked): all
        durable before the driver runs."""
        if self._slow:
            self._prepare_write()
        for bits in self._sinks:
            bits.set(offset, length)
        intent = self.intent
        if intent is not None and self._marked and intent.valid:
            intent.mark(offset, length)  # durable on return
        self.last_write = time.monotonic()

    def _prepare_write(self) -> None:
        from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

        view = self.view
        sinks: list[DirtyBitmap] = []
        for g in self._groups.values():
            if g.bits is None:
                g.bits = DirtyBitmap(self._bits_size, g.granularity)
                g.feed = ChangeFeed(g.bits, self.chunk_bytes)
                g.cursor = g.feed.cursor()
            sinks.append(g.bits)
        for lb in self._live():
            if lb.recording and lb.group is None:
                if lb.successor is not None:
                    sinks.append(lb.successor)
                else:
                    sinks.append(self._materialize(lb))
        self._sinks = sinks
        if view is None:
            self._slow = False
            return
        store = view.store
        if self._damaged:  # durable before anything else: these can record nothing
            store.invalidate(self._damaged)
            self.invalidated += [sb.name[len(view.prefix):] for sb in self._damaged]
            self._damaged = []
        tracked = [view.full(n) for n in self.tracked]
        unmarked = [n for n in tracked if n not in self._marked or self._flags_unknown]
        intent = self.intent
        if tracked and intent is not None and not intent.valid:
            intent.start([sb.entry.bitmap_table_offset for sb in store.bitmaps
                          if sb.entry.in_use and sb.name not in store.ours])
        if unmarked:
            self._mark(unmarked)
            self.stats.in_use_marks += 1
        if self._untracked_intent and intent is not None:
            intent.invalidate()
            self._untracked_intent = False
        if self._untracked:
            store.set_in_use(self._untracked, True)
            self._untracked = []
        self._update_hooked()
        self._slow = False

    def _mark(self, full_names: list[str]) -> None:
        """Set in_use on these stored bitmaps, durable on return.

        After a flag write failed (here or in a checkpoint's clear) the disk may hold any mix
        of flags: then every bitmap this registry tracks or marked is written again, so none
        is left reading consistent while it records writes."""
        assert self.view is not None
        if self._flags_unknown:
            full_names = sorted(set(full_names) | self._marked |
                                {self.view.full(n) for n in self.tracked})
        if not self._marked:
            self.in_use_since = time.monotonic()
        self._flags_unknown = True  # until the write returns, any mix may be on disk
        self.view.store.set_in_use(full_names, True, force=True)
        self._marked.update(full_names)
        self._flags_unknown = False
        log.debug("%s: in_use set on %s", self.node_name, ", ".join(full_names))

    def _settle_data(self, persistent: bool) -> None:
        """Before a persistent bitmap's baseline moves forward (a clear, an abdicate, an
        add: from then on it vouches only for later writes), every write issued so far is
        made durable, its mapping included. A checkpoint only syncs (``img.sync``): a write
        that a power cut then takes back (its L2 entry never flushed, or its data, on a raw
        drive) would change the disk against the new baseline with no bit set."""
        if persistent and self.flush_data is not None and self.view is not None \
                and not self.readonly:
            self.flush_data()

    def _mark_shared(self) -> None:
        """Mark in_use (durably) the persistent bitmaps several actions of the running
        transaction change, before any of them does (see ``transaction``)."""
        fulls = []
        for name in sorted(self._shared):
            lb = self.find(name)
            if lb is not None and lb.persistent and self.view is not None and \
                    not self.readonly:
                full = self.view.full(name)
                if full not in self._marked or self._flags_unknown:
                    fulls.append(full)
        if fulls:
            self._mark(fulls)

    def _ensure_marked(self, lb: LiveBitmap) -> None:
        if lb.persistent and self.view is not None and not self.readonly:
            full = self.view.full(lb.name)
            if full not in self._marked or self._flags_unknown:
                self._mark([full])

    def dirty_bits(self) -> int:
        return sum(b.count_bits() for b in self._sinks)

    def threshold_crossed(self, limit: int | None) -> bool:
        return (limit is not None and bool(self._marked)
                and self.dirty_bits() - self._bits_at_checkpoint >= limit)

    @property
    def open(self) -> bool:
        """Is some bitmap in_use on disk because of this registry (a checkpoint is owed)?"""
        return bool(self._marked)

    # ------------------------------------------------------------------ checkpoint
    @_owned
    def checkpoint(self) -> int:
        """Store every changed chunk of every persistent bitmap and clear ``in_use``.

        Grouped bitmaps get the group's changed chunks ORed in; materialized ones get their
        changed chunks overwritten with the live bits. The bits are synced before in_use is
        cleared. On failure the chunks are handed back (a retry writes them) and the
        bitmaps stay in_use. Returns the bytes written. Raises the store's errors.
        """
        if (not self._marked and not self._flags_unknown) or self.view is None:
            return 0
        view = self.view
        store = view.store
        taken: list[tuple[ChangeCursor, list[int]]] = []
        written = 0
        try:
            for g in self._groups.values():
                if g.cursor is None or g.bits is None:
                    continue
                chunks = g.cursor.take()
                taken.append((g.cursor, chunks))
                for lb in g.members if chunks else ():
                    full = view.full(lb.name)
                    if full in store.ours:  # else never marked: nothing was written
                        written += store.write_changes(full, g.bits, chunks)
            for lb in self._bitmaps.values():
                if not lb.persistent or lb.bits is None or lb.cursor is None:
                    continue
                chunks = lb.cursor.take()
                taken.append((lb.cursor, chunks))
                src: DirtyBitmap | _UnionBits = lb.bits
                if lb.successor is not None and lb.successor_cursor is not None:
                    more = lb.successor_cursor.take()
                    taken.append((lb.successor_cursor, more))
                    chunks = sorted(set(chunks) | set(more))
                    src = _UnionBits(lb.bits, lb.successor)
                full = view.full(lb.name)
                if chunks and full in store.ours:
                    written += store.write_chunks(full, src, chunks)
            store.img.sync()  # the bits are durable before in_use says they are complete
            names = sorted(self._marked | ({view.full(n) for n in self.tracked}
                                           if self._flags_unknown else set()))
            self._flags_unknown = True  # until the clear returns, any mix may be on disk
            store.set_in_use(names, False, force=True)
            self._flags_unknown = False
            if self.intent is not None and self.intent.valid:
                self.intent.end_epoch()
        except BaseException as exc:
            for cur, chunks in taken:
                cur.give_back(chunks)
            self._slow = True  # the next write marks again what a failed flag write mixed
            self.checkpoint_error = f"{type(exc).__name__}: {exc}"
            raise
        self.checkpoint_error = None
        self._marked.clear()
        self._slow = True
        self._bits_at_checkpoint = self.dirty_bits()
        self.stats.checkpoints += 1
        self.stats.bitmap_bytes_written += written
        log.debug("%s: checkpoint of %s (%d bytes)", self.node_name, ", ".join(names),
                  written)
        return written

    def _after_op(self, lb: LiveBitmap | None = None) -> None:
        """An operation changed bitmaps: persistent changes go to disk now (unless a
        transaction will do it once at its end)."""
        self._changed(lb)
        if self._tx_depth == 0 and not self.readonly:
            self.checkpoint()

    # ------------------------------------------------------------------ transactions
    def transaction(self, actions: Sequence[Action]) -> None:
        """Run ``actions`` all or nothing (``transaction`` over this registry alone)."""
        transaction([(self, act) for act in actions])

    def _run(self, action: Action) -> None:
        self.transaction([action])

    # ------------------------------------------------------------------ actions
    def action_add(self, name: str, granularity: int | None = None, *,
                   persistent: bool = False, disabled: bool = False,
                   bits: DirtyBitmap | None = None) -> Action:
        """``block-dirty-bitmap-add`` (``bits``: start with these, for ``copy``)."""
        made: list[LiveBitmap] = []

        def prepare() -> None:
            from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

            if not name:
                raise BitmapOperationError("Bitmap name cannot be empty")
            gran = granularity if granularity is not None else (
                bits.granularity if bits is not None else self.default_granularity())
            if gran < 512 or gran & (gran - 1):
                raise BitmapOperationError("Granularity must be power of 2 and at least 512")
            full = None
            if persistent:
                full = self._check_persistable(name, gran)
            if self.find(name) is not None or name in self._bitmaps or (
                    full is not None and self.view is not None
                    and self.view.store.find(full) is not None):
                raise BitmapOperationError(f"Bitmap already exists: {name}")
            if len(name.encode()) > 1023:
                raise BitmapOperationError(f"Bitmap name too long: {name}")
            bm = DirtyBitmap(self._bits_size, gran)
            if bits is not None:
                src = bits
                if src.size != bm.size:
                    src = src.copy()
                    src.truncate(bm.size)
                bm.merge_from(src)
            lb = LiveBitmap(name, gran, persistent, not disabled, seq=self._next_seq(),
                            disk_state=DiskState.CLEAN if persistent else DiskState.NONE,
                            reason="stored consistent" if persistent else "not persistent")
            if full is not None and self.view is not None:
                if bits is None:
                    self._settle_data(True)  # a copy keeps its source's baseline
                if bits is not None and bm.count_bits():
                    with self.view.store.by_owner():
                        self.view.store.add_with_bits(full, bm, disabled=disabled)
                else:
                    with self.view.store.by_owner():
                        self.view.store.add(full, gran, disabled=disabled)
            feed = ChangeFeed(bm, self.chunk_bytes)
            lb.bits, lb.feed, lb.cursor = bm, feed, feed.cursor()
            self._bitmaps[name] = lb
            made.append(lb)
            log.info("%s: bitmap '%s' added (granularity %d, %s%s)", self.node_name, name,
                     gran, "persistent" if persistent else "transient",
                     ", disabled" if disabled else "")

        def abort() -> None:
            for lb in made:
                self._bitmaps.pop(lb.name, None)
                if lb.persistent and self.view is not None:
                    self._forget_stored(lb.name)

        return Action("block-dirty-bitmap-add", prepare, abort=abort)

    def default_granularity(self) -> int:
        if self._cluster_size:
            return default_granularity(self._cluster_size)
        return DEFAULT_RAW_GRANULARITY

    def _check_persistable(self, name: str, granularity: int) -> str:
        if self.view is None:
            raise BitmapOperationError(
                f"Can't store persistent bitmaps to {self.node_name}: Operation not supported")
        if self.readonly:
            raise BitmapOperationError(
                f"Can't make bitmap '{name}' persistent in '{self.node_name}': the node is "
                "read-only (QEMU would lose it at close)")
        full = self.view.full(name)
        try:
            self.view.store.check_new(full, granularity)
        except BitmapOperationError as exc:
            raise BitmapOperationError(
                f"Can't make bitmap '{name}' persistent in '{self.node_name}': {exc}") from exc
        return full

    def _forget_stored(self, name: str) -> list[str]:
        assert self.view is not None
        full = self.view.full(name)
        with self.view.store.by_owner():
            left = self.view.store.remove(full)
        self.view.store.ours.discard(full)
        self._marked.discard(full)
        return left

    def action_remove(self, name: str) -> Action:
        """``block-dirty-bitmap-remove`` (from disk too). ``extra["left"]``: what the store
        left allocated, in words for the user."""
        act = Action("block-dirty-bitmap-remove", lambda: None)
        target: list[LiveBitmap] = []

        def prepare() -> None:
            lb = self.get(name)
            if lb.busy or lb.successor is not None:
                self.check(lb, Check.BUSY)
            self.check(lb, Check.READONLY)
            lb.hidden = True
            target.append(lb)

        def commit() -> None:
            for lb in target:
                self._drop(lb)
                if lb.persistent and self.view is not None:
                    act.extra["left"] = self._forget_stored(lb.name)
                log.info("%s: bitmap '%s' removed", self.node_name, lb.name)

        def abort() -> None:
            for lb in target:
                lb.hidden = False

        act.prepare, act.commit, act.abort = prepare, commit, abort
        return act

    def _drop(self, lb: LiveBitmap) -> None:
        self._bitmaps.pop(lb.name, None)
        g = lb.group
        if g is not None:
            g.members.remove(lb)
            if not g.members:
                del self._groups[g.granularity]
            lb.group = None

    def _restore(self, lb: LiveBitmap, backup: DirtyBitmap) -> None:
        """Put back the bits an aborted action changed. A change like any other: in_use
        first (a checkpoint inside the transaction may have stored the changed bits and
        cleared it), so the next checkpoint stores the bits put back."""
        self._ensure_marked(lb)
        bits = self._materialize(lb)
        bits.clear()
        bits.merge_from(backup)

    def action_clear(self, name: str) -> Action:
        """``block-dirty-bitmap-clear``. A persistent bitmap whose stored copy is clean (read
        or not) is switched to an empty table at commit, copy-on-write: a crash leaves the old
        bits or none, both consistent; one not yet read is cleared without reading it. One
        already in_use is cleared in place at the next checkpoint."""
        backup: list[tuple[LiveBitmap, DirtyBitmap]] = []
        unread: list[tuple[LiveBitmap, _Group | None]] = []
        read: list[LiveBitmap] = []

        def prepare() -> None:
            from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

            lb = self.get(name)
            self.check(lb, Check.DEFAULT)
            self._settle_data(lb.persistent)
            if lb.bits is None and lb.persistent and self.view is not None and \
                    lb.name not in self._shared:
                g = lb.group
                if g is not None:
                    g.members.remove(lb)
                    lb.group = None
                bits = DirtyBitmap(self._bits_size, lb.granularity)
                feed = ChangeFeed(bits, self.chunk_bytes)
                lb.bits, lb.feed, lb.cursor = bits, feed, feed.cursor()
                unread.append((lb, g))
                self._slow = True
                return
            bits = self._materialize(lb)
            backup.append((lb, bits.copy()))
            view = self.view
            if (lb.persistent and view is not None and not self.readonly
                    and view.full(lb.name) not in self._marked and not self._flags_unknown
                    and lb.name not in self._shared):
                read.append(lb)  # stored copy clean: switched to an empty table at commit
            else:
                self._ensure_marked(lb)
            bits.clear()

        def commit() -> None:
            for lb, g in unread:
                assert self.view is not None
                with self.view.store.by_owner():
                    self.view.store.clear(self.view.full(lb.name))
                if g is not None and not g.members:
                    self._groups.pop(g.granularity, None)
            for lb in read:
                assert self.view is not None and lb.cursor is not None
                with self.view.store.by_owner():
                    self.view.store.clear(self.view.full(lb.name))
                lb.cursor.take()  # the stored copy is empty, as the live bits

        def abort() -> None:
            for lb, old in backup:
                self._restore(lb, old)
            for lb, g in unread:
                lb.bits = lb.feed = lb.cursor = None
                if g is not None:
                    g.members.append(lb)
                    lb.group = g
                self._slow = True

        return Action("block-dirty-bitmap-clear", prepare, commit, abort, targets=(name,))

    def action_enable(self, name: str, enabled: bool = True) -> Action:
        was: list[tuple[LiveBitmap, bool]] = []

        def apply(lb: LiveBitmap, on: bool) -> None:
            if lb.enabled == on:
                return
            g = lb.group
            if g is not None and g.bits is None:  # nothing recorded yet: the disk is all
                g.members.remove(lb)
                lb.group = None
                if not g.members:
                    del self._groups[g.granularity]
            elif g is not None:
                self._materialize(lb)  # a grouped bitmap leaves the group's record
            lb.enabled = on
            if lb.persistent and self.view is not None and not self.readonly:
                with self.view.store.by_owner():
                    self.view.store.set_enabled(self.view.full(lb.name), on)

        def prepare() -> None:
            lb = self.get(name)
            self.check(lb, Check.ALLOW_RO)
            was.append((lb, lb.enabled))
            apply(lb, enabled)

        def abort() -> None:
            for lb, on in was:
                apply(lb, on)

        return Action("block-dirty-bitmap-enable" if enabled else "block-dirty-bitmap-disable",
                      prepare, abort=abort, targets=(name,))

    def action_merge(self, target: str, sources: Sequence[str | tuple[BitmapRegistry, str]]
                     ) -> Action:
        """``block-dirty-bitmap-merge``: sources are names on this node or (registry, name)
        pairs on others. Granularities may differ; sizes must match.

        A persistent target whose stored copy is clean (nothing in memory it lacks) is stored
        whole at commit, copy-on-write: a crash leaves the old bits or the merged ones, both
        consistent. One already in_use is updated in place at the next checkpoint."""
        backup: list[tuple[LiveBitmap, DirtyBitmap]] = []
        whole: list[LiveBitmap] = []

        def prepare() -> None:
            if not sources:
                raise BitmapOperationError("At least one source bitmap is needed for a merge")
            lb = self.get(target)
            self.check(lb, Check.DEFAULT)
            srcs: list[DirtyBitmap] = []
            for s in sources:
                reg, sname = (self, s) if isinstance(s, str) else s
                slb = reg.get(sname)
                reg.check(slb, Check.ALLOW_RO)
                srcs.append(reg._view_bits(slb))
            bits = self._materialize(lb)
            old = bits.copy()
            merged = old.copy()
            for src in srcs:
                if src.size != self._size:
                    raise BitmapOperationError(
                        f"Bitmaps are of different sizes (destination size is {self._size}, "
                        f"source size is {src.size}) and can't be merged")
                if src.size != merged.size:
                    src = src.copy()
                    src.truncate(merged.size)
                try:
                    merged.merge_from(src)
                except DirtybitsError as exc:
                    raise BitmapOperationError(str(exc)) from exc
            if merged == old:
                return
            backup.append((lb, old))
            view = self.view
            if (lb.persistent and view is not None and not self.readonly
                    and view.full(lb.name) not in self._marked and not self._flags_unknown
                    and lb.name not in self._shared):
                whole.append(lb)
            else:
                self._ensure_marked(lb)
            bits.merge_from(merged)

        def commit() -> None:
            view = self.view
            for lb in whole:
                assert view is not None and lb.bits is not None and lb.cursor is not None
                with view.store.by_owner():
                    view.store.store(view.full(lb.name), lb.bits)
                lb.cursor.take()  # the stored copy holds these bits now

        def abort() -> None:
            for lb, old in backup:
                self._restore(lb, old)

        return Action("block-dirty-bitmap-merge", prepare, commit, abort, targets=(target,))

    def action_rename(self, name: str, new_name: str) -> Action:
        done: list[LiveBitmap] = []

        def rename(lb: LiveBitmap, old: str, new: str) -> None:
            if lb.persistent and self.view is not None:
                if self.view.full(old) in self._marked:
                    self.checkpoint()  # the store renames only a bitmap not in_use
                with self.view.store.by_owner():
                    self.view.store.rename(self.view.full(old), self.view.full(new))
            del self._bitmaps[old]
            lb.name = new
            self._bitmaps[new] = lb

        def prepare() -> None:
            lb = self.get(name)
            self.check(lb, Check.DEFAULT)
            if not new_name:
                raise BitmapOperationError("Bitmap name cannot be empty")
            if new_name in self._bitmaps or (
                    self.view is not None and self.view.store.find(self.view.full(new_name))):
                raise BitmapOperationError(f"Bitmap already exists: {new_name}")
            rename(lb, name, new_name)
            done.append(lb)

        def abort() -> None:
            for lb in done:
                rename(lb, new_name, name)

        return Action("block-dirty-bitmap-rename", prepare, abort=abort,
                      targets=(name, new_name))

    # ------------------------------------------------------------------ operations
    def add(self, name: str, granularity: int | None = None, *, persistent: bool = False,
            disabled: bool = False) -> None:
        """Add a bitmap (QEMU's default: not persistent). Raises ``BitmapOperationError``."""
        self._run(self.action_add(name, granularity, persistent=persistent,
                                  disabled=disabled))

    def remove(self, name: str) -> list[str]:
        """Remove a bitmap (and its stored copy); returns what was left allocated."""
        act = self.action_remove(name)
        self._run(act)
        left = act.extra.get("left", [])
        assert isinstance(left, list)
        return left

    def clear(self, name: str) -> None:
        self._run(self.action_clear(name))

    def enable(self, name: str) -> None:
        self._run(self.action_enable(name, True))

    def disable(self, name: str) -> None:
        self._run(self.action_enable(name, False))

    def merge(self, target: str, sources: Sequence[str | tuple[BitmapRegistry, str]]) -> None:
        self._run(self.action_merge(target, sources))

    @_owned
    def copy(self, name: str, new_name: str, *, persistent: bool = False,
             disabled: bool | None = None) -> None:
        """A new bitmap with ``name``'s bits (not persistent unless asked; enabled as the
        source unless ``disabled`` says otherwise)."""
        lb = self.get(name)
        self.check(lb, Check.INCONSISTENT)
        bits = self._view_bits(lb)
        self._run(self.action_add(new_name, lb.granularity, persistent=persistent,
                                  disabled=(not lb.enabled) if disabled is None else disabled,
                                  bits=bits))

    def rename(self, name: str, new_name: str) -> None:
        self._run(self.action_rename(name, new_name))

    @_owned
    def replace_inconsistent(self, name: str, bits: DirtyBitmap) -> None:
        """Adopt a full rebuild (``dirtybits.block.recover``) of a persistent bitmap in one
        directory switch, clearing its in_use flag. Only for bitmaps no writer holds."""
        lb = self.get(name)
        if self.view is None or not lb.persistent:
            raise BitmapOperationError(f"Bitmap '{name}' is not persistent")
        self.check(lb, Check.BUSY | Check.READONLY)
        if lb.disk_state is DiskState.DAMAGED:
            self.check(lb, Check.INCONSISTENT)
        full = self.view.full(name)
        if full in self._marked or lb.recording:
            raise BitmapOperationError(f"Bitmap '{name}' is being tracked and cannot be replaced")
        with self.view.store.by_owner():
            self.view.store.replace_inconsistent(full, bits)
        self._drop(lb)
        nlb = LiveBitmap(name, lb.granularity, True, lb.enabled, readonly=self.readonly,
                         disk_state=DiskState.REBUILT, seq=lb.seq,
                         reason="rebuilt by comparing the data with a reference")
        self._bitmaps[name] = nlb
        self._changed(nlb)

    # ------------------------------------------------------------------ successors
    @_owned
    def create_successor(self, name: str, owner: str) -> None:
        """Freeze ``name`` for a job: from now on an anonymous successor records the writes
        (QEMU's ``bdrv_dirty_bitmap_create_successor``); the bitmap is busy with ``owner``."""
        from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

        lb = self.get(name)
        if lb.successor is not None:
            raise BitmapOperationError("Cannot create a successor for a bitmap that already "
                                       "has one")
        self.check(lb, Check.BUSY | Check.INCONSISTENT)
        bits = self._materialize(lb)
        succ = DirtyBitmap(bits.size, lb.granularity)
        feed = ChangeFeed(succ, self.chunk_bytes)
        lb.successor, lb.successor_feed, lb.successor_cursor = succ, feed, feed.cursor()
        lb.busy = owner
        self._changed(lb)

    @_owned
    def frozen_bits(self, name: str) -> DirtyBitmap:
        """A copy of a frozen bitmap's bits without its successor's (what the job copies)."""
        lb = self.get(name)
        return self._materialize(lb).copy()

    @_owned
    def abdicate(self, name: str) -> None:
        """The job succeeded: the successor's bits become the bitmap (the frozen bits are
        dropped)."""
        lb = self.get(name)
        succ = lb.successor
        if succ is None:
            raise BitmapOperationError(f"Bitmap '{name}' has no successor")
        bits = self._materialize(lb)
        self._settle_data(lb.persistent)
        self._ensure_marked(lb)
        bits.clear()
        bits.merge_from(succ)
        self._end_successor(lb)
        self._after_op(lb)

    @_owned
    def reclaim(self, name: str) -> None:
        """The job failed or keeps the bits: the successor is merged back (no bit lost)."""
        lb = self.get(name)
        succ = lb.successor
        if succ is None:
            raise BitmapOperationError(f"Bitmap '{name}' has no successor")
        self._materialize(lb).merge_from(succ)
        self._end_successor(lb)
        self._after_op(lb)

    def _end_successor(self, lb: LiveBitmap) -> None:
        lb.successor = lb.successor_feed = lb.successor_cursor = None
        lb.busy = None

    @_owned
    def set_busy(self, name: str, owner: str | None) -> None:
        """Mark a bitmap busy with ``owner`` (an export, a job), or free it (None)."""
        lb = self.get(name)
        if owner is not None:
            self.check(lb, Check.ALLOW_RO)
        lb.busy = owner
        self._changed(lb)

    # ------------------------------------------------------------------ cursors
    @_owned
    def cursor(self, name: str) -> ChangeCursor:
        """An independent change cursor on ``name`` (every chunk changed at first)."""
        lb = self.get(name)
        self._materialize(lb)
        assert lb.feed is not None
        return lb.feed.cursor(all_changed=True)

    # ------------------------------------------------------------------ resize
    @_owned
    def resized(self, new_size: int) -> None:
        """The node's size changed (the store resized its bitmaps already): live bits
        follow, the grown area clean, nothing owed to disk."""
        self._size = new_size
        for g in self._groups.values():
            g.bits = g.feed = g.cursor = None
        for lb in self._bitmaps.values():
            if lb.bits is None:
                continue
            size = self._bits_size
            lb.bits.truncate(size)
            feed = ChangeFeed(lb.bits, self.chunk_bytes)
            lb.feed, lb.cursor = feed, feed.cursor()
            feed.drain()
            lb.cursor.take()
        self._bits_at_checkpoint = 0
        self._slow = True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def _shared_targets(steps: Sequence[tuple[BitmapRegistry | None, Action]]
                    ) -> dict[int, set[str]]:
    """Per registry (by id), the bitmaps that more than one action of a transaction
    changes."""
    seen: dict[tuple[int, str], int] = {}
    for reg, act in steps:
        if reg is not None:
            for name in act.targets:
                seen[(id(reg), name)] = seen.get((id(reg), name), 0) + 1
    out: dict[int, set[str]] = {}
    for (rid, name), n in seen.items():
        if n > 1:
            out.setdefault(rid, set()).add(name)
    return out


def transaction(steps: Sequence[tuple[BitmapRegistry | None, Action]]) -> None:
    """Run actions of one or more registries all or nothing (QMP's ``transaction`` across
    nodes): each is prepared in order; if one fails, those prepared are aborted in reverse
    and the error is raised; else all commit, then one checkpoint per registry stores the
    result. A failed transaction that set in_use on a bitmap (an action changed its bits
    before another failed) checkpoints too, so a refusal leaves no bitmap in_use that was not
    before (a crash would lose it). Runs under every registry's owner lock. A step without
    a registry belongs to none (an action that only refuses, say).

    On disk: an action on a bitmap no other action of the transaction changes stores its
    result whole (copy-on-write) or marks the bitmap in_use first, so a crash leaves that
    bitmap old or new, consistent, or in_use. A bitmap that several actions change (clear
    then merge, merge then disable) is marked in_use durably before any of them runs and
    stays so until the final checkpoint: a crash in between leaves it in_use (reported
    inconsistent), never consistent with half of the transaction."""
    regs: list[BitmapRegistry] = []
    for reg, _ in steps:
        if reg is not None and all(reg is not r for r in regs):
            regs.append(reg)
    with contextlib.ExitStack() as stack:
        for reg in regs:
            stack.enter_context(reg.lock)
        marked = [set(reg._marked) for reg in regs]
        done: list[Action] = []
        shared = _shared_targets(steps)
        for reg in regs:
            reg._tx_depth += 1
        try:
            try:
                for reg in regs:
                    reg._shared = shared.get(id(reg), set())
                    reg._mark_shared()
                for _, act in steps:
                    act.prepare()
                    done.append(act)
            except BaseException:
                for act in reversed(done):
                    try:
                        act.abort()
                    except Exception:
                        log.exception("aborting %s failed", act.name)
                for reg, before in zip(regs, marked, strict=True):
                    if reg._tx_depth == 1 and not reg.readonly and reg._marked - before:
                        try:
                            reg.checkpoint()
                        except DirtybitsError:
                            log.exception("%s: checkpoint after a failed transaction failed",
                                          reg.node_name)
                raise
            for act in done:
                act.commit()
        finally:
            for reg in regs:
                reg._tx_depth -= 1
                reg._shared = set()
        for reg in regs:
            reg._changed()
            if reg._tx_depth == 0 and not reg.readonly:
                reg.checkpoint()


__all__ = [
    "Action",
    "BitmapInfo",
    "BitmapRegistry",
    "BitmapStatus",
    "ChangeCursor",
    "ChangeFeed",
    "Check",
    "DiskState",
    "LiveBitmap",
    "StoreView",
    "transaction",
]
