"""Resilient mode: the write-intent map record, its protocol, and recovery after a crash.

A "crash" here is a byte copy of the image taken while a node is still open: the copy holds
exactly what the kernel has (every write issued), and nothing the node would do later.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dirtybits
from dirtybits.block import write_intent
from dirtybits.block.checkpoint import CheckpointPolicy
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.block.write_intent import MARK_AHEAD
from dirtybits.errors import FormatError
from dirtybits.format.qcow2.write_intent import (
    SECTOR,
    WriteIntentExtension,
    default_region_bits,
)
from dirtybits.qcow2.image import Qcow2Image

MiB = 1 << 20
NO_TIMERS = CheckpointPolicy(interval=None, idle=None, threshold_bits=None)


def make(path: Path, size: int = 64 * MiB, region: int | None = MiB,
         bitmaps: tuple[tuple[str, int], ...] = (("a", 65536), ("b", 512))) -> str:
    Qcow2Image.create(str(path), size)
    with Qcow2Image.open(str(path), keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        for name, gran in bitmaps:
            store.add(name, gran)
        if region is not None:
            write_intent.enable(img, region)
    return str(path)


def state(path: str) -> tuple[dict[str, bool], WriteIntentExtension | None, bool]:
    with Qcow2Image.open(path, readonly=True, force_share=True) as img:
        flags = {sb.name: sb.in_use for sb in Qcow2BitmapStore(img).bitmaps}
        return flags, write_intent.describe(img), write_intent.is_valid(img)


def granules(path: str, name: str) -> set[int]:
    with Qcow2Image.open(path, readonly=True, force_share=True) as img:
        bm = Qcow2BitmapStore(img).load(name)
    g = bm.granularity
    return {s // g + i for s, n in bm.dirty_extents(0, bm.size) for i in range(-(-n // g))}


def crash_copy(path: str, dst: Path) -> str:
    shutil.copyfile(path, dst)
    return str(dst)


def test_record_round_trip_and_alignment() -> None:
    for data_off in (112, 600, 1024, 4000):
        rec = WriteIntentExtension.new(16 << 40, 29, data_off, excluded=(0x50000, 0x70000))
        assert (data_off + rec.map_start) % SECTOR == 0
        assert len(rec.map) % SECTOR == 0 and rec.nb_regions == 1 << 15
        assert WriteIntentExtension.unpack(rec.pack()) == rec
    assert default_region_bits(1 << 30) == 24  # 1 GiB: 16 MiB regions
    assert default_region_bits(16 << 40) == 29  # 16 TiB: 512 MiB regions, a 4 KiB map
    good = WriteIntentExtension.new(1 << 30, 20, 112).pack()
    for bad in (good[:10], b"\0\0\0\2" + good[4:], good[:-1], good[:4] + b"\0\0\0\1" + good[8:]):
        with pytest.raises(FormatError):
            WriteIntentExtension.unpack(bad)


def test_enable_is_off_until_the_first_tracked_write(tmp_path: Path) -> None:
    path = make(tmp_path / "d.qcow2")
    flags, rec, valid = state(path)
    assert rec is not None and rec.regions() == [] and not valid
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        disk.write(5 * MiB + 100, b"x" * 10)
        flags, rec, valid = state(path)
        assert valid and flags == {"a": True, "b": True}
        assert rec is not None and rec.regions() == [5]  # durable before the write returned
        disk.checkpoint()
        disk.write(9 * MiB, b"y")
        assert state(path)[1].regions() == [5, 9]  # type: ignore[union-attr]
        disk.checkpoint()  # 5 was not written since the last checkpoint: cleared lazily
        assert state(path)[1].regions() == [9]  # type: ignore[union-attr]
    flags, rec, valid = state(path)
    assert valid and flags == {"a": False, "b": False}


def test_crash_is_recovered_as_a_superset(tmp_path: Path) -> None:
    path = make(tmp_path / "d.qcow2")
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        disk.write(0, b"1" * 4096)
        disk.checkpoint()
        disk.write(7 * MiB + 65536, b"2" * 512)
        disk.write(40 * MiB - 1, b"3" * 2)  # straddles regions 39 and 40
        crashed = crash_copy(path, tmp_path / "crashed.qcow2")
    flags, _rec, valid = state(crashed)
    assert flags == {"a": True, "b": True} and valid
    with dirtybits.open(crashed, checkpoint=NO_TIMERS) as disk:
        assert sorted(disk.recovered) == ["a", "b"]
    assert state(crashed)[0] == {"a": False, "b": False}
    truth_b = {0, *range(8), (7 * MiB + 65536) // 512, (40 * MiB - 1) // 512,
               40 * MiB // 512}
    got_b = granules(crashed, "b")
    assert truth_b <= got_b
    # bounded by the marked regions: 7, 39, 40 and the regions 40 marked ahead of itself (it
    # continued a run), and 0 (written in the previous epoch, so still marked: hot regions are
    # cleared one checkpoint late)
    marked = (0, 7, 39, *range(40, 40 + MARK_AHEAD))
    allowed = {g for r in marked for g in range(r * 2048, (r + 1) * 2048)}
    assert got_b <= allowed
    assert {0, (7 * MiB + 65536) // 65536, (40 * MiB - 1) // 65536} <= granules(crashed, "a")


def test_bitmap_inconsistent_before_the_epoch_is_not_recovered(tmp_path: Path) -> None:
    path = make(tmp_path / "d.qcow2")
    with dirtybits.open(path, bitmaps="no") as disk:  # a, b miss this write: in_use
        disk.write(0, b"x")
    assert state(path)[0] == {"a": True, "b": True}
    assert not state(path)[2]  # the untracked write invalidated nothing valid yet
    with Qcow2Image.open(path, keep_bitmaps=True) as img:
        Qcow2BitmapStore(img).add("c", 65536)
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        assert disk.recovered == []
        disk.write(MiB, b"y")
        crashed = crash_copy(path, tmp_path / "crashed.qcow2")
    rec = state(crashed)[1]
    assert rec is not None and len(rec.excluded) == 2
    with dirtybits.open(crashed, checkpoint=NO_TIMERS) as disk:
        assert disk.recovered == ["c"]
    assert state(crashed)[0] == {"a": True, "b": True, "c": False}


def test_untracked_writes_invalidate_the_map(tmp_path: Path) -> None:
    path = make(tmp_path / "d.qcow2")
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        disk.write(0, b"x")
    assert state(path)[2]
    with dirtybits.open(path, bitmaps="no") as disk:
        assert state(path)[2]  # opening alone changes nothing
        disk.write(MiB, b"y")
        assert not state(path)[2]
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        assert disk.recovered == []  # a and b stay inconsistent: they missed the write


def test_enable_refuses_what_does_not_fit(tmp_path: Path) -> None:
    Qcow2Image.create(str(tmp_path / "small.qcow2"), 1 << 40, cluster_size=4096)
    with Qcow2Image.open(str(tmp_path / "small.qcow2"), keep_bitmaps=True) as img, \
            pytest.raises(write_intent.ResilientModeError, match="does not fit"):
        write_intent.enable(img, 1 << 20)  # 2^20 regions: a 128 KiB map
    with Qcow2Image.open(str(tmp_path / "small.qcow2"), keep_bitmaps=True) as img:
        write_intent.enable(img, 1 << 30)  # 1024 regions fit a 4 KiB header cluster
        with pytest.raises(write_intent.ResilientModeError, match="power of two"):
            write_intent.enable(img, 3 << 20)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "checkpoint", "crash"]),
                          st.integers(0, 16 * MiB - 1), st.integers(1, 200_000)),
                min_size=1, max_size=20))
def test_recovery_is_always_a_superset(tmp_path_factory: pytest.TempPathFactory,
                                       ops: list[tuple[str, int, int]]) -> None:
    """Crash anywhere: every granule written since the bitmaps were made is in the recovered
    bitmap, and nothing outside the written granules' regions is."""
    d = tmp_path_factory.mktemp("wi")
    path = make(d / "d.qcow2", 16 * MiB, region=1 << 16, bitmaps=(("g", 512),))
    written: list[tuple[int, int]] = []
    crashed = None
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        for op, off, n in ops:
            n = min(n, 16 * MiB - off)
            if op == "write":
                disk.write(off, b"w" * n)
                written.append((off, n))
            elif op == "checkpoint":
                disk.checkpoint()
            else:
                crashed = crash_copy(path, d / "crashed.qcow2")
                break
    target = crashed or path
    with dirtybits.open(target, checkpoint=NO_TIMERS):
        pass
    assert state(target)[0] == {"g": False}
    got = granules(target, "g")
    truth = {g for off, n in written for g in range(off // 512, (off + n - 1) // 512 + 1)}
    # written regions, and those a sequential run marked ahead of itself
    regions = {g for off, n in written
               for r in range(off >> 16, ((off + n - 1) >> 16) + MARK_AHEAD)
               for g in range(r * 128, (r + 1) * 128)}
    assert truth <= got <= regions


def test_sequential_writes_mark_ahead(tmp_path: Path) -> None:
    """A stream pays one sync per MARK_AHEAD regions, not one per region."""
    path = make(tmp_path / "d.qcow2", 64 * MiB, region=1 << 16, bitmaps=(("g", 65536),))
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        assert disk.intent is not None
        for off in range(0, 4 * MiB, 65536):
            disk.write(off, b"s" * 65536)
        syncs = disk.intent.syncs
        assert syncs <= 64 // MARK_AHEAD + 2, syncs
        disk.write(40 * MiB, b"r")  # not a continuation: marks its own region only
        regions = state(path)[1].regions()  # type: ignore[union-attr]
    assert 40 * 16 in regions and 40 * 16 + 1 not in regions
