"""Internal snapshots beside QEMU 7.2 (issue 11, item 1), both directions.

The same sequence of snapshot commands and writes goes through dirtybits (``dirtybits
snapshot``, ``dirtybits io``) and through QEMU (``qemu-img snapshot``, ``qemu-io``) on twin
images. After every step the two files are byte for byte the same, but for the wall-clock
dates in the snapshot table; ``qemu-img check`` is clean; each snapshot reads the same through
``qemu-img convert -l``. Messages and listings are qemu-img's. And QEMU lists, applies and
deletes the snapshots dirtybits made.
"""

from __future__ import annotations

import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

from peers import db, nbd_map, qemu_bitmaps, sh

pytestmark = pytest.mark.interop

SIZE = "4M"


def masked(path: Path) -> bytes:
    """The file with each snapshot's date (16-23 of its entry) zeroed: the only bytes two
    tools writing the same thing at different moments may differ in."""
    data = bytearray(path.read_bytes())
    nb, off = struct.unpack_from(">IQ", data, 60)
    pos = off
    for _ in range(nb):
        pos = off + ((pos - off + 7) & ~7)
        id_size, name_size = struct.unpack_from(">HH", data, pos + 12)
        extra = struct.unpack_from(">I", data, pos + 36)[0]
        data[pos + 16:pos + 24] = bytes(8)
        pos += 40 + extra + id_size + name_size
    return bytes(data)


def listing(path: Path, tool: str) -> list[str]:
    """``snapshot -l`` lines with the DATE column cut out."""
    argv = (["qemu-img", "snapshot", "-l", path] if tool == "qemu"
            else [sys.executable, "-m", "dirtybits.cli.main", "snapshot", "-l", path])
    out = sh(*argv).stdout
    return [re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", line)
            for line in out.splitlines()]


def snapshot_data(path: Path, name: str, work: Path) -> bytes:
    out = work / f"snap-{name}.raw"
    sh("qemu-img", "convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def twins(tmp_path: Path, *opts: str) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", *opts, ours, SIZE)
    sh("qemu-io", "-c", "write -P 0x11 0 640k", "-c", "write -P 0x12 2M 64k",
       "-c", "write -c -P 0x13 3M 64k", ours)
    shutil.copyfile(ours, theirs)
    return ours, theirs


# each step: (snapshot action, argument) or ("io", qemu-io command)
STEPS = [
    ("-c", "s1"),
    ("io", "write -P 0x21 4k 8k"),  # copy-on-write of a data cluster and its L2 table
    ("io", "write -P 0x22 3M 4k"),  # over a compressed cluster both views share
    ("io", "discard 128k 64k"),
    ("-c", "s2"),
    ("io", "write -z 0 64k"),
    ("io", "write -P 0x23 1M 200k"),
    ("-c", "s1"),  # a second snapshot with the same name: a new ID
    ("-a", "1"),  # by ID
    ("io", "write -P 0x24 64k 4k"),
    ("-d", "s2"),
    ("-a", "s1"),  # the first with this name
    ("-d", "s1"),
    ("io", "write -P 0x25 256k 64k"),
    ("-d", "s1"),
]


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4096"],
                                  ["-o", "refcount_bits=64,cluster_size=16384"],
                                  ["-o", "compat=0.10"], ["-o", "extended_l2=on"]],
                         ids=["64k", "4k", "refcount64", "v2", "extl2"])
def test_same_steps_same_file(tmp_path: Path, opts: list[str]) -> None:
    ours, theirs = twins(tmp_path, *opts)
    for i, (action, arg) in enumerate(STEPS):
        if action == "io":
            db("io", "-c", arg, ours)
            sh("qemu-io", "-c", arg, theirs)
        else:
            db("snapshot", action, arg, ours)
            sh("qemu-img", "snapshot", action, arg, theirs)
        assert masked(ours) == masked(theirs), f"files differ after step {i}: {action} {arg}"
        assert listing(ours, "dirtybits") == listing(theirs, "qemu")
    sh("qemu-img", "check", ours)
    sh("qemu-img", "compare", ours, theirs)


