"""Extended L2 entries (subclusters) against QEMU 7.2, both directions.

The same requests (partial and whole-cluster writes, write-zeroes with and without unmap,
discards, over compressed clusters and backing files) go to twin images, ours through
``dirtybits io`` and QEMU's through ``qemu-io``. QEMU is the judge: ``qemu-img check`` clean,
``qemu-img compare`` identical (QEMU reading our image), ``dirtybits convert`` of QEMU's image
equal to qemu-img's (us reading QEMU's), and ``dirtybits map`` equal byte for byte to
``qemu-img map`` on each image, with the same subcluster layout on both twins.
"""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path

import pytest

from peers import db, nbd_dirty_bytes, sh

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 4 * MiB


def _ops(seed: int, cluster: int, size: int = SIZE) -> list[str]:
    """qemu-io commands that land on subcluster and cluster edges, and past them."""
    rnd = random.Random(seed)
    sc = cluster // 32
    out: list[str] = []
    for i in range(28):
        base = rnd.randrange(0, size // sc) * sc
        jitter = rnd.choice([0, 0, 1, 511, 512, sc // 2, sc - 512, cluster - sc])
        off = min(base + jitter, size - 512)
        off -= off % 512 if rnd.random() < 0.7 else 0
        length = rnd.choice([1, 512, 1000, sc, sc + 512, 3 * sc, cluster, cluster + sc,
                             2 * cluster + 1000, 5 * cluster])
        length = max(1, min(length, size - off))
        kind = rnd.random()
        if kind < 0.5:
            out.append(f"write -P {(i % 250) + 1} {off} {length}")
        elif kind < 0.7:
            out.append(f"write -z {off} {length}")
        elif kind < 0.8:
            out.append(f"write -z -u {off} {length}")
        elif kind < 0.9:
            out.append(f"discard {off} {length}")
        else:
            out.append(f"write -c -P {(i % 250) + 1} {off - off % cluster} {cluster}"
                       if off - off % cluster + cluster <= size else f"write -P 3 {off} 1")
    return out


def _split(cmds: list[str], ours: bool) -> list[list[str]]:
    """Compressed writes are QEMU's (dirtybits io writes them only where it can): both twins
    get them from qemu-io, in the same order as the rest."""
    groups: list[list[str]] = []
    for c in cmds:
        tool = "qemu" if c.startswith("write -c") or not ours else "db"
        if not groups or groups[-1][0] != tool:
            groups.append([tool])
        groups[-1].append(c)
    return groups


def _apply(img: Path, cmds: list[str], ours: bool) -> list[str]:
    """Run the commands; return qemu-io's outputs (a compressed write fails with EIO on an
    allocated cluster: both twins must fail alike)."""
    said: list[str] = []
    for group in _split(cmds, ours):
        tool, rest = group[0], group[1:]
        if tool == "db":
            db("io", *[a for c in rest for a in ("-c", c)], img)
            continue
        for c in rest:  # one at a time: qemu-io stops at the first failure
            out = sh("qemu-io", "-f", "qcow2", "-c", c, img, ok=(0, 1)).stdout
            if c.startswith("write -c"):
                said.append(out.split(" at ")[0])
    return said


def _shape(path: Path) -> list[dict[str, object]]:
    """qemu-img map without host offsets (allocation order may differ)."""
    out = json.loads(sh("qemu-img", "map", "--output=json", path).stdout)
    for e in out:
        e.pop("offset", None)
    return list(out)


def _maps_equal(path: Path) -> None:
    ours = db("map", "--output=json", path).stdout
    theirs = sh("qemu-img", "map", "--output=json", path).stdout
    assert ours == theirs


def _twins(tmp_path: Path, opts: str, backing: bool) -> tuple[Path, Path]:
    if backing:
        base = tmp_path / "base.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE - 3 * 65536))
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xbb 0 1M", "-c", "write -P 0xcc 2M 512k",
           "-c", "write -z 1200k 64k", base)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    extra = ["-b", "base.qcow2", "-F", "qcow2"] if backing else []
    for p in (ours, theirs):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *extra, p, str(SIZE))
    return ours, theirs


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "backing"])
@pytest.mark.parametrize(("cluster", "seed"), [(65536, 1), (65536, 2), (16384, 3),
                                               (2 * MiB, 4), (65536, 5)])
def test_requests_match_qemu_io(tmp_path: Path, cluster: int, seed: int,
                                backing: bool) -> None:
    ours, theirs = _twins(tmp_path, f"extended_l2=on,cluster_size={cluster}", backing)
    cmds = _ops(seed, cluster)
    assert _apply(ours, cmds, True) == _apply(theirs, cmds, False)
    sh("qemu-img", "check", ours)
    sh("qemu-img", "compare", ours, theirs)
    # the same subclusters allocated, zero, unallocated on both twins
    assert _shape(ours) == _shape(theirs)
    _maps_equal(ours)
    _maps_equal(theirs)
    # us reading QEMU's image: the same bytes as qemu-img convert
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    db("convert", "-O", "raw", theirs, a)
    sh("qemu-img", "convert", "-O", "raw", theirs, b)
    assert a.read_bytes() == b.read_bytes()
    assert "No errors" in db("check", ours).stdout


