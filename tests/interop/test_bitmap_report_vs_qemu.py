"""Bitmap reports against QEMU 7.2: ``info --dirty`` counts and ``check -r all`` on damage.

* ``info --dirty`` equals the sum of the dirty extents ``qemu-nbd -B NAME`` + ``nbdinfo
  --map=qemu:dirty-bitmap:NAME`` report for bitmaps QEMU dirtied (qemu-io writes).
* A qemu-img-made image with one damaged directory entry (or table, or directory) is refused by
  QEMU; after ``dirtybits check -r all`` QEMU opens it again: ``qemu-img check`` is clean,
  ``qemu-img info`` lists the remaining bitmaps, their bits (sha256, NBD map) are unchanged,
  and so is the guest data.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from dirtybits.format.qcow2.bitmaps import BitmapsExtension
from dirtybits.format.qcow2.header import EXT_BITMAPS, HeaderCluster
from peers import db, nbd_dirty_bytes, qemu_bitmaps, sh

pytestmark = pytest.mark.interop


def our_bitmaps(path: Path, *extra: str) -> list[dict[str, object]]:
    info = json.loads(db("info", "--output=json", *extra, path).stdout)
    return list(info["format-specific"]["data"].get("bitmaps", []))


@pytest.mark.parametrize(("size", "cluster", "writes"), [
    ("1000448", "64k", ["write 0 1", "write 999936 512"]),  # last granule partial, dirty
    ("10M", "64k", ["write 65536 4096", "write 3M 1M", "write -z 9M 4k"]),
    ("4M", "512", ["write 0 64k", "write 2049k 7k"]),
])
def test_info_dirty_equals_nbd_extents(tmp_path: Path, qemu_tools: dict[str, str],
                                       size: str, cluster: str, writes: list[str]) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", img, size)
    sh("qemu-img", "bitmap", "--add", "-g", "64k", img, "coarse")
    sh("qemu-img", "bitmap", "--add", "-g", "512", img, "fine")
    sh("qemu-img", "bitmap", "--add", "-g", "64k", img, "clean")
    for w in writes:
        sh("qemu-io", "-c", w, img)
    sh("qemu-img", "bitmap", "--disable", img, "clean")
    sh("qemu-img", "bitmap", "--clear", img, "clean")
    plain = our_bitmaps(img)
    assert plain == qemu_bitmaps(img)  # without --dirty, qemu-img's list exactly
    listed = our_bitmaps(img, "--dirty")
    assert [b["name"] for b in listed] == ["coarse", "fine", "clean"]
    for b in listed:
        name = str(b["name"])
        assert b["dirty-bytes"] == nbd_dirty_bytes(img, name), name
    assert listed[2]["dirty-bytes"] == 0
    assert int(listed[0]["dirty-bytes"]) > 0  # type: ignore[call-overload]


# --------------------------------------------------------------------------- damage
def _directory(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        hc = HeaderCluster.unpack(f.read(2 << 20))
    ext = hc.extension(EXT_BITMAPS)
    assert ext is not None
    b = BitmapsExtension.unpack(ext.data)
    return b.bitmap_directory_offset, b.bitmap_directory_size


def _entries(path: Path) -> list[int]:
    d, size = _directory(path)
    raw = path.read_bytes()[d:d + size]
    out, pos = [], 0
    while pos < size:
        out.append(d + pos)
        name_size, extra = struct.unpack_from(">HI", raw, pos + 18)
        pos += (24 + name_size + extra + 7) & ~7
    return out


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _damage(path: Path, kind: str) -> None:
    second = _entries(path)[1]
    if kind == "granularity":
        _poke(path, second + 17, bytes([40]))
    elif kind == "table-size":
        _poke(path, second + 8, struct.pack(">I", 3))
    elif kind == "table-entry":
        table = struct.unpack(">Q", path.read_bytes()[second:second + 8])[0]
        _poke(path, table, struct.pack(">Q", (1 << 56) | 0x10000))  # reserved bits
    elif kind == "duplicate-name":
        first = _entries(path)[0]
        raw = path.read_bytes()
        _poke(path, second + 24, raw[first + 24:first + 26])  # "b1" -> "b0"
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["granularity", "table-size", "table-entry", "duplicate-name"])
def test_check_repair_all_drops_damaged_bitmap_for_qemu(tmp_path: Path,
                                                        qemu_tools: dict[str, str],
                                                        kind: str) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    for name in ("b0", "b1", "b2"):
        sh("qemu-img", "bitmap", "--add", "-g", "4k" if name == "b2" else "64k", img, name)
    sh("qemu-io", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 40M 64k", img)
    sh("qemu-img", "bitmap", "--disable", img, "b2")
    sha = {n: db("bitmap", "--sha256", img, n).stdout for n in ("b0", "b2")}
    pristine = tmp_path / "pristine.qcow2"
    shutil.copyfile(img, pristine)
    _damage(img, kind)
    assert sh("qemu-img", "info", img, ok=(1,)).returncode == 1  # QEMU refuses the image

    info = our_bitmaps(img)  # dirtybits still lists every entry, the damaged one unusable
    assert len(info) == 3 and "unusable" in info[1] and "unusable" not in info[0]
    found = db("check", img, ok=(2,))
    assert "ERROR bitmap 'b" in found.stderr

    fixed = db("check", "-r", "all", img)
    assert "Repairing bitmap" in fixed.stderr and "dropped it" in fixed.stderr
    sh("qemu-img", "check", img)  # exit 0: clean
    listed = qemu_bitmaps(img)
    assert [(b["name"], b["granularity"], b["flags"]) for b in listed] == [
        ("b0", 65536, ["auto"]), ("b2", 4096, [])]
    assert {n: db("bitmap", "--sha256", img, n).stdout for n in ("b0", "b2")} == sha
    assert nbd_dirty_bytes(img, "b0") == nbd_dirty_bytes(img, "b2") == (1 << 20) + (64 << 10)
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", pristine, img)
    assert our_bitmaps(img) == listed


def test_check_repair_all_drops_unreadable_directory_for_qemu(
        tmp_path: Path, qemu_tools: dict[str, str]) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
    sh("qemu-img", "bitmap", "--add", img, "b0")
    sh("qemu-io", "-c", "write -P 0x42 0 128k", img)
    pristine = tmp_path / "pristine.qcow2"
    shutil.copyfile(img, pristine)
    d, _ = _directory(img)
    _poke(img, d + 18, struct.pack(">H", 4000))  # name runs past the directory's end
    assert sh("qemu-img", "info", img, ok=(1,)).returncode == 1
    info = json.loads(db("info", "--output=json", img).stdout)
    assert "Broken bitmap directory" in info["format-specific"]["data"]["bitmaps-unusable"]
    db("check", img, ok=(2, 3))
    db("check", "-r", "all", img)
    sh("qemu-img", "check", img)
    assert qemu_bitmaps(img) == []
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", pristine, img)
