"""Round trips and validation of the pure qcow2 records (``dirtybits.format.qcow2``).

* refcount blocks: every refcount order 0..6 (1..64 bits) against a list-of-ints model and an
  independent encoder written from the spec (sub-byte widths: entry 0 in the least significant
  bits; 8 bits and more: big-endian);
* L1/L2 entries and masks, compressed cluster descriptors for every cluster size, snapshot
  table entries;
* the header cluster: fixed fields, extensions (known and unknown, kept byte for byte and in
  order), unknown additional header fields, the backing file name; every validation rule;
* headers made by QEMU: two captured from qemu-img 7.2 (pure), and (``interop``) fresh ones
  from qemu-img over the creation options, compared field by field with ``qemu-img info``
  and re-packed byte for byte.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtybits.errors import DirtybitsError, FormatError
from dirtybits.format.qcow2 import refcount as rc
from dirtybits.format.qcow2.header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO_HEADER,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    FEATURE_TYPE_AUTOCLEAR,
    FEATURE_TYPE_COMPAT,
    FEATURE_TYPE_INCOMPAT,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    QCOW_MAGIC,
    QEMU_FEATURE_TABLE,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    V3_MIN_HEADER_LENGTH,
    FeatureNameEntry,
    HeaderCluster,
    HeaderExtension,
    Qcow2Header,
    l1_entries_for,
    pack_feature_table,
    unpack_feature_table,
)
from dirtybits.format.qcow2.tables import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    ClusterType,
    L2Entry,
    SnapshotHeader,
    compressed_offset_bits,
    encode_compressed,
)
from peers import qemu_img, qemu_io

RECORD_SETTINGS = settings(max_examples=60, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow])
ALL64 = (1 << 64) - 1


# =========================================================================== refcount blocks
def encode_block(values: list[int], order: int) -> bytes:
    """The spec's layout, written independently of refcount.py."""
    bits = 1 << order
    if bits >= 8:
        width = bits // 8
        return b"".join(v.to_bytes(width, "big") for v in values)
    per_byte = 8 // bits
    out = bytearray(len(values) // per_byte)
    for i, v in enumerate(values):
        out[i // per_byte] |= v << (i % per_byte * bits)
    return bytes(out)


@pytest.mark.parametrize("order", range(7))
@pytest.mark.parametrize("cluster_bits", [9, 12, 16, 21])
def test_refcount_geometry(order: int, cluster_bits: int) -> None:
    assert rc.entries_per_block(cluster_bits, order) == (1 << cluster_bits) * 8 // (1 << order)
    assert rc.max_refcount(order) == 2 ** (2**order) - 1


@pytest.mark.parametrize("order", range(7))
def test_refcount_known_layouts(order: int) -> None:
    """Hand-computed bytes for entries 0..3 = 1, 0, max, 1 in a 512-byte block."""
    block = bytearray(512)
    top = rc.max_refcount(order)
    for i, v in enumerate([1, 0, top, 1]):
        rc.set_refcount(block, i, order, v)
    expected = {
        0: bytes([0b1101]),  # entries 0..3 in bits 0..3, LSB first
        1: bytes([0b01_11_00_01]),
        2: bytes([0x01, 0x1F]),  # 4-bit nibbles: entry 0 low nibble
        3: bytes([1, 0, 0xFF, 1]),
        4: bytes([0, 1, 0, 0, 0xFF, 0xFF, 0, 1]),
        5: (1).to_bytes(4, "big") + bytes(4) + b"\xff" * 4 + (1).to_bytes(4, "big"),
        6: (1).to_bytes(8, "big") + bytes(8) + b"\xff" * 8 + (1).to_bytes(8, "big"),
    }[order]
    assert bytes(block[:len(expected)]) == expected
    assert not any(block[len(expected):])
    assert [rc.get_refcount(block, i, order) for i in range(5)] == [1, 0, top, 1, 0]


@st.composite
def refcount_cases(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int]]]:
    order = draw(st.integers(0, 6))
    cluster_bits = draw(st.sampled_from([9, 10]))
    n = rc.entries_per_block(cluster_bits, order)
    top = rc.max_refcount(order)
    value = st.one_of(st.just(0), st.just(1), st.just(top), st.integers(0, top))
    sets = draw(st.lists(st.tuples(st.integers(0, n - 1), value), max_size=80))
    return order, cluster_bits, sets


@RECORD_SETTINGS
@given(refcount_cases(), st.data())
def test_refcount_block_against_model(case: tuple[int, int, list[tuple[int, int]]],
                                      data: st.DataObject) -> None:
    order, cluster_bits, sets = case
    n = rc.entries_per_block(cluster_bits, order)
    block = bytearray(1 << cluster_bits)
    model = [0] * n
    for index, value in sets:
        rc.set_refcount(block, index, order, value)
        model[index] = value
        assert rc.get_refcount(block, index, order) == value
    # the whole block, neighbours untouched, byte for byte as the spec lays it out
    assert bytes(block) == encode_block(model, order)
    assert rc.all_refcounts(block, order) == model
    assert rc.all_refcounts(bytes(block), order) == model
    for i in data.draw(st.lists(st.integers(0, n - 1), max_size=20)):
        assert rc.get_refcount(block, i, order) == model[i]
        assert rc.get_refcount(bytes(block), i, order) == model[i]
        assert rc.get_refcount(memoryview(block), i, order) == model[i]
    # find_free from any start, including past the end
    for start in [0, n - 1, n, *data.draw(st.lists(st.integers(0, n), max_size=10))]:
        want = next((i for i in range(start, n) if model[i] == 0), -1)
        assert rc.find_free(block, start, order) == want, f"find_free(start={start})"
        assert rc.find_free(bytes(block), start, order) == want


