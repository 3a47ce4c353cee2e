"""Loading the bitmap directory for writing: no write may land while a bitmap that missed it
can still read as consistent (issue 10, items 2, 7, 11 and 15).

The oracle is the file itself: a refused open leaves every byte as it was (sha256), and a
bitmap that could not record a write is ``in_use`` on disk, so repairing its damage by hand
(putting the field back) never makes it read as consistent without the write.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

import dirtybits
from dirtybits.block.container import Container
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.errors import CorruptImageError
from dirtybits.format.qcow2.bitmaps import BitmapDirectoryEntry, qemu_directory_error
from dirtybits.format.qcow2.header import EXT_BITMAPS, HeaderCluster
from dirtybits.qcow2.check import check_image
from dirtybits.qcow2.image import Qcow2Image

MiB = 1 << 20
CS = 65536
W_OFF = 32 * MiB  # where the test writes (granule 512 of b0)

# variant -> what QEMU 7.2 refuses the image with (tests/interop/test_bitmap_load_vs_qemu.py
# checks these against qemu-io)
VARIANTS = {
    "nb_bitmaps 65535": "Less bitmaps found than specified in header extension",
    "directory past the end of the file": "Bitmap '' doesn't satisfy the constraints",
    "directory size 0": "Requested bitmap directory size is zero",
    "directory truncated": "Broken bitmap directory",
    "huge extra data size": "Bitmap extra data is not supported",
    "huge name size": "Broken bitmap directory",
    "file truncated in the directory": "Bitmap '' doesn't satisfy the constraints",
}


def make(tmp_path: Path, bitmaps: tuple[str, ...] = ("b0",)) -> Path:
    """A 64 MiB image whose bitmaps (auto, 64 KiB granules) hold one write at 0; the guest
    data and L2 table come first in the file, the bitmap metadata after them."""
    path = tmp_path / "d.qcow2"
    Qcow2Image.create(str(path), 64 * MiB)
    with Qcow2Image.open(str(path)) as img:
        img.write(0, b"x" * 4096)
    with Qcow2Image.open(str(path), keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        for name in bitmaps:
            store.add(name)
    with dirtybits.open(str(path)) as disk:
        disk.write(0, b"x" * 4096)
    return path


def ext_fields(path: Path) -> tuple[int, int, int, int]:
    """(file offset of the extension's data, nb_bitmaps, directory size, directory offset)."""
    raw = path.read_bytes()[:CS]
    hc = HeaderCluster.unpack(raw)
    ext = hc.extension(EXT_BITMAPS)
    assert ext is not None
    at = raw.index(struct.pack(">I", EXT_BITMAPS) + struct.pack(">I", 24)) + 8
    nb, _, size, off = struct.unpack(">IIQQ", ext.data)
    return at, nb, size, off


def entry_offset(path: Path, index: int) -> int:
    """File offset of directory entry ``index``."""
    _, _, _, pos = ext_fields(path)
    with open(path, "rb") as f:
        for _ in range(index):
            f.seek(pos)
            _, size = BitmapDirectoryEntry.unpack(f.read(4096))
            pos += size
    return pos


def table_entry_offset(path: Path, index: int) -> int:
    """File offset of the first table entry of bitmap ``index``."""
    with open(path, "rb") as f:
        f.seek(entry_offset(path, index))
        return int(struct.unpack(">Q", f.read(8))[0])


def poke(path: Path, offset: int, data: bytes) -> bytes:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(data)
    return old


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damage_directory(path: Path, variant: str) -> None:
    at, _, _, off = ext_fields(path)
    if variant == "nb_bitmaps 65535":
        poke(path, at, struct.pack(">I", 65535))
    elif variant == "directory past the end of the file":
        poke(path, at + 16, struct.pack(">Q", 1 << 40))
    elif variant == "directory size 0":
        poke(path, at + 8, struct.pack(">Q", 0))
    elif variant == "directory truncated":
        poke(path, at + 8, struct.pack(">Q", 16))
    elif variant == "huge extra data size":
        poke(path, off + 20, struct.pack(">I", 0xFFFFFFFF))
    elif variant == "huge name size":
        poke(path, off + 18, struct.pack(">H", 0xFFFF))
    else:
        assert variant == "file truncated in the directory"
        os.truncate(path, off + 8)


def flags_on_disk(path: Path) -> dict[str, tuple[bool, list[str]]]:
    """name -> (in_use, problems), read as a reader does."""
    with Qcow2Image.open(str(path), readonly=True) as img:
        return {sb.name: (sb.in_use, sb.problems) for sb in Qcow2BitmapStore(img).bitmaps}


def dirty_at(path: Path, name: str, offset: int) -> bool:
    with Qcow2Image.open(str(path), readonly=True) as img:
        return Qcow2BitmapStore(img).load(name).get(offset)


# --- item 2: an unreadable directory refuses writable opens -----------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unreadable_directory_refuses_writable_api_opens(tmp_path: Path, variant: str) -> None:
    path = make(tmp_path)
    damage_directory(path, variant)
    before = sha(path)
    for bitmaps in ("auto", "no"):
        with pytest.raises(CorruptImageError) as ei:
            dirtybits.open(str(path), bitmaps=bitmaps)
        assert str(ei.value).startswith(VARIANTS[variant] + " (")
        assert "'dirtybits check -r all'" in str(ei.value)
    with pytest.raises(CorruptImageError):  # every writer that keeps the bitmaps
        Qcow2Image.open(str(path), keep_bitmaps=True)
    assert sha(path) == before
    with dirtybits.open(str(path), readonly=True) as disk:  # readers still work
        assert disk.read(0, 4096) == b"x" * 4096


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unreadable_directory_refuses_cli_writes_then_check_repairs(
        tmp_path: Path, variant: str, dirtybits_cli) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    damage_directory(path, variant)
    before = sha(path)
    done = dirtybits_cli("io", "-c", f"write {W_OFF} 64k", path)
    assert done.returncode == 1 and done.stdout == ""
    assert f"can't open device {path}: {VARIANTS[variant]} (" in done.stderr
    assert "'dirtybits check -r all'" in done.stderr
    assert dirtybits_cli("bitmap", "--add", path, "b9").returncode == 1
    assert sha(path) == before
    info = dirtybits_cli("info", path, check=True)
    assert "bitmaps unusable: " in info.stdout
    assert dirtybits_cli("check", path).returncode == 2
    dirtybits_cli("check", "-r", "all", path, check=True)
    assert dirtybits_cli("check", path, check=True).returncode == 0
    dirtybits_cli("io", "-c", f"write {W_OFF} 64k", path, check=True)


def test_unreadable_directory_refuses_a_container_drive(tmp_path: Path) -> None:
    """Raw drives whose bitmaps live in a container go through the same store."""
    c, raw = tmp_path / "c.qcow2", tmp_path / "a.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
    Container.create(str(c), 64 * MiB)
    with Container.open(str(c)) as ct:
        ct.attach(str(raw))
        ct.add_bitmap("a", "b0")
    damage_directory(c, "nb_bitmaps 65535")
    before, raw_before = sha(c), sha(raw)
    with pytest.raises(CorruptImageError, match="Less bitmaps found than specified"):
        dirtybits.open(str(raw), bitmap_file=str(c))
    assert (sha(c), sha(raw)) == (before, raw_before)


def test_qemu_directory_walk_order() -> None:
    """QEMU judges each entry as it walks: a damaged first entry wins over a broken tail, and
    a huge extra_data_size wraps (a C int) instead of running past the end."""
    zeros = bytes(32)
    assert qemu_directory_error(zeros, 1, CS, 64 * MiB) == (
        "Bitmap '' doesn't satisfy the constraints")
    good = BitmapDirectoryEntry.new("b0", granularity=CS, bitmap_table_offset=4 * CS,
                                    bitmap_table_size=1, flags=2).pack()
    assert qemu_directory_error(good, 1, CS, 64 * MiB) is None
    extra = bytearray(good)
    extra[20:24] = b"\xff" * 4
    assert qemu_directory_error(bytes(extra), 1, CS, 64 * MiB) == (
        "Bitmap extra data is not supported")
    assert qemu_directory_error(good, 2, CS, 64 * MiB) == (
        "Less bitmaps found than specified in header extension")
    assert qemu_directory_error(good + good, 1, CS, 64 * MiB) == (
        "More bitmaps found than specified in header extension")
    assert qemu_directory_error(good + bytes(8), 1, CS, 64 * MiB) == (
        "Broken bitmap directory")


# --- item 2: a damaged enabled entry is invalidated before the first write --------------------


def _write_then_repair(path: Path, offset: int, bad: bytes, *, cli=None) -> None:  # type: ignore[no-untyped-def]
    """Damage ``bad`` at ``offset``, write at W_OFF, then repair by hand: the bytes put
    back, except a flags field, where only the reserved bit goes (in_use may be set)."""
    old = poke(path, offset, bad)
    if cli is None:
        with dirtybits.open(str(path)) as disk:
            assert disk.invalidated == []
            disk.write(W_OFF, b"y" * CS)
            assert disk.invalidated == ["b1"]
    else:
        done = cli("io", "-c", f"write {W_OFF} 64k", path, check=True)
        assert "warning: bitmap 'b1' is damaged and cannot record writes" in done.stderr
    if bad == struct.pack(">I", 0x12):
        with open(path, "rb") as f:
            f.seek(offset)
            now = struct.unpack(">I", f.read(4))[0]
        old = struct.pack(">I", now & ~0x10)
    poke(path, offset, old)


@pytest.mark.parametrize("field", ["granularity_bits", "reserved flag", "data cluster at 1 TiB",
                                   "data cluster at 2^55"])
@pytest.mark.parametrize("via", ["api", "cli"])
def test_damaged_enabled_bitmap_never_reads_consistent_after_a_write(
        tmp_path: Path, field: str, via: str, dirtybits_cli) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path, ("b0", "b1"))
    e1 = entry_offset(path, 1)
    if field == "granularity_bits":
        at, bad = e1 + 17, bytes([40])
    elif field == "reserved flag":
        at, bad = e1 + 12, struct.pack(">I", 0x12)
    else:
        at = table_entry_offset(path, 1)
        bad = struct.pack(">Q", 1 << 40 if field.endswith("TiB") else 1 << 55)
    size_before = path.stat().st_size
    _write_then_repair(path, at, bad, cli=dirtybits_cli if via == "cli" else None)
    assert path.stat().st_size < size_before + 4 * MiB  # never grown to the bad offset
    assert flags_on_disk(path) == {"b0": (False, []), "b1": (True, [])}
    assert dirty_at(path, "b0", W_OFF)
    res = check_image(str(path))
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0)


