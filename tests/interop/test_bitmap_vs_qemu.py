"""Bitmaps both ways between dirtybits and QEMU 7.2: what one writes, the other reads the same."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from peers import db, db_session, nbd_map, qemu_bitmaps, sh

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("size,cluster,gran", [
    ("1M", "64k", "64k"),
    ("1000448", "512", "512"),  # size not a multiple of the granularity
    ("64M", "2M", "2G"),
    ("10M", "64k", "4k"),
])
def test_qemu_made_bitmap_dumps_like_qemu_nbd(tmp_path: Path, size: str, cluster: str,
                                              gran: str) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", img, size)
    sh("qemu-img", "bitmap", "--add", "-g", gran, img, "b0")
    sh("qemu-io", "-c", "write 0 4k", "-c", "write 700k 70k", "-c", "write -z 900k 3k", img)
    for extra in ((), ("--json",), ("--totals",)):
        ours = db("bitmap", "--dump", *extra, img, "b0").stdout
        assert ours == nbd_map(img, "b0", *extra)


def test_dirtybits_bitmaps_read_by_qemu(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    db("bitmap", "--add", img, "b0")
    db("bitmap", "--add", "-g", "4k", "--disable", img, "b1")
    assert qemu_bitmaps(img) == [
        {"flags": ["auto"], "name": "b0", "granularity": 65536},
        {"flags": [], "name": "b1", "granularity": 4096},
    ]
    sh("qemu-io", "-c", "write 0 64k", "-c", "write 512k 4k", img)
    # QEMU's own known hash for bits 0 and 8 (reference §6)
    assert db("bitmap", "--sha256", img, "b0").stdout.strip() == \
        "4adeb4453cb2e0d4f186667f3052bf6c34b102cf0fa25910f6964f4f8a55ab84"
    db("bitmap", "--merge", "b0", "--copy", "b2", "--rename", "b3", img, "b1")
    assert [b["name"] for b in qemu_bitmaps(img)] == ["b0", "b3", "b2"]
    for name in ("b0", "b2", "b3"):
        assert db("bitmap", "--dump", img, name).stdout == nbd_map(img, name)
    check = sh("qemu-img", "check", "--output=json", img)
    assert "leaks" not in json.loads(check.stdout) and "corruptions" not in check.stdout
    db("bitmap", "--clear", "--remove", img, "b2")
    db("bitmap", "--clear", img, "b0")
    assert "1 dirty" not in nbd_map(img, "b0")
    # QEMU can still operate on what we wrote
    sh("qemu-img", "bitmap", "--remove", img, "b3")
    sh("qemu-img", "bitmap", "--add", img, "q")
    assert [b["name"] for b in qemu_bitmaps(img)] == ["b0", "q"]
    sh("qemu-img", "check", img)


def test_errors_match_qemu_img(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    db("bitmap", "--add", img, "a")
    dup = db("bitmap", "--add", img, "a", ok=(1,))
    assert "Operation add on bitmap a failed: Bitmap already exists: a" in dup.stderr
    missing = db("bitmap", "--clear", img, "zz", ok=(1,))
    assert "Dirty bitmap 'zz' not found" in missing.stderr
    before = img.read_bytes()
    bad = db("bitmap", "--add", "-g", "1000", img, "c", ok=(1,))
    assert "Granularity must be power of 2 and at least 512" in bad.stderr
    assert img.read_bytes() == before


def test_in_use_bitmap_only_removable(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    sh("qemu-img", "bitmap", "--add", img, "b0")
    # QEMU killed while it had the image open leaves the bitmap in use
    sh("qemu-io", "-c", "write 0 4k", "-c", "sigraise 9", img, ok=(-9, 137))
    assert qemu_bitmaps(img)[0]["flags"] == ["in-use", "auto"]
    out = db("bitmap", "--clear", img, "b0", ok=(1,))
    assert "inconsistent and cannot be used" in out.stderr
    db("bitmap", "--remove", img, "b0")
    assert qemu_bitmaps(img) == []
    sh("qemu-img", "check", img)


def test_damaged_entry_does_not_block_the_image(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    sh("qemu-img", "bitmap", "--add", img, "good")
    sh("qemu-img", "bitmap", "--add", img, "bad")
    sh("qemu-io", "-c", "write 0 4k", img)
    from dirtybits.format.qcow2.bitmaps import BitmapsExtension
    from dirtybits.format.qcow2.header import EXT_BITMAPS, HeaderCluster

    raw = bytearray(img.read_bytes())
    hc = HeaderCluster.unpack(bytes(raw[:65536]))
    ext = hc.extension(EXT_BITMAPS)
    assert ext is not None
    bext = BitmapsExtension.unpack(ext.data)
    d = bext.bitmap_directory_offset
    second = d + 24 + 8  # the first entry ("good") is 32 bytes long
    raw[second + 17] = 40  # granularity_bits out of QEMU's range
    img.write_bytes(bytes(raw))
    assert sh("qemu-img", "info", img, ok=(1,)).returncode == 1  # QEMU refuses the image
    assert db("bitmap", "--dump", img, "good").stdout.startswith("         0")
    broken = db("bitmap", "--dump", img, "bad", ok=(1,))
    assert "damaged" in broken.stderr
    db("bitmap", "--remove", img, "bad")
    assert [b["name"] for b in qemu_bitmaps(img)] == ["good"]


WORKLOAD = ("write 0 64k", "write 512k 4k", "write -z 768k 64k", "discard 128k 64k")


def test_dirtybits_io_records_writes_like_qemu_io(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for img in (ours, theirs):
        sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
        sh("qemu-img", "bitmap", "--add", img, "b0")
        sh("qemu-img", "bitmap", "--add", "--disable", img, "off")
    sh("qemu-io", *[a for c in WORKLOAD for a in ("-c", c)], theirs)
    db("io", *[a for c in WORKLOAD for a in ("-c", c)], ours)
    assert qemu_bitmaps(ours) == qemu_bitmaps(theirs)  # flags cleared, same order
    for name in ("b0", "off"):
        assert db("bitmap", "--sha256", ours, name).stdout == \
            db("bitmap", "--sha256", theirs, name).stdout
        assert nbd_map(ours, name) == nbd_map(theirs, name)
    assert "1 dirty" not in nbd_map(ours, "off")
    sh("qemu-img", "check", ours)
    # and QEMU continues a bitmap we stored
    sh("qemu-io", "-c", "write 960k 4k", ours)
    assert "    983040       65536    1  dirty" in db("bitmap", "--dump", ours, "b0").stdout


def test_killed_writer_leaves_bitmaps_in_use(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    sh("qemu-img", "bitmap", "--add", img, "b0")
    proc = db_session("io", "--checkpoint=none", img)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("write 0 4k\n")
    proc.stdin.flush()
    assert proc.stdout.readline().startswith("wrote 4096/4096")
    proc.kill()
    proc.wait()
    # never silently stale: the bitmap says it may have missed writes
    assert qemu_bitmaps(img)[0]["flags"] == ["in-use", "auto"]
    sh("qemu-img", "check", img)


def _io_session(img: Path, *opts: str) -> subprocess.Popen[str]:
    return db_session("io", *opts, img)


def _say(proc: subprocess.Popen[str], line: str, expect: str) -> None:
    """Run one command and wait until it is done: ``length`` after it is the fence."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\nlength\n")
    proc.stdin.flush()
    out = []
    while not (got := proc.stdout.readline()).endswith(" MiB\n"):
        assert got, (line, out)
        out.append(got)
    assert "".join(out).startswith(expect), (line, out)