@pytest.mark.parametrize("order", range(7))
def test_find_free_skips_unaligned_zero_runs(order: int) -> None:
    """Zero bytes straddling two non-zero wide entries are not a free entry."""
    n = rc.entries_per_block(9, order)
    model = [0] * n
    # entries like 0x0100, 0x0001 (16 bits) put zero bytes across an entry boundary
    for i in range(0, n - 1, 2):
        model[i] = 1 << ((1 << order) - 1) if (1 << order) >= 8 else 1
        model[i + 1] = 1
    model[n - 1] = 0
    block = bytearray(encode_block(model, order))
    assert rc.find_free(block, 0, order) == n - 1
    model[n - 1] = 1
    block = bytearray(encode_block(model, order))
    assert rc.find_free(block, 0, order) == -1


@pytest.mark.parametrize("order", range(7))
def test_refcount_out_of_range_is_refused(order: int) -> None:
    """Nothing is truncated or wrapped silently: a refcount that does not fit is an error."""
    block = bytearray(512)
    n = rc.entries_per_block(9, order)
    with pytest.raises(FormatError):
        rc.set_refcount(block, 0, order, rc.max_refcount(order) + 1)
    with pytest.raises(FormatError):
        rc.set_refcount(block, 0, order, -1)
    for index in (n, -1):
        with pytest.raises(FormatError):
            rc.set_refcount(block, index, order, 1)
        with pytest.raises(FormatError):
            rc.get_refcount(block, index, order)
    assert block == bytearray(512)
    with pytest.raises(FormatError):
        rc.get_refcount(block, 0, 7)
    with pytest.raises(FormatError):
        rc.max_refcount(7)


def test_set_refcount_narrow_keeps_other_bits_of_the_byte() -> None:
    block = bytearray(b"\xff" * 512)
    rc.set_refcount(block, 5, 0, 0)
    assert block[0] == 0b1101_1111
    rc.set_refcount(block, 3, 1, 0)  # bits 6..7 of byte 0
    assert block[0] == 0b0001_1111
    rc.set_refcount(block, 1, 2, 0x5)  # high nibble of byte 0
    assert block[0] == 0x5F
    assert block[1:] == b"\xff" * 511


# =========================================================================== L1 / L2 entries
def test_masks_partition_the_entry_bits() -> None:
    bits = lambda lo, hi: ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)  # noqa: E731
    assert L1E_OFFSET_MASK == bits(9, 55) == L2E_OFFSET_MASK
    assert bits(0, 8) | bits(56, 62) == L1E_RESERVED_MASK
    assert L1E_OFFSET_MASK | L1E_RESERVED_MASK | OFLAG_COPIED == ALL64
    assert L1E_OFFSET_MASK & L1E_RESERVED_MASK == 0
    assert bits(1, 8) | bits(56, 61) == L2E_STD_RESERVED_MASK
    parts = [L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, OFLAG_COPIED, OFLAG_COMPRESSED, OFLAG_ZERO]
    assert sum(parts) == ALL64 and sum(parts) == ALL64 & (
        L2E_OFFSET_MASK | L2E_STD_RESERVED_MASK | OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO)
    assert bits(9, 63) == REFT_OFFSET_MASK and bits(0, 8) == REFT_RESERVED_MASK
    assert (OFLAG_COPIED, OFLAG_COMPRESSED, OFLAG_ZERO) == (1 << 63, 1 << 62, 1)


@pytest.mark.parametrize(
    ("raw", "kind", "host", "copied"),
    [
        (0, ClusterType.UNALLOCATED, 0, False),
        (OFLAG_ZERO, ClusterType.ZERO_PLAIN, 0, False),
        (0x50000 | OFLAG_ZERO, ClusterType.ZERO_ALLOC, 0x50000, False),
        (0x50000 | OFLAG_ZERO | OFLAG_COPIED, ClusterType.ZERO_ALLOC, 0x50000, True),
        (0x50000, ClusterType.NORMAL, 0x50000, False),
        (0x50000 | OFLAG_COPIED, ClusterType.NORMAL, 0x50000, True),
        ((1 << 56) - 512 | OFLAG_COPIED, ClusterType.NORMAL, (1 << 56) - 512, True),
    ],
)
def test_l2_entry_decode_standard(raw: int, kind: ClusterType, host: int, copied: bool) -> None:
    e = L2Entry.decode(raw, 16)
    assert (e.type, e.host_offset, e.copied, e.reserved_bits, e.raw) == (kind, host, copied, 0,
                                                                         raw)


def test_l2_entry_reserved_bits_are_reported() -> None:
    e = L2Entry.decode(0x50000 | OFLAG_COPIED | 0x2 | (1 << 57), 16)
    assert e.type is ClusterType.NORMAL
    assert e.reserved_bits == 0x2 | (1 << 57)
    assert e.host_offset == 0x50000


