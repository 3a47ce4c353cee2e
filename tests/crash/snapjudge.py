"""Judging an image with internal snapshots after a crash (kill -9, a fault, a power loss).

Shared by ``test_snapshot_crash.py`` and the ``snapshot`` workloads of ``powerloss.py``. An
image passes when:

- QEMU opens it and ``qemu-img check`` finds nothing but leaks and ``OFLAG_COPIED`` errors
  (the documented window: a refcount on disk already raised or lowered, the flag not yet);
  with such errors, ``qemu-img check -r all`` on a copy makes it clean (no error, no leak)
  and every snapshot and the active view still read the same;
- no entry of the active view has ``QCOW_OFLAG_COPIED`` on a cluster that more than one
  view (the active one, the snapshots in the table) really references: a write would go in
  place and change a snapshot. Counted here by a parser of its own (``copied_on_shared``),
  not by the engine under test nor from the refcounts on disk;
- the snapshot table (IDs and names, as ``qemu-img info`` lists them) is the one before or
  the one after the interrupted operation, and each snapshot reads (``qemu-img convert -l
  snapshot.id=ID``) exactly as the model says;
- the active view (``qemu-img convert``) is the state before or after the operation: as a
  whole (snapshot apply), or sector by sector (guest writes, each request landing or not),
  and ranges the model says are durable hold their new data;
- every persistent bitmap still exists undamaged; a disabled one holds its old bits, and an
  enabled one that reads as consistent covers every granule whose data changed (no silent
  miss).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness

SECTOR = 512
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
Key = tuple[str, str]  # (id, name) of a snapshot


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- what QEMU reads
@dataclass
class View:
    """An image as QEMU's tools read it."""

    snapshots: list[Key]
    data: dict[Key, str]  # digest of each snapshot's guest data
    active: bytes


