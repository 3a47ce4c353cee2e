"""Resilient mode against QEMU 7.2: QEMU keeps our extension, clears our autoclear bit when it
writes (so the map is then not trusted), and sees recovered bitmaps as consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from dirtybits.block import write_intent
from dirtybits.qcow2.image import Qcow2Image
from peers import db, db_crash_after, nbd_map, qemu_bitmaps, sh

pytestmark = pytest.mark.interop


def flags(img: Path) -> list[object]:
    return [b["flags"] for b in qemu_bitmaps(img, force_share=True)]


def map_state(img: Path) -> tuple[list[int] | None, bool]:
    with Qcow2Image.open(str(img), readonly=True, force_share=True) as q:
        rec = write_intent.describe(q)
        return (rec.regions() if rec else None), write_intent.is_valid(q)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    sh("qemu-img", "bitmap", "--add", img, "b0")
    db("amend", "-o", "resilient=on,resilient-region=1M", img)
    sh("qemu-img", "check", img)
    return img


def test_crash_recovered_and_qemu_sees_a_consistent_bitmap(image: Path) -> None:
    db_crash_after(image, "write 0 4k", "write 20M 512")
    assert flags(image) == [["in-use", "auto"]]
    assert map_state(image) == ([0, 20], True)
    sh("qemu-img", "check", image)
    db("io", "-c", "read 0 512", image)  # a tracked open recovers the bitmap
    assert flags(image) == [["auto"]]
    sh("qemu-img", "check", image)
    assert nbd_map(image, "b0") == (
        "         0     1048576    1  dirty\n"
        "   1048576    19922944    0  clean\n"
        "  20971520     1048576    1  dirty\n"
        "  22020096    45088768    0  clean\n")


def test_qemu_write_invalidates_the_map(image: Path) -> None:
    db_crash_after(image, "write 0 4k")
    sh("qemu-io", "-c", "write 30M 4k", image)  # QEMU: b0 stays inconsistent, our bit cleared
    regions, valid = map_state(image)
    assert regions == [0] and not valid  # QEMU kept the extension, cleared our autoclear bit
    db("io", "-c", "write 40M 4k", image)
    assert flags(image) == [["in-use", "auto"]]  # never trusted: still inconsistent
    sh("qemu-img", "check", image)


def test_qemu_keeps_the_extension_across_its_own_rewrites(image: Path) -> None:
    db("io", "-c", "write 0 4k", image)
    assert map_state(image) == ([0], True)
    sh("qemu-img", "bitmap", "--add", image, "b1")  # QEMU rewrites the header cluster
    regions, valid = map_state(image)
    assert regions == [0] and not valid
    db("io", "-c", "write 8M 4k", image)  # a new epoch starts, excluding nothing
    assert map_state(image) == ([8], True)  # hot regions stay marked one checkpoint longer
    db_crash_after(image, "write 9M 4k")
    db("io", "-c", "read 0 512", image)
    assert flags(image) == [["auto"], ["auto"]]
    # region 9 (the crashed write) and region 8 (still marked) come back dirty
    assert nbd_map(image, "b1") == ("         0     8388608    0  clean\n"
                                    "   8388608     2097152    1  dirty\n"
                                    "  10485760    56623104    0  clean\n")
