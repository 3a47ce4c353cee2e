"""The bitmap registry: the defects of the old block layer (each fails on the code before the
registry), QEMU's states and texts, transactions, successors and change cursors."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

import dirtybits
from dirtybits.block.node import NodeEvent, NodeEventKind
from dirtybits.block.qcow2_bitmaps import BitmapOperationError, Qcow2BitmapStore
from dirtybits.block.registry import BitmapStatus, DiskState
from dirtybits.errors import ImageIOError
from dirtybits.qcow2.image import Qcow2Image

sys.path.insert(0, str(Path(__file__).parent))
from test_block_node import NO_TIMERS, disk_flags, make_image, stored_granules

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> str:
    return make_image(tmp_path / "d.qcow2", bitmaps=(("a", 65536, True),))


# ---------------------------------------------------------------------- the old defects
def test_bitmap_added_to_an_open_node_records_the_next_write(image: str) -> None:
    """Was a silent miss: the tracking plan was frozen at open, yet the new bitmap was
    stored in_use=0 (consistent) and empty."""
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.bitmaps.add("new", 65536, persistent=True)
        d.write(0, b"x" * 4096)
        assert d.bitmaps.extents("new") == [(0, 65536)]
    assert stored_granules(image, "new") == {0}
    assert disk_flags(image) == {"a": False, "new": False}


def test_extents_of_a_range_past_the_start(image: str) -> None:
    """Was: the range's end went where ``dirty_extents`` takes a length, so any range with
    ``2 * offset + length`` past the disk failed ("outside the bitmap") and the others were
    read too long (an NBD BLOCK_STATUS of a dirty-bitmap context away from offset 0)."""
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        size = d.size
        d.write(size - 65536, b"x" * 4096)
        d.write(2 * 65536, b"y" * 4096)
        half = size // 2
        assert d.bitmaps.extents("a", half, half) == [(size - 65536, 65536)]
        assert d.bitmaps.extents("a", 65536, 2 * 65536) == [(2 * 65536, 65536)]
        assert d.bitmaps.extents("a", 65536, 65536) == []
        assert d.bitmaps.extents("a", size - 65536, 10 * 65536) == [(size - 65536, 65536)]


def test_added_bitmap_is_in_use_while_writes_are_unstored(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.bitmaps.add("new", 65536, persistent=True)
        d.write(0, b"x" * 4096)
        assert disk_flags(image) == {"a": True, "new": True}


def test_a_clear_does_not_come_back(image: str) -> None:
    """Was: checkpoints ORed the bits recorded since open into the stored clusters, so a
    clear came back (QEMU holds only the write after the clear)."""
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x" * 4096)
        d.checkpoint()
        d.bitmaps.clear("a")
        assert d.load_bitmap("a").count() == 0
        d.write(65536, b"y" * 4096)
    assert stored_granules(image, "a") == {1}


def test_disable_and_enable_on_an_open_node(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        d.bitmaps.disable("a")
        d.write(65536, b"x")  # not recorded
        d.bitmaps.enable("a")
        d.write(2 * 65536, b"x")
        assert d.bitmaps.extents("a") == [(0, 65536), (2 * 65536, 65536)]
    assert stored_granules(image, "a") == {0, 2}


def test_disabled_state_is_stored(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.bitmaps.disable("a")
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        assert d.bitmaps.info("a").status is BitmapStatus.DISABLED
        d.write(0, b"x")
    assert stored_granules(image, "a") == set()


def test_read_only_node_reads_its_bitmaps(image: str) -> None:
    """Was: "not found" on a read-only node, so no read-only export of a bitmap."""
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(3 * 65536, b"x")
    with dirtybits.open(image, readonly=True) as ro:
        assert ro.load_bitmap("a").count() == 65536
        assert ro.bitmaps.extents("a") == [(3 * 65536, 65536)]
        info = ro.bitmaps.info("a")
        assert info.readonly and info.persistent and not info.busy
        with pytest.raises(BitmapOperationError,
                           match="Bitmap 'a' is readonly and cannot be modified"):
            ro.bitmaps.clear("a")
        ro.bitmaps.disable("a")  # QEMU allows enable/disable on a read-only node
        with pytest.raises(BitmapOperationError, match="read-only"):
            ro.bitmaps.add("p", persistent=True)
        ro.bitmaps.add("t")  # a transient bitmap is fine
    assert disk_flags(image) == {"a": False}


def test_a_loaded_bitmap_is_not_read_again(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        calls = []
        assert d.store is not None
        real = d.store.load
        monkeypatch.setattr(d.store, "load", lambda n: calls.append(n) or real(n))
        first = d.bitmaps.sha256("a")
        d.bitmaps.count("a")
        d.bitmaps.extents("a")
        d.write(65536, b"x")  # recorded into the loaded bits
        assert d.bitmaps.sha256("a") != first
        assert calls == ["a"]
        assert d.bitmaps.extents("a") == [(0, 2 * 65536)]


# ---------------------------------------------------------------------- QEMU's rules
def test_extents_of_a_window(image: str) -> None:
    """The dirty runs within [offset, offset+length): a window in the disk's second half
    (was: the end passed as a length, out of range there: the NBD server's block status
    failed with EIO past half the disk, and returned runs past the window before it)."""
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        for off in (MiB, 40 * MiB, 50 * MiB):
            d.write(off, b"x" * 4096)
        assert d.bitmaps.extents("a", 40 * MiB, 8 * MiB) == [(40 * MiB, 65536)]
        assert d.bitmaps.extents("a", 0, 2 * MiB) == [(MiB, 65536)]
        assert d.bitmaps.extents("a", 45 * MiB) == [(50 * MiB, 65536)]
        assert d.bitmaps.extents("a", 64 * MiB, MiB) == []


def test_transient_bitmaps_are_not_stored(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.bitmaps.add("t", 4096)
        d.write(8192, b"x")
        assert d.bitmaps.extents("t") == [(8192, 4096)]
        assert d.bitmaps.info("t").disk_state is DiskState.NONE
        assert [i.name for i in d.bitmaps.query()] == ["t", "a"]  # newest first, as QEMU
    with Qcow2Image.open(image, readonly=True) as img:
        assert [sb.name for sb in Qcow2BitmapStore(img).bitmaps] == ["a"]


def test_raw_node_has_transient_bitmaps_only(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(MiB))
    with dirtybits.open(str(raw), checkpoint=NO_TIMERS) as d:
        d.bitmaps.add("t")
        assert d.bitmaps.info("t").granularity == 65536
        d.write(0, b"x")
        assert d.bitmaps.count("t") == 65536
        with pytest.raises(BitmapOperationError, match=r"Can't store persistent bitmaps to d\.raw"):
            d.bitmaps.add("p", persistent=True)


@pytest.mark.parametrize("args, text", [
    (("", None), "Bitmap name cannot be empty"),
    (("x", 1000), "Granularity must be power of 2 and at least 512"),
    (("a", None), "Bitmap already exists: a"),
])
def test_add_errors_as_qemu(image: str, args: tuple[str, int | None], text: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d, \
            pytest.raises(BitmapOperationError, match=text):
        d.bitmaps.add(*args)


def test_busy_bitmap_refuses_changes_with_qemus_text(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.bitmaps.set_busy("a", "export exp0")
        info = d.bitmaps.info("a")
        assert info.busy and info.owner == "export exp0" and info.status is BitmapStatus.LOCKED
        busy = "Bitmap 'a' is currently in use by another operation and cannot be used"
        for op in (d.bitmaps.clear, d.bitmaps.remove, d.bitmaps.disable):
            with pytest.raises(BitmapOperationError, match=busy):
                op("a")
        d.bitmaps.add("b")
        with pytest.raises(BitmapOperationError, match=busy):
            d.bitmaps.merge("b", ["a"])
        d.bitmaps.sha256("a")  # queries work on busy bitmaps
        d.bitmaps.set_busy("a", None)
        d.bitmaps.clear("a")


def test_inconsistent_bitmap_only_removed(image: str) -> None:
    with Qcow2Image.open(image, keep_bitmaps=True) as img:
        Qcow2BitmapStore(img).set_in_use(["a"], True)  # a crash left it in use
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        info = d.bitmaps.info("a")
        assert info.inconsistent and info.count == 0 and not info.recording
        assert info.disk_state is DiskState.INCONSISTENT and "not closed cleanly" in info.reason
        assert info.qmp()["inconsistent"] is True
        with pytest.raises(BitmapOperationError, match="Bitmap 'a' is inconsistent"):
            d.bitmaps.clear("a")
        with pytest.raises(BitmapOperationError, match="Bitmap 'a' is inconsistent"):
            d.bitmaps.enable("a")
        d.write(0, b"x")
        d.bitmaps.remove("a")
    with Qcow2Image.open(image, readonly=True) as img:
        assert Qcow2BitmapStore(img).bitmaps == []


def test_merge_across_granularities_and_nodes(tmp_path: Path) -> None:
    p1 = make_image(tmp_path / "1.qcow2", bitmaps=(("fine", 4096, True),))
    p2 = make_image(tmp_path / "2.qcow2", bitmaps=(("coarse", 1 << 20, True),))
    with dirtybits.open(p1, checkpoint=NO_TIMERS) as n1, \
            dirtybits.open(p2, checkpoint=NO_TIMERS) as n2:
        n1.write(5 * 4096, b"x")
        n2.bitmaps.merge("coarse", [(n1.bitmaps, "fine")])
        assert n2.bitmaps.extents("coarse") == [(0, MiB)]
        with pytest.raises(BitmapOperationError, match="At least one source"):
            n2.bitmaps.merge("coarse", [])
    assert stored_granules(p2, "coarse") == {0}


def test_copy_is_transient_unless_asked_and_rename_is_stored(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        d.bitmaps.copy("a", "c")
        d.bitmaps.copy("a", "p", persistent=True)
        assert not d.bitmaps.info("c").persistent and d.bitmaps.count("c") == 65536
        d.bitmaps.rename("p", "q")
        d.write(65536, b"x")
    assert stored_granules(image, "q") == {0, 1}
    assert sorted(disk_flags(image)) == ["a", "q"]


# ---------------------------------------------------------------------- transactions
def test_transaction_is_all_or_nothing(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        reg = d.bitmaps
        with pytest.raises(BitmapOperationError, match="Dirty bitmap 'nope' not found"):
            reg.transaction([reg.action_add("n", persistent=True), reg.action_clear("a"),
                             reg.action_clear("nope")])
        assert "n" not in reg and reg.count("a") == 65536
        reg.transaction([reg.action_add("n", persistent=True), reg.action_clear("a")])
        assert "n" in reg and reg.count("a") == 0
    assert sorted(disk_flags(image)) == ["a", "n"]
    assert stored_granules(image, "a") == set()


# ---------------------------------------------------------------------- successors, cursors
def test_successor_reclaim_keeps_every_bit(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        d.bitmaps.create_successor("a", "job backup0")
        assert d.bitmaps.info("a").status is BitmapStatus.FROZEN
        d.write(65536, b"x")  # during the job: the successor records it
        assert d.bitmaps.frozen_bits("a").count() == 65536
        d.checkpoint()  # stored meanwhile: the union, never less
        assert stored_granules(image, "a") == {0, 1}
        d.bitmaps.reclaim("a")  # the job failed
        assert d.bitmaps.extents("a") == [(0, 2 * 65536)]
        assert not d.bitmaps.info("a").busy


def test_successor_abdicate_keeps_only_writes_during_the_job(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        d.bitmaps.create_successor("a", "job backup0")
        d.write(65536, b"x")
        d.bitmaps.abdicate("a")  # the job succeeded
        assert d.bitmaps.extents("a") == [(65536, 65536)]
    assert stored_granules(image, "a") == {1}


def test_change_cursors_are_independent(tmp_path: Path) -> None:
    image = make_image(tmp_path / "c.qcow2", 512 * MiB, bitmaps=(("a", 512, True),))
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        mig = d.bitmaps.cursor("a")
        assert mig.take() == [0, 1]  # everything at first (two 64 KiB chunks of bits)
        d.write(512 * 8 * 65536, b"x")  # bit 2^19: serialized chunk 1
        d.checkpoint()  # the checkpoint writer takes its changes ...
        assert mig.take() == [1]  # ... and the migration cursor still has its own
        assert mig.take() == []


# ---------------------------------------------------------------------- events
def test_background_checkpoint_failure_is_an_event(image: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dirtybits.block.checkpoint import CheckpointPolicy

    events: list[NodeEvent] = []
    got = threading.Event()
    with dirtybits.open(image, checkpoint=CheckpointPolicy(interval=None, idle=0.05,
                                                           threshold_bits=None)) as d:
        d.subscribe(lambda e: (events.append(e), got.set()))
        assert d.store is not None

        def broken(*args: object) -> int:
            raise ImageIOError("injected EIO")

        monkeypatch.setattr(d.store, "write_changes", broken)
        d.write(0, b"x")
        assert got.wait(10)
        assert events[0].kind is NodeEventKind.CHECKPOINT_FAILED
        assert "injected EIO" in events[0].message
        d.write(65536, b"x")  # the next request is not hit by the background failure
        assert disk_flags(image) == {"a": True}
        monkeypatch.undo()
    assert disk_flags(image) == {"a": False}
    assert stored_granules(image, "a") == {0, 1}


@pytest.mark.parametrize("call", ["add", "merge", "clear", "count", "bits", "successor",
                                  "copy", "transaction", "checkpoint"])
def test_registry_calls_run_as_the_owner(image: str, call: str) -> None:
    """Was a silent miss: ``node.bitmaps.merge`` on a script's thread ran while the block
    thread ran a timed checkpoint; the checkpoint cleared in_use and forgot the mark the
    merge had just set, so the merged bits were never stored and the bitmap read consistent
    on disk without them. Every registry call now waits for the owner's lock."""
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        reg = d.bitmaps
        reg.add("t", 65536)
        d.write(0, b"x")
        calls = {
            "add": lambda: reg.add("n", 65536, persistent=True),
            "merge": lambda: reg.merge("a", ["t"]),
            "clear": lambda: reg.clear("a"),
            "count": lambda: reg.count("a"),
            "bits": lambda: reg.bits("a"),
            "successor": lambda: reg.create_successor("a", "job0"),
            "copy": lambda: reg.copy("a", "c", persistent=True),
            "transaction": lambda: reg.transaction([reg.action_clear("t")]),
            "checkpoint": reg.checkpoint,
        }
        held, release = threading.Event(), threading.Event()

        def owner_busy() -> None:  # the block thread, running something long
            with d.owner.lock:
                held.set()
                release.wait(10)

        owner = threading.Thread(target=owner_busy)
        owner.start()
        assert held.wait(10)
        done = threading.Event()
        caller = threading.Thread(target=lambda: (calls[call](), done.set()))
        caller.start()
        try:
            assert not done.wait(0.2), f"{call} ran while the owner held the node"
        finally:
            release.set()
            owner.join(10)
            caller.join(10)
        assert done.is_set()


