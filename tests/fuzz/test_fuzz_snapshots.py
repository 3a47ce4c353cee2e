"""Hostile internal snapshot tables: no traceback, no hang, no write to a refused image.

Base images with two snapshots each are made by QEMU's tools: 4 KiB clusters; 512-byte
clusters with a compressed cluster (many L2 tables, a two-sector L1 table); 64 KiB clusters
with a persistent bitmap (apply is refused there). Hypothesis mutates what the snapshots are
made of: ``nb_snapshots`` and ``snapshots_offset``; each entry's L1 table offset and size,
ID and name sizes and bytes (duplicate IDs and names, bytes that are not UTF-8), extra data
size, VM state and disk sizes; the snapshots' L1 entries and the L2 entries only they hold
(pointing at metadata, at each other, past the end of the file, unaligned, with COPIED set);
the refcount of a cluster the snapshots share; truncation inside the table or inside a
snapshot's L1 table, and a table moved past the end of the file.

Each mutant goes through every consumer in this process under a time limit (``TIME_LIMIT``,
a SIGALRM guard): read-only (``open`` and a read of the whole disk and its map, ``list`` =
``dirtybits snapshot -l``, ``load`` = each snapshot shown read-only and read whole as
``convert -l`` does, ``check``, ``info``), and writable ones, each on its own copy
(``write`` through the block layer, ``create`` / ``apply`` / ``delete`` as ``dirtybits
snapshot -c/-a/-d`` run them, ``repair`` = ``check -r all``). Each must succeed or raise a
``DirtybitsError``; the read-only ones must not change any file. QEMU gets the same mutant:
where ``qemu-img info`` cannot open it for its snapshot table, neither may ``open`` nor
``list`` (a damaged bitmap directory, which QEMU refuses too, is read past read-only);
where QEMU refuses a writable step and leaves its copy untouched, ours must refuse too, and
untouched (where QEMU aborts, an assertion, we may do better). After a step both QEMU and
we completed on a mutant ``qemu-img check`` finds clean, it finds no more corruptions in
ours than in QEMU's copy.

``DIRTYBITS_FUZZ_EXAMPLES=N`` sets the examples; derandomized when ``CI`` is set.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from fuzzfiles import FuzzTimeoutError, file_digest, fuzz_settings, time_limit

from dirtybits.block.children import open_qcow2
from dirtybits.errors import DirtybitsError
from peers import qemu_io, run, sh

IMAGE = "image.qcow2"
TIME_LIMIT = 30.0
L1E_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
pytestmark = pytest.mark.interop



# ============================================================================ base images
@dataclass(frozen=True)
class Slot:
    name: str
    offset: int
    width: int


@dataclass
class Base:
    name: str
    data: bytes
    cluster_size: int
    slots: list[Slot] = field(default_factory=list)  # header and entry fields
    strings: list[tuple[str, int, int]] = field(default_factory=list)  # (what, offset, size)
    sn_l1: list[Slot] = field(default_factory=list)  # the snapshots' L1 entries
    sn_l2: list[Slot] = field(default_factory=list)  # L2 entries of the snapshots' own tables
    shared_refcounts: list[Slot] = field(default_factory=list)  # refcounts above 1
    metadata: list[int] = field(default_factory=list)
    data_clusters: list[int] = field(default_factory=list)
    table: tuple[int, int] = (0, 0)  # the snapshot table's (offset, length)
    sn_l1_tables: list[tuple[int, int]] = field(default_factory=list)  # (offset, bytes)

    def __repr__(self) -> str:
        return f"Base({self.name!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis's printer
        p.text(repr(self))


ENTRY_FIELDS = (("l1_table_offset", 0, 8), ("l1_size", 8, 4), ("id_str_size", 12, 2),
                ("name_size", 14, 2), ("vm_state_size", 32, 4), ("extra_data_size", 36, 4),
                ("vm_state_size_large", 40, 8), ("disk_size", 48, 8), ("icount", 56, 8))


def _u64s(data: bytes, off: int, n: int) -> list[int]:
    raw = data[off:off + 8 * n]
    return list(struct.unpack(f">{n}Q", raw + bytes(8 * n - len(raw))))


def analyse(name: str, data: bytes) -> Base:
    """Where everything is (QEMU made the image: parsed plainly, trusted)."""
    cb = struct.unpack_from(">I", data, 20)[0]
    cs = 1 << cb
    l1_size, l1_off, rt_off, rt_clusters, nb, sn_off = struct.unpack_from(">IQQIIQ", data, 36)
    base = Base(name, data, cs, [Slot("nb_snapshots", 60, 4),
                                 Slot("snapshots_offset", 64, 8)])
    meta = {0, l1_off, sn_off, *(rt_off + i * cs for i in range(rt_clusters))}
    refblocks = [e for e in _u64s(data, rt_off, rt_clusters * cs // 8) if e]
    meta.update(refblocks)
    refs: dict[int, int] = {}
    active_l2 = {e & L1E_MASK for e in _u64s(data, l1_off, l1_size) if e & L1E_MASK}
    views = [("active", l1_off, l1_size)]
    pos = sn_off
    for k in range(nb):
        off, size, id_size, name_size = struct.unpack_from(">QIHH", data, pos)
        extra = struct.unpack_from(">I", data, pos + 36)[0]
        base.slots += [Slot(f"snapshot[{k}].{n}", pos + o, w) for n, o, w in ENTRY_FIELDS
                       if o < 40 + extra or o < 40]
        base.strings += [(f"snapshot[{k}].id", pos + 40 + extra, id_size),
                         (f"snapshot[{k}].name", pos + 40 + extra + id_size, name_size)]
        base.sn_l1_tables.append((off, size * 8))
        views.append((f"snapshot[{k}]", off, size))
        pos += (40 + extra + id_size + name_size + 7) & ~7
    base.table = (sn_off, pos - sn_off)
    for label, off, n in views:
        meta.update(off + i * cs for i in range((n * 8 + cs - 1) // cs))
        for i, e in enumerate(_u64s(data, off, n)):
            l2 = e & L1E_MASK
            if not l2:
                continue
            meta.add(l2)
            refs[l2] = refs.get(l2, 0) + 1
            if label != "active":
                base.sn_l1.append(Slot(f"{label}.L1[{i}]", off + 8 * i, 8))
            for j, e2 in enumerate(_u64s(data, l2, cs // 8)):
                if not e2:
                    continue
                if label != "active" and l2 not in active_l2:
                    base.sn_l2.append(Slot(f"{label}.L2@{l2:#x}[{j}]", l2 + 8 * j, 8))
                if not e2 & OFLAG_COMPRESSED and e2 & L1E_MASK:
                    host = e2 & L1E_MASK
                    base.data_clusters.append(host)
                    refs[host] = refs.get(host, 0) + 1
    order = struct.unpack_from(">I", data, 96)[0]
    width = (1 << order) // 8
    for host, n in sorted(refs.items()):
        if n > 1 and width:
            idx = host // cs
            per = cs * 8 >> order
            rb = refblocks[idx // per] if idx // per < len(refblocks) else 0
            if rb:
                base.shared_refcounts.append(Slot(f"refcount of {host:#x}",
                                                  rb + (idx % per) * width, width))
    base.metadata = sorted(meta)
    base.data_clusters = sorted(set(base.data_clusters) - meta)
    return base


QEMU_TIMEOUT = 120  # seconds: a QEMU tool that hangs on a hostile image fails the example


def build_bases(root: Path) -> dict[str, Base]:
    def qio(path: Path, *cmds: str) -> None:
        qemu_io(path, *cmds, fmt="qcow2")

    out = {}
    p = root / "snap4k.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "1M")
    qio(p, "write -P 0x11 0 64k", "write -P 0x12 600k 8k")
    sh("qemu-img", "snapshot", "-c", "s1", p)
    qio(p, "write -P 0x13 4k 4k", "write -P 0x14 900k 8k")
    sh("qemu-img", "snapshot", "-c", "s2", p)
    qio(p, "write -P 0x15 8k 4k", "discard 600k 4k")

    p = root / "snap512.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "4M")
    qio(p, "write -P 0x21 0 8k", "write -c -P 0x22 64k 2k", "write -P 0x23 3M 4k")
    sh("qemu-img", "snapshot", "-c", "s1", p)
    qio(p, "write -P 0x24 1k 1k", "write -P 0x25 65k 512")
    sh("qemu-img", "snapshot", "-c", "s2", p)
    qio(p, "write -P 0x26 3M 512")

    p = root / "snapbm.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", p, "2M")
    sh("qemu-img", "bitmap", "--add", p, "b0")
    qio(p, "write -P 0x31 0 128k")
    sh("qemu-img", "snapshot", "-c", "s1", p)
    qio(p, "write -P 0x32 64k 64k", "write -P 0x33 1M 64k")
    sh("qemu-img", "snapshot", "-c", "s2", p)
    qio(p, "write -P 0x34 1M 4k")
    for name in ("snap4k", "snap512", "snapbm"):
        path = root / f"{name}.qcow2"
        sh("qemu-img", "check", "-q", path)
        out[name] = analyse(name, path.read_bytes())
    return out


# ============================================================================ mutations
Edit = tuple[str, int, bytes]


def apply_edits(data: bytes, edits: list[Edit]) -> bytes:
    buf = bytearray(data)
    for kind, off, raw in edits:
        if kind == "set":
            if off >= len(buf):
                buf.extend(bytes(off - len(buf)))
            buf[off:off + len(raw)] = raw
        elif kind == "truncate":
            del buf[off:]
        else:  # "append"
            buf += raw
    return bytes(buf)


def targets(base: Base) -> list[int]:
    """Host offsets worth pointing at: every structure, the data, the end of file, beyond."""
    cs, end = base.cluster_size, len(base.data)
    return sorted({*base.metadata, *base.data_clusters[:8], end & ~(cs - 1),
                   (end + cs - 1) & ~(cs - 1), end + 64 * cs, 1 << 40, (1 << 56) - cs})


def values(base: Base, slot: Slot) -> st.SearchStrategy[int]:
    top = (1 << (8 * slot.width)) - 1
    old = int.from_bytes(base.data[slot.offset:slot.offset + slot.width], "big")
    cs = base.cluster_size
    near = {old, old + 1, old - 1, old * 2, old + 8, old ^ 1, 0, 1, 2, 7, 8, 23, 24, 25, 64,
            511, 512, 1023, 1024, 1025, cs - 1, cs, cs + 1, 65535, 65536, 65537,
            (32 << 20) // 8, (32 << 20) // 8 + 1, 1 << 31, (1 << 32) - 1, 1 << 32,
            1 << 62, 1 << 63, top - 1, top}
    if slot.width == 8:
        near.update(t + s for t in targets(base) for s in (0, 0, 8, 512, cs // 2))
        near.update(t | OFLAG_COPIED for t in targets(base))
    return st.one_of(st.sampled_from(sorted(v & top for v in near if v >= 0)),
                     st.integers(0, 8 * slot.width - 1).map(lambda b: (old ^ (1 << b)) & top),
                     st.integers(0, top))


@st.composite
def mutation(draw: st.DrawFn, base: Base) -> tuple[str, list[Edit]]:
    kinds = ["field", "field", "field", "string", "sn-l1", "sn-l1", "truncate", "move-table"]
    if base.sn_l2:
        kinds += ["sn-l2", "sn-l2"]
    if base.shared_refcounts:
        kinds.append("refcount")
    kind = draw(st.sampled_from(kinds))
    if kind in ("field", "sn-l1", "sn-l2", "refcount"):
        slots = {"field": base.slots, "sn-l1": base.sn_l1, "sn-l2": base.sn_l2,
                 "refcount": base.shared_refcounts}[kind] or base.slots
        slot = draw(st.sampled_from(slots))
        v = draw(values(base, slot)) if kind != "refcount" else draw(st.sampled_from([0, 1]))
        return (f"{slot.name} (@{slot.offset:#x}) = {v:#x}",
                [("set", slot.offset, v.to_bytes(slot.width, "big"))])
    if kind == "string":
        what, off, size = draw(st.sampled_from(base.strings))
        raw = draw(st.sampled_from([b"1", b"2", b"s1", b"s2", b"", b"\xff\xfe", b" 7x",
                                    b"\0"]) | st.binary(max_size=8))
        raw = (raw + bytes(size))[:size] if size else b""
        return f"{what} = {raw!r}", [("set", off, raw)]
    if kind == "truncate":
        t_off, t_len = base.table
        points = [t_off + 8, t_off + 40, t_off + max(0, t_len - 1), t_off + t_len // 2,
                  *(o + n // 2 for o, n in base.sn_l1_tables if n)]
        n = draw(st.sampled_from([p for p in points if 0 < p < len(base.data)]))
        return f"truncated to {n:#x}", [("truncate", n, b"")]
    # the table moved: past the end of the file, or to the end with its tail cut off
    t_off, t_len = base.table
    table = base.data[t_off:t_off + t_len]
    end = (len(base.data) + base.cluster_size - 1) & ~(base.cluster_size - 1)
    where = draw(st.sampled_from([end, end + 16 * base.cluster_size]))
    keep = draw(st.sampled_from([t_len, t_len // 2, 40, 0]))
    edits: list[Edit] = [("set", 64, where.to_bytes(8, "big"))]
    if where == end and keep:
        edits += [("truncate", len(base.data), b""),
                  ("append", 0, bytes(end - len(base.data)) + table[:keep])]
    return f"table moved to {where:#x}, {keep} of its {t_len} bytes there", edits


@dataclass
class Mutant:
    base: Base
    edits: tuple[str, ...]
    data: bytes

    def __repr__(self) -> str:
        return f"Mutant({self.base.name!r}, {list(self.edits)!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


@st.composite
def mutants(draw: st.DrawFn, bases: dict[str, Base]) -> Mutant:
    base = bases[draw(st.sampled_from(sorted(bases)))]
    descs, edits = [], []
    for _ in range(draw(st.integers(1, 3))):
        d, e = draw(mutation(base))
        descs.append(d)
        edits += e
    return Mutant(base, tuple(descs), apply_edits(base.data, edits))


# ============================================================================ consumers
def answer(fn: Callable[[], object]) -> str:
    """"ok", or the DirtybitsError's class name; anything else propagates (a traceback)."""
    try:
        with time_limit(TIME_LIMIT):
            fn()
        return "ok"
    except DirtybitsError as exc:
        return type(exc).__name__


