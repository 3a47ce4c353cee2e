"""``dirtybits check`` against ``qemu-img check`` on the same images, clean and damaged.

Each scenario builds an image with the QEMU tools, damages it with direct byte pokes, then runs
both checkers on identical copies: JSON results (minus the file name) and exit codes must match.
Repairs run on two more copies; afterwards qemu-img must find the dirtybits-repaired image
exactly as clean as the one it repaired itself, and the guest contents must be unchanged.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import peers
from dirtybits.format.qcow2.header import HeaderCluster, Qcow2Header
from dirtybits.format.qcow2.refcount import get_refcount, set_refcount
from dirtybits.format.qcow2.tables import L1E_OFFSET_MASK, L2E_OFFSET_MASK, REFT_OFFSET_MASK
from peers import qemu_img, run

pytestmark = pytest.mark.interop

INCOMPATIBLE_FEATURES = 72
AUTOCLEAR_FEATURES = 88
OFLAG_COPIED = 1 << 63


# --------------------------------------------------------------------------- byte surgery
def header(path: Path) -> Qcow2Header:
    with open(path, "rb") as f:
        return HeaderCluster.unpack(f.read(2 << 20)).header


def extension_types(path: Path) -> set[int]:
    with open(path, "rb") as f:
        return {e.type for e in HeaderCluster.unpack(f.read(2 << 20)).extensions}


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def write_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _refblock(path: Path, cluster: int) -> tuple[int, int, int, int]:
    h = header(path)
    per_block = h.cluster_size * 8 >> h.refcount_order
    block = read_u64(path, h.refcount_table_offset + 8 * (cluster // per_block))
    assert block & REFT_OFFSET_MASK, f"no refcount block covers cluster {cluster}"
    return block & REFT_OFFSET_MASK, cluster % per_block, h.refcount_order, h.cluster_size


def stored_refcount(path: Path, cluster: int) -> int:
    block, index, order, cs = _refblock(path, cluster)
    with open(path, "rb") as f:
        f.seek(block)
        return get_refcount(f.read(cs), index, order)


def set_stored_refcount(path: Path, cluster: int, value: int) -> None:
    block, index, order, cs = _refblock(path, cluster)
    with open(path, "r+b") as f:
        f.seek(block)
        data = bytearray(f.read(cs))
        set_refcount(data, index, order, value)
        f.seek(block)
        f.write(data)


def l2_entry_offset(path: Path, guest_offset: int) -> int:
    """File offset of the (standard or extended) L2 entry mapping ``guest_offset``."""
    h = header(path)
    cs = h.cluster_size
    esize = 16 if h.incompatible_features & (1 << 4) else 8
    per_l2 = cs // esize
    cluster = guest_offset // cs
    l2 = read_u64(path, h.l1_table_offset + 8 * (cluster // per_l2)) & L1E_OFFSET_MASK
    assert l2, f"guest offset {guest_offset:#x} has no L2 table"
    return l2 + (cluster % per_l2) * esize


def data_cluster(path: Path, guest_offset: int) -> int:
    host = read_u64(path, l2_entry_offset(path, guest_offset)) & L2E_OFFSET_MASK
    assert host, f"guest offset {guest_offset:#x} is not allocated"
    return host // header(path).cluster_size


def add_leaked_clusters(path: Path, count: int, refcount: int = 1) -> None:
    """Grow the file by ``count`` clusters and give each a refcount nobody references."""
    cs = header(path).cluster_size
    end = -(-path.stat().st_size // cs)
    with open(path, "r+b") as f:
        f.truncate((end + count) * cs)
    for k in range(end, end + count):
        set_stored_refcount(path, k, refcount)


# --------------------------------------------------------------------------- running tools
def qemu_io(path: Path, *commands: str) -> None:
    proc = peers.qemu_io(path, *commands, fmt="qcow2")
    assert "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def parse_check(proc: subprocess.CompletedProcess[str]) -> tuple[int, dict[str, object] | None]:
    data = json.loads(proc.stdout) if proc.stdout.strip() else None
    if data is not None:
        data.pop("filename")
    return proc.returncode, data


def qemu_check(path: Path, *opts: str) -> tuple[int, dict[str, object] | None]:
    return parse_check(run("qemu-img", "check", "--output=json", *opts, path))


# --------------------------------------------------------------------------- scenarios
def make_image(workdir: Path, opts: str = "", size: str = "64M", name: str = "img.qcow2",
               writes: tuple[str, ...] = ("write -P 0x11 0 192k", "write -P 0x22 5M 64k",
                                          "write -z 9M 64k")) -> Path:
    path = workdir / name
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, size)
    if writes:
        qemu_io(path, *writes)
    return path


def clean(opts: str) -> Callable[[Path], Path]:
    return lambda w: make_image(w, opts)


def compressed(w: Path) -> Path:
    src = make_image(w, name="src.qcow2")
    dst = w / "img.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, dst)
    src.unlink()
    return dst


def snapshots(w: Path) -> Path:
    path = make_image(w)
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io(path, "write -P 0x33 0 64k", "write -P 0x44 20M 128k")
    qemu_img("snapshot", "-c", "s2", path)
    qemu_io(path, "write -P 0x55 64k 64k")
    return path


def bitmaps(w: Path) -> Path:
    path = make_image(w, writes=())
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "4096", path, "b1")
    qemu_io(path, "write -P 0x11 0 192k", "write -P 0x22 40M 64k")
    return path


def with_data_file(w: Path) -> Path:
    path = w / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={w / 'img.raw'},data_file_raw=on",
             path, "16M")
    qemu_io(path, "write -P 0x11 0 192k")
    return path


def leak_extra(opts: str = "", refcount: int = 1) -> Callable[[Path], Path]:
    def build(w: Path) -> Path:
        path = make_image(w, opts)
        add_leaked_clusters(path, 2, refcount)
        return path
    return build


def leak_bump(w: Path) -> Path:
    path = make_image(w)
    set_stored_refcount(path, data_cluster(path, 0), 2)
    return path


def refcount_zero(opts: str = "") -> Callable[[Path], Path]:
    def build(w: Path) -> Path:
        path = make_image(w, opts)
        set_stored_refcount(path, data_cluster(path, 64 * 1024), 0)
        return path
    return build


def refcount_too_low(w: Path) -> Path:
    path = make_image(w)
    entry = l2_entry_offset(path, 128 * 1024)
    write_u64(path, l2_entry_offset(path, 2 << 20), read_u64(path, entry) & ~OFLAG_COPIED)
    write_u64(path, entry, read_u64(path, entry) & ~OFLAG_COPIED)
    return path


def l2_into_header(w: Path) -> Path:
    path = make_image(w)
    write_u64(path, l2_entry_offset(path, 3 << 20), OFLAG_COPIED | 0x200)
    return path


def l2_misaligned(w: Path) -> Path:
    path = make_image(w)
    entry = l2_entry_offset(path, 64 * 1024)
    write_u64(path, entry, read_u64(path, entry) + 0x200)
    return path


def zero_misaligned(w: Path) -> Path:
    path = make_image(w)
    entry = l2_entry_offset(path, 64 * 1024)
    write_u64(path, entry, (read_u64(path, entry) + 0x200) | 1)
    return path


def l2_reserved_bits(w: Path) -> Path:
    path = make_image(w)
    entry = l2_entry_offset(path, 0)
    write_u64(path, entry, read_u64(path, entry) | 0x2)
    return path


def l1_reserved_bits(w: Path) -> Path:
    path = make_image(w)
    h = header(path)
    write_u64(path, h.l1_table_offset, read_u64(path, h.l1_table_offset) | (1 << 56))
    return path


def oflag_cleared(w: Path) -> Path:
    path = make_image(w)
    entry = l2_entry_offset(path, 0)
    write_u64(path, entry, read_u64(path, entry) & ~OFLAG_COPIED)
    return path


def past_eof(w: Path) -> Path:
    path = make_image(w)
    write_u64(path, l2_entry_offset(path, 3 << 20), OFLAG_COPIED | (100 << 20))
    return path


def overflow_1bit(w: Path) -> Path:
    path = make_image(w, "refcount_bits=1")
    src = l2_entry_offset(path, 0)
    write_u64(path, l2_entry_offset(path, 3 << 20), read_u64(path, src))
    return path


def refblock_refcount_zero(w: Path) -> Path:
    path = make_image(w)
    h = header(path)
    block = read_u64(path, h.refcount_table_offset) & REFT_OFFSET_MASK
    set_stored_refcount(path, block // h.cluster_size, 0)
    return path


def reftable_refcount_zero(w: Path) -> Path:
    path = make_image(w)
    h = header(path)
    set_stored_refcount(path, h.refcount_table_offset // h.cluster_size, 0)
    return path


def stale_bitmaps(w: Path) -> Path:
    path = bitmaps(w)
    write_u64(path, AUTOCLEAR_FEATURES, 0)
    return path


def dirty_lazy_leak(w: Path) -> Path:
    path = make_image(w, "lazy_refcounts=on")
    add_leaked_clusters(path, 1)
    write_u64(path, INCOMPATIBLE_FEATURES, read_u64(path, INCOMPATIBLE_FEATURES) | 1)
    return path


def crashed_lazy(opts: str, size: str, *commands: str) -> Callable[[Path], Path]:
    """qemu-io on a lazy_refcounts image killed (``sigraise 9``) before it closes: the dirty
    bit stays set and the refcounts of everything allocated since open are missing."""
    def build(w: Path) -> Path:
        path = make_image(w, f"lazy_refcounts=on,{opts}".rstrip(","), size, writes=())
        peers.qemu_io(path, *commands, "sigraise 9", fmt="qcow2", ok=(-9,))  # killed
        assert header(path).incompatible_features & 1
        return path
    return build


def snapshot_leak(w: Path) -> Path:
    path = snapshots(w)
    add_leaked_clusters(path, 1)
    return path


def leak_and_low(w: Path) -> Path:
    path = make_image(w)
    add_leaked_clusters(path, 1)
    set_stored_refcount(path, data_cluster(path, 0), 0)
    return path


def bitmap_leak_and_low(w: Path) -> Path:
    path = bitmaps(w)
    add_leaked_clusters(path, 1)
    set_stored_refcount(path, data_cluster(path, 0), 0)
    return path


CLEAN: dict[str, Callable[[Path], Path]] = {
    "default": clean(""),
    **{f"refcount_bits={b}": clean(f"refcount_bits={b}") for b in (1, 2, 4, 8, 16, 32, 64)},
    "cluster_size=512": clean("cluster_size=512"),
    "cluster_size=2M": clean("cluster_size=2M"),
    "extended_l2": clean("extended_l2=on"),
    "compat=0.10": clean("compat=0.10"),
    "lazy_refcounts": clean("lazy_refcounts=on"),
    "compressed": compressed,
    "snapshots": snapshots,
    "bitmaps": bitmaps,
    "data_file": with_data_file,
}

DAMAGED: dict[str, Callable[[Path], Path]] = {
    "leak": leak_extra(),
    "leak-refcount-3": leak_extra(refcount=3),
    **{f"leak-refcount_bits={b}": leak_extra(f"refcount_bits={b}") for b in (1, 16, 64)},
    "leak-cluster_size=512": leak_extra("cluster_size=512"),
    "leak-cluster_size=2M": leak_extra("cluster_size=2M"),
    "leak-bump": leak_bump,
    **{f"refcount-zero-refcount_bits={b}": refcount_zero(f"refcount_bits={b}")
       for b in (1, 16, 64)},
    "refcount-zero-cluster_size=512": refcount_zero("cluster_size=512"),
    "refcount-zero-cluster_size=2M": refcount_zero("cluster_size=2M"),
    "duplicate-reference": refcount_too_low,
    "l2-into-header": l2_into_header,
    "l2-misaligned": l2_misaligned,
    "zero-alloc-misaligned": zero_misaligned,
    "l2-reserved-bits": l2_reserved_bits,
    "l1-reserved-bits": l1_reserved_bits,
    "oflag-copied-cleared": oflag_cleared,
    "past-eof": past_eof,
    "overflow-refcount_bits=1": overflow_1bit,
    "refblock-refcount-zero": refblock_refcount_zero,
    "reftable-refcount-zero": reftable_refcount_zero,
    "stale-bitmaps": stale_bitmaps,
    "dirty-lazy-refcounts-leak": dirty_lazy_leak,
    "crashed-lazy": crashed_lazy("", "64M", "write -P 1 0 1M", "write -P 2 10M 200k", "flush",
                                 "write -P 3 30M 64k"),
    # Many refcount blocks (64 clusters each), a table of several clusters, holes to reuse.
    "crashed-lazy-cluster_size=512-refcount_bits=64": crashed_lazy(
        "cluster_size=512,refcount_bits=64", "64M", "write -P 1 0 3M", "discard 1M 100k",
        "write -P 2 10M 2M"),
    "crashed-lazy-cluster_size=4k-refcount_bits=2": crashed_lazy(
        "cluster_size=4k,refcount_bits=2", "1G", "write -P 1 0 24M", "discard 0 4M",
        "write -P 2 512M 2M"),
    "snapshot-leak": snapshot_leak,
    "leak-and-refcount-zero": leak_and_low,
    "bitmaps-leak-and-refcount-zero": bitmap_leak_and_low,
}

# Scenarios whose guest data QEMU can still read (so qemu-img compare is meaningful).
READABLE = {name for name in DAMAGED if not name.startswith(
    ("l2-", "zero-alloc", "l1-", "past-eof"))}


BITMAPS_REWRITTEN_BY_QEMU = {"bitmaps-leak-and-refcount-zero"}


def copies(src: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        dst = src.with_name(name)
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


@pytest.mark.parametrize("scenario", list(CLEAN) + list(DAMAGED))
def test_check_matches_qemu_img(scenario: str, workdir: Path, qemu_tools: dict[str, str],
                                dirtybits_cli: Callable[..., subprocess.CompletedProcess[str]]
                                ) -> None:
    build = CLEAN.get(scenario) or DAMAGED[scenario]
    path = build(workdir)
    theirs = qemu_check(path)
    ours = parse_check(dirtybits_cli("check", "--output=json", path))
    assert ours == theirs
    if scenario in CLEAN:
        assert theirs[0] == 0, "scenario meant to be clean is not"
    else:
        assert theirs[0] != 0, "damage went unnoticed by qemu-img: the scenario is broken"


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("scenario", list(DAMAGED))
def test_repair_matches_qemu_img(scenario: str, mode: str, workdir: Path,
                                 qemu_tools: dict[str, str],
                                 dirtybits_cli: Callable[..., subprocess.CompletedProcess[str]]
                                 ) -> None:
    original = DAMAGED[scenario](workdir)
    by_qemu, by_us = copies(original, "by-qemu.qcow2", "by-us.qcow2")
    theirs = qemu_check(by_qemu, "-r", mode)
    proc = dirtybits_cli("check", "--output=json", "-r", mode, by_us)
    ours = parse_check(proc)
    assert ours[0] == theirs[0], proc.stderr
    if theirs[1] is None:  # QEMU could not complete (e.g. -r leaks needs a rebuild)
        assert ours[1] is None
        return
    assert ours[1] is not None
    keys = ("check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed")
    assert {k: ours[1].get(k) for k in keys} == {k: theirs[1].get(k) for k in keys}
    # What qemu-img now says about our repaired image is what it says about its own.
    after_theirs, after_ours = qemu_check(by_qemu), qemu_check(by_us)
    assert after_ours[0] == after_theirs[0]
    assert ({k: after_ours[1].get(k) for k in keys[:3]}  # type: ignore[union-attr]
            == {k: after_theirs[1].get(k) for k in keys[:3]})  # type: ignore[union-attr]
    if scenario in READABLE:
        proc = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", original, by_us)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # The flags a successful repair clears, and the extensions it drops (a stale bitmaps
    # extension), as qemu-img does.
    assert (header(by_us).incompatible_features & 3) == (header(by_qemu).incompatible_features & 3)
    assert extension_types(by_us) == extension_types(by_qemu)
    # A rebuilt refcount structure lands where QEMU's rebuild_refcount_structure() puts it,
    # and freed leaks are punched as QEMU's QCOW2_DISCARD_ALWAYS does: the repaired files are
    # the same bytes. (QEMU also rewrites persistent bitmaps whenever it opens an image
    # read-write, to new clusters: that part is not the checker's.)
    if scenario not in BITMAPS_REWRITTEN_BY_QEMU:
        assert by_us.read_bytes() == by_qemu.read_bytes()


def test_repair_of_snapshot_image_is_byte_identical(
        workdir: Path, qemu_tools: dict[str, str],
        dirtybits_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """Leaks in an image with internal snapshots: the repaired file equals QEMU's."""
    path = snapshot_leak(workdir)
    for mode in ("leaks", "all"):
        by_qemu, by_us = copies(path, f"q-{mode}.qcow2", f"d-{mode}.qcow2")
        qemu_check(by_qemu, "-r", mode)
        proc = dirtybits_cli("check", "-r", mode, by_us)
        assert proc.returncode == 0, proc.stderr
        assert by_us.read_bytes() == by_qemu.read_bytes(), mode
        assert qemu_check(by_us)[0] == 0


