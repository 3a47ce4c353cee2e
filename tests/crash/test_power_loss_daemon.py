"""Power loss under ``dirtybits serve``: the ``Daemon`` in process, driven over QMP, its file
calls traced (``powerloss.Recorder``), the disks a power cut could leave rebuilt and judged.

The workload is the kill -9 runs' (``daemoncrash.steps``: the QMP add of a persistent bitmap,
writes and write-zeroes through ``human-monitor-command qemu-io``, clears, merges, enables,
disables, transactions, ``x-dirtybits-checkpoint``, flushes), then ``quit``. Each step is
marked begun and returned in the trace (a reply came back), so the judge knows which steps
a crash point follows: ``regcrash.judge_image`` against the model after those steps, or
after the one in flight too (powerloss's "registry" judge), then no leak right after a
completed flush, and what a completed flush made durable is still there.

- the crash states (subsets, reorderings and 512-byte tears of the writes after the last
  sync) are sound;
- the test can fail: without the checkpoint's sync before it clears in_use (the sync site
  ``BitmapRegistry.checkpoint``), or without the durable in_use mark (``_mark``), the same
  exploration finds a failing state.

``DIRTYBITS_POWERLOSS_SEED`` (default fixed), ``DIRTYBITS_POWERLOSS_STATES``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import daemoncrash as dc
import harness
import powerloss as pl
import regcrash

import peers

SEED = int(os.environ.get("DIRTYBITS_POWERLOSS_SEED", "20261207"))
STATES = int(os.environ.get("DIRTYBITS_POWERLOSS_STATES", "240"))
STEPS = 40


async def _drive(ctx: pl.Context, rec: pl.Recorder, todo: list[dc.Step]) -> None:
    from dirtybits.services.daemon import Daemon, DaemonConfig, Monitor

    hmp: list[str] = []
    with peers.socket_dir("dirtybits-pld-") as d:
        sock = d / "qmp.sock"
        daemon = Daemon(DaemonConfig(blockdevs=[dc.blockdev(ctx.image)],
                                     monitors=[Monitor(str(sock))]), hmp_out=hmp.append)
        await daemon.start()
        waiter = asyncio.ensure_future(daemon.wait())
        qmp = await dc.connect(sock, "powerloss")
        try:
            prog = dc.Progress()
            model = bytearray(ctx.tpl.pre.tobytes())
            for k, step in enumerate(todo):
                rec.mark(b=k)
                op = step["op"]
                if op in regcrash.REQUESTS:
                    rec.op(step["off"], step["len"])
                if op == "close":  # quit: every node closed, every bitmap checkpointed
                    await qmp.execute("quit")
                    await asyncio.wait_for(waiter, 20)
                else:
                    await dc.run_step(qmp.execute, step, k, prog)
                if op == "write":
                    model[step["off"]:step["off"] + step["len"]] = step["data"]
                elif op == "zero":
                    model[step["off"]:step["off"] + step["len"]] = bytes(step["len"])
                if op in ("flush", "close"):
                    rec.flushed(bytes(model))
                rec.mark(e=k)
        finally:
            await dc.disconnect(qmp)
            daemon.stop()
            await asyncio.wait_for(waiter, 20)
    writes = sum(s["op"] in regcrash.REQUESTS for s in todo)
    text = "".join(hmp)
    assert not prog.errors, prog.errors
    assert text.count("wrote ") == writes and "failed" not in text, text[-2000:]


def workload(name: str, make: Callable[[int], list[dc.Step]]) -> pl.Workload:
    """A traced run of the steps ``make(seed)``, then ``quit``."""
    def run(ctx: Any, rec: pl.Recorder) -> None:
        todo = [*make(ctx.seed), {"op": "close"}]
        ctx.extra["steps"] = todo
        asyncio.run(_drive(ctx, rec, todo))

    return pl.Workload(name, dc.SPEC.name, run, "registry")


WORKLOAD = workload("daemon", lambda seed: dc.steps(seed, STEPS))


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, harness.Template]:
    tdir = tmp_path_factory.mktemp("daemon-templates")
    harness.build_templates(tdir, (dc.SPEC,))
    return harness.load_templates(tdir, (dc.SPEC,))


def _explore(templates: dict[str, harness.Template], work: Path, *,
             drop: set[str] | None = None, drop_under: set[str] | None = None,
             states: int = STATES, w: pl.Workload = WORKLOAD) -> pl.Report:
    ctx = pl.prepare(w, templates, work, SEED, STEPS)
    trace, error = pl.trace_run(ctx, drop=drop, drop_under=drop_under)
    assert error is None, error
    keep = pl.near_dropped(trace) if drop or drop_under else None
    return pl.explore(ctx, trace, randoms=2, max_states=states, seed=SEED, error=error,
                      stop_at_first=keep is not None, points_filter=keep)


@pytest.mark.interop
@pytest.mark.timeout(300)
def test_power_loss_under_the_daemon_is_sound(templates: dict[str, harness.Template],
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rep = _explore(templates, tmp_path / "run")
    with capsys.disabled():
        print(f"\ndaemon power loss (seed {SEED}): {rep.line()}")
    assert rep.points > 10 and rep.judged >= min(STATES, 40), rep.line()
    assert not rep.failures, "\n".join(str(f) for f in rep.failures[:5])


@pytest.mark.interop
@pytest.mark.timeout(300)
@pytest.mark.parametrize("what", ["checkpoint sync", "in_use mark"])
def test_power_loss_under_the_daemon_needs_each_durable_step(
        templates: dict[str, harness.Template], tmp_path: Path, what: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The same workload, with the checkpoint's sync before in_use is cleared (the site
    ``BitmapRegistry.checkpoint``) or the in_use mark's durable write (under
    ``BitmapRegistry._mark``) recorded as never made: some crash state fails."""
    if what == "checkpoint sync":
        ctx = pl.prepare(WORKLOAD, templates, tmp_path / "sites", SEED, STEPS)
        trace, _ = pl.trace_run(ctx)
        sites = {s for s in trace.sites() if "BitmapRegistry.checkpoint" in s}
        assert len(sites) == 1, sorted(trace.sites())
        rep = _explore(templates, tmp_path / "drop", drop=sites, states=150)
    else:
        rep = _explore(templates, tmp_path / "drop", drop_under={"BitmapRegistry._mark"},
                       states=150)
    with capsys.disabled():
        first = rep.failures[0] if rep.failures else None
        print(f"\ndaemon power loss without the {what}: {rep.line()}\n  {first}")
    assert rep.failures, f"removing the {what} went unnoticed"


