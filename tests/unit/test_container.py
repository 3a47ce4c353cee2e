"""Bitmap containers: drive records, binding, identity and size checks, tracking through them."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

import dirtybits
from dirtybits.block.checkpoint import CheckpointPolicy
from dirtybits.block.container import (
    EXT_DRIVES,
    XATTR,
    Container,
    ContainerError,
    DriveMismatchError,
    DriveRecord,
    DriveTable,
    NotAContainerError,
    open_drive,
)
from dirtybits.block.qcow2_bitmaps import BitmapOperationError
from dirtybits.cli.main import main
from dirtybits.errors import DirtybitsError, ImageError
from dirtybits.qcow2.image import Qcow2Image

MiB = 1 << 20


NO_TIMERS = CheckpointPolicy(interval=None, idle=None, threshold_bits=None)


def _xattrs_work(path: Path) -> bool:
    probe = path / "xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def raw(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.fixture
def box(tmp_path: Path) -> tuple[str, str, str]:
    """A 64 MiB container with drives a (3 MiB, bitmap b0) and b (5 MiB, bitmap b0 at 4k)."""
    c = str(tmp_path / "c.qcow2")
    Container.create(c, 64 * MiB)
    a, b = raw(tmp_path / "a.raw", 3 * MiB), raw(tmp_path / "b.raw", 5 * MiB)
    with Container.open(c) as ct:
        ct.attach(a)
        ct.attach(b)
        ct.add_bitmap("a", "b0")
        ct.add_bitmap("b", "b0", 4096)
    return c, a, b


def test_table_round_trip_and_checksum() -> None:
    rec = DriveRecord("d1", "sub/d1.raw", 12345, 7, 99, uuid.uuid4(), True, 0xFFFFFFFF)
    rec2 = DriveRecord("é", "/abs/x.raw", 1 << 40, 1 << 63, 3, uuid.uuid4(), False)
    table = DriveTable(uuid.uuid4(), (rec, rec2))
    data = table.pack()
    assert DriveTable.unpack(data) == table
    bad = bytearray(data)
    bad[40] ^= 1
    with pytest.raises(ContainerError, match="checksum"):
        DriveTable.unpack(bytes(bad))


def test_tracks_only_its_drive_and_never_past_its_end(box: tuple[str, str, str]) -> None:
    c, a, _ = box
    with dirtybits.open(a, bitmap_file=c) as node:
        assert node.tracked_bitmaps == ["a/b0"]
        node.write(64 * 1024, b"x" * 10)
        node.write(3 * MiB - 1, b"y")  # last byte of the drive
        with pytest.raises(ImageError, match="outside"):
            node.write(3 * MiB - 1, b"zz")  # would reach past the end: nothing marked
        assert list(node.load_bitmap("b0").dirty_extents()) == [
            (65536, 65536), (3 * MiB - 65536, 65536)]
    with open(a, "rb") as f:
        f.seek(64 * 1024)
        assert f.read(10) == b"x" * 10
    with Container.open(c, readonly=True) as ct:
        full = ct.store.load("a/b0")  # container-sized: nothing past the drive's end
        assert full.size == 64 * MiB
        assert list(full.dirty_extents()) == [(65536, 65536), (3 * MiB - 65536, 65536)]
        assert ct.store.load("b/b0").count() == 0
        infos = {bi.stored_name: bi for bi in ct.bitmap_infos("a")}
        assert infos["a/b0"].dirty_bytes == 2 * 65536
        assert infos["a/b0"].state == "consistent"


def test_name_clash_refused_at_creation(box: tuple[str, str, str]) -> None:
    c, _, _ = box
    with Container.open(c) as ct:
        with pytest.raises(ContainerError, match="already exists for drive 'a'"):
            ct.add_bitmap("a", "b0")
        ct.add_bitmap("a", "b1")  # another name, and the same name on another drive, are fine
        assert [sb.name for sb in ct.store.bitmaps] == ["a/b0", "b/b0", "a/b1"]
        with pytest.raises(ContainerError, match="no drive 'zz'"):
            ct.add_bitmap("zz", "b0")


def test_wrong_drive_of_the_same_size_refused(box: tuple[str, str, str], tmp_path: Path) -> None:
    c, a, _ = box
    os.rename(a, tmp_path / "a.orig")
    raw(Path(a), 3 * MiB)  # another file, same path, same size
    with pytest.raises(DriveMismatchError, match="is not drive 'a'"):
        open_drive(c, a)
    with Container.open(c) as ct:
        with pytest.raises(DriveMismatchError):
            ct.load_bitmap("a", "b0")
        assert ct.drive_status("a") != "ok"
        assert ct.drive_status("b") == "ok"
    # the real drive, moved, is still recognised by its identity
    with open_drive(c, str(tmp_path / "a.orig")) as node:
        assert node.drive_id == "a"


@pytest.mark.skipif(not _xattrs_work(Path(os.environ.get("TMPDIR", "/tmp"))),
                    reason="filesystem without user xattrs")
def test_copy_with_attributes_is_not_the_drive(box: tuple[str, str, str],
                                               tmp_path: Path) -> None:
    c, a, _ = box
    assert os.getxattr(a, XATTR)
    copy = tmp_path / "copy.raw"
    shutil.copy2(a, copy)  # copies the xattr with the UUID, not the inode
    assert os.getxattr(copy, XATTR) == os.getxattr(a, XATTR)
    with pytest.raises(DriveMismatchError, match="a copy of the drive"):
        open_drive(c, str(copy))


def test_without_xattrs_device_and_inode_bind(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_xattr(*args: object) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", no_xattr)
    c = str(tmp_path / "c.qcow2")
    Container.create(c, 16 * MiB)
    d = raw(tmp_path / "d.raw", MiB)
    with Container.open(c) as ct:
        rec = ct.attach(d)
        assert not rec.xattr and rec.ino == os.stat(d).st_ino
        ct.add_bitmap(rec.id, "b0")
    os.unlink(d)
    raw(Path(d), MiB)
    with pytest.raises(DriveMismatchError, match="inode"):
        open_drive(c, d)


def test_wrong_size_refused_at_load(box: tuple[str, str, str]) -> None:
    c, _, b = box
    os.truncate(b, 4 * MiB)
    with pytest.raises(DriveMismatchError, match="size is 4194304 bytes, the bitmaps are for "
                                                "5242880"):
        open_drive(c, b)
    assert main(["io", "--bitmap-file", c, "-c", "write 0 4k", b]) == 1


def test_rebind_accepts_a_resized_drive_conservatively(box: tuple[str, str, str]) -> None:
    c, a, _ = box
    with open_drive(c, a) as node:
        node.write(0, b"x")
    os.truncate(a, 4 * MiB)
    with Container.open(c) as ct:
        ct.rebind("a")
        assert list(ct.load_bitmap("a", "b0").dirty_extents()) == [(0, 65536), (3 * MiB, MiB)]
    os.truncate(a, MiB)  # shrink: the bits past the new end go
    with Container.open(c) as ct:
        ct.rebind("a")
        assert list(ct.store.load("a/b0").dirty_extents()) == [(0, 65536)]
    with open_drive(c, a) as node:
        assert node.size == MiB


def test_detach_refuses_while_bitmaps_exist(box: tuple[str, str, str]) -> None:
    c, a, _ = box
    with Container.open(c) as ct:
        with pytest.raises(ContainerError, match=r"has bitmaps \(b0\)"):
            ct.detach("a")
        assert ct.detach("a", force=True) == ["a/b0"]
        assert [d.id for d in ct.drives] == ["b"]
        assert [sb.name for sb in ct.store.bitmaps] == ["b/b0"]
    with pytest.raises(DriveMismatchError, match="not attached"):
        open_drive(c, a)


def test_attach_refuses_ids_owned_by_leftover_bitmaps(box: tuple[str, str, str],
                                                      tmp_path: Path) -> None:
    c, _, _ = box
    with Container.open(c) as ct:
        ct.store.add("z/old", None)  # e.g. left by another tool
        assert ct.unbound_bitmaps() == ["z/old"]
        z = raw(tmp_path / "z.raw", MiB)
        with pytest.raises(ContainerError, match="already carry the id 'z'"):
            ct.attach(z, "z")
        assert ct.attach(z).id == "z-2"  # the default id avoids it
        with pytest.raises(ContainerError, match="already attached as 'z-2'"):
            ct.attach(z, "zz")


def test_grows_only_while_empty(tmp_path: Path) -> None:
    c = str(tmp_path / "c.qcow2")
    Container.create(c, MiB)
    with Container.open(c) as ct:
        ct.attach(raw(tmp_path / "big.raw", 8 * MiB))
        assert ct.max_size == 8 * MiB
        ct.add_bitmap("big", "b0")
        with pytest.raises(ContainerError, match="larger than the container's maximum"):
            ct.attach(raw(tmp_path / "bigger.raw", 9 * MiB))


def test_header_limit_is_a_clear_error(tmp_path: Path) -> None:
    c = str(tmp_path / "c.qcow2")
    Container.create(c, MiB)
    deep = tmp_path / ("d" * 200)
    deep.mkdir()
    with Container.open(c) as ct, pytest.raises(ContainerError, match="does not fit"):
        for i in range(40):
            ct.attach(raw(deep / f"{i:03d}.raw", 4096), f"drive{i}")


def test_a_plain_qcow2_is_not_a_container(tmp_path: Path) -> None:
    img = str(tmp_path / "p.qcow2")
    Qcow2Image.create(img, MiB)
    with pytest.raises(NotAContainerError, match="not a bitmap container"):
        Container.open(img)
    with pytest.raises(ContainerError, match="already exists"):
        Container.create(img)


def test_attach_refuses_qcow2_and_resize_is_refused(box: tuple[str, str, str],
                                                    tmp_path: Path) -> None:
    c, a, _ = box
    img = str(tmp_path / "q.qcow2")
    Qcow2Image.create(img, MiB)
    with Container.open(c) as ct, pytest.raises(ContainerError, match="qcow2 image"):
        ct.attach(img)
    with open_drive(c, a) as node, pytest.raises(DirtybitsError, match="rebind"):
        node.resize(4 * MiB)


def test_bitmaps_no_marks_the_drive_bitmaps_inconsistent(box: tuple[str, str, str]) -> None:
    c, a, _ = box
    with open_drive(c, a, bitmaps="no") as node:
        node.write(0, b"x")
    with Container.open(c, readonly=True) as ct:
        states = {sb.name: sb.in_use for sb in ct.store.bitmaps}
        assert states == {"a/b0": True, "b/b0": False}  # only its own drive's


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(tmp_path / "c.qcow2")
    d = raw(tmp_path / "d.raw", 2 * MiB)
    assert main(["container", "create", c, "--max-size", "8M"]) == 0
    assert main(["container", "attach", c, d, "--id", "disk0"]) == 0
    assert main(["container", "bitmap", c, "disk0", "--add", "daily", "-g", "4k"]) == 0
    assert main(["container", "bitmap", c, "disk0", "--add", "daily"]) == 1
    assert "already exists for drive 'disk0'" in capsys.readouterr().err
    assert main(["io", "--bitmap-file", c, "-c", "write -P 0xab 8k 4k", d]) == 0
    capsys.readouterr()
    assert main(["container", "bitmap", c, "disk0", "--dump", "daily"]) == 0
    assert capsys.readouterr().out == (
        "         0        8192    0  clean\n"
        "      8192        4096    1  dirty\n"
        "     12288     2084864    0  clean\n")
    assert main(["container", "list", c, "--output=json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max-size"] == 8 * MiB
    [drive] = data["drives"]
    assert (drive["id"], drive["size"], drive["status"]) == ("disk0", 2 * MiB, "ok")
    assert drive["bitmaps"][0]["dirty-bytes"] == 4096
    assert drive["bitmaps"][0]["stored-name"] == "disk0/daily"
    assert main(["container", "bitmap", c, "disk0", "--clear", "daily"]) == 0
    assert main(["container", "detach", c, "disk0"]) == 1
    assert main(["container", "detach", c, "disk0", "--force"]) == 0
    capsys.readouterr()
    assert main(["container", "list", c]) == 0
    assert "0 drives" in capsys.readouterr().out


def test_extension_survives_our_own_header_rewrites(box: tuple[str, str, str]) -> None:
    c, _, _ = box
    with Container.open(c) as ct:
        before = ct.img.hc.extension(EXT_DRIVES)
        ct.add_bitmap("a", "b9")
        ct.remove_bitmap("a", "b9")
        assert ct.img.hc.extension(EXT_DRIVES) == before


def test_many_open_drives_per_container(box: tuple[str, str, str]) -> None:
    """Two drives of one container open and written at once, each into its own bitmaps;
    the same drive twice is refused."""
    c, a, b = box
    with Container.open(c) as ct:
        with ct.open_drive(a) as na, ct.open_drive(b) as nb:
            na.write(0, b"x")
            nb.write(0, b"y")
            with pytest.raises(ContainerError, match="already open"):
                ct.open_drive(a)
            assert na.bitmaps.names() == ["b0"] and nb.bitmaps.names() == ["b0"]
        assert ct.load_bitmap("a", "b0").count() == 65536
        assert ct.load_bitmap("b", "b0").count() == 4096


def test_two_api_opens_share_one_container(box: tuple[str, str, str]) -> None:
    """``dirtybits.open(raw, bitmap_file=c)`` twice in one process shares the open container
    (a second open of the file would fail on its write lock)."""
    c, a, b = box
    na = dirtybits.open(a, bitmap_file=c, checkpoint=NO_TIMERS)
    nb = dirtybits.open(b, bitmap_file=c, checkpoint=NO_TIMERS)
    try:
        na.write(65536, b"x" * 65536)
        nb.write(0, b"y" * 4096)
        with pytest.raises(BitmapOperationError, match="already exists"):
            nb.bitmaps.add("b0", persistent=True)
    finally:
        na.close()
    nb.bitmaps.add("extra", persistent=True)
    nb.write(1 << 20, b"z")
    nb.close()
    with Container.open(c) as ct:
        assert list(ct.load_bitmap("a", "b0").dirty_extents()) == [(65536, 65536)]
        assert list(ct.load_bitmap("b", "extra").dirty_extents()) == [(1 << 20, 65536)]