# ---------------------------------------------------------------------- node lifecycle
def test_inactivate_stores_bitmaps_and_releases_locks(image: str) -> None:
    from dirtybits.block.node import NodeInactiveError
    from dirtybits.errors import LockError

    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        assert disk_flags(image) == {"a": True}
        d.inactivate()
        assert disk_flags(image) == {"a": False}
        assert stored_granules(image, "a") == {0}
        with pytest.raises(NodeInactiveError):
            d.write(0, b"y")
        with Qcow2Image.open(image, keep_bitmaps=True):  # free for another writer now
            with pytest.raises(LockError):
                d.activate()
            assert d.inactive
        d.activate()
        d.write(65536, b"y")
    assert stored_granules(image, "a") == {0, 1}


def test_corruption_makes_the_node_read_only_and_says_so(image: str) -> None:
    from dirtybits.errors import CorruptImageError

    events: list[NodeEvent] = []
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.subscribe(events.append)
        d.write(0, b"x" * 65536)
        assert isinstance(d.driver, Qcow2Image)
        real = d.driver.write

        def corrupt(*args: object, **kwargs: object) -> None:
            raise CorruptImageError("L2 table offset 0x0 overlaps the header")

        d.driver.write = corrupt  # type: ignore[method-assign]
        with pytest.raises(CorruptImageError):
            d.write(65536, b"y")
        d.driver.write = real  # type: ignore[method-assign]
        with pytest.raises(CorruptImageError, match="read-only after corruption"):
            d.write(2 * 65536, b"z")
        assert d.info().corrupt
    assert [e.kind for e in events if e.kind is NodeEventKind.CORRUPTED] == [
        NodeEventKind.CORRUPTED]
    assert events[-1].fatal
    assert disk_flags(image) == {"a": False}