def read_all(path: str) -> None:

    with open_qcow2(path, readonly=True) as img:
        img.read(0, img.size)
        list(img.block_status(0, img.size))


def list_all(path: str) -> None:
    from dirtybits.block.snapshot import list_snapshots
    from dirtybits.cli.snapshot import format_list

    format_list(list_snapshots(path))


def load_all(path: str) -> None:

    with open_qcow2(path, readonly=True) as img:
        n = len(img.snapshots)
    for i in range(n):
        with open_qcow2(path, readonly=True) as img:
            img.snapshot_load(i)
            img.read(0, img.size)


def write_one(path: str) -> None:
    from dirtybits.block.open import open_image

    img = open_image(path, "qcow2", readonly=False)
    try:
        img.write(0, b"\xc5" * 4096)  # over what the snapshots share
    finally:
        img.close()


def readonly_consumers(path: Path) -> dict[str, str]:
    from dirtybits.qcow2.check import check_image
    from dirtybits.qcow2.info import image_info

    p = str(path)
    return {"open": answer(lambda: read_all(p)), "list": answer(lambda: list_all(p)),
            "load": answer(lambda: load_all(p)), "check": answer(lambda: check_image(p)),
            "info": answer(lambda: image_info(p))}


def writable(op: str) -> Callable[[str], object]:
    from dirtybits.block import snapshot as snap
    from dirtybits.qcow2.check import check_image

    return {"write": write_one,
            "create": lambda p: snap.create_snapshot(p, "new"),
            "apply": lambda p: snap.apply_snapshot(p, "s1"),
            "delete": lambda p: snap.delete_snapshot(p, "s1"),
            "repair": lambda p: check_image(p, "all")}[op]


