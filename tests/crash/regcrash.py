"""Crashes during the bitmap registry's operations: a mixed workload, its model, its judge.

Shared by the power-loss workload "registry" (``powerloss.py``, ``test_power_loss.py``) and
the kill -9 runs of ``test_kill9_registry.py`` (``python tests/crash/regcrash.py run``).

The workload (``steps``) opens an image with persistent bitmaps and interleaves guest writes
and write-zeroes with every registry path on the open node: a clear of a bitmap never read
(copy-on-write at commit) and of a materialized one (overwritten in place), merges into a
persistent bitmap from a transient and from a persistent one, a persistent bitmap added
while open and then written to, disable and enable (of a template bitmap, and of the
disabled one), a persistent copy, a rename, a remove, two transactions of several actions
(one clears a never-read bitmap inside it), and two successor cycles (create, writes, a
checkpoint, reclaim; create, writes, abdicate), with checkpoints and flushes among them.

The model (``Model``) keeps, as QEMU's iotest 257 does, what each bitmap must hold after
every step: per bitmap (an identity that survives renames) its ``req``uired sectors (the
ranges of the completed requests it recorded, and of what was merged or copied into it), its
*baseline* (the guest data at its creation, last completed clear, or abdicate: the data the
bitmap is relative to), and ``unrec``: sectors requested while it was not recording (a
disabled bitmap may legitimately lack them). ``states(steps)[j]`` is the model after ``j``
completed steps.

``judge_image`` judges one crashed image against the model; its docstring states the rule.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
FROZEN = harness.FROZEN

# 1 KiB clusters: the 512-byte bitmap is two clusters (chunks), so its in-place updates
# write one chunk of two and tear within clusters; an 8 MiB disk keeps each state cheap.
TEMPLATE = harness.TemplateSpec("rg1k", 1 * KiB, {"g512": 512, "g16k": 16 * KiB,
                                                  "g64k": 64 * KiB, FROZEN: 64 * KiB},
                                size=8 * MiB)
NO_TIMERS: dict[str, float | int | None] = {"interval": None, "idle": None,
                                            "threshold_bits": None}
# kill -9 runs also draw timed policies: the block thread checkpoints between the calls
POLICIES: tuple[dict[str, float | int | None], ...] = (
    NO_TIMERS,
    {"interval": 0.05, "idle": 0.01, "threshold_bits": 256},
    {"interval": None, "idle": 0.003, "threshold_bits": None},
)

Step = dict[str, Any]


# ---------------------------------------------------------------------------- the workload
SCRIPT: tuple[Step, ...] = (
    {"op": "add", "name": "t1", "gran": 4096, "persistent": False},
    {"op": "add", "name": "added", "gran": 4096, "persistent": True},  # added while open
    {"op": "W"},
    {"op": "clear", "name": "g16k"},  # never read: copy-on-write at commit
    {"op": "W"},
    {"op": "query", "name": "g512"},  # read: materialized from here on
    {"op": "merge", "target": "g512", "sources": ["t1"]},  # from a transient bitmap
    {"op": "W"},
    {"op": "F"},
    {"op": "clear", "name": "g512"},  # materialized: its chunks overwritten in place
    {"op": "W"},
    {"op": "flush"},
    {"op": "merge", "target": "added", "sources": ["g16k"]},  # from a persistent one
    {"op": "W"},
    {"op": "disable", "name": "added"},
    {"op": "W"},
    {"op": "enable", "name": "added"},
    {"op": "W"},
    {"op": "enable", "name": FROZEN},  # disabled in the template: records from here on
    {"op": "W"},
    {"op": "copy", "name": "g512", "new": "g512c", "persistent": True},
    {"op": "W"},
    {"op": "rename", "name": "g512c", "new": "renamed"},
    {"op": "W"},
    {"op": "F"},
    {"op": "tx", "actions": [
        {"op": "clear", "name": "g64k"},  # never read: copy-on-write inside a transaction
        {"op": "merge", "target": "renamed", "sources": ["t1", "added"]},
        {"op": "add", "name": "txadd", "gran": 8192, "persistent": True},
        {"op": "disable", "name": FROZEN},
        {"op": "clear", "name": "t1"},
    ]},
    {"op": "W"},
    {"op": "succ", "name": "g512", "owner": "job1"},  # frozen: the successor records
    {"op": "W"},
    {"op": "checkpoint"},  # stores the union of the frozen bits and the successor
    {"op": "W"},
    {"op": "reclaim", "name": "g512"},
    {"op": "W"},
    {"op": "succ", "name": "renamed", "owner": "job2"},
    {"op": "W"},
    {"op": "F"},
    {"op": "abdicate", "name": "renamed"},  # only the successor's writes are kept
    {"op": "W"},
    {"op": "remove", "name": "added"},
    {"op": "W"},
    {"op": "tx", "actions": [
        {"op": "remove", "name": "txadd"},
        {"op": "merge", "target": "g64k", "sources": ["g512", "t1"]},
        {"op": "enable", "name": FROZEN},
    ]},
    {"op": "W"},
    {"op": "close"},
)

REQUESTS = ("write", "zero")
# Only the ``F`` writes go here (the template has no data there): each allocates a new
# cluster right before a clear, a transaction or an abdicate, so its mapping is not yet
# flushed when the bitmap's baseline moves past it.
FRESH = (4 * MiB, 4 * MiB + 512 * KiB)


def steps(seed: int, size: int, between: int = 2) -> list[Step]:
    """The script with ``between`` random requests (and now and then a checkpoint or a
    flush) at each ``W``, and one allocating write at each ``F``. Deterministic in
    ``seed``: a kill -9 parent rebuilds it."""
    rng = random.Random(seed)
    out: list[Step] = []
    fresh = FRESH[0]
    for s in SCRIPT:
        if s["op"] == "F":
            length = rng.randrange(1, 5) * 4096
            out.append({"op": "write", "off": fresh + 512, "len": length,
                        "data": rng.randbytes(length)})
            fresh += 64 * KiB
            continue
        if s["op"] != "W":
            out.append(s)
            continue
        for _ in range(rng.randrange(1, 2 * between)):
            r = rng.random()
            if r < 0.08:
                out.append({"op": "checkpoint"})
                continue
            if r < 0.13:
                out.append({"op": "flush"})
                continue
            length = rng.choice((512, 4096, rng.randrange(1, 17) * 4096, 70 * KiB))
            offset = rng.randrange(0, (size - length) // SECTOR) * SECTOR
            if offset < FRESH[1] and offset + length > FRESH[0]:
                offset = (offset + FRESH[1] - FRESH[0]) % (size - length) // SECTOR * SECTOR
                if offset < FRESH[1] and offset + length > FRESH[0]:
                    offset = 0
            if r < 0.8:
                out.append({"op": "write", "off": offset, "len": length,
                            "data": rng.randbytes(length)})
            else:
                out.append({"op": "zero", "off": offset, "len": length,
                            "unmap": rng.random() < 0.5})
    return out


def describe(step: Step) -> str:
    s = {k: v for k, v in step.items() if k != "data"}
    return json.dumps(s)


def execute(node: Any, step: Step) -> None:
    """Run one step on the open node (registry calls as the API offers them)."""
    op = step["op"]
    reg = node.bitmaps
    if op == "write":
        node.write(step["off"], step["data"])
    elif op == "zero":
        node.write_zeroes(step["off"], step["len"], unmap=step["unmap"])
    elif op == "flush":
        node.flush()
    elif op == "checkpoint":
        node.checkpoint()
    elif op == "close":
        node.close()
    elif op == "query":
        reg.count(step["name"])
    elif op == "copy":
        reg.copy(step["name"], step["new"], persistent=step["persistent"])
    elif op == "rename":
        reg.rename(step["name"], step["new"])
    elif op == "succ":
        reg.create_successor(step["name"], step["owner"])
    elif op == "abdicate":
        reg.abdicate(step["name"])
    elif op == "reclaim":
        reg.reclaim(step["name"])
    elif op == "tx":
        reg.transaction([_action(reg, a) for a in step["actions"]])
    else:
        reg.transaction([_action(reg, step)])


def _action(reg: Any, a: Step) -> Any:
    op = a["op"]
    if op == "add":
        return reg.action_add(a["name"], a["gran"], persistent=a["persistent"])
    if op == "clear":
        return reg.action_clear(a["name"])
    if op == "merge":
        return reg.action_merge(a["target"], a["sources"])
    if op in ("enable", "disable"):
        return reg.action_enable(a["name"], op == "enable")
    if op == "remove":
        return reg.action_remove(a["name"])
    raise ValueError(f"no action {op}")


# ---------------------------------------------------------------------------- the model
Bools = np.ndarray[Any, np.dtype[np.bool_]]


@dataclass
class Succ:
    req: Bools
    base: bytes
    unrec: Bools


@dataclass
class Bm:
    """What one bitmap must hold (sectors of the disk, 512 bytes each)."""

    uid: int
    gran: int
    req: Bools
    base: bytes
    unrec: Bools
    enabled: bool
    persistent: bool
    succ: Succ | None = None

    def copy(self) -> Bm:
        succ = None if self.succ is None else Succ(self.succ.req.copy(), self.succ.base,
                                                    self.succ.unrec.copy())
        return Bm(self.uid, self.gran, self.req.copy(), self.base, self.unrec.copy(),
                  self.enabled, self.persistent, succ)


State = dict[str, Bm]


def expand(granules: Bools, gran: int, nsec: int) -> Bools:
    """Granules to the sectors they span."""
    per = gran // SECTOR
    out: Bools = np.repeat(granules, per)[:nsec]
    if len(out) < nsec:
        out = np.concatenate([out, np.zeros(nsec - len(out), dtype=bool)])
    return out


def widen(sectors: Bools, gran: int) -> Bools:
    """Every sector of each granule that has one of ``sectors``."""
    n = len(sectors)
    per = gran // SECTOR
    g = -(-n // per)
    padded = np.zeros(g * per, dtype=bool)
    padded[:n] = sectors
    return expand(padded.reshape(g, per).any(axis=1), gran, n)


class Model:
    def __init__(self, pre: bytes, bitmaps: list[tuple[str, int, bool, Bools]]):
        self.data = bytearray(pre)
        self.nsec = len(pre) // SECTOR
        self._base: bytes | None = pre
        self._uid = 0
        self.names: State = {}
        for name, gran, enabled, pre_bits in bitmaps:
            self.names[name] = Bm(self._next(), gran, expand(pre_bits, gran, self.nsec), pre,
                                  self._zeros(), enabled, True)

    @classmethod
    def of_template(cls, tpl: harness.Template) -> Model:
        spec = tpl.spec
        return cls(tpl.pre.tobytes(), [(n, g, n != FROZEN, tpl.pre_bits[n])
                                       for n, g in spec.bitmaps.items()])

    def _next(self) -> int:
        self._uid += 1
        return self._uid

    def _zeros(self) -> Bools:
        return np.zeros(self.nsec, dtype=bool)

    def baseline(self) -> bytes:
        """The data now (one object while it does not change: states share it)."""
        if self._base is None:
            self._base = bytes(self.data)
        return self._base

    def snapshot(self) -> State:
        return {n: b.copy() for n, b in self.names.items()}

    def apply(self, step: Step) -> None:
        op = step["op"]
        if op in REQUESTS:
            off, length = step["off"], step["len"]
            s0, s1 = off // SECTOR, -(-(off + length) // SECTOR)
            for bm in self.names.values():
                if bm.enabled:
                    bm.req[s0:s1] = True
                    if bm.succ is not None:
                        bm.succ.req[s0:s1] = True
                else:
                    bm.unrec[s0:s1] = True
                    if bm.succ is not None:
                        bm.succ.unrec[s0:s1] = True
            self.data[off:off + length] = step["data"] if op == "write" else bytes(length)
            self._base = None
        elif op == "tx":
            for a in step["actions"]:
                self.apply(a)
        elif op == "add":
            self.names[step["name"]] = Bm(self._next(), step["gran"], self._zeros(),
                                          self.baseline(), self._zeros(),
                                          not step.get("disabled", False),
                                          step["persistent"])
        elif op == "clear":
            bm = self.names[step["name"]]
            bm.req, bm.base, bm.unrec = self._zeros(), self.baseline(), self._zeros()
        elif op == "merge":
            bm = self.names[step["target"]]
            for s in step["sources"]:
                src = self.names[s]
                bm.req |= widen(src.req, src.gran)
        elif op in ("enable", "disable"):
            self.names[step["name"]].enabled = op == "enable"
        elif op == "copy":
            src = self.names[step["name"]]
            self.names[step["new"]] = Bm(self._next(), src.gran, src.req.copy(), src.base,
                                         src.unrec.copy(), src.enabled, step["persistent"])
        elif op == "rename":
            self.names[step["new"]] = self.names.pop(step["name"])
        elif op == "remove":
            del self.names[step["name"]]
        elif op == "succ":
            self.names[step["name"]].succ = Succ(self._zeros(), self.baseline(),
                                                 self._zeros())
        elif op == "abdicate":
            bm = self.names[step["name"]]
            assert bm.succ is not None
            bm.req, bm.base, bm.unrec = bm.succ.req, bm.succ.base, bm.succ.unrec
            bm.succ = None
        elif op == "reclaim":
            self.names[step["name"]].succ = None
        elif op in ("flush", "checkpoint", "close", "query"):
            pass
        else:
            raise ValueError(f"unknown step {op}")


def states(tpl: harness.Template, todo: list[Step], upto: int | None = None) -> list[State]:
    """The model after 0, 1, ... completed steps (``upto``: no further than that many)."""
    m = Model.of_template(tpl)
    out = [m.snapshot()]
    for step in todo[:upto]:
        m.apply(step)
        out.append(m.snapshot())
    return out


def alternatives(all_states: list[State], done: int, in_flight: bool) -> list[State]:
    """What the disk may show: the state after ``done`` steps, or after the one in flight."""
    alts = [all_states[done]]
    if in_flight and done + 1 < len(all_states):
        alts.append(all_states[done + 1])
    return alts


# ---------------------------------------------------------------------------- the judge
@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    leaks: int = 0
    consistent: int = 0
    inconsistent: int = 0
    over: int = 0  # granules set beyond what is required (allowed)
    granules: int = 0  # granules of the consistent bitmaps judged


def judge_image(image: Path, alts: list[State], *, quiet: bool = False) -> Verdict:
    """Judge a crashed image: ``alts`` are the states the disk may show (the model after
    the ``j`` completed steps, and after ``j + 1`` when step ``j`` was in flight at the
    crash). ``quiet``: the workload had closed the node: no bitmap may be in_use.

    The rule:

    - ``qemu-img check`` finds no corruption (leaks are allowed);
    - every bitmap on disk is one that some alternative holds as persistent, under that
      name (a removed bitmap whose remove returned must not come back); every persistent
      bitmap that all alternatives hold is on disk, under one of its names (what an add,
      a copy or a rename that returned made is durable);
    - a bitmap that reads *consistent* (``in_use`` clear) must, for at least one
      alternative holding it under its name, have that alternative's granularity and
      enabled (auto) flag, and set every granule that contains a sector of the
      alternative's ``req`` (completed requests it recorded, what completed merges and
      copies put in it) or a sector whose data on the crashed disk differs from the
      alternative's baseline data (its creation, its last completed clear, or the
      successor's creation for an abdicate), outside ``unrec`` (sectors requested while
      it was disabled). Supersets are allowed (over-reporting is counted, not failed).
    - an ``in_use`` bitmap is inconsistent: allowed (counted), never judged further.

    Why this strength: a completed request is owed by a consistent bitmap whatever data
    reached the disk (its in_use mark is durable before the driver runs, and a checkpoint
    syncs the bits, and the data, before it clears in_use); a change of data it recorded
    is owed even when the request was in flight. An operation in flight may leave each
    bitmap in its old or its new state (a clear not finished: the old bits, a superset; a
    merge not finished: without the merged bits, which only a returned merge owes; a
    transaction: each bitmap either way, the invariant being per bitmap), or a mixture of
    the two per granule, which covers the requirement of at least one side since both
    sides are monotone per granule.
    """
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    v = Verdict()
    proc = harness.sh("qemu-img", "check", "--output=json", str(image), ok=(0, 2, 3))
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    v.leaks = int(report.get("leaks", 0))
    if proc.returncode == 2 or report.get("corruptions") or report.get("check-errors"):
        v.problems.append(f"qemu-img check: corruptions={report.get('corruptions')} "
                          f"check-errors={report.get('check-errors')} rc={proc.returncode}")
    with Qcow2Image.open(str(image), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        data = np.frombuffer(img.read(0, img.size), dtype=np.uint8)
        diffs: dict[int, Bools] = {}

        def differs(base: bytes) -> Bools:
            key = id(base)
            if key not in diffs:
                b = np.frombuffer(base, dtype=np.uint8)
                d: Bools = (data.reshape(-1, SECTOR) != b.reshape(-1, SECTOR)).any(axis=1)
                diffs[key] = d
            return diffs[key]

        on_disk = {sb.name for sb in store.bitmaps}
        for sb in store.bitmaps:
            name = sb.name
            cands = [alt[name] for alt in alts if name in alt and alt[name].persistent]
            if not cands:
                v.problems.append(f"bitmap {name} is on disk, but no completed or "
                                  "in-flight operation leaves it there")
                continue
            if sb.problems:
                v.problems.append(f"bitmap {name} damaged: {sb.problems}")
                continue
            if sb.in_use:
                v.inconsistent += 1
                if quiet:
                    v.problems.append(f"bitmap {name} left in_use after a clean close")
                continue
            v.consistent += 1
            bits = harness.bits_of(store.load(name))
            why = []
            for c in cands:
                if c.gran != sb.entry.granularity:
                    why.append(f"granularity {sb.entry.granularity}, not {c.gran}")
                    continue
                if c.enabled != sb.entry.auto:
                    why.append(f"auto={sb.entry.auto}, the model says enabled={c.enabled}")
                    continue
                need512 = c.req | (differs(c.base) & ~c.unrec)
                need = harness.changed_granules(need512, c.gran, len(bits))
                missed = need & ~bits
                if missed.any():
                    first = int(np.flatnonzero(missed)[0]) * c.gran
                    why.append(f"misses {int(missed.sum())} required granules "
                               f"(first at {first:#x})")
                    continue
                v.over += int((bits & ~need).sum())
                v.granules += len(bits)
                break
            else:
                v.problems.append(f"bitmap {name} consistent but " + "; or ".join(why))
        uids = set.intersection(*({b.uid for b in alt.values() if b.persistent}
                                  for alt in alts))
        for uid in sorted(uids):
            names = {n for alt in alts for n, b in alt.items() if b.uid == uid}
            if not names & on_disk:
                v.problems.append(f"bitmap {'/'.join(sorted(names))} vanished")
    return v


# ---------------------------------------------------------------------------- kill -9
@dataclass
class KillPlan:
    seed: int
    mode: str  # step: at the start of a step (+ a delay); point: at an exact file call
    policy: int
    kill_step: int = 0
    kill_delay: float = 0.0
    kill_call: int = 0  # 2 * call index + (1: after the call, 0: before it)

    @classmethod
    def from_seed(cls, seed: int, nsteps: int, close: bool = False) -> KillPlan:
        """``close``: the workload runs to its end (the node closed), then the kill."""
        rng = random.Random(seed)
        plan = cls(seed, rng.choice(("step", "step", "point")),
                   rng.choice((0, 0, 1, 2)))
        if close:
            plan.mode, plan.kill_step = "close", nsteps
        elif plan.mode == "step":
            plan.kill_step = rng.randrange(0, nsteps + 1)  # nsteps: after the close
            plan.kill_delay = rng.choice((0.0, rng.uniform(0, 0.002), rng.uniform(0, 0.02)))
        else:
            plan.kill_call = rng.randrange(0, 2 * 420)  # the workload makes ~380-430 calls
        return plan


@dataclass
class KillResult:
    seed: int
    mode: str
    policy: int
    done: int = 0  # steps completed
    in_flight: str = ""  # the step killed in flight
    quiet: bool = False  # the workload ended (closed) before the kill
    killed: bool = False
    leaks: int = 0
    consistent: int = 0
    inconsistent: int = 0
    over: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def _child(path: str, plan: KillPlan, todo: list[Step], wfd: int) -> None:
    if plan.mode == "point":
        from faultfs import Fault, inject

        action = "kill-after" if plan.kill_call % 2 else "kill-before"
        stack = contextlib.ExitStack()
        stack.enter_context(inject(Fault(at=plan.kill_call // 2, action=action)))
    import dirtybits

    node = dirtybits.open(path, checkpoint=dirtybits.CheckpointPolicy(
        **POLICIES[plan.policy]))
    for step in todo:
        os.write(wfd, b"b")
        execute(node, step)
        os.write(wfd, b"e")
    os.write(wfd, b"D")
    time.sleep(60)


def one_kill(seed: int, tpl: harness.Template, workdir: Path,
             close: bool = False) -> KillResult:
    todo = steps(seed, tpl.spec.size)
    plan = KillPlan.from_seed(seed, len(todo), close)
    res = KillResult(seed, plan.mode, plan.policy)
    start = time.monotonic()
    path = workdir / f"k{os.getpid()}.qcow2"
    shutil.copyfile(tpl.qcow2, path)
    pid, rfd = harness.fork_child(lambda wfd: _child(str(path), plan, todo, wfd),
                                  harness.error_event(2000))
    events = bytearray()
    try:
        while True:
            ready, _, _ = select.select([rfd], [], [], harness.CHILD_STALL_TIMEOUT)
            if not ready:
                res.problems.append("the child made no progress")
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            events += chunk
            if b"E" in events or b"D" in events:
                break
            if plan.mode in ("step", "close") and events.count(b"b") > plan.kill_step:
                if plan.kill_delay:
                    time.sleep(plan.kill_delay)
                break
    finally:
        status = harness.kill_and_reap(pid, rfd, events)
    res.killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if b"E" in events:
        res.problems.append("child raised " + bytes(events[events.index(b"E") + 1:])
                            .decode(errors="replace"))
    progress = bytes(events).split(b"E")[0]
    res.done = progress.count(b"e")
    in_flight = progress.count(b"b") > res.done
    res.in_flight = describe(todo[res.done]) if in_flight else ""
    res.quiet = b"D" in progress
    if plan.mode == "close" and not res.quiet and not res.problems:
        res.problems.append("the workload did not reach its end")
    try:
        alts = alternatives(states(tpl, todo, res.done + 1), res.done, in_flight)
        v = judge_image(path, alts, quiet=res.quiet)
        res.problems += v.problems
        res.leaks, res.consistent, res.inconsistent, res.over = (v.leaks, v.consistent,
                                                                 v.inconsistent, v.over)
    except Exception as exc:
        res.problems.append(f"judge failed: {type(exc).__name__}: {exc}")
    finally:
        path.unlink(missing_ok=True)
    res.seconds = time.monotonic() - start
    return res


@dataclass
class Totals:
    kills: int = 0
    quiet: int = 0  # runs that closed before the kill
    in_flight: int = 0  # kills inside a step
    in_flight_ops: dict[str, int] = field(default_factory=dict)  # registry ops killed in flight
    consistent: int = 0
    inconsistent: int = 0
    over: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, r: KillResult) -> None:
        self.kills += r.killed
        self.quiet += r.quiet
        if r.in_flight:
            self.in_flight += 1
            op = json.loads(r.in_flight)["op"]
            if op not in REQUESTS:
                self.in_flight_ops[op] = self.in_flight_ops.get(op, 0) + 1
        self.consistent += r.consistent
        self.inconsistent += r.inconsistent
        self.over += r.over
        self.by_mode[r.mode] = self.by_mode.get(r.mode, 0) + 1
        if r.problems:
            self.failures.append(asdict(r))

    def merge(self, other: dict[str, Any]) -> None:
        for k, val in other.items():
            if k == "failures":
                self.failures += val
            elif isinstance(val, dict):
                mine = getattr(self, k)
                for m, n in val.items():
                    mine[m] = mine.get(m, 0) + n
            else:
                setattr(self, k, getattr(self, k) + val)

    def lines(self) -> list[str]:
        return [f"kills={self.kills} (closed first: {self.quiet}; inside a step: "
                f"{self.in_flight}; registry ops hit in flight: {self.in_flight_ops})",
                f"bitmaps after the kills: consistent={self.consistent} "
                f"inconsistent={self.inconsistent} over-reported granules={self.over}",
                f"by mode: {self.by_mode}; failures={len(self.failures)}"]


CLOSE_EVERY = 10  # every tenth run closes the node before its kill: all must be consistent


def failure_line(f: dict[str, Any]) -> str:
    """A failed kill (``asdict(KillResult)``) and the command that replays it."""
    close = " --close" if f["mode"] == "close" else ""
    return (f"kill seed {f['seed']} ({f['mode']}, policy {f['policy']}, {f['done']} steps "
            f"done, in flight: {f['in_flight'] or '-'}): {f['problems'][:3]}\n    replay: "
            f"python tests/crash/regcrash.py replay {f['seed']}{close}")


def kill_seed(seed: int, i: int) -> int:
    return random.Random(f"reg:{seed}:{i}").getrandbits(48)


def worker(seed: int, count: int, index: int, workers: int, tdir: Path,
           workdir: Path) -> Totals:
    tpl = harness.load_templates(tdir, (TEMPLATE,))[TEMPLATE.name]
    totals = Totals()
    for i in range(index, count, workers):
        totals.add(one_kill(kill_seed(seed, i), tpl, workdir, close=i % CLOSE_EVERY == 0))
    return totals


def run(count: int, seed: int, workers: int = 2,
        scratch: Path | None = None) -> tuple[Totals, float]:
    """``count`` kills over ``workers`` processes; (totals, seconds)."""
    base = Path(tempfile.mkdtemp(prefix="dirtybits-regkill-", dir=scratch or "/var/tmp"))
    try:
        tdir = base / "templates"
        tdir.mkdir()
        harness.build_templates(tdir, (TEMPLATE,))
        start = time.monotonic()
        procs = [subprocess.Popen(
            [sys.executable, __file__, "worker", "--seed", str(seed), "--count", str(count),
             "--worker", str(w), "--workers", str(workers), "--templates", str(tdir),
             "--dir", str(base)], stdout=subprocess.PIPE, text=True)
            for w in range(min(workers, count))]
        totals = Totals()
        errors = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                errors.append(f"worker exited {p.returncode}")
                continue
            totals.merge(json.loads(out.strip().splitlines()[-1]))
        if errors:
            raise RuntimeError("; ".join(errors))
        return totals, time.monotonic() - start
    finally:
        shutil.rmtree(base, ignore_errors=True)


def replay(kill: int, close: bool = False) -> KillResult:
    """One kill again, by the seed printed with its failure."""
    base = Path(tempfile.mkdtemp(prefix="dirtybits-regreplay-", dir="/var/tmp"))
    try:
        harness.build_templates(base, (TEMPLATE,))
        tpl = harness.load_templates(base, (TEMPLATE,))[TEMPLATE.name]
        print(KillPlan.from_seed(kill, len(steps(kill, tpl.spec.size)), close),
              file=sys.stderr)
        return one_kill(kill, tpl, base, close)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kill -9 during the registry's operations")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--worker", type=int, required=True)
    w.add_argument("--workers", type=int, required=True)
    w.add_argument("--templates", type=Path, required=True)
    w.add_argument("--dir", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--kills", type=int, default=200)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("replay")
    p.add_argument("kill_seed", type=int)
    p.add_argument("--close", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        totals = worker(args.seed, args.count, args.worker, args.workers, args.templates,
                        args.dir)
        print(json.dumps(asdict(totals)))
        return 0
    if args.cmd == "run":
        seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
        totals, elapsed = run(args.kills, seed, args.workers)
        print(f"registry kill -9 seed {seed}: {elapsed:.1f} s")
        print("\n".join(totals.lines()))
        for f in totals.failures[:10]:
            print(f"  FAILED {failure_line(f)}")
        return 1 if totals.failures else 0
    res = replay(args.kill_seed, args.close)
    print(json.dumps(asdict(res), indent=1))
    return 1 if res.problems else 0


if __name__ == "__main__":
    sys.exit(main())
