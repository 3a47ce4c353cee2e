"""Kill -9 harness shared by ``tests/crash/test_kill9.py`` and ``bench/torture``.

One *kill* = copy a pre-image, fork a child that opens it through the block layer and runs a
random workload (writes, compressed writes, write-zeroes, discards of random sizes, flushes,
checkpoints, pauses longer than the idle time), reporting progress on a pipe; the parent
SIGKILLs it at a random moment and then judges what is on disk:

- ``qemu-img check``: no corruption (leaks are allowed and counted);
- every bitmap still exists and is undamaged; an ``in_use`` one is *inconsistent* (allowed,
  counted); a consistent enabled bitmap must cover every granule whose data now differs from
  the pre-image (a granule it misses is a *silent miss*: the invariant of the protocol);
- the disabled bitmap is consistent and holds exactly its pre-image bits;
- a kill at a *quiet* moment (the child checkpointed and then announced it is idle) must leave
  every enabled bitmap consistent;
- on a sample, QEMU agrees: ``qemu-img info`` shows the same flags, and ``qemu-nbd -B`` +
  ``nbdinfo --map`` serves exactly our bits for every consistent bitmap.

Resilient runs (``run(..., resilient=True)``, test_kill9_resilient.py) use templates with the
write-intent map on and, after judging the crashed image, reopen it with a tracked open (no
writes): every enabled bitmap must then be consistent with zero misses, exactly the ones the
crash left in_use recovered; with a ``qemu-io`` write before the reopen (``qemu`` runs) the map
must not be trusted: nothing recovered, the crash's in_use bitmaps still in_use.

Each kill is fully described by one integer seed (template, policy, workload, kill mode and
moment; only the wall-clock moment of a timed kill is not reproducible). Workers run as
subprocesses of this file (``python harness.py worker ...``) so two cores can be used.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (also run as a script)
import peers

KiB, MiB = 1 << 10, 1 << 20
DISK_SIZE = 64 * MiB
FROZEN = "frozen"  # the disabled bitmap
STALE = "stale"  # an enabled bitmap already inconsistent (in_use) in the pre-image


@dataclass(frozen=True)
class TemplateSpec:
    """A pre-image layout: cluster size and bitmaps (name -> granularity; FROZEN disabled)."""

    name: str
    cluster_size: int
    bitmaps: dict[str, int]
    size: int = DISK_SIZE
    region: int | None = None  # resilient mode on, with regions of this size
    warm: bool = False  # resilient: a dirtybits session ran first (the map is valid, marked)
    extended_l2: bool = False  # 128-bit L2 entries: 32 subclusters a cluster


TEMPLATES = (
    # bitmaps of one cluster each; 64 KiB image clusters as QEMU's default
    TemplateSpec("c64k", 64 * KiB, {"g64k": 64 * KiB, "g4k": 4 * KiB, FROZEN: 256 * KiB}),
    # 4 KiB clusters: more L2/refblock traffic, and a 512 B bitmap spanning 4 bitmap clusters
    TemplateSpec("c4k", 4 * KiB, {"g512": 512, "g16k": 16 * KiB, FROZEN: 64 * KiB}),
)
# Resilient mode (write-intent map) on: a kill is then followed by a tracked reopen that must
# recover every bitmap the crash left in_use. STALE was left in_use by a killed qemu-io before
# the map ever existed: the map must exclude it, so it stays inconsistent forever.
RESILIENT_TEMPLATES = (
    TemplateSpec("r1m", 64 * KiB, {"g64k": 64 * KiB, "g4k": 4 * KiB, FROZEN: 256 * KiB},
                 region=MiB, warm=True),
    TemplateSpec("r64k", 4 * KiB, {STALE: 64 * KiB, "g512": 512, "g16k": 16 * KiB,
                                   FROZEN: 64 * KiB}, size=32 * MiB, region=64 * KiB),
)
# Extended L2 entries: partial writes allocate a cluster but mark only their subclusters
EXTL2_TEMPLATES = (
    TemplateSpec("x64k", 64 * KiB, {"g64k": 64 * KiB, "g4k": 4 * KiB, FROZEN: 256 * KiB},
                 size=32 * MiB, extended_l2=True),
)
ALL_TEMPLATES = TEMPLATES + RESILIENT_TEMPLATES + EXTL2_TEMPLATES

# Checkpoint policies the children draw from (None disables that trigger).
POLICIES: tuple[dict[str, float | int | None], ...] = (
    {"interval": 0.2, "idle": 0.05, "threshold_bits": 4096},
    {"interval": 0.05, "idle": 0.02, "threshold_bits": 64},
    {"interval": None, "idle": 0.05, "threshold_bits": None},
    {"interval": 0.1, "idle": None, "threshold_bits": 512},
    {"interval": None, "idle": None, "threshold_bits": None},  # only explicit ones
)

QEMU_SAMPLE_EVERY = 20
CLOSE_EVERY = 20
CHILD_STALL_TIMEOUT = 30.0  # seconds without a progress byte: the child is hung (a bug)


# ---------------------------------------------------------------------------- shell helpers
def sh(*cmd: str, ok: tuple[int, ...] = (0,),
       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``peers.run``, failing with a RuntimeError (the judges catch it: QEMU cannot read an
    image) when the exit status is not in ``ok``."""
    proc = peers.run(*cmd, timeout=timeout)
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