QEMU_OPS = {"write": ("qemu-io", "-f", "qcow2", "-c", "write -P 0xc5 0 4k"),
            "create": ("qemu-img", "snapshot", "-c", "new"),
            "apply": ("qemu-img", "snapshot", "-a", "s1"),
            "delete": ("qemu-img", "snapshot", "-d", "s1"),
            "repair": ("qemu-img", "check", "-q", "-r", "all")}


def qemu_op(op: str, path: Path) -> str:
    """"did" (qemu-io reports some failures with status 0), "refused" or "crashed" (QEMU
    7.2 aborts on some of these images: an assertion, a signal)."""
    proc = run(*QEMU_OPS[op], path.name, cwd=path.parent, timeout=QEMU_TIMEOUT)
    if proc.returncode < 0:
        return "crashed"
    if op == "write":
        return "did" if proc.returncode == 0 and "wrote" in proc.stdout + proc.stderr \
            else "refused"
    return "did" if proc.returncode == 0 else "refused"


def qemu_refusal(path: Path) -> str | None:
    """Why ``qemu-img info`` cannot open the image (None: it can)."""
    proc = run("qemu-img", "info", "-f", "qcow2", path.name, cwd=path.parent,
               timeout=QEMU_TIMEOUT)
    return None if proc.returncode == 0 else proc.stderr.strip() or "refused"


