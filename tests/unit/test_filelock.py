"""QEMU-compatible image locks: the bytes each open holds, and who refuses whom.

Byte sets are the ones QEMU 7.2's tools lock (seen with strace / /proc/locks, see
``dirtybits.filelock``); conflicts follow ``raw_check_lock_bytes``. OFD locks belong to the
open file description, so two opens in this one process conflict like two processes would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dirtybits import filelock
from dirtybits.block.children import open_qcow2
from dirtybits.block.open import open_image
from dirtybits.block.raw import RawImage
from dirtybits.errors import LockError, UsageError
from dirtybits.filelock import (
    DATA_FILE_RW,
    QCOW2_INFO,
    QCOW2_RO,
    QCOW2_RW,
    RAW_RO,
    RAW_RW,
    FileLock,
    ImageLock,
    Perms,
    lock_fd,
)
from dirtybits.qcow2.image import Qcow2Image

pytestmark = pytest.mark.skipif(not filelock.locking_supported(),
                                reason="no OFD locks on this system")

WRITE_LOCK = 'Failed to get "write" lock\nIs another process using the image [{}]?'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock\nIs another process using the image [{}]?'


def held_bytes(path: Path) -> set[int]:
    """Every byte some open file description holds an OFD lock on, from /proc/locks."""
    ino = os.stat(path).st_ino
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:  # a blocked waiter, not a holder
                continue
            if parts[1] == "OFDLCK" and int(parts[5].split(":")[2]) == ino:
                out.update(range(int(parts[6]), int(parts[7]) + 1))
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "a.qcow2"
    Qcow2Image.create(str(path), 4 << 20)
    return path


def raw_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


@pytest.mark.parametrize(("perms", "expected"), [
    (QCOW2_RW, [100, 101, 103, 201, 203]),
    (QCOW2_RO, [100, 201, 203]),
    (QCOW2_RO.force_shared(), [100]),
    (QCOW2_INFO, [201, 203]),
    (DATA_FILE_RW, [100, 101, 103, 203]),
    (RAW_RW, [100, 101]),
    (RAW_RO, [100]),
])
def test_bytes_are_qemus(img: Path, perms: Perms, expected: list[int]) -> None:
    fd = raw_fd(img)
    try:
        lock = lock_fd(fd, str(img), perms)
        assert lock.locked_bytes == expected
        assert held_bytes(img) == set(expected)
        lock.release()
        assert held_bytes(img) == set()
    finally:
        os.close(fd)


def test_image_opens_hold_qemus_bytes(img: Path) -> None:
    with open_qcow2(str(img)):
        assert held_bytes(img) == {100, 101, 103, 201, 203}
    assert held_bytes(img) == set()
    with open_qcow2(str(img), readonly=True):
        assert held_bytes(img) == {100, 201, 203}
    with open_qcow2(str(img), readonly=True, force_share=True):
        assert held_bytes(img) == {100}
    assert held_bytes(img) == set()


def test_two_writers_conflict(img: Path) -> None:
    with open_qcow2(str(img)):
        with pytest.raises(LockError) as e:
            open_qcow2(str(img))
        assert str(e.value) == WRITE_LOCK.format(img)
        with pytest.raises(LockError) as e:
            open_image(str(img), readonly=True)
        assert str(e.value) == SHARED_WRITE_LOCK.format(img)
    with open_qcow2(str(img)):  # the first close let go of everything
        pass


def test_reader_blocks_writer_readers_share(img: Path) -> None:
    with open_qcow2(str(img), readonly=True), open_qcow2(str(img), readonly=True):
        with pytest.raises(LockError) as e:
            open_qcow2(str(img))
        assert str(e.value) == WRITE_LOCK.format(img)


def test_force_share_reads_past_a_writer_and_blocks_nobody(img: Path) -> None:
    with open_qcow2(str(img)) as w:
        w.write(0, b"\xab" * 4096)
        w.flush()
        with open_image(str(img), readonly=True, force_share=True) as r:
            assert r.read(0, 4096) == b"\xab" * 4096
    # -U holds nothing a writer tests
    with open_image(str(img), readonly=True, force_share=True), open_qcow2(str(img)) as w:
        w.write(0, b"\xcd" * 512)


def test_force_share_needs_read_only(img: Path) -> None:
    with pytest.raises(UsageError, match="force-share=on can only be used with read-only"):
        open_qcow2(str(img), force_share=True)
    with pytest.raises(UsageError, match="force-share=on can only be used with read-only"):
        RawImage(str(img), force_share=True)
    assert held_bytes(img) == set()


def test_failed_apply_rolls_back_to_what_was_held(img: Path) -> None:
    fd1, fd2 = raw_fd(img), raw_fd(img)
    try:
        holder = lock_fd(fd1, str(img), QCOW2_RO)  # unshares write
        second = FileLock(fd2, str(img))
        second.apply(RAW_RO)
        with pytest.raises(LockError, match='"write" lock'):
            second.apply(QCOW2_RW)
        assert second.locked_bytes == [100]  # back to RAW_RO exactly
        assert second.perms == RAW_RO
        holder.release()
        second.apply(QCOW2_RW)  # nothing in the way now
        assert held_bytes(img) == {100, 101, 103, 201, 203}
    finally:
        os.close(fd1)
        os.close(fd2)


def test_another_process_conflicts_until_it_exits(img: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from dirtybits.qcow2.image import Qcow2Image
            img = Qcow2Image.open({str(img)!r})
            img.write(0, b"\\x11" * 512)
            print("ready", flush=True)
            sys.stdin.read()
            img.close()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        before = sha(img)
        with pytest.raises(LockError) as e:
            open_qcow2(str(img))
        assert str(e.value) == WRITE_LOCK.format(img)
        with pytest.raises(LockError):
            open_image(str(img))
        assert sha(img) == before  # the refused opens wrote nothing
        with pytest.raises(LockError, match="shared \"write\""), ImageLock(str(img), QCOW2_INFO):
            pass
        with ImageLock(str(img), QCOW2_INFO.force_shared()):
            pass
        with open_qcow2(str(img), readonly=True, force_share=True) as r:
            assert r.size == 4 << 20
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    with open_qcow2(str(img)) as w:
        assert w.read(0, 512) == b"\x11" * 512


def test_create_refuses_an_image_in_use_and_leaves_it(img: Path, tmp_path: Path) -> None:
    with open_qcow2(str(img), readonly=True):
        before = sha(img)
        with pytest.raises(LockError) as e:
            Qcow2Image.create(str(img), 1 << 20)
        assert str(e.value) == WRITE_LOCK.format(img)
        with pytest.raises(LockError):
            RawImage.create(str(img), 1 << 20)
        assert sha(img) == before
    RawImage.create(str(img), 1 << 20)  # free again
    assert img.stat().st_size == 1 << 20


def test_backing_file_locked_read_only_and_reported(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    Qcow2Image.create(str(base), 1 << 20)
    Qcow2Image.create(str(top), 1 << 20, backing_file="base.qcow2", backing_format="qcow2")
    with open_qcow2(str(top)):
        assert held_bytes(base) == {100, 201, 203}
        with pytest.raises(LockError) as e:
            open_qcow2(str(base))
        assert str(e.value) == WRITE_LOCK.format(base)
        with open_qcow2(str(base), readonly=True):
            pass
    with open_qcow2(str(base)):
        with pytest.raises(LockError) as e:
            open_qcow2(str(top), readonly=True)
        assert str(e.value) == "Could not open backing file: " + SHARED_WRITE_LOCK.format(base)
        assert held_bytes(top) == set()  # the failed open let go of the top image too
        with open_qcow2(str(top), readonly=True, force_share=True):
            assert held_bytes(top) == {100}  # -U reaches the backing file too
    assert held_bytes(base) == set()


def test_raw_backing_locked_as_qemu_does(tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    RawImage.create(str(base), 1 << 20)
    Qcow2Image.create(str(top), 1 << 20, backing_file="base.raw", backing_format="raw")
    with open_qcow2(str(top)):
        assert held_bytes(base) == {100}
        with RawImage(str(base)) as w:  # QEMU's raw nodes share everything
            w.write(0, b"x")


def test_data_file_locked_and_failed_open_releases_the_image(tmp_path: Path) -> None:
    path, data = tmp_path / "d.qcow2", tmp_path / "d.raw"
    Qcow2Image.create(str(path), 1 << 20, data_file="d.raw")
    with open_qcow2(str(path)):
        assert held_bytes(data) == {100, 101, 103, 203}
        with RawImage(str(data)):  # QEMU shares a data file's write permission
            pass
    fd = raw_fd(data)
    try:
        blocker = lock_fd(fd, str(data), QCOW2_RO)  # unshares write
        with pytest.raises(LockError) as e:
            open_qcow2(str(path))
        assert str(e.value) == WRITE_LOCK.format(data)
        assert held_bytes(path) == set()  # nothing leaked from the failed open
        blocker.release()
    finally:
        os.close(fd)
    with open_qcow2(str(path)):
        pass


def test_raw_writer_refused_by_a_qcow2_writer(img: Path) -> None:
    with open_qcow2(str(img)):
        with pytest.raises(LockError) as e:
            RawImage(str(img))
        assert str(e.value) == WRITE_LOCK.format(img)
        with RawImage(str(img), readonly=True):  # a plain raw read is never refused
            pass


def test_raw_resize_takes_resize_like_qemu_io_truncate(tmp_path: Path) -> None:
    path, data = tmp_path / "d.qcow2", tmp_path / "d.raw"
    Qcow2Image.create(str(path), 1 << 20, data_file="d.raw")
    with open_qcow2(str(path)), RawImage(str(data)) as raw:  # data file: resize unshared
        with pytest.raises(LockError) as e:
            raw.resize(2 << 20)
        assert str(e.value) == (
            f'Failed to get "resize" lock\nIs another process using the image [{data}]?')
        assert raw.size == 1 << 20 and data.stat().st_size == 1 << 20
    with RawImage(str(data)) as raw:
        raw.resize(2 << 20)
        assert held_bytes(data) == {100, 101, 103}


@pytest.mark.parametrize(("fmt", "force_share", "expected"), [
    ("qcow2", False, {201, 203}),  # qemu-img info
    ("qcow2", True, set()),        # qemu-img info -U
    ("raw", False, set()),         # qemu-img info -f raw locks nothing
])
def test_image_lock_for_info(img: Path, fmt: str, force_share: bool, expected: set[int]) -> None:
    with ImageLock(str(img), filelock.info_perms(fmt, force_share=force_share)):
        assert held_bytes(img) == expected
    assert held_bytes(img) == set()


def test_command_lock_for_info_and_check(img: Path, tmp_path: Path) -> None:
    with open_qcow2(str(img)):
        for kw in ({"info": True}, {}, {"readonly": False}):
            with pytest.raises(LockError) as e, filelock.command_lock(str(img), None, **kw):
                pass
            assert str(e.value).startswith(f"Could not open '{img}': Failed to get ")
        with filelock.command_lock(str(img), None, info=True, force_share=True):
            assert held_bytes(img) == {100, 101, 103, 201, 203}  # the writer's alone
        with filelock.command_lock(str(img), "qcow2", force_share=True):
            pass
    with filelock.command_lock(str(img), None, readonly=False):  # check -r: a writer
        assert held_bytes(img) == {100, 101, 103, 201, 203}
    raw = tmp_path / "r.raw"
    RawImage.create(str(raw), 1 << 20)
    with filelock.command_lock(str(raw), None, info=True):
        assert held_bytes(raw) == set()
    with filelock.command_lock(str(tmp_path / "missing"), None):
        pass  # the command's own open reports a missing file
