"""Malformed images never crash, hang, allocate without bound, or get written to.

Valid base images are built once per module, with qemu-img/qemu-io and with our own engine
(64 KiB and 512 B clusters, compressed clusters (zlib by QEMU, zstd by us), zero clusters, a
backing file, an external data file, bitmaps, an internal snapshot, a v2 image, 1- and 16-bit
refcounts). Hypothesis then
mutates them: every header field (edges, unaligned offsets, huge sizes), header extensions
(lengths, types, duplicates, inserted ones, a lost end marker), L1/L2 entries, refcount table
and refcount block entries, bitmap and snapshot structures, truncation, appended bytes and
byte flips in metadata clusters. On each mutant:

* ``Qcow2Image.open(readonly=True)`` with a read of the whole (small) disk and
  ``block_status`` over it, the bitmap store (directory, tables, the bits of every usable
  bitmap), ``check_image`` and the ``info`` readers each succeed or raise ``DirtybitsError``
  (``test_readonly_consumers``);
* nothing takes longer than ``TIME_LIMIT`` (an in-process SIGALRM guard) and no file in the
  image's directory changes;
* where both QEMU and the engine read the mutant, they read the same bytes
  (``test_reads_match_qemu``);
* a writable open (``open_image``: the engine, plus the bitmap tracking layer when the image
  has bitmaps) that raises leaves the file byte for byte as it was; one that succeeds takes a
  one-cluster write (plain or compressed) that succeeds or raises ``DirtybitsError``. After a
  successful write and close, ``qemu-img check`` reports no more corruptions than before (or
  than after qemu-io's own write of the same data: on a damaged image any allocating write
  can make things worse), and both the engine and qemu-io read the data back; no other file
  changes (``test_writable_open_and_write``).

``test_guarded_subprocess`` runs a smaller set, biased towards size fields pushed to their
limits, in a worker process with ``RLIMIT_AS`` = 1 GiB and a per-example timeout, so unbounded
allocations and hangs inside C code are caught too.

Known bugs of modules this file does not own are recognised by where they raise
(``KNOWN_BUGS``) or by the image feature that triggers them, so the fuzz tests stay green and
keep looking for new ones; each has a deterministic regression test at the end of this file,
marked ``xfail(strict=True)``, that turns red once the bug is fixed.

Example counts: ``DIRTYBITS_FUZZ_EXAMPLES=N`` runs each fuzz test with N examples (the guarded
subprocess one with N // 5); when ``CI`` is set the runs are derandomized.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: peers, also in the --worker child
from fuzzfiles import FuzzTimeoutError, file_digest, fuzz_settings, time_limit

import peers
from dirtybits.block.children import open_qcow2
from dirtybits.block.open import open_image
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.errors import DirtybitsError, LockError
from dirtybits.format.qcow2.header import (
    EXT_BITMAPS,
    EXT_DATA_FILE,
    EXT_END,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    HeaderCluster,
)
from dirtybits.format.qcow2.tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
)
from dirtybits.qcow2.check import check_image
from dirtybits.qcow2.image import Qcow2Image
from dirtybits.qcow2.info import backing_chain_info, image_info
from peers import run, sh

READ_CAP = 4 << 20  # bytes of a mutant's disk read and mapped from the start (and the end)
TIME_LIMIT = 30.0  # seconds per example, in-process; generous for a loaded 2-core CI box
SUBPROCESS_TIMEOUT = 60.0
MEMORY_LIMIT = 1 << 30
IMAGE = "image.qcow2"
U64 = (1 << 64) - 1



# ============================================================================ base images
@dataclass(frozen=True)
class Slot:
    """A field of some on-disk structure: its name, file offset and width in bytes."""

    name: str
    offset: int
    width: int


@dataclass
class Base:
    """A valid image and where its structures are, so mutations can aim at them."""

    def __repr__(self) -> str:
        return f"Base({self.name!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis's printer
        p.text(repr(self))

    name: str
    dir: Path
    data: bytes
    siblings: dict[str, bytes]
    cluster_bits: int = 16
    refcount_order: int = 4
    header_fields: list[Slot] = field(default_factory=list)
    ext_heads: list[int] = field(default_factory=list)  # offsets of {type, length} headers
    l1_slots: list[Slot] = field(default_factory=list)
    l2_slots: list[Slot] = field(default_factory=list)
    reftable_slots: list[Slot] = field(default_factory=list)
    refblock_slots: list[Slot] = field(default_factory=list)
    struct_fields: list[Slot] = field(default_factory=list)  # bitmaps, snapshots
    metadata: list[int] = field(default_factory=list)  # metadata cluster offsets
    data_clusters: list[int] = field(default_factory=list)
    data_file: str | None = None  # the external data file the base really uses

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


HEADER_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4), ("cluster_bits", 20, 4), ("size", 24, 8),
    ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8), ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
    ("header_length", 100, 4), ("compression_type", 104, 1),
)
SNAPSHOT_FIELDS = (("l1_table_offset", 0, 8), ("l1_size", 8, 4), ("id_str_size", 12, 2),
                   ("name_size", 14, 2), ("vm_state_size", 32, 4), ("extra_data_size", 36, 4),
                   ("vm_state_size_large", 40, 8), ("disk_size", 48, 8))
BITMAP_DIR_FIELDS = (("bitmap_table_offset", 0, 8), ("bitmap_table_size", 8, 4),
                     ("flags", 12, 4), ("type", 16, 1), ("granularity_bits", 17, 1),
                     ("name_size", 18, 2), ("extra_data_size", 20, 4))


def _u64s(data: bytes, offset: int, count: int) -> list[int]:
    raw = data[offset:offset + 8 * count]
    raw += bytes(8 * count - len(raw))
    return list(struct.unpack(f">{count}Q", raw))


def analyse(name: str, directory: Path) -> Base:
    """Find every structure of a valid image (our parsers are trusted on valid input)."""
    data = (directory / IMAGE).read_bytes()
    siblings = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != IMAGE}
    hc = HeaderCluster.unpack(data)
    h = hc.header
    cb, cs = h.cluster_bits, h.cluster_size
    base = Base(name, directory, data, siblings, cb, h.refcount_order)
    esize = 16 if h.incompatible_features & INCOMPAT_EXTL2 else 8  # extended L2 entries
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        base.data_file = hc.data_file
    end = 72 if h.version == 2 else h.header_length
    base.header_fields = [Slot(n, o, w) for n, o, w in HEADER_FIELDS if o + w <= end]
    pos = end
    while True:
        base.ext_heads.append(pos)
        ext_type, length = struct.unpack_from(">II", data, pos)
        if ext_type == EXT_END:
            break
        if ext_type == EXT_BITMAPS:
            base.struct_fields += [Slot(f"bitmaps_ext.{n}", pos + 8 + o, w) for n, o, w in (
                ("nb_bitmaps", 0, 4), ("reserved32", 4, 4), ("bitmap_directory_size", 8, 8),
                ("bitmap_directory_offset", 16, 8))]
        pos += 8 + ((length + 7) & ~7)
    meta = {0}
    for i in range(h.refcount_table_clusters):
        meta.add(h.refcount_table_offset + i * cs)
    reftable = _u64s(data, h.refcount_table_offset, h.refcount_table_clusters * cs // 8)
    for i, ent in enumerate(reftable):
        base.reftable_slots.append(Slot(f"reftable[{i}]", h.refcount_table_offset + 8 * i, 8))
        if ent & REFT_OFFSET_MASK:
            meta.add(ent & REFT_OFFSET_MASK)
            width = max(1, (1 << h.refcount_order) // 8)
            per_block = cs * 8 >> h.refcount_order
            used = min(per_block, -(-len(data) // cs) + 2)
            for k in range(0, used, max(1, 8 // (1 << h.refcount_order) if h.refcount_order < 3
                                        else 1)):
                off = (ent & REFT_OFFSET_MASK) + (k * (1 << h.refcount_order)) // 8
                base.refblock_slots.append(Slot(f"refblock[{i}][{k}]", off, width))
        if i > 4 and not ent:
            break

    def walk_l1(label: str, l1_offset: int, l1_size: int) -> None:
        if not l1_size:
            return
        for i in range((l1_size * 8 + cs - 1) // cs):
            meta.add(l1_offset + i * cs)
        for i, ent in enumerate(_u64s(data, l1_offset, l1_size)):
            base.l1_slots.append(Slot(f"{label}L1[{i}]", l1_offset + 8 * i, 8))
            l2 = ent & L1E_OFFSET_MASK
            if not l2:
                continue
            meta.add(l2)
            words = _u64s(data, l2, cs // 8)
            entries = words[::esize // 8]
            for j, e in enumerate(entries):
                if e or j < 4 or j == len(entries) - 1:
                    base.l2_slots.append(Slot(f"{label}L2@{l2:#x}[{j}]", l2 + esize * j, 8))
                if esize == 16 and (e or words[2 * j + 1] or j < 4):
                    # the subcluster bitmap: allocated bits 0-31, zero bits 32-63
                    base.l2_slots.append(Slot(f"{label}L2bm@{l2:#x}[{j}]", l2 + 16 * j + 8, 8))
                if e & OFLAG_COMPRESSED:
                    x = 62 - (cb - 8)
                    base.data_clusters.append((e & ((1 << x) - 1)) & ~(cs - 1))
                elif e & L2E_OFFSET_MASK:
                    base.data_clusters.append(e & L2E_OFFSET_MASK)

    walk_l1("", h.l1_table_offset, h.l1_size)
    if h.nb_snapshots:
        meta.add(h.snapshots_offset)
        pos = h.snapshots_offset
        for k in range(h.nb_snapshots):
            base.struct_fields += [Slot(f"snapshot[{k}].{n}", pos + o, w)
                                   for n, o, w in SNAPSHOT_FIELDS]
            l1_off, l1_size, id_size, name_size = struct.unpack_from(">QIHH", data, pos)
            extra = struct.unpack_from(">I", data, pos + 36)[0]
            walk_l1(f"snapshot[{k}].", l1_off, l1_size)
            pos += (40 + extra + id_size + name_size + 7) & ~7
    ext = hc.extension(EXT_BITMAPS)
    if ext is not None:
        nb, _res, dir_size, dir_off = struct.unpack(">IIQQ", ext.data)
        meta.add(dir_off)
        pos = dir_off
        for k in range(nb):
            base.struct_fields += [Slot(f"bitmap[{k}].{n}", pos + o, w)
                                   for n, o, w in BITMAP_DIR_FIELDS]
            t_off, t_size, _fl, _ty, _gr, name_size, extra = struct.unpack_from(
                ">QIIBBHI", data, pos)
            meta.add(t_off)
            for j, e in enumerate(_u64s(data, t_off, t_size)):
                base.struct_fields.append(Slot(f"bitmap[{k}].table[{j}]", t_off + 8 * j, 8))
                if e & L2E_OFFSET_MASK:
                    meta.add(e & L2E_OFFSET_MASK)
            pos += (24 + name_size + extra + 7) & ~7
        assert pos - dir_off == dir_size
    base.metadata = sorted(meta)
    base.data_clusters = sorted(set(base.data_clusters) - meta)
    return base


QEMU_TIMEOUT = 120  # seconds: a QEMU tool that hangs on a mutant fails the example


def build_bases(root: Path, tools: dict[str, str]) -> dict[str, Base]:
    img, qio = tools["qemu-img"], tools["qemu-io"]
    bases: dict[str, Base] = {}

    def new(name: str) -> Path:
        d = root / name
        d.mkdir()
        return d

    def qemu_io(path: Path, *cmds: str) -> None:
        peers.qemu_io(path, *cmds, fmt="qcow2", timeout=QEMU_TIMEOUT)

    d = new("qemu64k")
    sh(img, "create", "-f", "qcow2", d / IMAGE, "2M")
    qemu_io(d / IMAGE, "write -P 0x11 0 64k", "write -P 0x12 200k 10k", "write -z 384k 64k",
            "write -P 0x13 512k 128k", "discard 512k 64k", "write -P 0x14 1984k 64k")

    d = new("qemu512")
    sh(img, "create", "-f", "qcow2", "-o", "cluster_size=512", d / IMAGE, "192k")
    qemu_io(d / IMAGE, "write -P 0x21 0 20k", "write -P 0x22 40k 1k", "write -z 64k 2k",
            "write -P 0x23 100k 30k", "write -P 0x24 191k 1k", "discard 110k 4k")

    d = new("compressed")
    raw = d / "src.raw"
    sh(img, "create", "-f", "raw", raw, "1M")
    sh(qio, "-f", "raw", "-c", "write -P 0x31 0 300k", "-c", "write -P 0x32 600k 100k", raw)
    sh(img, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw,
        d / IMAGE)
    raw.unlink()
    qemu_io(d / IMAGE, "write -P 0x33 8k 4k")

    d = new("backing")
    sh(img, "create", "-f", "qcow2", "-o", "cluster_size=4096", d / "backing.qcow2", "1M")
    qemu_io(d / "backing.qcow2", "write -P 0x41 0 512k", "write -z 512k 64k")
    sh(img, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "backing.qcow2", "-F",
        "qcow2", IMAGE, "1M", cwd=d)
    qemu_io(d / IMAGE, "write -P 0x42 6k 4k", "write -z 100k 8k", "discard 200k 8k",
            "write -P 0x43 700k 2k")

    d = new("bitmaps")
    sh(img, "create", "-f", "qcow2", d / IMAGE, "1M")
    sh(img, "bitmap", "--add", d / IMAGE, "b0")
    sh(img, "bitmap", "--add", "-g", "4096", d / IMAGE, "b1")
    qemu_io(d / IMAGE, "write -P 0x51 0 64k", "write -P 0x52 300k 8k")
    sh(img, "bitmap", "--add", "--disable", d / IMAGE, "b2")

    d = new("snapshot")
    sh(img, "create", "-f", "qcow2", "-o", "cluster_size=4096", d / IMAGE, "512k")
    qemu_io(d / IMAGE, "write -P 0x61 0 64k", "write -P 0x62 200k 4k")
    sh(img, "snapshot", "-c", "snap1", d / IMAGE)
    qemu_io(d / IMAGE, "write -P 0x63 8k 8k", "write -P 0x64 400k 4k")

    d = new("v2")
    sh(img, "create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", d / IMAGE, "512k")
    qemu_io(d / IMAGE, "write -P 0x71 0 16k", "write -P 0x72 300k 1k")

    d = new("datafile")
    sh(img, "create", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", IMAGE, "1M",
        cwd=d)
    sh(qio, "-c", "write -P 0x81 64k 64k", IMAGE, cwd=d, timeout=QEMU_TIMEOUT)

    d = new("extl2")  # extended L2 entries: subclusters over a backing file, compressed
    sh(img, "create", "-f", "qcow2", "-o", "cluster_size=4096", d / "backing.qcow2", "1M")
    qemu_io(d / "backing.qcow2", "write -P 0xb1 0 768k")
    sh(img, "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", "-b",
        "backing.qcow2", "-F", "qcow2", IMAGE, "1M", cwd=d)
    qemu_io(d / IMAGE, "write -P 0xb2 1k 3k", "write -P 0xb3 64k 32k", "write -z 100k 2k",
            "write -c -P 0xb4 128k 32k", "discard 192k 32k", "write -P 0xb5 200k 1",
            "write -z -u 64k 1k", "write -P 0xb6 1000k 24k")

    d = new("engine_extl2")
    Qcow2Image.create(str(d / IMAGE), 1 << 20, cluster_size=16384, extended_l2=True)
    with open_qcow2(str(d / IMAGE)) as e:
        e.write(100, b"\xc1" * 3000)
        e.write(48 << 10, b"\xc2" * 20000)
        e.write_zeroes(50 << 10, 600)
        e.write_zeroes(128 << 10, 32 << 10)
        e.write((1 << 20) - 700, b"\xc3" * 700)

    d = new("engine64k")
    Qcow2Image.create(str(d / IMAGE), 2 << 20)
    with open_qcow2(str(d / IMAGE)) as e:
        e.write(0, b"\x91" * 70000)
        e.write(300 << 10, b"\x92" * 4096)
        e.write_zeroes(1 << 20, 64 << 10)
        e.write((2 << 20) - 100, b"\x93" * 100)

    d = new("enginezstd")  # compressed clusters our engine packed (zstd, 4 KiB clusters)
    Qcow2Image.create(str(d / IMAGE), 512 << 10, cluster_size=4096, compression_type="zstd")
    with open_qcow2(str(d / IMAGE)) as e:
        e.write(0, b"\xb1" * (40 << 10), compress=True)
        e.write(100 << 10, (b"text " * 4000)[:16 << 10], compress=True)
        e.write(200 << 10, b"\xb2" * 8192)
        e.write(4 << 10, b"\xb3" * 4096, compress=True)  # over a compressed cluster

    d = new("engine512")
    Qcow2Image.create(str(d / IMAGE), 160 << 10, cluster_size=512, refcount_bits=1)
    with open_qcow2(str(d / IMAGE)) as e:
        e.write(0, b"\xa1" * 9000)
        e.write(70 << 10, b"\xa2" * 40000)
        e.write_zeroes(20 << 10, 4096)
        e.discard(80 << 10, 2048)

    for d in sorted(root.iterdir()):
        bases[d.name] = analyse(d.name, d)
    return bases


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory,
          qemu_tools: dict[str, str]) -> dict[str, Base]:
    return build_bases(tmp_path_factory.mktemp("fuzz-bases"), qemu_tools)


class Scratch:
    """One directory per base holding the mutant and fresh copies of the base's siblings."""

    def __init__(self, root: Path, bases: dict[str, Base]):
        self.root = root
        self.bases = bases

    def prepare(self, base: Base, data: bytes) -> Path:
        d = self.root / base.name
        d.mkdir(exist_ok=True)
        for name, content in base.siblings.items():
            p = d / name
            if not p.exists() or p.stat().st_size != len(content) or p.read_bytes() != content:
                p.write_bytes(content)
        for p in d.iterdir():
            if p.name != IMAGE and p.name not in base.siblings:
                p.unlink()
        path = d / IMAGE
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, bases: dict[str, Base]) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("fuzz-scratch"), bases)