def corruptions(path: Path) -> int | None:
    proc = run("qemu-img", "check", "--output=json", "-f", "qcow2", path.name,
               cwd=path.parent, timeout=QEMU_TIMEOUT)
    try:
        rep = json.loads(proc.stdout)
    except ValueError:
        return None
    return int(rep.get("corruptions", 0)) + int(rep.get("check-errors", 0))


# A known slow path, left to the checker's owners: ``check -r all`` walks every L2 table each
# L1 entry names entry by entry in Python when a table has anomalies, and zeroes each bad
# entry with its own sync: a snapshot L1 table of 512K entries reaching into other data took
# 3 minutes (test_repair_of_a_huge_garbage_snapshot_l1_is_slow). Repair is fuzzed below it.
SLOW_REPAIR_L1 = 1 << 16


def largest_snapshot_l1(data: bytes) -> int:
    """The largest l1_size in the snapshot table (as far as the file holds it)."""
    def at(off: int, n: int) -> bytes:
        raw = data[off:off + n]
        return raw + bytes(n - len(raw))

    nb, pos = struct.unpack(">IQ", at(60, 12))
    top = 0
    for _ in range(min(nb, 1024)):
        size, id_size, name_size = struct.unpack(">IHH", at(pos + 8, 8))
        extra = struct.unpack(">I", at(pos + 36, 4))[0]
        top = max(top, size)
        pos += (40 + extra + id_size + name_size + 7) & ~7
    return top