def test_snapshots_keep_their_data(tmp_path: Path) -> None:
    """Every snapshot dirtybits takes reads, through QEMU, what the disk read at that moment,
    however the active layer changes after it; QEMU applies and deletes them."""
    path, _ = twins(tmp_path)
    model: dict[str, bytes] = {}
    for k in range(4):
        name = f"n{k}"
        db("snapshot", "-c", name, path)
        model[name] = snapshot_data(path, name, tmp_path)
        db("io", "-c", f"write -P {0x40 + k} {k * 300}k 100k", "-c",
           f"write -z {k * 700 + 64}k 64k", "-c", f"discard {2048 + k * 64}k 64k", path)
        sh("qemu-img", "check", path)
    for name, data in model.items():
        assert snapshot_data(path, name, tmp_path) == data, name
    active = tmp_path / "active.raw"
    sh("qemu-img", "convert", "-O", "raw", path, active)
    # our convert -l reads what QEMU's does
    for name, data in model.items():
        out = tmp_path / "ours.raw"
        db("convert", "-l", name, "-O", "raw", path, out)
        assert out.read_bytes() == data
        out.unlink()
    # QEMU reverts to one of ours, then deletes the rest
    sh("qemu-img", "snapshot", "-a", "n1", path)
    out = tmp_path / "now.raw"
    sh("qemu-img", "convert", "-O", "raw", path, out)
    assert out.read_bytes() == model["n1"]
    for name in model:
        sh("qemu-img", "snapshot", "-d", name, path)
    sh("qemu-img", "check", path)
    assert listing(path, "qemu") == []