# ============================================================================ mutations
Edit = tuple[str, int, bytes]  # ("set" | "insert" | "truncate" | "append", offset, bytes)


def apply_edits(data: bytes, edits: list[Edit]) -> bytes:
    buf = bytearray(data)
    for kind, off, raw in edits:
        if kind == "set":
            if off <= len(buf):
                buf[off:off + len(raw)] = raw
        elif kind == "insert":
            buf[off:off] = raw
        elif kind == "truncate":
            del buf[off:]
        else:
            buf += raw
    return bytes(buf)


def interesting(width: int, near: int = 0, cluster: int = 512,
                extra: tuple[int, ...] = ()) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    specials = sorted({v & top for v in (
        0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 63, 64, 104, 112, 511, 512, 513, cluster - 1, cluster,
        cluster + 1, 2 * cluster, 1 << 16, 1 << 20, 1 << 31, (1 << 31) - 1, 1 << 32,
        (1 << 32) - 1, 1 << 55, 1 << 56, 1 << 62, 1 << 63, (1 << 63) - 1, top, top - 1,
        near, near + 1, near - 1, near + cluster, near - cluster, near * 2, near + 8, *extra,
    ) if v >= 0})
    return st.one_of(
        st.sampled_from(specials),
        st.integers(0, 8 * width - 1).map(lambda b: (near ^ (1 << b)) & top),
        st.integers(0, 8 * width - 1).map(lambda b: (1 << b) & top),
        st.integers(0, top),
    )