def test_image_made_by_dirtybits_reads_in_qemu(tmp_path: Path) -> None:
    ours = tmp_path / "d.qcow2"
    db("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", ours, "3M")
    db("io", "-c", "write -P 1 100 5000", "-c", "write -P 2 1M 100k", "-c", "write -z 1030k 1k",
       "-c", "write -P 3 2M 1", ours)
    info = json.loads(sh("qemu-img", "info", "--output=json", ours).stdout)
    assert info["format-specific"]["data"]["extended-l2"] is True
    assert "extended l2: true" in db("info", ours).stdout
    sh("qemu-img", "check", ours)
    sh("qemu-io", "-r", "-c", "read -P 0 0 100", "-c", "read -P 1 100 5000",
       "-c", "read -P 0 5100 1043476", "-c", "read -P 2 1M 6k", "-c", "read -P 0 1030k 1k",
       "-c", "read -P 2 1031k 69k", "-c", "read -P 3 2M 1", ours)
    # 100..5100 touches subclusters 0-4 only (1 KiB each): the rest stay unallocated
    first = json.loads(sh("qemu-img", "map", "--output=json", ours).stdout)[:2]
    assert (first[0]["length"], first[0]["data"]) == (5120, True)
    assert (first[1]["data"], first[1]["present"]) == (False, False)
    _maps_equal(ours)


@pytest.mark.parametrize("raw", ["off", "on"])
def test_external_data_file(tmp_path: Path, raw: str) -> None:
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    for p in (ours, theirs):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o",
           f"extended_l2=on,data_file={tmp_path / p.stem}.data,data_file_raw={raw}", p,
           str(SIZE))
    cmds = [c for c in _ops(7, 65536) if not c.startswith("write -c")]
    _apply(ours, cmds, True)
    _apply(theirs, cmds, False)
    sh("qemu-img", "check", ours)
    sh("qemu-img", "compare", ours, theirs)
    assert _shape(ours) == _shape(theirs)
    _maps_equal(ours)
    if raw == "on":  # the raw data file reads as the disk, as QEMU's does
        assert (tmp_path / "o.data").read_bytes() == (tmp_path / "t.data").read_bytes()


def test_resize_grows_like_qemu(tmp_path: Path) -> None:
    ours, theirs = _twins(tmp_path, "extended_l2=on", True)
    for p, tool in ((ours, "db"), (theirs, "qemu")):
        if tool == "db":
            db("io", "-c", "write -P 5 4000k 10k", p)
            db("resize", p, "300M")
            db("io", "-c", "write -P 6 299M 3k", p)
        else:
            sh("qemu-io", "-c", "write -P 5 4000k 10k", p)
            sh("qemu-img", "resize", "-q", p, "300M")
            sh("qemu-io", "-c", "write -P 6 299M 3k", p)
    sh("qemu-img", "check", ours)
    sh("qemu-img", "compare", ours, theirs)
    assert _shape(ours) == _shape(theirs)


