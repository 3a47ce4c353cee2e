"""Hypothesis over every pure parser in ``dirtybits.format.qcow2``.

Each parser gets arbitrary bytes and structured mutations of valid input. The only outcomes
allowed are a valid record or ``FormatError``: never IndexError, struct.error, ValueError,
UnicodeError, ... A record that comes out must satisfy the rules QEMU enforces when it opens an
image (so a consumer can trust it) and survive ``pack`` -> ``unpack`` unchanged.

Example counts: ``DIRTYBITS_FUZZ_EXAMPLES=N`` runs every test here with N examples (default:
sized so this file takes a few seconds); with ``CI`` set the runs are derandomized.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from fuzzfiles import fuzz_settings

from dirtybits.errors import FormatError
from dirtybits.format.qcow2 import refcount as rc
from dirtybits.format.qcow2.bitmaps import (
    BitmapDirectory,
    BitmapsExtension,
    BitmapTableEntry,
    TableEntryKind,
    encode_name,
    pack_table,
    qemu_entry_error,
    table_entry_error,
    unpack_table,
)
from dirtybits.format.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    COMPRESSION_ZSTD,
    CRYPT_LUKS,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO_HEADER,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    MAX_BITMAP_DIRECTORY_SIZE,
    MAX_BITMAPS,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    QCOW_MAGIC,
    QEMU_FEATURE_TABLE,
    V2_HEADER_LENGTH,
    FeatureNameEntry,
    HeaderCluster,
    Qcow2Header,
    l1_entries_for,
    pack_feature_table,
    unpack_feature_table,
)
from dirtybits.format.qcow2.tables import (
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    ClusterType,
    L2Entry,
    SnapshotHeader,
    compressed_offset_bits,
    encode_compressed,
)

U64 = (1 << 64) - 1

# (field, byte offset, width) of every fixed header field, qcow2.txt's layout
HEADER_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8),
    ("backing_file_size", 16, 4), ("cluster_bits", 20, 4), ("size", 24, 8),
    ("crypt_method", 32, 4), ("l1_size", 36, 4), ("l1_table_offset", 40, 8),
    ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
    ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8),
    ("compatible_features", 80, 8), ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
    ("header_length", 100, 4), ("compression_type", 104, 1),
)


def interesting(width: int, near: int = 0, cluster: int = 512) -> st.SearchStrategy[int]:
    """Values that break parsers: edges, powers of two, cluster multiples, near ``near``."""
    top = (1 << (8 * width)) - 1
    specials = sorted({v & top for v in (
        0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 63, 64, 72, 104, 105, 112, 511, 512, 513,
        cluster - 1, cluster, cluster + 1, 2 * cluster, 1 << 31, (1 << 31) - 1, 1 << 32,
        (1 << 32) - 1, 1 << 56, (1 << 56) - cluster, 1 << 62, 1 << 63, (1 << 63) - 1,
        top, top - 1, near, near + 1, near - 1, near + cluster, near ^ 1,
    ) if v >= 0})
    return st.one_of(
        st.sampled_from(specials),
        st.integers(0, 8 * width - 1).map(lambda b: (1 << b) & top),
        st.integers(0, 8 * width - 1).map(lambda b: ((1 << b) - 1) & top),
        st.integers(0, 8 * width - 1).map(lambda b: (near ^ (1 << b)) & top),
        st.integers(0, top),
    )


# ---------------------------------------------------------------------------- header
@st.composite
def valid_headers(draw: st.DrawFn) -> Qcow2Header:
    version = draw(st.sampled_from([2, 3]))
    cb = draw(st.integers(9, 21))
    cs = 1 << cb
    order = 4 if version == 2 else draw(st.integers(0, 6))
    if version == 3:
        lengths = [n for n in range(104, min(cs, 256) + 1, 8)]
        header_length = draw(st.sampled_from(lengths))
    else:
        header_length = V2_HEADER_LENGTH
    max_l1 = MAX_L1_BYTES // 8
    l1_size = draw(st.integers(0, max_l1))
    shift = 2 * cb - 3
    need = max(0, (l1_size - 1)) << shift
    size = draw(st.integers(need, min((l1_size << shift), (1 << 63) - 1)))
    assume(l1_entries_for(size, cb) <= l1_size)
    aligned = st.integers(1, (MAX_HOST_OFFSET >> cb) - 1).map(lambda n: n << cb)
    l1_off = draw(aligned) if l1_size else draw(st.just(0) | aligned)
    nb_snapshots = draw(st.integers(0, MAX_SNAPSHOTS))
    sn_off = draw(aligned) if nb_snapshots else draw(st.just(0) | aligned)
    compression = draw(st.sampled_from([0, COMPRESSION_ZSTD])) if header_length > 104 else 0
    incompat = draw(st.integers(0, U64)) if version == 3 else 0
    if compression:
        incompat |= INCOMPAT_COMPRESSION
    if l1_entries_for(size, cb, extended_l2=True) > l1_size:
        incompat &= ~INCOMPAT_EXTL2  # 16-byte L2 entries would need a larger L1 table
    if draw(st.booleans()):
        bf_off = draw(st.integers(header_length, cs))
        bf_size = draw(st.integers(0, min(1023, cs - bf_off)))
    else:
        bf_off, bf_size = 0, draw(st.integers(0, (1 << 32) - 1))
    return Qcow2Header(
        version=version,
        backing_file_offset=bf_off,
        backing_file_size=bf_size,
        cluster_bits=cb,
        size=size,
        crypt_method=draw(st.integers(0, CRYPT_LUKS)),
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=draw(aligned),
        refcount_table_clusters=draw(st.integers(1, MAX_REFTABLE_BYTES // cs)),
        nb_snapshots=nb_snapshots,
        snapshots_offset=sn_off,
        incompatible_features=incompat,
        compatible_features=draw(st.integers(0, U64)) if version == 3 else 0,
        autoclear_features=draw(st.integers(0, U64)) if version == 3 else 0,
        refcount_order=order,
        header_length=header_length,
        compression_type=compression,
        unknown_fields=draw(st.binary(min_size=max(0, header_length - 105),
                                      max_size=max(0, header_length - 105))),
    )


def assert_qemu_would_open(h: Qcow2Header) -> None:
    """The limits qcow2_do_open enforces; a parsed header must be within all of them."""
    cs = h.cluster_size
    assert h.version in (2, 3)
    assert 9 <= h.cluster_bits <= 21
    assert h.refcount_order <= 6 and (h.version == 3 or h.refcount_order == 4)
    if h.version == 3:
        assert 104 <= h.header_length <= cs and h.header_length % 8 == 0
    assert h.size < 1 << 63
    assert h.crypt_method <= CRYPT_LUKS
    assert h.l1_size * 8 <= MAX_L1_BYTES
    assert h.l1_size >= l1_entries_for(h.size, h.cluster_bits)
    for off in (h.l1_table_offset, h.refcount_table_offset, h.snapshots_offset):
        assert off % cs == 0 and off < MAX_HOST_OFFSET
    assert h.refcount_table_clusters > 0 and h.refcount_table_clusters * cs <= MAX_REFTABLE_BYTES
    assert h.refcount_table_offset
    assert h.nb_snapshots <= MAX_SNAPSHOTS
    if h.backing_file_offset:
        assert h.backing_file_size <= 1023
        assert h.backing_file_offset + h.backing_file_size <= cs
    assert h.compression_type in (0, 1)


def unpack_header(buf: bytes) -> Qcow2Header | None:
    try:
        h = Qcow2Header.unpack(buf)
    except FormatError:
        return None
    assert_qemu_would_open(h)
    packed = h.pack()
    assert packed == buf[: len(packed)], "pack() does not give back the bytes unpacked"
    assert Qcow2Header.unpack(packed) == h
    return h


@fuzz_settings(500)
@given(st.binary(max_size=300))
def test_header_arbitrary_bytes(buf: bytes) -> None:
    unpack_header(buf)


@fuzz_settings(500)
@given(st.sampled_from([2, 3]), st.binary(min_size=0, max_size=200))
def test_header_with_magic_and_random_fields(version: int, tail: bytes) -> None:
    unpack_header(struct.pack(">II", QCOW_MAGIC, version) + tail)


@fuzz_settings(200)
@given(valid_headers())
def test_valid_header_round_trips(h: Qcow2Header) -> None:
    packed = h.pack()
    assert Qcow2Header.unpack(packed) == h
    assert_qemu_would_open(h)


@st.composite
def header_field_mutations(draw: st.DrawFn) -> tuple[bytes, str, int]:
    h = draw(valid_headers())
    buf = bytearray(h.pack()) + bytearray(draw(st.binary(max_size=16)))
    fields = [f for f in HEADER_FIELDS if f[1] + f[2] <= len(buf)]
    name, off, width = draw(st.sampled_from(fields))
    old = int.from_bytes(buf[off:off + width], "big")
    value = draw(interesting(width, old, h.cluster_size))
    buf[off:off + width] = value.to_bytes(width, "big")
    return bytes(buf), name, value


@fuzz_settings(500)
@given(header_field_mutations())
def test_header_field_mutations(case: tuple[bytes, str, int]) -> None:
    buf, name, value = case
    note(f"{name} = {value:#x}")
    h = unpack_header(buf)
    fields = {f[0]: f for f in HEADER_FIELDS}
    _name, off, width = fields[name]
    end = V2_HEADER_LENGTH if h is None or h.version == 2 else h.header_length
    if h is not None and name not in ("magic", "version") and off + width <= end:
        assert getattr(h, name) == value


@fuzz_settings(200)
@given(valid_headers(), st.sampled_from([f[0] for f in HEADER_FIELDS if f[0] != "magic"]),
       st.integers(-(1 << 70), 1 << 70))
def test_header_replace_out_of_range_is_format_error(h: Qcow2Header, name: str,
                                                     value: int) -> None:
    """A header built in memory with any field value: validate/pack accept it or FormatError."""
    bad = h.replace(**{name: value})
    try:
        bad.validate()
    except FormatError:
        pass
    else:
        assert_qemu_would_open(bad)
    try:
        packed = bad.pack()
    except FormatError:
        return
    assert len(packed) in (V2_HEADER_LENGTH, 104, bad.header_length)


# ---------------------------------------------------------------------------- header cluster
def ext_bytes(ext_type: int, data: bytes, length: int | None = None) -> bytes:
    n = len(data) if length is None else length
    return struct.pack(">II", ext_type, n) + data + b"\0" * ((-len(data)) % 8)


@st.composite
def known_extension(draw: st.DrawFn, cs: int) -> tuple[int, bytes]:
    kind = draw(st.sampled_from([EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_TABLE,
                                 EXT_BITMAPS, EXT_CRYPTO_HEADER, 0x12345678]))
    if kind == EXT_BACKING_FORMAT:
        data = draw(st.sampled_from([b"qcow2", b"raw", b"", b"x" * 15, b"x" * 16])
                    | st.binary(max_size=20))
    elif kind == EXT_FEATURE_TABLE:
        data = draw(st.sampled_from([pack_feature_table(), b""]) | st.binary(max_size=100))
    elif kind == EXT_BITMAPS:
        data = draw(st.one_of(
            st.builds(lambda nb, r, size, off: struct.pack(">IIQQ", nb, r, size, off),
                      interesting(4, 1), st.sampled_from([0, 0, 0, 1]),
                      interesting(8, 64, cs), interesting(8, 3 * cs, cs)),
            st.binary(min_size=20, max_size=28),
        ))
    elif kind == EXT_CRYPTO_HEADER:
        data = draw(st.binary(min_size=14, max_size=18))
    else:
        data = draw(st.binary(max_size=64))
    return kind, data


@st.composite
def header_clusters(draw: st.DrawFn) -> bytes:
    """Cluster 0 built by hand (not by pack): extensions, end marker, backing name."""
    h = draw(valid_headers().filter(lambda h: h.cluster_bits <= 16))
    cs = h.cluster_size
    exts = draw(st.lists(known_extension(cs), max_size=5))
    if draw(st.booleans()):
        h = h.replace(autoclear_features=h.autoclear_features | AUTOCLEAR_BITMAPS)
    if draw(st.booleans()):
        h = h.replace(crypt_method=CRYPT_LUKS)
    body = b"".join(ext_bytes(t, d) for t, d in exts) + ext_bytes(EXT_END, b"")
    backing = draw(st.none() | st.binary(max_size=40))
    start = h.header_length
    if backing is not None:
        h = h.replace(backing_file_offset=start + len(body), backing_file_size=len(backing))
    else:
        h = h.replace(backing_file_offset=0, backing_file_size=0)
    raw = h.pack() + body + (backing or b"")
    if len(raw) > cs or (backing is not None and len(backing) > 1023):
        raw = h.replace(backing_file_offset=0, backing_file_size=0).pack() + body
    return raw[:cs]


@st.composite
def mutated_header_clusters(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(header_clusters()))
    h = Qcow2Header.unpack(bytes(buf))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "ext-length", "ext-type", "truncate", "extend",
                                   "duplicate", "field"]))
        if op == "flip" and buf:
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= draw(st.integers(1, 255))
        elif op in ("ext-length", "ext-type", "duplicate"):
            # walk the extension headers as written (may already be damaged)
            heads = []
            pos = h.header_length
            while pos + 8 <= len(buf) and len(heads) < 16:
                t, n = struct.unpack_from(">II", buf, pos)
                heads.append(pos)
                if t == EXT_END:
                    break
                pos += 8 + ((n + 7) & ~7)
            if not heads:
                continue
            at = draw(st.sampled_from(heads))
            if op == "ext-length":
                struct.pack_into(">I", buf, at + 4, draw(interesting(4, 24, h.cluster_size)))
            elif op == "ext-type":
                struct.pack_into(">I", buf, at, draw(st.sampled_from(
                    [EXT_END, EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_TABLE, EXT_BITMAPS,
                     EXT_CRYPTO_HEADER]) | interesting(4)))
            else:
                t, n = struct.unpack_from(">II", buf, at)
                chunk = bytes(buf[at:at + 8 + ((min(n, 4096) + 7) & ~7)])
                buf[at:at] = chunk
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))):]
        elif op == "extend":
            buf += draw(st.binary(max_size=64))
        else:
            fields = [f for f in HEADER_FIELDS if f[1] + f[2] <= len(buf)]
            if fields:
                _name, off, width = draw(st.sampled_from(fields))
                old = int.from_bytes(buf[off:off + width], "big")
                buf[off:off + width] = draw(interesting(width, old, h.cluster_size)).to_bytes(
                    width, "big")
    return bytes(buf)


def check_header_cluster(buf: bytes) -> None:
    try:
        hc = HeaderCluster.unpack(buf)
    except FormatError:
        return
    h = hc.header
    assert_qemu_would_open(h)
    types = [e.type for e in hc.extensions]
    assert len(types) == len(set(types)), "duplicate extension accepted"
    for e in hc.extensions:
        if e.type == EXT_BACKING_FORMAT:
            assert len(e.data) < 16
        elif e.type == EXT_FEATURE_TABLE:
            assert len(e.data) % 48 == 0
            unpack_feature_table(e.data)
        elif e.type == EXT_CRYPTO_HEADER:
            assert len(e.data) == 16 and h.crypt_method == CRYPT_LUKS
        elif e.type == EXT_BITMAPS:
            assert len(e.data) == 24
            nb, reserved, dir_size, dir_off = struct.unpack(">IIQQ", e.data)
            if h.version == 3 and h.autoclear_features & AUTOCLEAR_BITMAPS:
                assert reserved == 0 and 0 < nb <= MAX_BITMAPS
                assert dir_size <= MAX_BITMAP_DIRECTORY_SIZE
                assert dir_off % h.cluster_size == 0 and dir_off < MAX_HOST_OFFSET
    # the strings a consumer prints or opens are always str
    for s in (hc.backing_file, hc.backing_format, hc.data_file):
        assert s is None or isinstance(s, str)
    try:
        packed = hc.pack()
    except FormatError:
        return
    assert len(packed) <= h.cluster_size
    again = HeaderCluster.unpack(packed)
    assert again.extensions == hc.extensions
    assert again.backing_file == hc.backing_file
    assert again.header == h.replace(backing_file_offset=again.header.backing_file_offset,
                                     backing_file_size=again.header.backing_file_size)
    assert again.pack() == packed


@fuzz_settings(150)
@given(header_clusters())
def test_header_cluster_built_by_hand(buf: bytes) -> None:
    check_header_cluster(buf)


@fuzz_settings(300)
@given(mutated_header_clusters())
def test_header_cluster_mutations(buf: bytes) -> None:
    check_header_cluster(buf)


@fuzz_settings(150)
@given(valid_headers().filter(lambda h: h.cluster_bits <= 12), st.binary(max_size=600))
def test_header_cluster_random_tail(h: Qcow2Header, tail: bytes) -> None:
    check_header_cluster(h.pack() + tail)


def test_extension_limits_are_qemus() -> None:
    """The QEMU refusals added to the records, each with a hand-built cluster."""
    base = Qcow2Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=16,
                       size=1 << 20, crypt_method=0, l1_size=1, l1_table_offset=3 << 16,
                       refcount_table_offset=1 << 16, refcount_table_clusters=1,
                       nb_snapshots=0, snapshots_offset=0,
                       autoclear_features=AUTOCLEAR_BITMAPS)
    end = ext_bytes(EXT_END, b"")

    def parse(h: Qcow2Header, *exts: bytes) -> HeaderCluster:
        return HeaderCluster.unpack(h.pack() + b"".join(exts) + end)

    bm = struct.Struct(">IIQQ")
    assert parse(base, ext_bytes(EXT_BITMAPS, bm.pack(1, 0, 64, 4 << 16))).extension(EXT_BITMAPS)
    for data, word in (
        (bm.pack(1, 1, 64, 4 << 16), "Reserved field"),
        (bm.pack(0, 0, 64, 4 << 16), "zero bitmaps"),
        (bm.pack(MAX_BITMAPS + 1, 0, 64, 4 << 16), "maximum of 65535"),
        (bm.pack(1, 0, 64, (4 << 16) + 8), "directory offset"),
        (bm.pack(1, 0, 64, 1 << 62), "directory offset"),
        (bm.pack(1, 0, MAX_BITMAP_DIRECTORY_SIZE + 1, 4 << 16), "directory size"),
    ):
        with pytest.raises(FormatError, match=word):
            parse(base, ext_bytes(EXT_BITMAPS, data))
        # without the autoclear bit QEMU ignores the extension, and so do we
        parse(base.replace(autoclear_features=0), ext_bytes(EXT_BITMAPS, data))
    parse(base, ext_bytes(EXT_BACKING_FORMAT, b"q" * 15))
    with pytest.raises(FormatError, match="too large"):
        parse(base, ext_bytes(EXT_BACKING_FORMAT, b"q" * 16))
    with pytest.raises(FormatError, match="LUKS"):
        parse(base, ext_bytes(EXT_CRYPTO_HEADER, bytes(16)))
    parse(base.replace(crypt_method=CRYPT_LUKS), ext_bytes(EXT_CRYPTO_HEADER, bytes(16)))
    with pytest.raises(FormatError, match="encryption method"):
        parse(base.replace(crypt_method=3))
    with pytest.raises(FormatError, match="Snapshot table too large"):
        parse(base.replace(nb_snapshots=MAX_SNAPSHOTS + 1, snapshots_offset=5 << 16))
    # QEMU checks an extension's length before its type: the end marker's too
    with pytest.raises(FormatError, match="Header extension too large"):
        HeaderCluster.unpack(base.pack() + struct.pack(">II", EXT_END, 0x40000000))
    parse(base.replace(autoclear_features=0), ext_bytes(EXT_END, b"", length=64))


# ---------------------------------------------------------------------------- feature table
def check_feature_entry(e: FeatureNameEntry) -> None:
    assert 0 <= e.type <= 255 and 0 <= e.bit <= 255
    assert "\0" not in e.name
    try:
        packed = e.pack()
    except FormatError:
        return
    assert len(packed) == 48
    assert FeatureNameEntry.unpack(packed) == e


@fuzz_settings(300)
@given(st.binary(max_size=60))
def test_feature_name_entry_bytes(buf: bytes) -> None:
    try:
        e = FeatureNameEntry.unpack(buf)
    except FormatError:
        assert len(buf) < 48
        return
    check_feature_entry(e)
    raw = buf[2:48].split(b"\0", 1)[0]
    try:
        raw.decode()
    except UnicodeDecodeError:
        return  # shown with replacement characters; nothing to compare byte for byte
    assert e.pack() == bytes(buf[:2]) + raw + bytes(46 - len(raw))


@fuzz_settings(200)
@given(st.integers(-2, 300), st.integers(-2, 300), st.text(max_size=60))
def test_feature_name_entry_pack(kind: int, bit: int, name: str) -> None:
    e = FeatureNameEntry(kind, bit, name)
    try:
        packed = e.pack()
    except FormatError:
        assert not (0 <= kind <= 255 and 0 <= bit <= 255) or "\0" in name or len(
            name.encode("utf-8", "surrogateescape")) > 46
        return
    assert FeatureNameEntry.unpack(packed) == e


@fuzz_settings(300)
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.binary(min_size=48, max_size=48), max_size=6).map(b"".join)))
def test_feature_table_bytes(buf: bytes) -> None:
    try:
        entries = unpack_feature_table(buf)
    except FormatError:
        assert len(buf) % 48
        return
    assert len(entries) == len(buf) // 48
    for e in entries:
        check_feature_entry(e)
    try:
        packed = pack_feature_table(tuple(entries))
    except FormatError:
        return
    assert unpack_feature_table(packed) == entries


def test_qemu_feature_table_round_trips() -> None:
    assert tuple(unpack_feature_table(pack_feature_table())) == QEMU_FEATURE_TABLE


# ---------------------------------------------------------------------------- L2 entries
@fuzz_settings(600)
@given(st.one_of(interesting(8), st.integers(-(1 << 65), 1 << 66)),
       st.one_of(st.integers(9, 21), st.integers(-3, 70)))
def test_l2_entry_decode(raw: int, cluster_bits: int) -> None:
    try:
        e = L2Entry.decode(raw, cluster_bits)
    except FormatError:
        assert not (0 <= raw <= U64 and 9 <= cluster_bits <= 21)
        return
    assert 0 <= raw <= U64 and 9 <= cluster_bits <= 21
    assert e.raw == raw and e.copied == bool(raw & OFLAG_COPIED)
    cs = 1 << cluster_bits
    if e.type is ClusterType.COMPRESSED:
        x = compressed_offset_bits(cluster_bits)
        assert 0 <= e.host_offset < 1 << x
        assert 1 <= e.compressed_sectors <= cs // 256  # the field has cb - 8 bits
        # the descriptor rebuilds bit for bit
        assert encode_compressed(e.host_offset, e.compressed_sectors, cluster_bits) | (
            raw & OFLAG_COPIED) == raw
        start, length = e.compressed_range()
        assert start == e.host_offset and 0 < length <= 2 * cs
    else:
        assert raw & OFLAG_COMPRESSED == 0
        assert e.host_offset == raw & L2E_OFFSET_MASK and e.host_offset % 512 == 0
        assert e.reserved_bits == raw & L2E_STD_RESERVED_MASK
        expect = (
            (ClusterType.ZERO_ALLOC if e.host_offset else ClusterType.ZERO_PLAIN)
            if raw & OFLAG_ZERO else
            (ClusterType.NORMAL if e.host_offset else ClusterType.UNALLOCATED)
        )
        assert e.type is expect


@fuzz_settings(300)
@given(st.integers(-(1 << 63), 1 << 64), st.integers(-2, 5000), st.integers(0, 30))
def test_encode_compressed(host: int, sectors: int, cluster_bits: int) -> None:
    try:
        raw = encode_compressed(host, sectors, cluster_bits)
    except FormatError:
        return
    e = L2Entry.decode(raw, cluster_bits)
    assert (e.type, e.host_offset, e.compressed_sectors, e.copied) == (
        ClusterType.COMPRESSED, host, sectors, False)


# ---------------------------------------------------------------------------- snapshots
SNAPSHOT = struct.Struct(">QIHHIIQII")


@st.composite
def snapshot_entries(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    fields = {
        "l1_table_offset": draw(interesting(8)),
        "l1_size": draw(interesting(4)),
        "vm_state_size": draw(interesting(4)),
        "extra": draw(st.binary(max_size=40)),
        "id": draw(st.text(max_size=8)).encode(),
        "name": draw(st.text(max_size=20)).encode(),
    }
    raw = SNAPSHOT.pack(fields["l1_table_offset"], fields["l1_size"], len(fields["id"]),
                        len(fields["name"]), 1, 2, 3, fields["vm_state_size"],
                        len(fields["extra"]))
    raw += fields["extra"] + fields["id"] + fields["name"]
    return raw + bytes((-len(raw)) % 8), fields


@fuzz_settings(200)
@given(snapshot_entries(), st.binary(max_size=16))
def test_snapshot_entry_valid(case: tuple[bytes, dict[str, Any]], prefix: bytes) -> None:
    raw, f = case
    sn = SnapshotHeader.unpack(prefix + raw, len(prefix))
    assert (sn.l1_table_offset, sn.l1_size, sn.vm_state_size, sn.extra_data) == (
        f["l1_table_offset"], f["l1_size"], f["vm_state_size"], f["extra"])
    assert sn.id_str == f["id"].decode() and sn.name == f["name"].decode()
    assert sn.size == len(raw) and sn.size % 8 == 0


@fuzz_settings(400)
@given(st.one_of(st.binary(max_size=200),
                 st.tuples(snapshot_entries(), st.integers(0, 200), st.integers(0, 255)).map(
                     lambda t: _flip(t[0][0], t[1], t[2]))),
       st.integers(-50, 250))
def test_snapshot_entry_bytes(buf: bytes, pos: int) -> None:
    try:
        sn = SnapshotHeader.unpack(buf, pos)
    except FormatError:
        return
    assert pos >= 0 and pos + sn.size <= len(buf) + 7
    assert sn.size % 8 == 0 and sn.size >= 40
    assert len(sn.extra_data) <= 1024
    assert isinstance(sn.id_str, str) and isinstance(sn.name, str)


def _flip(buf: bytes, pos: int, mask: int) -> bytes:
    out = bytearray(buf)
    if out:
        out[pos % len(out)] ^= mask
    return bytes(out)


# ---------------------------------------------------------------------------- refcounts
@fuzz_settings(600)
@given(st.binary(max_size=80), st.integers(-3, 9), st.integers(-10, 700),
       st.one_of(st.integers(-5, 300), interesting(8), st.integers(-(1 << 70), 1 << 70)))
def test_refcount_get_set(block: bytes, order: int, index: int, value: int) -> None:
    buf = bytearray(block)
    n = len(block) * 8 >> order if 0 <= order <= 6 else 0
    try:
        old = rc.get_refcount(buf, index, order)
    except FormatError:
        assert not (0 <= order <= 6 and 0 <= index < n)
        return
    assert 0 <= order <= 6 and 0 <= index < n
    assert 0 <= old <= rc.max_refcount(order)
    before = rc.all_refcounts(bytes(buf), order)
    assert len(before) == n and before[index] == old
    try:
        rc.set_refcount(buf, index, order, value)
    except FormatError:
        assert not 0 <= value <= rc.max_refcount(order)
        assert bytes(buf) == block, "a refused set changed the block"
        return
    after = rc.all_refcounts(bytes(buf), order)
    assert after[index] == value
    assert after[:index] + after[index + 1:] == before[:index] + before[index + 1:]
    assert len(buf) == len(block)


@fuzz_settings(300)
@given(st.binary(max_size=64), st.integers(-3, 9), st.integers(-5, 600))
def test_refcount_find_free(block: bytes, order: int, start: int) -> None:
    try:
        found = rc.find_free(block, start, order)
    except FormatError:
        assert not (0 <= order <= 6 and start >= 0)
        return
    values = rc.all_refcounts(block, order)
    zeros = [i for i, v in enumerate(values) if v == 0 and i >= start]
    assert found == (zeros[0] if zeros else -1)


@fuzz_settings(200)
@given(st.integers(-3, 30), st.integers(-3, 9))
def test_refcount_geometry(cluster_bits: int, order: int) -> None:
    try:
        n = rc.entries_per_block(cluster_bits, order)
        top = rc.max_refcount(order)
    except FormatError:
        assert not (0 <= order <= 6 and 9 <= cluster_bits <= 21)
        return
    assert n == (1 << (cluster_bits + 3)) >> order
    assert top == (1 << (1 << order)) - 1


# ---------------------------------------------------------------------------- bitmaps
CLUSTER_SIZES = st.sampled_from([512, 4096, 65536, 1 << 21])


@st.composite
def bitmaps_extensions(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=30))
    return struct.pack(">IIQQ", draw(interesting(4, 1)), draw(st.sampled_from([0, 0, 1]) |
                                                           interesting(4)),
                       draw(interesting(8, 64)), draw(interesting(8, 1 << 16, 65536)))


@fuzz_settings(300)
@given(bitmaps_extensions(), CLUSTER_SIZES)
def test_bitmaps_extension(data: bytes, cs: int) -> None:
    try:
        ext = BitmapsExtension.unpack(data)
    except FormatError:
        assert len(data) != 24
        return
    assert ext.pack() == data
    try:
        ext.validate(cs)
    except FormatError:
        return
    assert ext.reserved == 0 and 0 < ext.nb_bitmaps <= MAX_BITMAPS
    assert ext.bitmap_directory_offset % cs == 0
    assert 0 < ext.bitmap_directory_size <= MAX_BITMAP_DIRECTORY_SIZE


@st.composite
def directory_entries(draw: st.DrawFn) -> bytes:
    name = draw(st.binary(max_size=12))
    extra = draw(st.binary(max_size=12))
    raw = struct.pack(">QIIBBHI", draw(interesting(8, 1 << 16, 65536)), draw(interesting(4, 1)),
                      draw(st.sampled_from([0, 1, 2, 3, 4]) | interesting(4)),
                      draw(st.sampled_from([1, 0, 2, 255])), draw(st.integers(0, 255)),
                      len(name), len(extra)) + extra + name
    return raw + bytes((-len(raw)) % 8)


@st.composite
def directories(draw: st.DrawFn) -> tuple[bytes, int]:
    entries = draw(st.lists(directory_entries(), max_size=4))
    buf = bytearray(b"".join(entries))
    nb = len(entries)
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["flip", "truncate", "nb", "append"]))
        if op == "flip" and buf:
            buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))):]
        elif op == "nb":
            nb = draw(interesting(4, nb))
        else:
            buf += draw(st.binary(max_size=40))
    return bytes(buf), nb


@fuzz_settings(400)
@given(directories(), CLUSTER_SIZES, st.integers(0, (1 << 63) - 1) | st.sampled_from(
    [0, 512, 1 << 20, 1 << 30]))
def test_bitmap_directory(case: tuple[bytes, int], cs: int, disk: int) -> None:
    buf, nb = case
    try:
        d = BitmapDirectory.unpack(buf, nb)
    except FormatError:
        return
    assert d.nb_bitmaps == nb and d.size == len(buf)
    packed = d.pack()
    assert len(packed) == len(buf)
    assert BitmapDirectory.unpack(packed, nb) == d
    for e, reasons in zip(d.entries, d.check_entries(cs, disk), strict=True):
        assert isinstance(reasons, list)
        err = qemu_entry_error(e, cs, disk)
        assert err is None or isinstance(err, str)
        if not reasons:  # usable for us: QEMU would load it too
            assert err is None, err
        assert isinstance(e.name, str) and encode_name(e.name) == e.raw_name


@fuzz_settings(400)
@given(interesting(8, 1 << 16, 65536), CLUSTER_SIZES)
def test_bitmap_table_entry(raw: int, cs: int) -> None:
    err = table_entry_error(raw, cs)
    try:
        te = BitmapTableEntry.decode(raw, cs)
    except FormatError:
        assert err is not None
        return
    assert err is None
    assert te.encode() == raw
    if te.kind is TableEntryKind.DATA:
        assert te.offset % cs == 0


@fuzz_settings(200)
@given(st.binary(max_size=80), st.integers(0, 12))
def test_bitmap_table(buf: bytes, n: int) -> None:
    try:
        table = unpack_table(buf, n)
    except FormatError:
        assert len(buf) < 8 * n
        return
    assert len(table) == n and pack_table(table) == buf[:8 * n]
