"""Kill -9 of ``dirtybits serve`` while a QMP client drives it (``daemoncrash.py``).

Each run copies the pre-image (two persistent bitmaps made by ``qemu-img bitmap --add``),
starts ``dirtybits serve --blockdev ... --qmp unix:...`` as a user runs it, and drives the
workload of its seed over QMP (``qemu.qmp``): the add of a third persistent bitmap, writes
and write-zeroes through ``human-monitor-command qemu-io``, clears, merges, enables,
disables, transactions, ``x-dirtybits-checkpoint`` and flushes. Then SIGKILL, by the plan of
the run:

- ``flight``: 0 to 4 ms after a command was sent (on a second monitor), before its reply;
- ``reply``: right after the reply to a write came back;
- ``timed``: at a random moment (a timer, whatever the client is doing);
- ``lull``: after a reply and a pause longer than the daemon's idle checkpoint;
- ``quit``: no kill: the workload ends with ``quit``: every bitmap must then be consistent.

The judge (``daemoncrash.judge_daemon_image``, on ``regcrash.judge_image``): no corruption;
every bitmap that reads consistent covers every write whose reply came back, and every
change of data it recorded even from the command in flight (the write reached the disk, or
it did not and nothing is owed); the others are in_use, reported inconsistent (with a
reason) by ``dirtybits.open`` read-only and flagged ``in-use`` by ``qemu-img info``. Then the
same command line again must come up, report each bitmap with its state through
``query-named-block-nodes``, and leave the disk as it was after its ``quit``.

``DIRTYBITS_CRASH_SEED`` (default: random, printed on failure) and ``DIRTYBITS_DAEMON_KILLS``
(default 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import daemoncrash as dc
import harness
import regcrash

import peers

SEED = int(os.environ.get("DIRTYBITS_CRASH_SEED") or random.SystemRandom().getrandbits(32))
KILLS = int(os.environ.get("DIRTYBITS_DAEMON_KILLS", "12"))
MODES = dc.KILL_MODES


@dataclass
class Plan:
    seed: int
    mode: str
    at: int = 0  # the step at (flight) or after (reply, lull) which the kill comes
    delay: float = 0.0  # seconds: after the send (flight), from the start (timed)

    @classmethod
    def of(cls, seed: int, mode: str, todo: list[dc.Step]) -> Plan:
        rng = random.Random(seed ^ 0xD43)
        plan = cls(seed, mode)
        if mode == "flight":
            # a bitmap operation in flight as often as a guest request
            kinds = [k for k, s in enumerate(todo) if (s["op"] in ("write", "zero"))
                     == (rng.random() < 0.5)]
            plan.at = rng.choice(kinds or range(len(todo)))
            plan.delay = rng.choice((0.0, rng.uniform(0, 0.0003), rng.uniform(0, 0.0015),
                                     rng.uniform(0, 0.004)))
        elif mode == "reply":  # after a guest write: the bitmaps that recorded it are open
            plan.at = rng.choice([k for k, s in enumerate(todo) if s["op"] == "write"])
        elif mode == "lull":
            plan.at = rng.randrange(len(todo))
        elif mode == "timed":
            plan.delay = rng.uniform(0.005, 0.25)
        return plan


@dataclass
class Run:
    plan: Plan
    done: int = 0
    in_flight: str = ""
    killed: bool = False
    consistent: int = 0
    inconsistent: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"seed {self.plan.seed} {self.plan.mode} at {self.plan.at} delay "
                f"{self.plan.delay:.4f}: {self.done} replies, in flight: "
                f"{self.in_flight or '-'}: {self.problems[:4]}")


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


class RawMonitor:
    """A second monitor on a plain blocking socket: the command killed in flight is sent
    there, so the kill follows its last byte by exactly the planned delay."""

    def __init__(self, sock: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(sock))
        self.buf = b""
        self.line()  # the greeting
        self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert self.line() == b'{"return": {}}\r\n'

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            more = self.sock.recv(65536)
            if not more:
                raise EOFError(f"the monitor closed after {self.buf[:200]!r}")
            self.buf += more
        out, _, self.buf = self.buf.partition(b"\n")
        return out + b"\n"

    def rest(self) -> bytes:
        """Everything the daemon sent up to its death."""
        with contextlib.suppress(OSError):
            while more := self.sock.recv(65536):
                self.buf += more
        return self.buf

    def close(self) -> None:
        self.sock.close()


async def drive(serve: dc.Serve, proc: subprocess.Popen[bytes], plan: Plan,
                todo: list[dc.Step], run: Run) -> dc.Progress:
    """Run the workload over QMP until the plan kills the daemon (or it quits)."""
    from qemu.qmp import ExecuteError

    prog = dc.Progress()
    qmp = await dc.connect(serve.sock, f"kill{plan.seed}")
    raw = RawMonitor(serve.sock) if plan.mode == "flight" else None
    timer = None
    try:
        if plan.mode == "timed":
            timer = asyncio.get_running_loop().call_later(plan.delay, kill, proc)
        for k, step in enumerate(todo):
            if raw is not None and k == plan.at:
                name, args = dc.qmp_of(step)
                prog.sent = k + 1
                raw.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode()
                                 + b"\n")
                time.sleep(plan.delay)
                run.killed = proc.poll() is None
                kill(proc)
                await asyncio.to_thread(proc.wait, 20)
                reply = raw.rest()
                if reply:  # it finished before the kill: it is owed
                    prog.done = k + 1
                    if json.loads(reply).get("return", "?") != dc.expected_return(step) \
                            and dc.expected_return(step) is not None:
                        prog.errors.append(f"step {k} {regcrash.describe(step)}: {reply!r}")
                return prog
            task = asyncio.ensure_future(dc.run_step(qmp.execute, step, k, prog))
            try:
                await asyncio.wait_for(task, 20)
            except ExecuteError as exc:
                prog.errors.append(f"step {k} {regcrash.describe(step)}: {exc}")
                return prog
            except Exception:  # the timed kill struck: the connection is gone
                if plan.mode != "timed":
                    raise
                return prog
            if k == plan.at and plan.mode in ("reply", "lull"):
                if plan.mode == "lull":
                    await asyncio.sleep(0.8)  # past the default idle checkpoint (0.5 s)
                run.killed = proc.poll() is None
                kill(proc)
                return prog
        if plan.mode == "quit":
            await qmp.execute("quit")
        elif plan.mode == "timed":
            await asyncio.sleep(plan.delay)  # the workload ended first: the kill still comes
        return prog
    finally:
        if timer is not None:
            timer.cancel()
            run.killed = run.killed or proc.poll() is None
            kill(proc)
        if raw is not None:
            raw.close()
        await dc.disconnect(qmp)


async def one_kill(seed: int, mode: str, tpl: harness.Template, work: Path) -> Run:
    todo = dc.steps(seed)
    plan = Plan.of(seed, mode, todo)
    run = Run(plan)
    start = time.monotonic()
    with peers.socket_dir("dirtybits-k9d-") as d:
        image = work / f"k{seed}.qcow2"
        shutil.copyfile(tpl.qcow2, image)
        serve = dc.Serve(image, d)
        proc = serve.start("crash")
        try:
            prog = await drive(serve, proc, plan, todo, run)
        finally:
            if plan.mode != "quit":
                kill(proc)
            code = await asyncio.to_thread(proc.wait, 20)
        run.problems += prog.errors
        if plan.mode == "quit":
            if code != 0:
                run.problems.append(f"quit: exit {code}: {serve.text('crash', 'err')}")
        elif code != -signal.SIGKILL:
            run.problems.append(f"the daemon exited {code} before the kill: "
                                f"{serve.text('crash', 'err')[-2000:]}")
        else:
            run.killed = True
        run.done = prog.done
        if prog.in_flight:
            run.in_flight = regcrash.describe(todo[prog.done])
        # every completed guest request printed qemu-io's "wrote" line; nothing failed
        out = serve.text("crash", "out")
        writes = sum(s["op"] in ("write", "zero") for s in todo[:prog.done])
        if out.count("wrote ") < writes or "failed" in out or "rror" in out:
            run.problems.append(f"qemu-io output: {writes} writes done, but: {out[-500:]}")
        alts = dc.states_for(tpl, todo, prog.done, prog.in_flight)
        v, disk = dc.judge_daemon_image(image, alts, quiet=plan.mode == "quit")
        run.problems += v.problems
        run.consistent, run.inconsistent = v.consistent, v.inconsistent
        if not run.problems:
            run.problems += await dc.restart_and_check(serve, disk, "restart")
    run.seconds = time.monotonic() - start
    return run


@pytest.mark.interop
@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_kill9_daemon_leaves_no_silent_miss(qemu_tools: dict[str, str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    tpl = harness.template(tmp_path / "templates", dc.SPEC)
    runs: list[Run] = []
    start = time.monotonic()
    for i in range(KILLS):
        kseed = random.Random(f"daemon:{SEED}:{i}").getrandbits(48)
        runs.append(await one_kill(kseed, MODES[i % len(MODES)], tpl, tmp_path))
    failures = [r for r in runs if r.problems]
    in_flight = [r for r in runs if r.in_flight]
    ops_in_flight = [r for r in in_flight if '"op": "write"' not in r.in_flight
                     and '"op": "zero"' not in r.in_flight]
    report = [f"daemon kill -9 seed {SEED} (DIRTYBITS_CRASH_SEED={SEED} replays this run): "
              f"{KILLS} runs in {time.monotonic() - start:.1f} s",
              f"killed={sum(r.killed for r in runs)} in flight={len(in_flight)} "
              f"(bitmap operations: {len(ops_in_flight)}) "
              f"consistent={sum(r.consistent for r in runs)} "
              f"inconsistent={sum(r.inconsistent for r in runs)} failures={len(failures)}"]
    report += [f"  FAILED {r.line()}" for r in failures[:8]]
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert not failures, "\n".join(report)
    assert sum(r.killed for r in runs) == sum(r.plan.mode != "quit" for r in runs)
    assert in_flight, "no kill found a command in flight"
    assert sum(r.consistent for r in runs) > 0 and sum(r.inconsistent for r in runs) > 0
