"""The qcow2 checker on images built byte by byte, plus the qemu-img output formatting.

Pure tests build tiny images (4 KiB clusters) with the format records, so every reference
is known exactly; the few tests marked ``interop`` use qemu-img to judge a repair it refuses to
do itself.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dirtybits.cli.check import exit_code, human_summary
from dirtybits.cli.info import qdict_order, qemu_json, size_to_str
from dirtybits.errors import ImageIOError, UnsupportedFeatureError
from dirtybits.format.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    EXT_DATA_FILE,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    HeaderCluster,
    HeaderExtension,
    Qcow2Header,
)
from dirtybits.format.qcow2.refcount import get_refcount, set_refcount
from dirtybits.format.qcow2.tables import OFLAG_COPIED, encode_compressed
from dirtybits.qcow2 import check as check_mod
from dirtybits.qcow2.check import (
    CheckFailedError,
    CheckNotSupportedError,
    CheckResult,
    check_image,
)
from peers import qemu_img, qemu_io, run

CB = 12
CS = 1 << CB
SIZE = 1 << 20  # 1 MiB: one L2 table of 512 entries covers it all


@dataclass
class Image:
    """A hand-built qcow2: header @0, reftable @1, refblock @2, L1 @3, L2 @4, data from 5."""

    path: Path
    order: int = 4
    extensions: list[HeaderExtension] = field(default_factory=list)
    incompat: int = 0
    autoclear: int = 0
    clusters: dict[int, bytes] = field(default_factory=dict)
    refcounts: dict[int, int] = field(default_factory=dict)
    l2: dict[int, int] = field(default_factory=dict)  # L2 index -> raw entry

    REFTABLE, REFBLOCK, L1, L2 = 1, 2, 3, 4

    def __post_init__(self) -> None:
        for k in range(5):
            self.refcounts[k] = 1

    def data(self, guest_cluster: int, host_cluster: int, fill: int) -> None:
        self.clusters[host_cluster] = bytes([fill]) * CS
        self.refcounts[host_cluster] = 1
        self.l2[guest_cluster] = OFLAG_COPIED | host_cluster * CS

    def write(self) -> Path:
        hdr = Qcow2Header(
            version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=CB, size=SIZE,
            crypt_method=0, l1_size=1, l1_table_offset=self.L1 * CS,
            refcount_table_offset=self.REFTABLE * CS, refcount_table_clusters=1,
            nb_snapshots=0, snapshots_offset=0, incompatible_features=self.incompat,
            autoclear_features=self.autoclear, refcount_order=self.order,
        )
        blobs = dict(self.clusters)
        blobs[0] = HeaderCluster(hdr, tuple(self.extensions)).pack()
        blobs[self.REFTABLE] = struct.pack(">Q", self.REFBLOCK * CS)
        block = bytearray(CS)
        for k, v in self.refcounts.items():
            set_refcount(block, k, self.order, v)
        blobs[self.REFBLOCK] = bytes(block)
        blobs[self.L1] = struct.pack(">Q", OFLAG_COPIED | self.L2 * CS)
        l2 = bytearray(CS)
        for i, e in self.l2.items():
            struct.pack_into(">Q", l2, 8 * i, e)
        blobs[self.L2] = bytes(l2)
        end = max(blobs) + 1
        with open(self.path, "wb") as f:
            f.truncate(end * CS)
            for k, blob in blobs.items():
                f.seek(k * CS)
                f.write(blob)
        return self.path


def simple(tmp_path: Path, order: int = 4) -> Image:
    img = Image(tmp_path / "t.qcow2", order=order)
    img.data(0, 5, 0x11)
    img.data(1, 6, 0x22)
    img.data(7, 8, 0x33)  # host cluster 7 stays a hole: one fragmentation break
    return img


def stored(path: Path, cluster: int) -> int:
    with open(path, "rb") as f:
        head = f.read(104)
        table, order = struct.unpack_from(">Q", head, 48)[0], struct.unpack_from(">I", head, 96)[0]
        per_block = CS * 8 >> order
        f.seek(table + 8 * (cluster // per_block))
        block = struct.unpack(">Q", f.read(8))[0]
        if not block:
            return 0
        f.seek(block)
        return get_refcount(f.read(CS), cluster % per_block, order)


def counts(res: CheckResult) -> tuple[int, int, int]:
    return res.corruptions, res.leaks, res.check_errors


# --------------------------------------------------------------------------- checking
@pytest.mark.parametrize("order", range(7))
def test_clean_image_every_refcount_width(tmp_path: Path, order: int) -> None:
    path = simple(tmp_path, order).write()
    res = check_image(str(path))
    assert counts(res) == (0, 0, 0), res.messages
    assert res.allocated_clusters == 3
    assert res.fragmented_clusters == 1  # host 5, 6 contiguous in L2 order; then 8
    assert res.total_clusters == SIZE // CS
    assert res.image_end_offset == 9 * CS
    assert exit_code(res) == 0


@pytest.mark.parametrize("order", [0, 4, 6])
def test_leak_reported_then_repaired(tmp_path: Path, order: int) -> None:
    img = simple(tmp_path, order)
    img.clusters[9] = bytes(CS)
    img.refcounts[9] = 1
    path = img.write()
    res = check_image(str(path))
    assert counts(res) == (0, 1, 0)
    assert "Leaked cluster 9 refcount=1 reference=0" in res.messages
    assert exit_code(res) == 3
    fixed = check_image(str(path), "leaks")
    assert (fixed.leaks_fixed, fixed.leaks, fixed.corruptions) == (1, 0, 0)
    assert fixed.repaired
    assert stored(path, 9) == 0
    assert counts(check_image(str(path))) == (0, 0, 0)


def test_refcount_too_low_needs_rebuild(tmp_path: Path) -> None:
    img = simple(tmp_path)
    img.refcounts[6] = 0
    path = img.write()
    before = path.read_bytes()
    res = check_image(str(path))
    assert counts(res) == (2, 0, 0)  # refcount mismatch + OFLAG_COPIED on a refcount-0 cluster
    assert "ERROR cluster 6 refcount=0 reference=1" in res.messages
    with pytest.raises(CheckFailedError) as info:
        check_image(str(path), "leaks")
    assert "ERROR need to rebuild refcount structures" in info.value.messages
    assert path.read_bytes() == before  # a failed leaks-only repair writes nothing


def test_rebuild_puts_new_structure_past_the_end_and_frees_the_old(tmp_path: Path) -> None:
    img = simple(tmp_path)
    img.refcounts[6] = 0
    path = img.write()
    old_len = path.stat().st_size
    res = check_image(str(path), "all")
    assert res.corruptions_fixed == 1
    assert counts(res) == (0, 0, 0)
    assert "Rebuilding refcount structure" in res.repair_messages
    with open(path, "rb") as f:
        table_offset, _clusters = struct.unpack(">QI", f.read(104)[48:60])
    assert table_offset >= old_len
    assert stored(path, 6) == 1
    for old in (Image.REFTABLE, Image.REFBLOCK):
        assert stored(path, old) == 0
    with open(path, "rb") as f:  # guest data untouched
        f.seek(6 * CS)
        assert f.read(CS) == bytes([0x22]) * CS


def test_rebuild_is_crash_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New structures are synced before the header names them; a crash before that is harmless."""
    img = simple(tmp_path)
    img.refcounts[6] = 0
    path = img.write()
    events: list[tuple[str, int]] = []
    real_pwrite, real_fsync = os.pwrite, os.fsync

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if offset == 48:
            events.append(("header", offset))
            raise OSError(5, "simulated crash")
        events.append(("write", offset))
        return real_pwrite(fd, data, offset)

    def fsync(fd: int) -> None:
        events.append(("sync", 0))
        real_fsync(fd)

    monkeypatch.setattr(check_mod.os, "pwrite", pwrite)
    monkeypatch.setattr(check_mod.os, "fsync", fsync)
    with pytest.raises(ImageIOError):
        check_image(str(path), "all")
    monkeypatch.undo()
    header_at = events.index(("header", 48))
    assert events[header_at - 1] == ("sync", 0)
    assert any(kind == "write" for kind, _ in events[:header_at])
    # The crash left the old structure in charge: same findings as before the repair.
    res = check_image(str(path))
    assert counts(res) == (2, 0, 0)
    assert "ERROR cluster 6 refcount=0 reference=1" in res.messages


