"""Kill -9 of ``dirtybits nbd`` while a client writes through its export (``nbdcrash.py``).

Each run copies the pre-image (``daemoncrash.SPEC``: persistent bitmaps ``g16k``, recording,
and ``frozen``, disabled, made by QEMU's tools), starts ``dirtybits nbd -t -f qcow2
--discard unmap -B g16k -k SOCKET IMAGE`` as a user runs it, and sends the workload of its
seed (WRITE, WRITE_ZEROES, TRIM, FLUSH; some with FUA), one request at a time, each waiting
for its reply. Then SIGKILL, by the plan of the run:

- ``flight``: 0 to 4 ms after a request was sent, before its reply (whatever reply came
  before the kill counts as received);
- ``reply``: right after the reply to a write came back;
- ``timed``: at a random moment (a timer, whatever the client is doing);
- ``lull``: after a reply and a pause longer than the default idle checkpoint (0.5 s);
- ``quit``: no kill: SIGTERM after the workload: every bitmap must be consistent.

The judge: ``daemoncrash.judge_daemon_image`` (``regcrash.judge_image``: ``qemu-img check``
finds no corruption, leaks allowed; every bitmap that reads consistent covers every request
whose reply came back, and every change of data it recorded even from the request in
flight; the others are in_use, reported inconsistent with a reason by ``dirtybits.open``
read-only and flagged ``in-use`` by ``qemu-img info``). Then the data, read by QEMU: each
sector holds a value it held since its last durable point (a completed FLUSH, or a completed
FUA request over it), as the requests whose replies came (and the one in flight) left it. Not
"every acknowledged write is there": a kill -9 keeps the page cache, but the qcow2 driver,
as QEMU's, keeps new clusters' L2 entries in memory until a flush (writeback metadata), so
an acknowledged write without FUA may be lost; its data must then read as before.

``DIRTYBITS_CRASH_SEED`` (default: random, printed) and ``DIRTYBITS_NBD_KILLS`` (default 10).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import daemoncrash as dc
import harness
import nbdcrash as nc

import peers
from peers import rawnbd as nbd

SEED = int(os.environ.get("DIRTYBITS_CRASH_SEED") or random.SystemRandom().getrandbits(32))
KILLS = int(os.environ.get("DIRTYBITS_NBD_KILLS", "10"))
MODES = dc.KILL_MODES


@dataclass
class Plan:
    seed: int
    mode: str
    at: int = 0  # the step at (flight) or after (reply, lull) which the kill comes
    delay: float = 0.0
    structured: bool = True

    @classmethod
    def of(cls, seed: int, mode: str, todo: list[nc.Step]) -> Plan:
        rng = random.Random(seed ^ 0x4BD)
        plan = cls(seed, mode, structured=rng.random() < 0.5)
        if mode == "flight":
            plan.at = rng.randrange(len(todo))
            plan.delay = rng.choice((0.0, rng.uniform(0, 0.0003), rng.uniform(0, 0.0015),
                                     rng.uniform(0, 0.004)))
        elif mode == "reply":
            writes = [k for k, s in enumerate(todo) if s["op"] in ("write", "zero", "trim")]
            plan.at = rng.choice(writes or [0])
        elif mode == "lull":
            plan.at = rng.randrange(len(todo))
        elif mode == "timed":
            plan.delay = rng.uniform(0.005, 0.15)
        return plan


@dataclass
class Run:
    plan: Plan
    done: int = 0  # replies received
    in_flight: bool = False
    killed: bool = False
    consistent: int = 0
    inconsistent: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"seed {self.plan.seed} {self.plan.mode} at {self.plan.at} delay "
                f"{self.plan.delay:.4f}: {self.done} replies, in flight {self.in_flight}: "
                f"{self.problems[:4]}")


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


def drive(c: nbd.Client, proc: subprocess.Popen[bytes], plan: Plan, todo: list[nc.Step],
          run: Run) -> None:
    """The workload, one request at a time, until the plan kills the server."""
    timer = None
    if plan.mode == "timed":
        timer = threading.Timer(plan.delay, kill, (proc,))
        timer.start()
    try:
        for k, step in enumerate(todo):
            run.in_flight = True  # (from before its first byte: a cut frame never runs)
            try:
                c.send(nc.frame(c, step, k + 1))
                if plan.mode == "flight" and k == plan.at:
                    time.sleep(plan.delay)
                    kill(proc)
                    proc.wait(20)
                reply = c.reply()  # (after a kill: what came before it, or Closed)
            except nbd.Closed:
                if plan.mode in ("flight", "timed"):
                    return
                raise
            assert reply.cookie == k + 1 and reply.error == 0, (nc.describe(step), reply)
            run.done, run.in_flight = k + 1, False
            if proc.poll() is not None:
                return
            if k == plan.at and plan.mode in ("reply", "lull"):
                if plan.mode == "lull":
                    time.sleep(0.8)
                kill(proc)
                return
        if plan.mode == "quit":
            c.disconnect()
            proc.send_signal(signal.SIGTERM)
        elif plan.mode == "timed":
            time.sleep(plan.delay)  # the workload ended first: the kill still comes
    finally:
        if timer is not None:
            timer.join()


def one_kill(seed: int, mode: str, tpl: harness.Template, work: Path) -> Run:
    plan_todo = nc.steps(seed)
    plan = Plan.of(seed, mode, plan_todo)
    run = Run(plan)
    image = work / f"k{seed}.qcow2"
    shutil.copyfile(tpl.qcow2, image)
    with nbd.serve_nbd(image, *nc.SERVER_OPTIONS) as srv:
        c = nbd.Client(srv.sock)
        try:
            c.go(structured=plan.structured, contexts=[f"qemu:dirty-bitmap:{nc.EXPORTED}"]
                 if plan.structured else ())
            drive(c, srv.proc, plan, plan_todo, run)
        finally:
            c.close()
            if plan.mode != "quit":
                kill(srv.proc)
            code = srv.proc.wait(20)
        if plan.mode == "quit":
            if code != 0:
                run.problems.append(f"SIGTERM: exit {code}: {srv.stderr()[-2000:]}")
        elif code != -signal.SIGKILL:
            run.problems.append(f"the server exited {code} before the kill: "
                                f"{srv.stderr()[-2000:]}")
        else:
            run.killed = True
        log = srv.stderr()
        if "Traceback" in log or "request handling failed" in log:
            run.problems.append(f"the server's log: {log[-2000:]}")
    alts = dc.states_for(tpl, nc.model_steps(plan_todo), run.done, run.in_flight)
    v, _ = dc.judge_daemon_image(image, alts, quiet=plan.mode == "quit")
    run.problems += v.problems
    run.consistent, run.inconsistent = v.consistent, v.inconsistent
    # the data: as the requests whose replies came left it, back to the last durable point
    guest = nc.Guest(tpl.pre)
    for step in plan_todo[:run.done]:
        guest.apply(step)
    if run.in_flight and run.done < len(plan_todo):
        guest.apply(plan_todo[run.done], durable=False)  # landed or not
    raw = work / f"k{seed}.raw"
    peers.qemu_img("convert", "-f", "qcow2", "-O", "raw", image, raw)
    bad = guest.mismatches(np.fromfile(raw, dtype=np.uint8))
    if bad:
        run.problems.append(f"{len(bad)} sectors differ from the replies received (first at "
                            f"{bad[0] * nc.SECTOR:#x})")
    raw.unlink()
    return run


@pytest.mark.interop
@pytest.mark.timeout(180)
def test_kill9_nbd_leaves_no_silent_miss(qemu_tools: dict[str, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    tpl = harness.template(tmp_path / "templates", nc.SPEC)
    runs: list[Run] = []
    start = time.monotonic()
    for i in range(KILLS):
        kseed = random.Random(f"nbd:{SEED}:{i}").getrandbits(48)
        runs.append(one_kill(kseed, MODES[i % len(MODES)], tpl, tmp_path))
    failures = [r for r in runs if r.problems]
    report = [f"nbd kill -9 seed {SEED} (DIRTYBITS_CRASH_SEED={SEED} replays this run): "
              f"{KILLS} runs in {time.monotonic() - start:.1f} s",
              f"killed={sum(r.killed for r in runs)} "
              f"in flight={sum(r.in_flight for r in runs)} "
              f"consistent={sum(r.consistent for r in runs)} "
              f"inconsistent={sum(r.inconsistent for r in runs)} failures={len(failures)}"]
    report += [f"  FAILED {r.line()}" for r in failures[:8]]
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert not failures, "\n".join(report)
    assert sum(r.killed for r in runs) == sum(r.plan.mode != "quit" for r in runs)
    assert sum(r.consistent for r in runs) > 0 and sum(r.inconsistent for r in runs) > 0
