"""Power loss under the NBD server: ``NbdServer`` in process, a client writing through its
export, the server's file calls traced (``powerloss.Recorder``), the disks a power cut could
leave rebuilt and judged.

The server is ``dirtybits nbd -f qcow2 --discard unmap -B g16k``'s (``nbdcrash``): a
writable export of the daemon crash tests' image (``daemoncrash.SPEC``: ``g16k`` recording
and exported, so busy, ``frozen`` disabled), requests run inline on the event loop, no
checkpoint timers. The workload is the kill -9 runs' (``nbdcrash.steps``: WRITEs, some not
sector-aligned, WRITE_ZEROES with and without NO_HOLE, some of both with FUA, TRIMs, here a
third of them with FUA, and FLUSHes), sent one at a time by ``peers.rawnbd``'s client from
a thread, each waiting for its reply, with idle checkpoints among the requests (what the
block thread's idle timer runs in a lull; here the client calls it between two requests, so
the trace is the same every run), then the disconnect and the close (every bitmap
checkpointed). The same again with ``--cache writethrough``: every WRITE and WRITE_ZEROES is
then durable on its reply.

Each step is marked begun and returned in the trace, each request's range noted as
touched; a TRIM's range is read back after it (a TRIM may leave the data or zeros); a
completed FLUSH (and the close) makes the client's view durable (``Recorder.flushed``), a
completed FUA request its own range (``Recorder.durable``). The judge is powerloss's
"registry" one (``regcrash.judge_image``: ``qemu-img check`` finds no corruption; every
bitmap is in_use or consistent and covers every request that returned and every change of
data on the disk; no leak right after a completed flush), then what a completed FLUSH or
FUA request made durable is still there.

- the crash states (subsets, reorderings and 512-byte tears of the writes after the last
  sync) are sound;
- the test can fail: without the data flush of a FLUSH (the syncs of ``Qcow2Image.flush``
  called by ``BlockNode.flush``), without the flush of a FUA write or write-zeroes
  (``BlockNode.write`` / ``write_zeroes`` -> ``Qcow2Image.flush``), without the driver's
  writethrough flush (``Qcow2Image.write`` / ``write_zeroes`` -> ``Qcow2Image.flush``), or
  without the checkpoint's sync before it clears in_use (the site
  ``BitmapRegistry.checkpoint``), the same exploration finds a state that fails for the
  reason that step exists: flushed data lost, a FUA request's data lost, a consistent bitmap
  that misses a write;
- after a failed fdatasync (EIO) under a FLUSH the client gets EIO for it and for every
  later FLUSH, FUA request and the close (nothing is reported durable again), and the crash
  states are sound; an engine that forgets the failure is caught.

``DIRTYBITS_POWERLOSS_SEED`` (default fixed), ``DIRTYBITS_POWERLOSS_STATES``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import daemoncrash as dc
import harness
import nbdcrash as nc
import powerloss as pl

import peers
from dirtybits.errors import DirtybitsError
from peers import rawnbd as nbd

SEED = int(os.environ.get("DIRTYBITS_POWERLOSS_SEED", "20261207"))
STATES = int(os.environ.get("DIRTYBITS_POWERLOSS_STATES", "200"))
STEPS = 60
IDLE = 0.12  # the share of requests an idle checkpoint precedes
REQUESTS = ("write", "zero", "trim")


def steps(seed: int, count: int) -> list[nc.Step]:
    """``nbdcrash.steps`` with idle checkpoints among them (before half of the FLUSHes: a
    lull, then the guest flushes; the FLUSH's checkpoint then has nothing to store and its
    data flush alone makes the writes durable), a third of the TRIMs with FUA (the server
    flushes after them), then the close."""
    rng = random.Random(seed ^ 0x1D7E)
    out: list[nc.Step] = []
    for step in nc.steps(seed, count):
        if rng.random() < (0.5 if step["op"] == "flush" else IDLE):
            out.append({"op": "checkpoint"})
        if step["op"] == "trim" and rng.random() < 0.34:
            step = {**step, "fua": True}
        out.append(step)
    return [*out, {"op": "close"}]


def _client(sock: Path, rec: pl.Recorder, todo: list[nc.Step], node: Any,
            model: bytearray, errors: list[tuple[int, str, int]]) -> None:
    """The workload up to the close, one request at a time (a thread of its own). With
    ``cache=writethrough`` (as qemu-nbd's ``--cache``) every WRITE and WRITE_ZEROES is
    durable on its reply, FUA or not (a TRIM is not: QEMU's discard flushes nothing). A
    request that fails is noted in ``errors`` (step, op, NBD error) and makes nothing
    durable; the workload goes on, as a client that retries later would."""
    writethrough = node.cache in ("writethrough", "directsync")
    c = nbd.Client(sock)
    try:
        c.go(structured=True, contexts=[f"qemu:dirty-bitmap:{nc.EXPORTED}"])
        assert c.size == len(model), c.size
        for k, step in enumerate(todo):
            op = step["op"]
            if op == "close":
                return
            rec.mark(b=k)
            if op == "checkpoint":
                try:
                    node.owner.call(node.checkpoint)  # as the idle timer, between requests
                except DirtybitsError as exc:  # (the timer logs it and tries again later)
                    errors.append((k, f"checkpoint: {exc}", 0))
                rec.mark(e=k)
                continue
            if op in REQUESTS:
                rec.op(step["off"], step["len"])
            c.send(nc.frame(c, step, k + 1))
            reply = c.reply()
            assert reply.cookie == k + 1, (nc.describe(step), reply)
            if reply.error:
                errors.append((k, op + ("+fua" if step.get("fua") else ""), reply.error))
            elif op in REQUESTS:
                off, n = step["off"], step["len"]
                if op == "write":
                    model[off:off + n] = step["data"]
                elif op == "zero":
                    model[off:off + n] = bytes(n)
                else:  # what the TRIM left: the data, or zeros
                    model[off:off + n] = c.read(off, n, cookie=100_000 + k)
                if step.get("fua") or (writethrough and op != "trim"):
                    rec.durable(off, bytes(model[off:off + n]))
            elif op == "flush":
                rec.flushed(bytes(model))
            if reply.error and op in ("write", "zero"):  # written or not, as after a crash
                off, n = step["off"], step["len"]
                model[off:off + n] = step["data"] if op == "write" else bytes(n)
            rec.mark(e=k)
    finally:
        c.disconnect()


async def _drive(ctx: pl.Context, rec: pl.Recorder, todo: list[nc.Step], cache: str) -> None:
    import dirtybits
    from dirtybits.block.aio import AsyncBlockLayer
    from dirtybits.block.open import open_node
    from dirtybits.block.owner import BlockOwner
    from dirtybits.services.nbd.export import ExportSpec, create_export
    from dirtybits.services.nbd.server import NbdServer

    owner = BlockOwner("dirtybits-nbd-powerloss")
    node = owner.call(open_node, str(ctx.image), "qcow2", owner=owner, node_name="nbd0",
                      cache=cache, checkpoint=dirtybits.CheckpointPolicy(**pl.NO_TIMERS))
    node.unmap = True  # --discard unmap
    server = NbdServer(AsyncBlockLayer(owner), inline=True, shared=1)
    model = bytearray(ctx.tpl.pre.tobytes())
    errors: list[tuple[int, str, int]] = ctx.extra.setdefault("errors", [])
    try:
        spec = ExportSpec(id="qemu-nbd-export", name="", writable=True,
                          bitmaps=[nc.EXPORTED], multi_conn=False)
        server.add_export(owner.call(create_export, spec, node))
        with peers.socket_dir("dirtybits-plnbd-") as d:
            sock = d / "nbd.sock"
            await server.listen_unix(str(sock))
            await asyncio.wait_for(asyncio.to_thread(_client, sock, rec, todo, node, model,
                                                     errors), 120)
            k = len(todo) - 1  # the close: the export's bitmaps given back, the node closed
            rec.mark(b=k)
            await server.close()
            try:
                owner.call(node.close)
            except DirtybitsError as exc:  # (after a failed fdatasync)
                errors.append((k, f"close: {exc}", 0))
            else:
                rec.flushed(bytes(model))
            rec.mark(e=k)
    finally:
        await server.close()
        owner.call(node.close)
        owner.stop()


def workload(cache: str) -> pl.Workload:
    """The traced run of ``steps`` through a server of an image opened with ``cache``."""
    def run(ctx: Any, rec: pl.Recorder) -> None:
        todo = steps(ctx.seed, ctx.ops)
        ctx.extra["steps"] = nc.model_steps(todo)  # the registry judge's model
        ctx.extra["nbd"] = todo
        asyncio.run(_drive(ctx, rec, todo, cache))

    return pl.Workload(f"nbd-{cache}", dc.SPEC.name, run, "registry")


WORKLOAD = workload("writeback")  # qemu-nbd's default, and dirtybits nbd's
WRITETHROUGH = workload("writethrough")


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, harness.Template]:
    tdir = tmp_path_factory.mktemp("nbd-templates")
    harness.build_templates(tdir, (dc.SPEC,))
    return harness.load_templates(tdir, (dc.SPEC,))


def _explore(templates: dict[str, harness.Template], work: Path, *,
             drop: set[str] | None = None, drop_under: set[str] | None = None,
             states: int = STATES, want: str = "",
             w: pl.Workload = WORKLOAD) -> tuple[pl.Context, pl.Trace, pl.Report]:
    """A traced run and its crash states (with ``drop``/``drop_under``: near what was
    dropped, until a state fails with a problem that says ``want``)."""
    ctx = pl.prepare(w, templates, work, SEED, STEPS)
    trace, error = pl.trace_run(ctx, drop=drop, drop_under=drop_under)
    assert error is None and not ctx.extra["errors"], (error, ctx.extra["errors"][:3])
    keep = pl.near_dropped(trace) if drop or drop_under else None
    rep = pl.explore(ctx, trace, randoms=2, max_states=states, seed=SEED, error=error,
                     points_filter=keep, stop_if=lambda problems: any(
                         want in p for p in problems) if keep is not None else None)
    return ctx, trace, rep


@pytest.mark.interop
@pytest.mark.timeout(300)
@pytest.mark.parametrize("w", [WORKLOAD, WRITETHROUGH], ids=lambda w: w.name)
def test_power_loss_under_the_nbd_server_is_sound(templates: dict[str, harness.Template],
                                                  tmp_path: Path, w: pl.Workload,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    states = STATES if w is WORKLOAD else STATES * 3 // 4
    ctx, trace, rep = _explore(templates, tmp_path / "run", w=w, states=states)
    todo = ctx.extra["nbd"]
    kinds = {(s["op"], bool(s.get("fua"))) for s in todo}
    with capsys.disabled():
        print(f"\n{w.name} power loss (seed {SEED}): {rep.line()}; steps "
              f"{sorted(op + ('+fua' if fua else '') for op, fua in kinds)}")
    # every kind of request was sent, and the FUA judge had something to judge
    assert {("write", True), ("write", False), ("zero", False), ("trim", False),
            ("flush", False), ("checkpoint", False)} <= kinds, kinds
    assert any(e.kind == "durable" for e in trace.events)
    assert any(p.fua for p in pl.crash_points(trace))
    assert rep.points > 10 and rep.judged >= min(states, 40), rep.line()
    assert not rep.failures, "\n".join(str(f) for f in rep.failures[:5])


def _sites(templates: dict[str, harness.Template], work: Path, part: str) -> set[str]:
    ctx = pl.prepare(WORKLOAD, templates, work, SEED, STEPS)
    trace, _ = pl.trace_run(ctx)
    sites = {s for s in trace.sites() if part in s}
    assert len(sites) == 1, sorted(trace.sites())
    return sites


# (the workload, the calls whose syncs are dropped, what a state then fails with)
DURABLE = "a completed durable (FUA) request"
DROPS: dict[str, tuple[pl.Workload, set[str], str]] = {
    # FLUSH's data flush (the checkpoint after it keeps its own sync: what it syncs is
    # durable all the same, unless it had nothing to store; an idle checkpoint came first)
    "data flush": (WORKLOAD, {"BlockNode.flush>Qcow2Image.flush"}, "flushed sectors lost"),
    # the flush that makes a FUA WRITE or WRITE_ZEROES durable before its reply
    "FUA flush": (WORKLOAD, {"BlockNode.write>Qcow2Image.flush",
                             "BlockNode.write_zeroes>Qcow2Image.flush"}, DURABLE),
    # cache=writethrough: the driver's flush after each write
    "writethrough flush": (WRITETHROUGH, {"Qcow2Image.write>Qcow2Image.flush",
                                          "Qcow2Image.write_zeroes>Qcow2Image.flush"}, DURABLE),
}


@pytest.mark.interop
@pytest.mark.timeout(300)
@pytest.mark.parametrize("what", [*DROPS, "checkpoint sync"])
def test_power_loss_under_the_nbd_server_needs_each_durable_step(
        templates: dict[str, harness.Template], tmp_path: Path, what: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The same workload with one durable step recorded as never made: some crash state
    fails, and for the reason that step exists (a FLUSH's data lost, a FUA request's data
    lost, a consistent bitmap that misses a write); other failures on the way (the image
    corrupt: the flush's syncs also order its metadata) are counted."""
    if what == "checkpoint sync":
        want = "consistent but misses"
        sites = _sites(templates, tmp_path / "sites", "BitmapRegistry.checkpoint")
        _, _, rep = _explore(templates, tmp_path / "drop", drop=sites, states=200, want=want)
    else:
        w, under, want = DROPS[what]
        _, _, rep = _explore(templates, tmp_path / "drop", drop_under=under, states=200,
                             want=want, w=w)
    hit = [f for f in rep.failures if any(want in p for p in f["problems"])]
    with capsys.disabled():
        print(f"\nnbd power loss without the {what}: {rep.line()}\n  "
              f"{hit[0] if hit else rep.failures[:1]}")
    assert rep.failures, f"removing the {what} went unnoticed"
    assert hit, f"removing the {what}: no state failed with {want!r}: {rep.failures[:3]}"


# ---------------------------------------------------------------------------- a failed sync
def _flush_sync(templates: dict[str, harness.Template], work: Path) -> int:
    """The index (among the run's fdatasyncs) of the first sync of the data flush of the
    first FLUSH that comes right after a request (the data of that request to sync: most
    FLUSHes follow an idle checkpoint, whose sync made the data durable already); the rest
    of the workload runs after the failure."""
    ctx = pl.prepare(WORKLOAD, templates, work, SEED, STEPS)
    trace, _ = pl.trace_run(ctx)
    todo = ctx.extra["nbd"]
    step, n, found = -1, 0, []
    for e in trace.events:
        if e.kind == "mark":
            step = json.loads(e.data).get("b", step)
        elif e.kind == "sync":
            if todo[step]["op"] == "flush" and e.site.startswith("image.Qcow2Image.flush"):
                found.append((step, n))
            n += 1
    firsts = [n for i, (step, n) in enumerate(found) if (i == 0 or found[i - 1][0] != step)
              and todo[step - 1]["op"] in REQUESTS]
    return firsts[0]


@pytest.mark.interop
@pytest.mark.timeout(300)
@pytest.mark.parametrize("forgetful", [False, True], ids=["as-is", "forgetful"])
def test_power_loss_after_a_failed_flush_under_the_nbd_server(
        templates: dict[str, harness.Template], tmp_path: Path, forgetful: bool,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An fdatasync of a FLUSH fails (EIO: Linux drops the pages it could not write): the
    client gets EIO for that FLUSH and for every later FLUSH and FUA request (a later
    fdatasync would succeed without the lost pages: nothing may be reported durable again),
    the close reports it, and every crash state is sound with only what was reported durable
    owed. ``forgetful``: the engine forgets the failure (a later sync then "succeeds"), and
    some state loses data a later FLUSH reported durable: this test can fail."""
    from dirtybits.qcow2.image import Qcow2Image

    fail = _flush_sync(templates, tmp_path / "find")
    if forgetful:
        real = Qcow2Image._fdatasync

        def forget(self: Qcow2Image, fd: int, what: str) -> None:
            try:
                real(self, fd, what)
            finally:
                self._sync_failed = None

        monkeypatch.setattr(Qcow2Image, "_fdatasync", forget)
    ctx = pl.prepare(WORKLOAD, templates, tmp_path / "run", SEED, STEPS)
    trace, error = pl.trace_run(ctx, fail_sync=fail)
    assert error is None, error
    todo, errors = ctx.extra["nbd"], ctx.extra["errors"]
    rep = pl.explore(ctx, trace, randoms=8, max_states=150, seed=SEED,
                     stop_at_first=forgetful)
    with capsys.disabled():
        print(f"\nnbd power loss after a failed fdatasync (#{fail}, "
              f"{'forgetful' if forgetful else 'as is'}): {rep.line()}\n  errors "
              f"{[(k, what.split(':')[0], e) for k, what, e in errors]}\n  "
              f"{rep.failures[:1]}")
    assert errors and todo[errors[0][0]]["op"] == "flush" and errors[0][2] == nbd.EIO, errors
    if forgetful:
        assert rep.failures, "a forgetful engine went unnoticed"
        return
    # every later FLUSH, FUA request and the close failed too; nothing else did (an idle
    # checkpoint with bits to store fails as well)
    first = errors[0][0]
    owed = [k for k, s in enumerate(todo) if k >= first and (
        s["op"] in ("flush", "close") or s.get("fua"))]
    failed = [k for k, *_ in errors if todo[k]["op"] != "checkpoint"]
    assert failed == owed, (errors, owed)
    assert not rep.failures, "\n".join(str(f) for f in rep.failures[:5])
