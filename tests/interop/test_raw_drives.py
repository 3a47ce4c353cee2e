"""Persistent bitmaps for raw drives, checked against QEMU 7.2.

A. A per-drive qcow2 metadata image with QEMU's external raw data file: we and QEMU write
   through it, both see the same bits (qemu-nbd -B + nbdinfo --map).
B. A container holding bitmaps for 20 raw drives: ``qemu-img check`` finds it clean and
   ``check -r all`` leaves every bitmap and binding intact; clashes, wrong drives and wrong
   sizes are refused; a killed writer leaves its drive's bitmaps in use or consistent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from peers import Arg, db, db_crash_after, nbd_map, sh

pytestmark = pytest.mark.interop
MiB = 1 << 20


def runs(text: str) -> list[tuple[int, int, int]]:
    return [(int(a), int(b), int(c)) for a, b, c, *_ in (ln.split() for ln in text.splitlines())]


def clip(extents: list[tuple[int, int, int]], size: int) -> list[tuple[int, int, int]]:
    """nbdinfo --map runs cut at ``size`` (a container's map cut to one drive)."""
    out = []
    for start, length, kind in extents:
        if start < size:
            out.append((start, min(length, size - start), kind))
    return out


def make_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ------------------------------------------------------------------ A: metadata image
def test_metadata_image_with_raw_data_file(tmp_path: Path) -> None:
    drive = make_raw(tmp_path / "d.raw", 4 * MiB)
    meta = tmp_path / "d.qcow2"
    # absolute: QEMU 7.2 resolves a relative data_file against its cwd, not the image's dir
    db("create", "-q", "-f", "qcow2", "-o", f"data_file={drive},data_file_raw=on", meta, "4M")
    info = json.loads(sh("qemu-img", "info", "--output=json", meta).stdout)
    assert info["format-specific"]["data"]["data-file-raw"] is True
    db("bitmap", "--add", meta, "b0")
    db("io", "-c", "write -P 0xab 1M 64k", meta)
    with open(drive, "rb") as f:  # the data went to the raw file, where a raw user sees it
        f.seek(MiB)
        assert f.read(65536) == b"\xab" * 65536
    ours = db("bitmap", "--dump", meta, "b0").stdout
    assert nbd_map(meta, "b0") == ours
    assert runs(ours) == [(0, MiB, 0), (MiB, 65536, 1), (MiB + 65536, 3 * MiB - 65536, 0)]
    # QEMU writing through the metadata image records in the same bitmap, and we see it
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 3M 4k", meta)
    ours = db("bitmap", "--dump", meta, "b0").stdout
    assert (3 * MiB, 65536, 1) in runs(ours)
    assert nbd_map(meta, "b0") == ours
    sh("qemu-img", "check", meta)
    # a write straight to the raw file bypasses every tracker (documented): no bit changes
    with open(drive, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\xee" * 4096)
    assert db("bitmap", "--dump", meta, "b0").stdout == ours


# ------------------------------------------------------------------ B: container
SIZES = [(i + 1) * MiB + (i % 4) * 65536 for i in range(20)]  # 1..20 MiB, all different
SIZES[19] = 64 * MiB


def _container(tmp_path: Path) -> tuple[Path, list[Path]]:
    from dirtybits.block.container import Container

    c = tmp_path / "bitmaps.qcow2"
    db("container", "create", c, "--max-size", "64M")
    drives = [make_raw(tmp_path / f"d{i:02d}.raw", size) for i, size in enumerate(SIZES)]
    with Container.open(str(c)) as ct:  # in-process: 20 CLI starts would dominate the test
        for d in drives:
            ct.attach(str(d))
        for i in [*range(0, 20, 3), 19]:
            ct.add_bitmap(f"d{i:02d}", "daily")
        ct.add_bitmap("d03", "hourly", 4096)
        ct.add_bitmap("d19", "hourly", 512 * 1024, disabled=True)
    return c, drives


def _cli(*args: Arg) -> str:
    """The CLI in-process (a subprocess per bitmap would dominate the test's time)."""
    from dirtybits.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([os.fspath(a) for a in args]) == 0
    return out.getvalue()


def _snapshot(c: Path) -> tuple[str, dict[str, str]]:
    """``container list --output=json`` and a ``--dump`` of every bitmap."""
    listing = db("container", "list", c, "--output=json").stdout
    dumps = {}
    for d in json.loads(listing)["drives"]:
        for b in d["bitmaps"]:
            dumps[b["stored-name"]] = _cli("container", "bitmap", c, d["id"], "--dump",
                                           b["name"])
    return listing, dumps


def _drive_table(c: Path) -> bytes:
    from dirtybits.block.container import EXT_DRIVES
    from dirtybits.qcow2.image import Qcow2Image

    with Qcow2Image.open(str(c), readonly=True) as img:
        ext = img.hc.extension(EXT_DRIVES)
        assert ext is not None
        return bytes(ext.data)


def test_container_for_20_drives_survives_qemu_img_check(tmp_path: Path) -> None:
    c, drives = _container(tmp_path)
    db("io", "--bitmap-file", c, "-c", "write -P 1 0 4k", "-c", "write 1M 100k", drives[3])
    db("io", "--bitmap-file", c, "-c", f"write 0 {SIZES[0]}", drives[0])
    db("io", "--bitmap-file", c, "-c", "write 63M 1M", "-c", "discard 10M 64k", drives[19])
    db("io", "--bitmap-file", c, "-c", "write 0 64k", drives[1])  # no bitmaps: just writes
    listing, dumps = _snapshot(c)
    data = json.loads(listing)
    assert [d["size"] for d in data["drives"]] == SIZES
    assert all(d["status"] == "ok" for d in data["drives"])
    dirty = {(d["id"], b["name"]): b["dirty-bytes"] for d in data["drives"]
             for b in d["bitmaps"]}
    assert dirty[("d00", "daily")] == SIZES[0]
    assert dirty[("d03", "daily")] == 65536 + 2 * 65536  # 1M+100k spans two 64k granules
    assert dirty[("d03", "hourly")] == 4096 + 102400
    assert dirty[("d19", "daily")] == MiB + 65536
    assert dirty[("d19", "hourly")] == 0  # disabled
    assert dirty[("d06", "daily")] == 0
    names = [b["name"] for b in json.loads(sh("qemu-img", "info", "--output=json",
                                              c).stdout)["format-specific"]["data"]["bitmaps"]]
    assert sorted(names) == sorted(dumps)
    # QEMU sees the same bits in the container (its export is the container's size)
    qemu = runs(nbd_map(c, "d03/hourly"))
    assert clip(qemu, SIZES[3]) == runs(dumps["d03/hourly"])
    assert all(kind == 0 for start, _, kind in qemu if start >= SIZES[3])
    # qemu-img check: clean, no leaks
    out = sh("qemu-img", "check", c).stdout
    assert "No errors were found on the image." in out and "leak" not in out
    table = _drive_table(c)
    # check -r all opens it read-write (QEMU stores every bitmap again at close)
    out = sh("qemu-img", "check", "-r", "all", c).stdout
    assert "No errors were found on the image." in out
    assert _drive_table(c) == table
    assert _snapshot(c) == (listing, dumps)
    assert "leak" not in sh("qemu-img", "check", c).stdout
    # and tracking goes on after QEMU rewrote the bitmaps
    db("io", "--bitmap-file", c, "-c", "write 5M 4k", drives[6])
    assert "1  dirty" in db("container", "bitmap", c, "d06", "--dump", "daily").stdout
    sh("qemu-img", "check", c)


def test_container_refusals(tmp_path: Path) -> None:
    c, drives = _container(tmp_path)
    out = db("container", "bitmap", c, "d03", "--add", "daily", ok=(1,))
    assert "Bitmap 'daily' already exists for drive 'd03'" in out.stderr
    # another file of the same size in the drive's place
    os.rename(drives[6], tmp_path / "d06.moved")
    make_raw(drives[6], SIZES[6])
    out = db("io", "--bitmap-file", c, "-c", "write 0 4k", drives[6], ok=(1,))
    assert "is not drive 'd06'" in out.stderr
    # the real drive, truncated
    os.truncate(drives[9], SIZES[9] - MiB)
    out = db("io", "--bitmap-file", c, "-c", "write 0 4k", drives[9], ok=(1,))
    assert f"the bitmaps are for {SIZES[9]} bytes" in out.stderr
    # nothing was written, no bitmap touched
    with open(drives[6], "rb") as f:
        assert not any(f.read())
    assert json.loads(db("container", "list", c, "--output=json").stdout)["drives"][9][
        "bitmaps"][0]["dirty-bytes"] == 0
    sh("qemu-img", "check", c)


def _bitmap_states(c: Path) -> dict[str, list[str]]:
    info = json.loads(sh("qemu-img", "info", "-U", "--output=json", c).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}


def test_killed_writer_leaves_bitmaps_in_use_or_consistent(tmp_path: Path) -> None:
    c, drives = _container(tmp_path)
    # killed after a write, before any checkpoint: its drive's bitmaps say "in use"
    db_crash_after(drives[3], "write 0 4k", options=("--bitmap-file", c, "--checkpoint=none"))
    states = _bitmap_states(c)
    assert states["d03/daily"] == ["in-use", "auto"]
    assert states["d03/hourly"] == ["in-use", "auto"]
    assert states["d00/daily"] == ["auto"]  # other drives' bitmaps are untouched
    out = db("container", "bitmap", c, "d03", "--dump", "daily", ok=(1,))
    assert "inconsistent" in out.stderr
    sh("qemu-img", "check", c)
    # killed after a flush (a checkpoint): consistent, covering every write
    db_crash_after(drives[0], "write 64k 4k", "write 512k 4k", "flush",
                   options=("--bitmap-file", c, "--checkpoint=none"))
    assert _bitmap_states(c)["d00/daily"] == ["auto"]
    assert runs(db("container", "bitmap", c, "d00", "--dump", "daily").stdout)[:4] == [
        (0, 65536, 0), (65536, 65536, 1), (131072, 393216, 0), (524288, 65536, 1)]
    # killed at an arbitrary moment with the default checkpoint policy: one of the two
    db_crash_after(drives[9], *[f"write {off} 4k" for off in range(0, 8 * MiB, MiB)],
                   options=("--bitmap-file", c))
    flags = _bitmap_states(c)["d09/daily"]
    if "in-use" not in flags:
        dump = runs(db("container", "bitmap", c, "d09", "--dump", "daily").stdout)
        dirty = {start for start, _, kind in dump if kind}
        assert dirty == {off for off in range(0, 8 * MiB, MiB)}
    sh("qemu-img", "check", c)
