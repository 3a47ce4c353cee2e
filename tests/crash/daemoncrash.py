"""Crashes of ``dirtybits serve``: a QMP workload, its model, and the judge of what it left.

Shared by the kill -9 runs (``test_kill9_daemon.py``: the daemon as a user runs it, killed
at a random moment) and the power-loss runs (``test_power_loss_daemon.py``: the ``Daemon``
in process, its file calls traced by ``powerloss.Recorder``).

The image (``SPEC``, built by ``harness.build_templates`` with QEMU's tools) has two
persistent bitmaps made by ``qemu-img bitmap --add``: ``g16k`` (enabled) and ``frozen``
(disabled); the workload adds a third, ``q4k``, persistent, through QMP. Then, all through
QMP: guest writes and write-zeroes (``human-monitor-command`` ``qemu-io n0 "write -P PAT
OFF LEN"``, ``"write -z [-u] OFF LEN"``), clears, merges, enables and disables,
transactions of those, ``x-dirtybits-checkpoint`` and ``qemu-io n0 "flush"`` now and then.

The steps are ``regcrash`` steps (``regcrash.Model`` keeps what each bitmap must hold after
each step; ``regcrash.judge_image`` judges a crashed image against the model after the
steps whose reply came back, or after the one in flight too). ``judge_daemon_image`` adds
what a client of the daemon relies on: the image opened read-only by ``dirtybits.open`` and
by ``qemu-img info`` reports the same state per bitmap (in_use = inconsistent, with a
reason), and ``restart_and_check`` starts the daemon again with the same command line:
``query-named-block-nodes`` reports every bitmap on disk, the inconsistent ones as such,
the consistent ones with the counts read from the disk; after its ``quit`` nothing changed
(nothing silently cleared, nothing made consistent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import harness
import regcrash

import peers

KiB, MiB = 1 << 10, 1 << 20
NODE = "n0"
FROZEN = harness.FROZEN
ADDED = "q4k"  # added through QMP by the workload's first step
SPEC = harness.TemplateSpec("srv4k", 4 * KiB, {"g16k": 16 * KiB, FROZEN: 64 * KiB},
                            size=8 * MiB)
Step = dict[str, Any]


# ---------------------------------------------------------------------------- the workload
def steps(seed: int, count: int | None = None) -> list[Step]:
    """The workload of ``seed``: the QMP add of ``ADDED``, then ``count`` random steps."""
    rng = random.Random(seed)
    enabled = {"g16k": True, FROZEN: False, ADDED: True}
    out: list[Step] = [{"op": "add", "name": ADDED, "gran": 4 * KiB, "persistent": True}]
    names = sorted(enabled)

    def action(name: str) -> Step:
        r = rng.random()
        if r < 0.35:
            return {"op": "clear", "name": name}
        if r < 0.7:
            others = [n for n in names if n != name]
            return {"op": "merge", "target": name,
                    "sources": rng.sample(others, rng.randrange(1, len(others) + 1))}
        enabled[name] = not enabled[name]
        return {"op": "enable" if enabled[name] else "disable", "name": name}

    for _ in range(count if count is not None else rng.randrange(25, 50)):
        r = rng.random()
        if r < 0.55:
            s = rng.random()
            length = (rng.randrange(1, 9) * 512 if s < 0.4 else
                      rng.randrange(1, 33) * 4 * KiB if s < 0.85 else
                      rng.randrange(1, 9) * 64 * KiB)
            offset = rng.randrange(0, (SPEC.size - length) // 512) * 512
            if rng.random() < 0.85:
                pat = rng.randrange(1, 256)
                out.append({"op": "write", "off": offset, "len": length, "pat": pat,
                            "data": bytes([pat]) * length})
            else:
                out.append({"op": "zero", "off": offset, "len": length,
                            "unmap": rng.random() < 0.5})
        elif r < 0.8:
            out.append(action(rng.choice(names)))
        elif r < 0.87:
            out.append({"op": "checkpoint"})
        elif r < 0.92:
            out.append({"op": "flush"})
        else:
            # a bitmap may be changed by several actions of one transaction (clear then
            # merge, merge then disable): it is then in_use until the transaction is stored
            out.append({"op": "tx", "actions": [action(rng.choice(names)) for _ in
                                                range(rng.randrange(2, 4))]})
    return out


def _action(step: Step) -> tuple[str, dict[str, Any]]:
    op = step["op"]
    if op == "add":
        return "block-dirty-bitmap-add", {"node": NODE, "name": step["name"],
                                          "granularity": step["gran"],
                                          "persistent": step["persistent"]}
    if op == "merge":
        return "block-dirty-bitmap-merge", {"node": NODE, "target": step["target"],
                                            "bitmaps": list(step["sources"])}
    if op in ("clear", "enable", "disable"):
        return f"block-dirty-bitmap-{op}", {"node": NODE, "name": step["name"]}
    raise ValueError(f"no QMP action for {op}")


def hmp(line: str) -> tuple[str, dict[str, Any]]:
    # the monitor's string syntax: double quotes (QEMU's get_str has no single quotes)
    return "human-monitor-command", {"command-line": f'qemu-io {NODE} "{line}"'}


def qmp_of(step: Step) -> tuple[str, dict[str, Any]]:
    """The QMP command that runs ``step``."""
    op = step["op"]
    if op == "write":
        return hmp(f"write -P {step['pat']:#x} {step['off']} {step['len']}")
    if op == "zero":
        return hmp(f"write -z{' -u' if step['unmap'] else ''} {step['off']} {step['len']}")
    if op == "flush":
        return hmp("flush")
    if op == "checkpoint":
        return "x-dirtybits-checkpoint", {"node": NODE}
    if op == "tx":
        return "transaction", {"actions": [
            {"type": name, "data": data} for name, data in map(_action, step["actions"])]}
    return _action(step)


def expected_return(step: Step) -> Any:
    """What the command of ``step`` returns (``None``: not checked)."""
    if step["op"] in ("write", "zero", "flush"):
        return ""  # HMP: the output goes to the daemon's stdout
    if step["op"] == "checkpoint":
        return None
    return {}


def blockdev(path: Path) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": NODE,
            "file": {"driver": "file", "filename": str(path)}}


Execute = Callable[[str, dict[str, Any]], Awaitable[Any]]


#: How a kill -9 run picks its moment, in turn (each run of a test has each of them, "flight"
#: the most often): during a request ("flight"), right after a reply ("reply"), after a delay
#: ("timed"), in a lull ("lull"), or no kill but a clean stop ("quit").
KILL_MODES = ("flight", "reply", "timed", "flight", "lull", "flight", "timed", "reply",
              "flight", "quit")

@dataclass
class Progress:
    sent: int = 0  # steps whose command was handed to the client
    done: int = 0  # steps whose reply came back
    errors: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> bool:
        return self.sent > self.done


async def run_step(execute: Execute, step: Step, k: int, prog: Progress) -> None:
    """Send step ``k`` and wait for its reply (a wrong reply is recorded in ``prog``)."""
    name, args = qmp_of(step)
    prog.sent = k + 1
    value = await execute(name, args)
    prog.done = k + 1
    want = expected_return(step)
    if want is not None and value != want:
        prog.errors.append(f"step {k} {regcrash.describe(step)}: {name} returned {value!r}")


# ---------------------------------------------------------------------------- the daemon
@dataclass
class Serve:
    """``dirtybits serve`` as a user runs it, with a fixed command line (so a restart runs
    the very same one): its QMP socket, stdout (qemu-io's output) and stderr in ``dir``."""

    image: Path
    dir: Path  # short: the socket's path must fit 108 bytes

    @property
    def sock(self) -> Path:
        return self.dir / "qmp.sock"

    def argv(self) -> list[str]:
        return peers.argv(*peers.DIRTYBITS, "--log-level", "info", "serve",
                          "--blockdev", json.dumps(blockdev(self.image)),
                          "--qmp", f"unix:{self.sock}")

    def start(self, tag: str) -> subprocess.Popen[bytes]:
        with open(self.dir / f"{tag}.out", "wb") as out, \
                open(self.dir / f"{tag}.err", "wb") as err:
            proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err)
        deadline = time.monotonic() + 15
        while not peers.listening(self.sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
                raise AssertionError(f"{shlex.join(self.argv())} did not come up "
                                     f"(exit {proc.returncode}): {self.text(tag, 'err')}")
            time.sleep(0.005)
        return proc

    def text(self, tag: str, stream: str) -> str:
        path = self.dir / f"{tag}.{stream}"
        return path.read_text(errors="replace") if path.exists() else ""


async def connect(sock: Path, name: str) -> Any:
    from qemu.qmp import QMPClient

    qmp = QMPClient(name)
    await asyncio.wait_for(qmp.connect(str(sock)), 10)
    return qmp


async def disconnect(qmp: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(qmp.disconnect(), 5)


# ---------------------------------------------------------------------------- the judge
@dataclass
class OnDisk:
    """One bitmap as the crashed image holds it."""

    in_use: bool
    auto: bool
    granularity: int
    count: int  # dirty bytes, as dirtybits.open reports it (0 for an in_use one)
    bits: Any  # harness.bits_of (None for an in_use one)


def read_bitmaps(path: Path) -> dict[str, OnDisk]:
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    out = {}
    with Qcow2Image.open(str(path), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        for sb in store.bitmaps:
            bits = None if sb.in_use else harness.bits_of(store.load(sb.name))
            out[sb.name] = OnDisk(sb.in_use, sb.entry.auto, sb.entry.granularity, 0, bits)
    return out


def judge_daemon_image(path: Path, alts: list[regcrash.State], *,
                       quiet: bool) -> tuple[regcrash.Verdict, dict[str, OnDisk]]:
    """``regcrash.judge_image``, then what the tools read: ``dirtybits.open`` read-only (its
    registry's state per bitmap) and ``qemu-img info`` (its flags) agree with the on-disk
    flags; an in_use bitmap is reported inconsistent, with a reason."""
    import dirtybits
    from dirtybits.block.registry import DiskState

    v = regcrash.judge_image(path, alts, quiet=quiet)
    disk = read_bitmaps(path)
    with dirtybits.open(str(path), readonly=True) as node:
        infos = {i.name: i for i in node.bitmaps.query()}
    if set(infos) != set(disk):
        v.problems.append(f"dirtybits.open lists {sorted(infos)}, the disk {sorted(disk)}")
    for name, d in disk.items():
        info = infos.get(name)
        if info is None:
            continue
        d.count = info.count
        if d.in_use:
            if not (info.inconsistent and info.disk_state is DiskState.INCONSISTENT
                    and info.reason):
                v.problems.append(f"{name} is in_use on disk; dirtybits.open says "
                                  f"inconsistent={info.inconsistent} disk_state="
                                  f"{info.disk_state.value} reason={info.reason!r}")
        else:
            want = int(d.bits.sum()) * d.granularity
            if info.inconsistent or info.disk_state is not DiskState.CLEAN or \
                    not want - d.granularity < info.count <= want:
                v.problems.append(f"{name} is consistent on disk ({want} bytes dirty at "
                                  f"most); dirtybits.open says inconsistent="
                                  f"{info.inconsistent} disk_state={info.disk_state.value} "
                                  f"count={info.count}")
    qemu = {b["name"]: b for b in peers.qemu_bitmaps(path)}
    theirs = {n: ("in-use" in b["flags"], "auto" in b["flags"], b["granularity"])
              for n, b in qemu.items()}
    ours = {n: (d.in_use, d.auto, d.granularity) for n, d in disk.items()}
    if theirs != ours:
        v.problems.append(f"qemu-img info: (in-use, auto, granularity) {theirs} != {ours}")
    return v, disk


async def restart_and_check(serve: Serve, disk: dict[str, OnDisk], tag: str) -> list[str]:
    """The same command line again: it comes up; ``query-named-block-nodes`` reports every
    bitmap of the disk with its state and count; after ``quit`` (exit 0) the disk holds the
    same: the consistent ones with the same bits, the inconsistent ones still in_use."""
    problems: list[str] = []
    proc = serve.start(tag)
    try:
        qmp = await connect(serve.sock, tag)
        try:
            nodes = await qmp.execute("query-named-block-nodes")
            top = next((n for n in nodes if n["node-name"] == NODE), None)
            if top is None:
                return [f"restart: no node {NODE} in {[n['node-name'] for n in nodes]}"]
            got = {b["name"]: b for b in top.get("dirty-bitmaps", [])}
            if set(got) != set(disk):
                problems.append(f"restart reports bitmaps {sorted(got)}, the disk holds "
                                f"{sorted(disk)}")
            for name, d in disk.items():
                b = got.get(name)
                if b is None:
                    continue
                ext = b.get("x-dirtybits", {})
                if b["granularity"] != d.granularity or b["persistent"] is not True:
                    problems.append(f"restart: {name}: {b}")
                if d.in_use:
                    if b.get("inconsistent") is not True or \
                            ext.get("disk-state") != "inconsistent" or not ext.get("reason"):
                        problems.append(f"restart: {name} is in_use on disk but reported {b}")
                else:
                    if "inconsistent" in b or b["count"] != d.count or \
                            b["recording"] != d.auto or \
                            ext.get("disk-state") not in ("clean", "open"):
                        problems.append(f"restart: {name} is consistent on disk "
                                        f"(count {d.count}, auto {d.auto}) but reported {b}")
            await qmp.execute("quit")
        finally:
            await disconnect(qmp)
        code = await asyncio.to_thread(proc.wait, 20)
        if code != 0:
            problems.append(f"restarted daemon's quit: exit {code}: {serve.text(tag, 'err')}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = read_bitmaps(serve.image)
    for name, d in disk.items():
        a = after.get(name)
        if a is None:
            problems.append(f"after the restart and quit, {name} is gone")
        elif a.in_use != d.in_use:
            problems.append(f"after the restart and quit, {name} in_use {d.in_use} -> "
                            f"{a.in_use}")
        elif not d.in_use and not (len(a.bits) == len(d.bits) and (a.bits == d.bits).all()):
            problems.append(f"after the restart and quit, {name}'s bits changed")
    return problems


def states_for(tpl: harness.Template, todo: Sequence[Step], done: int,
               in_flight: bool) -> list[regcrash.State]:
    """What the disk may show after ``done`` replies (and the step in flight)."""
    return regcrash.alternatives(regcrash.states(tpl, list(todo), done + 1), done, in_flight)
