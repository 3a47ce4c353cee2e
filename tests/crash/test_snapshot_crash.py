"""Kill -9 and fault injection at every write, sync and hole punch of the snapshot operations.

Base images are made by QEMU's tools: ``bm4k`` (4 KiB clusters, two snapshots, two enabled
bitmaps and a disabled one) and ``c512`` (512-byte clusters: a 1 KiB L1 table, many L2
tables, compressed clusters; two snapshots, no bitmap). The operations, each as the CLI runs
it (``dirtybits.block.snapshot``, the block layer for guest writes):

- ``create`` (snapshot -c), ``delete`` (snapshot -d: of the newer snapshot on ``bm4k``, so
  clusters the active view shares with it drop to refcount 1; of the older on ``c512``,
  whose own clusters are freed), ``apply`` (snapshot -a, on ``c512``: QEMU refuses it with bitmaps);
- ``cow``: guest writes over clusters and L2 tables the snapshots share (partial and whole
  clusters, across L2 tables, into compressed clusters), a flush, more writes (now in place),
  a close; on ``bm4k`` the bitmaps track them.

Each runs once with every call counted (``Fault(at=-1)``: it must succeed and leave what QEMU
would, ``qemu-img check`` clean), then once per call and fault in a forked child:
``kill-before`` / ``kill-after`` (SIGKILL at that call: every crash point), ``fail`` /
``fail-after`` (EIO), ``partial`` (half the write, then ENOSPC) as transient errors, and a
sticky EIO. A fault that fires must reach the caller as a ``DirtybitsError`` (a hole punch
is advisory: it may fail silently). The image left is judged by ``snapjudge.judge``: QEMU
opens it, ``qemu-img check`` finds only leaks and the documented OFLAG_COPIED window (which
``check -r all`` repairs, data intact), no COPIED flag on a shared cluster, the snapshot table
and every snapshot's data as before or after, the active data as before or after (writes:
sector by sector, and what a completed flush covered is there), no bitmap silently missing a
write. Then (``follow-up``) the engine writes over shared clusters and takes and deletes a
snapshot on the crashed image: the snapshots keep their data and QEMU checks it clean but
for leaks.

Both kills hit every call; the four faults take turns (each call gets one of them).
Identical images are judged once; the follow-up runs on the kill states that are not clean.
``DIRTYBITS_SNAPCRASH_LONG=1``: every fault on every call, the follow-up on every image.
Planted engine bugs show the judge can fail.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import faultfs
import harness
import snapjudge as sj

import peers

KiB, MiB = 1 << 10, 1 << 20
LONG = os.environ.get("DIRTYBITS_SNAPCRASH_LONG") == "1"
WORKERS = int(os.environ.get("DIRTYBITS_CRASH_WORKERS", "2"))
KINDS = faultfs.WRITES + faultfs.SYNCS + faultfs.PUNCH
NO_TIMERS = {"interval": None, "idle": None, "threshold_bits": None}

# (action, errno, sticky)
CASES: dict[str, tuple[str, int, bool]] = {
    "kill-before": ("kill-before", 0, False),
    "kill-after": ("kill-after", 0, False),
    "fail-EIO": ("fail", errno.EIO, False),
    "fail-after-EIO": ("fail-after", errno.EIO, False),
    "partial-ENOSPC": ("partial", errno.ENOSPC, False),
    "sticky-EIO": ("fail", errno.EIO, True),
}
# In a normal run these take turns (each call gets one of them); the kills hit every call.
ROTATED = ("partial-ENOSPC", "fail-EIO", "fail-after-EIO", "sticky-EIO")


# ---------------------------------------------------------------------------- base images
@dataclass
class Base:
    name: str
    path: Path
    size: int
    table: list[tuple[sj.Key, str]]  # the snapshot table and each snapshot's data digest
    active: bytes
    s1: bytes  # snapshot s1's data (what apply brings back)
    bitmaps: dict[str, tuple[int, bool, Any]] = field(default_factory=dict)
    writes: tuple[list[tuple[int, int, int]], ...] = ()  # cow: (offset, length, pattern)


def _qemu_io(path: Path, *cmds: str) -> None:
    peers.qemu_io(path, *cmds, fmt="qcow2", timeout=120)


def build_bases(directory: Path) -> dict[str, Base]:
    """The base images, made by QEMU's tools only."""
    img = directory / "bm4k.qcow2"
    harness.sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
               str(img), "8M")
    harness.sh("qemu-img", "bitmap", "--add", "-g", "262144", str(img), "frozen")
    _qemu_io(img, "write -P 0x11 0 1M", "write -P 0x12 3M 512k")
    harness.sh("qemu-img", "bitmap", "--disable", str(img), "frozen")
    harness.sh("qemu-img", "bitmap", "--add", "-g", "65536", str(img), "g64k")
    harness.sh("qemu-img", "bitmap", "--add", "-g", "4096", str(img), "g4k")
    _qemu_io(img, "write -P 0x13 2M 256k", "write -z 5M 64k")
    harness.sh("qemu-img", "snapshot", "-c", "s1", str(img))
    _qemu_io(img, "write -P 0x21 64k 8k", "write -P 0x22 2052k 4k", "write -P 0x23 6M 128k")
    harness.sh("qemu-img", "snapshot", "-c", "s2", str(img))
    _qemu_io(img, "write -P 0x31 512k 4k", "discard 3M 64k")
    bm4k = (
        [(64 * KiB + 512, 1000, 0xA1), (2 * MiB - 2 * KiB, 8 * KiB, 0xA2),
         (6 * MiB + 4 * KiB, 4 * KiB, 0xA3), (7 * MiB, 64 * KiB, 0xA4)],
        [(64 * KiB, 4 * KiB, 0xB1), (3 * MiB, 128 * KiB, 0xB2), (MiB - 512, 1024, 0xB3)],
    )

    img = directory / "c512.qcow2"
    harness.sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img),
               "4M")
    _qemu_io(img, "write -P 0x41 0 256k", "write -c -P 0x42 1M 4k", "write -P 0x43 2M 64k")
    harness.sh("qemu-img", "snapshot", "-c", "s1", str(img))
    _qemu_io(img, "write -P 0x51 100k 1k", "write -P 0x52 1049088 512", "write -z 2M 4k",
             "write -P 0x53 3M 16k")
    harness.sh("qemu-img", "snapshot", "-c", "s2", str(img))
    _qemu_io(img, "write -P 0x61 0 512", "discard 200k 8k")
    c512 = (
        [(MiB, 512, 0xA1), (100 * KiB, 2 * KiB, 0xA2), (32 * KiB - 512, 1024, 0xA3),
         (3 * MiB + 1024, 20 * KiB, 0xA4)],
        [(100 * KiB + 512, 512, 0xB1), (0, 64 * KiB, 0xB2), (4 * MiB - 1024, 1024, 0xB3)],
    )
    bases = {}
    for name, writes in (("bm4k", bm4k), ("c512", c512)):
        path = directory / f"{name}.qcow2"
        harness.sh("qemu-img", "check", "-q", str(path))
        view = sj.qemu_view(path, directory / "scratch")
        s1 = next(k for k in view.snapshots if k[1] == "s1")
        bases[name] = Base(name, path, len(view.active),
                           [(k, view.data[k]) for k in view.snapshots], view.active,
                           sj.read_raw(path, directory / "scratch", s1[0]),
                           sj.bitmap_bits(path), writes)
    return bases