def test_damaged_disabled_bitmap_is_left_alone(tmp_path: Path) -> None:
    """A disabled bitmap records nothing by design: a write makes it no staler."""
    path = make(tmp_path, ("b0", "b1"))
    with Qcow2Image.open(str(path), keep_bitmaps=True) as img:
        Qcow2BitmapStore(img).set_enabled("b1", False)
    at = entry_offset(path, 1) + 17
    old = poke(path, at, bytes([40]))
    with dirtybits.open(str(path)) as disk:
        assert disk.invalidated == []
        disk.write(W_OFF, b"y" * CS)
    poke(path, at, old)
    assert flags_on_disk(path) == {"b0": (False, []), "b1": (False, [])}


def test_data_cluster_past_the_end_is_reported_by_every_reader(tmp_path: Path) -> None:
    path = make(tmp_path, ("b0", "b1"))
    poke(path, table_entry_offset(path, 1), struct.pack(">Q", 1 << 40))
    reason = ("bitmap table: entry 0 points to a data cluster at 0x10000000000, past the end "
              "of the file")
    assert flags_on_disk(path)["b1"] == (False, [reason])
    from dirtybits.qcow2.info import image_info

    listed = image_info(str(path))["format-specific"]["data"]["bitmaps"]
    assert listed[1]["unusable"] == reason
    res = check_image(str(path))
    assert f"ERROR bitmap 'b1': {reason}" in res.messages
    fixed = check_image(str(path), "all")
    assert (fixed.corruptions, fixed.leaks, fixed.check_errors) == (0, 0, 0)
    assert list(flags_on_disk(path)) == ["b0"]


