"""The block layer's persistence protocol: in_use before the first write, checkpoints that
write only changed clusters, the policies, bitmaps=no, failures, lazy loading."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dirtybits
from dirtybits.block.checkpoint import CheckpointPolicy
from dirtybits.block.node import BlockNode
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.errors import ImageError, ImageIOError, UsageError
from dirtybits.format.qcow2.bitmaps import BitmapDirectory, BitmapsExtension
from dirtybits.format.qcow2.header import EXT_BITMAPS, HeaderCluster
from dirtybits.qcow2.image import Qcow2Image

MiB = 1 << 20
NO_TIMERS = CheckpointPolicy(interval=None, idle=None, threshold_bits=None)


def make_image(path: Path, size: int = 64 * MiB, *, cluster_size: int = 65536,
               bitmaps: tuple[tuple[str, int, bool], ...] = (("a", 65536, True),
                                                             ("b", 4096, True),
                                                             ("off", 65536, False))) -> str:
    Qcow2Image.create(str(path), size, cluster_size=cluster_size)
    with Qcow2Image.open(str(path), keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        for name, gran, enabled in bitmaps:
            store.add(name, gran, disabled=not enabled)
    return str(path)


def disk_flags(path: str) -> dict[str, bool]:
    """in_use per bitmap, read from the file with no engine state: what a crash would leave."""
    raw = Path(path).read_bytes()
    hc = HeaderCluster.unpack(raw[:65536])
    ext = hc.extension(EXT_BITMAPS)
    assert ext is not None
    bext = BitmapsExtension.unpack(ext.data)
    off = bext.bitmap_directory_offset
    d = BitmapDirectory.unpack(raw[off:off + bext.bitmap_directory_size], bext.nb_bitmaps)
    return {e.name: e.in_use for e in d.entries}


def stored_granules(path: str, name: str) -> set[int]:
    with Qcow2Image.open(path, readonly=True, force_share=True) as img:
        bm = Qcow2BitmapStore(img).load(name)
        return {s // bm.granularity + i
                for s, n in bm.dirty_extents(0, bm.size)
                for i in range(-(-n // bm.granularity))}


def granules(ranges: list[tuple[int, int]], gran: int) -> set[int]:
    return {g for off, n in ranges if n for g in range(off // gran, (off + n - 1) // gran + 1)}


def test_open_is_a_block_node_and_writes_nothing(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2")
    before = Path(path).read_bytes()
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        assert isinstance(disk, BlockNode)
        assert disk.tracked_bitmaps == ["a", "b"]
        disk.read(0, 4096)
    assert Path(path).read_bytes() == before  # no write: no in_use, no store, nothing at all


def test_in_use_is_on_disk_before_the_write_reaches_the_driver(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2")
    seen: list[dict[str, bool]] = []
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        real = disk.driver.write

        def spy(offset: int, data: bytes) -> None:
            seen.append(disk_flags(path))
            real(offset, data)

        disk.driver.write = spy  # type: ignore[method-assign]
        disk.write(0, b"x" * 4096)
        disk.checkpoint()
        assert disk_flags(path) == {"a": False, "b": False, "off": False}
        disk.write(MiB, b"y" * 512)
        disk.driver.write = real  # type: ignore[method-assign]
    assert seen == [{"a": True, "b": True, "off": False}] * 2  # disabled bitmaps untouched
    assert disk_flags(path) == {"a": False, "b": False, "off": False}
    assert stored_granules(path, "a") == {0, MiB // 65536}
    assert stored_granules(path, "b") == {0, MiB // 4096}
    assert stored_granules(path, "off") == set()


def test_checkpoint_writes_only_changed_clusters(tmp_path: Path) -> None:
    # 16 TiB at 64 KiB granularity: 32 MiB of bitmap data per bitmap, 512 clusters each
    path = make_image(tmp_path / "big.qcow2", 16 << 40,
                      bitmaps=tuple((f"b{i}", 65536, True) for i in range(8)))
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        disk.write(5 << 40, b"z" * 4096)
        disk.checkpoint()
        first = disk.stats.bitmap_bytes_written
        assert first <= 8 * (65536 + 4096)  # one new data cluster and one table per bitmap
        disk.write((5 << 40) + 65536, b"z" * 4096)  # same bitmap cluster: rewritten in place
        disk.write((5 << 40) + 65536, b"z" * 4096)
    assert disk.stats.bitmap_bytes_written - first == 8 * 4096  # one page per bitmap
    assert disk.stats.checkpoints == 2
    for i in range(8):
        assert stored_granules(path, f"b{i}") == {(5 << 40) // 65536, (5 << 40) // 65536 + 1}


def test_opening_reads_no_bitmap_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_image(tmp_path / "d.qcow2")
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        disk.write(0, b"1" * 65536)
    reads: list[str] = []
    real = Qcow2Image.read_metadata

    def spy(self: Qcow2Image, offset: int, length: int, what: str) -> bytes:
        reads.append(what)
        return real(self, offset, length, what)

    monkeypatch.setattr(Qcow2Image, "read_metadata", spy)
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        assert "bitmap data" not in reads
        disk.write(0, b"2" * 512)  # same granules as before: the stored cluster is merged
    assert stored_granules(path, "a") == {0}
    assert stored_granules(path, "b") == set(range(16))


def test_bitmaps_no_marks_enabled_bitmaps_inconsistent(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2")
    with dirtybits.open(path, bitmaps="no") as disk:
        assert disk.tracked_bitmaps == []
        assert disk_flags(path) == {"a": False, "b": False, "off": False}
        disk.write(0, b"x" * 4096)
        assert disk_flags(path) == {"a": True, "b": True, "off": False}
    assert disk_flags(path) == {"a": True, "b": True, "off": False}  # never cleared
    with pytest.raises(UsageError):
        dirtybits.open(path, bitmaps="maybe")


def test_in_use_bitmap_found_at_open_is_left_alone(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2")
    with dirtybits.open(path, bitmaps="no") as disk:
        disk.write(0, b"x" * 4096)  # a and b are now inconsistent
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        assert disk.tracked_bitmaps == []
        disk.write(MiB, b"x" * 4096)
    assert disk_flags(path) == {"a": True, "b": True, "off": False}
    with Qcow2Image.open(path, readonly=True, force_share=True) as img, pytest.raises(Exception,
                                                                     match="inconsistent"):
        Qcow2BitmapStore(img).load("a")


def test_threshold_checkpoints_after_the_crossing_write(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2", bitmaps=(("a", 65536, True),))
    policy = CheckpointPolicy(interval=None, idle=None, threshold_bits=10)
    with dirtybits.open(path, checkpoint=policy) as disk:
        disk.write(0, b"x" * (9 * 65536))
        assert disk.stats.checkpoints == 0
        assert disk_flags(path) == {"a": True}
        disk.write(9 * 65536, b"x" * 65536)  # the 10th new granule
        assert disk.stats.checkpoints == 1
        assert disk_flags(path) == {"a": False}
        assert stored_granules(path, "a") == set(range(10))
        disk.write(0, b"y" * 65536)  # no new granule: in use again, no new checkpoint
        assert disk.stats.checkpoints == 1 and disk_flags(path) == {"a": True}


def test_idle_timer_checkpoints_in_a_lull(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2", bitmaps=(("a", 65536, True),))
    policy = CheckpointPolicy(interval=None, idle=0.05, threshold_bits=None)
    with dirtybits.open(path, checkpoint=policy) as disk:
        disk.write(0, b"x" * 4096)
        deadline = time.monotonic() + 10
        while disk.stats.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert disk.stats.checkpoints == 1
        assert disk_flags(path) == {"a": False}
        assert stored_granules(path, "a") == {0}


def test_interval_timer_checkpoints_under_steady_writes(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2", bitmaps=(("a", 65536, True),))
    policy = CheckpointPolicy(interval=0.05, idle=None, threshold_bits=None)
    with dirtybits.open(path, checkpoint=policy) as disk:
        deadline = time.monotonic() + 10
        i = 0
        while disk.stats.checkpoints < 2 and time.monotonic() < deadline:
            disk.write((i % 512) * 65536, b"w" * 512)  # never idle
            i += 1
        assert disk.stats.checkpoints >= 2


def test_failed_checkpoint_keeps_in_use_and_retries(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_image(tmp_path / "d.qcow2", bitmaps=(("a", 65536, True),))
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        disk.write(0, b"x" * 4096)
        store = disk.store
        assert store is not None
        real = store.write_changes

        def broken(*args: object) -> int:
            raise ImageIOError("injected EIO")

        monkeypatch.setattr(store, "write_changes", broken)
        with pytest.raises(ImageIOError):
            disk.flush()
        assert disk_flags(path) == {"a": True}  # never looks consistent over a lost store
        monkeypatch.setattr(store, "write_changes", real)
        disk.flush()  # the changed chunks were handed back: the retry writes them
        assert disk_flags(path) == {"a": False}
    assert stored_granules(path, "a") == {0}


def test_failed_in_use_mark_stops_the_write(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_image(tmp_path / "d.qcow2", bitmaps=(("a", 65536, True),))
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        def broken(*args: object, **kwargs: object) -> None:
            raise ImageIOError("injected ENOSPC")

        assert disk.store is not None
        monkeypatch.setattr(disk.store, "set_in_use", broken)
        with pytest.raises(ImageIOError):
            disk.write(0, b"x" * 4096)
        monkeypatch.undo()
    assert Qcow2Image.open(path, readonly=True).read(0, 4096) == bytes(4096)


def test_load_bitmap_is_stored_plus_recorded(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2", bitmaps=(("a", 65536, True),))
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        disk.write(0, b"x")
        disk.checkpoint()
        disk.write(3 * 65536, b"x")
        bm = disk.load_bitmap("a")
        assert list(bm.dirty_extents(0, bm.size)) == [(0, 65536), (3 * 65536, 65536)]


def test_policy_parse() -> None:
    assert CheckpointPolicy.parse("interval=2,idle=off,threshold=100") == CheckpointPolicy(
        interval=2.0, idle=None, threshold_bits=100)
    assert CheckpointPolicy.parse("none") == NO_TIMERS
    for bad in ("interval", "speed=3", "idle=-1", "threshold=x", "threshold=0"):
        with pytest.raises(ValueError):
            CheckpointPolicy.parse(bad)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "zero", "discard", "checkpoint", "reopen"]),
                          st.integers(0, 8 * MiB - 1), st.integers(1, 300_000)),
                max_size=25),
       st.sampled_from([512, 65536]))
def test_stored_bits_equal_the_model(tmp_path_factory: pytest.TempPathFactory,
                                     ops: list[tuple[str, int, int]], cluster_size: int) -> None:
    """Any mix of requests, checkpoints and reopens: the stored bitmap is exactly the set of
    granules touched (the model), for two granularities, and qemu's rules hold at the end."""
    size = 8 * MiB
    path = make_image(tmp_path_factory.mktemp("m") / "d.qcow2", size,
                      cluster_size=cluster_size,
                      bitmaps=(("fine", 512, True), ("coarse", 1 << 20, True)))
    touched: list[tuple[int, int]] = []
    disk = dirtybits.open(path, checkpoint=NO_TIMERS)
    try:
        for op, off, n in ops:
            n = min(n, size - off)
            if op == "checkpoint":
                disk.checkpoint()
            elif op == "reopen":
                disk.close()
                disk = dirtybits.open(path, checkpoint=NO_TIMERS)
            else:
                touched.append((off, n))
                if op == "write":
                    disk.write(off, bytes([random.randrange(256)]) * n)
                elif op == "zero":
                    disk.write_zeroes(off, n)
                else:
                    disk.discard(off, n)
    finally:
        disk.close()
    assert disk_flags(path) == {"fine": False, "coarse": False}
    assert stored_granules(path, "fine") == granules(touched, 512)
    assert stored_granules(path, "coarse") == granules(touched, 1 << 20)


def test_directory_flags_field_offset() -> None:
    from dirtybits.block.qcow2_bitmaps import FLAGS_FIELD_OFFSET
    from dirtybits.format.qcow2.bitmaps import BitmapDirectoryEntry

    e = BitmapDirectoryEntry.new("x", granularity=65536, bitmap_table_offset=0x50000,
                                 bitmap_table_size=1, flags=0x2)
    raw = BitmapDirectory((e,)).pack()
    assert struct.unpack_from(">I", raw, FLAGS_FIELD_OFFSET)[0] == 0x2


def test_refused_request_marks_nothing(tmp_path: Path) -> None:
    path = make_image(tmp_path / "d.qcow2", bitmaps=(("a", 65536, True),))
    with dirtybits.open(path, checkpoint=NO_TIMERS) as disk:
        with pytest.raises(ImageError, match="outside the image"):
            disk.write(64 * MiB - 512, b"x" * 4096)  # past the end: the driver's error
        assert disk.stats.in_use_marks == 0
        assert disk.load_bitmap("a").count() == 0
    assert disk_flags(path) == {"a": False}
