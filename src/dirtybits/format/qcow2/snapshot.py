"""The internal snapshot table (``docs/interop/qcow2.txt``, "Snapshots"), byte for byte.

Wire layout of one entry (big-endian), each entry starting 8-byte aligned from the table's
start; the table is ``nb_snapshots`` entries at ``snapshots_offset``::

    0 -  7  l1_table_offset       the snapshot's own copy of the L1 table
    8 - 11  l1_size               its entries
   12 - 13  id_str size           (no terminating NUL)
   14 - 15  name size
   16 - 19  date_sec              wall clock when taken
   20 - 23  date_nsec
   24 - 31  vm_clock_nsec         guest clock when taken
   32 - 35  vm_state_size         32-bit; 0 when it does not fit (see the extra data)
   36 - 39  extra_data_size       bytes of extra data that follow
   40 -     extra data:  0 -  7  vm_state_size_large   (if extra_data_size >= 8)
                         8 - 15  disk_size             (>= 16: required in v3)
                        16 - 23  icount                (>= 24; -1: none)
                        24 -     unknown, kept byte for byte
            id_str, then name (no padding between them), then padding to 8

QEMU rewrites every entry with at least the 24 known bytes of extra data (an older, shorter
entry gains ``icount = -1``), and keeps unknown extra data; so does ``pack``. ``date`` and
``vm_clock`` are what ``qemu-img snapshot -l`` shows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from dirtybits.errors import FormatError

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # the fixed 40 bytes
EXTRA_KNOWN = 24  # sizeof(QCowSnapshotExtraData): vm_state_size_large, disk_size, icount
MAX_SNAPSHOT_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024  # QCOW_MAX_SNAPSHOTS_SIZE: the whole table
NO_ICOUNT = (1 << 64) - 1  # -1ULL: "no instruction count recorded"


def _text(raw: bytes) -> str:
    # names are C strings to QEMU: any bytes; surrogateescape brings them back unchanged
    return raw.decode("utf-8", errors="surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class SnapshotTableEntry:
    """One internal snapshot (QEMU's ``QCowSnapshot``)."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0  # the 64-bit size when the extra data has it
    disk_size: int | None = None  # None: an entry too old to say (the disk's size applies)
    icount: int = NO_ICOUNT
    extra_data_size: int = EXTRA_KNOWN  # as stored (at least EXTRA_KNOWN once rewritten)
    unknown_extra_data: bytes = field(default=b"", repr=False)

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, pos: int) -> tuple[
            SnapshotTableEntry, int]:
        """The entry at ``buf[pos:]`` and the offset just past it (not yet 8-aligned).

        Raises FormatError for a truncated entry or one with more extra data than QEMU
        accepts (QEMU refuses to open such an image until ``check -r all``).
        """
        if pos < 0 or pos + SNAPSHOT_HEADER.size > len(buf):
            raise FormatError("snapshot table truncated", structure="snapshot table",
                              offset=pos)
        (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state_size,
         extra_size) = SNAPSHOT_HEADER.unpack_from(buf, pos)
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError("Too much extra metadata in snapshot table entry",
                              structure="snapshot table", offset=pos)
        p = pos + SNAPSHOT_HEADER.size
        end = p + extra_size + id_size + name_size
        if end > len(buf):
            raise FormatError("snapshot table truncated", structure="snapshot table",
                              offset=pos)
        extra = bytes(buf[p:p + extra_size])
        disk_size: int | None = None
        icount = NO_ICOUNT
        if extra_size >= 8:
            vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if extra_size >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_size >= 24:
            icount = struct.unpack_from(">Q", extra, 16)[0]
        p += extra_size
        id_str = _text(bytes(buf[p:p + id_size]))
        p += id_size
        name = _text(bytes(buf[p:p + name_size]))
        return cls(l1_off, l1_size, id_str, name, date_sec, date_nsec, vm_clock,
                   vm_state_size, disk_size, icount, extra_size,
                   extra[EXTRA_KNOWN:]), end

    def packed_size(self) -> int:
        """Bytes ``pack`` produces (before the padding to the next entry)."""
        return (SNAPSHOT_HEADER.size + max(EXTRA_KNOWN, self.extra_data_size)
                + len(_raw(self.id_str)) + len(_raw(self.name)))

    def pack(self, disk_size: int) -> bytes:
        """The entry as QEMU 7.2's ``qcow2_write_snapshots`` writes it.

        ``disk_size`` stands in for an entry that records none (QEMU reads such an entry as
        the disk's current size and writes that). Raises FormatError when a field can't be
        represented (an id or name over 65535 bytes).
        """
        id_raw, name_raw = _raw(self.id_str), _raw(self.name)
        if len(id_raw) > 0xFFFF or len(name_raw) > 0xFFFF:
            raise FormatError("snapshot id or name longer than 65535 bytes",
                              structure="snapshot table")
        extra_size = max(EXTRA_KNOWN, self.extra_data_size)
        # a VM state too large for 32 bits reads as "disk-only" to older readers
        small = self.vm_state_size if self.vm_state_size <= 0xFFFFFFFF else 0
        head = SNAPSHOT_HEADER.pack(self.l1_table_offset, self.l1_size, len(id_raw),
                                    len(name_raw), self.date_sec, self.date_nsec,
                                    self.vm_clock_nsec, small, extra_size)
        size = self.disk_size if self.disk_size is not None else disk_size
        extra = struct.pack(">QQQ", self.vm_state_size, size, self.icount)
        return head + extra + self.unknown_extra_data + id_raw + name_raw


def unpack_table(buf: bytes | bytearray | memoryview, count: int) -> tuple[
        list[SnapshotTableEntry], int]:
    """``count`` entries from the start of ``buf`` and the table's length in bytes.

    Raises FormatError (truncated entry, too much extra data, a table over QEMU's 64 MiB).
    """
    entries: list[SnapshotTableEntry] = []
    pos = 0
    for _ in range(count):
        pos = (pos + 7) & ~7
        sn, pos = SnapshotTableEntry.unpack_from(buf, pos)
        entries.append(sn)
        if pos > MAX_SNAPSHOTS_SIZE:
            raise FormatError("Snapshot table is too big", structure="snapshot table")
    return entries, pos


def table_size(entries: list[SnapshotTableEntry]) -> int:
    """Bytes ``pack_table`` produces: each entry 8-aligned, no padding after the last."""
    pos = 0
    for sn in entries:
        pos = ((pos + 7) & ~7) + sn.packed_size()
    return pos


def pack_table(entries: list[SnapshotTableEntry], disk_size: int) -> bytes:
    """The whole table as QEMU writes it (raises FormatError past QEMU's 64 MiB limit)."""
    out = bytearray()
    for sn in entries:
        out += b"\0" * (-len(out) % 8)
        out += sn.pack(disk_size)
    if len(out) > MAX_SNAPSHOTS_SIZE:
        raise FormatError("Snapshot table is too big", structure="snapshot table")
    return bytes(out)