def qemu(*cmd: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    return harness.sh(*cmd, ok=ok)


def snapshot_keys(path: Path) -> list[Key]:
    info = json.loads(qemu("qemu-img", "info", "-U", "--output=json", "-f", "qcow2",
                           str(path)).stdout)
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


def read_raw(path: Path, scratch: Path, snapshot_id: str | None = None) -> bytes:
    out = scratch / f"read-{snapshot_id or 'active'}.raw"
    args = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    qemu(*args, str(path), str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_view(path: Path, scratch: Path) -> View:
    scratch.mkdir(parents=True, exist_ok=True)
    keys = snapshot_keys(path)
    data = {k: digest(read_raw(path, scratch, k[0])) for k in keys}
    return View(keys, data, read_raw(path, scratch))


@dataclass
class Check:
    rc: int
    corruptions: int = 0
    check_errors: int = 0
    leaks: int = 0
    errors: list[str] = field(default_factory=list)  # the ERROR lines

    @property
    def copied_only(self) -> bool:
        """Only OFLAG_COPIED errors (and as many as the corruptions counted)."""
        return (not self.check_errors and bool(self.errors)
                and all(e.startswith("ERROR OFLAG_COPIED") for e in self.errors)
                and len(self.errors) >= self.corruptions)


def qemu_check(path: Path, *repair: str) -> Check:
    proc = qemu("qemu-img", "check", *repair, "--output=json", "-f", "qcow2", str(path),
                ok=(0, 1, 2, 3))
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        return Check(proc.returncode, errors=[proc.stderr.strip()[:300] or "no report"])
    errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
    return Check(proc.returncode, int(report.get("corruptions", 0)),
                 int(report.get("check-errors", 0)), int(report.get("leaks", 0)), errors)


# ---------------------------------------------------------------------------- COPIED safety
def copied_on_shared(data: bytes) -> list[str]:
    """Active-view entries with COPIED whose cluster more than one view references.

    A parser of its own (qcow2 v2/v3, no extended L2): every view (the active L1 table and
    each snapshot's) counts one reference on each L2 table it names and on each cluster
    those tables name (a compressed entry on each host cluster its payload touches), as QEMU
    counts them.
    """
    def at(off: int, n: int) -> bytes:  # (what lies past the end of the file reads as 0)
        raw = data[off:off + n]
        return raw + bytes(n - len(raw))

    def u64s(off: int, n: int) -> list[int]:
        return list(struct.unpack(f">{n}Q", at(off, 8 * n)))

    cb = struct.unpack(">I", at(20, 4))[0]
    if not 9 <= cb <= 21:
        return [f"cluster_bits {cb}"]
    cs = 1 << cb
    l1_size, l1_off = struct.unpack(">IQ", at(36, 12))
    nb, sn_off = struct.unpack(">IQ", at(60, 12))
    views: list[tuple[str, int, int]] = [("active", l1_off, l1_size)]
    pos = sn_off
    for _ in range(nb):
        off, size, id_size, name_size = struct.unpack(">QIHH", at(pos, 16))
        extra = struct.unpack(">I", at(pos + 36, 4))[0]
        sid = at(pos + 40 + extra, id_size).decode(errors="replace")
        views.append((f"snapshot {sid}", off, size))
        pos += (40 + extra + id_size + name_size + 7) & ~7
    refs: Counter[int] = Counter()
    flagged: list[tuple[str, int, int]] = []  # (what, host offset, entry)
    x = 62 - (cb - 8)
    for label, off, n in views:
        for i, e in enumerate(u64s(off, n)):
            l2 = e & L1E_OFFSET_MASK
            if not l2:
                continue
            refs[l2 >> cb] += 1
            if label == "active" and e & OFLAG_COPIED:
                flagged.append((f"L2 table (L1 index {i})", l2, e))
            for j, e2 in enumerate(u64s(l2, cs // 8)):
                if e2 & OFLAG_COMPRESSED:
                    host = e2 & ((1 << x) - 1)
                    end = (host & ~511) + (((e2 >> x) & ((1 << (cb - 8)) - 1)) + 1) * 512
                    for c in range(host >> cb, ((end - 1) >> cb) + 1):
                        refs[c] += 1
                elif e2 & L2E_OFFSET_MASK:
                    refs[(e2 & L2E_OFFSET_MASK) >> cb] += 1
                    if label == "active" and e2 & OFLAG_COPIED:
                        guest = (i * (cs // 8) + j) * cs
                        flagged.append((f"data cluster (guest {guest:#x})",
                                        e2 & L2E_OFFSET_MASK, e2))
    return [f"COPIED on a shared {what}: entry {e:#x}, {refs[host >> cb]} references"
            for what, host, e in flagged if refs[host >> cb] > 1]


# ---------------------------------------------------------------------------- the model
@dataclass
class Expect:
    """What a crash during one operation may leave.

    ``tables``: the snapshot tables allowed (before, after), each a list of (key, digest of
    its data). ``actives``: the active data allowed, in order (none: not judged here);
    ``per_sector``: each 512-byte sector may come from any of them (guest writes), else the
    whole disk is one of them.
    ``durable``: (offset, length, k): guest ranges a completed flush covered, whose sectors
    must come from ``actives[k:]`` (that write, or a later one over it).
    ``loose``: ranges of guest writes that failed (their content is undefined, as a disk's
    after a failed write). ``pre``: the active data before the run (what bitmaps are judged
    against), ``bitmaps``: name -> (granularity, enabled, bits before the run).
    """

    tables: list[list[tuple[Key, str]]]
    actives: list[bytes]
    per_sector: bool = False
    durable: list[tuple[int, int, int]] = field(default_factory=list)
    loose: list[tuple[int, int]] = field(default_factory=list)
    pre: bytes = b""
    bitmaps: dict[str, tuple[int, bool, Any]] = field(default_factory=dict)


def compare(view: View, expect: Expect) -> list[str]:
    problems: list[str] = []
    table = [(k, view.data[k]) for k in view.snapshots]
    if table not in expect.tables:
        keys = [[k for k, _ in t] for t in expect.tables]
        if view.snapshots not in keys:
            problems.append(f"snapshot table {view.snapshots}, expected one of {keys}")
        else:
            wanted = expect.tables[keys.index(view.snapshots)]
            bad = [k for (k, d), (_, w) in zip(table, wanted, strict=True) if d != w]
            problems.append(f"snapshots {bad} read other data than they hold")
    problems += compare_active(view.active, expect)
    return problems


def compare_active(active: bytes, expect: Expect) -> list[str]:
    if not expect.actives:  # the caller judges it
        return []
    if not expect.per_sector:
        if active in expect.actives:
            return []
        return ["the active view is neither the state before nor the one after "
                f"({_differing(active, expect.actives)})"]
    now = np.frombuffer(active, dtype=np.uint8).reshape(-1, SECTOR)
    fits = np.zeros(len(now), dtype=bool)
    for off, length in expect.loose:
        fits[off // SECTOR:-(-(off + length) // SECTOR)] = True
    loose = fits.copy()
    for cand in expect.actives:
        c = np.frombuffer(cand, dtype=np.uint8).reshape(-1, SECTOR)
        fits |= (now == c).all(axis=1)
    problems = []
    if not fits.all():
        first = int(np.flatnonzero(~fits)[0]) * SECTOR
        problems.append(f"{int((~fits).sum())} sectors hold neither old nor new data "
                        f"(first at {first:#x})")
    for off, length, k in expect.durable:
        a, b = off // SECTOR, -(-(off + length) // SECTOR)
        ok = loose[a:b].copy()
        for cand in expect.actives[k:]:
            c = np.frombuffer(cand, dtype=np.uint8).reshape(-1, SECTOR)
            ok |= (now[a:b] == c[a:b]).all(axis=1)
        if not ok.all():
            problems.append(f"flushed write [{off:#x}, +{length:#x}) lost")
    return problems


def _differing(active: bytes, cands: list[bytes]) -> str:
    out = []
    for c in cands:
        a = np.frombuffer(active, dtype=np.uint8).reshape(-1, SECTOR)
        b = np.frombuffer(c, dtype=np.uint8).reshape(-1, SECTOR)
        diff = np.flatnonzero((a != b).any(axis=1))
        out.append(f"{len(diff)} sectors differ, first at {int(diff[0]) * SECTOR:#x}"
                   if len(diff) else "same")
    return "; ".join(out)


def bitmap_bits(path: Path) -> dict[str, tuple[int, bool, Any]]:
    """name -> (granularity, enabled, bits) of every bitmap (read by the engine)."""
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    out = {}
    with Qcow2Image.open(str(path), readonly=True, force_share=True) as img:
        store = Qcow2BitmapStore(img)
        for sb in store.bitmaps:
            out[sb.name] = (sb.entry.granularity, sb.entry.auto,
                            harness.bits_of(store.load(sb.name)))
    return out


def judge_bitmaps(path: Path, active: bytes, expect: Expect) -> list[str]:
    if not expect.bitmaps:
        return []
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    problems: list[str] = []
    a = np.frombuffer(active, dtype=np.uint8).reshape(-1, SECTOR)
    p = np.frombuffer(expect.pre, dtype=np.uint8).reshape(-1, SECTOR)
    changed512 = (a != p).any(axis=1)
    with Qcow2Image.open(str(path), readonly=True, force_share=True) as img:
        store = Qcow2BitmapStore(img)
        for name, (gran, enabled, pre_bits) in expect.bitmaps.items():
            sb = store.find(name)
            if sb is None:
                problems.append(f"bitmap {name} vanished")
                continue
            if sb.problems:
                problems.append(f"bitmap {name} damaged: {sb.problems}")
                continue
            if sb.entry.auto != enabled:
                problems.append(f"bitmap {name}: auto {sb.entry.auto}, was {enabled}")
            if sb.in_use:
                if not enabled:
                    problems.append(f"disabled bitmap {name} in_use")
                continue
            bits = harness.bits_of(store.load(name))
            if not enabled:
                if not np.array_equal(bits, pre_bits):
                    problems.append(f"disabled bitmap {name} changed")
                continue
            changed = harness.changed_granules(changed512, gran, len(bits))
            missed = int((changed & ~bits).sum())
            if missed:
                first = int(np.flatnonzero(changed & ~bits)[0]) * gran
                problems.append(f"bitmap {name} consistent but misses {missed} changed "
                                f"granules (first at {first:#x})")
    return problems


# ---------------------------------------------------------------------------- the judge
@dataclass
class Verdict:
    problems: list[str]
    check: Check
    view: View | None = None

    def which(self, expect: Expect) -> int:
        """Index of the expected table (create, delete) or active (apply) this image holds;
        -1 when it can't say."""
        if self.view is None:
            return -1
        table = [(k, self.view.data[k]) for k in self.view.snapshots]
        if len(expect.tables) > 1 and table in expect.tables:
            return expect.tables.index(table)
        if not expect.per_sector and len(expect.actives) > 1 \
                and self.view.active in expect.actives:
            return expect.actives.index(self.view.active)
        return -1


def judge(path: Path, expect: Expect, scratch: Path) -> Verdict:
    """Judge the image at ``path`` (no problems: it passes)."""
    scratch.mkdir(parents=True, exist_ok=True)
    chk = qemu_check(path)
    if chk.rc == 1 or chk.check_errors:
        return Verdict([f"qemu-img check cannot check it (rc {chk.rc}): {chk.errors[:2]}"],
                       chk)
    problems: list[str] = []
    if chk.corruptions and not chk.copied_only:
        problems.append(f"qemu-img check: {chk.corruptions} corruptions: "
                        f"{[e for e in chk.errors if 'OFLAG_COPIED' not in e][:3]}")
    problems += copied_on_shared(path.read_bytes())
    try:
        view = qemu_view(path, scratch)
    except RuntimeError as exc:
        return Verdict([*problems, f"QEMU cannot read it: {str(exc)[:300]}"], chk)
    problems += compare(view, expect)
    try:
        problems += judge_bitmaps(path, view.active, expect)
    except Exception as exc:  # the judge's own reader refusing is a finding too
        problems.append(f"bitmaps unreadable: {type(exc).__name__}: {exc}")
    if chk.corruptions and not problems:
        problems += repaired(path, view, scratch)
    return Verdict(problems, chk, view)


def bitmap_names(path: Path) -> list[str]:
    info = json.loads(qemu("qemu-img", "info", "-U", "--output=json", "-f", "qcow2",
                           str(path)).stdout)
    data = info.get("format-specific", {}).get("data", {})
    return [b["name"] for b in data.get("bitmaps", [])]


def repaired(path: Path, view: View, scratch: Path) -> list[str]:
    """``qemu-img check -r all`` on a copy leaves it clean and reading the same; so does
    ``dirtybits check -r all`` on another.

    QEMU 7.2's ``check -r`` (leaks or all) drops every internal snapshot of an image that has
    persistent bitmaps (``qemu-img snapshot -l`` lists none afterwards; seen on images QEMU
    made itself): its copy loses its bitmaps first (``qemu-img bitmap --remove``), which
    change no guest data. dirtybits' repair keeps both.
    """
    problems = []
    for tool in ("qemu", "dirtybits"):
        copy = scratch / f"repair-{tool}.qcow2"
        shutil.copyfile(path, copy)
        try:
            if tool == "qemu":
                for name in bitmap_names(copy):
                    qemu("qemu-img", "bitmap", "--remove", str(copy), name)
                qemu("qemu-img", "check", "-q", "-r", "all", str(copy), ok=(0, 1, 2, 3))
            else:
                harness.sh(sys.executable, "-m", "dirtybits.cli.main", "check", "-q", "-r",
                           "all", str(copy), ok=(0, 1, 2, 3))
            after = qemu_check(copy)
            if after.rc != 0 or after.corruptions or after.leaks:
                problems.append(f"{tool} check -r all left {after.corruptions} corruptions, "
                                f"{after.leaks} leaks: {after.errors[:3]}")
            elif qemu_view(copy, scratch) != view:
                problems.append(f"{tool} check -r all changed what the image reads")
        finally:
            copy.unlink(missing_ok=True)
    return problems