# ---------------------------------------------------------------------------- templates
@dataclass
class Template:
    spec: TemplateSpec
    qcow2: Path  # the pre-image (never written after it is built)
    pre: np.ndarray[Any, np.dtype[np.uint8]]  # its guest data
    pre_bits: dict[str, np.ndarray[Any, np.dtype[np.bool_]]]  # every bitmap's bits

    @property
    def frozen_bits(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return self.pre_bits[FROZEN]


def _qemu_io(path: Path, *cmds: str) -> None:
    peers.qemu_io(path, *cmds, fmt="qcow2", timeout=120)


def build_templates(directory: Path, specs: tuple[TemplateSpec, ...] = TEMPLATES) -> None:
    """Make each pre-image with QEMU's tools (independent of the code under test)."""
    for spec in specs:
        path = directory / f"{spec.name}.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o",
           f"cluster_size={spec.cluster_size}" + (",extended_l2=on" if spec.extended_l2
                                                  else ""), str(path), str(spec.size))

        def at(kib: int, size: int = spec.size) -> int:  # a place in 64 MiB, scaled to size
            return kib * KiB * size // DISK_SIZE // 512 * 512

        if STALE in spec.bitmaps:  # a qemu-io killed while writing leaves it in_use
            sh("qemu-img", "bitmap", "--add", "-g", str(spec.bitmaps[STALE]), str(path), STALE)
            sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x99 {at(1024)} {at(64)}", "-c",
               "sigraise 9", str(path), ok=(-signal.SIGKILL, 128 + signal.SIGKILL))
        # the disabled bitmap records a first batch of writes, then is frozen
        sh("qemu-img", "bitmap", "--add", "-g", str(spec.bitmaps[FROZEN]), str(path), FROZEN)
        _qemu_io(path, f"write -P 0x11 0 {at(3072)}", f"write -P 0x22 {at(20480)} {at(1024)}",
                 f"write -P 0x33 {at(40000)} {at(100)}")
        sh("qemu-img", "bitmap", "--disable", str(path), FROZEN)
        for name, gran in spec.bitmaps.items():
            if name not in (FROZEN, STALE):
                sh("qemu-img", "bitmap", "--add", "-g", str(gran), str(path), name)
        # more data, recorded by the enabled bitmaps only; some zero clusters too
        _qemu_io(path, f"write -P 0x44 {at(8192)} {at(2048)}",
                 f"write -P 0x55 {at(51200)} {at(64)}", f"write -z {at(21504)} {at(256)}",
                 f"write -P 0x66 {at(61440)} {at(3072)}", f"discard {at(62464)} {at(512)}")
        if spec.region:
            dirtybits_cli("amend", "-o", f"resilient=on,resilient-region={spec.region}",
                          str(path))
        if spec.warm:  # a tracked session: the map is valid and keeps its last regions marked
            dirtybits_cli("io", "-c", f"write -P 0x77 {at(30000)} {at(1000)}", "-c",
                          f"write -P 0x78 {at(45000)} 4096", str(path))
        sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path),
           str(directory / f"{spec.name}.raw"))
        sh("qemu-img", "check", "-q", str(path))


def dirtybits_cli(*args: str) -> None:
    peers.db(*args, timeout=120)