def test_flush_checkpoints_so_a_kill_leaves_bitmaps_consistent(tmp_path: Path) -> None:
    """QEMU keeps in_use from open to close; we clear it at each checkpoint. A kill after a
    flush leaves the bitmap consistent for QEMU too, with every write; a write after the
    flush sets in_use again before it lands."""
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    sh("qemu-img", "bitmap", "--add", img, "b0")
    sh("qemu-img", "bitmap", "--add", "-g", "512", img, "fine")
    sh("qemu-io", "-c", "write 3M 4k", img)  # QEMU's own bits, which we must continue
    proc = _io_session(img, "--checkpoint=none")
    try:
        _say(proc, "write 0 4k", "wrote 4096/4096")
        flags = [b["flags"] for b in json.loads(sh("qemu-img", "info", "-U", "--output=json",
                                                   img).stdout)["format-specific"]["data"]
                 ["bitmaps"]]
        assert flags == [["in-use", "auto"]] * 2
        _say(proc, "write 1M 512", "wrote 512/512")
        _say(proc, "flush", "")
    finally:
        proc.kill()
        proc.wait()
    assert [b["flags"] for b in qemu_bitmaps(img)] == [["auto"], ["auto"]]
    sh("qemu-img", "check", img)
    assert nbd_map(img, "b0") == (
        "         0       65536    1  dirty\n"
        "     65536      983040    0  clean\n"
        "   1048576       65536    1  dirty\n"
        "   1114112     2031616    0  clean\n"
        "   3145728       65536    1  dirty\n"
        "   3211264      983040    0  clean\n")
    assert nbd_map(img, "fine") == db("bitmap", "--dump", img, "fine").stdout
    assert "   1048576         512    1  dirty" in nbd_map(img, "fine")
    # and after one more write the kill finds the bitmaps in use again
    proc = _io_session(img, "--checkpoint=none")
    try:
        _say(proc, "write 2M 4k", "wrote 4096/4096")
    finally:
        proc.kill()
        proc.wait()
    assert [b["flags"] for b in qemu_bitmaps(img)] == [["in-use", "auto"]] * 2
    sh("qemu-img", "check", img)