def exercise(m: Mutant, work: Path) -> list[str]:
    """Every consumer on the mutant (and QEMU on twins); the outcomes, for statistics.
    Raises AssertionError for a broken rule, anything else for a traceback."""
    work.mkdir(parents=True, exist_ok=True)
    for p in work.iterdir():
        p.unlink()
    path = work / IMAGE
    path.write_bytes(m.data)
    before = file_digest(path)
    ro = readonly_consumers(path)
    assert file_digest(path) == before, "a read-only consumer changed the file"
    assert sorted(p.name for p in work.iterdir()) == [IMAGE], "a consumer made a file"
    outcomes = [f"{k}: {v}" for k, v in ro.items()]
    refusal = qemu_refusal(path)
    if refusal is not None:
        outcomes.append("QEMU cannot open it")
        if "snapshot" in refusal.lower():  # (read-only, damaged bitmaps are read past)
            for k in ("open", "list"):
                assert ro[k] != "ok", f"{k} reads an image QEMU refuses: {refusal}"
    start = corruptions(path) if refusal is None else None
    for op in QEMU_OPS:
        if op == "repair" and largest_snapshot_l1(m.data) > SLOW_REPAIR_L1:
            outcomes.append("repair: skipped (a huge snapshot L1 table)")
            continue
        ours, twin = work / f"ours-{op}.qcow2", work / f"qemu-{op}.qcow2"
        ours.write_bytes(m.data)
        twin.write_bytes(m.data)
        result = answer(lambda: writable(op)(str(ours)))  # noqa: B023 (called at once)
        qemu = qemu_op(op, twin)
        did = qemu == "did"
        untouched = file_digest(twin) == before
        outcomes.append(f"{op}: {result}, QEMU {'did it' if did else qemu}"
                        f"{'' if did or untouched else ' (after writing)'}")
        if qemu == "refused" and untouched:
            assert result != "ok" or op == "repair", (
                f"{op} done where QEMU refuses the image untouched")
            if result != "ok":
                assert file_digest(ours) == before, f"{op} refused, but after writing"
        # (an image QEMU already finds corrupt can get worse from any allocation, in ways
        # that depend on where each engine allocates: no yardstick there)
        if result == "ok" and did and op != "repair" and start == 0:
            bad, theirs = corruptions(ours), corruptions(twin)
            assert bad is not None or theirs is None, (
                f"after {op}, qemu-img check cannot check ours (it can check QEMU's)")
            assert bad <= max(start, theirs or 0), (
                f"after {op}: {bad} corruptions; before {start}, QEMU's copy {theirs}")
        ours.unlink()
        twin.unlink()
    return outcomes