def test_duplicate_reference_repair_sets_refcount_and_clears_copied(tmp_path: Path) -> None:
    img = simple(tmp_path)
    img.l2[3] = img.l2[0]  # two guest clusters share host cluster 5
    path = img.write()
    res = check_image(str(path))
    assert "ERROR cluster 5 refcount=1 reference=2" in res.messages
    fixed = check_image(str(path), "all")
    assert fixed.corruptions_fixed == 3  # the refcount, then COPIED on both L2 entries
    assert counts(fixed) == (0, 0, 0)
    assert stored(path, 5) == 2
    with open(path, "rb") as f:
        f.seek(Image.L2 * CS)
        e0, _e1, _e2, e3 = struct.unpack(">4Q", f.read(32))
    assert not e0 & OFLAG_COPIED and not e3 & OFLAG_COPIED


def test_one_bit_refcounts_overflow(tmp_path: Path) -> None:
    img = simple(tmp_path, order=0)
    img.l2[3] = img.l2[0]
    path = img.write()
    res = check_image(str(path))
    assert f"ERROR: overflow cluster offset=0x{5 * CS:x}" in res.messages
    assert counts(res) == (1, 0, 0)


def test_two_bit_refcounts_count_a_shared_cluster(tmp_path: Path) -> None:
    img = simple(tmp_path, order=1)
    img.l2[3] = img.l2[0]
    img.refcounts[5] = 2
    img.l2[0] &= ~OFLAG_COPIED
    img.l2[3] &= ~OFLAG_COPIED
    path = img.write()
    assert counts(check_image(str(path))) == (0, 0, 0)