# ---------------------------------------------------------------------------- operations
Progress = Callable[[str], None]


def op_create(path: str, progress: Progress) -> None:
    from dirtybits.block.snapshot import create_snapshot

    create_snapshot(path, "new")


DELETE = {"bm4k": "s2", "c512": "s1"}  # the snapshot ``delete`` deletes


def op_delete(base: Base) -> Callable[[str, Progress], None]:
    def run(path: str, progress: Progress) -> None:
        from dirtybits.block.snapshot import delete_snapshot

        delete_snapshot(path, DELETE[base.name])
    return run


def op_apply(path: str, progress: Progress) -> None:
    from dirtybits.block.snapshot import apply_snapshot

    apply_snapshot(path, "s1")


def op_cow(base: Base) -> Callable[[str, Progress], None]:
    def run(path: str, progress: Progress) -> None:
        import dirtybits

        disk = dirtybits.open(path, checkpoint=dirtybits.CheckpointPolicy(**NO_TIMERS))
        try:
            for batch, writes in enumerate(base.writes):
                for off, length, pat in writes:
                    try:
                        disk.write(off, bytes([pat]) * length)
                    except Exception:
                        progress(f"failed {off} {length}")  # its range: undefined
                        raise
                if batch + 1 < len(base.writes):
                    disk.flush()
                    progress(f"batch{batch}")
        finally:
            disk.close()
        progress(f"batch{len(base.writes) - 1}")
    return run


