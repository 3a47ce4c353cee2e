"""Every descriptor of an open image is the inode that was opened and locked (issue 10, item 1).

The in_use flag and the write-intent marks are durable writes made long after the open; if
they went to the path as given, a rename, a copy put back under the old name, or a ``chdir``
would send them to another file: the written image would keep a consistent-looking bitmap that
missed the write. They must land in the opened file whatever happened to its name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

import dirtybits
from dirtybits.block.checkpoint import CheckpointPolicy

sys.path.insert(0, str(Path(__file__).parent))
from test_block_node import disk_flags, make_image, stored_granules

NO_TIMERS = CheckpointPolicy(interval=None, idle=None, threshold_bits=None)
KiB, MiB = 1 << 10, 1 << 20


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("cache", ["writeback", "none", "directsync"])
def test_rename_and_copy_back_before_first_write(tmp_path: Path, cache: str) -> None:
    img = Path(make_image(tmp_path / "d.qcow2", bitmaps=(("b0", 64 * KiB, True),)))
    moved = tmp_path / "moved.qcow2"
    with dirtybits.open(str(img), checkpoint=NO_TIMERS, cache=cache) as disk:
        os.rename(img, moved)
        shutil.copyfile(moved, img)
        copy_before = digest(img)
        disk.write(32 * MiB, b"\xab" * 64 * KiB)
        # mid-session, as a crash would leave it: the opened file says in use, the copy
        # under the old name is untouched
        assert disk_flags(str(moved)) == {"b0": True}
        assert digest(img) == copy_before
    assert disk_flags(str(moved)) == {"b0": False}
    assert stored_granules(str(moved), "b0") == {32 * MiB // (64 * KiB)}
    assert digest(img) == copy_before
    with dirtybits.open(str(moved), readonly=True) as disk:
        assert disk.read(32 * MiB, 4 * KiB) == b"\xab" * 4 * KiB


def test_plain_rename_before_first_write(tmp_path: Path) -> None:
    img = Path(make_image(tmp_path / "d.qcow2", bitmaps=(("b0", 64 * KiB, True),)))
    moved = tmp_path / "elsewhere.qcow2"
    with dirtybits.open(str(img), checkpoint=NO_TIMERS) as disk:
        os.rename(img, moved)
        disk.write(0, b"\x01" * 4096)  # used to fail: the flag write opened the old name
        assert disk_flags(str(moved)) == {"b0": True}
    assert disk_flags(str(moved)) == {"b0": False}
    assert stored_granules(str(moved), "b0") == {0}


def test_relative_path_and_chdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image(tmp_path / "d.qcow2", bitmaps=(("b0", 64 * KiB, True),))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(tmp_path / "d.qcow2", other / "d.qcow2")
    decoy = digest(other / "d.qcow2")
    monkeypatch.chdir(tmp_path)
    with dirtybits.open("d.qcow2", checkpoint=NO_TIMERS) as disk:
        os.chdir(other)  # "d.qcow2" now names the decoy
        disk.write(0, b"\x02" * 4096)
        assert disk_flags(str(tmp_path / "d.qcow2")) == {"b0": True}
    assert digest(other / "d.qcow2") == decoy
    assert stored_granules(str(tmp_path / "d.qcow2"), "b0") == {0}


def test_resilient_marks_follow_the_inode(tmp_path: Path) -> None:
    """The write-intent map's marks are durable writes too: they land in the opened file."""
    from dirtybits.block import write_intent
    from dirtybits.block.open import open_image
    from dirtybits.qcow2.image import Qcow2Image

    img = Path(make_image(tmp_path / "d.qcow2", bitmaps=(("b0", 64 * KiB, True),)))
    with Qcow2Image.open(str(img), keep_bitmaps=True) as q:
        write_intent.enable(q)
    moved = tmp_path / "moved.qcow2"
    node = open_image(str(img), checkpoint=NO_TIMERS, always_node=True)
    try:
        os.rename(img, moved)
        shutil.copyfile(moved, img)
        copy_before = digest(img)
        node.write(0, b"\x03" * 4096)
        assert digest(img) == copy_before
        assert disk_flags(str(moved)) == {"b0": True}
    finally:
        node.close()
    assert digest(img) == copy_before


def test_reopen_same_file_follows_the_inode(tmp_path: Path) -> None:
    from dirtybits.osfile import reopen_same_file

    path = tmp_path / "f"
    path.write_bytes(b"opened")
    fd = os.open(path, os.O_RDWR)
    try:
        os.rename(path, tmp_path / "g")
        path.write_bytes(b"decoy!")
        fd2 = reopen_same_file(fd, os.O_RDONLY)
        try:
            assert os.pread(fd2, 6, 0) == b"opened"
        finally:
            os.close(fd2)
    finally:
        os.close(fd)


def test_direct_descriptors_are_the_opened_inode(tmp_path: Path) -> None:
    """cache=none's O_DIRECT descriptor is opened after the image: it must be the same file
    even when the name was replaced in between (on filesystems without O_DIRECT there is
    none, and buffered I/O stays correct)."""
    from dirtybits.qcow2.image import Qcow2Image

    img = Path(make_image(tmp_path / "d.qcow2", bitmaps=()))
    with Qcow2Image.open(str(img), cache="none") as q:
        st = os.fstat(q.fileno())
        for dfd in q._direct.values():
            dst = os.fstat(dfd)
            assert (dst.st_dev, dst.st_ino) == (st.st_dev, st.st_ino)
            assert os.get_blocking(dfd)  # a real descriptor, still open