# ============================================================================ the tests
@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory,
          qemu_tools: dict[str, str]) -> dict[str, Base]:
    return build_bases(tmp_path_factory.mktemp("snapfuzz-bases"))


@fuzz_settings(60)
@given(data=st.data())
def test_hostile_snapshot_tables(bases: dict[str, Base], tmp_path_factory: Any,
                                 data: st.DataObject) -> None:
    m = data.draw(mutants(bases), label="mutant")
    work = Path(tmp_path_factory.getbasetemp()) / "snapfuzz-work"
    try:
        outcomes = exercise(m, work)
    except FuzzTimeoutError as exc:  # (a BaseException, so that no handler swallows it)
        raise AssertionError(f"a consumer hung on {m!r}: {exc}") from None
    except AssertionError as exc:
        raise AssertionError(f"{m!r}: {exc}") from None
    note(f"outcomes: {outcomes}")
    for o in outcomes:
        event(o)


def test_apply_growing_the_disk_keeps_the_refcount_table(bases: dict[str, Base],
                                                         tmp_path: Path) -> None:
    """Found here: a snapshot whose disk is 64 GiB, applied to a 4 MiB disk of 512-byte
    clusters. The grown L1 table (16 MiB) is moved, its allocation moves the refcount table,
    and the header switch to the new L1 table wrote the old refcount table offset back
    (32778 clusters with refcount 0). QEMU applies it clean; so must we."""
    from dirtybits.block.snapshot import apply_snapshot

    base = bases["snap512"]
    slot = next(s for s in base.slots if s.name == "snapshot[0].disk_size")
    path = tmp_path / IMAGE
    path.write_bytes(apply_edits(base.data, [("set", slot.offset,
                                              (0x1000400000).to_bytes(8, "big"))]))
    apply_snapshot(str(path), "s1")
    assert corruptions(path) == 0


@pytest.mark.xfail(strict=True, reason="check -r all walks a huge garbage snapshot L1's "
                   "tables entry by entry (3 minutes here), see SLOW_REPAIR_L1")
def test_repair_of_a_huge_garbage_snapshot_l1_is_slow(bases: dict[str, Base],
                                                       tmp_path: Path) -> None:
    """A snapshot whose l1_size says 512K entries (its table then runs over the bitmap and
    the data): the repair must finish in seconds, as the read-only check does (1 s)."""
    from dirtybits.qcow2.check import check_image

    base = bases["snapbm"]
    slot = next(s for s in base.slots if s.name == "snapshot[1].l1_size")
    path = tmp_path / IMAGE
    path.write_bytes(apply_edits(base.data, [("set", slot.offset,
                                              (0x80001).to_bytes(4, "big"))]))
    try:
        with time_limit(10):
            check_image(str(path), "all")
    except FuzzTimeoutError:  # (its traceback, cut in the middle of a frame, upsets pytest)
        raise AssertionError("check -r all took longer than 10 s") from None


def test_bases_are_exercised_whole(bases: dict[str, Base], tmp_path: Path) -> None:
    """Unmutated, every consumer and QEMU succeed (so the fuzz above starts from images
    each step can handle), apply but on the image with a bitmap, where both refuse (QEMU
    after rewriting its bitmap directory: its open marks the bitmaps in use)."""
    for name, base in bases.items():
        outcomes = exercise(Mutant(base, (), base.data), tmp_path / name)
        assert [o for o in outcomes if "ok" not in o and "did it" not in o] == (
            ["apply: SnapshotError, QEMU refused (after writing)"] if name == "snapbm"
            else []), outcomes