def _l2_slot(path: Path, guest: int, cluster: int = 65536) -> int:
    """File offset of the 16-byte L2 entry for ``guest`` (first L2 table only)."""
    data = path.read_bytes()
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    assert l2
    return int(l2 + (guest // cluster) * 16)


@pytest.mark.parametrize(("what", "bitmap"), [
    ("alloc-and-zero", (1 << 32) | 1),
    ("alloc-on-unallocated", 1),
])
def test_invalid_bitmaps_refused_as_qemu(tmp_path: Path, what: str, bitmap: int) -> None:
    img = tmp_path / "bad.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img, "1M")
    sh("qemu-io", "-c", "write -P 1 128k 4k", img)  # the L2 table
    if what == "alloc-and-zero":
        sh("qemu-io", "-c", "write -P 1 0 64k", img)
    slot = _l2_slot(img, 0)
    with open(img, "r+b") as f:
        f.seek(slot + 8)
        f.write(struct.pack(">Q", bitmap))
    before = img.read_bytes()
    # read-only: both refuse the read, nothing written
    q = sh("qemu-io", "-r", "-c", "read 0 4k", img, ok=(0, 1))
    assert "Input/output error" in q.stdout + q.stderr
    d = db("io", "-r", "-c", "read 0 4k", img, ok=(0, 1))
    assert "Invalid cluster entry found" in d.stdout + d.stderr
    assert "Traceback" not in d.stderr
    assert img.read_bytes() == before
    # other clusters still read
    db("io", "-r", "-c", "read -P 0 64k 64k", img)
    # read-write: QEMU marks the image corrupt; so do we
    twin = tmp_path / "twin.qcow2"
    twin.write_bytes(before)
    sh("qemu-io", "-c", "write -P 2 0 4k", twin, ok=(0, 1))
    d = db("io", "-c", "write -P 2 0 4k", img, ok=(0, 1))
    assert "Traceback" not in d.stderr
    for p in (img, twin):
        info = json.loads(sh("qemu-img", "info", "--output=json", p).stdout)
        assert info["format-specific"]["data"]["corrupt"] is True, p
    # check reports it as QEMU's check does
    ours = db("check", "--output=json", img, ok=(0, 1, 2, 3))
    theirs = sh("qemu-img", "check", "--output=json", img, ok=(0, 1, 2, 3))
    assert json.loads(ours.stdout)["corruptions"] == json.loads(theirs.stdout)["corruptions"]


def test_compressed_cluster_with_bitmap_is_reported(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img, "1M")
    sh("qemu-io", "-c", "write -c -P 9 0 64k", img)
    sh("qemu-io", "-c", "write -P 1 128k 4k", img)
    with open(img, "r+b") as f:
        f.seek(_l2_slot(img, 0) + 8)
        f.write(struct.pack(">Q", 5))
    ours = db("check", img, ok=(0, 1, 2, 3))
    theirs = sh("qemu-img", "check", img, ok=(0, 1, 2, 3))
    assert ours.returncode == theirs.returncode
    pat = re.compile(r"\d+ errors? were found")
    assert pat.findall(ours.stdout) == pat.findall(theirs.stdout)
    db("io", "-r", "-c", "read -P 9 0 64k", img)  # QEMU reads it too (the bitmap is ignored)
    sh("qemu-io", "-r", "-c", "read -P 9 0 64k", img)


@pytest.mark.parametrize("mode", ["cache-none", "writethrough", "resilient"])
def test_cache_modes_and_resilient(tmp_path: Path, mode: str) -> None:
    ours, theirs = _twins(tmp_path, "extended_l2=on,cluster_size=32k", True)
    sh("qemu-img", "bitmap", "--add", "-g", "65536", ours, "b0")
    if mode == "resilient":
        db("amend", "-o", "resilient=on", ours)
    flags = {"cache-none": ["-t", "none"], "writethrough": ["-t", "writethrough"],
             "resilient": []}[mode]
    cmds = [c for c in _ops(11, 32768) if not c.startswith("write -c")]
    db("io", *flags, *[a for c in cmds for a in ("-c", c)], ours)
    sh("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], theirs)
    sh("qemu-img", "check", ours)
    sh("qemu-img", "compare", ours, theirs)
    assert _shape(ours) == _shape(theirs)


def test_bitmap_records_writes(tmp_path: Path) -> None:
    """The dirty bitmap of an extended-L2 image records our writes; QEMU serves it."""
    img = tmp_path / "b.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img, "4M")
    sh("qemu-img", "bitmap", "--add", "-g", "65536", img, "b0")
    db("io", "-c", "write -P 1 100k 3k", "-c", "write -z 1M 2k", "-c", "write -P 2 3M 128k",
       img)
    assert nbd_dirty_bytes(img, "b0") == 64 * 1024 * 4
    dump = db("bitmap", "--dump", img, "b0").stdout
    assert "102400" not in dump and "   65536       65536    1  dirty" in dump, dump
    sh("qemu-img", "check", img)


@pytest.mark.parametrize("source", ["standard", "extl2-backing"])
def test_convert_to_extl2_is_qemu_img_convert(tmp_path: Path, source: str) -> None:
    """``convert -O qcow2 -o extended_l2=on`` skips zero blocks per subcluster (not per
    cluster): from a standard image, the very same bytes as qemu-img convert; from an image
    with zero runs at 512-byte edges, the same data (qemu-img's zero detection also cuts
    runs at sector edges inside a 4k block: not reproduced)."""
    if source == "standard":
        src = tmp_path / "src.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
        sh("qemu-io", "-c", "write -P 1 0 100k", "-c", "write -P 2 1M 3k", "-c",
           "write -z 2M 64k", "-c", "write -P 3 3000k 5k", src)
    else:
        src, _ = _twins(tmp_path, "extended_l2=on", True)
        _apply(src, [c for c in _ops(13, 65536) if not c.startswith("write -c")], False)
    ours, theirs = tmp_path / "out-ours.qcow2", tmp_path / "out-theirs.qcow2"
    db("convert", "-O", "qcow2", "-o", "extended_l2=on", src, ours)
    sh("qemu-img", "convert", "-O", "qcow2", "-o", "extended_l2=on", src, theirs)
    sh("qemu-img", "compare", ours, theirs)
    sh("qemu-img", "check", ours)
    if source == "standard":
        assert ours.read_bytes() == theirs.read_bytes()