def expect_for(base: Base, op: str, done: set[str]) -> sj.Expect:
    """What a crash during ``op`` may leave; ``done``: the progress marks the child sent."""
    t0 = base.table
    common = {"pre": base.active, "bitmaps": base.bitmaps}
    if op == "create":
        top = max(int(k[0]) for k, _ in t0)
        t1 = [*t0, ((str(top + 1), "new"), sj.digest(base.active))]
        return sj.Expect([t0, t1], [base.active], **common)
    if op == "delete":
        first = next(i for i, (k, _) in enumerate(t0) if k[1] == DELETE[base.name])
        return sj.Expect([t0, t0[:first] + t0[first + 1:]], [base.active], **common)
    if op == "apply":
        return sj.Expect([t0], [base.active, base.s1], **common)
    states = [bytearray(base.active)]
    for writes in base.writes:
        nxt = bytearray(states[-1])
        for off, length, pat in writes:
            nxt[off:off + length] = bytes([pat]) * length
        states.append(nxt)
    # a write is durable once a flush (or the close) that followed it returned: its
    # sectors hold its data or a later write's
    durable = [(off, length, i + 1) for i, writes in enumerate(base.writes)
               if f"batch{i}" in done for off, length, _ in writes]
    loose = [(int(a), int(b)) for m in done if m.startswith("failed ")
             for a, b in [m.split()[1:]]]
    return sj.Expect([t0], [bytes(s) for s in states], per_sector=True, durable=durable,
                     loose=loose, **common)


def final_expect(base: Base, op: str) -> sj.Expect:
    """The state a completed ``op`` must leave (exactly)."""
    e = expect_for(base, op, {"batch0", "batch1"})
    if op in ("create", "delete"):
        e.tables = e.tables[1:]
    else:
        e.actives = e.actives[-1:]
    e.per_sector = False
    return e


OPS: dict[str, tuple[str, ...]] = {"bm4k": ("create", "delete", "cow"),
                                   "c512": ("create", "delete", "apply", "cow")}


def runner(base: Base, op: str) -> Callable[[str, Progress], None]:
    if op == "delete":
        return op_delete(base)
    return {"create": op_create, "apply": op_apply}.get(op) or op_cow(base)


# ---------------------------------------------------------------------------- one child
@dataclass
class Outcome:
    case: str
    at: int
    fired: str | None = None
    killed: bool = False
    calls: int = 0
    log: list[str] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    raised: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    image: Path | None = None


def run_child(base: Base, op: str, path: Path, fault: faultfs.Fault) -> Outcome:
    """Run ``op`` on ``path`` in a forked child with ``fault`` armed; never clean up."""
    def work(wfd: int) -> None:
        def progress(mark: str) -> None:
            os.write(wfd, f"M {mark}\n".encode())

        report: dict[str, Any] = {"raised": [], "bad": []}
        with faultfs.inject(fault):
            try:
                runner(base, op)(str(path), progress)
            except Exception as exc:  # what reaches the caller must be a DirtybitsError
                from dirtybits.errors import DirtybitsError

                report["raised"].append(f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, DirtybitsError):
                    report["bad"].append("".join(traceback.format_exception(exc)))
        report.update(fired=fault.fired, calls=fault.calls, log=fault.log)
        os.write(wfd, ("R " + json.dumps(report) + "\n").encode())

    pid, rfd = harness.fork_child(
        work, lambda exc: ("R " + json.dumps({"child-error": traceback.format_exc()})
                           + "\n").encode())
    raw, status = harness.read_and_reap(pid, rfd)
    out = Outcome(case="", at=fault.at, killed=os.WIFSIGNALED(status))
    for line in raw.decode().splitlines():
        if line.startswith("M "):
            out.done.add(line[2:])
        elif line.startswith("R "):
            rep = json.loads(line[2:])
            if "child-error" in rep:
                out.problems.append(f"child failed: {rep['child-error']}")
                continue
            out.fired, out.calls, out.log = rep["fired"], rep["calls"], rep["log"]
            out.raised = rep["raised"]
            out.problems += [f"not a DirtybitsError:\n{b}" for b in rep["bad"]]
    return out


def run_case(base: Base, op: str, case: str, at: int, work: Path) -> Outcome:
    action, err, sticky = CASES[case]
    path = work / f"{op}-{case}-{at}.qcow2"
    shutil.copyfile(base.path, path)
    out = run_child(base, op, path, faultfs.Fault(at=at, action=action, errno=err,
                                                  sticky=sticky, kinds=KINDS))
    out.case, out.image = case, path
    if action.startswith("kill"):
        if not out.killed and not out.problems:
            out.problems.append("the kill did not happen")
    elif out.killed:
        out.problems.append("the child died")
    elif out.fired and not out.raised and not out.fired.startswith("punch_hole"):
        out.problems.append(f"{out.fired} failed and nobody was told")
    return out