# ---------------------------------------------------------------------------- found bugs
# A transaction is all or nothing in memory, but not on disk: enable and disable write the
# bitmap's auto flag when they are prepared, and a clear or a merge of a clean persistent
# bitmap each switches its stored copy when it commits, one after the other, each durable
# and consistent. A power cut, or a kill -9 (the state "all": every write made so far),
# between two of those writes of one bitmap leaves it neither as before the transaction
# nor as after it. The workload above changes each bitmap once per transaction.
def _write(off: int, length: int, pat: int) -> dc.Step:
    return {"op": "write", "off": off, "len": length, "pat": pat, "data": bytes([pat]) * length}


CLEAR_THEN_MERGE = workload("tx-clear-merge", lambda seed: [
    _write(1 * dc.MiB, 64 * dc.KiB, 0x5A),
    {"op": "tx", "actions": [{"op": "clear", "name": dc.FROZEN},
                             {"op": "merge", "target": dc.FROZEN, "sources": ["g16k"]}]}])
MERGE_AND_DISABLE = workload("tx-merge-disable", lambda seed: [
    _write(1 * dc.MiB, 64 * dc.KiB, 0x5A),
    {"op": "checkpoint"},  # g16k's stored copy clean: the merge stores it whole at commit
    {"op": "tx", "actions": [{"op": "merge", "target": "g16k", "sources": [dc.FROZEN]},
                             {"op": "disable", "name": "g16k"}]}])


@pytest.mark.interop
@pytest.mark.timeout(120)
def test_transaction_clear_then_merge_of_one_bitmap_never_reads_half_done(
        templates: dict[str, harness.Template], tmp_path: Path) -> None:
    rep = _explore(templates, tmp_path / "cm", w=CLEAR_THEN_MERGE, states=60)
    assert not rep.failures, rep.failures[0]


@pytest.mark.interop
@pytest.mark.timeout(120)
def test_transaction_merge_and_disable_of_one_bitmap_never_reads_half_done(
        templates: dict[str, harness.Template], tmp_path: Path) -> None:
    rep = _explore(templates, tmp_path / "md", w=MERGE_AND_DISABLE, states=60)
    assert not rep.failures, rep.failures[0]