def test_human_output_matches_qemu_img(
        workdir: Path, qemu_tools: dict[str, str],
        dirtybits_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """Text, stderr lines and exit codes of a leak + corruption image, and of its repair.

    (No bitmaps here: QEMU rewrites them whenever it opens an image read-write, even when
    ``-r leaks`` then fails, which would make the two copies differ before ``-r all``.)
    The rebuilt structure lands where QEMU's does, so even the image end offset matches, and
    the files are the same bytes at the end.
    """
    path = leak_and_low(workdir)
    a, b = copies(path, "a.qcow2", "b.qcow2")
    rebuilt = False
    for args in ((), ("-r", "leaks"), ("-r", "all"), ()):
        theirs = run("qemu-img", "check", *args, a)
        ours = dirtybits_cli("check", *args, b)
        assert ours.returncode == theirs.returncode
        rebuilt = rebuilt or "Rebuilding refcount structure" in theirs.stderr
        assert ours.stdout.splitlines() == theirs.stdout.splitlines()
        their_lines = [x for x in theirs.stderr.splitlines()
                       if x.startswith(("ERROR", "Leaked", "Rebuilding", "Repairing"))]
        our_lines = [x for x in ours.stderr.splitlines()
                     if x.startswith(("ERROR", "Leaked", "Rebuilding", "Repairing"))]
        assert our_lines == their_lines
    assert rebuilt
    assert a.read_bytes() == b.read_bytes()


def test_raw_is_not_checkable(workdir: Path, qemu_tools: dict[str, str],
                              dirtybits_cli: Callable[..., subprocess.CompletedProcess[str]]
                              ) -> None:
    raw = workdir / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    assert run("qemu-img", "check", raw).returncode == 63
    proc = dirtybits_cli("check", raw)
    assert proc.returncode == 63
    assert "This image format does not support checks" in proc.stderr
    assert proc.stdout == ""


def test_quiet_prints_nothing_but_keeps_exit_code(
        workdir: Path, qemu_tools: dict[str, str],
        dirtybits_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    path = leak_extra()(workdir)
    theirs = run("qemu-img", "check", "-q", path)
    ours = dirtybits_cli("check", "-q", path)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (3, "")
