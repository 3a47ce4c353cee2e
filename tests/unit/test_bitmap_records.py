"""The bitmaps extension records against QEMU's bytes, rules and messages.

Pure tests use the raw entries observed from QEMU 7.2 and hand-built directories; the tests marked
``interop`` read directories that real ``qemu-img bitmap`` / ``qemu-io`` wrote, with plain file
reads, and must parse them exactly and rewrite them byte for byte.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest

import peers
from dirtybits.errors import FormatError
from dirtybits.format.qcow2.bitmaps import (
    BME_FLAG_AUTO,
    BME_FLAG_EXTRA_DATA_COMPATIBLE,
    BME_FLAG_IN_USE,
    BME_MAX_PHYS_SIZE,
    BME_MAX_TABLE_SIZE,
    BT_DIRTY_TRACKING_BITMAP,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
    BitmapConstraintError,
    BitmapDirectory,
    BitmapDirectoryEntry,
    BitmapsExtension,
    BitmapTableEntry,
    TableEntryKind,
    bitmap_bytes_needed,
    bitmap_cluster_coverage,
    bitmap_serialized_size,
    bitmap_table_size,
    check_entry,
    check_new_bitmap,
    dir_entry_size,
    encode_name,
    pack_table,
    qemu_entry_error,
    table_entry_error,
    unpack_table,
)
from dirtybits.format.qcow2.header import EXT_BITMAPS, HeaderCluster
from peers import qemu_io

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CS = 64 * KiB

# Observed from QEMU 7.2 (reference §2.2): 1 MiB image, 64 KiB clusters.
RAW_B1 = bytes.fromhex("0000000000070000 00000001 00000000 01 0c 0002 00000000 6231 000000000000"
                       .replace(" ", ""))
RAW_B0 = bytes.fromhex("0000000000090000 00000001 00000002 01 10 0002 00000000 6230 000000000000"
                       .replace(" ", ""))


def good_entry(**changes: object) -> BitmapDirectoryEntry:
    """A clean 64 KiB-granularity bitmap for a 1 MiB disk: usable as is."""
    e = BitmapDirectoryEntry(0x90000, 1, BME_FLAG_AUTO, BT_DIRTY_TRACKING_BITMAP, 16, b"b0")
    return replace(e, **changes)  # type: ignore[arg-type]


# --- raw bytes from QEMU ----------------------------------------------------------------------


def test_observed_entries_parse_exactly() -> None:
    b1, n1 = BitmapDirectoryEntry.unpack(RAW_B1)
    b0, n0 = BitmapDirectoryEntry.unpack(RAW_B0)
    assert (n1, n0) == (32, 32)
    assert b1 == BitmapDirectoryEntry(0x70000, 1, 0, 1, 12, b"b1")
    assert (b1.name, b1.granularity, b1.in_use, b1.auto) == ("b1", 4096, False, False)
    assert (b0.name, b0.granularity, b0.in_use, b0.auto) == ("b0", 65536, False, True)
    assert b1.pack() == RAW_B1 and b0.pack() == RAW_B0
    for e in (b0, b1):
        assert check_entry(e, CS, MiB) == []
        assert qemu_entry_error(e, CS, MiB) is None


def test_observed_directory_with_in_use_flags() -> None:
    # While QEMU holds the image the flags read 1 / 3.
    raw = bytearray(RAW_B1 + RAW_B0)
    raw[15], raw[32 + 15] = 1, 3
    d = BitmapDirectory.unpack(bytes(raw), 2, offset=0xA0000)
    assert [(e.name, e.in_use, e.auto) for e in d.entries] == [("b1", True, False),
                                                               ("b0", True, True)]
    assert d.size == 64 and d.pack() == bytes(raw)
    assert d.extension(0xA0000) == BitmapsExtension(2, 64, 0xA0000)
    assert d.find("b0") is d.entries[1] and d.find(b"b1") is d.entries[0]
    assert d.find("b2") is None


# --- header extension -------------------------------------------------------------------------


def test_extension_round_trip() -> None:
    raw = struct.pack(">IIQQ", 2, 0, 64, 0x90000)
    ext = BitmapsExtension.unpack(raw)
    assert ext == BitmapsExtension(2, 64, 0x90000)
    ext.validate(CS)
    assert ext.pack() == raw


@pytest.mark.parametrize("length", [0, 16, 23, 25, 32])
def test_extension_length_must_be_24(length: int) -> None:
    with pytest.raises(FormatError) as ei:
        BitmapsExtension.unpack(b"\0" * length, offset=0x70)
    assert ei.value.reason == "bitmaps_ext: Invalid extension length"
    assert ei.value.offset == 0x70


@pytest.mark.parametrize(
    ("ext", "message"),
    [
        (BitmapsExtension(1, 32, CS, reserved=1), "bitmaps_ext: Reserved field is not zero"),
        (BitmapsExtension(65536, 32, CS),
         "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"),
        (BitmapsExtension(0, 32, CS), "found bitmaps extension with zero bitmaps"),
        (BitmapsExtension(1, 32, CS + 512), "bitmaps_ext: invalid bitmap directory offset"),
        (BitmapsExtension(1, QCOW2_MAX_BITMAP_DIRECTORY_SIZE + 8, CS),
         "bitmaps_ext: bitmap directory size (67107848) exceeds the maximum supported size "
         "(67107840)"),
        (BitmapsExtension(1, 0, CS), "Requested bitmap directory size is zero"),
        # QEMU's order: the reserved field is judged before the count.
        (BitmapsExtension(0, 0, 1, reserved=7), "bitmaps_ext: Reserved field is not zero"),
    ],
)
def test_extension_validation(ext: BitmapsExtension, message: str) -> None:
    with pytest.raises(FormatError) as ei:
        BitmapsExtension.unpack(ext.pack()).validate(CS)
    assert ei.value.reason == message


def test_extension_limits_are_inclusive() -> None:
    BitmapsExtension(65535, QCOW2_MAX_BITMAP_DIRECTORY_SIZE, 3 * CS).validate(CS)
    BitmapsExtension(1, 32, 512).validate(512)  # alignment is to this image's cluster size


# --- directory entries ------------------------------------------------------------------------


def test_entry_layout_with_extra_data_and_odd_name() -> None:
    e = BitmapDirectoryEntry(0x30000, 2, BME_FLAG_EXTRA_DATA_COMPATIBLE, 1, 20, b"abc",
                             b"\x01\x02\x03\x04\x05")
    raw = e.pack()
    # 24 header + 5 extra + 3 name = 32: no padding; extra data precedes the name.
    assert len(raw) == e.entry_size == 32
    assert raw[16:24] == bytes([1, 20, 0, 3, 0, 0, 0, 5])
    assert raw[24:29] == b"\x01\x02\x03\x04\x05" and raw[29:32] == b"abc"
    assert BitmapDirectoryEntry.unpack(b"junk" + raw, 4) == (e, 32)
    e2 = replace(e, raw_name=b"abcd")
    assert e2.entry_size == 40 and e2.pack()[33:] == b"\0" * 7


def test_name_sizes_count_utf8_bytes() -> None:
    e = BitmapDirectoryEntry.new("é名", granularity=64 * KiB, bitmap_table_offset=CS,
                                 bitmap_table_size=1)
    assert e.name_size == 5 and e.raw_name == "é名".encode()
    assert e.granularity_bits == 16 and e.type == BT_DIRTY_TRACKING_BITMAP
    parsed, size = BitmapDirectoryEntry.unpack(e.pack())
    assert parsed.name == "é名" and size == 32


def test_invalid_utf8_name_round_trips() -> None:
    raw_name = b"ok\xff\xfe"
    e, _ = BitmapDirectoryEntry.unpack(good_entry(raw_name=raw_name).pack())
    assert e.raw_name == raw_name
    assert encode_name(e.name) == raw_name
    assert BitmapDirectory((e,)).find(e.name) == e


def test_nonzero_padding_is_tolerated_and_rewritten_as_zero() -> None:
    raw = bytearray(RAW_B0)
    raw[-1] = 0xAA
    e, size = BitmapDirectoryEntry.unpack(bytes(raw))
    assert size == 32 and e.name == "b0"
    assert e.pack() == RAW_B0


def test_entry_fields_must_fit() -> None:
    with pytest.raises(ValueError):
        good_entry(bitmap_table_size=1 << 32)
    with pytest.raises(ValueError):
        good_entry(raw_name=b"x" * 65536)
    with pytest.raises(ValueError):
        BitmapDirectoryEntry.new("x", granularity=3000)


# --- directory --------------------------------------------------------------------------------


def directory_error(buf: bytes, nb: int) -> FormatError:
    with pytest.raises(FormatError) as ei:
        BitmapDirectory.unpack(buf, nb, offset=0x50000)
    return ei.value


def test_directory_errors() -> None:
    two = RAW_B1 + RAW_B0
    assert directory_error(b"", 1).reason == "Requested bitmap directory size is zero"
    assert directory_error(b"\0" * (QCOW2_MAX_BITMAP_DIRECTORY_SIZE + 8), 1).reason == (
        "Requested bitmap directory size is too big")
    assert directory_error(two, 1).reason == (
        "More bitmaps found than specified in header extension")
    assert directory_error(two, 3).reason == (
        "Less bitmaps found than specified in header extension")
    # Name runs past the end of the directory.
    err = directory_error(two[:60], 2)
    assert err.reason == "Broken bitmap directory" and err.offset == 0x50000 + 32
    # A trailing partial header is "broken" even when the count is also exceeded (QEMU's order).
    assert directory_error(two + b"\0" * 8, 2).reason == "Broken bitmap directory"
    # An entry whose name_size makes it cross the end.
    huge_name = bytearray(RAW_B1)
    huge_name[18:20] = b"\xff\xff"
    assert directory_error(bytes(huge_name), 1).reason == "Broken bitmap directory"


def test_damaged_entry_does_not_break_the_directory() -> None:
    bad = good_entry(raw_name=b"bad", granularity_bits=40, extra_data=b"x")
    d = BitmapDirectory.unpack(RAW_B1 + bad.pack(), 2)
    assert d.entries[1] == bad
    reasons = d.check_entries(CS, MiB)
    assert reasons[0] == []
    assert "Bitmap extra data is not supported" in reasons[1]
    assert any("granularity_bits 40" in r for r in reasons[1])


def test_duplicate_names_only_first_usable() -> None:
    d = BitmapDirectory((good_entry(), good_entry(flags=BME_FLAG_IN_USE), good_entry(
        raw_name=b"b1")))
    reasons = d.check_entries(CS, MiB)
    assert reasons[0] == [] and reasons[2] == []
    assert reasons[1] == ["an earlier bitmap has the same name"]


# --- per-entry rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"bitmap_table_size": 0}, "bitmap_table_size is zero"),
        ({"bitmap_table_offset": 0}, "bitmap_table_offset is zero"),
        ({"bitmap_table_offset": CS + 512}, "not cluster aligned"),
        ({"granularity_bits": 8}, "granularity_bits 8 is outside 9..31"),
        ({"granularity_bits": 32}, "granularity_bits 32 is outside 9..31"),
        ({"flags": BME_FLAG_EXTRA_DATA_COMPATIBLE}, "reserved flags are set (0x4)"),
        ({"flags": 1 << 31}, "reserved flags are set (0x80000000)"),
        ({"raw_name": b""}, "name_size is zero"),
        ({"raw_name": b"n" * 1024}, "name_size 1024 exceeds the maximum of 1023"),
        ({"raw_name": b"a\0b"}, "name contains a NUL byte"),
        ({"type": 0}, "type 0 is not a dirty tracking bitmap"),
        ({"type": 2}, "type 2 is not a dirty tracking bitmap"),
        ({"bitmap_table_size": BME_MAX_PHYS_SIZE // CS + 1, "flags": BME_FLAG_IN_USE},
         "above the maximum of 536870912"),
        ({"extra_data": b"\0" * 8}, "Bitmap extra data is not supported"),
        # 1 data cluster at 512 B granularity covers 256 MiB; the disk is 1 GiB.
        ({"granularity_bits": 9}, "is too small for the disk size"),
        ({"bitmap_table_size": 2}, "bitmap_table_size 2 differs from the 1"),
    ],
)
def test_check_entry_rules(changes: dict[str, object], reason: str) -> None:
    disk = GiB if changes.get("granularity_bits") == 9 else MiB
    e = good_entry(**changes)
    reasons = check_entry(e, CS, disk)
    assert len(reasons) == 1, reasons
    assert reason in reasons[0]
    assert qemu_entry_error(e, CS, disk) is not None or reason.startswith("name")


def test_table_size_limit() -> None:
    # Any table over the entry limit also exceeds 512 MiB of data: both reasons are given.
    e = good_entry(bitmap_table_size=BME_MAX_TABLE_SIZE + 1, flags=BME_FLAG_IN_USE)
    reasons = check_entry(e, 512, MiB)
    assert len(reasons) == 2
    assert "bitmap_table_size 134217729 exceeds the maximum of 134217728" in reasons[0]
    assert "above the maximum of 536870912" in reasons[1]
    assert check_entry(replace(e, bitmap_table_size=BME_MAX_PHYS_SIZE // 512), 512, MiB) == []


def test_in_use_bitmap_may_have_any_size() -> None:
    # After an unclean resize the table no longer matches the disk: fine while in_use.
    e = good_entry(flags=BME_FLAG_IN_USE | BME_FLAG_AUTO)
    assert check_entry(e, CS, 64 * GiB) == []
    assert qemu_entry_error(e, CS, 64 * GiB) is None
    clean = good_entry()
    assert check_entry(clean, CS, 64 * GiB)  # 1 cluster at 64 KiB covers only 32 GiB


def test_exact_size_only_required_when_loading() -> None:
    e = good_entry(bitmap_table_size=2)
    assert check_entry(e, CS, MiB, loading=False) == []
    assert qemu_entry_error(e, CS, MiB) == (
        "Could not read bitmap 'b0' from image: Invalid argument")


def test_qemu_messages_for_bad_entries() -> None:
    assert qemu_entry_error(good_entry(extra_data=b"12345678", type=9), CS, MiB) == (
        "Bitmap extra data is not supported")  # judged before the constraints
    assert qemu_entry_error(good_entry(type=9), CS, MiB) == (
        "Bitmap 'b0' doesn't satisfy the constraints")
    # QEMU holds names as C strings: a NUL cuts the name.
    assert qemu_entry_error(good_entry(type=9, raw_name=b"ab\0cd"), CS, MiB) == (
        "Bitmap 'ab' doesn't satisfy the constraints")


# --- sizes ------------------------------------------------------------------------------------


def test_sizes_as_qemu_computes_them() -> None:
    # 65 bits: 9 bytes needed, but QEMU serializes two whole 64-bit words.
    assert bitmap_bytes_needed(65 * 512, 512) == 9
    assert bitmap_serialized_size(65 * 512, 512) == 16
    assert bitmap_serialized_size(65 * 512 - 1, 512) == 16
    assert bitmap_serialized_size(64 * 512, 512) == 8
    assert bitmap_cluster_coverage(64 * KiB, CS) == 32 * GiB
    assert bitmap_table_size(32 * GiB, 64 * KiB, CS) == 1
    assert bitmap_table_size(32 * GiB + 1, 64 * KiB, CS) == 2
    assert bitmap_table_size(MiB, 4 * KiB, CS) == 1
    assert bitmap_table_size(0, 64 * KiB, CS) == 0
    assert dir_entry_size(2) == 32 and dir_entry_size(8) == 32 and dir_entry_size(9) == 40


# --- adding a bitmap --------------------------------------------------------------------------


def new_bitmap_error(**kw: object) -> str:
    args: dict[str, object] = dict(name="b", granularity=64 * KiB, disk_size=GiB,
                                   cluster_size=CS, existing_count=0, existing_dir_size=0)
    args.update(kw)
    with pytest.raises(BitmapConstraintError) as ei:
        check_new_bitmap(**args)  # type: ignore[arg-type]
    return str(ei.value)


def test_check_new_bitmap_messages() -> None:
    assert new_bitmap_error(name="") == "Bitmap name cannot be empty"
    assert new_bitmap_error(granularity=1000) == (
        "Granularity must be power of 2 and at least 512")
    assert new_bitmap_error(granularity=1 << 32) == (
        "Granularity exceeds maximum (2147483648 bytes)")
    assert new_bitmap_error(granularity=256) == "Granularity is under minimum (512 bytes)"
    # 512 B granularity: 2 TiB is the most 512 MiB of bits can describe.
    assert new_bitmap_error(granularity=512, disk_size=2 * 1024 * GiB + 512) == (
        "Too much space will be occupied by the bitmap. Use larger granularity")
    # Limits count bytes: 512 two-byte characters are 1024 bytes.
    assert new_bitmap_error(name="é" * 512) == "Name length exceeds maximum (1023 characters)"
    assert new_bitmap_error(existing_count=65535) == (
        "Maximum number of persistent bitmaps is already reached")
    assert new_bitmap_error(existing_dir_size=QCOW2_MAX_BITMAP_DIRECTORY_SIZE - 24) == (
        "Not enough space in the bitmap directory")
    # Order: granularity is judged before the name.
    assert new_bitmap_error(name="x" * 2000, granularity=256).startswith("Granularity")


def test_check_new_bitmap_accepts_the_limits() -> None:
    check_new_bitmap("é" * 511 + "x", 512, 2 * 1024 * GiB, CS, 65534,
                     QCOW2_MAX_BITMAP_DIRECTORY_SIZE - dir_entry_size(1023))
    check_new_bitmap("b", 1 << 31, 0, 512, 0, 0)


# --- bitmap tables ----------------------------------------------------------------------------


def test_table_entries() -> None:
    assert BitmapTableEntry.decode(0, CS) == BitmapTableEntry(TableEntryKind.ZEROS)
    assert BitmapTableEntry.decode(1, CS) == BitmapTableEntry(TableEntryKind.ONES)
    data = BitmapTableEntry.decode(0x00FF_FFFF_FFFF_0000, CS)
    assert data == BitmapTableEntry(TableEntryKind.DATA, 0x00FF_FFFF_FFFF_0000)
    for raw in (0, 1, 0x00FF_FFFF_FFFF_0000):
        assert BitmapTableEntry.decode(raw, CS).encode() == raw


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (1 << 56, "reserved bits"),
        (1 << 1, "reserved bits"),
        (1 << 8, "reserved bits"),
        (CS | 1, "all-ones bit"),
        (CS + 512, "unaligned"),
    ],
)
def test_invalid_table_entries(raw: int, fragment: str) -> None:
    err = table_entry_error(raw, CS)
    assert err is not None and fragment in err
    with pytest.raises(FormatError) as ei:
        BitmapTableEntry.decode(raw, CS, offset=0x40008)
    assert ei.value.offset == 0x40008
    # The same offset is aligned in an image with 512-byte clusters.
    if raw == CS + 512:
        assert table_entry_error(raw, 512) is None


def test_table_entry_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BitmapTableEntry(TableEntryKind.DATA, 0)
    with pytest.raises(ValueError):
        BitmapTableEntry(TableEntryKind.ZEROS, CS)
    with pytest.raises(ValueError):
        BitmapTableEntry(TableEntryKind.DATA, CS | 1)


def test_table_pack_unpack() -> None:
    table = [0, 1, 0x50000]
    raw = pack_table(table)
    assert raw == bytes.fromhex("0000000000000000" "0000000000000001" "0000000000050000")
    assert unpack_table(raw + b"\xff" * 8, 3) == table
    with pytest.raises(FormatError):
        unpack_table(raw[:-1], 3)


# --- directories written by QEMU --------------------------------------------------------------


def read_bitmaps(path: Path) -> tuple[HeaderCluster, BitmapsExtension, BitmapDirectory, bytes]:
    data = path.read_bytes()
    hc = HeaderCluster.unpack(data)
    ext_rec = hc.extension(EXT_BITMAPS)
    assert ext_rec is not None
    ext = BitmapsExtension.unpack(ext_rec.data)
    ext.validate(hc.header.cluster_size)
    off, size = ext.bitmap_directory_offset, ext.bitmap_directory_size
    raw = data[off:off + size]
    return hc, ext, BitmapDirectory.unpack(raw, ext.nb_bitmaps, offset=off), data


def qemu_img(*args: str | Path) -> str:
    return peers.qemu_img(*args).stdout


@pytest.mark.interop
def test_directory_written_by_qemu_img(qemu_tools: dict[str, str], workdir: Path) -> None:
    img = workdir / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "3G")
    specs = [("b0", None), ("fine", "512"), ("é名", "2M"), ("x" * 1023, "2147483648")]
    for name, gran in specs:
        qemu_img("bitmap", "--add", *(["-g", gran] if gran else []), img, name)
    qemu_img("bitmap", "--disable", img, "fine")
    hc, ext, d, data = read_bitmaps(img)
    cs, disk = hc.header.cluster_size, hc.header.size
    info = json.loads(qemu_img("info", "--output=json", img))["format-specific"]["data"]
    assert [(e.name, e.granularity, (["auto"] if e.auto else [])) for e in d.entries] == [
        (b["name"], b["granularity"], b["flags"]) for b in info["bitmaps"]]
    assert [e.name for e in d.entries] == [n for n, _ in specs]  # new ones are appended
    assert d.entries[2].name_size == 5
    raw = data[ext.bitmap_directory_offset:][:ext.bitmap_directory_size]
    assert d.pack() == raw and d.extension(ext.bitmap_directory_offset) == ext
    assert d.check_entries(cs, disk) == [[]] * 4
    for e in d.entries:
        assert e.bitmap_table_size == bitmap_table_size(disk, e.granularity, cs)
        assert qemu_entry_error(e, cs, disk) is None
        table = unpack_table(data[e.bitmap_table_offset:], e.bitmap_table_size)
        # Nothing written yet: every cluster of bits is implicit zeros, never all-ones.
        assert {BitmapTableEntry.decode(t, cs).kind for t in table} == {TableEntryKind.ZEROS}
    # 3 GiB at 512 B granularity: 768 KiB of bits in 4 KiB clusters.
    assert d.entries[1].bitmap_table_size == 192


@pytest.mark.interop
def test_dirty_bits_and_in_use_written_by_qemu(qemu_tools: dict[str, str],
                                                workdir: Path) -> None:
    img = workdir / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "-g", "4096", img, "b1")
    qemu_img("bitmap", "--disable", img, "b1")
    qemu_io(img, "write 0 64k", "write 512k 4k")
    hc, _ext, d, data = read_bitmaps(img)
    b0, b1 = d.entries
    assert (b0.flags, b1.flags) == (BME_FLAG_AUTO, 0)
    entry = BitmapTableEntry.decode(unpack_table(data[b0.bitmap_table_offset:], 1)[0], CS)
    assert entry.kind is TableEntryKind.DATA  # the enabled bitmap recorded the writes
    assert data[entry.offset:entry.offset + 4] == b"\x01\x01\x00\x00"
    assert unpack_table(data[b1.bitmap_table_offset:], 1) == [0]  # disabled: nothing
    # Killed while open: QEMU leaves every bitmap in_use; all are still well formed.
    proc = qemu_io(img, "write 0 64k", "sigraise 9", ok=None)
    assert proc.returncode != 0
    hc, _ext, d, _data = read_bitmaps(img)
    assert [(e.in_use, e.auto) for e in d.entries] == [(True, True), (True, False)]
    assert d.check_entries(CS, hc.header.size) == [[], []]
