"""Loading damaged bitmap metadata for writing, against QEMU 7.2 (issue 10, items 2, 7, 11).

* An unreadable bitmap directory: qemu-io refuses the image, and ``dirtybits io`` refuses a
  write with the same message, both leaving the file byte for byte as it was; after
  ``dirtybits check -r all`` both write again and ``qemu-img check`` is clean.
* A table entry pointing 1 TiB past the end of the file: ``dirtybits io`` writes without
  growing the file, the bitmap ends up in use (QEMU: inconsistent), never consistent.
* Removing a damaged bitmap leaves ``qemu-img check`` without leaks.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from dirtybits.format.qcow2.bitmaps import BitmapsExtension
from dirtybits.format.qcow2.header import EXT_BITMAPS, HeaderCluster
from peers import db, qemu_bitmaps, sh

pytestmark = pytest.mark.interop

VARIANTS = ["nb_bitmaps 65535", "directory past the end of the file", "directory size 0",
            "directory truncated", "huge extra data size", "huge name size",
            "file truncated in the directory"]


def _image(tmp_path: Path, *bitmaps: str) -> Path:
    """qemu-img made: guest data first, then the bitmaps, dirtied by a qemu-io write."""
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    sh("qemu-io", "-c", "write -P 0x42 0 64k", img)
    for name in bitmaps:
        sh("qemu-img", "bitmap", "--add", img, name)
    sh("qemu-io", "-c", "write -P 0x42 0 64k", img)
    return img


def _ext(path: Path) -> tuple[int, int]:
    """(file offset of the extension's data, directory offset)."""
    raw = path.read_bytes()[:65536]
    ext = HeaderCluster.unpack(raw).extension(EXT_BITMAPS)
    assert ext is not None
    at = raw.index(struct.pack(">II", EXT_BITMAPS, 24)) + 8
    return at, BitmapsExtension.unpack(ext.data).bitmap_directory_offset


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _damage(path: Path, variant: str) -> None:
    at, d = _ext(path)
    if variant == "nb_bitmaps 65535":
        _poke(path, at, struct.pack(">I", 65535))
    elif variant == "directory past the end of the file":
        _poke(path, at + 16, struct.pack(">Q", 1 << 40))
    elif variant == "directory size 0":
        _poke(path, at + 8, struct.pack(">Q", 0))
    elif variant == "directory truncated":
        _poke(path, at + 8, struct.pack(">Q", 16))
    elif variant == "huge extra data size":
        _poke(path, d + 20, struct.pack(">I", 0xFFFFFFFF))
    elif variant == "huge name size":
        _poke(path, d + 18, struct.pack(">H", 0xFFFF))
    else:
        os.truncate(path, d + 8)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("variant", VARIANTS)
def test_unreadable_directory_refused_with_qemus_message(
        tmp_path: Path, qemu_tools: dict[str, str], variant: str) -> None:
    img = _image(tmp_path, "b0")
    _damage(img, variant)
    before = _sha(img)
    theirs = sh("qemu-io", "-c", "write 32M 64k", img, ok=(1,)).stderr
    prefix = f"qemu-io: can't open device {img}: "
    assert theirs.startswith(prefix)
    qemu_message = theirs[len(prefix):].strip()
    ours = db("io", "-c", "write 32M 64k", img, ok=(1,))
    assert ours.stdout == ""
    assert ours.stderr.startswith(f"dirtybits io: can't open device {img}: {qemu_message} (")
    assert "'dirtybits check -r all'" in ours.stderr
    assert _sha(img) == before
    db("info", img)  # read-only opens still work
    db("check", "-r", "all", img)
    sh("qemu-img", "check", img)
    assert qemu_bitmaps(img) == []
    sh("qemu-io", "-c", "write 32M 64k", img)
    db("io", "-c", "write 32M 64k", img)
    sh("qemu-img", "check", img)


def test_table_entry_past_the_end_neither_grows_the_file_nor_reads_consistent(
        tmp_path: Path, qemu_tools: dict[str, str]) -> None:
    img = _image(tmp_path, "b0", "b1")
    _, d = _ext(img)
    with open(img, "rb") as f:
        f.seek(d + 32)  # b1's entry (name "b0" pads the first to 32 bytes)
        table = struct.unpack(">Q", f.read(8))[0]
        f.seek(table)
        data = f.read(8)
    _poke(img, table, struct.pack(">Q", 1 << 40))
    size = img.stat().st_size
    db("io", "-c", "write 32M 64k", img)
    assert img.stat().st_size < size + (4 << 20)
    _poke(img, table, data)  # the damage repaired by hand
    listed = qemu_bitmaps(img)
    assert [(b["name"], b["flags"]) for b in listed] == [("b0", ["auto"]),
                                                         ("b1", ["in-use", "auto"])]
    sh("qemu-img", "check", img)


def test_removing_a_damaged_bitmap_leaks_nothing(tmp_path: Path,
                                                 qemu_tools: dict[str, str]) -> None:
    img = _image(tmp_path, "b0", "b1")
    _, d = _ext(img)
    _poke(img, d + 32 + 17, bytes([40]))  # b1's granularity_bits
    sh("qemu-img", "info", img, ok=(1,))
    done = db("bitmap", "--remove", img, "b1")
    assert done.stderr == ""
    sh("qemu-img", "check", img)  # exit 0: no leaks, no corruption
    assert [b["name"] for b in qemu_bitmaps(img)] == ["b0"]