def test_compressed_cluster_counts_every_host_cluster_it_touches(tmp_path: Path) -> None:
    img = simple(tmp_path)
    # 3 sectors from 256 bytes before the end of cluster 9: reaches into cluster 10
    img.l2[10] = encode_compressed(10 * CS - 256, 3, CB)
    img.clusters[9] = img.clusters[10] = bytes(CS)
    img.refcounts[9] = 1
    path = img.write()
    res = check_image(str(path))
    assert "ERROR cluster 10 refcount=0 reference=1" in res.messages
    assert res.compressed_clusters == 1


def test_unaligned_entry_counts_both_clusters_it_spans(tmp_path: Path) -> None:
    img = simple(tmp_path)
    img.l2[1] = OFLAG_COPIED | (6 * CS + 0x200)  # now spans clusters 6 and 7
    path = img.write()
    res = check_image(str(path))
    assert f"ERROR offset={6 * CS + 0x200:x}: Data cluster is not properly aligned; L2 entry " \
           "corrupted." in res.messages
    assert "ERROR cluster 7 refcount=0 reference=1" in res.messages


def test_reference_past_end_of_file(tmp_path: Path) -> None:
    img = simple(tmp_path)
    img.l2[4] = OFLAG_COPIED | (100 * CS)
    path = img.write()
    res = check_image(str(path))
    assert ("ERROR: counting reference for region exceeding the end of the file by one "
            f"cluster or more: offset 0x{100 * CS:x} size 0x{CS:x}") in res.messages