def template(directory: Path, spec: TemplateSpec) -> Template:
    """One template, built in ``directory`` (made if missing) and loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    build_templates(directory, (spec,))
    return load_templates(directory, (spec,))[spec.name]


def load_templates(directory: Path,
                   specs: tuple[TemplateSpec, ...] = TEMPLATES) -> dict[str, Template]:
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    out = {}
    for spec in specs:
        path = directory / f"{spec.name}.qcow2"
        pre = np.fromfile(directory / f"{spec.name}.raw", dtype=np.uint8)
        with Qcow2Image.open(str(path), readonly=True) as img:
            store = Qcow2BitmapStore(img)
            pre_bits = {name: bits_of(store.load(name)) for name in spec.bitmaps
                        if name != STALE}
        out[spec.name] = Template(spec, path, pre, pre_bits)
    return out


def bits_of(bm: Any) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """One bool per granule (QEMU's little-endian bit order within each byte)."""
    n = -(-bm.size // bm.granularity)
    raw = np.frombuffer(bm.to_bytes(), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


# ---------------------------------------------------------------------------- the child
def open_disk(path: str, policy: dict[str, float | int | None]) -> Any:
    """The API under test."""
    import dirtybits

    return dirtybits.open(path, checkpoint=dirtybits.CheckpointPolicy(**policy))


def _checkpoint(disk: Any, rng: random.Random) -> None:
    if rng.random() < 0.5:
        disk.checkpoint()
    else:
        disk.flush()


def child_main(path: str, plan: KillPlan, wfd: int) -> None:
    """Run the workload of ``plan``, one progress byte per event, until killed (or done)."""
    rng = random.Random(plan.seed ^ 0x5EED)

    def send(b: bytes) -> None:
        os.write(wfd, b)

    policy = POLICIES[plan.policy]
    idle = policy["idle"] or 0.05
    if plan.mode == "point":  # SIGKILL ourselves at an exact write/sync of the engine
        from faultfs import Fault, inject

        action = "kill-after" if plan.kill_ops % 2 else "kill-before"
        stack = contextlib.ExitStack()
        stack.enter_context(inject(Fault(at=plan.kill_ops // 2, action=action)))
    disk = open_disk(path, policy)
    send(b"O")
    size = next(t.size for t in ALL_TEMPLATES if t.name == plan.template)
    hot = rng.randrange(0, size - 4 * MiB)
    for op in range(plan.max_ops):
        if op == plan.quiet_at:
            _checkpoint(disk, rng)
            send(b"Q")
            time.sleep(2.0)  # the parent kills now; if it doesn't, carry on
        elif op == plan.lull_at:
            time.sleep(float(idle) * 4 + 0.1)  # past the idle trigger, no explicit checkpoint
            send(b"L")
            time.sleep(2.0)
        r = rng.random()
        if r < 0.47:
            kind = "write"
        elif r < 0.55:
            kind = "compressed"
        elif r < 0.65:
            kind = "zero"
        elif r < 0.72:
            kind = "discard"
        elif r < 0.78:
            kind = "flush"
        elif r < 0.82:
            kind = "checkpoint"
        elif r < 0.90:
            kind = "pause"
        else:
            kind = "burst"
        if kind in ("write", "zero", "discard", "burst"):
            s = rng.random()
            length = (rng.randrange(1, 9) * 512 if s < 0.4 else
                      rng.randrange(1, 129) * 512 if s < 0.8 else
                      rng.randrange(1, 33) * 64 * KiB)
            base, span = (hot, 4 * MiB) if rng.random() < 0.5 else (0, size)
            offset = base + rng.randrange(0, max(1, span - length) // 512) * 512
            if rng.random() < 0.1:  # unaligned
                offset = min(offset + rng.randrange(1, 512), size - length)
            length = min(length, size - offset)
            if kind == "write":
                disk.write(offset, rng.randbytes(length))
            elif kind == "zero":
                disk.write_zeroes(offset, length, unmap=rng.random() < 0.5)
            elif kind == "discard":
                disk.discard(offset, length)
            else:  # many small writes quickly: threshold checkpoints
                for _ in range(rng.randrange(8, 64)):
                    off = rng.randrange(0, size // 4096) * 4096
                    disk.write(off, rng.randbytes(512))
        elif kind == "compressed":  # whole clusters, compressible (some not: stored plain)
            cs = next(t.cluster_size for t in ALL_TEMPLATES if t.name == plan.template)
            n = rng.randrange(1, 17) * cs
            base, span = (hot, 4 * MiB) if rng.random() < 0.5 else (0, size)
            offset = base // cs * cs + rng.randrange(0, max(1, span - n) // cs) * cs
            unit = bytes(rng.choices(b"abcdefgh ", k=512)) if rng.random() < 0.8 else \
                rng.randbytes(cs)
            disk.write(offset, (unit * (n // len(unit) + 1))[:n], compress=True)
        elif kind == "flush":
            disk.flush()
        elif kind == "checkpoint":
            _checkpoint(disk, rng)
        else:
            time.sleep(rng.uniform(0.0, float(idle) * 3))
        send(b".")
    if plan.mode != "close":
        send(b"D")  # done: idle until killed (a kill must find a child to kill)
        time.sleep(60)
    disk.close()
    send(b"C")


# ---------------------------------------------------------------------------- the parent
MODES = ("time", "ops", "ops", "point", "point", "quiet", "lull")  # every one ends in SIGKILL


@dataclass
class KillPlan:
    seed: int
    template: str
    policy: int
    mode: str
    max_ops: int
    quiet_at: int = -1
    lull_at: int = -1
    kill_ops: int = 0
    kill_delay: float = 0.0
    resilient: bool = False  # a resilient template; a tracked reopen follows the kill
    qemu_write: tuple[int, int, int] | None = None  # (offset, length, pattern) before reopen

    @classmethod
    def from_seed(cls, seed: int, *, close: bool = False, resilient: bool = False,
                  qemu: bool = False) -> KillPlan:
        """``close``: the child finishes and closes (no kill): everything must be consistent.
        ``resilient``: resilient templates, then a tracked reopen that must recover every
        bitmap; ``qemu``: qemu-io writes to the image first (the map must not be trusted)."""
        rng = random.Random(seed)
        plan = cls(seed=seed,
                   template=rng.choice(RESILIENT_TEMPLATES if resilient else TEMPLATES).name,
                   policy=rng.randrange(len(POLICIES)),
                   mode="close" if close else rng.choice(MODES),
                   max_ops=rng.randrange(15, 80))
        if plan.mode == "quiet":
            plan.quiet_at = rng.randrange(0, plan.max_ops)
        elif plan.mode == "lull":  # only policies with an idle trigger can end a lull
            plan.policy = rng.choice([i for i, p in enumerate(POLICIES) if p["idle"]])
            plan.lull_at = rng.randrange(1, plan.max_ops)
        elif plan.mode == "ops":
            plan.kill_ops = rng.randrange(0, plan.max_ops)
            plan.kill_delay = rng.choice((0.0, 0.0, rng.uniform(0, 0.003), rng.uniform(0, 0.03)))
        elif plan.mode == "time":
            plan.kill_delay = rng.uniform(0.0, 0.4)
        elif plan.mode == "point":  # 2 * call index + (1: after the call, 0: before it)
            plan.kill_ops = rng.randrange(0, 2 * rng.choice((40, 200, 1000)))
        plan.resilient = resilient
        if qemu:
            size = next(t.size for t in ALL_TEMPLATES if t.name == plan.template)
            length = rng.choice((512, 4 * KiB, rng.randrange(1, 65) * 4 * KiB))
            offset = rng.randrange(0, (size - length) // 512) * 512
            plan.qemu_write = (offset, length, rng.randrange(0x80, 0x100))
        return plan


@dataclass
class KillResult:
    seed: int
    template: str
    mode: str
    events: str = ""  # progress bytes seen (summarised)
    killed: bool = True  # False: the child finished (closed) before the kill
    leaks: int = 0
    consistent: int = 0
    inconsistent: int = 0
    misses: int = 0  # granules changed but not set in a consistent enabled bitmap
    over: int = 0  # granules set but unchanged (over-reporting: allowed)
    quiet_consistent: bool | None = None
    lull_consistent: bool | None = None
    qemu_checked: bool = False
    seconds: float = 0.0  # child run + verification
    problems: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)  # enabled bitmaps left in_use (not STALE)
    granules: int = 0  # granules of the consistent enabled bitmaps judged
    changed: int = 0  # of those, granules whose data differs from the pre-image
    # per consistent enabled bitmap: (granules, changed, over)
    by_bitmap: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # resilient runs, after the tracked reopen
    resilient: bool = False
    qemu: bool = False  # a qemu-io write between the kill and the reopen
    reopened: bool = False
    qemu_wrote: bool = False
    recovered: int = 0  # bitmaps the reopen made consistent from the write-intent map
    stayed_in_use: int = 0  # qemu runs: bitmaps left in_use by the crash, still in_use
    after: dict[str, int] = field(default_factory=dict)  # consistent, inconsistent, misses,
    # over, granules, changed of the reopened image


def fork_child(work: Callable[[int], None],
               on_error: Callable[[BaseException], bytes]) -> tuple[int, int]:
    """Run ``work(wfd)`` in a forked child that never returns into the caller's stack: it
    ends with ``os._exit`` (no close, no flush, no atexit: a crash, as these tests want). An
    exception is reported through the pipe as ``on_error(exc)`` (called inside the handler,
    so ``traceback.format_exc()`` works there) and the child exits 3. Returns ``(pid, the
    pipe's read end)``."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rfd)
            work(wfd)
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                os.write(wfd, on_error(exc))
            code = 3
        os._exit(code)
    os.close(wfd)
    return pid, rfd


def error_event(limit: int) -> Callable[[BaseException], bytes]:
    """A child's exception as the kill runs' error event: ``E`` and its text."""
    return lambda exc: b"E" + f"{type(exc).__name__}: {exc}".encode()[:limit]


def read_and_reap(pid: int, rfd: int) -> tuple[bytes, int]:
    """Everything the child wrote until it exited, and its wait status."""
    chunks = []
    while chunk := os.read(rfd, 65536):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    return b"".join(chunks), status


def run_child_and_kill(path: Path, plan: KillPlan) -> tuple[str, bool, list[str]]:
    """Fork the workload, kill it as planned; (events seen, killed?, problems)."""
    pid, rfd = fork_child(lambda wfd: child_main(str(path), plan, wfd), error_event(4000))
    events = bytearray()
    problems: list[str] = []
    start = time.monotonic()
    ops = 0

    def should_kill(chunk: bytes) -> bool:
        nonlocal ops
        ops += chunk.count(b".")
        if plan.mode == "quiet":
            return b"Q" in chunk
        if plan.mode == "lull":
            return b"L" in chunk
        if plan.mode == "ops":
            return ops >= plan.kill_ops
        return b"D" in chunk  # a crash point the workload never reached

    done = False
    try:
        while not done:
            if plan.mode == "time":
                left = plan.kill_delay - (time.monotonic() - start)
                if left <= 0:
                    break
                wait = min(left, CHILD_STALL_TIMEOUT)
            else:
                wait = CHILD_STALL_TIMEOUT
            ready, _, _ = select.select([rfd], [], [], wait)
            if not ready:
                if plan.mode == "time":
                    continue
                problems.append(f"child made no progress for {CHILD_STALL_TIMEOUT:.0f} s")
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                done = True
                break
            events += chunk
            if b"E" in chunk:
                msg = bytes(events[events.index(b"E") + 1:]).decode(errors="replace")
                with contextlib.suppress(BlockingIOError, OSError):
                    while more := os.read(rfd, 65536):
                        msg += more.decode(errors="replace")
                problems.append(f"child raised {msg}")
                done = True
                break
            if should_kill(chunk):
                if plan.mode == "ops" and plan.kill_delay:
                    time.sleep(plan.kill_delay)
                break
    finally:
        status = kill_and_reap(pid, rfd, events)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if plan.mode == "close":
        if b"C" not in events and not problems:
            problems.append(f"child did not close cleanly (status {status})")
    elif not killed and not problems:
        problems.append(f"child exited with status {status} before the kill")
    if plan.mode == "quiet" and b"Q" not in events and not problems:
        problems.append("no quiet moment was announced")
    return _summary(bytes(events)), killed, problems


def kill_and_reap(pid: int, rfd: int, events: bytearray) -> int:
    """SIGKILL the child (if it still runs), reap it, and add to ``events`` what it wrote
    up to its death; closes ``rfd``. Returns its wait status."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        os.set_blocking(rfd, False)
        while more := os.read(rfd, 65536):
            events += more
    os.close(rfd)
    return status


def _summary(events: bytes) -> str:
    e = events.split(b"E", 1)[0]
    return f"{e.count(b'.')} ops" + "".join(f" {c}" for c in "OQLDC" if c.encode() in e)


def verify(path: Path, tpl: Template, res: KillResult, *, quiet: bool,
           qemu_sample: bool) -> bool:
    """Judge the image left by a kill; fill ``res``; True when every enabled bitmap is
    consistent. ``quiet``: they must be (a quiet kill, or a clean close)."""
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    proc = sh("qemu-img", "check", "--output=json", str(path), ok=(0, 2, 3))
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    res.leaks = int(report.get("leaks", 0))
    if proc.returncode == 2 or report.get("corruptions") or report.get("check-errors"):
        res.problems.append(f"qemu-img check: corruptions={report.get('corruptions')} "
                            f"check-errors={report.get('check-errors')} rc={proc.returncode}")
    with Qcow2Image.open(str(path), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        data = np.frombuffer(img.read(0, img.size), dtype=np.uint64)
        pre = tpl.pre.view(np.uint64)
        if len(data) > len(pre):  # the disk grew: the new area was zeros
            pre = np.concatenate([pre, np.zeros(len(data) - len(pre), dtype=np.uint64)])
        # changed 512-byte sectors; every granularity is a multiple of 512
        changed512 = (data != pre[:len(data)]).reshape(-1, 64).any(axis=1)
        flags: dict[str, tuple[bool, bool]] = {}
        ours: dict[str, Any] = {}
        for name, gran in tpl.spec.bitmaps.items():
            sb = store.find(name)
            if sb is None:
                res.problems.append(f"bitmap {name} vanished")
                continue
            if sb.problems:
                res.problems.append(f"bitmap {name} damaged: {sb.problems}")
                continue
            flags[name] = (sb.in_use, sb.entry.auto)
            if sb.entry.granularity != gran:
                res.problems.append(f"bitmap {name}: granularity {sb.entry.granularity}")
            if name == STALE:  # inconsistent before anything ran: nothing may vouch for it
                if not sb.in_use:
                    res.problems.append(f"bitmap {name}, inconsistent in the pre-image, "
                                        "reads as consistent")
                continue
            if name == FROZEN:
                if sb.in_use or sb.entry.auto:
                    res.problems.append(f"disabled bitmap {name} in_use={sb.in_use} "
                                        f"auto={sb.entry.auto}")
                    continue
                bm = store.load(name)
                ours[name] = bm
                bits, pre = bits_of(bm), tpl.frozen_bits  # (a grown disk: more bits, clean)
                if not (np.array_equal(bits[:len(pre)], pre) and not bits[len(pre):].any()):
                    res.problems.append(f"disabled bitmap {name} changed")
                continue
            if not sb.entry.auto:
                res.problems.append(f"bitmap {name} lost its auto flag")
            if sb.in_use:
                res.inconsistent += 1
                res.in_use.append(name)
                if quiet:
                    res.problems.append(f"{res.mode}: bitmap {name} left in_use")
                continue
            res.consistent += 1
            bm = store.load(name)
            ours[name] = bm
            bits = bits_of(bm)
            changed = changed_granules(changed512, gran, len(bits))
            missed = changed & ~bits
            n_missed = int(missed.sum())
            pre_bits = np.zeros(len(bits), dtype=bool)
            pre_bits[:len(tpl.pre_bits[name])] = tpl.pre_bits[name][:len(bits)]
            n_over = int((bits & ~changed & ~pre_bits).sum())
            n_changed = int(changed.sum())
            res.misses += n_missed
            res.over += n_over
            res.granules += len(bits)
            res.changed += n_changed
            res.by_bitmap[name] = (len(bits), n_changed, n_over)
            if n_missed:
                first = int(np.flatnonzero(missed)[0]) * gran
                res.problems.append(f"bitmap {name} consistent but misses {n_missed} changed "
                                    f"granules (first at {first:#x})")
    if qemu_sample:
        res.qemu_checked = True
        qemu_cross_check(path, tpl.spec.size, flags, ours, res)
    enabled = [n for n in tpl.spec.bitmaps if n not in (FROZEN, STALE)]
    return all(n in flags and not flags[n][0] for n in enabled)


def changed_granules(changed512: np.ndarray[Any, np.dtype[np.bool_]], gran: int,
                     n: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
    per = gran // 512
    padded = np.zeros(n * per, dtype=bool)
    padded[:len(changed512)] = changed512
    changed: np.ndarray[Any, np.dtype[np.bool_]] = np.any(padded.reshape(n, per), axis=1)
    return changed


def qemu_cross_check(path: Path, disk_size: int, flags: dict[str, tuple[bool, bool]],
                     ours: dict[str, Any], res: KillResult) -> None:
    """QEMU reads the same flags, and serves the same bits for every consistent bitmap."""
    from dirtybits.cli.bitmap import write_map

    info = json.loads(sh("qemu-img", "info", "--output=json", str(path)).stdout)
    theirs = {b["name"]: ("in-use" in b["flags"], "auto" in b["flags"])
              for b in info["format-specific"]["data"].get("bitmaps", [])}
    if theirs != flags:
        res.problems.append(f"qemu-img info flags {theirs} != ours {flags}")
    for name, bm in ours.items():
        out = io.StringIO()
        size = disk_size & ~511
        write_map(out, bm.extents(0, size), size)
        qemu_map = nbd_map(path, name)
        if qemu_map != out.getvalue():
            res.problems.append(f"bitmap {name}: qemu-nbd map differs from ours:\n"
                                f"qemu:\n{qemu_map[:2000]}\nours:\n{out.getvalue()[:2000]}")


def nbd_map(path: Path, bitmap: str) -> str:
    return peers.nbd_map(path, bitmap)


def map_valid(path: Path) -> bool:
    """Is the image's write-intent map trusted (our autoclear bit set)?"""
    from dirtybits.block import write_intent
    from dirtybits.qcow2.image import Qcow2Image

    with Qcow2Image.open(str(path), readonly=True, force_share=True) as img:
        return write_intent.is_valid(img)


def reopen_and_verify(path: Path, tpl: Template, plan: KillPlan, res: KillResult) -> None:
    """Resilient runs: (qemu-io writes, then) a tracked open and close with no writes; judge.

    Without a QEMU write, every enabled bitmap must now be consistent and cover every changed
    granule, and exactly the ones the crash left in_use were recovered. After a QEMU write the
    map must not be trusted: nothing is recovered, what the crash left in_use stays in_use,
    and the consistent ones (QEMU tracked its write in them) still miss nothing."""
    import dirtybits

    crashed_in_use = set(res.in_use)
    if plan.qemu_write is not None:
        off, length, pat = plan.qemu_write
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P {pat:#x} {off} {length}", str(path))
        res.qemu_wrote = True
        if map_valid(path):
            res.problems.append("after the QEMU write the write-intent map is still valid")
    disk = dirtybits.open(str(path))
    try:
        recovered = list(disk.recovered)
    finally:
        disk.close()
    res.reopened = True
    res.recovered = len(recovered)
    after = KillResult(seed=res.seed, template=res.template, mode=res.mode)
    verify(path, tpl, after, quiet=plan.qemu_write is None, qemu_sample=False)
    res.problems += [f"after reopen: {p}" for p in after.problems]
    res.after = {k: getattr(after, k) for k in
                 ("consistent", "inconsistent", "misses", "over", "granules", "changed")}
    res.after["enabled"] = sum(n not in (FROZEN, STALE) for n in tpl.spec.bitmaps)
    for key, i in (("recovered_granules", 0), ("recovered_changed", 1), ("recovered_over", 2)):
        res.after[key] = sum(after.by_bitmap[n][i] for n in recovered if n in after.by_bitmap)
    if plan.qemu_write is None:
        if set(recovered) != crashed_in_use:
            res.problems.append(f"reopen recovered {sorted(recovered)}, the crash left "
                                f"{sorted(crashed_in_use)} in_use")
    else:
        if recovered:
            res.problems.append(f"after a QEMU write the reopen recovered {recovered}")
        still = crashed_in_use & set(after.in_use)
        res.stayed_in_use = len(still)
        if still != crashed_in_use:
            res.problems.append(f"after a QEMU write, bitmaps left in_use by the crash became "
                                f"consistent: {sorted(crashed_in_use - still)}")


def one_kill(seed: int, templates: dict[str, Template], workdir: Path, *,
             qemu_sample: bool, close: bool = False, resilient: bool = False,
             qemu: bool = False) -> KillResult:
    plan = KillPlan.from_seed(seed, close=close, resilient=resilient, qemu=qemu)
    tpl = templates[plan.template]
    path = workdir / f"k{os.getpid()}.qcow2"
    shutil.copyfile(tpl.qcow2, path)
    res = KillResult(seed=seed, template=plan.template, mode=plan.mode, resilient=resilient,
                     qemu=qemu)
    start = time.monotonic()
    try:
        res.events, res.killed, res.problems = run_child_and_kill(path, plan)
        quiet = plan.mode == "quiet" and "Q" in res.events and res.killed
        consistent = verify(path, tpl, res, quiet=quiet or plan.mode == "close",
                            qemu_sample=qemu_sample)
        if quiet:
            res.quiet_consistent = consistent
        if plan.mode == "lull" and "L" in res.events and res.killed:
            res.lull_consistent = consistent
        if plan.resilient:
            reopen_and_verify(path, tpl, plan, res)
    except Exception as exc:  # a broken image the judge cannot even read is a finding
        res.problems.append(f"verification failed: {type(exc).__name__}: {exc}")
    finally:
        path.unlink(missing_ok=True)
    res.seconds = time.monotonic() - start
    return res


# ---------------------------------------------------------------------------- runs
@dataclass
class Totals:
    kills: int = 0  # children killed by SIGKILL
    closed: int = 0  # children that closed cleanly (the close runs)
    consistent: int = 0
    inconsistent: int = 0
    misses: int = 0
    over: int = 0
    leaks: int = 0  # total leaked clusters
    leaky_images: int = 0
    quiet_kills: int = 0
    quiet_consistent: int = 0
    lull_kills: int = 0
    lull_consistent: int = 0
    qemu_checked: int = 0
    # resilient runs (a tracked reopen after the kill)
    reopened: int = 0  # kills (and closes) followed by a reopen, no QEMU write
    crashed_in_use: int = 0  # enabled bitmaps those kills left in_use
    recovered: int = 0  # bitmaps the reopens recovered from the write-intent map
    after_enabled: int = 0  # enabled bitmaps of those images (all must be consistent)
    after_consistent: int = 0
    after_inconsistent: int = 0
    after_misses: int = 0
    after_over: int = 0  # granules set after recovery, not changed, not set before
    after_granules: int = 0
    after_changed: int = 0
    recovered_granules: int = 0  # the same three, over the recovered bitmaps only
    recovered_changed: int = 0
    recovered_over: int = 0
    qemu_runs: int = 0  # kills followed by a qemu-io write, then the reopen
    qemu_crashed_in_use: int = 0  # enabled bitmaps those kills left in_use
    qemu_stayed_in_use: int = 0  # of those, still in_use after the reopen (must be all)
    qemu_after_misses: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    seconds_by_mode: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, r: KillResult) -> None:
        if r.killed:
            self.kills += 1
        elif r.mode == "close" and "C" in r.events:
            self.closed += 1
        self.consistent += r.consistent
        self.inconsistent += r.inconsistent
        self.misses += r.misses
        self.over += r.over
        self.leaks += r.leaks
        self.leaky_images += bool(r.leaks)
        if r.quiet_consistent is not None:
            self.quiet_kills += 1
            self.quiet_consistent += r.quiet_consistent
        if r.lull_consistent is not None:
            self.lull_kills += 1
            self.lull_consistent += r.lull_consistent
        self.qemu_checked += r.qemu_checked
        if r.reopened and not r.qemu:
            self.reopened += 1
            self.crashed_in_use += len(r.in_use)
            self.recovered += r.recovered
            self.after_enabled += r.after.get("enabled", 0)
            self.after_consistent += r.after.get("consistent", 0)
            self.after_inconsistent += r.after.get("inconsistent", 0)
            self.after_misses += r.after.get("misses", 0)
            self.after_over += r.after.get("over", 0)
            self.after_granules += r.after.get("granules", 0)
            self.after_changed += r.after.get("changed", 0)
            self.recovered_granules += r.after.get("recovered_granules", 0)
            self.recovered_changed += r.after.get("recovered_changed", 0)
            self.recovered_over += r.after.get("recovered_over", 0)
        elif r.reopened:
            self.qemu_runs += 1
            self.qemu_crashed_in_use += len(r.in_use)
            self.qemu_stayed_in_use += r.stayed_in_use
            self.qemu_after_misses += r.after.get("misses", 0)
        mode = r.mode + ("+qemu" if r.qemu else "")
        self.by_mode[mode] = self.by_mode.get(mode, 0) + 1
        self.seconds_by_mode[mode] = self.seconds_by_mode.get(mode, 0) + r.seconds
        if r.problems:
            self.failures.append(asdict(r))

    def merge(self, other: dict[str, Any]) -> None:
        for k, v in other.items():
            if k == "failures":
                self.failures += v
            elif k in ("by_mode", "seconds_by_mode"):
                mine = getattr(self, k)
                for m, n in v.items():
                    mine[m] = mine.get(m, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)

    def lines(self) -> list[str]:
        out = [
            f"kills={self.kills} clean-closes={self.closed} "
            f"quiet-kills={self.quiet_kills} (all consistent: {self.quiet_consistent}) "
            f"lull-kills={self.lull_kills} (all consistent: {self.lull_consistent})",
            f"bitmaps after kills: consistent={self.consistent} "
            f"inconsistent={self.inconsistent} misses={self.misses} "
            f"over-reported-granules={self.over}",
            f"leaks: {self.leaks} clusters in {self.leaky_images} images; "
            f"qemu cross-checks={self.qemu_checked}; failures={len(self.failures)}",
        ]
        if self.reopened or self.qemu_runs:
            def ratio(a: int, b: int) -> float:
                return a / b if b else 0.0

            out += [
                f"resilient reopens={self.reopened}: in_use after the kill={self.crashed_in_use} "
                f"recovered={self.recovered}; after reopen consistent={self.after_consistent} "
                f"inconsistent={self.after_inconsistent} misses={self.after_misses}",
                f"  over-reported by the recovered bitmaps: {self.recovered_over} granules = "
                f"{ratio(self.recovered_over, self.recovered_granules):.3%} of their "
                f"{self.recovered_granules} granules, "
                f"{ratio(self.recovered_over, self.recovered_changed):.2f} per changed granule "
                f"({self.recovered_changed} changed)",
                f"  all bitmaps after reopen: over-reported {self.after_over} granules = "
                f"{ratio(self.after_over, self.after_granules):.3%} of "
                f"{self.after_granules} ({self.after_changed} changed)",
                f"qemu-write runs={self.qemu_runs}: in_use after the kill="
                f"{self.qemu_crashed_in_use}, still in_use after the reopen="
                f"{self.qemu_stayed_in_use}; misses in consistent bitmaps="
                f"{self.qemu_after_misses}",
            ]
        out.append("runs by mode (count, mean s): " + ", ".join(
            f"{m} {n} {self.seconds_by_mode.get(m, 0) / n:.2f}"
            for m, n in sorted(self.by_mode.items())))
        return out


def replay_command(f: dict[str, Any]) -> str:
    """The command line that runs a failed kill (``asdict(KillResult)``) again."""
    flags = (" --close" * (f["mode"] == "close") + " --resilient" * f.get("resilient", False)
             + " --qemu" * f.get("qemu", False))
    return f"python tests/crash/harness.py replay {f['seed']}{flags}"


def kill_seeds(seed: int, count: int, worker: int, workers: int,
               qemu_count: int = 0) -> Iterator[tuple[int, int, str]]:
    """(index, kill seed, variant) of the runs this worker does: ``count`` kills ("kill"),
    ``qemu_count`` kills followed by a QEMU write ("qemu"), then one clean-close run per
    CLOSE_EVERY kills ("close")."""
    for i in range(worker, count + qemu_count + count // CLOSE_EVERY, workers):
        variant = "kill" if i < count else "qemu" if i < count + qemu_count else "close"
        yield i, random.Random(f"{seed}:{i}").getrandbits(48), variant


def worker(seed: int, count: int, worker_index: int, workers: int, tdir: Path,
           workdir: Path, progress: bool = False, resilient: bool = False,
           qemu_count: int = 0) -> Totals:
    specs = RESILIENT_TEMPLATES if resilient else TEMPLATES
    templates = load_templates(tdir, specs)
    totals = Totals()
    for i, kseed, variant in kill_seeds(seed, count, worker_index, workers, qemu_count):
        res = one_kill(kseed, templates, workdir, qemu_sample=i % QEMU_SAMPLE_EVERY == 0,
                       close=variant == "close", resilient=resilient, qemu=variant == "qemu")
        totals.add(res)
        if progress and res.problems:
            print(f"FAIL {replay_command(asdict(res))}: {res.problems}", file=sys.stderr,
                  flush=True)
    return totals


def run(count: int, seed: int, workers: int = 2, scratch: Path | None = None,
        progress: bool = False, resilient: bool = False,
        qemu_count: int = 0) -> tuple[Totals, float]:
    """Build the templates, run ``count`` kills over ``workers`` processes; (totals, seconds).
    ``resilient``: on the resilient templates, each kill followed by a tracked reopen, plus
    ``qemu_count`` kills with a QEMU write before the reopen."""
    base = Path(tempfile.mkdtemp(prefix="dirtybits-crash-", dir=scratch or "/var/tmp"))
    try:
        tdir = base / "templates"
        tdir.mkdir()
        build_templates(tdir, RESILIENT_TEMPLATES if resilient else TEMPLATES)
        start = time.monotonic()
        extra = ["--resilient", "--qemu-count", str(qemu_count)] if resilient else []
        procs = [subprocess.Popen(
            [sys.executable, __file__, "worker", "--seed", str(seed), "--count", str(count),
             "--worker", str(w), "--workers", str(workers), "--templates", str(tdir),
             "--dir", str(base), *(["--progress"] if progress else []), *extra],
            stdout=subprocess.PIPE, text=True)
            for w in range(min(workers, count))]
        totals = Totals()
        errors = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                errors.append(f"worker exited {p.returncode}")
                continue
            totals.merge(json.loads(out.strip().splitlines()[-1]))
        elapsed = time.monotonic() - start
        if errors:
            raise RuntimeError("; ".join(errors))
        return totals, elapsed
    finally:
        shutil.rmtree(base, ignore_errors=True)


def replay(kill_seed: int, close: bool = False, scratch: Path | None = None,
           resilient: bool = False, qemu: bool = False) -> KillResult:
    """Run one kill again by its seed (printed with every failure)."""
    base = Path(tempfile.mkdtemp(prefix="dirtybits-replay-", dir=scratch or "/var/tmp"))
    specs = RESILIENT_TEMPLATES if resilient else TEMPLATES
    try:
        build_templates(base, specs)
        print(KillPlan.from_seed(kill_seed, close=close, resilient=resilient, qemu=qemu),
              file=sys.stderr)
        return one_kill(kill_seed, load_templates(base, specs), base, qemu_sample=True,
                        close=close, resilient=resilient, qemu=qemu)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--worker", type=int, required=True)
    w.add_argument("--workers", type=int, required=True)
    w.add_argument("--templates", type=Path, required=True)
    w.add_argument("--dir", type=Path, required=True)
    w.add_argument("--progress", action="store_true")
    w.add_argument("--resilient", action="store_true")
    w.add_argument("--qemu-count", type=int, default=0)
    r = sub.add_parser("replay")
    r.add_argument("kill_seed", type=int)
    r.add_argument("--close", action="store_true")
    r.add_argument("--resilient", action="store_true")
    r.add_argument("--qemu", action="store_true", help="a QEMU write before the reopen "
                   "(with --resilient)")
    args = ap.parse_args(argv)
    if args.cmd == "worker":
        totals = worker(args.seed, args.count, args.worker, args.workers, args.templates,
                        args.dir, args.progress, args.resilient, args.qemu_count)
        print(json.dumps(asdict(totals)))
        return 0
    res = replay(args.kill_seed, args.close, resilient=args.resilient, qemu=args.qemu)
    print(json.dumps(asdict(res), indent=1))
    return 1 if res.problems else 0


if __name__ == "__main__":
    sys.exit(main())
