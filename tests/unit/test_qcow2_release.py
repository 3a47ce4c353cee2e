"""When the engine gives host clusters back: the order that keeps a crash harmless.

A discarded cluster is punched out of the file only once no L2 entry on disk names it and
before anything can allocate it again; a preallocated zero cluster is written in place and
keeps its zero flag on disk until the data under it is written. Each test reads the file's
own bytes (what a crash at that moment would leave), not the engine's caches.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from dirtybits.format.qcow2 import refcount as rc
from dirtybits.format.qcow2.header import HeaderCluster
from dirtybits.format.qcow2.tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
)
from dirtybits.qcow2 import image as image_module
from dirtybits.qcow2.image import Qcow2Image

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB


def on_disk(path: Path) -> tuple[list[int], dict[int, int]]:
    """(every active L2 entry, refcount of every host cluster) as the file holds them."""
    raw = path.read_bytes()
    h = HeaderCluster.unpack(raw).header
    cs = h.cluster_size
    entries: list[int] = []
    for ent in struct.unpack_from(f">{h.l1_size}Q", raw, h.l1_table_offset):
        if ent & L1E_OFFSET_MASK:
            entries += struct.unpack_from(f">{cs // 8}Q", raw, ent & L1E_OFFSET_MASK)
    per_block = cs * 8 >> h.refcount_order
    counts: dict[int, int] = {}
    table = struct.unpack_from(f">{h.refcount_table_clusters * cs // 8}Q", raw,
                               h.refcount_table_offset)
    for g, ent in enumerate(table):
        block = ent & REFT_OFFSET_MASK
        if block:
            blk = raw[block:block + cs]
            for i in range(per_block):
                n = rc.get_refcount(blk, i, h.refcount_order)
                if n:
                    counts[g * per_block + i] = n
    return entries, counts


def assert_no_entry_names_a_free_cluster(path: Path) -> None:
    entries, counts = on_disk(path)
    named = {(e & L2E_OFFSET_MASK) // CS for e in entries
             if e & L2E_OFFSET_MASK and not e & OFLAG_COMPRESSED}
    free = sorted(c for c in named if not counts.get(c))
    assert not free, f"L2 entries on disk name free host clusters {free}"


def host_of(img: Qcow2Image, offset: int) -> int:
    ext = next(iter(img.block_status(offset, CS)))
    assert ext.offset is not None
    return ext.offset


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def test_discard_punches_at_flush_after_the_entries(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    Qcow2Image.create(str(path), 4 * MiB)
    with Qcow2Image.open(str(path)) as img:
        img.write(0, b"\x5a" * (4 * CS))
        img.flush()
        hosts = [host_of(img, i * CS) for i in range(4)]
        blocks = path.stat().st_blocks
        img.discard(0, 4 * CS)
        # not durable yet: the L2 entries on disk still name the clusters, which keep data
        assert all(file_bytes(path, h, CS) == b"\x5a" * CS for h in hosts)
        assert path.stat().st_blocks == blocks
        img.flush()
        assert all(file_bytes(path, h, CS) == bytes(CS) for h in hosts)
        assert path.stat().st_blocks <= blocks - 4 * CS // 512
        assert_no_entry_names_a_free_cluster(path)


def test_punched_cluster_reused_keeps_the_new_data(tmp_path: Path) -> None:
    """The punch comes before the cluster can be allocated again, never after."""
    path = tmp_path / "r.qcow2"
    Qcow2Image.create(str(path), 4 * MiB)
    with Qcow2Image.open(str(path)) as img:
        img.write(0, b"\x5a" * CS)
        img.flush()
        host = host_of(img, 0)
        img.discard(0, CS)
        img.write(2 * CS, b"\x01" * CS)  # the free is still pending: a new cluster
        assert host_of(img, 2 * CS) != host
        img.flush()
        img.write(3 * CS, b"\x02" * CS)  # the freed and punched cluster, reused
        assert host_of(img, 3 * CS) == host
    with Qcow2Image.open(str(path), readonly=True) as img:
        assert img.read(2 * CS, 2 * CS) == b"\x01" * CS + b"\x02" * CS
    assert file_bytes(path, host, CS) == b"\x02" * CS


@pytest.mark.parametrize("how", ["discard", "zero-unmap"])
def test_frees_flushed_midway_write_the_table_first(tmp_path: Path, monkeypatch:
                                                    pytest.MonkeyPatch, how: str) -> None:
    """Too many queued frees flush in the middle of a discard: the L2 table that stopped
    naming the clusters must reach the disk before their refcounts drop (it used to be
    marked dirty only after the loop, so the flush freed clusters the disk still named)."""
    monkeypatch.setattr(image_module, "MAX_PENDING_FREES", 2)
    path = tmp_path / "m.qcow2"
    Qcow2Image.create(str(path), 4 * MiB)
    with Qcow2Image.open(str(path)) as img:
        img.write(0, b"\x5a" * (8 * CS))
        img.flush()
        if how == "discard":
            img.discard(0, 8 * CS)
        else:
            img.write_zeroes(0, 8 * CS, unmap=True)
        # a crash now: whatever the midway flushes freed is named by no entry on disk
        assert_no_entry_names_a_free_cluster(path)
        assert img.read(0, 8 * CS) == bytes(8 * CS)
    assert_no_entry_names_a_free_cluster(path)


def test_zero_cluster_written_in_place_keeps_its_flag_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "z.qcow2"
    Qcow2Image.create(str(path), 1 * MiB)
    with Qcow2Image.open(str(path)) as img:
        img.write(0, b"\x5a" * CS)
        img.write_zeroes(0, CS)  # keeps the allocation: zero flag + host offset
        img.flush()
        host = host_of(img, 0)
        entries, _ = on_disk(path)
        assert entries[0] == host | OFLAG_COPIED | OFLAG_ZERO
        size = os.path.getsize(path)
        img.write(4 * KiB, b"\x07" * 100)
        assert img.read(0, CS) == bytes(4 * KiB) + b"\x07" * 100 + bytes(CS - 4 * KiB - 100)
        # the data and the zeros around it are in the cluster; the entry on disk still says
        # zero, so a crash now reads zeros (the write was not flushed), never stale bytes
        assert file_bytes(path, host, CS) == img.read(0, CS)
        assert on_disk(path)[0][0] == host | OFLAG_COPIED | OFLAG_ZERO
        img.flush()
        assert on_disk(path)[0][0] == host | OFLAG_COPIED
        assert os.path.getsize(path) == size