def test_external_data_file_clusters_are_not_counted(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image(tmp_path / "t.qcow2", incompat=INCOMPAT_DATA_FILE,
                extensions=[HeaderExtension(EXT_DATA_FILE, b"t.raw")])
    img.l2[0] = OFLAG_COPIED | 0  # data-file offset 0 is a real, allocated cluster
    img.l2[1] = OFLAG_COPIED | (400 * CS)  # far past the end of the qcow2 file
    path = img.write()
    (tmp_path / "t.raw").write_bytes(bytes(SIZE))
    monkeypatch.chdir(tmp_path)  # QEMU 7.2 opens the data file relative to the cwd
    res = check_image(str(path))
    assert counts(res) == (0, 0, 0), res.messages
    assert res.allocated_clusters == 2
    (tmp_path / "t.raw").unlink()
    with pytest.raises(ImageIOError, match=r"t\.raw"):
        check_image(str(path))


def _with_bitmap(tmp_path: Path, autoclear: int, flags: int = 2, gran_bits: int = 16) -> Image:
    img = simple(tmp_path)
    name = b"b0"
    entry = struct.pack(">QIIBBHI", 11 * CS, 1, flags, 1, gran_bits, len(name), 0) + name
    entry += bytes(-len(entry) % 8)
    img.clusters[10] = entry  # directory
    img.clusters[11] = struct.pack(">Q", 12 * CS)  # bitmap table: one data cluster
    img.clusters[12] = b"\x01" + bytes(CS - 1)
    for k in (10, 11, 12):
        img.refcounts[k] = 1
    img.extensions.append(HeaderExtension(EXT_BITMAPS, struct.pack(">IIQQ", 1, 0, len(entry),
                                                                   10 * CS)))
    img.autoclear = autoclear
    return img


def test_bitmap_clusters_are_counted(tmp_path: Path) -> None:
    path = _with_bitmap(tmp_path, AUTOCLEAR_BITMAPS).write()
    assert counts(check_image(str(path))) == (0, 0, 0)


def test_bitmaps_without_autoclear_bit_are_leaks_and_repair_drops_them(tmp_path: Path) -> None:
    path = _with_bitmap(tmp_path, 0).write()
    res = check_image(str(path))
    assert counts(res) == (0, 3, 0)
    fixed = check_image(str(path), "leaks")
    assert fixed.leaks_fixed == 3
    with open(path, "rb") as f:
        assert HeaderCluster.unpack(f.read(CS)).extension(EXT_BITMAPS) is None


def test_broken_bitmap_entry_is_reported_not_fatal(tmp_path: Path) -> None:
    path = _with_bitmap(tmp_path, AUTOCLEAR_BITMAPS, gran_bits=40).write()
    res = check_image(str(path))
    assert res.corruptions == 1
    assert any("doesn't satisfy the constraints" in m for m in res.messages)
    assert res.leaks == 0  # its table and data were still counted


def test_broken_bitmap_table_entry_is_reported(tmp_path: Path) -> None:
    img = _with_bitmap(tmp_path, AUTOCLEAR_BITMAPS)
    img.clusters[11] = struct.pack(">Q", 12 * CS + 0x200)  # unaligned data cluster
    path = img.write()
    res = check_image(str(path))
    assert (res.corruptions, res.leaks) == (1, 1)


def _two_bitmaps(tmp_path: Path, **bad: int) -> Image:
    """``good`` (dir @10, table @11, data @12) and ``bad`` (table @13, data @14) at 64 KiB
    granularity; ``bad`` gets the given entry fields (``gran_bits``, ``flags``, ``table_size``)
    or, with ``table_entry``, that raw table entry."""
    img = simple(tmp_path)
    entries = b""
    for name, table, fields in ((b"good", 11, {}), (b"bad", bad.get("table", 13), bad)):
        e = struct.pack(">QIIBBHI", table * CS, fields.get("table_size", 1),
                        fields.get("flags", 2), 1, fields.get("gran_bits", 16), len(name), 0)
        e += name
        entries += e + bytes(-len(e) % 8)
    img.clusters[10] = entries
    img.clusters[11] = struct.pack(">Q", 12 * CS)
    img.clusters[12] = b"\x05" + bytes(CS - 1)
    img.clusters[13] = struct.pack(">Q", bad.get("table_entry", 14 * CS))
    img.clusters[14] = b"\xff" + bytes(CS - 1)
    for k in range(10, 15):
        img.refcounts[k] = 1
    img.extensions.append(HeaderExtension(EXT_BITMAPS, struct.pack(
        ">IIQQ", bad.get("nb", 2), 0, len(entries), 10 * CS)))
    img.autoclear = AUTOCLEAR_BITMAPS
    return img


def _bitmap_ext(path: Path) -> tuple[int, int, int] | None:
    with open(path, "rb") as f:
        hc = HeaderCluster.unpack(f.read(CS))
    ext = hc.extension(EXT_BITMAPS)
    if ext is None:
        return None
    nb, _, size, offset = struct.unpack(">IIQQ", ext.data)
    return nb, size, offset


GUEST = {5: 0x11, 6: 0x22, 8: 0x33}  # host cluster -> fill byte of simple()'s data


def _guest_intact(path: Path) -> bool:
    with open(path, "rb") as f:
        for k, fill in GUEST.items():
            f.seek(k * CS)
            if f.read(CS) != bytes([fill]) * CS:
                return False
    return True


@pytest.mark.parametrize(("fields", "reason"), [
    ({"gran_bits": 40}, "granularity_bits 40 is outside 9..31"),
    ({"flags": 0x12}, "reserved flags are set (0x10)"),
    ({"table_size": 2}, "bitmap_table_size 2 differs from the 1 the disk size requires"),
    ({"table_entry": 14 * CS + 0x200}, "points to an unaligned data cluster"),
])
def test_damaged_bitmap_reported_by_name_and_reason(tmp_path: Path, fields: dict[str, int],
                                                    reason: str) -> None:
    path = _two_bitmaps(tmp_path, **fields).write()
    res = check_image(str(path))
    bad = [m for m in res.messages if "'bad'" in m]
    assert bad and all(m.startswith("ERROR bitmap 'bad'") for m in bad)
    assert any(reason in m for m in bad)
    assert not any("'good'" in m for m in res.messages)
    assert res.corruptions == 1 and res.check_errors == 0


@pytest.mark.parametrize("fields", [
    {"gran_bits": 40}, {"flags": 0x12}, {"table_size": 2}, {"table_entry": 14 * CS + 0x200},
])
def test_repair_all_drops_the_damaged_bitmap_and_reclaims_it(tmp_path: Path,
                                                             fields: dict[str, int]) -> None:
    path = _two_bitmaps(tmp_path, **fields).write()
    with open(path, "rb") as f:
        good_table_and_data = f.read()[11 * CS:13 * CS]
    res = check_image(str(path), "all")
    assert any(m.startswith("Repairing bitmap 'bad': dropped it") for m in res.repair_messages)
    assert counts(res) == (0, 0, 0) and res.corruptions_fixed == 1
    assert counts(check_image(str(path))) == (0, 0, 0)
    ext = _bitmap_ext(path)
    assert ext is not None and ext[0] == 1 and ext[2] != 10 * CS  # a new directory
    with open(path, "rb") as f:
        data = f.read()
    entry = data[ext[2]:ext[2] + ext[1]]
    assert entry[24:28] == b"good" and struct.unpack_from(">Q", entry)[0] == 11 * CS
    assert data[11 * CS:13 * CS] == good_table_and_data  # the good bitmap is untouched
    assert _guest_intact(path)
    # The old directory and whatever only the dropped bitmap used are free again.
    assert stored(path, 10) == 0 and stored(path, 13) == 0
    if fields.get("table_entry") is None:
        assert stored(path, 14) == 0
    assert stored(path, ext[2] // CS) == 1
    store_view = _store_bitmaps(path)
    assert store_view == [("good", [])]


def _store_bitmaps(path: Path) -> list[tuple[str, list[str]]]:
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    with Qcow2Image.open(str(path), readonly=True, keep_bitmaps=True) as img:
        return [(sb.name, sb.problems) for sb in Qcow2BitmapStore(img).bitmaps]


def test_table_past_the_end_of_the_file(tmp_path: Path) -> None:
    """QEMU opens this image (the table reads as zeros) and counts one reference past the
    end; check names the bitmap without counting it twice, and -r all drops it."""
    path = _two_bitmaps(tmp_path, table=40).write()
    res = check_image(str(path))
    assert f"ERROR bitmap 'bad': bitmap table: offset {40 * CS:#x} lies past the end of the " \
        "file" in res.messages
    assert any("exceeding the end of the file" in m for m in res.messages)
    assert res.corruptions == 1
    from dirtybits.qcow2.info import image_info

    listed = image_info(str(path))["format-specific"]["data"]["bitmaps"]
    assert "past the end of the file" in listed[1]["unusable"] and "unusable" not in listed[0]
    fixed = check_image(str(path), "all")
    assert counts(fixed) == (0, 0, 0)
    assert _store_bitmaps(path) == [("good", [])]


def test_repair_leaks_keeps_damaged_bitmaps(tmp_path: Path) -> None:
    path = _two_bitmaps(tmp_path, gran_bits=40).write()
    before = path.read_bytes()
    res = check_image(str(path), "leaks")
    assert res.corruptions == 1 and not res.repaired
    assert path.read_bytes() == before


def test_repair_all_drops_an_unreadable_directory(tmp_path: Path) -> None:
    path = _two_bitmaps(tmp_path, nb=3).write()  # the directory holds 2 entries, not 3
    res = check_image(str(path))
    assert "ERROR bitmap directory: Less bitmaps found than specified in header extension" \
        in res.messages
    assert res.corruptions == 1
    fixed = check_image(str(path), "all")
    assert any(m.startswith("Repairing bitmap directory: dropped the bitmaps extension")
               for m in fixed.repair_messages)
    assert counts(fixed) == (0, 0, 0)
    assert _bitmap_ext(path) is None
    with open(path, "rb") as f:
        assert HeaderCluster.unpack(f.read(CS)).header.autoclear_features & 1 == 0
    assert all(stored(path, k) == 0 for k in range(10, 15))
    assert _guest_intact(path)


def test_repair_all_drops_the_extension_when_every_bitmap_is_damaged(tmp_path: Path) -> None:
    img = _two_bitmaps(tmp_path, gran_bits=40)
    img.clusters[11] = struct.pack(">Q", 12 * CS | 1)  # good's table: offset and all-ones
    path = img.write()
    fixed = check_image(str(path), "all")
    assert counts(fixed) == (0, 0, 0) and fixed.corruptions_fixed == 2
    assert _bitmap_ext(path) is None
    assert _guest_intact(path)


def test_bitmap_drop_is_copy_on_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash before the header switch leaves the old directory in force: the image is as
    it was, plus at most the new directory's cluster as a leak."""
    path = _two_bitmaps(tmp_path, gran_bits=40).write()
    before = path.read_bytes()

    def crash(self: object, hc: object) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(check_mod._Checker, "_write_header", crash)
    with pytest.raises(RuntimeError):
        check_image(str(path), "all")
    after = path.read_bytes()
    assert after[:CS] == before[:CS]
    res = check_image(str(path))
    assert res.corruptions == 1 and res.leaks == 1  # the damage as before, one leak
    monkeypatch.undo()
    assert counts(check_image(str(path), "all")) == (0, 0, 0)
    assert _store_bitmaps(path) == [("good", [])]


def test_successful_repair_clears_dirty_and_corrupt_bits(tmp_path: Path) -> None:
    img = simple(tmp_path)
    img.incompat = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
    img.clusters[9] = bytes(CS)
    img.refcounts[9] = 1
    path = img.write()
    check_image(str(path), "leaks")
    with open(path, "rb") as f:
        assert struct.unpack(">Q", f.read(80)[72:80])[0] == 0


def test_refcount_block_outside_image_is_repaired_by_growing_the_file(tmp_path: Path) -> None:
    path = simple(tmp_path).write()
    with open(path, "r+b") as f:  # a second refblock entry pointing past the end
        f.seek(Image.REFTABLE * CS + 8)
        f.write(struct.pack(">Q", 40 * CS))
    res = check_image(str(path))
    assert "ERROR refcount block 1 is outside image" in res.messages
    fixed = check_image(str(path), "all")
    assert counts(fixed) == (0, 0, 0)
    assert path.stat().st_size >= 41 * CS


def test_unknown_incompatible_feature_is_refused(tmp_path: Path) -> None:
    img = simple(tmp_path)
    img.incompat = 1 << 20
    path = img.write()
    with pytest.raises(UnsupportedFeatureError) as info:
        check_image(str(path))
    assert str(info.value) == "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"


def test_repair_refuses_encryption(tmp_path: Path) -> None:
    path = simple(tmp_path).write()
    for offset, value, word in ((32, 2, "encrypted"),):
        damaged = tmp_path / f"{word}.qcow2"
        shutil.copyfile(path, damaged)
        with open(damaged, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">I", value))
        before = damaged.read_bytes()
        with pytest.raises(UnsupportedFeatureError, match=word):
            check_image(str(damaged), "all")
        assert damaged.read_bytes() == before


def test_absurd_size_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = simple(tmp_path).write()
    monkeypatch.setattr(check_mod, "MAX_COUNT_ARRAY_BYTES", 64)
    with pytest.raises(CheckFailedError, match="more memory"):
        check_image(str(path))


def test_raw_has_no_check(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(CheckNotSupportedError):
        check_image(str(raw))


def test_to_qapi_has_optional_members_only_when_nonzero() -> None:
    res = CheckResult(filename="x", image_end_offset=5, leaks=2)
    assert res.to_qapi() == {"filename": "x", "format": "qcow2", "check-errors": 0,
                             "image-end-offset": 5, "leaks": 2}


# --------------------------------------------------------------------------- formatting
def test_qdict_order_is_qemus() -> None:
    # Orders observed from qemu-img 7.2's --output=json.
    assert qdict_order(["filename", "format", "check-errors", "image-end-offset",
                        "total-clusters", "allocated-clusters"]) == [
        "image-end-offset", "total-clusters", "check-errors", "allocated-clusters", "filename",
        "format"]
    assert qdict_order(["compat", "compression-type", "lazy-refcounts", "bitmaps",
                        "refcount-bits", "corrupt", "extended-l2"]) == [
        "compat", "compression-type", "lazy-refcounts", "bitmaps", "refcount-bits", "corrupt",
        "extended-l2"]


def test_qemu_json_layout() -> None:
    text = qemu_json({"name": "b1", "flags": [], "granularity": 4096, "x": [True]}, 0)
    assert text.splitlines()[:3] == ["{", '    "flags": [', "    ],"]
    assert '"x": [\n        true\n    ]' in text
    assert qemu_json("é\n") == '"\\u00E9\\n"'


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "0.977 KiB"), (200704, "196 KiB"),
    (1380352, "1.32 MiB"), (1 << 30, "1 GiB"), (6295552, "6 MiB"),
])
def test_size_to_str(value: int, text: str) -> None:
    assert size_to_str(value) == text