def test_node_info_is_live(image: str) -> None:
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.bitmaps.add("t", 4096)
        info = d.info()
        assert (info.format, info.cluster_size, info.size) == ("qcow2", 65536, 64 * MiB)
        assert [b.name for b in info.bitmaps] == ["t", "a"]


def test_activate_refuses_an_image_changed_while_inactive(image: str) -> None:
    from dirtybits.block.node import NodeInactiveError

    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.inactivate()
        with Qcow2Image.open(image, keep_bitmaps=True) as other:
            other.write(0, b"q" * 512)
        with pytest.raises(NodeInactiveError, match="changed while"):
            d.activate()


def test_sha256_is_kept_until_a_bit_changes(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        d.write(0, b"x")
        first = d.bitmaps.sha256("a")
        calls: list[int] = []
        real = DirtyBitmap.sha256
        monkeypatch.setattr(DirtyBitmap, "sha256", lambda self: calls.append(1) or real(self))
        assert d.bitmaps.sha256("a") == first and calls == []
        d.write(0, b"y")  # no bit flips: still valid
        assert d.bitmaps.sha256("a") == first and calls == []
        d.write(65536, b"y")
        second = d.bitmaps.sha256("a")
        assert second != first and calls == [1]
        d.checkpoint()  # the checkpoint writer's take does not hide changes from the digest
        d.bitmaps.clear("a")
        assert d.bitmaps.sha256("a") == DirtyBitmap(64 * MiB, 65536).sha256()


def test_allocation_is_chain_aware_with_depth(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    Qcow2Image.create(str(base), 4 * MiB)
    with dirtybits.open(str(base)) as b:
        b.write(0, b"b" * 65536)
    Qcow2Image.create(str(top), 4 * MiB, backing_file=str(base), backing_format="qcow2")
    with dirtybits.open(str(top)) as t:
        t.write(65536, b"t" * 65536)
        got = [(e.start, e.length, e.depth, e.data) for e in t.allocation()]
    assert got == [(0, 65536, 1, True), (65536, 65536, 0, True), (131072, 4 * MiB - 131072,
                                                                  1, False)]


def test_the_store_refuses_changes_behind_the_nodes_back(image: str) -> None:
    """Was a silent miss: ``d.store.add`` on an open node made a bitmap the node never
    recorded into, stored as consistent."""
    with dirtybits.open(image, checkpoint=NO_TIMERS) as d:
        assert d.store is not None
        for change in (lambda: d.store.add("new", 65536), lambda: d.store.clear("a"),
                       lambda: d.store.remove("a")):
            with pytest.raises(BitmapOperationError, match=r"through node\.bitmaps"):
                change()
        d.write(0, b"x")
    assert disk_flags(image) == {"a": False}
    with Qcow2Image.open(image, keep_bitmaps=True) as img:  # offline, the store is the owner
        Qcow2BitmapStore(img).add("new", 65536)