# --- item 7: a data cluster that is not the bitmap's own is never written in place ------------


def test_unallocated_data_cluster_is_written_copy_on_write(tmp_path: Path) -> None:
    """b0's table points at a cluster inside the file with refcount 0 (anything may be
    allocated there): the checkpoint moves the bits to a cluster of its own."""
    path = make(tmp_path)
    size = path.stat().st_size
    free = -(-size // CS) * CS + CS  # a zero cluster past the last one, then the file grows
    os.truncate(path, free + 2 * CS)
    table = table_entry_offset(path, 0)
    with open(path, "rb") as f:
        f.seek(int(struct.unpack(">Q", poke(path, table, b"\0" * 8))[0]))
        old_bits = f.read(CS)
    poke(path, table, struct.pack(">Q", free))
    poke(path, free, old_bits)
    before = check_image(str(path))  # refcount=0 reference=1; the old cluster leaks
    assert (before.corruptions, before.leaks) == (1, 1)
    with dirtybits.open(str(path)) as disk:
        disk.write(W_OFF, b"y" * CS)
    with open(path, "rb") as f:
        f.seek(table)
        moved = struct.unpack(">Q", f.read(8))[0]
        f.seek(free)
        assert f.read(CS) == old_bits  # not written in place
    assert moved not in (0, free)
    assert dirty_at(path, "b0", 0) and dirty_at(path, "b0", W_OFF)
    assert not dirty_at(path, "b0", CS)
    res = check_image(str(path))
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 1, 0)


