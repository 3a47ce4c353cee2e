"""Releasing clusters, against qemu-io 7.2 doing the same on a copy of the same image.

- a guest discard (or write-zeroes with unmap) gives the freed clusters' space back to the
  host filesystem: qcow2's ``pass-discard-request``, on in qemu-io, punches them;
- a preallocated zero cluster (zero flag, host offset, COPIED) is written where it lies, so
  the file keeps QEMU's layout; when it is shared its refcount falls by one, never to 0;
- overwriting a compressed L2 entry that points at garbage frees nothing still in use.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from dirtybits.format.qcow2.header import HeaderCluster
from dirtybits.format.qcow2.refcount import get_refcount, set_refcount
from dirtybits.format.qcow2.tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    encode_compressed,
)
from peers import db, sh

pytestmark = pytest.mark.interop

KiB = 1024
CS = 64 * KiB


# --------------------------------------------------------------------------- helpers
def create(path: Path, size: str = "1M", *opts: str) -> Path:
    sh("qemu-img", "create", "-q", "-f", "qcow2", *opts, path, size)
    return path


def both(src: Path, *cmds: str, hostile: bool = False) -> tuple[Path, Path]:
    """Run ``cmds`` with qemu-io on one copy of ``src`` and with dirtybits io on another
    (on a ``hostile`` image QEMU may fail, or notice the damage, as it likes)."""
    ref, ours = src.with_name("qemu.qcow2"), src.with_name("dirtybits.qcow2")
    shutil.copyfile(src, ref)
    shutil.copyfile(src, ours)
    args = [a for c in cmds for a in ("-c", c)]
    q = sh("qemu-io", "-f", "qcow2", *args, ref, ok=(0, 1) if hostile else (0,))
    assert hostile or "failed" not in q.stdout + q.stderr, q.stdout + q.stderr
    d = db("io", "-f", "qcow2", *args, ours)
    assert "failed" not in d.stdout + d.stderr, d.stdout + d.stderr
    return ref, ours


def check(path: Path) -> tuple[int, int] | None:
    """(corruptions, leaks) of ``qemu-img check``; None when it cannot even open the image."""
    proc = sh("qemu-img", "check", "--output=json", path, ok=(0, 1, 2, 3))
    try:
        res = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None
    return int(res.get("corruptions", 0)), int(res.get("leaks", 0))


def qmap(path: Path) -> list[dict[str, object]]:
    return list(json.loads(sh("qemu-img", "map", "--output=json", path).stdout))


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def u64(path: Path, offset: int) -> int:
    with path.open("rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def put_u64(path: Path, offset: int, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def l2_slot(path: Path, guest_cluster: int) -> int:
    """File offset of the L2 entry of a guest cluster (64 KiB clusters, first L2 table)."""
    h = HeaderCluster.unpack(path.read_bytes()[:CS]).header
    return (u64(path, h.l1_table_offset) & L1E_OFFSET_MASK) + 8 * guest_cluster


def refcount_slot(path: Path, cluster: int) -> tuple[int, int, int]:
    """(refcount block offset, index, order) of a host cluster (first refcount block)."""
    h = HeaderCluster.unpack(path.read_bytes()[:CS]).header
    return u64(path, h.refcount_table_offset) & REFT_OFFSET_MASK, cluster, h.refcount_order


def refcount(path: Path, cluster: int) -> int:
    block, i, order = refcount_slot(path, cluster)
    with path.open("rb") as f:
        f.seek(block)
        return get_refcount(f.read(CS), i, order)


def set_refcount_of(path: Path, cluster: int, value: int) -> None:
    block, i, order = refcount_slot(path, cluster)
    with path.open("r+b") as f:
        f.seek(block)
        blk = bytearray(f.read(CS))
        set_refcount(blk, i, order, value)
        f.seek(block)
        f.write(blk)


# --------------------------------------------------------------------------- discard
@pytest.mark.parametrize("cluster_size", ["64k", "4k"])
@pytest.mark.parametrize("release", ["discard 0 1M", "write -z -u 0 1M"])
def test_released_clusters_give_their_space_back(tmp_path: Path, release: str,
                                                 cluster_size: str) -> None:
    """The engine used to keep a discarded 1 MiB in the file, readable (1284 KiB allocated
    against qemu-io's 260 KiB with 64 KiB clusters)."""
    src = create(tmp_path / "src.qcow2", "64M", "-o", f"cluster_size={cluster_size}")
    ref, ours = both(src, "write -P 0x5a 0 1M", release)
    assert allocated(ours) <= allocated(ref), (
        f"{release}: {allocated(ours) // KiB} KiB allocated, qemu-io {allocated(ref) // KiB} KiB")
    assert b"\x5a" * 512 not in ours.read_bytes(), "the discarded data is still in the file"
    assert check(ours) == (0, 0)
    assert qmap(ours) == qmap(ref)
    sh("qemu-img", "compare", ref, ours)


def test_discard_of_a_shared_cluster_punches_nothing(tmp_path: Path) -> None:
    """Two guest clusters share a host cluster (refcount 2): discarding one leaves the data of
    the other in place, as in QEMU (the punch happens only at refcount 0)."""
    src = create(tmp_path / "src.qcow2")
    sh("qemu-io", "-c", "write -P 0x5a 0 64k", src)
    host = u64(src, l2_slot(src, 0)) & L2E_OFFSET_MASK
    put_u64(src, l2_slot(src, 0), host)  # no COPIED: refcount 2
    put_u64(src, l2_slot(src, 1), host)
    set_refcount_of(src, host // CS, 2)
    assert check(src) == (0, 0)
    ref, ours = both(src, "discard 0 64k", "read -P 0x5a 64k 64k")
    assert allocated(ours) == allocated(ref)
    with ours.open("rb") as f:
        f.seek(host)
        assert f.read(CS) == b"\x5a" * CS
    assert refcount(ours, host // CS) == refcount(ref, host // CS) == 1
    assert check(ours) == check(ref)


def test_discard_gives_data_file_space_back(tmp_path: Path) -> None:
    """With an external data file QEMU discards the range there at once (nothing is
    refcounted; guest offsets map 1:1)."""
    cmds = ["write -P 0x5a 0 1M", "discard 0 512k", "write -z -u 512k 256k"]
    for tool in ("qemu", "ours"):
        create(tmp_path / f"{tool}.qcow2", "4M", "-o", f"data_file={tmp_path / tool}.data")
    args = [a for c in cmds for a in ("-c", c)]
    sh("qemu-io", *args, tmp_path / "qemu.qcow2")
    db("io", *args, tmp_path / "ours.qcow2")
    assert allocated(tmp_path / "ours.data") <= allocated(tmp_path / "qemu.data")
    assert allocated(tmp_path / "ours.data") < 1024 * KiB
    assert qmap(tmp_path / "ours.qcow2") == qmap(tmp_path / "qemu.qcow2")
    assert check(tmp_path / "ours.qcow2") == (0, 0)
    sh("qemu-img", "compare", tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2")


# --------------------------------------------------------------------------- zero, allocated
ZERO_ALLOC_CASES = {
    # write -z keeps the allocation (zero flag + host offset); the writes go there, and one
    # crosses from one such cluster into the next
    "zero-keeps-allocation": ["write -P 1 0 128k", "write -z 0 128k", "write -P 2 4k 4k",
                              "write -P 3 60k 8k", "read -P 0 0 4k", "read -P 0 68k 60k"],
    "whole-cluster": ["write -P 1 0 64k", "write -z 0 64k", "write -P 2 0 64k"],
    # write -z -u frees it; once the free is flushed the next write reuses it
    "unmap-then-flush": ["write -P 1 0 64k", "write -z -u 0 64k", "flush", "write -P 2 0 4k"],
}


@pytest.mark.parametrize("name", ZERO_ALLOC_CASES)
def test_preallocated_zero_cluster_is_written_in_place(tmp_path: Path, name: str) -> None:
    """The engine used to give the write a new cluster at the end of the file and free the
    preallocated one: a different layout, and a refcount too low when it was shared."""
    src = create(tmp_path / "src.qcow2")
    ref, ours = both(src, *ZERO_ALLOC_CASES[name])
    assert ours.stat().st_size == ref.stat().st_size
    assert qmap(ours) == qmap(ref)
    sh("qemu-img", "compare", ref, ours)
    assert check(ours) == (0, 0)


def test_shared_preallocated_zero_cluster_keeps_a_refcount(tmp_path: Path) -> None:
    """A zero cluster shared by two entries (no COPIED, refcount 2) cannot be written in
    place: the write takes a new cluster and the shared one goes from 2 to 1, not to 0."""
    src = create(tmp_path / "src.qcow2")
    sh("qemu-io", "-c", "write -P 0x5a 0 64k", src)
    host = u64(src, l2_slot(src, 0)) & L2E_OFFSET_MASK
    put_u64(src, l2_slot(src, 0), host | OFLAG_ZERO)
    put_u64(src, l2_slot(src, 1), host | OFLAG_ZERO)
    set_refcount_of(src, host // CS, 2)
    assert check(src) == (0, 0)
    ref, ours = both(src, "write -P 7 0 4k")
    assert refcount(ours, host // CS) == refcount(ref, host // CS) == 1
    assert u64(ours, l2_slot(ours, 1)) == host | OFLAG_ZERO
    assert qmap(ours) == qmap(ref)
    assert check(ours) == check(ref)
    sh("qemu-img", "compare", ref, ours)


# --------------------------------------------------------------------------- compressed garbage
def hostile_base(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """1 MiB, 64 KiB clusters, a persistent bitmap, data at guest 0 and 128k; the host
    offsets of the structures a garbage descriptor may point at."""
    src = create(tmp_path / "base.qcow2")
    sh("qemu-img", "bitmap", "--add", src, "b0")
    sh("qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 128k 64k", src)
    h = HeaderCluster.unpack(src.read_bytes()[:CS]).header
    where = {
        "header": 0,
        "refcount-table": h.refcount_table_offset,
        "refcount-block": u64(src, h.refcount_table_offset) & REFT_OFFSET_MASK,
        "l1-table": h.l1_table_offset,
        "l2-table": l2_slot(src, 0) & ~(CS - 1),
        "guest-data": u64(src, l2_slot(src, 0)) & L2E_OFFSET_MASK,
        "past-eof": src.stat().st_size + 4 * CS,
    }
    return src, where


@pytest.mark.parametrize("sectors", [1, 256])  # one sector, or the 128 KiB maximum
@pytest.mark.parametrize("target", ["guest-data", "l2-table", "refcount-block",
                                    "refcount-table", "l1-table", "header", "past-eof"])
def test_write_over_garbage_compressed_entry(tmp_path: Path, target: str,
                                             sectors: int) -> None:
    """A compressed L2 entry whose descriptor points at another guest cluster's data, at
    metadata or past the end of the file. QEMU frees that byte range when a write replaces
    the entry; the engine did too (guest-data, 256 sectors: 4 check errors where qemu-io
    leaves 2, which it owes to its bitmap reusing the freed clusters over guest data). Now
    the range is not freed: the write leaves an image with no errors at all."""
    src, where = hostile_base(tmp_path)
    put_u64(src, l2_slot(src, 1), encode_compressed(where[target], sectors, 16))
    before = check(src)
    assert before is not None and before[0] >= 1
    ref, ours = both(src, "write -P 0x33 64k 64k", hostile=True)
    theirs, mine = check(ref), check(ours)
    assert mine is not None
    assert theirs is None or mine[0] <= theirs[0], f"qemu-io: {theirs}, dirtybits: {mine}"
    assert mine == (0, 0), f"before: {before}, qemu-io: {theirs}, dirtybits: {mine}"
    # the other guest clusters kept their data
    sh("qemu-io", "-r", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x33 64k 64k",
       "-c", "read -P 0x22 128k 64k", ours)


@pytest.mark.parametrize("cluster_size", ["64k", "4k"])
def test_overwritten_compressed_clusters_are_freed(tmp_path: Path, cluster_size: str) -> None:
    """The garbage checks must not keep real compressed clusters from being freed (that
    would leak them): full-cluster writes over half of a compressed image and a discard of
    the other half leave no leak, as with qemu-io, and give the space back."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"".join(bytes([i % 251]) * 3000 + bytes(range(256)) * 4
                             for i in range(512 * KiB // 4024 + 1))[:512 * KiB])
    src = tmp_path / "src.qcow2"
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
       f"cluster_size={cluster_size}", raw, src)
    assert "compressed" in sh("qemu-img", "check", src).stdout
    ref, ours = both(src, "write -P 0x33 0 256k", "discard 256k 256k")
    assert check(ours) == check(ref) == (0, 0)
    assert allocated(ours) <= allocated(ref)
    sh("qemu-img", "compare", ref, ours)