@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_compressed_descriptor_round_trip(cluster_bits: int) -> None:
    x = compressed_offset_bits(cluster_bits)
    assert x == 62 - (cluster_bits - 8)  # qcow2.txt: x = 62 - (cluster_bits - 8)
    max_sectors = 1 << (cluster_bits - 8)
    for host in (512, 0x12345, (1 << x) - 1, 3 * (1 << cluster_bits) - 17):
        if host >= 1 << x:
            continue
        for sectors in (1, 2, max_sectors):
            raw = encode_compressed(host, sectors, cluster_bits)
            # offset in bits 0..x-1, (sectors - 1) in bits x..61, flag 62, no COPIED
            assert raw & ((1 << x) - 1) == host
            assert (raw >> x) & (max_sectors - 1) == sectors - 1
            assert raw & OFLAG_COMPRESSED and not raw & OFLAG_COPIED
            e = L2Entry.decode(raw, cluster_bits)
            assert e.type is ClusterType.COMPRESSED
            assert (e.host_offset, e.compressed_sectors) == (host, sectors)
            start, length = e.compressed_range()
            assert start == host
            assert start + length == (host & ~511) + sectors * 512


def test_compressed_bit_zero_is_part_of_the_offset() -> None:
    """In a compressed descriptor bit 0 is an offset bit, not the zero flag."""
    e = L2Entry.decode(encode_compressed(0x10001, 1, 16), 16)
    assert e.type is ClusterType.COMPRESSED and e.host_offset == 0x10001


def _snapshot_entry(l1_off: int, l1_size: int, sid: str, name: str, extra: bytes,
                    vm_state: int) -> bytes:
    raw = struct.pack(">QIHHIIQII", l1_off, l1_size, len(sid), len(name), 1, 2, 3, vm_state,
                      len(extra)) + extra + sid.encode() + name.encode()
    return raw + b"\0" * (-len(raw) % 8)


def test_snapshot_header_unpack() -> None:
    extra = struct.pack(">QQ", 1234, 1 << 20)  # vm_state_size_large, disk_size
    one = _snapshot_entry(0x30000, 2, "1", "first", extra, 77)
    two = _snapshot_entry(0x40000, 1, "22", "second snapshot", b"", 0)
    table = one + two
    a = SnapshotHeader.unpack(table, 0)
    assert (a.l1_table_offset, a.l1_size, a.id_str, a.name, a.vm_state_size, a.extra_data,
            a.size) == (0x30000, 2, "1", "first", 77, extra, len(one))
    assert a.size % 8 == 0
    b = SnapshotHeader.unpack(table, a.size)
    assert (b.l1_table_offset, b.id_str, b.name, b.size) == (0x40000, "22", "second snapshot",
                                                             len(two))
    for cut in (len(one) - 8 - len("first") + 2, 39, 10):
        with pytest.raises(FormatError, match="snapshot table"):
            SnapshotHeader.unpack(one[:cut], 0)


# =========================================================================== header
def make_header(**kw: int | bytes) -> Qcow2Header:
    base: dict[str, int | bytes] = dict(
        version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=16,
        size=4 << 20, crypt_method=0, l1_size=1, l1_table_offset=0x30000,
        refcount_table_offset=0x10000, refcount_table_clusters=1, nb_snapshots=0,
        snapshots_offset=0,
    )
    base.update(kw)
    return Qcow2Header(**base)  # type: ignore[arg-type]


