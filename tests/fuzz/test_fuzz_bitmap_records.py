"""Hypothesis over the bitmaps extension parsers: any bytes give records or ``FormatError``.

Images come from other programs and from damaged disks, so the parsers must never fail with
another exception (which would take the whole open down instead of one bitmap), and what they
accept must survive a rewrite.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from dirtybits.errors import FormatError
from dirtybits.format.qcow2.bitmaps import (
    BME_FLAG_AUTO,
    BT_DIRTY_TRACKING_BITMAP,
    BitmapConstraintError,
    BitmapDirectory,
    BitmapDirectoryEntry,
    BitmapsExtension,
    BitmapTableEntry,
    bitmap_table_size,
    check_entry,
    check_new_bitmap,
    qemu_entry_error,
    table_entry_error,
)

cluster_sizes = st.integers(9, 21).map(lambda b: 1 << b)
disk_sizes = st.one_of(st.integers(0, 1 << 20), st.integers(0, 1 << 62))

entries = st.builds(
    BitmapDirectoryEntry,
    bitmap_table_offset=st.one_of(st.integers(0, 1 << 30).map(lambda x: x << 16),
                                  st.integers(0, (1 << 64) - 1)),
    bitmap_table_size=st.one_of(st.integers(0, 4), st.integers(0, (1 << 32) - 1)),
    flags=st.one_of(st.integers(0, 7), st.integers(0, (1 << 32) - 1)),
    type=st.one_of(st.just(BT_DIRTY_TRACKING_BITMAP), st.integers(0, 255)),
    granularity_bits=st.integers(0, 255),
    raw_name=st.binary(max_size=40),
    extra_data=st.one_of(st.just(b""), st.binary(max_size=24)),
)


def assert_sound(d: BitmapDirectory, raw: bytes, nb: int, cs: int, disk: int) -> None:
    """What unpack accepted has the promised shape and rewrites to an equal directory."""
    assert d.nb_bitmaps == nb and d.size == len(raw)
    packed = d.pack()
    assert len(packed) == len(raw)
    assert BitmapDirectory.unpack(packed, nb) == d
    for reasons in d.check_entries(cs, disk):
        assert all(isinstance(r, str) and r for r in reasons)
    for e in d.entries:
        msg = qemu_entry_error(e, cs, disk)
        # We never call usable what QEMU refuses.
        assert msg is None or check_entry(e, cs, disk)


@given(st.binary(max_size=600), st.integers(0, 12), cluster_sizes, disk_sizes)
def test_arbitrary_directory_bytes(raw: bytes, nb: int, cs: int, disk: int) -> None:
    try:
        d = BitmapDirectory.unpack(raw, nb, offset=cs)
    except FormatError:
        return
    assert_sound(d, raw, nb, cs, disk)


@given(
    st.lists(entries, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(-9, 9),
    st.integers(-1, 1),
    cluster_sizes,
    disk_sizes,
)
def test_mutated_directory(ents: list[BitmapDirectoryEntry], flips: list[tuple[int, int]],
                           cut: int, nb_delta: int, cs: int, disk: int) -> None:
    d0 = BitmapDirectory(tuple(ents))
    raw = bytearray(d0.pack())
    assert BitmapDirectory.unpack(bytes(raw), d0.nb_bitmaps) == d0
    for pos, value in flips:
        raw[pos % len(raw)] = value
    if cut < 0:
        del raw[cut:]
    else:
        raw += bytes(cut)
    nb = d0.nb_bitmaps + nb_delta
    try:
        d = BitmapDirectory.unpack(bytes(raw), nb)
    except FormatError:
        return
    assert_sound(d, bytes(raw), nb, cs, disk)


@given(st.binary(max_size=40), cluster_sizes)
def test_extension_bytes(raw: bytes, cs: int) -> None:
    try:
        ext = BitmapsExtension.unpack(raw)
        ext.validate(cs)
    except FormatError:
        return
    assert ext.pack() == raw
    assert 1 <= ext.nb_bitmaps <= 65535 and ext.bitmap_directory_offset % cs == 0
    assert 0 < ext.bitmap_directory_size <= 1024 * 65535


@given(st.integers(0, (1 << 64) - 1), cluster_sizes)
def test_table_entry_words(raw: int, cs: int) -> None:
    try:
        entry = BitmapTableEntry.decode(raw, cs)
    except FormatError:
        assert table_entry_error(raw, cs) is not None
        return
    assert entry.encode() == raw
    assert entry.offset % cs == 0


@given(
    st.text(min_size=1, max_size=30),
    st.integers(0, 40).map(lambda b: 1 << b),
    disk_sizes,
    cluster_sizes,
)
def test_bitmap_accepted_at_add_is_usable_when_stored(name: str, granularity: int, disk: int,
                                                       cs: int) -> None:
    """Add-time and load-time rules agree: what may be added, QEMU (and we) can load."""
    try:
        check_new_bitmap(name, granularity, disk, cs, 0, 0)
    except BitmapConstraintError:
        return
    size = bitmap_table_size(disk, granularity, cs)
    if size == 0:
        return  # empty disk: QEMU cannot store the bitmap until the disk grows
    e = BitmapDirectoryEntry.new(name, granularity=granularity, bitmap_table_offset=cs,
                                 bitmap_table_size=size, flags=BME_FLAG_AUTO)
    if "\0" in name:
        assert check_entry(e, cs, disk) == ["name contains a NUL byte"]
        e = replace(e, raw_name=e.raw_name.replace(b"\0", b"_"))
    assert check_entry(e, cs, disk) == []
    assert qemu_entry_error(e, cs, disk) is None
