"""Resizing images with persistent bitmaps (issue 10, item 10), beside QEMU 7.2 doing the same.

QEMU resizes such images (``qemu-img resize``, ``qemu-io -c truncate``) and the bitmaps follow
the new size, the grown area clean; it refuses while a bitmap is inconsistent. dirtybits does
the same, and the result is the same image as far as QEMU can tell: ``qemu-img check`` clean,
the same size and flags, the same bits served by ``qemu-nbd -B``, before and after QEMU writes
to the grown area.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
from pathlib import Path

import pytest

from peers import db, db_crash_after, nbd_map, qemu_bitmaps, sh

pytestmark = pytest.mark.interop


def twins(tmp_path: Path, cluster: str = "65536") -> tuple[Path, Path]:
    a = tmp_path / "ours.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", a, "64M")
    sh("qemu-img", "bitmap", "--add", "-g", "4096", a, "b0")
    sh("qemu-img", "bitmap", "--add", a, "b1")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 64k", "-c", "write -P 0x12 63M 1M", a)
    sh("qemu-img", "bitmap", "--disable", a, "b1")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x13 8M 4k", a)
    b = tmp_path / "qemu.qcow2"
    shutil.copyfile(a, b)
    return a, b


def same_for_qemu(a: Path, b: Path) -> None:
    sh("qemu-img", "check", a)
    sh("qemu-img", "check", b)
    assert qemu_bitmaps(a) == qemu_bitmaps(b)
    sh("qemu-img", "compare", a, b)
    for name in ("b0", "b1"):
        assert nbd_map(a, name) == nbd_map(b, name), name


@pytest.mark.parametrize("cluster", ["65536", "512"])
def test_resize_with_bitmaps_as_qemu(tmp_path: Path, cluster: str) -> None:
    ours, qemu = twins(tmp_path, cluster)
    assert db("resize", ours, "+1G").stdout == "Image resized.\n"
    sh("qemu-img", "resize", qemu, "+1G")
    same_for_qemu(ours, qemu)
    info = sh("qemu-img", "info", "--output=json", ours).stdout
    assert '"virtual-size": 1140850688' in info
    # QEMU carries on with our bitmaps, in the grown area too
    for img in (ours, qemu):
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 1G 64k", "-c", "write 100M 512", img)
    same_for_qemu(ours, qemu)
    assert "1073741824" in nbd_map(ours, "b0")


def test_io_truncate_tracks_before_and_after(tmp_path: Path) -> None:
    ours, qemu = twins(tmp_path)
    cmds = ["-c", "write -P 0x31 2M 4k", "-c", "truncate 128M", "-c", "write -P 0x32 100M 8k",
            "-c", "write -P 0x33 3M 512"]
    db("io", *cmds, ours)
    sh("qemu-io", "-f", "qcow2", *cmds, qemu)
    same_for_qemu(ours, qemu)


def test_resilient_image_grows_and_stays_resilient(tmp_path: Path) -> None:
    ours, qemu = twins(tmp_path)
    db("amend", "-o", "resilient=on", ours)
    db("io", "-c", "write -P 0x41 5M 4k", ours)
    db("resize", ours, "128M")
    sh("qemu-img", "resize", qemu, "128M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 5M 4k", qemu)
    info = db("info", ours).stdout
    assert "resilient" in info, info
    # a crash after the resize: the tracked reopen recovers from the new map
    db_crash_after(ours, "write -P 0x42 120M 4k")
    assert any("in-use" in b["flags"] for b in qemu_bitmaps(ours))  # type: ignore[operator]
    db("io", "-c", "read -P 0x42 120M 4k", ours)  # tracked open: recovers
    assert not any("in-use" in b["flags"] for b in qemu_bitmaps(ours))  # type: ignore[operator]
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 120M 4k", qemu)
    sh("qemu-img", "check", ours)
    dirty = nbd_map(ours, "b0")
    covered = [(int(a), int(n)) for a, n, bit, *_ in map(str.split, dirty.splitlines())
               if bit == "1"]
    at = 120 << 20  # written before the crash: the recovered bitmap covers it
    assert any(a <= at < a + n for a, n in covered), dirty


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resize_refuses_an_inconsistent_bitmap(tmp_path: Path) -> None:
    ours, qemu = twins(tmp_path)
    for img in (ours, qemu):
        sh("qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "sigraise 9", img,
           ok=(-signal.SIGKILL, 128 + signal.SIGKILL))
    before = _sha(ours)
    out = db("resize", ours, "+1G", ok=(1,))
    assert re.search(r"Bitmap 'b[01]' is inconsistent and cannot be used", out.stderr), out
    assert len(out.stderr.splitlines()) == 1
    assert _sha(ours) == before
    q = sh("qemu-img", "resize", qemu, "+1G", ok=(1,))
    assert re.search(r"Bitmap 'b[01]' is inconsistent and cannot be used", q.stderr), q
    # once removed, both resize; a new bitmap follows the size
    for img in (ours, qemu):
        sh("qemu-img", "bitmap", "--remove", img, "b0")
        sh("qemu-img", "bitmap", "--remove", img, "b1")
        sh("qemu-img", "bitmap", "--add", img, "b2")
    db("resize", ours, "+1G")
    sh("qemu-img", "resize", qemu, "+1G")
    sh("qemu-img", "check", ours)
    assert nbd_map(ours, "b2") == nbd_map(qemu, "b2")


def test_shrinking_needs_shrink_and_is_refused(tmp_path: Path) -> None:
    ours, _ = twins(tmp_path)
    before = _sha(ours)
    out = db("resize", ours, "--", "-1M", ok=(1,))
    assert "Use the --shrink option to perform a shrink operation." in out.stderr
    out = db("resize", "--shrink", ours, "32M", ok=(1,))
    assert "shrinking" in out.stderr and "Traceback" not in out.stderr
    assert _sha(ours) == before