def offsets_of(base: Base) -> list[int]:
    """Host offsets worth pointing an entry at: every structure, the end of file, beyond."""
    cs = base.cluster_size
    end = len(base.data)
    return sorted({*base.metadata, *base.data_clusters[:50], end & ~(cs - 1),
                   (end + cs - 1) & ~(cs - 1), end + 16 * cs, 1 << 40, (1 << 56) - cs})


@st.composite
def table_entry(draw: st.DrawFn, base: Base, old: int) -> int:
    cs, cb = base.cluster_size, base.cluster_bits
    target = draw(st.sampled_from(offsets_of(base)))
    kind = draw(st.sampled_from(["pointer", "pointer", "compressed", "bits", "any"]))
    if kind == "pointer":
        flags = draw(st.sampled_from([OFLAG_COPIED, 0, OFLAG_COPIED | OFLAG_ZERO, OFLAG_ZERO]))
        skew = draw(st.sampled_from([0, 0, 0, 512, 8, 1, cs // 2]))
        return (target + skew) & L2E_OFFSET_MASK | flags | (skew & 0x1FF)
    if kind == "compressed":
        x = 62 - (cb - 8)
        host = (target + draw(st.integers(-1024, 1024))) & ((1 << x) - 1)
        sectors = draw(st.integers(0, (1 << (cb - 8)) - 1))
        copied = draw(st.sampled_from([0, 0, OFLAG_COPIED]))
        return OFLAG_COMPRESSED | copied | (sectors << x) | host
    if kind == "bits":
        return old ^ (1 << draw(st.integers(0, 63)))
    return draw(interesting(8, old, cs, (target, target | OFLAG_COPIED)))


@st.composite
def subcluster_bitmap(draw: st.DrawFn, old: int) -> int:
    """Hostile extended-L2 bitmaps: a subcluster both allocated and zero, allocated bits on
    an unallocated or compressed cluster, all-ones, single flips."""
    alloc = draw(st.sampled_from([0, 1, 1 << 31, 0xFFFFFFFF, 0xFFFF0000, 0x5555AAAA])
                 | st.integers(0, 0xFFFFFFFF))
    zero = draw(st.sampled_from([0, 1, 1 << 31, 0xFFFFFFFF, alloc, ~alloc & 0xFFFFFFFF])
                | st.integers(0, 0xFFFFFFFF))
    return draw(st.sampled_from([alloc | zero << 32, old ^ (1 << draw(st.integers(0, 63))),
                                 old | zero << 32, old | alloc, U64, 0]))


def slot_value(draw: st.DrawFn, base: Base, slot: Slot) -> int:
    old = int.from_bytes(base.data[slot.offset:slot.offset + slot.width], "big")
    cs = base.cluster_size
    if ".L2bm@" in f".{slot.name}":
        return draw(subcluster_bitmap(old))
    if slot.width == 8:
        return draw(st.one_of(table_entry(base, old),
                              interesting(8, old, cs, tuple(offsets_of(base)))))
    top = (1 << (8 * slot.width)) - 1
    return draw(interesting(slot.width, old, cs,
                            tuple(min(top, o >> k) for o in (len(base.data), cs)
                                  for k in (0, 3, 9, base.cluster_bits))))


def set_slot(slot: Slot, value: int) -> tuple[str, Edit]:
    return (f"{slot.name} (@{slot.offset:#x}, {slot.width} B) = {value:#x}",
            ("set", slot.offset, value.to_bytes(slot.width, "big")))


@st.composite
def mutation(draw: st.DrawFn, base: Base, bomb: bool = False) -> tuple[str, list[Edit]]:
    cs = base.cluster_size
    kinds = ["header", "header", "features", "ext", "l1", "l2", "l2", "reftable", "refblock",
             "truncate", "flip", "flip", "append"]
    if base.struct_fields:
        kinds += ["struct", "struct"]
    if bomb:
        kinds = ["bomb", "bomb", "bomb", "header", "struct" if base.struct_fields else "l1"]
    kind = draw(st.sampled_from(kinds))
    data = base.data
    if kind == "header":
        slot = draw(st.sampled_from(base.header_fields))
        desc, edit = set_slot(slot, slot_value(draw, base, slot))
        return desc, [edit]
    if kind == "features":
        name, off = draw(st.sampled_from([("incompatible_features", 72),
                                          ("compatible_features", 80),
                                          ("autoclear_features", 88)]))
        if off + 8 > (72 if data[7] == 2 else 104):
            off, name = 72, "incompatible_features"
        old = struct.unpack_from(">Q", data, off)[0]
        value = old ^ (1 << draw(st.integers(0, 63)))
        return set_slot(Slot(f"header.{name}", off, 8), value)[0], [
            ("set", off, struct.pack(">Q", value))]
    if kind == "ext":
        at = draw(st.sampled_from(base.ext_heads))
        op = draw(st.sampled_from(["length", "type", "duplicate", "insert", "no-end"]))
        if op == "length":
            v = draw(interesting(4, struct.unpack_from(">I", data, at + 4)[0], cs))
            return f"extension@{at:#x}.length = {v:#x}", [("set", at + 4, struct.pack(">I", v))]
        if op == "type":
            v = draw(st.sampled_from([0, 0xE2792ACA, 0x6803F857, 0x0537BE77, 0x23852875,
                                      0x44415441]) | interesting(4))
            return f"extension@{at:#x}.type = {v:#x}", [("set", at, struct.pack(">I", v))]
        if op == "duplicate":
            length = min(struct.unpack_from(">I", data, at + 4)[0], cs)
            chunk = data[at:at + 8 + ((length + 7) & ~7)]
            return f"extension@{at:#x} duplicated in place", [("insert", at, chunk)]
        if op == "insert":
            ext_type = draw(st.sampled_from([0xE2792ACA, 0x6803F857, 0x0537BE77, 0x23852875,
                                             0x44415441, 0x12345678]))
            payload = draw(st.sampled_from([b"qcow2", b"raw", IMAGE.encode(), b"backing.qcow2",
                                            b"data.raw", b"x" * 16, b"\0" * 24])
                           | st.binary(max_size=64))
            length = draw(st.sampled_from([len(payload)]) | interesting(4, len(payload), cs))
            raw = struct.pack(">II", ext_type, length) + payload + bytes((-len(payload)) % 8)
            return (f"extension {ext_type:#x} (length {length}, data {payload!r}) inserted "
                    f"@{at:#x}", [("insert", at, raw)])
        junk = draw(st.binary(min_size=8, max_size=8))
        end = base.ext_heads[-1]
        return f"end-of-extensions marker @{end:#x} = {junk.hex()}", [("set", end, junk)]
    if kind in ("l1", "l2", "reftable", "refblock", "struct"):
        slots = {"l1": base.l1_slots, "l2": base.l2_slots, "reftable": base.reftable_slots,
                 "refblock": base.refblock_slots, "struct": base.struct_fields}[kind]
        if not slots:
            slots = base.header_fields
        slot = draw(st.sampled_from(slots))
        desc, edit = set_slot(slot, slot_value(draw, base, slot))
        return desc, [edit]
    if kind == "truncate":
        points = sorted({*base.metadata, *(m + 8 for m in base.metadata), len(data) - 1,
                         len(data) - cs, 72, 104})
        n = draw(st.sampled_from([p for p in points if 0 <= p < len(data)])
                 | st.integers(0, len(data) - 1))
        return f"truncated to {n:#x} bytes", [("truncate", n, b"")]
    if kind == "flip":
        cluster = draw(st.sampled_from(base.metadata))
        pos = cluster + draw(st.integers(0, min(cs, 4096) - 1))
        if pos >= len(data):
            pos = draw(st.integers(0, min(len(data), cs) - 1))
        mask = draw(st.integers(1, 255))
        return f"byte @{pos:#x} ^= {mask:#x}", [("set", pos, bytes([data[pos] ^ mask]))]
    if kind == "append":
        raw = draw(st.binary(min_size=1, max_size=64))
        return f"{len(raw)} bytes appended", [("append", 0, raw)]
    # "bomb": the largest values fields that size something may take
    h = HeaderCluster.unpack(data).header
    choice = draw(st.sampled_from(["l1", "reftable", "snapshots", "struct-max", "size"]))
    if choice == "l1":
        n = draw(st.sampled_from([(32 << 20) // 8, (32 << 20) // 8 - 1, 1 << 20]))
        at = draw(st.sampled_from([*base.metadata, len(data) & ~(cs - 1)]))
        return f"l1_size = {n:#x}, l1_table_offset = {at:#x}", [
            ("set", 36, struct.pack(">IQ", n, at))]
    if choice == "reftable":
        n = (8 << 20) // cs
        at = draw(st.sampled_from(base.metadata))
        return f"refcount_table_offset = {at:#x}, refcount_table_clusters = {n:#x}", [
            ("set", 48, struct.pack(">QI", at, n))]
    if choice == "snapshots":
        n = draw(st.sampled_from([65536, 65535, 4096, 1]))
        at = draw(st.sampled_from(base.metadata + base.data_clusters[:4]))
        return f"nb_snapshots = {n}, snapshots_offset = {at:#x}", [
            ("set", 60, struct.pack(">IQ", n, at))]
    if choice == "size":
        l1 = min((32 << 20) // 8, h.l1_size * 64 + 1)
        size = l1 << (2 * h.cluster_bits - 3)
        return f"size = {size:#x}, l1_size = {l1:#x}", [
            ("set", 24, struct.pack(">Q", min(size, (1 << 63) - 1))),
            ("set", 36, struct.pack(">I", l1))]
    slot = draw(st.sampled_from(base.struct_fields or base.header_fields))
    value = (1 << (8 * slot.width)) - draw(st.sampled_from([1, 2, 512, 1 << 9]))
    value = max(0, value)
    desc, edit = set_slot(slot, value)
    return desc, [edit]


class Mutant:
    """A mutated base image; its repr names the edits (the bytes are too long to print)."""

    def __init__(self, base: Base, edits: tuple[str, ...], data: bytes):
        self.base = base
        self.edits = edits
        self.data = data

    def __repr__(self) -> str:
        return f"Mutant(base={self.base.name!r}, edits={list(self.edits)!r})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis's printer
        p.text(repr(self))


@st.composite
def mutants(draw: st.DrawFn, bases: dict[str, Base], bomb: bool = False,
            names: tuple[str, ...] | None = None) -> Mutant:
    base = bases[draw(st.sampled_from(sorted(names or bases)))]
    descs: list[str] = []
    edits: list[Edit] = []
    for _ in range(draw(st.integers(1, 3))):
        desc, more = draw(mutation(base, bomb))
        descs.append(desc)
        edits += more
    return Mutant(base, tuple(descs), apply_edits(base.data, edits))


# ============================================================================ the properties
@dataclass(frozen=True)
class KnownBug:
    """A bug of a module this file does not own, recognised by exception type and raise site.

    ``where`` is (file name, function) of the innermost dirtybits frame of the traceback, or
    of any dirtybits frame when ``anywhere`` is set.
    """

    id: str
    exc: type[BaseException]
    where: tuple[str, str]
    anywhere: bool = False


# Crashes a consumer is allowed while a fix is pending (each with its strict-xfail repro).
# Empty: every bug the fuzzers found so far is fixed, so any such crash fails the run.
KNOWN_BUGS: tuple[KnownBug, ...] = ()



def _dirtybits_frames(exc: BaseException) -> list[tuple[str, str]]:
    frames = traceback.extract_tb(exc.__traceback__)
    return [(os.path.basename(f.filename), f.name) for f in frames
            if f"{os.sep}dirtybits{os.sep}" in f.filename]


def chain_frames(exc: BaseException) -> list[tuple[str, str]]:
    """The dirtybits frames of an exception and of those it was raised from or during."""
    frames: list[tuple[str, str]] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        frames += _dirtybits_frames(cur)
        cur = cur.__cause__ or cur.__context__
    return frames


def known_bug(exc: BaseException) -> str | None:
    frames = _dirtybits_frames(exc)
    for bug in KNOWN_BUGS:
        if not isinstance(exc, bug.exc) or not frames:
            continue
        if (bug.anywhere and bug.where in frames) or frames[-1] == bug.where:
            return bug.id
    return None


def attempt(label: str, fn: Callable[[], object], outcomes: list[str]) -> None:
    """Run one consumer: DirtybitsError is an answer, a known bug is noted, the rest fails."""
    try:
        fn()
        outcomes.append(f"{label}: ok")
    except DirtybitsError as exc:
        outcomes.append(f"{label}: {type(exc).__name__}")
    except FuzzTimeoutError:
        raise
    except Exception as exc:
        bug = known_bug(exc)
        if bug is None:
            raise
        outcomes.append(f"{label}: known bug {bug}")


def read_everything(path: str) -> None:
    with open_qcow2(path, readonly=True) as img:
        size = img.size
        n = min(size, READ_CAP)
        img.read(0, n)
        list(img.block_status(0, n))
        if size > n:
            start = max(n, size - (256 << 10))
            img.read(start, size - start)
            list(img.block_status(start, size - start))


def read_bitmaps(path: str) -> None:
    """The bitmap store's view: directory, tables, and the bits of every usable bitmap."""
    with open_qcow2(path, readonly=True) as img:
        store = Qcow2BitmapStore(img)
        for sb in store.bitmaps:
            if sb.usable:
                store.load(sb.name)


def exercise_readonly(path: str) -> list[str]:
    """Every read-only consumer of an image; returns what each answered."""
    outcomes: list[str] = []
    attempt("engine", lambda: read_everything(path), outcomes)
    attempt("bitmaps", lambda: read_bitmaps(path), outcomes)
    attempt("check", lambda: check_image(path), outcomes)
    attempt("info", lambda: image_info(path), outcomes)
    attempt("info-chain", lambda: backing_chain_info(path), outcomes)
    return outcomes


def snapshot_dir(d: Path) -> dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(d.iterdir())}


def check_readonly(path: Path) -> list[str]:
    before = snapshot_dir(path.parent)
    with time_limit(TIME_LIMIT):
        outcomes = exercise_readonly(str(path))
    assert snapshot_dir(path.parent) == before, "a read-only consumer changed a file"
    return outcomes


@fuzz_settings(400)
@given(data=st.data())
def test_readonly_consumers(bases: dict[str, Base], scratch: Scratch,
                            data: st.DataObject) -> None:
    m = data.draw(mutants(bases), label="mutant")
    outcomes = check_readonly(scratch.prepare(m.base, m.data))
    note(f"outcomes: {outcomes}")
    for o in outcomes:
        event(o)


# ---------------------------------------------------------------------------- vs QEMU
def check_reads_match_qemu(path: Path, tools: dict[str, str]) -> str:
    """Where both QEMU and we read a mutant, we read the same bytes as QEMU."""
    raw = path.with_name("qemu-read.raw")
    try:
        proc = run(tools["qemu-img"], "convert", "-f", "qcow2", "-O", "raw", path.name,
                   raw.name, cwd=path.parent, timeout=QEMU_TIMEOUT)
        if proc.returncode != 0:
            return "QEMU cannot read it"
        if raw.stat().st_size > READ_CAP:
            return "too large to compare"
        theirs = raw.read_bytes()
    finally:
        raw.unlink(missing_ok=True)
    try:
        with time_limit(TIME_LIMIT), open_qcow2(str(path), readonly=True) as img:
            ours = img.read(0, min(img.size, len(theirs)))
    except DirtybitsError as exc:
        return f"we refuse: {type(exc).__name__}"
    except Exception as exc:
        if known_bug(exc) is None:
            raise
        return f"known bug {known_bug(exc)}"
    if ours != theirs[:len(ours)]:
        first = next(i for i in range(len(ours)) if ours[i] != theirs[i])
        raise AssertionError(f"we read other data than QEMU from byte {first:#x} on "
                             f"(QEMU: {theirs[first:first + 8].hex()}, "
                             f"us: {ours[first:first + 8].hex()})")
    return "same data"


@fuzz_settings(60)
@given(data=st.data())
def test_reads_match_qemu(bases: dict[str, Base], scratch: Scratch,
                          qemu_tools: dict[str, str], data: st.DataObject) -> None:
    m = data.draw(mutants(bases), label="mutant")
    outcome = check_reads_match_qemu(scratch.prepare(m.base, m.data), qemu_tools)
    note(outcome)
    event(outcome)


# ---------------------------------------------------------------------------- writable
def qemu_check(path: Path, tools: dict[str, str]) -> dict[str, Any] | None:
    """``qemu-img check --output=json`` (None when QEMU cannot check the image at all)."""
    try:
        proc = run(tools["qemu-img"], "check", "--output=json", "-f", "qcow2", path.name,
                   cwd=path.parent, timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    try:
        out: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        return None
    out["messages"] = proc.stderr
    return out


def qemu_reads(path: Path, tools: dict[str, str], offset: int, length: int,
               pattern: int) -> bool | None:
    """Whether qemu-io reads ``pattern`` at [offset, offset+length) (None: cannot open)."""
    proc = run(tools["qemu-io"], "-r", "-f", "qcow2", "-c",
               f"read -P {pattern:#x} {offset} {length}", path.name, cwd=path.parent,
               timeout=QEMU_TIMEOUT)
    text = proc.stdout + proc.stderr
    if "Pattern verification failed" in text:
        return False
    if f"read {length}/{length} bytes" in text:
        return True
    return None


def corruptions(check: dict[str, Any]) -> int:
    return int(check.get("corruptions", 0)) + int(check.get("check-errors", 0))


QEMU_OVERLAP = "QEMU's allocation hit metadata"
PAST_EOF = "exceeding the end of the file"  # qemu-img check: a reference past the end


def qemu_same_write(path: Path, image: bytes, tools: dict[str, str], offset: int, length: int,
                    pattern: int, *, size_only: bool = False) -> int | str | None:
    """Corruptions qemu-img check finds after qemu-io writes the same data to ``image``
    (with ``size_only``: the size of the file afterwards).

    None when QEMU cannot write it; ``QEMU_OVERLAP`` when QEMU's write allocated a cluster
    the refcounts call free but that holds metadata (or is cluster 0), and QEMU refused it
    (marking the image corrupt). Both engines trust the refcounts when allocating; ours
    skips the clusters it knows to be metadata, so it lands on the next "free" cluster, which
    on such an image may hold data: no yardstick then.
    """
    copy = path.with_name("qemu-copy.qcow2")
    copy.write_bytes(image)
    try:
        proc = run(tools["qemu-io"], "-f", "qcow2", "-c",
                   f"write -P {pattern:#x} {offset} {length}", copy.name, cwd=path.parent,
                   timeout=QEMU_TIMEOUT)
        if "Preventing invalid" in proc.stderr:  # "write on metadata", "allocation of"
            return QEMU_OVERLAP
        if proc.returncode != 0 or "wrote" not in proc.stdout:
            return None
        if size_only:
            return copy.stat().st_size
        after = qemu_check(copy, tools)
        return None if after is None else corruptions(after)
    finally:
        copy.unlink()


def check_writable(path: Path, tools: dict[str, str], where: float, pattern: int,
                   data_file: str | None = None, compress: bool = False) -> str:
    """One writable open and one-cluster write (``compress``: a compressed one); ``data_file``
    is the one sibling it may write."""
    before = path.read_bytes()
    siblings = {k: v for k, v in snapshot_dir(path.parent).items()
                if k != path.name and k != data_file}
    outcome = _check_writable(path, before, tools, where, pattern, compress)
    after = {k: v for k, v in snapshot_dir(path.parent).items() if k in siblings}
    assert after == siblings, "writing the image changed another file"
    return outcome


def _check_writable(path: Path, before: bytes, tools: dict[str, str], where: float,
                    pattern: int, compress: bool = False) -> str:
    qemu_before = qemu_check(path, tools)
    try:
        with time_limit(TIME_LIMIT):
            # a plain Qcow2Image, or a BlockNode recording the writes in the image's bitmaps
            img = open_image(str(path), "qcow2", readonly=False)
    except DirtybitsError as exc:
        assert unchanged(path, before), f"failed writable open ({exc!r}) wrote to the file"
        return f"open refused: {type(exc).__name__}"
    except Exception as exc:
        if known_bug(exc) is None:
            raise
        assert unchanged(path, before), "failed writable open wrote to the file"
        return f"open: known bug {known_bug(exc)}"
    header = HeaderCluster.unpack(before).header
    size = img.size
    cs = header.cluster_size
    offset = int(where * (size // cs)) * cs if size >= cs else 0
    length = min(cs, size - offset)
    data = bytes([pattern]) * length
    wrote = False
    try:
        with time_limit(TIME_LIMIT):
            try:
                if length and compress:  # whole clusters (or to the end of the disk)
                    img.write(offset, data, compress=True)
                elif length:
                    img.write(offset, data)
                wrote = True
            finally:
                img.close()
    except DirtybitsError as exc:
        return f"write refused: {type(exc).__name__}"
    except Exception as exc:
        if known_bug(exc) is None:
            raise
        return f"write: known bug {known_bug(exc)}"
    assert wrote
    if not length:
        return "empty disk"
    return _judge_write(path, before, tools, offset, length, pattern, qemu_before)


def unchanged(path: Path, before: bytes) -> bool:
    return path.stat().st_size == len(before) and path.read_bytes() == before


def _judge_write(path: Path, before: bytes, tools: dict[str, str], offset: int, length: int,
                 pattern: int, qemu_before: dict[str, Any] | None) -> str:
    """After a successful write: no worse than QEMU's same write, and the data reads back."""
    data = bytes([pattern]) * length
    grown = path.stat().st_size
    huge = len(before) + (64 << 20)
    if grown > huge:
        # e.g. an L2 table past the end of the file that is written back there: QEMU does
        # the same when COPIED says it may; checking a huge sparse file costs too much
        theirs = qemu_same_write(path, before, tools, offset, length, pattern, size_only=True)
        if theirs == QEMU_OVERLAP:
            return f"written; the file grew, {QEMU_OVERLAP}"
        assert isinstance(theirs, int) and theirs > huge, (
            f"the write grew the file to {grown} bytes, QEMU's to {theirs}")
        with time_limit(TIME_LIMIT), open_qcow2(str(path), readonly=True) as again:
            assert again.read(offset, length) == data, "our own write does not read back"
        return "written; the file grew as with QEMU"
    qemu_after = qemu_check(path, tools)
    if qemu_before is not None:
        assert qemu_after is not None, "QEMU could check the image before our write, not after"
        bad_before, bad_after = corruptions(qemu_before), corruptions(qemu_after)
        if bad_after > bad_before and PAST_EOF in qemu_before["messages"]:
            # references past the end of the file collide with whatever a write allocates
            # there; how many errors that makes depends on the layout each engine picks
            return "written; more corruptions, the image had references past its end"
        if bad_after > bad_before:
            # A damaged image can get worse from any allocating write (a dangling L2 entry
            # past the end of the file names the cluster the write then allocates): QEMU's
            # own write of the same data is the yardstick.
            bad_qemu = qemu_same_write(path, before, tools, offset, length, pattern)
            if bad_qemu == QEMU_OVERLAP:
                return f"written; more corruptions, as {QEMU_OVERLAP}"
            if not isinstance(bad_qemu, int) or bad_after > bad_qemu:
                raise AssertionError(
                    f"qemu-img check: {bad_before} corruptions before our write, {bad_after} "
                    f"after; after the same write by qemu-io: {bad_qemu}")
    try:
        with time_limit(TIME_LIMIT), open_qcow2(str(path), readonly=True) as again:
            back = again.read(offset, length)
    except DirtybitsError as exc:
        raise AssertionError(f"the write succeeded, reading it back fails: {exc!r}") from exc
    assert back == data, "our own write does not read back"
    if qemu_before is not None:
        assert qemu_reads(path, tools, offset, length, pattern) is not False, (
            "QEMU reads something else where we wrote")
    return "written"


@fuzz_settings(120)
@given(data=st.data())
def test_writable_open_and_write(bases: dict[str, Base], scratch: Scratch,
                                 qemu_tools: dict[str, str], data: st.DataObject) -> None:
    m = data.draw(mutants(bases), label="mutant")
    where = data.draw(st.floats(0, 1, exclude_max=True), label="write position")
    compress = data.draw(st.booleans(), label="compressed write")
    outcome = check_writable(scratch.prepare(m.base, m.data), qemu_tools, where, 0xC5,
                             m.base.data_file, compress)
    note(outcome)
    event(outcome)


@st.composite
def l2_mutants(draw: st.DrawFn, bases: dict[str, Base], names: tuple[str, ...]) -> Mutant:
    """Mutants whose damage is in L2 entries only (descriptors and subcluster bitmaps)."""
    base = bases[draw(st.sampled_from(names))]
    descs: list[str] = []
    edits: list[Edit] = []
    for _ in range(draw(st.integers(1, 3))):
        slot = draw(st.sampled_from(base.l2_slots))
        desc, edit = set_slot(slot, slot_value(draw, base, slot))
        descs.append(desc)
        edits.append(edit)
    return Mutant(base, tuple(descs), apply_edits(base.data, edits))


@fuzz_settings(60)
@given(data=st.data())
def test_extl2_mutants(bases: dict[str, Base], scratch: Scratch, qemu_tools: dict[str, str],
                       data: st.DataObject) -> None:
    """Hostile extended-L2 images (bad subcluster bitmaps above all): read-only consumers
    succeed or refuse, read what QEMU reads, and a writable open writes only where it may."""
    names = ("extl2", "engine_extl2")
    m = data.draw(st.one_of(l2_mutants(bases, names), l2_mutants(bases, names),
                            mutants(bases, names=names)), label="mutant")
    path = scratch.prepare(m.base, m.data)
    outcomes = check_readonly(path)
    outcomes.append(check_reads_match_qemu(path, qemu_tools))
    where = data.draw(st.floats(0, 1, exclude_max=True), label="write position")
    outcomes.append(check_writable(path, qemu_tools, where, 0xC5, m.base.data_file))
    note(f"outcomes: {outcomes}")
    for o in outcomes:
        event(o)


# ---------------------------------------------------------------------------- subprocess
def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


class Worker:
    """A child running ``exercise_readonly`` on paths it reads from stdin, memory capped."""

    def __init__(self, directory: Path) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_path = directory / "worker-stderr"

    def start(self) -> subprocess.Popen[str]:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115 (lives as long as the child)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
            preexec_fn=_limit_memory,
        )
        return self.proc

    def run(self, path: Path, timeout: float) -> dict[str, Any]:
        proc = self.proc if self.proc and self.proc.poll() is None else self.start()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return {"status": "hang", "detail": f"no answer within {timeout} s"}
        line = proc.stdout.readline()
        if not line:
            self.stop()
            return {"status": "crash", "detail": self.stderr_path.read_text()[-3000:]}
        result: dict[str, Any] = json.loads(line)
        return result

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.stderr.close()


def worker_main() -> None:
    """The child's loop: one JSON answer line per path line."""
    for line in sys.stdin:
        path = line.rstrip("\n")
        try:
            outcomes = exercise_readonly(path)
            answer: dict[str, Any] = {"status": "ok", "outcomes": outcomes}
        except BaseException as exc:  # report everything, MemoryError included
            answer = {"status": "error", "type": type(exc).__name__,
                      "detail": "".join(traceback.format_exception(exc))[-3000:]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(tmp_path_factory.mktemp("fuzz-worker"))
    yield w
    w.stop()


@fuzz_settings(30, divisor=5)
@given(data=st.data())
def test_guarded_subprocess(bases: dict[str, Base], scratch: Scratch, worker: Worker,
                            data: st.DataObject) -> None:
    """Hangs and unbounded allocations, with size fields pushed to their limits."""
    m = data.draw(mutants(bases, bomb=data.draw(st.booleans(), label="bomb")), label="mutant")
    path = scratch.prepare(m.base, m.data)
    before = snapshot_dir(path.parent)
    answer = worker.run(path, SUBPROCESS_TIMEOUT)
    note(json.dumps(answer))
    assert answer["status"] == "ok", f"{answer['status']}: {answer.get('detail')}"
    for o in answer["outcomes"]:
        event(o)
    assert snapshot_dir(path.parent) == before, "a read-only consumer changed a file"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()


# ============================================================================ regressions
# Deterministic examples of what the fuzzing found. Those marked xfail(strict=True) are bugs of
# modules this file does not own (engine, check, info): each turns red once fixed, so the
# matching KNOWN_BUGS entry can go. The others pin down fixes made in the format records.
def make_mutant(base: Base, tmp: Path, edits: list[Edit] | None = None,
                image: bytes | None = None) -> Path:
    d = tmp / base.name
    shutil.copytree(base.dir, d)
    path = d / IMAGE
    path.write_bytes(image if image is not None else apply_edits(base.data, edits or []))
    return path


def with_extension(base: Base, ext_type: int, data: bytes | None, incompat: int = 0) -> bytes:
    """The base with one header extension replaced (written by the records, no other change)."""
    hc = HeaderCluster.unpack(base.data)
    hc = hc.with_extension(ext_type, data)
    hc = replace(hc, header=hc.header.replace(
        incompatible_features=hc.header.incompatible_features | incompat))
    packed = hc.pack()
    old_len = len(HeaderCluster.unpack(base.data).pack())
    return packed + bytes(max(0, old_len - len(packed))) + base.data[max(len(packed), old_len):]


def slot(base: Base, name: str) -> Slot:
    return next(s for s in (*base.header_fields, *base.struct_fields, *base.l1_slots,
                            *base.l2_slots, *base.reftable_slots) if s.name == name)


def l2_entry_slot(base: Base, guest_cluster: int) -> Slot:
    l1 = slot(base, "L1[0]")
    l2 = struct.unpack_from(">Q", base.data, l1.offset)[0] & L1E_OFFSET_MASK
    return Slot(f"L2[{guest_cluster}]", l2 + 8 * guest_cluster, 8)


def test_regression_engine_data_file_name_with_nul(bases: dict[str, Base],
                                                   tmp_path: Path) -> None:
    base = bases["qemu64k"]
    image = with_extension(base, EXT_DATA_FILE, b"data\0.raw", incompat=INCOMPAT_DATA_FILE)
    path = make_mutant(base, tmp_path, image=image)
    with pytest.raises(DirtybitsError):
        open_qcow2(str(path), readonly=True).close()


def test_regression_engine_backing_name_with_nul(bases: dict[str, Base],
                                                 tmp_path: Path) -> None:
    base = bases["backing"]
    name_at = struct.unpack_from(">Q", base.data, 8)[0]
    path = make_mutant(base, tmp_path, [("set", name_at + 4, b"\0")])  # "back\0ng.qcow2"
    with pytest.raises(DirtybitsError):
        open_qcow2(str(path), readonly=True).close()


def test_regression_info_chain_backing_name_with_nul(bases: dict[str, Base],
                                                     tmp_path: Path) -> None:
    base = bases["backing"]
    name_at = struct.unpack_from(">Q", base.data, 8)[0]
    path = make_mutant(base, tmp_path, [("set", name_at + 4, b"\0")])
    with pytest.raises(DirtybitsError):
        backing_chain_info(str(path))


def test_regression_engine_data_file_extension_without_bit(bases: dict[str, Base],
                                                           tmp_path: Path) -> None:
    base = bases["qemu64k"]
    path = make_mutant(base, tmp_path, image=with_extension(base, EXT_DATA_FILE, b"other.raw"))
    other = path.with_name("other.raw")
    other.write_bytes(b"\xee" * (4 << 20))
    with open_qcow2(str(path), readonly=True) as img:
        assert img.read(0, 16) == b"\x11" * 16  # what qemu-io reads: the image's own data


def test_regression_engine_data_file_is_the_image(bases: dict[str, Base],
                                                  tmp_path: Path) -> None:
    """A data-file extension naming the image itself: QEMU's locks refuse the rw open (the
    image's own fd unshares "write"), so a guest write can't overwrite the qcow2 header."""
    base = bases["datafile"]
    path = make_mutant(base, tmp_path,
                       image=with_extension(base, EXT_DATA_FILE, IMAGE.encode()))
    with pytest.raises(LockError, match='Failed to get shared "resize" lock'), \
            open_qcow2(str(path)) as img:
        img.write(0, b"\xab" * 4096)
    assert path.read_bytes()[:4] == b"QFI\xfb", "the write destroyed the image's header"


def test_regression_check_refcount_block_offset_past_2_63(bases: dict[str, Base],
                                                          tmp_path: Path) -> None:
    """A refcount table entry with bit 63 set once reached os.pread (OverflowError); the check
    now completes, says what qemu-img check says first ("refcount block 0 is outside image")
    and finds the image corrupt, not clean."""
    base = bases["qemu64k"]
    rt = slot(base, "reftable[0]")
    old = struct.unpack_from(">Q", base.data, rt.offset)[0]
    edits: list[Edit] = [("set", rt.offset, struct.pack(">Q", old | 1 << 63))]
    path = make_mutant(base, tmp_path, edits)
    res = check_image(str(path))
    assert res.messages[0] == "ERROR refcount block 0 is outside image", res.messages[:3]
    assert res.corruptions >= 1
    assert unchanged(path, apply_edits(base.data, edits)), "a check without -r wrote"


def test_regression_engine_shared_l2_written_after_read(bases: dict[str, Base],
                                                        tmp_path: Path) -> None:
    base = bases["qemu64k"]
    l1 = slot(base, "L1[0]")
    old = struct.unpack_from(">Q", base.data, l1.offset)[0]
    path = make_mutant(base, tmp_path, [("set", l1.offset,
                                         struct.pack(">Q", old & ~OFLAG_COPIED))])
    l2_offset = old & L1E_OFFSET_MASK
    l2_before = path.read_bytes()[l2_offset:l2_offset + (1 << 16)]
    # a table without COPIED is copied before it changes (as QEMU's l2_allocate), whether
    # or not a read put it in the cache first
    for read_first in (False, True):
        with open_qcow2(str(path)) as img:
            if read_first:
                img.read(20 << 16, 4096)
            img.write(20 << 16, b"\xc5" * 4096)
            assert img.read(20 << 16, 4096) == b"\xc5" * 4096
        assert path.read_bytes()[l2_offset:l2_offset + (1 << 16)] == l2_before, (
            "the shared L2 table was modified in place")


def test_regression_engine_write_to_unaligned_host_offset(bases: dict[str, Base],
                                                          tmp_path: Path) -> None:
    base = bases["qemu64k"]
    entry = l2_entry_slot(base, 0)
    host = int.from_bytes(base.data[entry.offset:entry.offset + 8], "big") & L2E_OFFSET_MASK
    path = make_mutant(base, tmp_path, [
        ("set", entry.offset, struct.pack(">Q", OFLAG_COPIED | (host + 0x8000)))])
    with open_qcow2(str(path)) as img, pytest.raises(DirtybitsError):
        img.write(0, b"\xc5" * 4096)


def test_regression_bitmap_table_offset_past_2_63(bases: dict[str, Base],
                                                  tmp_path: Path) -> None:
    """A bitmap_table_offset >= 2^63 once reached os.pread (OverflowError); the store now
    judges the table's location first and reports the bitmap unusable."""
    base = bases["bitmaps"]
    s = slot(base, "bitmap[0].bitmap_table_offset")
    old = int.from_bytes(base.data[s.offset:s.offset + 8], "big")
    path = make_mutant(base, tmp_path, [("set", s.offset, struct.pack(">Q", old | 1 << 63))])
    read_bitmaps(str(path))  # the fuzzer's consumer: no OverflowError, no refusal
    with open_qcow2(str(path), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        damaged = store.find("b0")
        assert damaged is not None and not damaged.usable and damaged.problems
        with pytest.raises(DirtybitsError):
            store.load("b0")
        # the other bitmaps are still read
        assert [sb.name for sb in store.bitmaps if sb.usable] == ["b1", "b2"]
        assert store.load("b1").size == store.disk_size


def test_regression_bitmap_tracking_open_fails_after_writing(bases: dict[str, Base],
                                                             tmp_path: Path) -> None:
    """A writable open with bitmaps on damaged refcounts once marked them in_use inside the
    open and failed after writing; in_use is now set before the first write, not at open."""
    base = bases["bitmaps"]
    path = make_mutant(base, tmp_path, [("set", 48, struct.pack(">Q", 0x20000000))])
    try:
        open_image(str(path), "qcow2", readonly=False).close()
    except DirtybitsError:
        assert unchanged(path, base.data), "the failed open wrote to the image"


CAPPED_INFO = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from dirtybits.block.open import open_image
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.errors import DirtybitsError
from dirtybits.qcow2.info import image_info
try:
    image_info(sys.argv[1])
    print("ok")
except DirtybitsError as exc:
    print("DirtybitsError", type(exc).__name__, exc)
except BaseException as exc:
    print("other", type(exc).__name__, exc)
"""


def test_regression_info_snapshot_extra_data_is_bounded(bases: dict[str, Base],
                                                        tmp_path: Path) -> None:
    base = bases["snapshot"]
    extra = slot(base, "snapshot[0].extra_data_size")
    path = make_mutant(base, tmp_path, [("set", extra.offset, b"\xff\xff\xff\xff")])
    proc = subprocess.run([sys.executable, "-c", CAPPED_INFO.format(limit=MEMORY_LIMIT),
                           str(path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert proc.stdout.startswith("DirtybitsError"), proc.stdout + proc.stderr


def test_regression_engine_zero_alloc_write(bases: dict[str, Base], tmp_path: Path,
                                            qemu_tools: dict[str, str]) -> None:
    """A preallocated zero cluster (ZERO flag, COPIED, host offset) is written in place, as
    QEMU does. The engine used to allocate a new cluster and free the old one: when that one
    is also used elsewhere (here: another guest cluster's data) its refcount fell to 0 while
    in use, and qemu-img check went from 1 corruption to 2."""
    base = bases["qemu64k"]
    shared = base.data_clusters[-1]  # a data cluster that guest cluster 3 will share
    entry = l2_entry_slot(base, 3)
    path = make_mutant(base, tmp_path, [
        ("set", entry.offset, struct.pack(">Q", OFLAG_COPIED | OFLAG_ZERO | shared))])
    before = qemu_check(path, qemu_tools)
    assert before is not None and corruptions(before) == 1
    size = path.stat().st_size
    with open_qcow2(str(path)) as img:
        img.write(3 << 16, b"\xc5" * (1 << 16))
    after = qemu_check(path, qemu_tools)
    assert after is not None and corruptions(after) <= corruptions(before)
    assert path.stat().st_size == size, "the write allocated instead of writing in place"
    with path.open("rb") as f:
        f.seek(entry.offset)
        assert struct.unpack(">Q", f.read(8))[0] == OFLAG_COPIED | shared
        f.seek(shared)
        assert f.read(1 << 16) == b"\xc5" * (1 << 16)


def test_snapshot_count_is_bounded(bases: dict[str, Base], tmp_path: Path) -> None:
    """nb_snapshots = 2^32-1 made the engine's read-only open loop ~335M times (512 B
    clusters); the header record now refuses more than QEMU's 65536 snapshots."""
    base = bases["qemu512"]
    path = make_mutant(base, tmp_path, [("set", 60, struct.pack(">IQ", 0xFFFFFFFF, 4096))])
    with time_limit(10), pytest.raises(DirtybitsError, match="Snapshot table too large"):
        open_qcow2(str(path), readonly=True)
    with time_limit(10), pytest.raises(DirtybitsError):
        check_image(str(path))
    with time_limit(10), pytest.raises(DirtybitsError):
        image_info(str(path))


@pytest.mark.parametrize(("field_name", "value"), [
    ("bitmaps_ext.bitmap_directory_size", 1 << 63),
    ("bitmaps_ext.bitmap_directory_offset", 1 << 63),
    ("bitmaps_ext.nb_bitmaps", 0),
])
def test_bitmaps_extension_is_validated(bases: dict[str, Base], tmp_path: Path,
                                        field_name: str, value: int) -> None:
    """info read bitmap_directory_size (u64) bytes at bitmap_directory_offset (u64) with no
    bound (OverflowError past 2^63); the header records now apply QEMU's limits."""
    base = bases["bitmaps"]
    s = slot(base, field_name)
    path = make_mutant(base, tmp_path, [("set", s.offset, value.to_bytes(s.width, "big"))])
    for consumer in (image_info, check_image, read_everything):
        with pytest.raises(DirtybitsError, match="bitmaps"):
            consumer(str(path))
