"""Power loss: crash states built from a trace of every write and sync the engine issues.

A kill -9 keeps the page cache, so it cannot tell a missing ``fdatasync`` from a present one.
Here a workload runs to the end with the file calls of the drivers (``dirtybits.qcow2.image``,
``dirtybits.block.raw``: the only modules that write image files) traced: each ``pwrite`` /
``pwritev`` (with ``RWF_DSYNC`` or not), ``ftruncate``, hole punch (the engine's and the
snapshot module's), ``fdatasync``/``fsync``, with the engine function that issued it (its
*site*). From the trace, the disk a power cut
could leave at any moment is rebuilt:

- a write is *pending* from its issue until an ``fdatasync`` of its file completes (or, with
  RWF_DSYNC, until it completes itself); pending writes may or may not be on the disk, in any
  combination (any subset, so any reordering), and each may be *torn*: any subset of its
  512-byte sectors. The first 4 KiB of a file (the qcow2 header) lands whole or not at all:
  the one assumption, true of 4K-sector disks, as for QEMU (see the README);
- a failed ``fdatasync`` makes nothing durable: Linux drops the dirty pages it could not
  write, so its writes stay optional forever, even after a later sync succeeds.

Crash points are the moments before each sync (and each RWF_DSYNC write) completes, and the
end: every crash moment's states are among them. At each point the states tried are: nothing
pending persisted, everything, all but the writes of one site, only one site's, all but one
write, only one write, and random subsets with random tears. Identical images are judged once.

Each state is judged as a kill -9 is (``harness.verify``): ``qemu-img check`` finds no
corruption (leaks allowed), every bitmap that reads as consistent covers every granule whose
data differs from the pre-image (zero silent misses); resilient images are then reopened and
must recover every in_use bitmap; and guest data that a completed flush made durable, and that
no later request touched, is still there; so is the data of a completed FUA request
(``Recorder.durable``: its reply made its range durable), in the sectors no later request
touched.

``drop`` (sites) replays the same workload with those syncs gone, as if the code lacked them
(an RWF_DSYNC write becomes a plain one): ``test_power_loss.py`` shows that removing any single
sync or durable flag write of the persistence protocol produces a failing state.

Run longer: ``python tests/crash/powerloss.py --long`` (every workload, more states).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness
import regcrash

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
ATOMIC_HEAD = 4096  # the header sector of a 4K disk: written whole or not at all
TRACED = ("dirtybits.qcow2.image", "dirtybits.block.raw")
# frames that only carry a write or sync down: the site is the first frame above them
PLUMBING = {"_sync", "_fdatasync", "sync", "_pwrite", "_pwrite_dsync", "_pwrite_meta",
            "write_metadata_durable", "write_metadata", "_write", "_write_data",
            "_write_dirty_refblocks", "_set_header", "flush_data", "_punch"}
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)


# ---------------------------------------------------------------------------- the trace
@dataclass
class Event:
    kind: str  # write | sync | failed-sync | dropped-sync | trunc | op | flushed | durable
    #            | mark
    file: int = -1
    offset: int = 0
    data: bytes = b""
    length: int = 0
    dsync: bool = False
    site: str = ""
    dropped: bool = False  # an RWF_DSYNC write recorded as a plain one (``drop``)


@dataclass
class Trace:
    paths: list[Path] = field(default_factory=list)
    initial: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    snapshots: list[bytes] = field(default_factory=list)  # guest data at each "flushed"
    keys: dict[tuple[int, int], int] = field(default_factory=dict)

    def sites(self) -> Counter[str]:
        """Sync sites (a sync, or an RWF_DSYNC write) seen, with how often each ran."""
        return Counter(e.site for e in self.events
                       if e.kind == "sync" or (e.kind == "write" and e.dsync))


def _site() -> str:
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        if "/dirtybits/" in code.co_filename and code.co_name not in PLUMBING:
            return f"{Path(code.co_filename).stem}.{code.co_qualname}:{f.f_lineno}"
        f = f.f_back  # type: ignore[assignment]
    return "?"


class _TracingOs:
    """Looks like ``os``; records writes and syncs into ``rec`` (and performs them)."""

    def __init__(self, real: Any, rec: Recorder):
        self._real = real
        self._rec = rec

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        rec = self._rec
        if name == "pwrite":
            def pwrite(fd: int, data: Any, offset: int) -> int:
                rec.touch(fd)  # before the call: the file as it was
                n: int = attr(fd, data, offset)
                rec.write(fd, offset, bytes(memoryview(data)[:n]), False)
                return n
            return pwrite
        if name == "pwritev":
            def pwritev(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
                data = b"".join(bytes(b) for b in bufs)
                rec.touch(fd)
                n: int = attr(fd, bufs, offset, flags)
                rec.write(fd, offset, data[:n], bool(flags & _RWF_DSYNC))
                return n
            return pwritev
        if name == "ftruncate":
            def ftruncate(fd: int, length: int) -> None:
                rec.touch(fd)
                attr(fd, length)
                rec.add(Event("trunc", rec.file_of(fd), length=length, site=_site()))
            return ftruncate
        if name in ("fdatasync", "fsync"):
            def sync(fd: int) -> None:
                rec.sync(fd, attr)
            return sync
        return attr


class Recorder:
    """Traces the drivers' file calls while active (``with Recorder(...) as trace``).

    ``drop``: sync sites whose syncs are recorded as never made. ``drop_under``: function
    qualnames (``BitmapRegistry._mark``): every sync and RWF_DSYNC write made while one of
    them is on the stack is recorded as never made (one caller of a shared site); or
    ``CALLER>CALLEE`` (``BlockNode.flush>Qcow2Image.flush``): made while CALLEE, called
    directly by CALLER, is on the stack (one call of a function that others call too: the
    data flush of ``BlockNode.flush``, not the checkpoint's sync that follows it).
    ``fail_sync``: the index (among syncs) of one fdatasync that fails with EIO (and makes
    nothing durable).
    """

    def __init__(self, drop: set[str] | None = None, fail_sync: int | None = None,
                 drop_under: set[str] | None = None):
        self.trace = Trace()
        self.drop = drop or set()
        self.drop_under = drop_under or set()
        self.fail_sync = fail_sync
        self._syncs = 0
        self._real = os
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Trace:
        for name in TRACED:
            mod = importlib.import_module(name)
            if hasattr(mod, "os"):
                self._saved.append((mod, "os", mod.os))
                mod.os = _TracingOs(self._real, self)
            for attr in ("punch_hole", "_punch_hole"):
                fn = getattr(mod, attr, None)
                if fn is not None:
                    self._saved.append((mod, attr, fn))
                    setattr(mod, attr, self._punch_wrapper(fn))
        return self.trace

    def __exit__(self, *exc: object) -> None:
        for mod, attr, value in reversed(self._saved):
            setattr(mod, attr, value)
        self._saved.clear()

    def _punch_wrapper(self, fn: Callable[..., bool]) -> Callable[..., bool]:
        def punch(fd: int, offset: int, length: int) -> bool:
            self.touch(fd)
            done = fn(fd, offset, length)
            if done:  # reads as zeros from now on: a write of zeros, as far as the disk goes
                self.add(Event("write", self.file_of(fd), offset, bytes(length), site=_site()))
            return done
        return punch

    # -- bookkeeping
    def file_of(self, fd: int) -> int:
        st = self._real.fstat(fd)
        return self.trace.keys[(st.st_dev, st.st_ino)]

    def touch(self, fd: int) -> None:
        """First sight of a file: remember what it held before anything was written."""
        st = self._real.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key not in self.trace.keys:
            self.trace.keys[key] = len(self.trace.paths)
            path = Path(self._real.readlink(f"/proc/self/fd/{fd}"))
            self.trace.paths.append(path)
            self.trace.initial.append(path.read_bytes())

    def add(self, ev: Event) -> None:
        self.trace.events.append(ev)

    def _dropped(self, site: str) -> bool:
        if site in self.drop:
            return True
        if self.drop_under:
            f = sys._getframe(2)
            while f is not None:
                name = f.f_code.co_qualname
                if name in self.drop_under:
                    return True
                up = f.f_back
                if up is not None and f"{up.f_code.co_qualname}>{name}" in self.drop_under:
                    return True
                f = f.f_back  # type: ignore[assignment]
        return False

    def write(self, fd: int, offset: int, data: bytes, dsync: bool) -> None:
        if not data:
            return
        site = _site()
        dropped = dsync and self._dropped(site)
        if dropped:
            dsync = False
        self.add(Event("write", self.file_of(fd), offset, data, dsync=dsync, site=site,
                       dropped=dropped))

    def sync(self, fd: int, real_sync: Callable[[int], None]) -> None:
        self.touch(fd)
        site = _site()
        index = self._syncs
        self._syncs += 1
        if index == self.fail_sync:
            self.add(Event("failed-sync", self.file_of(fd), site=site))
            raise OSError(5, os.strerror(5))
        real_sync(fd)
        # a dropped sync stays in the trace as a marker without effect
        self.add(Event("dropped-sync" if self._dropped(site) else "sync", self.file_of(fd),
                       site=site))

    # -- markers from the workload
    def op(self, offset: int, length: int) -> None:
        """A guest request starts: its range may change from here on."""
        self.add(Event("op", offset=offset, length=length))

    def flushed(self, guest: bytes) -> None:
        """A flush returned: ``guest`` (the model's data) is durable."""
        self.trace.snapshots.append(guest)
        self.add(Event("flushed", length=len(self.trace.snapshots) - 1))

    def durable(self, offset: int, data: bytes) -> None:
        """A FUA request returned: ``data`` at ``offset`` is durable (until a later request
        touches it; a later completed flush takes over)."""
        self.add(Event("durable", offset=offset, data=bytes(data), length=len(data)))

    def mark(self, **note: Any) -> None:
        """A snapshot or registry operation begins or ends (``note``: what the judge needs
        to know)."""
        self.add(Event("mark", data=json.dumps(note).encode()))


# ---------------------------------------------------------------------------- crash states
@dataclass
class Unit:
    """A piece of a write that reaches the disk whole or not at all."""

    file: int
    offset: int
    data: bytes
    write: int  # index of its write event
    site: str


def _units(ev: Event, index: int) -> list[Unit]:
    out = []
    pos, end = ev.offset, ev.offset + len(ev.data)
    while pos < end:
        step = ATOMIC_HEAD if pos < ATOMIC_HEAD else SECTOR
        nxt = min(end, (pos // step + 1) * step)
        out.append(Unit(ev.file, pos, ev.data[pos - ev.offset:nxt - ev.offset], index, ev.site))
        pos = nxt
    return out


@dataclass
class Point:
    """A crash moment: what is durable, what is pending, and what the guest may expect."""

    index: int  # events before this one completed
    durable: list[bytearray]
    sizes: list[int]
    pending: list[Unit]  # in issue order
    flushed: int  # snapshot index of the last completed flush (-1: none)
    touched: list[tuple[int, int]]  # guest ranges requested since that flush
    # no crash point between the last completed flush and this one (when judged: and the
    # state is the durable one only, as that flush left it)
    first_after_flush: bool = False
    # completed FUA requests since that flush: (offset, data, how many ``touched`` ranges
    # came before it: the later ones may change its sectors)
    fua: list[tuple[int, bytes, int]] = field(default_factory=list)


def crash_points(trace: Trace) -> Iterator[Point]:
    """The state before every sync / RWF_DSYNC write completes, and at the end."""
    durable = [bytearray(b) for b in trace.initial]
    sizes = [len(b) for b in trace.initial]
    pending: list[Unit] = []
    limbo: list[Unit] = []  # writes a failed sync dropped: optional forever
    pending_sizes: dict[int, int] = {}
    flushed, touched, fresh = -1, [], False
    fua: list[tuple[int, bytes, int]] = []
    trace_events = trace.events
    for i, ev in enumerate(trace_events):
        if ev.kind == "sync" or (ev.kind == "write" and ev.dsync):
            extra = _units(ev, i) if ev.kind == "write" else []
            yield Point(i, durable, sizes, limbo + pending + extra, flushed, list(touched),
                        fresh, list(fua))
            fresh = False
        if ev.kind == "write":
            units = _units(ev, i)
            if ev.dsync:
                covered = {(u.file, u.offset) for u in units}
                pending = [u for u in pending if (u.file, u.offset) not in covered]
                limbo = [u for u in limbo if (u.file, u.offset) not in covered]
                for u in units:
                    _apply(durable, sizes, u)
            else:
                pending.extend(units)
        elif ev.kind == "sync":
            keep = []
            for u in pending:
                if u.file == ev.file:
                    _apply(durable, sizes, u)
                else:
                    keep.append(u)
            pending = keep
            if ev.file in pending_sizes:
                _truncate(durable, sizes, ev.file, pending_sizes.pop(ev.file))
        elif ev.kind == "failed-sync":
            limbo += [u for u in pending if u.file == ev.file]
            pending = [u for u in pending if u.file != ev.file]
        elif ev.kind == "trunc":
            pending_sizes[ev.file] = ev.length
        elif ev.kind == "op":
            touched.append((ev.offset, ev.length))
        elif ev.kind == "flushed":
            flushed, touched, fresh, fua = ev.length, [], True, []
        elif ev.kind == "durable":
            fua.append((ev.offset, ev.data, len(touched)))
    yield Point(len(trace_events), durable, sizes, limbo + pending, flushed, list(touched),
                fresh, list(fua))


def _apply(files: list[bytearray], sizes: list[int], u: Unit) -> None:
    buf = files[u.file]
    end = u.offset + len(u.data)
    if len(buf) < end:
        buf.extend(bytes(end - len(buf)))
    buf[u.offset:end] = u.data
    sizes[u.file] = max(sizes[u.file], end)


def _truncate(files: list[bytearray], sizes: list[int], f: int, length: int) -> None:
    buf = files[f]
    if len(buf) > length:
        del buf[length:]
    else:
        buf.extend(bytes(length - len(buf)))
    sizes[f] = length


def choices(point: Point, rng: random.Random, randoms: int,
            exhaustive_writes: int = 12) -> Iterator[tuple[str, list[Unit]]]:
    """(name, units persisted) for the states tried at one crash point."""
    pend = point.pending
    yield "none", []
    if not pend:
        return
    yield "all", pend
    sites = sorted({u.site for u in pend})
    if len(sites) > 1:
        for s in sites:
            yield f"all-but-site {s}", [u for u in pend if u.site != s]
            yield f"only-site {s}", [u for u in pend if u.site == s]
    writes = sorted({u.write for u in pend})
    if len(writes) > 1:
        picked = writes if len(writes) <= exhaustive_writes else rng.sample(writes,
                                                                            exhaustive_writes)
        for w in picked:
            yield f"all-but-write {w}", [u for u in pend if u.write != w]
            yield f"only-write {w}", [u for u in pend if u.write == w]
    for r in range(randoms):
        keep, tear = rng.random(), rng.random()
        fate = {w: rng.random() for w in writes}
        chosen = []
        for u in pend:
            x = fate[u.write]
            if x < keep * (1 - tear) or (x < keep and rng.random() < 0.5):
                chosen.append(u)
        yield f"random {r}", chosen


def build(point: Point, units: list[Unit]) -> list[bytearray]:
    files = [bytearray(b) for b in point.durable]
    sizes = list(point.sizes)
    for u in units:  # in issue order: a later write of a sector wins over an earlier one
        _apply(files, sizes, u)
    return files


# ---------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """A named run: prepares its files, runs traced, and judges a crash state."""

    name: str
    template: str | None  # harness template the image starts from
    run: Callable[[Any, Recorder], None]  # (context, recorder)
    kind: str = "image"  # image | resilient | recovery | container | snapshot | registry


NO_TIMERS = {"interval": None, "idle": None, "threshold_bits": None}


class Guest:
    """The node under test plus a model of the guest data (the oracle for durability).

    ``carry_on``: a request that fails (a failed sync) is reported to nobody and the steps go
    on, as a caller that retries would: flushes and checkpoints are then tried again.
    """

    def __init__(self, node: Any, rec: Recorder, model: bytearray, carry_on: bool = False):
        self.node, self.rec, self.model = node, rec, model
        self.carry_on = carry_on
        self.errors: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if name in ("write", "zero", "discard", "flush", "checkpoint") \
                and object.__getattribute__(self, "carry_on"):
            def tolerant(*args: Any, **kw: Any) -> None:
                from dirtybits.errors import DirtybitsError

                try:
                    attr(*args, **kw)
                except DirtybitsError as exc:
                    self.errors.append(f"{name}: {exc}")
            return tolerant
        return attr

    def checkpoint(self) -> None:
        self.node.checkpoint()

    def write(self, offset: int, data: bytes, compress: bool = False) -> None:
        self.rec.op(offset, len(data))
        if compress:
            self.node.write(offset, data, compress=True)
        else:
            self.node.write(offset, data)
        self.model[offset:offset + len(data)] = data

    def zero(self, offset: int, length: int, unmap: bool = False) -> None:
        self.rec.op(offset, length)
        self.node.write_zeroes(offset, length, unmap=unmap)
        self.model[offset:offset + length] = bytes(length)

    def discard(self, offset: int, length: int) -> None:
        self.rec.op(offset, length)  # contents after a discard are unspecified
        self.node.discard(offset, length)
        self.model[offset:offset + length] = self.node.read(offset, length)

    def flush(self) -> None:
        self.node.flush()
        self.rec.flushed(bytes(self.model))

    def resize(self, size: int) -> None:
        self.node.resize(size)
        self.model.extend(bytes(size - len(self.model)))
        self.rec.flushed(bytes(self.model))  # a resize flushes

    def close(self) -> None:
        from dirtybits.errors import DirtybitsError

        try:
            self.node.close()
        except DirtybitsError as exc:
            if not self.carry_on:
                raise
            self.errors.append(f"close: {exc}")
        else:
            self.rec.flushed(bytes(self.model))
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} failed requests, first: {self.errors[0]}")


def guest_steps(g: Guest, size: int, seed: int, ops: int, grow: int = 0) -> None:
    """The fixed steps every path runs (each kind of request, a checkpoint, a flush), then
    ``ops`` random requests with flushes and checkpoints among them; ``grow``: the disk grows
    by this much halfway through (the bitmaps follow), the requests then use all of it."""
    rng = random.Random(seed)
    g.write(5 * size // 8 + 4096, rng.randbytes(70000))  # allocating, two clusters
    g.write(100 * KiB, rng.randbytes(8192))  # over pre-image data
    g.zero(size // 8, 128 * KiB, unmap=True)
    g.discard(size // 8 + 192 * KiB, 64 * KiB)
    g.checkpoint()
    g.write(7 * size // 8, rng.randbytes(1536))
    g.flush()
    g.write(3 * size // 8 + 512, rng.randbytes(20480))
    for i in range(ops):
        if grow and i == ops // 2:
            g.resize(size + grow)
            size += grow
        r = rng.random()
        length = rng.choice((512, 4096, rng.randrange(1, 40) * 4096))
        offset = rng.randrange(0, (size - length) // 512) * 512
        if r < 0.6:
            g.write(offset, rng.randbytes(length))
        elif r < 0.7:
            g.zero(offset, length, unmap=rng.random() < 0.5)
        elif r < 0.75:
            g.discard(offset, length)
        elif r < 0.87:
            g.checkpoint()
        else:
            g.flush()
    g.write(size // 2, rng.randbytes(65536))
    g.close()


def compressed_steps(g: Guest, size: int, seed: int, ops: int, cs: int = 64 * KiB) -> None:
    """Compressed writes (qcow2_alloc_bytes packing) among the other requests: into new
    areas, over pre-image data and over compressed clusters (the old ones are released),
    compressed clusters zeroed and discarded (their shared host clusters freed in the end)."""
    rng = random.Random(seed)

    def text(n: int) -> bytes:
        unit = bytes(rng.choices(b"abcdefgh \n", k=1024))
        return (unit * (n // len(unit) + 1))[:n]

    g.write(5 * size // 8, text(3 * cs), compress=True)  # new: packed into one host cluster
    g.write(0, text(2 * cs), compress=True)  # over pre-image data: released at the flush
    g.checkpoint()
    g.flush()
    g.write(5 * size // 8 + cs, text(cs), compress=True)  # over a compressed cluster
    g.zero(5 * size // 8, cs, unmap=True)
    g.write(100 * KiB, rng.randbytes(8192))  # plain, over pre-image data
    g.flush()
    for _ in range(ops):
        r = rng.random()
        if r < 0.4:
            n = rng.randrange(1, 9) * cs
            offset = rng.randrange(0, (size - n) // cs) * cs
            g.write(offset, text(n) if rng.random() < 0.85 else rng.randbytes(n),
                    compress=True)
            continue
        length = rng.choice((512, 4096, rng.randrange(1, 40) * 4096))
        offset = rng.randrange(0, (size - length) // 512) * 512
        if r < 0.6:
            g.write(offset, rng.randbytes(length))
        elif r < 0.7:
            g.zero(offset, length, unmap=rng.random() < 0.5)
        elif r < 0.75:
            g.discard(offset, length)
        elif r < 0.87:
            g.checkpoint()
        else:
            g.flush()
    g.write(size // 2, text(cs), compress=True)
    g.close()


def _compressed_run(ctx: Any, rec: Recorder) -> None:
    import dirtybits

    model = bytearray(ctx.tpl.pre.tobytes())
    node = dirtybits.open(str(ctx.image), checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
    compressed_steps(Guest(node, rec, model), ctx.tpl.spec.size, ctx.seed, ctx.ops,
                     ctx.tpl.spec.cluster_size)


def _image_run(ctx: Any, rec: Recorder) -> None:
    import dirtybits

    model = bytearray(ctx.tpl.pre.tobytes())
    node = dirtybits.open(str(ctx.image), checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
    guest_steps(Guest(node, rec, model, rec.fail_sync is not None), ctx.tpl.spec.size,
                ctx.seed, ctx.ops)


def _extl2_run(ctx: Any, rec: Recorder, bitmaps: str = "no") -> None:
    """Extended L2 entries: requests on subcluster edges (2 KiB in 64 KiB clusters) over the
    pre-image's data, holes and zero clusters, then the common steps. Untracked by default:
    the engine's own ordering and syncs alone keep the image sound (and the last flush must
    leave no leak); ``_extl2_tracking_run`` adds the bitmaps."""
    import dirtybits

    model = bytearray(ctx.tpl.pre.tobytes())
    node = dirtybits.open(str(ctx.image), bitmaps=bitmaps,
                          checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
    g = Guest(node, rec, model)
    rng = random.Random(ctx.seed)
    size = ctx.tpl.spec.size
    g.write(9 * MiB + 1000, rng.randbytes(3000))  # a new cluster, subclusters 0-1 only
    g.write(9 * MiB + 6 * KiB, rng.randbytes(2048))  # in place: one more subcluster
    g.zero(9 * MiB + 1024, 512)  # partial subcluster, not zero around: written
    g.zero(9 * MiB + 32 * KiB, 8 * KiB)  # zero bits in an allocated cluster
    g.flush()
    g.write(9 * MiB + 33 * KiB, rng.randbytes(700))  # COW of a zero subcluster's edges
    g.write(12 * MiB - 512, rng.randbytes(5000))  # over a cluster edge, two allocations
    g.discard(9 * MiB, 64 * KiB)
    guest_steps(g, size, ctx.seed, ctx.ops)


def _extl2_tracking_run(ctx: Any, rec: Recorder) -> None:
    _extl2_run(ctx, rec, bitmaps="auto")


def _resize_run(ctx: Any, rec: Recorder) -> None:
    """Tracking, with the disk grown halfway (bitmaps and resilient map follow)."""
    import dirtybits

    model = bytearray(ctx.tpl.pre.tobytes())
    node = dirtybits.open(str(ctx.image), checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
    guest_steps(Guest(node, rec, model), ctx.tpl.spec.size, ctx.seed, ctx.ops, grow=8 * MiB)


def _untracked_run(ctx: Any, rec: Recorder) -> None:
    """``bitmaps="no"``: the enabled bitmaps are marked in_use once, and only the engine's
    own ordering and syncs keep the image sound."""
    import dirtybits

    model = bytearray(ctx.tpl.pre.tobytes())
    node = dirtybits.open(str(ctx.image), bitmaps="no",
                          checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
    guest_steps(Guest(node, rec, model), ctx.tpl.spec.size, ctx.seed, ctx.ops)


def _recovery_run(ctx: Any, rec: Recorder) -> None:
    """Rebuild the bitmaps a killed writer left in_use, by comparing with the backup."""
    from dirtybits.block.open import open_image
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.block.recover import recover_bitmap
    from dirtybits.qcow2.image import Qcow2Image

    with Qcow2Image.open(str(ctx.image), keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        ref = open_image(str(ctx.backup), "raw", readonly=True)
        try:
            for name in ctx.enabled:
                recover_bitmap(store, name, ref)
        finally:
            ref.close()


def _container_run(ctx: Any, rec: Recorder) -> None:
    import dirtybits
    from dirtybits.block.container import open_drive

    model = bytearray(ctx.pre_raw)
    node = open_drive(str(ctx.container), str(ctx.raw),
                      checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
    guest_steps(Guest(node, rec, model), len(model), ctx.seed, ctx.ops)


class SnapBook:
    """Snapshot operations through ``dirtybits.block.snapshot`` (what ``dirtybits snapshot``
    runs), each between a ``begin`` and an ``end`` mark that carry the snapshot table before
    and after (IDs, names, the digest of each snapshot's data) and the active data's digest."""

    def __init__(self, rec: Recorder, path: Path, model: bytearray):
        self.rec, self.path, self.model = rec, path, model
        self.table: list[tuple[list[str], str]] = []  # ([id, name], digest)
        self.data: dict[str, bytes] = {}  # id -> the snapshot's guest data

    def _begin(self, op: str) -> None:
        self.rec.mark(kind="begin", op=op, table=self.table,
                      active=hashlib.sha256(self.model).hexdigest())

    def _end(self, op: str) -> None:
        self.rec.mark(kind="end", op=op, table=self.table,
                      active=hashlib.sha256(self.model).hexdigest())

    def create(self, name: str) -> None:
        from dirtybits.block.snapshot import create_snapshot

        self._begin("create")
        sn = create_snapshot(str(self.path), name)
        self.table = [*self.table, ([sn.id_str, name], hashlib.sha256(self.model).hexdigest())]
        self.data[sn.id_str] = bytes(self.model)
        self._end("create")

    def delete(self, name: str) -> None:
        from dirtybits.block.snapshot import delete_snapshot

        self._begin("delete")
        delete_snapshot(str(self.path), name)
        i = next(i for i, (k, _) in enumerate(self.table) if k[1] == name)
        self.table = self.table[:i] + self.table[i + 1:]
        self._end("delete")

    def apply(self, name: str) -> None:
        from dirtybits.block.snapshot import apply_snapshot

        self._begin("apply")
        self.rec.op(0, len(self.model))  # the whole disk may change
        apply_snapshot(str(self.path), name)
        sid = next(k[0] for k, _ in self.table if k[1] == name)
        self.model[:] = self.data[sid]
        self.rec.flushed(bytes(self.model))
        self._end("apply")


def _session(ctx: Any, rec: Recorder, model: bytearray, rng: random.Random, n: int,
             tracked: bool) -> None:
    """Open, ``n`` guest requests (writes over what the snapshots share, zeroes, discards,
    flushes, checkpoints), close."""
    import dirtybits

    size = len(model)
    node = dirtybits.open(str(ctx.image), bitmaps="auto" if tracked else "no",
                          checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
    g = Guest(node, rec, model)
    for _ in range(n):
        r = rng.random()
        length = rng.choice((512, 4096, 6144, rng.randrange(1, 24) * 4096))
        offset = rng.randrange(0, (size - length) // 512) * 512
        if r < 0.65:
            g.write(offset, rng.randbytes(length))
        elif r < 0.75:
            g.zero(offset, length, unmap=rng.random() < 0.5)
        elif r < 0.8:
            g.discard(offset, length)
        elif r < 0.9 and tracked:
            g.checkpoint()
        else:
            g.flush()
    g.close()


def _snapshot_run(ctx: Any, rec: Recorder) -> None:
    """Tracked writes, snapshot a, copy-on-write writes, snapshot b, more, delete a, more:
    bitmaps kept through the snapshot operations (QEMU refuses apply with bitmaps)."""
    model = bytearray(ctx.tpl.pre.tobytes())
    rng = random.Random(ctx.seed)
    book = SnapBook(rec, ctx.image, model)
    n = max(4, ctx.ops // 4)
    _session(ctx, rec, model, rng, n, True)
    book.create("a")
    _session(ctx, rec, model, rng, n, True)
    book.create("b")
    _session(ctx, rec, model, rng, n, True)
    book.delete("a")
    _session(ctx, rec, model, rng, n, True)


def _snapshot_apply_run(ctx: Any, rec: Recorder) -> None:
    """An image without bitmaps: snapshots a and b among writes; delete a (b's tables get
    COPIED where a's references went), apply b (the flags must be cleared before the
    switch), write, snapshot c, write, apply c, delete b, write."""
    model = bytearray(ctx.tpl.pre.tobytes())
    rng = random.Random(ctx.seed)
    book = SnapBook(rec, ctx.image, model)
    n = max(3, ctx.ops // 6)
    _session(ctx, rec, model, rng, n, False)
    book.create("a")
    _session(ctx, rec, model, rng, n, False)
    book.create("b")
    _session(ctx, rec, model, rng, n, False)
    book.delete("a")
    book.apply("b")
    _session(ctx, rec, model, rng, n, False)
    book.create("c")
    _session(ctx, rec, model, rng, n, False)
    book.apply("c")
    book.delete("b")
    _session(ctx, rec, model, rng, n, False)


def _registry_run(ctx: Any, rec: Recorder) -> None:
    """The registry's operations on the open node among guest requests
    (``regcrash.steps``): each step between marks ``b=k`` and ``e=k`` (begun, returned),
    so the judge knows which had returned at a crash point."""
    import dirtybits

    todo = regcrash.steps(ctx.seed, ctx.tpl.spec.size, between=max(2, ctx.ops // 15))
    ctx.extra["steps"] = todo
    model = bytearray(ctx.tpl.pre.tobytes())
    node = dirtybits.open(str(ctx.image), checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
    for k, step in enumerate(todo):
        rec.mark(b=k)
        op = step["op"]
        if op in regcrash.REQUESTS:
            rec.op(step["off"], step["len"])
        regcrash.execute(node, step)
        if op == "write":
            model[step["off"]:step["off"] + step["len"]] = step["data"]
        elif op == "zero":
            model[step["off"]:step["off"] + step["len"]] = bytes(step["len"])
        elif op in ("flush", "close"):
            rec.flushed(bytes(model))
        rec.mark(e=k)


# small disks: every crash state reads each snapshot whole; 512-byte clusters give a 1 KiB
# L1 table (two sectors, which a power cut may tear) and many L2 tables
SNAPSHOT_TEMPLATES = (
    harness.TemplateSpec("s4k", 4 * KiB, {"g512": 512, "g16k": 16 * KiB,
                                          harness.FROZEN: 64 * KiB}, size=8 * MiB),
    harness.TemplateSpec("s512", 512, {"g512": 512, "g16k": 16 * KiB,
                                       harness.FROZEN: 64 * KiB}, size=4 * MiB),
)

WORKLOADS = {
    "tracking-c64k": Workload("tracking-c64k", "c64k", _image_run),
    "tracking-c4k": Workload("tracking-c4k", "c4k", _image_run),
    "resilient-r1m": Workload("resilient-r1m", "r1m", _image_run, "resilient"),
    "resilient-r64k": Workload("resilient-r64k", "r64k", _image_run, "resilient"),
    "untracked-c4k": Workload("untracked-c4k", "c4k", _untracked_run),
    "resize-c4k": Workload("resize-c4k", "c4k", _resize_run),
    "resize-r1m": Workload("resize-r1m", "r1m", _resize_run, "resilient"),
    "recovery": Workload("recovery", "c64k", _recovery_run, "recovery"),
    "container": Workload("container", None, _container_run, "container"),
    "extl2": Workload("extl2", "x64k", _extl2_run),
    "extl2-tracking": Workload("extl2-tracking", "x64k", _extl2_tracking_run),
    "compressed": Workload("compressed", "c64k", _compressed_run),
    "snapshot": Workload("snapshot", "s4k", _snapshot_run, "snapshot"),
    # a one-sector L1 table, switched in place; a two-sector one, moved (512-byte clusters)
    "snapshot-apply": Workload("snapshot-apply", "s4k", _snapshot_apply_run, "snapshot"),
    "snapshot-apply-s512": Workload("snapshot-apply-s512", "s512", _snapshot_apply_run,
                                    "snapshot"),
    "registry": Workload("registry", regcrash.TEMPLATE.name, _registry_run, "registry"),
}


@dataclass
class Context:
    """Files of one workload (in ``work``) and what its judge needs."""

    workload: Workload
    work: Path
    seed: int
    ops: int
    tpl: Any = None
    image: Path = Path()
    backup: Path = Path()
    enabled: tuple[str, ...] = ()
    container: Path = Path()
    raw: Path = Path()
    pre_raw: bytes = b""
    pre_container: bytes = b""
    originals: dict[Path, bytes] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # what a workload's judge keeps


def prepare(w: Workload, templates: dict[str, Any], work: Path, seed: int,
            ops: int) -> Context:
    """Fresh files for one traced run of ``w``."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ctx = Context(w, work, seed, ops)
    if w.template is not None:
        ctx.tpl = templates[w.template]
        ctx.image = work / "disk.qcow2"
        shutil.copyfile(ctx.tpl.qcow2, ctx.image)
        ctx.enabled = tuple(n for n in ctx.tpl.spec.bitmaps
                            if n not in (harness.FROZEN, harness.STALE))
    if w.name.startswith("snapshot-apply"):  # QEMU refuses apply with bitmaps
        for name in ctx.tpl.spec.bitmaps:
            harness.sh("qemu-img", "bitmap", "--remove", str(ctx.image), name)
        ctx.enabled = ()
    if w.kind == "recovery":
        # the backup is the pre-image; then a writer is killed: its bitmaps stay in_use
        ctx.backup = work / "backup.raw"
        shutil.copyfile(ctx.tpl.qcow2.with_suffix(".raw"), ctx.backup)
        harness.sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 192k",
                   "-c", "write -P 0x5b 6M 4k", "-c", "sigraise 9", str(ctx.image),
                   ok=(-9, 137))
    if w.kind == "container":
        from dirtybits.block.container import Container

        ctx.raw = work / "drive.raw"
        rng = random.Random(seed)
        data = bytearray(8 * MiB)
        data[0:1 * MiB] = rng.randbytes(1 * MiB)
        data[4 * MiB:5 * MiB] = rng.randbytes(1 * MiB)
        ctx.raw.write_bytes(bytes(data))
        ctx.pre_raw = bytes(data)
        ctx.container = work / "bitmaps.qcow2"
        Container.create(str(ctx.container), 16 * MiB)
        with Container.open(str(ctx.container)) as c:
            c.attach(str(ctx.raw), "d1")
            c.add_bitmap("d1", "g64k", 64 * KiB)
            c.add_bitmap("d1", "g4k", 4 * KiB)
            c.add_bitmap("d1", "off", 64 * KiB, disabled=True)
        ctx.enabled = ("d1/g64k", "d1/g4k")
    return ctx


def trace_run(ctx: Context, drop: set[str] | None = None, fail_sync: int | None = None,
              drop_under: set[str] | None = None) -> tuple[Trace, str | None]:
    """Run the workload traced; (trace, the error it ended with, if any)."""
    rec = Recorder(drop, fail_sync, drop_under)
    error = None
    with rec as trace:
        try:
            ctx.workload.run(ctx, rec)
        except Exception as exc:  # a failed sync surfaces here: judge what it left
            error = f"{type(exc).__name__}: {exc}"
    return trace, error


# ---------------------------------------------------------------------------- judging
def judge(ctx: Context, trace: Trace, point: Point, files: list[bytearray],
          scratch: Path) -> list[str]:
    """Problems of one crash state (empty: it passes)."""
    scratch.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, p in enumerate(trace.paths):
        target = scratch / p.name
        target.write_bytes(files[i])
        names[p] = target
    w = ctx.workload
    problems: list[str] = []
    try:
        if w.kind in ("image", "resilient"):
            res = harness.KillResult(seed=ctx.seed, template=ctx.tpl.spec.name, mode="power")
            image = names.get(ctx.image, scratch / ctx.image.name)
            if ctx.image not in names:
                shutil.copyfile(ctx.image, image)
            harness.verify(image, ctx.tpl, res, quiet=False, qemu_sample=False)
            problems += res.problems
            if point.first_after_flush and res.leaks:  # (only with nothing persisted since)
                problems.append(f"{res.leaks} leaked clusters right after a completed flush")
            if not problems:
                problems += _durability(trace, point, _guest_qcow2(image))
            if not problems and w.kind == "resilient":
                plan = harness.KillPlan(seed=ctx.seed, template=ctx.tpl.spec.name,
                                        policy=0, mode="power", max_ops=0, resilient=True)
                res2 = harness.KillResult(seed=ctx.seed, template=ctx.tpl.spec.name,
                                          mode="power", in_use=list(res.in_use))
                harness.reopen_and_verify(image, ctx.tpl, plan, res2)
                problems += res2.problems
        elif w.kind == "snapshot":
            image = names.get(ctx.image, scratch / ctx.image.name)
            if ctx.image not in names:
                shutil.copyfile(ctx.image, image)
            problems += _judge_snapshot(ctx, trace, point, image, scratch)
        elif w.kind == "recovery":
            problems += _judge_recovery(ctx, names.get(ctx.image, ctx.image))
        elif w.kind == "registry":
            image = names.get(ctx.image, scratch / ctx.image.name)
            if ctx.image not in names:
                shutil.copyfile(ctx.image, image)
            problems += _judge_registry(ctx, trace, point, image)
        else:
            problems += _judge_container(ctx, trace, point, names)
    except Exception as exc:
        problems.append(f"judge failed: {type(exc).__name__}: {exc}")
    return problems


def _guest_qcow2(image: Path) -> bytes:
    from dirtybits.qcow2.image import Qcow2Image

    with Qcow2Image.open(str(image), readonly=True) as img:
        return img.read(0, img.size)


def _durability(trace: Trace, point: Point, guest: bytes) -> list[str]:
    """Data a completed flush made durable, untouched by any later request, is there; so is
    the data of each completed FUA request since (``Recorder.durable``), in the sectors no
    later request touched."""
    problems = _fua_durability(point, guest)
    if point.flushed < 0:
        return problems
    snap = np.frombuffer(trace.snapshots[point.flushed], dtype=np.uint8)
    if len(guest) < len(snap):  # a resize that did not land: judge the common part
        snap = snap[:len(guest)]
    now = np.frombuffer(guest[:len(snap)], dtype=np.uint8)
    differ = (snap.reshape(-1, SECTOR) != now.reshape(-1, SECTOR)).any(axis=1)
    for off, length in point.touched:
        differ[off // SECTOR:-(-(off + length) // SECTOR)] = False
    if differ.any():
        first = int(np.flatnonzero(differ)[0]) * SECTOR
        problems.append(f"{int(differ.sum())} flushed sectors lost (first at {first:#x})")
    return problems


def _fua_durability(point: Point, guest: bytes) -> list[str]:
    problems = []
    for offset, data, before in point.fua:
        end = offset + len(data)
        owed = np.ones(len(data), dtype=bool)
        for off, length in point.touched[before:]:  # later requests, by whole sectors
            lo = max(off // SECTOR * SECTOR, offset)
            hi = min(-(-(off + length) // SECTOR) * SECTOR, end)
            if lo < hi:
                owed[lo - offset:hi - offset] = False
        want = np.frombuffer(data, dtype=np.uint8)
        got = np.frombuffer(guest[offset:end].ljust(len(data), b"\0"), dtype=np.uint8)
        lost = owed & (want != got)
        if lost.any():
            first = offset + int(np.flatnonzero(lost)[0])
            problems.append(f"a completed durable (FUA) request at {offset:#x}+"
                            f"{len(data):#x} lost {int(lost.sum())} bytes (first at {first:#x})")
    return problems


def _check(path: Path) -> list[str]:
    proc = harness.sh("qemu-img", "check", "--output=json", str(path), ok=(0, 2, 3))
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode == 2 or report.get("corruptions") or report.get("check-errors"):
        return [f"qemu-img check {path.name}: corruptions={report.get('corruptions')} "
                f"check-errors={report.get('check-errors')} rc={proc.returncode}"]
    return []


def _covers(store: Any, name: str, data: bytes, pre: bytes, what: str) -> list[str]:
    """A consistent bitmap ``name`` covers every granule where ``data`` differs from ``pre``."""
    sb = store.find(name)
    if sb is None:
        return [f"bitmap {name} vanished"]
    if sb.problems:
        return [f"bitmap {name} damaged: {sb.problems}"]
    if sb.in_use:
        return []
    bits = harness.bits_of(store.load(name))
    a = np.frombuffer(data, dtype=np.uint8)
    b = np.frombuffer(pre, dtype=np.uint8)[:len(a)]
    changed512 = (a.reshape(-1, SECTOR) != b.reshape(-1, SECTOR)).any(axis=1)
    changed = harness.changed_granules(changed512, sb.entry.granularity, len(bits))
    missed = int((changed & ~bits).sum())
    return [f"bitmap {name} consistent but misses {missed} changed granules ({what})"] \
        if missed else []


def _judge_snapshot(ctx: Context, trace: Trace, point: Point, image: Path,
                    scratch: Path) -> list[str]:
    """``snapjudge``: the snapshot table is the one of the last completed operation, or of
    the one in flight; every snapshot reads as the model says; no COPIED on a shared
    cluster; QEMU's check finds no more than leaks and the OFLAG_COPIED window; no bitmap
    misses a change. Then the active data: what a completed flush made durable is there, and
    an apply in flight left the whole disk before or after."""
    import snapjudge as sj

    marks = [json.loads(e.data) for e in trace.events[:point.index] if e.kind == "mark"]
    last = marks[-1] if marks else {"kind": "end", "table": [], "active": ""}
    tables = [last["table"]]
    if last["kind"] == "begin":
        later = [json.loads(e.data) for e in trace.events[point.index:] if e.kind == "mark"]
        tables.append(later[0]["table"])
    bitmaps = {} if not ctx.enabled else {
        name: (gran, name != harness.FROZEN, ctx.tpl.pre_bits[name])
        for name, gran in ctx.tpl.spec.bitmaps.items()}
    expect = sj.Expect([[((k[0], k[1]), d) for k, d in t] for t in tables], [],
                       pre=ctx.tpl.pre.tobytes(), bitmaps=bitmaps)
    verdict = sj.judge(image, expect, scratch / "snapjudge")
    problems = verdict.problems
    if point.first_after_flush and verdict.check.leaks:
        problems.append(f"{verdict.check.leaks} leaked clusters right after a completed flush")
    if verdict.view is not None and not problems:
        problems += _durability(trace, point, verdict.view.active)
        if last["kind"] == "begin" and last["op"] == "apply":
            later = [json.loads(e.data) for e in trace.events[point.index:] if e.kind == "mark"]
            now = hashlib.sha256(verdict.view.active).hexdigest()
            if now not in (last["active"], later[0]["active"]):
                problems.append("an interrupted apply left neither the old disk nor the "
                                "snapshot's")
    return problems


def _judge_registry(ctx: Context, trace: Trace, point: Point, image: Path) -> list[str]:
    """``regcrash.judge_image`` (its docstring has the rule) against the model after the
    steps whose ``e`` mark precedes the crash point, or after the one begun but not
    returned; then no leak right after a completed flush, and the flushed data is there."""
    import bisect

    key = ("registry", id(trace))
    if key not in ctx.extra:
        begun: dict[int, int] = {}
        ended: list[int] = []
        for i, e in enumerate(trace.events):
            if e.kind == "mark":
                note = json.loads(e.data)
                if "b" in note:
                    begun[note["b"]] = i
                elif "e" in note:
                    ended.append(i)
        ctx.extra[key] = (begun, ended, regcrash.states(ctx.tpl, ctx.extra["steps"]))
    begun, ended, states = ctx.extra[key]
    done = bisect.bisect_left(ended, point.index)
    in_flight = begun.get(done, len(trace.events)) < point.index
    v = regcrash.judge_image(image, regcrash.alternatives(states, done, in_flight))
    problems = list(v.problems)
    if point.first_after_flush and v.leaks:
        problems.append(f"{v.leaks} leaked clusters right after a completed flush")
    if not problems:
        problems += _durability(trace, point, _guest_qcow2(image))
    return problems


def _judge_recovery(ctx: Context, image: Path) -> list[str]:
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    problems = _check(image)
    with Qcow2Image.open(str(image), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        data = img.read(0, ctx.tpl.spec.size)
        backup = ctx.backup.read_bytes()
        for name in ctx.enabled:
            problems += _covers(store, name, data, backup, "vs the backup")
    return problems


def _judge_container(ctx: Context, trace: Trace, point: Point,
                     names: dict[Path, Path]) -> list[str]:
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    container = names.get(ctx.container)
    if container is None:  # never written: as created
        return []
    problems = _check(container)
    raw = names[ctx.raw].read_bytes() if ctx.raw in names else ctx.pre_raw
    raw = raw[:len(ctx.pre_raw)].ljust(len(ctx.pre_raw), b"\0")
    with Qcow2Image.open(str(container), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        for name in ctx.enabled:
            problems += _covers(store, name, raw, ctx.pre_raw, "vs the drive's pre-image")
        off = store.find("d1/off")
        if off is None or off.in_use or off.entry.auto:
            problems.append("disabled bitmap d1/off changed state")
    if not problems:
        problems += _durability(trace, point, raw)
    return problems


# ---------------------------------------------------------------------------- exploring
@dataclass
class Report:
    workload: str
    events: int = 0
    points: int = 0
    states: int = 0  # crash states built
    judged: int = 0  # distinct images judged
    failures: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # how the traced run ended (a failed sync raises)
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.workload}: {self.events} events, {self.points} crash points, "
                f"{self.states} states, {self.judged} judged, {len(self.failures)} failing"
                f" ({self.seconds:.1f} s)")


def explore(ctx: Context, trace: Trace, *, randoms: int, max_states: int, seed: int,
            stop_at_first: bool = False, points_filter: Callable[[Point], bool] | None = None,
            error: str | None = None,
            stop_if: Callable[[list[str]], bool] | None = None) -> Report:
    """Build and judge crash states of ``trace``: at most ``max_states`` distinct images
    (``stop_at_first``: until one fails; ``stop_if``: until one fails with problems it
    accepts)."""
    rep = Report(ctx.workload.name, events=len(trace.events), error=error)
    start = time.monotonic()
    rng = random.Random(seed)
    seen: set[bytes] = set()
    scratch = ctx.work / "state"
    # a point's files change as the trace goes on: plan first (the choices at each point
    # are drawn from a generator seeded by the point), then build and judge in one more pass
    deterministic: list[tuple[int, str]] = []
    randomized: list[tuple[int, str]] = []
    for p in crash_points(trace):
        if points_filter is not None and not points_filter(p):
            continue
        rep.points += 1
        for name, _units in choices(p, random.Random(seed * 1000003 + p.index), randoms):
            (randomized if name.startswith("random") else deterministic).append((p.index,
                                                                                 name))
    rng.shuffle(deterministic)
    rng.shuffle(randomized)
    order = {plan: i for i, plan in enumerate(deterministic + randomized)}
    # distinct images are judged; plan a margin of duplicates
    chosen = {plan for plan, i in order.items() if i < 3 * max_states}
    todo: list[tuple[int, Point, str, list[bytearray]]] = []
    for p in crash_points(trace):
        if points_filter is not None and not points_filter(p):
            continue
        for name, units in choices(p, random.Random(seed * 1000003 + p.index), randoms):
            if (p.index, name) not in chosen:
                continue
            files = build(p, units)
            rep.states += 1
            key = hashlib.sha256(b"".join(hashlib.sha256(f).digest() for f in files)).digest()
            if key in seen:
                continue
            seen.add(key)
            snap = Point(p.index, [], [], p.pending, p.flushed, p.touched,
                         p.first_after_flush and name == "none", p.fua)
            todo.append((order[(p.index, name)], snap, name, files))
            if len(todo) > 4 * max_states:  # bounded memory: keep the best-ranked
                todo.sort(key=lambda t: t[0])
                del todo[max_states:]
    todo.sort(key=lambda t: t[0])
    for _rank, p, name, files in todo[:max_states]:
        rep.judged += 1
        problems = judge(ctx, trace, p, files, scratch)
        if problems:
            rep.failures.append({"point": p.index, "state": name,
                                 "pending": len(p.pending), "problems": problems[:3]})
            if stop_at_first or (stop_if is not None and stop_if(problems)):
                break
    rep.seconds = time.monotonic() - start
    return rep


def near(trace: Trace, sites: set[str], window: int = 3) -> Callable[[Point], bool]:
    """Crash points among the first ``window`` sync points after each sync of ``sites``
    (where a sync that is missing shows): after each removed one, when it was removed (a
    site's writes can be everywhere: the refcount blocks every flush writes)."""
    marks = [i for i, e in enumerate(trace.events) if e.site in sites
             and e.kind == "dropped-sync"]
    if not marks:  # an RWF_DSYNC write site, or syncs kept: where the site wrote or synced
        marks = [i for i, e in enumerate(trace.events) if e.site in sites
                 and e.kind in ("sync", "dropped-sync", "write")]
    sync_points = [i for i, e in enumerate(trace.events)
                   if e.kind == "sync" or (e.kind == "write" and e.dsync)]
    wanted: set[int] = set()
    for m in marks:
        after = [i for i in sync_points if i >= m][:window]
        wanted.update(after)
    wanted.add(len(trace.events))

    def keep(p: Point) -> bool:
        return p.index in wanted
    return keep


def near_dropped(trace: Trace, window: int = 3) -> Callable[[Point], bool]:
    """``near`` for whatever ``drop``/``drop_under`` removed: the first ``window`` crash
    points after each dropped sync or RWF_DSYNC write."""
    marks = [i for i, e in enumerate(trace.events) if e.dropped or e.kind == "dropped-sync"]
    sync_points = [i for i, e in enumerate(trace.events)
                   if e.kind == "sync" or (e.kind == "write" and e.dsync)]
    wanted = {len(trace.events)}
    for m in marks:
        wanted.update([i for i in sync_points if i >= m][:window])
    return lambda p: p.index in wanted


def near_steps(trace: Trace, ctx: Context, ops: set[str],
               window: int = 2) -> Callable[[Point], bool]:
    """The registry workload's crash points while a step of ``ops`` (``clear``, ``tx``...)
    runs, and the first ``window`` after it returned."""
    todo = ctx.extra["steps"]
    sync_points = [i for i, e in enumerate(trace.events)
                   if e.kind == "sync" or (e.kind == "write" and e.dsync)]
    wanted = {len(trace.events)}
    begin = None
    for i, e in enumerate(trace.events):
        if e.kind != "mark":
            continue
        note = json.loads(e.data)
        if "b" in note and todo[note["b"]]["op"] in ops:
            begin = i
        elif "e" in note and begin is not None:
            wanted.update(p for p in sync_points if begin < p < i)
            wanted.update([p for p in sync_points if p > i][:window])
            begin = None
    return lambda p: p.index in wanted


def templates_in(directory: Path, names: set[str]) -> dict[str, Any]:
    specs = tuple(s for s in harness.ALL_TEMPLATES + SNAPSHOT_TEMPLATES
                  + (regcrash.TEMPLATE,) if s.name in names)
    harness.build_templates(directory, specs)
    return harness.load_templates(directory, specs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="power-loss crash states of each workload")
    ap.add_argument("--long", action="store_true", help="more operations and states")
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--states", type=int, default=None, help="distinct states per workload")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    names = args.workload or sorted(WORKLOADS)
    ops, states, randoms = (120, 400, 6) if args.long else (30, 300, 2)
    states = args.states or states
    base = Path(tempfile.mkdtemp(prefix="dirtybits-powerloss-", dir="/var/tmp"))
    total_judged = total_failures = 0
    try:
        tnames = {WORKLOADS[n].template for n in names} - {None}
        (base / "templates").mkdir()
        tpls = templates_in(base / "templates", {t for t in tnames if t})
        print(f"power-loss seed {seed} (--seed {seed} replays)")
        for n in names:
            ctx = prepare(WORKLOADS[n], tpls, base / n, seed, ops)
            trace, err = trace_run(ctx)
            rep = explore(ctx, trace, randoms=randoms, max_states=states, seed=seed,
                          error=err)
            print(rep.line(), flush=True)
            if err is not None:
                print(f"  the traced run failed: {err}")
                total_failures += 1
            for f in rep.failures[:5]:
                print(f"  FAILED {f}")
            total_judged += rep.judged
            total_failures += len(rep.failures)
        print(f"total: {total_judged} crash states judged, {total_failures} failing")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if total_failures else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