# --- item 11: removing a damaged bitmap frees what is provably its own ------------------------


def test_removing_a_damaged_bitmap_frees_its_table_and_data(
        tmp_path: Path, dirtybits_cli) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path, ("b0", "b1"))
    poke(path, entry_offset(path, 1) + 17, bytes([40]))
    done = dirtybits_cli("bitmap", "--remove", path, "b1", check=True)
    assert done.stderr == ""
    res = check_image(str(path))
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0)
    assert flags_on_disk(path) == {"b0": (False, [])}
    assert dirty_at(path, "b0", 0)


def test_removing_a_damaged_bitmap_keeps_what_another_bitmap_uses(
        tmp_path: Path, dirtybits_cli) -> None:  # type: ignore[no-untyped-def]
    """b1 (damaged) names b0's data cluster: that one is left, and the CLI says so."""
    path = make(tmp_path, ("b0", "b1"))
    poke(path, entry_offset(path, 1) + 17, bytes([40]))
    with open(path, "rb") as f:
        f.seek(table_entry_offset(path, 0))
        b0_data = f.read(8)
    poke(path, table_entry_offset(path, 1), b0_data)  # b1's own data cluster now leaks
    done = dirtybits_cli("bitmap", "--remove", path, "b1", check=True)
    assert "warning: bitmap 'b1': left 1 cluster(s)" in done.stderr
    assert "'dirtybits check -r leaks'" in done.stderr
    res = check_image(str(path))
    assert (res.corruptions, res.check_errors) == (0, 0)
    assert res.leaks == 1  # b1's old data cluster, which its table no longer named
    assert dirty_at(path, "b0", 0)


def test_removing_a_bitmap_whose_table_is_unreadable_says_so(
        tmp_path: Path, dirtybits_cli) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path, ("b0", "b1"))
    poke(path, entry_offset(path, 1), struct.pack(">Q", 1 << 40))  # table past the end
    done = dirtybits_cli("bitmap", "--remove", path, "b1", check=True)
    assert "warning: bitmap 'b1': its table at 0x10000000000 cannot be read" in done.stderr
    assert flags_on_disk(path) == {"b0": (False, [])}
    res = check_image(str(path))
    assert (res.corruptions, res.check_errors) == (0, 0) and res.leaks == 2


def test_removing_a_damaged_bitmap_never_frees_guest_data(
        tmp_path: Path, dirtybits_cli) -> None:  # type: ignore[no-untyped-def]
    """b1 (damaged) names the guest's data cluster (refcount 1, as its own would have): it
    stays allocated, and the guest data with it."""
    path = make(tmp_path, ("b0", "b1"))
    poke(path, entry_offset(path, 1) + 17, bytes([40]))
    with Qcow2Image.open(str(path), readonly=True) as img:
        guest = next(iter(img.block_status(0, 4096))).offset
    assert guest is not None
    poke(path, table_entry_offset(path, 1), struct.pack(">Q", guest))
    done = dirtybits_cli("bitmap", "--remove", path, "b1", check=True)
    assert "warning: bitmap 'b1': left 1 cluster(s)" in done.stderr
    res = check_image(str(path))
    assert (res.corruptions, res.check_errors, res.leaks) == (0, 0, 1)  # b1's own old data
    with dirtybits.open(str(path)) as disk:
        assert disk.read(0, 4096) == b"x" * 4096
        disk.write(W_OFF, b"z" * CS)  # allocates: must not land on the guest's cluster
        assert disk.read(0, 4096) == b"x" * 4096