@st.composite
def headers(draw: st.DrawFn) -> Qcow2Header:
    version = draw(st.sampled_from([2, 3]))
    cb = draw(st.integers(9, 21))
    cs = 1 << cb
    max_l1 = (32 << 20) // 8  # QCOW_MAX_L1_SIZE in entries
    # sized for extended L2 entries too (16 bytes: a table maps half as much)
    size = draw(st.integers(0, min(1 << 40, max_l1 * cs * (cs // 16)))) // 512 * 512
    l1_need = l1_entries_for(size, cb, extended_l2=True)
    l1_size = min(max_l1, l1_need + draw(st.integers(0, 3)))
    off = st.integers(1, 1 << 20).map(lambda n: n * cs)
    kw: dict[str, int | bytes] = dict(
        version=version, cluster_bits=cb, size=size, l1_size=l1_size,
        l1_table_offset=draw(off) if l1_size else draw(st.sampled_from([0, cs])),
        refcount_table_offset=draw(off),
        refcount_table_clusters=draw(st.integers(1, max(1, (8 << 20) // cs))),
        nb_snapshots=draw(st.integers(0, 3)),
    )
    kw["snapshots_offset"] = draw(off) if kw["nb_snapshots"] else 0
    if version == 3:
        hlen = draw(st.sampled_from([V3_MIN_HEADER_LENGTH, V3_HEADER_LENGTH, 120, 160, 504]))
        hlen = min(hlen, cs // 8 * 8)
        kw.update(
            incompatible_features=draw(st.integers(0, ALL64)),
            compatible_features=draw(st.integers(0, ALL64)),
            autoclear_features=draw(st.integers(0, ALL64)),
            refcount_order=draw(st.integers(0, 6)),
            header_length=hlen,
        )
        if hlen > V3_MIN_HEADER_LENGTH:
            zstd = bool(kw["incompatible_features"] & INCOMPAT_COMPRESSION) and draw(
                st.booleans())
            kw["compression_type"] = COMPRESSION_ZSTD if zstd else 0
            kw["unknown_fields"] = draw(st.binary(min_size=hlen - 105, max_size=hlen - 105))
        else:
            kw["unknown_fields"] = b""
    else:
        kw.update(header_length=V2_HEADER_LENGTH, unknown_fields=b"")
    return make_header(**kw)


@RECORD_SETTINGS
@given(headers())
def test_header_round_trip(h: Qcow2Header) -> None:
    raw = h.pack()
    assert len(raw) == h.header_length
    assert Qcow2Header.unpack(raw + bytes(64)) == h
    assert Qcow2Header.unpack(raw).pack() == raw
    # the spec's field offsets
    assert struct.unpack_from(">IIQIIQ", raw) == (QCOW_MAGIC, h.version, h.backing_file_offset,
                                                  h.backing_file_size, h.cluster_bits, h.size)
    assert struct.unpack_from(">QQII", raw, 40) == (h.l1_table_offset, h.refcount_table_offset,
                                                    h.refcount_table_clusters, h.nb_snapshots)
    if h.version == 3:
        assert struct.unpack_from(">QQQII", raw, 72) == (
            h.incompatible_features, h.compatible_features, h.autoclear_features,
            h.refcount_order, h.header_length)


def test_unknown_header_fields_kept_byte_for_byte() -> None:
    extra = bytes(range(1, 24))  # bytes 105..127 (a newer QEMU's fields)
    h = make_header(header_length=128, unknown_fields=b"\xab" + bytes(6) + extra[:16])
    raw = h.pack()
    assert raw[104] == 0 and raw[105:128] == b"\xab" + bytes(6) + extra[:16]
    assert Qcow2Header.unpack(raw).unknown_fields == raw[105:128]
    hc = HeaderCluster(h, (HeaderExtension(EXT_BACKING_FORMAT, b"raw"),), "base.raw")
    again = HeaderCluster.unpack(hc.pack() + bytes(1024))
    assert again.header.unknown_fields == raw[105:128]
    assert again.pack() == hc.pack()


ext_types = st.one_of(
    st.sampled_from([0x12345678, 0xDEADBEEF, 0x1, 0xFFFFFFFF]),
    st.integers(1, (1 << 32) - 1).filter(
        lambda t: t not in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_CRYPTO_HEADER,
                            EXT_BITMAPS, EXT_DATA_FILE)),
)


@st.composite
def header_clusters(draw: st.DrawFn) -> HeaderCluster:
    h = make_header(cluster_bits=16, header_length=draw(st.sampled_from([104, 112, 136])),
                    unknown_fields=b"")
    if h.header_length > 104:
        h = h.replace(unknown_fields=draw(st.binary(min_size=h.header_length - 105,
                                                    max_size=h.header_length - 105)))
    exts: list[HeaderExtension] = []
    if draw(st.booleans()):
        exts.append(HeaderExtension(EXT_BACKING_FORMAT, draw(st.sampled_from([b"raw",
                                                                              b"qcow2"]))))
    if draw(st.booleans()):
        exts.append(HeaderExtension(EXT_DATA_FILE, draw(st.binary(min_size=1, max_size=40))))
    if draw(st.booleans()):
        exts.append(HeaderExtension(EXT_FEATURE_TABLE, pack_feature_table()))
    if draw(st.booleans()):
        exts.append(HeaderExtension(EXT_BITMAPS, draw(st.binary(min_size=24, max_size=24))))
    unknown = draw(st.lists(st.tuples(ext_types, st.binary(max_size=41)), max_size=4,
                            unique_by=lambda t: t[0]))
    for t, data in unknown:
        exts.insert(draw(st.integers(0, len(exts))), HeaderExtension(t, data))
    backing = draw(st.one_of(st.none(), st.text(min_size=1, max_size=60)))
    return HeaderCluster(h, tuple(exts), backing)


@RECORD_SETTINGS
@given(header_clusters())
def test_header_cluster_round_trip(hc: HeaderCluster) -> None:
    raw = hc.pack()
    got = HeaderCluster.unpack(raw + bytes(100))
    assert got.extensions == hc.extensions  # unknown ones included, in file order
    assert got.backing_file == hc.backing_file
    assert got.pack() == raw
    # layout: header, {type, length, data, padding to 8} ..., end marker, backing name
    pos = hc.header.header_length
    for ext in hc.extensions:
        assert struct.unpack_from(">II", raw, pos) == (ext.type, len(ext.data))
        assert raw[pos + 8:pos + 8 + len(ext.data)] == ext.data
        pad = -len(ext.data) % 8
        assert raw[pos + 8 + len(ext.data):pos + 8 + len(ext.data) + pad] == bytes(pad)
        pos += 8 + len(ext.data) + pad
    assert raw[pos:pos + 8] == bytes(8)
    pos += 8
    if hc.backing_file is None:
        assert got.header.backing_file_offset == 0 and len(raw) == pos
    else:
        name = hc.backing_file.encode("utf-8", errors="surrogateescape")
        assert (got.header.backing_file_offset, got.header.backing_file_size) == (pos, len(name))
        assert raw[pos:] == name


def test_header_cluster_accessors_and_with_extension() -> None:
    hc = HeaderCluster(make_header(), (
        HeaderExtension(0x11111111, b"one"),
        HeaderExtension(EXT_FEATURE_TABLE, pack_feature_table()),
        HeaderExtension(0x22222222, b"two"),
    ))
    assert hc.backing_format is None and hc.data_file is None
    hc = hc.with_extension(EXT_DATA_FILE, b"data.raw")
    hc = hc.with_extension(EXT_BACKING_FORMAT, b"qcow2")
    # QEMU's order first, unknown extensions after it in their own order
    assert [e.type for e in hc.extensions] == [EXT_BACKING_FORMAT, EXT_DATA_FILE,
                                              EXT_FEATURE_TABLE, 0x11111111, 0x22222222]
    assert (hc.backing_format, hc.data_file) == ("qcow2", "data.raw")
    hc = hc.with_extension(EXT_DATA_FILE, b"other.raw")
    assert hc.data_file == "other.raw"
    assert [e.type for e in hc.extensions].count(EXT_DATA_FILE) == 1
    hc = hc.with_extension(EXT_DATA_FILE, None)
    assert hc.data_file is None and hc.extension(EXT_DATA_FILE) is None
    assert hc.extension(0x22222222) == HeaderExtension(0x22222222, b"two")


def test_feature_table_round_trip() -> None:
    raw = pack_feature_table()
    assert len(raw) == 48 * len(QEMU_FEATURE_TABLE)
    assert tuple(unpack_feature_table(raw)) == QEMU_FEATURE_TABLE
    full = FeatureNameEntry(FEATURE_TYPE_COMPAT, 63, "x" * 46)  # no NUL needed at 46 bytes
    assert FeatureNameEntry.unpack(full.pack()) == full
    # QEMU reads the name up to the first NUL
    assert FeatureNameEntry.unpack(bytes([0, 7]) + b"ab\0cd" + bytes(41)).name == "ab"
    with pytest.raises(FormatError):
        FeatureNameEntry(FEATURE_TYPE_COMPAT, 63, "x" * 47).pack()  # would not read back
    with pytest.raises(FormatError):
        unpack_feature_table(raw[:-1])


def test_l1_entries_for_matches_the_spec() -> None:
    for cb in (9, 12, 16, 21):
        per_l2 = (1 << cb) * ((1 << cb) // 8)  # bytes one L2 table maps
        for size in (0, 1, 512, per_l2 - 512, per_l2, per_l2 + 512, 7 * per_l2 + 1, 1 << 40):
            assert l1_entries_for(size, cb) == -(-size // per_l2)


# --------------------------------------------------------------------------- validation
def _hdr_bytes(**kw: int | bytes) -> bytearray:
    return bytearray(make_header(**kw).pack() + bytes(64))


def _poke(buf: bytearray, fmt: str, offset: int, value: int) -> bytearray:
    struct.pack_into(fmt, buf, offset, value)
    return buf


BAD_HEADERS: list[tuple[str, bytes, str]] = [
    ("short", bytes(71), "too short"),
    ("bad magic", bytes(_poke(_hdr_bytes(), ">I", 0, 0x514649FA)), "magic"),
    ("version 1", bytes(_poke(_hdr_bytes(), ">I", 4, 1)), "version"),
    ("version 4", bytes(_poke(_hdr_bytes(), ">I", 4, 4)), "version"),
    ("v3 too short", bytes(_hdr_bytes()[:100]), "too short"),
    ("cluster_bits 8", bytes(_poke(_hdr_bytes(), ">I", 20, 8)), "cluster size"),
    ("cluster_bits 22", bytes(_poke(_hdr_bytes(), ">I", 20, 22)), "cluster size"),
    ("refcount_order 7", bytes(_poke(_hdr_bytes(), ">I", 96, 7)), "refcount_order"),
    ("header_length 96", bytes(_poke(_hdr_bytes(), ">I", 100, 96)), "header_length"),
    ("header_length 108", bytes(_poke(_hdr_bytes(), ">I", 100, 108)), "multiple of 8"),
    ("header_length past buffer", bytes(_poke(_hdr_bytes(), ">I", 100, 4096)),
     "header_length"),
    ("header_length > cluster", bytes(_poke(
        bytearray(make_header(cluster_bits=9, size=1 << 18, l1_size=8, l1_table_offset=0x600,
                              refcount_table_offset=0x200).pack() + bytes(1024)),
        ">I", 100, 520)), "cluster size"),
    ("size >= 2^63", bytes(_poke(_hdr_bytes(), ">Q", 24, 1 << 63)), "too large"),
    ("L1 too small", bytes(_poke(_hdr_bytes(size=1 << 30, l1_size=2), ">I", 36, 1)),
     "L1 table is too small"),
    ("L1 too large", bytes(_poke(_hdr_bytes(), ">I", 36, (32 << 20) // 8 + 1)), "too large"),
    ("L1 unaligned", bytes(_poke(_hdr_bytes(), ">Q", 40, 0x30200)), "not cluster aligned"),
    ("L1 offset zero", bytes(_poke(_hdr_bytes(), ">Q", 40, 0)), "L1 table offset is zero"),
    ("reftable unaligned", bytes(_poke(_hdr_bytes(), ">Q", 48, 0x10008)),
     "not cluster aligned"),
    ("no reftable", bytes(_poke(_hdr_bytes(), ">I", 56, 0)), "no refcount table"),
    ("reftable too large", bytes(_poke(_hdr_bytes(), ">I", 56, 129)), "too large"),
    ("snapshots offset zero", bytes(_poke(_hdr_bytes(), ">I", 60, 1)),
     "snapshot table offset is zero"),
    ("snapshots unaligned", bytes(_poke(_poke(_hdr_bytes(), ">I", 60, 1), ">Q", 64, 0x10100)),
     "not cluster aligned"),
    ("compression type 2", bytes(_poke(_hdr_bytes(), ">B", 104, 2)), "compression type"),
    ("zstd without incompat bit", bytes(_poke(_hdr_bytes(), ">B", 104, 1)),
     "compression-type incompatible bit"),
    ("backing name too long", bytes(_poke(_poke(_hdr_bytes(), ">Q", 8, 0x200), ">I", 16, 1024)),
     "too long"),
    ("backing name outside cluster", bytes(_poke(_poke(_hdr_bytes(), ">Q", 8, 0xFFF0), ">I", 16,
                                                 0x20)), "outside the header cluster"),
]


@pytest.mark.parametrize(("buf", "needle"), [(b, n) for _, b, n in BAD_HEADERS],
                         ids=[i for i, _, _ in BAD_HEADERS])
def test_header_validation(buf: bytes, needle: str) -> None:
    with pytest.raises(FormatError, match=needle) as info:
        HeaderCluster.unpack(buf)
    assert info.value.structure == "qcow2 header"
    assert isinstance(info.value, DirtybitsError)


def test_v2_header_reads_defaults() -> None:
    h = Qcow2Header.unpack(_hdr_bytes(version=2, header_length=72, unknown_fields=b""))
    assert (h.version, h.refcount_order, h.header_length, h.incompatible_features,
            h.unknown_fields) == (2, 4, 72, 0, b"")
    with pytest.raises(FormatError, match="16-bit"):
        make_header(version=2, refcount_order=5, header_length=72).validate()


def _with_ext_area(area: bytes, cluster_bits: int = 16) -> bytes:
    h = make_header(cluster_bits=cluster_bits)
    return h.pack() + area


@pytest.mark.parametrize(
    ("area", "needle"),
    [
        (struct.pack(">II", EXT_BACKING_FORMAT, 17) + b"x" * 24 + bytes(8),
         "ext_backing_format"),
        # QEMU keeps the name in char[16] with its NUL: 16 bytes are already too many
        (struct.pack(">II", EXT_BACKING_FORMAT, 16) + b"x" * 16 + bytes(8),
         "ext_backing_format"),
        (struct.pack(">II", EXT_FEATURE_TABLE, 47) + bytes(48 + 8), "multiple of 48"),
        (struct.pack(">II", EXT_BITMAPS, 16) + bytes(16 + 8), "Invalid extension length"),
        (struct.pack(">II", EXT_CRYPTO_HEADER, 8) + bytes(16), "(?i)crypto header"),
        (struct.pack(">II", 0x1234, 4) + bytes(8) + struct.pack(">II", 0x1234, 4) + bytes(16),
         "appears twice"),
        (struct.pack(">II", 0x1234, 1 << 20) + bytes(64), "too large"),
        (struct.pack(">II", 0x1234, 64) + bytes(16), "ends inside a header extension"),
        (struct.pack(">II", 0x1234, 4), "ends inside a header extension"),
        (struct.pack(">II", 0x1234, 0), "ends inside the header extensions"),
    ],
    ids=["backing-fmt-17", "backing-fmt-16", "feature-table-47", "bitmaps-16", "crypto-8",
         "duplicate", "too-large", "truncated-data", "truncated-data-2", "no-end-marker"],
)
def test_extension_validation(area: bytes, needle: str) -> None:
    with pytest.raises(FormatError, match=needle):
        HeaderCluster.unpack(_with_ext_area(area))


def test_extensions_running_past_the_cluster() -> None:
    # 512-byte cluster: extensions that fill it leave no room for the end marker
    h = make_header(cluster_bits=9, size=1 << 18, l1_size=8, l1_table_offset=0x600,
                    refcount_table_offset=0x200)
    fill = 512 - h.header_length - 8
    area = struct.pack(">II", 0x1234, fill) + bytes(fill)
    with pytest.raises(FormatError, match="past the first cluster"):
        HeaderCluster.unpack(h.pack() + area + bytes(4096))
    with pytest.raises(FormatError, match="exceed one cluster"):
        HeaderCluster(h, (HeaderExtension(0x1234, bytes(fill)),), None).pack()


def test_backing_name_overlapping_extensions_is_refused() -> None:
    hc = HeaderCluster(make_header(), (HeaderExtension(EXT_BACKING_FORMAT, b"raw"),), "base")
    raw = bytearray(hc.pack())
    struct.pack_into(">Q", raw, 8, V3_HEADER_LENGTH)  # name "inside" the extension area
    with pytest.raises(FormatError, match="overlaps"):
        HeaderCluster.unpack(bytes(raw) + bytes(64))
    struct.pack_into(">Q", raw, 8, len(raw) - 2)  # runs past the end of the file
    with pytest.raises(FormatError, match="past the end"):
        HeaderCluster.unpack(bytes(raw))


# --------------------------------------------------------------------------- QEMU's headers
# `qemu-img create -f qcow2 -b base.raw -F raw h1.qcow2 4M` (qemu-img 7.2), bytes up to the end
# of the backing file name.
QEMU_V3_BACKING = bytes.fromhex(
    "514649fb00000003000000000000021000000008000000100000000000400000000000000000000100000000"
    "0003000000000000000100000000000100000000000000000000000000000000000000000000000000000000"
    "000000000000000000000004000000700000000000000000e2792aca0000000372617700000000006803f857"
    "0000018000006469727479206269740000000000000000000000000000000000000000000000000000000000"
    "00000000000000000001636f7272757074206269740000000000000000000000000000000000000000000000"
    "000000000000000000000000000265787465726e616c20646174612066696c65000000000000000000000000"
    "000000000000000000000000000000000003636f6d7072657373696f6e207479706500000000000000000000"
    "00000000000000000000000000000000000000000004657874656e646564204c3220656e7472696573000000"
    "00000000000000000000000000000000000000000000000001006c617a7920726566636f756e747300000000"
    "0000000000000000000000000000000000000000000000000000000002006269746d61707300000000000000"
    "000000000000000000000000000000000000000000000000000000000000000002017261772065787465726e"
    "616c206461746100000000000000000000000000000000000000000000000000000000000000000000000000"
    "626173652e726177"
)
# `qemu-img create -f qcow2 -o compat=0.10 -b base.raw -F raw h2.qcow2 4M`
QEMU_V2_BACKING = bytes.fromhex(
    "514649fb0000000200000000000000600000000800000010000000000040000000000000000000"
    "010000000000030000000000000001000000000001000000000000000000000000e2792aca0000"
    "000372617700000000000000000000000000626173652e726177"
)


def test_captured_qemu_v3_header() -> None:
    assert len(QEMU_V3_BACKING) == 536
    hc = HeaderCluster.unpack(QEMU_V3_BACKING + bytes(65536 - 536))
    h = hc.header
    assert (h.version, h.cluster_bits, h.size, h.l1_size, h.l1_table_offset) == (
        3, 16, 4 << 20, 1, 0x30000)
    assert (h.refcount_table_offset, h.refcount_table_clusters, h.refcount_order,
            h.header_length, h.compression_type) == (0x10000, 1, 4, 112, 0)
    assert (h.incompatible_features, h.compatible_features, h.autoclear_features) == (0, 0, 0)
    assert [e.type for e in hc.extensions] == [EXT_BACKING_FORMAT, EXT_FEATURE_TABLE]
    assert hc.backing_format == "raw" and hc.backing_file == "base.raw"
    assert (h.backing_file_offset, h.backing_file_size) == (0x210, 8)
    ft = hc.extension(EXT_FEATURE_TABLE)
    assert ft is not None
    assert tuple(unpack_feature_table(ft.data)) == QEMU_FEATURE_TABLE
    assert ft.data == pack_feature_table()
    assert hc.pack() == QEMU_V3_BACKING  # byte for byte what QEMU wrote


def test_captured_qemu_v2_header() -> None:
    hc = HeaderCluster.unpack(QEMU_V2_BACKING + bytes(1000))
    h = hc.header
    assert (h.version, h.header_length, h.refcount_order, h.cluster_bits, h.size) == (
        2, 72, 4, 16, 4 << 20)
    assert hc.backing_format == "raw" and hc.backing_file == "base.raw"
    assert hc.pack() == QEMU_V2_BACKING


def test_feature_table_entries_are_qemus() -> None:
    named = {(e.type, e.bit): e.name for e in QEMU_FEATURE_TABLE}
    assert named[(FEATURE_TYPE_INCOMPAT, 2)] == "external data file"
    assert named[(FEATURE_TYPE_INCOMPAT, 4)] == "extended L2 entries"
    assert named[(FEATURE_TYPE_COMPAT, 0)] == "lazy refcounts"
    assert named[(FEATURE_TYPE_AUTOCLEAR, 1)] == "raw external data"


QEMU_CREATE_CASES: list[tuple[str, list[str]]] = [
    ("default", []),
    ("v2", ["-o", "compat=0.10"]),
    ("cs512-rc1", ["-o", "cluster_size=512,refcount_bits=1"]),
    ("cs2M-rc64", ["-o", "cluster_size=2M,refcount_bits=64"]),
    ("rc2", ["-o", "refcount_bits=2"]),
    ("rc4", ["-o", "refcount_bits=4"]),
    ("rc8", ["-o", "refcount_bits=8"]),
    ("rc32", ["-o", "refcount_bits=32"]),
    ("lazy", ["-o", "lazy_refcounts=on"]),
    ("backing", ["-b", "base.raw", "-F", "raw"]),
    ("data-file", ["-o", "data_file=data.raw"]),
    ("data-file-raw", ["-o", "data_file=data.raw,data_file_raw=on"]),
    ("extended-l2", ["-o", "extended_l2=on"]),
    ("zstd", ["-o", "compression_type=zstd"]),
    ("luks", ["--object", "secret,id=sec0,data=123456", "-o",
              "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"]),
    ("aes", ["--object", "secret,id=sec0,data=123456", "-o",
             "encrypt.format=aes,encrypt.key-secret=sec0"]),
]


@pytest.mark.interop
@pytest.mark.parametrize(("args",), [(a,) for _, a in QEMU_CREATE_CASES],
                         ids=[n for n, _ in QEMU_CREATE_CASES])
def test_qemu_made_headers(qemu_tools: dict[str, str], tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
    img = tmp_path / "img.qcow2"
    for _attempt in range(5):
        made = qemu_img("create", "-q", "-f", "qcow2", *args, img, "3M", cwd=tmp_path, ok=None)
        # QEMU's LUKS key-slot benchmark gives up on a busy machine: a QEMU limit, try again
        if "Unable to get accurate CPU usage" not in made.stderr:
            break
    assert made.returncode == 0, made.stderr
    info = json.loads(qemu_img("info", "--output=json", "-U", img).stdout)
    spec = info["format-specific"]["data"]
    raw = img.read_bytes()[: 2 << 20]
    hc = HeaderCluster.unpack(raw)
    h = hc.header
    assert h.size == info["virtual-size"]
    assert h.cluster_size == info["cluster-size"]
    assert {2: "0.10", 3: "1.1"}[h.version] == spec["compat"]
    assert h.refcount_bits == spec["refcount-bits"]
    if h.version == 3:
        assert bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS) == spec["lazy-refcounts"]
        assert bool(h.incompatible_features & INCOMPAT_EXTL2) == spec.get("extended-l2", False)
        assert {0: "zlib", 1: "zstd"}[h.compression_type] == spec["compression-type"]
        assert bool(h.incompatible_features & INCOMPAT_DATA_FILE) == ("data-file" in spec)
        assert bool(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW) == spec.get(
            "data-file-raw", False)
    assert hc.data_file == spec.get("data-file")
    assert hc.backing_file == info.get("backing-filename")
    assert hc.backing_format == info.get("backing-filename-format")
    encrypt = spec.get("encrypt", {}).get("format")
    assert h.crypt_method == {None: 0, "aes": 1, "luks": 2}[encrypt]
    # only LUKS keeps its header in a crypto header extension
    assert (hc.extension(EXT_CRYPTO_HEADER) is not None) == (encrypt == "luks")
    if h.version == 3:
        assert hc.extension(EXT_FEATURE_TABLE) is not None or h.cluster_size <= 4096
    # our packing reproduces QEMU's cluster 0 byte for byte
    packed = hc.pack()
    assert raw[:len(packed)] == packed
    assert not any(raw[len(packed):h.cluster_size])


@pytest.mark.interop
@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_qemu_refcount_blocks_decode(qemu_tools: dict[str, str], tmp_path: Path,
                                     refcount_bits: int) -> None:
    """Refblocks QEMU wrote decode to the refcounts qemu-img check agrees with."""
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"cluster_size=4096,refcount_bits={refcount_bits}", img, "1M")
    # clusters: 0 header, 1 reftable, 2 refblock, 3 L1, then L2 + 3 data clusters
    qemu_io(img, "write -P 1 0 12k")
    raw = img.read_bytes()
    h = HeaderCluster.unpack(raw).header
    assert h.refcount_order == refcount_bits.bit_length() - 1
    rt0 = struct.unpack_from(">Q", raw, h.refcount_table_offset)[0] & REFT_OFFSET_MASK
    block = raw[rt0:rt0 + 4096]
    counts = rc.all_refcounts(block, h.refcount_order)
    used = len(raw) // 4096
    assert counts[:used] == [1] * used
    assert not any(counts[used:])
    assert rc.find_free(block, 0, h.refcount_order) == used
    assert bytes(block) == encode_block(counts, h.refcount_order)


@pytest.mark.interop
def test_qemu_made_snapshot_table(qemu_tools: dict[str, str], tmp_path: Path) -> None:
    img = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    for name in ("first", "a much longer snapshot name"):
        qemu_io(img, "write -P 1 0 64k")
        qemu_img("snapshot", "-c", name, img)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    raw = img.read_bytes()
    h = HeaderCluster.unpack(raw).header
    assert h.nb_snapshots == 2
    pos = h.snapshots_offset
    got = []
    for _ in range(h.nb_snapshots):
        sn = SnapshotHeader.unpack(raw, pos)
        assert sn.size % 8 == 0 and sn.l1_table_offset % h.cluster_size == 0
        assert sn.l1_size == h.l1_size
        assert len(sn.extra_data) >= 16  # QEMU writes vm_state_size_large and disk_size
        assert struct.unpack_from(">Q", sn.extra_data, 8)[0] == h.size
        got.append((sn.id_str, sn.name, sn.vm_state_size))
        pos += sn.size
    assert got == [(s["id"], s["name"], s["vm-state-size"]) for s in info["snapshots"]]