def test_messages_and_listing_match_qemu_img(tmp_path: Path) -> None:
    path, _ = twins(tmp_path)
    sh("qemu-img", "snapshot", "-c", "first", path)
    sh("qemu-img", "snapshot", "-c", "", path)
    sh("qemu-img", "snapshot", "-c", "first", path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    datafile = tmp_path / "df.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'df.raw'}",
       datafile, "1M")
    rc1 = tmp_path / "rc1.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", rc1, "1M")
    sh("qemu-io", "-c", "write 0 64k", rc1)
    cases = [
        [], ["-l"], ["-l", path, path], ["-l", "-c", "x", path], ["-l", "-l", path],
        ["-l", path], ["-U", "-l", path], ["-q", "-l", path], [path],
        ["-a", "nope", path], ["-d", "nope", path], ["-d", "1", path], ["-U", "-c", "x", path],
        ["-l", raw], ["-c", "x", raw], ["-a", "x", raw], ["-d", "x", raw],
        ["-c", "x", datafile], ["-l", datafile], ["-c", "x", rc1],
        ["-l", tmp_path / "missing.qcow2"],
    ]
    for args in cases:
        before = {p: p.read_bytes() for p in (path, raw, datafile, rc1)}
        theirs = sh("qemu-img", "snapshot", *args, ok=(0, 1))
        after_qemu = {p: p.read_bytes() for p in (path, raw, datafile, rc1)}
        for p, data in before.items():  # run ours on the same files as QEMU saw them
            p.write_bytes(data)
        ours = db("snapshot", *args, ok=(0, 1))
        shown = [str(a) for a in args]
        assert ours.returncode == theirs.returncode, (shown, ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout, shown
        want = [line.replace("qemu-img:", "dirtybits snapshot:")
                .replace("'qemu-img --help'", "'dirtybits snapshot --help'")
                for line in theirs.stderr.splitlines()
                if not line.startswith(("WARNING: Image format", "         "))]
        assert ours.stderr.splitlines() == want, shown
        if theirs.returncode:
            assert {p: p.read_bytes() for p in before} == before, shown
        for p, data in after_qemu.items():
            p.write_bytes(data)


def test_bitmaps_on_an_image_with_snapshots(tmp_path: Path) -> None:
    """Persistent bitmaps behave as in QEMU: snapshots leave them consistent, writes over
    shared clusters are recorded, and applying a snapshot is refused while they exist."""
    ours, theirs = twins(tmp_path)
    for p in (ours, theirs):
        sh("qemu-img", "bitmap", "--add", "-g", "65536", p, "b0")
    db("snapshot", "-c", "s1", ours)
    sh("qemu-img", "snapshot", "-c", "s1", theirs)
    for cmd in ("write -P 0x31 8k 4k", "write -P 0x32 2M 64k", "discard 512k 64k"):
        db("io", "-c", cmd, ours)
        sh("qemu-io", "-c", cmd, theirs)
    db("snapshot", "-c", "s2", ours)
    sh("qemu-img", "snapshot", "-c", "s2", theirs)
    db("bitmap", "--add", ours, "b1")
    sh("qemu-img", "bitmap", "--add", theirs, "b1")
    db("io", "-c", "write -P 0x33 1M 4k", ours)
    sh("qemu-io", "-c", "write -P 0x33 1M 4k", theirs)
    assert qemu_bitmaps(ours) == qemu_bitmaps(theirs)
    for name in ("b0", "b1"):
        assert nbd_map(ours, name) == nbd_map(theirs, name), name
    sh("qemu-img", "check", ours)
    sh("qemu-img", "compare", ours, theirs)
    before = ours.read_bytes()
    theirs_err = sh("qemu-img", "snapshot", "-a", "s1", theirs, ok=(1,)).stderr
    ours_err = db("snapshot", "-a", "s1", ours, ok=(1,)).stderr
    assert ours_err == theirs_err.replace("qemu-img:", "dirtybits snapshot:")
    assert "Device has active dirty bitmaps" in ours_err
    assert ours.read_bytes() == before
    db("snapshot", "-d", "s1", ours)
    sh("qemu-img", "snapshot", "-d", "s1", theirs)
    assert qemu_bitmaps(ours) == qemu_bitmaps(theirs)
    # (not byte for byte: QEMU rewrites every bitmap each time it opens the image
    # read-write, dirtybits only the ones that changed)
    assert listing(ours, "dirtybits") == listing(theirs, "qemu")
    sh("qemu-img", "check", ours)
    sh("qemu-img", "compare", ours, theirs)


def test_check_repairs_leaks_beside_snapshots(tmp_path: Path) -> None:
    """A crash of a writer leaves leaks; ``check -r leaks`` on an image with snapshots fixes
    them as QEMU does (same file)."""
    ours, _ = twins(tmp_path)
    db("snapshot", "-c", "s1", ours)
    data = bytearray(ours.read_bytes())
    rto = struct.unpack_from(">Q", data, 48)[0]
    rb = struct.unpack_from(">Q", data, rto)[0]
    count = struct.unpack_from(">H", data, rb + 2 * 5)[0]
    struct.pack_into(">H", data, rb + 2 * 5, count + 1)  # a leaked reference
    ours.write_bytes(bytes(data))
    theirs = tmp_path / "leak-theirs.qcow2"
    shutil.copyfile(ours, theirs)
    assert sh("qemu-img", "check", ours, ok=(3,)).returncode == 3
    db("check", "-r", "leaks", ours)
    sh("qemu-img", "check", "-r", "leaks", theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    sh("qemu-img", "check", ours)


def test_resize_with_snapshots(tmp_path: Path) -> None:
    """v3 images with snapshots grow (the snapshots keep their size and data); v2 ones are
    refused with QEMU's words."""
    ours, theirs = twins(tmp_path)
    for p, tool in ((ours, "db"), (theirs, "qemu")):
        if tool == "db":
            db("snapshot", "-c", "s1", p)
            db("resize", p, "+2M")
        else:
            sh("qemu-img", "snapshot", "-c", "s1", p)
            sh("qemu-img", "resize", p, "+2M")
    assert masked(ours) == masked(theirs)
    # (convert -l reads a snapshot at the disk's current size, the rest as zeros)
    assert snapshot_data(ours, "s1", tmp_path) == snapshot_data(theirs, "s1", tmp_path)
    # applying the smaller snapshot takes the disk back to its size, as QEMU does
    db("snapshot", "-a", "s1", ours)
    sh("qemu-img", "snapshot", "-a", "s1", theirs)
    sh("qemu-img", "check", ours)
    sh("qemu-img", "compare", ours, theirs)
    v2, _ = twins(tmp_path / "v2" if (tmp_path / "v2").mkdir() is None else tmp_path,
                  "-o", "compat=0.10")
    db("snapshot", "-c", "s1", v2)
    theirs_err = sh("qemu-img", "resize", v2, "+1M", ok=(1,)).stderr
    ours_err = db("resize", v2, "+1M", ok=(1,)).stderr
    assert "Can't resize a v2 image which has snapshots" in theirs_err
    assert "Can't resize a v2 image which has snapshots" in ours_err