def test_human_summary_text() -> None:
    res = CheckResult(filename="x", corruptions=2, leaks=1, total_clusters=1600,
                      allocated_clusters=5, fragmented_clusters=2, image_end_offset=655360)
    assert human_summary(res) == (
        "\n2 errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n"
        "\n1 leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n"
        "5/1600 = 0.31% allocated, 40.00% fragmented, 0.00% compressed clusters\n"
        "Image end offset: 655360\n")
    assert exit_code(res) == 2


# --------------------------------------------------------------------------- vs qemu-img
def _qemu_img_image(tmp_path: Path) -> Path:
    path = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "write -P 0x5a 0 256k")
    return path


@pytest.mark.interop
@pytest.mark.parametrize("bits", [0x200, 0x1], ids=["misaligned", "reserved-bits"])
def test_repairs_refcount_table_entries_qemu_gives_up_on(tmp_path: Path, bits: int,
                                                        qemu_tools: dict[str, str]) -> None:
    """qemu-img -r all fails on these (its overlap check trips); the rebuild must succeed."""
    path = _qemu_img_image(tmp_path)
    original = tmp_path / "orig.qcow2"
    shutil.copyfile(path, original)
    with open(path, "r+b") as f:
        table = struct.unpack(">Q", f.read(104)[48:56])[0]
        f.seek(table)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(table)
        f.write(struct.pack(">Q", entry | bits))
    assert check_image(str(path)).corruptions
    fixed = check_image(str(path), "all")
    assert counts(fixed) == (0, 0, 0)
    proc = run("qemu-img", "check", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run("qemu-img", "compare", original, path)
    assert proc.returncode == 0, proc.stdout