# ---------------------------------------------------------------------------- follow-up
def follow_up(state: Path, before: sj.View, scratch: Path) -> list[str]:
    """The engine keeps using a crashed image: writes over shared clusters, a snapshot taken
    and deleted. The snapshots there keep their data; QEMU checks it clean but for leaks."""
    from dirtybits.block.snapshot import create_snapshot, delete_snapshot
    from dirtybits.errors import DirtybitsError
    from dirtybits.qcow2.image import Qcow2Image

    path = scratch / "follow.qcow2"
    shutil.copyfile(state, path)
    try:
        active = bytearray(before.active)
        try:
            with Qcow2Image.open(str(path), keep_bitmaps=True) as img:
                size = img.size
                for i, off in enumerate(range(0, size - 6000, size // 7)):
                    data = bytes([0xF0 + i]) * 6000
                    img.write(off, data)
                    active[off:off + len(data)] = data
            create_snapshot(str(path), "follow")
            delete_snapshot(str(path), "follow")
        except DirtybitsError as exc:
            return [f"follow-up refused: {type(exc).__name__}: {exc}"]
        chk = sj.qemu_check(path)
        problems = []
        if chk.rc not in (0, 3) or chk.corruptions or chk.check_errors:
            problems.append(f"follow-up: qemu-img check {chk.errors[:3]}")
        after = sj.qemu_view(path, scratch)
        if after.snapshots != before.snapshots or after.data != before.data:
            problems.append("follow-up writes changed the snapshots")
        if after.active != bytes(active):
            problems.append("follow-up writes do not read back")
        return problems
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the run
@dataclass
class Tally:
    calls: int = 0
    runs: int = 0
    fired: int = 0
    distinct: int = 0
    copied_window: int = 0  # states with OFLAG_COPIED errors (repaired clean)
    leaky: int = 0
    old: int = 0  # states equal to before / after the operation (whole ops)
    new: int = 0
    followed: int = 0
    child_seconds: float = 0.0
    judge_seconds: float = 0.0
    by_case: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def explore(base: Base, op: str, work: Path, cases: tuple[str, ...], *,
            stop_at_first: bool = False) -> Tally:
    tally = Tally()
    counting = run_case(base, op, "fail-EIO", -1, work)
    assert not counting.problems and not counting.raised, (counting.problems,
                                                           counting.raised)
    assert counting.image is not None
    verdict = sj.judge(counting.image, final_expect(base, op), work / "j0")
    tally.failures += [f"the completed operation: {p}" for p in verdict.problems]
    if verdict.check.rc != 0 or verdict.check.leaks:
        tally.failures.append(f"the completed operation left {verdict.check}")
    tally.calls = counting.calls
    kinds = Counter(counting.log)
    assert kinds["fdatasync"] and (kinds["pwrite"] + kinds["pwritev"]), kinds
    # every call of the run, each fault kind: the children first (no fork among threads)
    states: dict[str, tuple[Path, Outcome]] = {}
    outcomes: list[Outcome] = []
    start = time.monotonic()
    for case in cases:
        for at in range(tally.calls):
            if not LONG and case in ROTATED and at % len(ROTATED) != ROTATED.index(case):
                continue
            out = run_case(base, op, case, at, work)
            tally.runs += 1
            tally.fired += out.fired is not None
            tally.by_case[case] += 1
            outcomes.append(out)
            if out.problems:
                tally.failures.append(f"{case} at call {at} ({out.fired}): {out.problems}")
            assert out.image is not None
            key = hashlib.sha256(out.image.read_bytes()
                                 + repr(sorted(out.done)).encode()).hexdigest()
            if key in states:
                out.image.unlink()
            else:
                states[key] = (out.image, out)
    tally.distinct = len(states)
    tally.child_seconds = time.monotonic() - start
    start = time.monotonic()

    expects: dict[frozenset[str], sj.Expect] = {}
    for _, out in states.values():  # (the models are large: one for each set of marks)
        key = frozenset(out.done)
        if key not in expects:
            expects[key] = expect_for(base, op, out.done)

    def judge(item: tuple[int, tuple[Path, Outcome]]) -> tuple[list[str], str, int]:
        n, (image, out) = item
        expect = expects[frozenset(out.done)]
        scratch = work / f"j{n + 1}"
        verdict = sj.judge(image, expect, scratch)
        problems = verdict.problems
        chk = verdict.check
        kind = "copied" if chk.corruptions else "leaky" if chk.leaks else ""
        # after a kill, unless the image is as clean as before or after the operation
        follow = LONG or (out.case.startswith("kill") and bool(kind))
        if not problems and follow and verdict.view is not None:
            problems += follow_up(image, verdict.view, scratch)
            kind += "+followed"
        label = f"{out.case} at call {out.at} ({out.fired}; raised {out.raised[:1]})"
        return [f"{label}: {p}" for p in problems], kind, verdict.which(expect)

    with ThreadPoolExecutor(1 if stop_at_first else WORKERS) as pool:
        for problems, kind, whole in pool.map(judge, enumerate(states.values())):
            if stop_at_first and tally.failures:
                break
            tally.failures += problems
            tally.copied_window += kind.startswith("copied")
            tally.leaky += kind.startswith("leaky")
            tally.followed += kind.endswith("followed")
            tally.old += whole == 0
            tally.new += whole == 1
    for image, _ in states.values():
        image.unlink(missing_ok=True)
    tally.judge_seconds = time.monotonic() - start
    return tally


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    d = tmp_path_factory.mktemp("snapcrash-bases")
    out = build_bases(d)
    # every operation once in this process: the children then find every module loaded
    for name, ops in OPS.items():
        for op in ops:
            shutil.copyfile(out[name].path, d / "warm.qcow2")
            runner(out[name], op)(str(d / "warm.qcow2"), lambda mark: None)
    (d / "warm.qcow2").unlink()
    return out


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """Where the children run: tmpfs when there is one (a kill keeps the page cache, so
    the syncs need not reach a disk: they cost nothing there)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="snapcrash-", dir=shm))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


@pytest.mark.interop
@pytest.mark.parametrize("base_op", [f"{b}-{o}" for b, ops in OPS.items() for o in ops])
def test_every_call_killed_and_failed_in_turn(bases: dict[str, Base], work: Path,
                                              base_op: str, qemu_tools: dict[str, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    name, op = base_op.split("-")
    tally = explore(bases[name], op, work, tuple(CASES))
    summary = (f"{base_op}: {tally.calls} calls, {tally.runs} runs ({dict(tally.by_case)}), "
               f"faults fired {tally.fired}, {tally.distinct} distinct images judged: "
               f"{tally.copied_window} in the OFLAG_COPIED window (repaired clean), "
               f"{tally.leaky} leaky, {tally.followed} followed up; before/after "
               f"{tally.old}/{tally.new}; failures {len(tally.failures)} "
               f"({tally.child_seconds:.1f} s runs, {tally.judge_seconds:.1f} s judging)")
    with capsys.disabled():
        print("\n" + summary)
    assert not tally.failures, summary + "\n" + "\n".join(tally.failures[:8])


def _eager_free(self: Any, cluster_index: int, *, punch: bool = False) -> None:
    """A planted bug: a cluster copy-on-write replaced loses its reference at once, before
    the entry that replaced it is on disk (the engine queues it until the next flush)."""
    self._update_refcount(cluster_index, -1)
    self._write_dirty_refblocks()


def _planted(bug: str) -> tuple[Any, str, Any]:
    """(object, attribute, replacement) of a planted bug."""
    from dirtybits.qcow2 import snapshots
    from dirtybits.qcow2.image import Qcow2Image

    if bug == "free-before-the-new-entry":
        return Qcow2Image, "_queue_free", _eager_free
    return snapshots, "_fix_active_copied", lambda img: None


PLANTED = {"free-before-the-new-entry": ("c512", "cow"),
           "copied-left-on-shared": ("bm4k", "create")}


@pytest.mark.interop
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_engine_bugs_are_caught(bases: dict[str, Base], work: Path, bug: str,
                                        qemu_tools: dict[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The judge can fail: an engine that frees a cluster before the entry that replaced it
    is on disk leaves a refcount too low at some kill point; one that leaves COPIED on the
    entries a new snapshot shares would write into the snapshot."""
    monkeypatch.setattr(*_planted(bug))
    name, op = PLANTED[bug]
    tally = explore(bases[name], op, work, ("kill-before",), stop_at_first=True)
    assert tally.failures, f"planted bug {bug} went unnoticed"
    print(f"planted {bug}: caught: {tally.failures[0][:300]}")


@pytest.mark.interop
def test_apply_with_bitmaps_is_refused_untouched(bases: dict[str, Base], tmp_path: Path,
                                                 qemu_tools: dict[str, str]) -> None:
    from dirtybits.block.snapshot import apply_snapshot
    from dirtybits.qcow2.snapshots import SnapshotError

    path = tmp_path / "a.qcow2"
    shutil.copyfile(bases["bm4k"].path, path)
    before = path.read_bytes()
    with pytest.raises(SnapshotError, match="Device has active dirty bitmaps"):
        apply_snapshot(str(path), "s1")
    assert path.read_bytes() == before
