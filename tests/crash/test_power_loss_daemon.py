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


def _run(ctx: Any, rec: pl.Recorder) -> None:
    todo = [*dc.steps(ctx.seed, STEPS), {"op": "close"}]
    ctx.extra["steps"] = todo
    asyncio.run(_drive(ctx, rec, todo))


WORKLOAD = pl.Workload("daemon", dc.SPEC.name, _run, "registry")


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, harness.Template]:
    tdir = tmp_path_factory.mktemp("daemon-templates")
    harness.build_templates(tdir, (dc.SPEC,))
    return harness.load_templates(tdir, (dc.SPEC,))


def _explore(templates: dict[str, harness.Template], work: Path, *,
             drop: set[str] | None = None, drop_under: set[str] | None = None,
             states: int = STATES) -> pl.Report:
    ctx = pl.prepare(WORKLOAD, templates, work, SEED, STEPS)
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
