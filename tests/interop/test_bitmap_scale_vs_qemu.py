"""Bitmaps at scale and at the format's edges, both ways between dirtybits and QEMU 7.2.

What tests/interop/test_bitmap_vs_qemu.py does not cover: 100 bitmaps in one image (we add
them -> qemu-img lists, checks and dirties them and qemu-nbd serves them as we dump them;
qemu-img adds them -> ``dirtybits info`` lists them alike), and every ``dirtybits bitmap``
action on images with 512 B and 2 MiB clusters, at granularities 512 B, 64 KiB and 2 GiB, on a
disk whose size is a multiple of none but the smallest, each step followed by a clean
``qemu-img check``, ``qemu-img info`` showing what we expect, and every bitmap dumping through
``qemu-nbd -B`` + ``nbdinfo --map`` exactly as we dump it and as the writes predict.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import pytest

import peers
from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.cli.bitmap import write_map
from dirtybits.qcow2.image import Qcow2Image
from peers import db, nbd_map, qemu_bitmaps, sh

pytestmark = pytest.mark.interop
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def nbd_maps(path: Path, names: Iterable[str]) -> dict[str, str]:
    """``nbdinfo --map=qemu:dirty-bitmap:NAME`` of each bitmap served by ``qemu-nbd -B``."""
    return {name: nbd_map(path, name) for name in names}


def our_maps(path: Path, names: Iterable[str]) -> dict[str, str]:
    """What ``dirtybits bitmap --dump`` prints for each bitmap (its own code, in-process: one
    process per bitmap would make this test slow)."""
    out = {}
    with Qcow2Image.open(str(path), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        for name in names:
            buf = io.StringIO()
            size = store.disk_size & ~511
            write_map(buf, store.load(name).extents(0, size), size)
            out[name] = buf.getvalue()
    return out


def expected_map(size: int, granularity: int, writes: Iterable[tuple[int, int]]) -> str:
    """The dump of a bitmap that recorded exactly ``writes`` (offset, length)."""
    bm = DirtyBitmap(size, granularity)
    for off, length in writes:
        bm.set(off, length)
    buf = io.StringIO()
    write_map(buf, bm.extents(0, size & ~511), size & ~511)
    return buf.getvalue()


def check_clean(path: Path) -> None:
    out = json.loads(sh("qemu-img", "check", "--output=json", path).stdout)
    assert out.get("corruptions", 0) == 0 and out.get("leaks", 0) == 0, out


def qemu_io(path: Path, writes: Iterable[tuple[int, int]]) -> None:
    peers.qemu_io(path, *[f"write {off} {n}" for off, n in writes], fmt="qcow2")


GRANS = (512, 64 * KiB, 2 * GiB, 4 * KiB, 1 * MiB)


def test_hundred_bitmaps_we_add_qemu_lists_checks_dirties_and_serves(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    size = 64 * MiB + 3 * 512  # not a multiple of any granularity above 512
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
    names = [f"bitmap-{i:03d}-{'é' * (i % 3)}" for i in range(100)]
    with Qcow2Image.open(str(img), keep_bitmaps=True) as image:
        store = Qcow2BitmapStore(image)
        for i, name in enumerate(names):
            store.add(name, GRANS[i % len(GRANS)], disabled=i % 7 == 3)
    want = [{"flags": [] if i % 7 == 3 else ["auto"], "name": name,
             "granularity": GRANS[i % len(GRANS)]} for i, name in enumerate(names)]
    assert qemu_bitmaps(img) == want
    check_clean(img)
    writes = [(0, 4 * KiB), (5 * MiB + 512, 70 * KiB), (size - 1536, 1536)]
    qemu_io(img, writes)
    assert qemu_bitmaps(img) == want  # stored back by QEMU, none left in use
    check_clean(img)
    enabled, disabled = (0, 1, 2, 8, 4, 99), (3, 10)  # every granularity; i % 7 == 3 is off
    picked = [names[i] for i in (*enabled, *disabled)]
    theirs = nbd_maps(img, picked)
    assert our_maps(img, picked) == theirs
    for i in (*enabled, *disabled):
        recorded = writes if i in enabled else []
        assert theirs[names[i]] == expected_map(size, GRANS[i % len(GRANS)], recorded), i
    for name in (names[1], names[99]):  # and the CLI prints the same
        assert db("bitmap", "--dump", img, name).stdout == theirs[name]


def test_hundred_bitmaps_qemu_adds_dirtybits_info_lists(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "10M")
    for i in range(100):
        gran = ("-g", str(GRANS[i % len(GRANS)])) if i % 5 else ()
        disabled = ("--disable",) if i % 9 == 4 else ()
        sh("qemu-img", "bitmap", "--add", *gran, *disabled, img, f"q{i}")
    sh("qemu-io", "-c", "write 1M 64k", img)
    theirs = qemu_bitmaps(img)
    assert len(theirs) == 100
    info = json.loads(db("info", "--output=json", img).stdout)
    ours = info["format-specific"]["data"]["bitmaps"]
    assert [{k: b[k] for k in ("flags", "name", "granularity")} for b in ours] == theirs
    human = db("info", img).stdout
    assert human.count("granularity:") == 100 and "name: q99\n" in human


SIZE = 4 * GiB + 64 * KiB + 1536  # 3 granules of 2 GiB, the last partial; 64 KiB ones too
W1 = [(0, 4 * KiB), (GiB - 512, 70 * KiB), (2 * GiB + 64 * KiB, 512), (SIZE - 1536, 1536)]
W2 = [(3 * GiB, 3 * KiB), (4 * GiB + 60 * KiB, 5 * KiB), (SIZE - 512, 512)]


@pytest.mark.parametrize("cluster", [512, 2 * MiB])
def test_every_action_at_the_edges(tmp_path: Path, cluster: int) -> None:
    img = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", img,
       str(SIZE))
    grans = (512, 64 * KiB, 2 * GiB)

    def verify(want: dict[str, tuple[int, bool, list[tuple[int, int]]]]) -> None:
        """QEMU sees exactly ``want`` (name -> granularity, enabled, recorded writes)."""
        assert qemu_bitmaps(img) == [{"flags": ["auto"] if on else [], "name": name,
                                      "granularity": g} for name, (g, on, _) in want.items()]
        check_clean(img)
        theirs = nbd_maps(img, want)
        assert our_maps(img, want) == theirs
        for name, (g, _, writes) in want.items():
            assert theirs[name] == expected_map(SIZE, g, writes), name

    # one process: add (enabled), disable, copy (a disabled copy), enable the first again
    for g in grans:
        db("bitmap", "--add", "-g", str(g), "--disable", "--copy", f"off-{g}", "--enable",
           img, f"on-{g}")
    qemu_io(img, W1)
    verify({n: (g, n.startswith("on"), W1 if n.startswith("on") else [])
            for g in grans for n in (f"on-{g}", f"off-{g}")})

    # merge the enabled one into the disabled one, keep a copy, then clear, enable and rename
    for g in grans:
        db("bitmap", "--merge", f"on-{g}", "--copy", f"cp-{g}", "--clear", "--enable",
           "--rename", f"mrg-{g}", img, f"off-{g}")
    qemu_io(img, W2)
    want: dict[str, tuple[int, bool, list[tuple[int, int]]]] = {}
    for g in grans:  # directory order: a rename keeps the place, copies come last
        want |= {f"on-{g}": (g, True, W1 + W2), f"mrg-{g}": (g, True, W2)}
    want |= {f"cp-{g}": (g, False, W1) for g in grans}
    verify(want)

    # remove, and QEMU's own bitmap tool still works on what we wrote
    for g in grans:
        db("bitmap", "--remove", img, f"on-{g}")
        del want[f"on-{g}"]
    sh("qemu-img", "bitmap", "--merge", f"cp-{grans[0]}", img, f"mrg-{grans[0]}")
    want[f"mrg-{grans[0]}"] = (grans[0], True, W1 + W2)
    verify(want)
