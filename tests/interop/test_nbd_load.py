"""The daemon's NBD exports under load: many clients at once while QMP changes the bitmaps.

``dirtybits serve`` runs as users run it (a subprocess, ``--blockdev``, ``--nbd-server``,
``--export``), on a qcow2 image opened with ``discard=unmap`` so TRIM reaches the image.

``test_clients_write_while_qmp_edits_bitmaps``: 32 clients, one connection each, each in its
own 32 MiB region of a 1 GiB disk, write (WRITE, WRITE_ZEROES, TRIM; FUA and FLUSH
sometimes; 1-3 requests pipelined, now and then a burst of 24), read back what they wrote and
ask BLOCK_STATUS of the exported bitmap ``exp`` over their region (every 8th client
negotiates simple replies: reads only), while one QMP client adds, removes, clears, enables,
disables and merges bitmaps, runs transactions (those touching the busy ``exp``, as target or
as source, must fail whole with QEMU's text), checkpoints, and asks ``query-named-block-nodes``
and ``x-debug-block-dirty-bitmap-sha256``.

The oracle is a model of every bitmap as two bitmaps, ``lo`` (bits that must be set) and
``hi`` (bits that may be set), built by replaying the log of every write and every QMP
command, each with the monotonic times it was sent and its reply came (one clock: the clients
and the QMP client share this process's event loop). The daemon runs each request and each
QMP command as one call on its block thread, so each happens at one point in time between
its send and its reply: a write whose reply came before a command was sent happened before
it, a write sent after a command's reply after it, anything else may be either. In the
barrier phases every write completes before the QMP commands start (the clients only read
meanwhile), so ``lo == hi`` and each bitmap's sha256 must be the model's exactly; in the
concurrent phases commands and writes overlap: each sha256 is judged where the model is
exact anyway, each dirty count must lie within the bounds, and the final bitmaps (read back
over NBD from a read-only export made at the end) must hold every bit of ``lo`` and no bit
outside ``hi``. Afterwards the daemon quits; ``qemu-img check`` is clean, ``qemu-img
compare`` finds the image equal to a raw model of every client's writes (TRIM: whole
clusters read as zeroes, partial ones keep their data, as QEMU's qcow2), and qemu-nbd (QEMU
reading what we stored) shows every persistent bitmap as we served it.

``test_readers_of_a_frozen_bitmap_while_qmp_tries_to_change_it``: a read-only export of two
disabled bitmaps (made with qemu-img and qemu-io), 32 readers doing BLOCK_STATUS on both
(REQ_ONE sometimes), reads, and writes that must be refused, while QMP tries to clear, merge
into or from, remove, enable, disable them (QEMU's "in use" error every time, also inside
transactions, which then change nothing) and adds, clears, merges and removes other bitmaps;
every extent every reader sees is the model's, every sha256 too.

The seed of the random choices is DIRTYBITS_LOAD_SEED (default fixed), shown on failure.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import dataclasses
import json
import os
import random
import time
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

import peers
import peers.qmp
from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
from dirtybits.proto.nbd.constants import Cmd, CmdFlag, Errno
from peers import qemu_bitmaps, qemu_img, qemu_io
from peers.nbdclient import Client, NbdReplyError

pytestmark = [pytest.mark.interop, pytest.mark.asyncio]

MiB = 1 << 20
KiB = 1 << 10
SEED = int(os.environ.get("DIRTYBITS_LOAD_SEED", "20240611"))
CLIENTS = 32
NODE = "n0"
EXPORT = "disk"
IN_USE = "Bitmap '{}' is currently in use by another operation and cannot be used"
EVENT_TIMEOUT = 60.0  # one reply may wait this long on a loaded 2-core machine

Action = tuple[str, dict[str, Any]]


# ---------------------------------------------------------------------------- the model
@dataclass
class Bm:
    """One bitmap of the model: what must be set (``lo``) and what may be (``hi``)."""

    gran: int
    persistent: bool
    enabled: bool
    lo: DirtyBitmap
    hi: DirtyBitmap
    busy: bool = False
    disturbed: int = -1  # the last command that added, cleared, enabled or disabled it


def new_bm(size: int, gran: int, *, persistent: bool, enabled: bool, busy: bool = False,
           index: int = -1) -> Bm:
    return Bm(gran, persistent, enabled, DirtyBitmap(size, gran), DirtyBitmap(size, gran),
              busy, index)


class Model:
    """The node's bitmaps as QEMU would hold them after a sequence of commands."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bms: dict[str, Bm] = {}
        self.compared = 0  # sha256 queries the replay could judge exactly
        self.overlapping = 0  # writes that overlapped a command (their order unknown)

    def apply(self, actions: list[Action], index: int) -> str | None:
        """Run a transaction's actions in order (a lone command is a transaction of one):
        all of them, or (one fails) none. The error QEMU gives, or None."""
        saved = {n: dataclasses.replace(bm, lo=bm.lo.copy(), hi=bm.hi.copy())
                 for n, bm in self.bms.items()}
        for kind, data in actions:
            err = self._one(kind, data, index)
            if err is not None:
                self.bms = saved
                return err
        return None

    def _one(self, kind: str, data: dict[str, Any], index: int) -> str | None:
        name = data.get("target", data.get("name"))
        assert isinstance(name, str)
        if kind == "block-dirty-bitmap-add":
            assert name not in self.bms, name
            self.bms[name] = new_bm(self.size, data.get("granularity", 65536),
                                    persistent=data.get("persistent", False),
                                    enabled=not data.get("disabled", False), index=index)
            return None
        bm = self.bms[name]
        if bm.busy:
            return IN_USE.format(name)
        if kind == "block-dirty-bitmap-remove":
            del self.bms[name]
        elif kind == "block-dirty-bitmap-clear":
            bm.lo.clear()
            bm.hi.clear()
            bm.disturbed = index
        elif kind in ("block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
            bm.enabled = kind == "block-dirty-bitmap-enable"
            bm.disturbed = index
        else:
            assert kind == "block-dirty-bitmap-merge", kind
            srcs = [src if isinstance(src, str) else src["name"] for src in data["bitmaps"]]
            for src in srcs:  # QEMU takes no busy source either
                if self.bms[src].busy:
                    return IN_USE.format(src)
            for src in srcs:
                other = self.bms[src]
                bm.lo.merge_from(other.lo)
                bm.hi.merge_from(other.hi)
        return None


@dataclass
class Write:
    """A request that marks bitmaps (WRITE, WRITE_ZEROES, TRIM), when sent and answered."""

    sent: float
    done: float
    offset: int
    length: int


@dataclass
class Op:
    """A QMP command of the run: what the model says of it, and what came back."""

    cmd: str
    args: dict[str, Any]
    actions: list[Action]  # what it does to the bitmaps ([] for a query)
    expect: str | None = None  # the error it must fail with
    exact: bool = False  # a sha256 query where the model must be exact (a barrier)
    sent: float = 0.0
    done: float = 0.0
    result: Any = None
    error: str | None = None


def replay(model: Model, ops: list[Op], writes: list[Write]) -> list[str]:
    """Run the log through ``model`` (left as after the last command); what disagreed.

    Position j is the time between command j-1 and command j. A write may have happened at
    any position from ``a`` (the commands answered before it was sent) to ``b`` (the
    commands sent before it was answered). It is in ``hi`` of every bitmap recording at any
    of those positions; it is in ``lo`` of a bitmap recording throughout, untouched by any
    command in that window (no add, clear, enable or disable of it)."""
    sent = [o.sent for o in ops]
    done = [o.done for o in ops]
    at: dict[int, list[Write]] = defaultdict(list)
    ending: dict[int, list[tuple[Write, int]]] = defaultdict(list)
    for w in writes:
        a = bisect.bisect_left(done, w.sent)
        b = bisect.bisect_left(sent, w.done)
        assert a <= b
        for p in range(a, b + 1):
            at[p].append(w)
        ending[b].append((w, a))
    problems: list[str] = []
    model.compared = 0
    model.overlapping = sum(1 for ws in ending.values() for w, a in ws
                            if bisect.bisect_left(sent, w.done) > a)
    for j in range(len(ops) + 1):
        for w in at.get(j, ()):
            for bm in model.bms.values():
                if bm.enabled:
                    bm.hi.set(w.offset, w.length)
        for w, a in ending.get(j, ()):
            for bm in model.bms.values():
                if bm.enabled and bm.disturbed < a:
                    bm.lo.set(w.offset, w.length)
        if j == len(ops):
            break
        op = ops[j]
        if op.cmd == "x-debug-block-dirty-bitmap-sha256":
            name = op.args["name"]
            bm = model.bms[name]
            if op.exact and bm.lo != bm.hi:
                problems.append(f"#{j} sha256 of {name}: the model is not exact at a barrier")
            if bm.lo == bm.hi:
                model.compared += 1
            if bm.lo == bm.hi and op.result != {"sha256": bm.lo.sha256()}:
                problems.append(f"#{j} sha256 of {name}: {op.result}, the model "
                                f"{bm.lo.sha256()} ({bm.lo.count()} dirty bytes)")
        elif op.cmd == "query-named-block-nodes":
            problems += judge_query(j, model, op.result)
        elif op.actions:
            err = model.apply(op.actions, j)
            if err != op.error:
                problems.append(f"#{j} {op.cmd} {op.args}: {op.error!r}, the model {err!r}")
    return problems


def judge_query(j: int, model: Model, nodes: list[dict[str, Any]]) -> list[str]:
    """``query-named-block-nodes``: the node's ``dirty-bitmaps`` are the model's, each
    dirty byte count within its bounds."""
    (node,) = [n for n in nodes if n["node-name"] == NODE]
    got = {b["name"]: b for b in node.get("dirty-bitmaps", [])}
    if set(got) != set(model.bms):
        return [f"#{j} query-named-block-nodes: bitmaps {sorted(got)}, the model "
                f"{sorted(model.bms)}"]
    out = []
    for name, bm in model.bms.items():
        b = got[name]
        want = {"recording": bm.enabled, "persistent": bm.persistent, "busy": bm.busy,
                "granularity": bm.gran}
        if {k: b[k] for k in want} != want or not bm.lo.count() <= b["count"] <= bm.hi.count():
            out.append(f"#{j} query-named-block-nodes: {name} {b}, the model {want}, count "
                       f"{bm.lo.count()}..{bm.hi.count()}")
    return out


def expected_status(bm: DirtyBitmap, offset: int, length: int,
                    req_one: bool = False) -> list[tuple[int, int]]:
    """What BLOCK_STATUS of ``qemu:dirty-bitmap:NAME`` answers for the model ``bm``."""
    out = [(n, 1 if dirty else 0) for _, n, dirty in bm.extents(offset, length)]
    return out[:1] if req_one else out


def from_status(size: int, gran: int, ext: list[tuple[int, int]]) -> DirtyBitmap:
    """A bitmap made of a whole-disk BLOCK_STATUS answer."""
    bm = DirtyBitmap(size, gran)
    pos = 0
    for n, flags in ext:
        if flags & 1:
            bm.set(pos, n)
        pos += n
    assert pos == size, (pos, size)
    return bm


async def whole_status(c: Client, size: int) -> dict[str, list[tuple[int, int]]]:
    """Every context's extents over the whole disk (asking again where a reply stopped
    short)."""
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    covered: dict[str, int] = defaultdict(int)
    for name in c.contexts.values():
        while covered[name] < size:
            pos = covered[name]
            ext = (await c.block_status(pos, size - pos))[name]
            assert ext and all(n for n, _ in ext), ext
            out[name] += ext
            covered[name] += sum(n for n, _ in ext)
    return dict(out)


# ---------------------------------------------------------------------------- QMP
class Qmp:
    """The one QMP client: every command logged with its times; its outcome must be the one
    foreseen (an error text, or success)."""

    def __init__(self, vm: peers.qmp.Qemu) -> None:
        self.vm = vm
        self.log: list[Op] = []

    async def run(self, op: Op) -> Op:
        op.sent = time.monotonic()
        try:
            op.result = await self.vm.qmp.execute(op.cmd, op.args)
        except ExecuteError as exc:
            op.error = exc.error.error.desc
        op.done = time.monotonic()
        self.log.append(op)
        assert op.error == op.expect, (f"{op.cmd} {op.args}: {op.error!r}, expected "
                                       f"{op.expect!r} (seed {SEED})")
        return op

    async def sha(self, name: str, *, exact: bool = False) -> Op:
        return await self.run(Op("x-debug-block-dirty-bitmap-sha256",
                                 {"node": NODE, "name": name}, [], exact=exact))


GRANS = (512, 4 * KiB, 64 * KiB, 64 * KiB, 1 * MiB)


@dataclass
class Shape:
    gran: int
    persistent: bool
    enabled: bool
    busy: bool = False


@dataclass
class OpGen:
    """Random bitmap commands that are valid (or fail only for a busy bitmap, on purpose),
    by the names and states they leave (``shape``); the bits are the replay's business."""

    rng: random.Random
    shape: dict[str, Shape]
    pool: tuple[str, ...]
    transient: tuple[str, ...] = ()
    busy_rate: float = 0.15  # how often to touch a busy bitmap (and fail)

    def _live(self) -> list[str]:
        return [n for n, s in self.shape.items() if not s.busy]

    def _action(self, shape: dict[str, Shape], kinds: tuple[str, ...]) -> Action | None:
        rng = self.rng
        live = [n for n, s in shape.items() if not s.busy]
        missing = [n for n in self.pool if n not in shape]
        kind = rng.choice(kinds)
        if kind == "add" and missing:
            name = rng.choice(missing)
            gran = rng.choice(GRANS)
            persistent = name not in self.transient
            disabled = rng.random() < 0.25
            shape[name] = Shape(gran, persistent, not disabled)
            data: dict[str, Any] = {"node": NODE, "name": name, "granularity": gran,
                                    "persistent": persistent}
            if disabled or rng.random() < 0.3:
                data["disabled"] = disabled
            return "block-dirty-bitmap-add", data
        if not live:
            return None
        name = rng.choice(live)
        if kind == "remove" and len(live) > 2:
            del shape[name]
            return "block-dirty-bitmap-remove", {"node": NODE, "name": name}
        if kind == "clear":
            return "block-dirty-bitmap-clear", {"node": NODE, "name": name}
        if kind == "toggle":
            shape[name].enabled = not shape[name].enabled
            cmd = "enable" if shape[name].enabled else "disable"
            return f"block-dirty-bitmap-{cmd}", {"node": NODE, "name": name}
        if kind == "merge":
            others = [n for n in live if n != name]
            if not others:
                return None
            srcs = rng.sample(others, min(len(others), rng.randint(1, 3)))
            return "block-dirty-bitmap-merge", {
                "node": NODE, "target": name,
                "bitmaps": [s if rng.random() < 0.5 else {"node": NODE, "name": s}
                            for s in srcs]}
        return None

    def _busy_action(self) -> tuple[Action, str]:
        """An action QEMU refuses: it touches a busy bitmap (a merge takes none as its
        source either); and the bitmap its error names."""
        rng = self.rng
        name = rng.choice([n for n, s in self.shape.items() if s.busy])
        kind = rng.choice(("clear", "merge", "merge", "remove", "enable", "disable"))
        if kind == "merge":
            live = self._live()
            if live and rng.random() < 0.5:  # from the busy bitmap, among others
                srcs = [*rng.sample(live, min(len(live), rng.randint(0, 2))), name]
                rng.shuffle(srcs)
                return ("block-dirty-bitmap-merge", {
                    "node": NODE, "target": rng.choice(live), "bitmaps": srcs}), name
            src = rng.choice([n for n in self.shape if n != name])
            return ("block-dirty-bitmap-merge", {"node": NODE, "target": name,
                                                 "bitmaps": [src]}), name
        return (f"block-dirty-bitmap-{kind}", {"node": NODE, "name": name}), name

    def next(self) -> Op:
        """A lone command (60%), a transaction that succeeds (25%), or (``busy_rate`` of
        the time) one that touches a busy bitmap and fails whole."""
        rng = self.rng
        kinds = ("add", "remove", "clear", "clear", "toggle", "merge", "merge")
        if len(self._live()) < 2:
            kinds = ("add",)
        if kinds == ("add",) or rng.random() >= self.busy_rate:
            if kinds == ("add",) or rng.random() < 0.7:
                for _ in range(20):
                    if (act := self._action(self.shape, kinds)) is not None:
                        return Op(act[0], act[1], [act])
            trial = copy.deepcopy(self.shape)
            acts = [a for _ in range(rng.randint(2, 4))
                    if (a := self._action(trial, ("add", "clear", "toggle", "merge"))) is not None]
            if acts:
                self.shape = trial
                return Op("transaction", {"actions": [{"type": k, "data": d} for k, d in acts]},
                          acts)
        # a busy bitmap touched: alone, or last in a transaction of valid actions
        bad, culprit = self._busy_action()
        expect = IN_USE.format(culprit)
        if rng.random() < 0.5:
            return Op(bad[0], bad[1], [bad], expect=expect)
        trial = copy.deepcopy(self.shape)  # thrown away: the transaction changes nothing
        acts = [a for _ in range(rng.randint(1, 3))
                if (a := self._action(trial, ("add", "clear", "toggle", "merge"))) is not None]
        acts.append(bad)
        return Op("transaction", {"actions": [{"type": k, "data": d} for k, d in acts]}, acts,
                  expect=expect)


# ---------------------------------------------------------------------------- helpers
def first_difference(got: bytes, want: bytes) -> int:
    return next(i for i, (x, y) in enumerate(zip(got, want, strict=True)) if x != y)


def clean_check(img: Path) -> None:
    """``qemu-img check`` finds nothing wrong."""
    out = json.loads(qemu_img("check", "--output=json", img).stdout)
    bad = {k: out.get(k, 0) for k in ("corruptions", "leaks", "check-errors",
                                      "corruptions-fixed", "leaks-fixed")}
    assert not any(bad.values()), out


async def gather_all(tasks: list[Awaitable[Any]]) -> list[Any]:
    """Run ``tasks`` at once; the first failure cancels the others and is raised."""
    futs = [asyncio.ensure_future(t) for t in tasks]
    try:
        return await asyncio.gather(*futs)
    finally:
        pending = {f for f in futs if not f.done()}
        while pending:  # again and again: a task may have swallowed a cancellation
            for f in pending:
                f.cancel()
            _, pending = await asyncio.wait(pending, timeout=1)


# ---------------------------------------------------------------------------- test 1
SIZE = 1 << 30
REGION = SIZE // CLIENTS
CLUSTER = 64 * KiB
PHASES = ("barrier",) * 4 + ("concurrent",) * 2
STEPS = 25  # request batches per client per phase
OPS_AT_BARRIER = 8


@dataclass
class Run:
    """What the clients and the QMP task share."""

    sock: str
    model_fd: int
    go: list[asyncio.Event]
    left: list[int]  # clients still writing in each phase
    all_done: list[asyncio.Event]
    finished: asyncio.Event
    writes: list[Write] = field(default_factory=list)
    exp: DirtyBitmap = field(default_factory=lambda: DirtyBitmap(SIZE, 64 * KiB))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Writer:
    """One client, writing and reading in its own region."""

    def __init__(self, run: Run, i: int) -> None:
        self.run = run
        self.i = i
        self.base = i * REGION
        self.rng = random.Random(SEED * 1000 + i)
        self.c: Client | None = None
        self.structured = True
        self.last = (self.base, 4096)

    async def main(self) -> None:
        run = self.run
        # every 8th client negotiates no structured replies (so no block status either)
        self.structured = self.i % 8 != 7
        self.c = await Client.connect(
            run.sock, EXPORT, structured=self.structured, timeout=EVENT_TIMEOUT,
            contexts=("qemu:dirty-bitmap:exp",) if self.structured else ())
        assert self.c.size == SIZE
        for p in range(len(PHASES)):
            await run.go[p].wait()
            for _ in range(STEPS):
                await self.batch()
                await self.read_back()
                if self.rng.random() < 0.3:
                    await self.check_exp()
            run.left[p] -= 1
            if not run.left[p]:
                run.all_done[p].set()
            nxt = run.go[p + 1] if p + 1 < len(PHASES) else run.finished
            while not nxt.is_set():  # only reads until the next phase
                await self.read_random()
                if self.rng.random() < 0.3:
                    await self.check_exp()
        await self.c.close()

    def _model(self, kind: int, offset: int, length: int, data: bytes) -> None:
        fd = self.run.model_fd
        if kind == Cmd.NBD_CMD_WRITE:
            os.pwrite(fd, data, offset)
        elif kind == Cmd.NBD_CMD_WRITE_ZEROES:
            os.pwrite(fd, bytes(length), offset)
        else:  # TRIM: whole clusters read as zeroes after, partial ones are kept (QEMU)
            start = -(-offset // CLUSTER) * CLUSTER
            end = (offset + length) // CLUSTER * CLUSTER
            if start < end:
                os.pwrite(fd, bytes(end - start), start)

    async def batch(self) -> None:
        """1-3 requests on disjoint ranges, pipelined; now and then a burst of 24 (more
        than the server holds per connection: it stops reading until it caught up)."""
        rng = self.rng
        c = self.c
        assert c is not None
        k = 24 if rng.random() < 0.05 else rng.randint(1, 3)
        part = REGION // k
        reqs = []
        for j in range(k):
            r = rng.random()
            if r < 0.65:
                kind, length = Cmd.NBD_CMD_WRITE, rng.randint(1, 128) * 512
            elif r < 0.85:
                kind, length = Cmd.NBD_CMD_WRITE_ZEROES, rng.randint(1, 1024) * 512
            else:
                kind, length = Cmd.NBD_CMD_TRIM, rng.randint(1, 1024) * 512
            offset = self.base + j * part + rng.randrange(0, part - length + 1, 512)
            flags = CmdFlag.NBD_CMD_FLAG_FUA if rng.random() < 0.1 else 0
            if kind == Cmd.NBD_CMD_WRITE_ZEROES and rng.random() < 0.5:
                flags |= CmdFlag.NBD_CMD_FLAG_NO_HOLE
            data = rng.randbytes(length) if kind == Cmd.NBD_CMD_WRITE else b""
            t = time.monotonic()
            c.send(kind, offset, length, flags, data)
            reqs.append((kind, offset, length, data, t))
        flush = rng.random() < 0.05
        if flush:  # a flush behind them (our server checkpoints the bitmaps then)
            c.send(Cmd.NBD_CMD_FLUSH)
        for kind, offset, length, data, t in reqs:
            c.check(kind, await c.reply())
            done = time.monotonic()
            self.run.writes.append(Write(t, done, offset, length))
            self.run.exp.set(offset, length)
            self._model(kind, offset, length, data)
            self.run.counts[Cmd(kind).name] += 1
            self.run.counts["bytes"] += length
        if flush:
            c.check(Cmd.NBD_CMD_FLUSH, await c.reply())
            self.run.counts["flushes"] += 1
        kind, offset, length, _, _ = reqs[rng.randrange(k)]
        self.last = (offset, length)

    async def _compare(self, offset: int, length: int) -> None:
        c = self.c
        assert c is not None
        # (DF: one data chunk; only with structured replies, else EINVAL as from QEMU)
        flags = CmdFlag.NBD_CMD_FLAG_DF if self.structured and self.rng.random() < 0.2 else 0
        got = await c.read(offset, length, flags)
        want = os.pread(self.run.model_fd, length, offset)
        if got != want:
            at = offset + first_difference(got, want)
            raise AssertionError(f"client {self.i}: read {offset}+{length}: byte {at} is "
                                 f"{got[at - offset]:#x}, wrote {want[at - offset]:#x} "
                                 f"(seed {SEED})")
        self.run.counts["reads"] += 1

    async def read_back(self) -> None:
        """Around the last request of the batch: what this client wrote there."""
        offset, length = self.last
        start = max(self.base, offset - self.rng.randrange(0, 64 * KiB, 512))
        end = min(self.base + REGION, offset + length + self.rng.randrange(0, 64 * KiB, 512))
        await self._compare(start, min(end - start, 1 * MiB))

    async def read_random(self) -> None:
        length = self.rng.randint(1, 512) * 512
        await self._compare(self.base + self.rng.randrange(0, REGION - length + 1, 512), length)

    async def check_exp(self) -> None:
        """``exp`` (exported, never cleared: busy) over this region is this client's writes
        (nobody else writes here)."""
        c = self.c
        assert c is not None
        if not self.structured:
            return
        req_one = self.rng.random() < 0.2
        got = (await c.block_status(self.base, REGION,
                                    CmdFlag.NBD_CMD_FLAG_REQ_ONE if req_one else 0))
        want = expected_status(self.run.exp, self.base, REGION, req_one)
        assert got["qemu:dirty-bitmap:exp"] == want, (
            f"client {self.i}: exp over its region (seed {SEED})")
        self.run.counts["status"] += 1


@pytest.mark.timeout(300)
async def test_clients_write_while_qmp_edits_bitmaps(tmp_path: Path) -> None:
    t0 = time.monotonic()
    img, raw = tmp_path / "d.qcow2", tmp_path / "model.raw"
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu_img("bitmap", "--add", "-g", "64k", img, "exp")  # exported: busy while served
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    blockdev = {"driver": "qcow2", "node-name": NODE, "discard": "unmap",
                "file": {"driver": "file", "filename": str(img)}}
    rng = random.Random(SEED)
    model = Model(SIZE)
    model.bms["exp"] = new_bm(SIZE, 64 * KiB, persistent=True, enabled=True, busy=True)
    gen = OpGen(rng, {"exp": Shape(64 * KiB, True, True, busy=True)},
                pool=("a", "b", "c", "d", "t"), transient=("t",))
    fd = os.open(raw, os.O_RDWR)
    with peers.socket_dir("dbload-") as d:
        sock = str(d / "nbd")
        async with peers.qmp.dirtybits_serve(
                "--blockdev", json.dumps(blockdev),
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"type=nbd,id=e0,node-name={NODE},name={EXPORT},writable=on,"
                            "bitmaps.0=exp") as vm:
            qmp = Qmp(vm)
            run = Run(sock, fd, [asyncio.Event() for _ in PHASES], [CLIENTS] * len(PHASES),
                      [asyncio.Event() for _ in PHASES], asyncio.Event())
            for name, gran, persistent in (("a", 4 * KiB, True), ("b", 64 * KiB, True),
                                           ("t", 64 * KiB, False)):
                gen.shape[name] = Shape(gran, persistent, True)
                args = {"node": NODE, "name": name, "granularity": gran,
                        "persistent": persistent}
                await qmp.run(Op("block-dirty-bitmap-add", args,
                                 [("block-dirty-bitmap-add", args)]))

            async def control() -> None:
                for p, kind in enumerate(PHASES):
                    run.go[p].set()
                    if kind == "concurrent":
                        while not run.all_done[p].is_set():
                            x = rng.random()
                            if x < 0.75:
                                await qmp.run(gen.next())
                            elif x < 0.9:
                                await qmp.sha(rng.choice(list(gen.shape)))
                            elif x < 0.95:
                                await qmp.run(Op("query-named-block-nodes", {"flat": True}, []))
                            else:  # store the bitmaps now, while the clients write
                                await qmp.run(Op("x-dirtybits-checkpoint", {"node": NODE}, []))
                            await asyncio.sleep(rng.uniform(0, 0.002))
                        continue
                    await run.all_done[p].wait()
                    for _ in range(OPS_AT_BARRIER):
                        await qmp.run(gen.next())
                    await qmp.run(Op("query-named-block-nodes", {"flat": True}, []))
                    exact = "concurrent" not in PHASES[:p]
                    for name in gen.shape:
                        await qmp.sha(name, exact=exact)
                # the end: nothing writes any more; freeze the bitmaps to read them back
                live = [n for n, s in gen.shape.items() if not s.busy]
                acts: list[Action] = [("block-dirty-bitmap-disable", {"node": NODE, "name": n})
                                      for n in live]
                await qmp.run(Op("transaction", {"actions": [{"type": k, "data": v}
                                                             for k, v in acts]}, acts))
                for n in live:
                    gen.shape[n].enabled = False
                for name in gen.shape:
                    await qmp.sha(name)

                run.finished.set()

            await gather_all([control(), *(Writer(run, i).main() for i in range(CLIENTS))])
            t_load = time.monotonic() - t0
            # read every bitmap back over NBD: the frozen ones through a read-only export,
            # exp (busy: exported by e0) through e0
            live = [n for n, s in gen.shape.items() if not s.busy]
            await vm.execute("block-export-add", {
                "type": "nbd", "id": "e1", "node-name": NODE, "name": "final",
                "writable": False, "bitmaps": live})
            c = await Client.connect(sock, "final", timeout=EVENT_TIMEOUT,
                                     contexts=tuple(f"qemu:dirty-bitmap:{n}" for n in live))
            final = await whole_status(c, SIZE)
            await c.close()
            c = await Client.connect(sock, EXPORT, contexts=("qemu:dirty-bitmap:exp",),
                                     timeout=EVENT_TIMEOUT)
            final.update(await whole_status(c, SIZE))
            await c.close()
            assert await vm.quit() == 0, vm.stderr
    os.close(fd)

    problems = replay(model, qmp.log, run.writes)
    assert set(model.bms) == set(gen.shape)
    last_sha = {op.args["name"]: op.result["sha256"] for op in qmp.log
                if op.cmd == "x-debug-block-dirty-bitmap-sha256"}
    actual: dict[str, DirtyBitmap] = {}
    for name, bm in model.bms.items():
        assert bm.gran == gen.shape[name].gran
        got = actual[name] = from_status(SIZE, bm.gran, final[f"qemu:dirty-bitmap:{name}"])
        print(f"{name}: {bm.gran} granularity, {'persistent' if bm.persistent else 'transient'}"
              f": must {bm.lo.count()}, is {got.count()}, may {bm.hi.count()} bytes")
        if got.sha256() != last_sha[name]:
            problems.append(f"{name}: read over NBD, sha256 {got.sha256()}; QMP said "
                            f"{last_sha[name]}")
        if not subset(bm.lo, got):
            problems.append(f"{name}: bits the writes must have set are clear: "
                            f"{difference(bm.lo, got)[:10]}")
        if not subset(got, bm.hi):
            problems.append(f"{name}: bits set that no write could have set: "
                            f"{difference(got, bm.hi)[:10]}")
    ops: dict[str, int] = defaultdict(int)
    for op in qmp.log:
        ops["failed" if op.error else op.cmd.removeprefix("block-dirty-bitmap-")] += 1
    summary = (f"seed {SEED}: {len(run.writes)} writes, {dict(run.counts)}; "
               f"{len(qmp.log)} QMP commands {dict(ops)}, {model.compared} sha256 judged exactly, "
               f"{model.overlapping} writes overlapped a command; load {t_load:.1f}s")
    print(summary)
    assert not problems, "\n".join([summary, *problems])

    # the image as QEMU sees it: clean, the data the clients wrote, the bitmaps we served
    clean_check(img)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, img)
    stored = {b["name"]: b for b in qemu_bitmaps(img)}
    persistent = {n for n, bm in model.bms.items() if bm.persistent}
    assert set(stored) == persistent
    for name in persistent:
        assert stored[name]["granularity"] == model.bms[name].gran
        assert stored[name]["flags"] == (["auto"] if model.bms[name].enabled else []), name
        assert peers.nbd_dirty_runs(img, name) == list(actual[name].dirty_extents()), name
    print(f"total {time.monotonic() - t0:.1f}s")


def subset(x: DirtyBitmap, y: DirtyBitmap) -> bool:
    """Every bit of ``x`` is set in ``y``."""
    z = y.copy()
    z.merge_from(x)
    return z == y


def difference(x: DirtyBitmap, y: DirtyBitmap) -> list[tuple[int, int]]:
    """Runs of ``x`` not set in ``y``."""
    out = []
    for start, n in x.dirty_extents():
        for s2, n2, dirty in y.extents(start, n):
            if not dirty:
                out.append((s2, n2))
    return out


# ---------------------------------------------------------------------------- test 2
SIZE2 = 64 * MiB
READS = 300  # requests per reader


def random_writes(rng: random.Random, n: int) -> list[tuple[str, int, int]]:
    """qemu-io commands (data of a pattern, or zeroes) and their ranges."""
    out = []
    for _ in range(n):
        length = rng.randint(1, 512) * 512
        offset = rng.randrange(0, SIZE2 - length + 1, 512)
        cmd = (f"write -z {offset} {length}" if rng.random() < 0.2
               else f"write -P {rng.randint(1, 255)} {offset} {length}")
        out.append((cmd, offset, length))
    return out


@pytest.mark.timeout(180)
async def test_readers_of_a_frozen_bitmap_while_qmp_tries_to_change_it(tmp_path: Path) -> None:
    t0 = time.monotonic()
    rng = random.Random(SEED + 1)
    img, raw = tmp_path / "d.qcow2", tmp_path / "model.raw"
    qemu_img("create", "-q", "-f", "qcow2", img, str(SIZE2))
    qemu_img("create", "-q", "-f", "raw", raw, str(SIZE2))
    model = Model(SIZE2)
    # frozen records every write; seed the first ones, fine the last ones (all disabled)
    batches = [random_writes(rng, 30) for _ in range(3)]
    recording: list[str] = []
    for step, (name, gran) in enumerate((("frozen", 64 * KiB), ("seed", 64 * KiB),
                                         ("fine", 4 * KiB))):
        qemu_img("bitmap", "--add", "-g", str(gran), img, name)
        model.bms[name] = new_bm(SIZE2, gran, persistent=True, enabled=False,
                                 busy=name != "seed")
        recording.append(name)
        if name == "fine":
            qemu_img("bitmap", "--disable", img, "seed")
            recording.remove("seed")
        cmds = [c for c, _, _ in batches[step]]
        qemu_io(img, *cmds, fmt="qcow2")
        qemu_io(raw, *cmds, fmt="raw")
        for _, offset, length in batches[step]:
            for n in recording:
                model.bms[n].lo.set(offset, length)
                model.bms[n].hi.set(offset, length)
    for name in ("frozen", "fine"):
        qemu_img("bitmap", "--disable", img, name)
    assert model.bms["seed"].lo.count() and model.bms["fine"].lo.count()
    want_sha = {n: model.bms[n].lo.sha256() for n in ("frozen", "fine")}
    gen = OpGen(rng, {"frozen": Shape(64 * KiB, True, False, busy=True),
                      "fine": Shape(4 * KiB, True, False, busy=True),
                      "seed": Shape(64 * KiB, True, False)},
                pool=("o1", "o2", "o3", "tt"), transient=("tt",), busy_rate=0.4)
    contexts = ("qemu:dirty-bitmap:frozen", "qemu:dirty-bitmap:fine")
    counts: dict[str, int] = defaultdict(int)
    fd = os.open(raw, os.O_RDONLY)
    blockdev = {"driver": "qcow2", "node-name": NODE,
                "file": {"driver": "file", "filename": str(img)}}
    with peers.socket_dir("dbload-") as d:
        sock = str(d / "nbd")
        async with peers.qmp.dirtybits_serve(
                "--blockdev", json.dumps(blockdev),
                "--nbd-server", f"addr.type=unix,addr.path={sock}") as vm:
            qmp = Qmp(vm)
            await vm.execute("block-export-add", {
                "type": "nbd", "id": "e0", "node-name": NODE, "name": "ro",
                "bitmaps": ["frozen", "fine"]})
            with pytest.raises(ExecuteError) as ei:  # another export of a busy bitmap
                await vm.execute("block-export-add", {
                    "type": "nbd", "id": "e1", "node-name": NODE, "name": "ro2",
                    "bitmaps": ["seed", "frozen"]})
            assert ei.value.error.error.desc == IN_USE.format("frozen")
            left = [CLIENTS]
            readers_done = asyncio.Event()

            async def reader(i: int) -> None:
                r = random.Random(SEED * 1000 + 500 + i)
                c = await Client.connect(sock, "ro", contexts=contexts, timeout=EVENT_TIMEOUT)
                assert c.size == SIZE2
                for _ in range(READS):
                    x = r.random()
                    if x < 0.5:
                        offset = r.randrange(0, SIZE2, 512)
                        length = r.randint(1, min(SIZE2 - offset, 32 * MiB) // 512) * 512
                        if x < 0.05:
                            offset, length = 0, SIZE2
                        req_one = r.random() < 0.25
                        got = await c.block_status(
                            offset, length, CmdFlag.NBD_CMD_FLAG_REQ_ONE if req_one else 0)
                        for ctx in contexts:
                            bm = model.bms[ctx.rsplit(":", 1)[1]].lo
                            assert got[ctx] == expected_status(bm, offset, length, req_one), (
                                f"reader {i}: {ctx} at {offset}+{length} (seed {SEED})")
                        counts["status"] += 1
                    elif x < 0.97:
                        length = r.randint(1, 512) * 512
                        offset = r.randrange(0, SIZE2 - length + 1, 512)
                        got_data = await c.read(offset, length)
                        want = os.pread(fd, length, offset)
                        if got_data != want:
                            at = offset + first_difference(got_data, want)
                            raise AssertionError(f"reader {i}: read {offset}+{length}: "
                                                 f"byte {at} differs (seed {SEED})")
                        counts["reads"] += 1
                    else:  # a read-only export: writes are refused, nothing is marked
                        with pytest.raises(NbdReplyError) as ee:
                            await c.write(r.randrange(0, SIZE2, 512), b"\xee" * 512)
                        assert ee.value.error == Errno.NBD_EPERM
                        counts["refused"] += 1
                await c.close()
                left[0] -= 1
                if not left[0]:
                    readers_done.set()

            async def control() -> None:
                while not readers_done.is_set():
                    x = rng.random()
                    if x < 0.7:
                        await qmp.run(gen.next())
                    elif x < 0.9:
                        await qmp.sha(rng.choice(list(gen.shape)), exact=True)
                    else:
                        await qmp.run(Op("query-named-block-nodes", {"flat": True}, []))

            await gather_all([control(), *(reader(i) for i in range(CLIENTS))])
            t_load = time.monotonic() - t0
            for name in gen.shape:
                await qmp.sha(name, exact=True)
            problems = replay(model, qmp.log, [])
            failed = sum(1 for op in qmp.log if op.error)
            summary = (f"seed {SEED}: {dict(counts)}; {len(qmp.log)} QMP commands, {failed} "
                       f"refused, {model.compared} sha256 compared; load {t_load:.1f}s")
            print(summary)
            assert not problems, "\n".join([summary, *problems])
            assert failed and model.compared == sum(
                1 for op in qmp.log if op.cmd == "x-debug-block-dirty-bitmap-sha256")
            for name in ("frozen", "fine"):  # (seed is QMP's to change)
                assert model.bms[name].lo.sha256() == want_sha[name]
            # the export gone, its bitmaps are free again
            await vm.execute("block-export-del", {"id": "e0"})
            for _ in range(200):
                if not await vm.execute("query-block-exports"):
                    break
                await asyncio.sleep(0.01)
            await vm.execute("block-dirty-bitmap-clear", {"node": NODE, "name": "fine"})
            assert await vm.quit() == 0, vm.stderr
    os.close(fd)
    clean_check(img)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, img)
    stored = {b["name"]: b for b in qemu_bitmaps(img)}
    assert set(stored) == {n for n, bm in model.bms.items() if bm.persistent}
    assert stored["frozen"]["flags"] == stored["fine"]["flags"] == []
    assert peers.nbd_dirty_runs(img, "frozen") == list(model.bms["frozen"].lo.dirty_extents())
    assert peers.nbd_dirty_runs(img, "fine") == []
    print(f"total {time.monotonic() - t0:.1f}s")
