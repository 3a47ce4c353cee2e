"""L1 and L2 table entries (big-endian u64) as ``docs/interop/qcow2.txt`` defines them.

The engine's hot path works on raw integers with the masks below; ``L2Entry.decode`` gives a
typed view for checking, mapping and tests.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from dirtybits.errors import FormatError

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_SNAPSHOT_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes


class ClusterType(enum.Enum):
    UNALLOCATED = "unallocated"  # read from backing file, or zeros
    ZERO_PLAIN = "zero-plain"  # reads as zeros, no host cluster
    ZERO_ALLOC = "zero-alloc"  # reads as zeros, host cluster kept (preallocated)
    NORMAL = "normal"
    COMPRESSED = "compressed"


def _check_cluster_bits(cluster_bits: int, structure: str) -> None:
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"unsupported cluster size 2^{cluster_bits}", structure=structure)


def compressed_offset_bits(cluster_bits: int) -> int:
    """Number of low bits holding the host offset in a compressed cluster descriptor."""
    _check_cluster_bits(cluster_bits, "compressed cluster descriptor")
    return 62 - (cluster_bits - 8)


@dataclass(frozen=True)
class L2Entry:
    raw: int
    type: ClusterType
    host_offset: int  # 0 when none
    copied: bool
    compressed_sectors: int = 0  # for compressed: number of 512-byte sectors spanned
    reserved_bits: int = 0

    @classmethod
    def decode(cls, raw: int, cluster_bits: int) -> L2Entry:
        if not 0 <= raw < 1 << 64:
            raise FormatError(f"L2 entry {raw:#x} is not a 64-bit value", structure="L2 table")
        _check_cluster_bits(cluster_bits, "L2 table")
        copied = bool(raw & OFLAG_COPIED)
        if raw & OFLAG_COMPRESSED:
            x = compressed_offset_bits(cluster_bits)
            host = raw & ((1 << x) - 1)
            sectors = ((raw >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
            return cls(raw, ClusterType.COMPRESSED, host, copied, sectors)
        host = raw & L2E_OFFSET_MASK
        reserved = raw & L2E_STD_RESERVED_MASK
        if raw & OFLAG_ZERO:
            kind = ClusterType.ZERO_ALLOC if host else ClusterType.ZERO_PLAIN
        elif host:
            kind = ClusterType.NORMAL
        else:
            kind = ClusterType.UNALLOCATED
        return cls(raw, kind, host, copied, 0, reserved)

    def compressed_range(self) -> tuple[int, int]:
        """(host start, byte length) of the compressed payload's sectors."""
        start = self.host_offset
        end = ((start & ~511) + self.compressed_sectors * 512)
        return start, end - start


def encode_compressed(host_offset: int, nb_sectors: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster (COPIED clear, as it must be)."""
    x = compressed_offset_bits(cluster_bits)
    if not 0 <= host_offset < 1 << x:
        raise FormatError(f"compressed cluster offset {host_offset:#x} does not fit in {x} bits",
                          structure="compressed cluster descriptor")
    if not 1 <= nb_sectors <= 1 << (cluster_bits - 8):
        raise FormatError(f"compressed cluster spans {nb_sectors} sectors, not 1.."
                          f"{1 << (cluster_bits - 8)}", structure="compressed cluster descriptor")
    return OFLAG_COMPRESSED | ((nb_sectors - 1) << x) | host_offset


def compressed_descriptor(host_offset: int, nbytes: int, cluster_bits: int) -> int:
    """The L2 entry QEMU writes for ``nbytes`` of compressed data at ``host_offset``
    (qcow2_alloc_compressed_cluster_offset): the sector count field names every 512-byte
    sector the bytes touch, counted from the sector holding the first byte."""
    if nbytes < 1:
        raise FormatError("a compressed cluster needs at least one byte",
                          structure="compressed cluster descriptor")
    nb = ((host_offset + nbytes - 1) >> 9) - (host_offset >> 9) + 1
    return encode_compressed(host_offset, nb, cluster_bits)


@dataclass(frozen=True)
class SnapshotHeader:
    """One internal snapshot table entry (only what checking and refusing need)."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    vm_state_size: int
    extra_data: bytes
    size: int  # bytes this entry occupies in the table, padding included

    @classmethod
    def unpack(cls, buf: bytes, pos: int) -> SnapshotHeader:
        """The entry at ``buf[pos:]``, with QEMU's limit on extra data."""
        if pos < 0 or pos + _SNAPSHOT_HEADER.size > len(buf):
            raise FormatError("snapshot table truncated", structure="snapshot table", offset=pos)
        (l1_off, l1_size, id_size, name_size, _ds, _dn, _vm_clock, vm_state_size,
         extra_size) = _SNAPSHOT_HEADER.unpack_from(buf, pos)
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError("Too much extra metadata in snapshot table entry",
                              structure="snapshot table", offset=pos)
        end = pos + _SNAPSHOT_HEADER.size + extra_size + id_size + name_size
        if end > len(buf):
            raise FormatError("snapshot table truncated", structure="snapshot table", offset=pos)
        p = pos + _SNAPSHOT_HEADER.size
        extra = bytes(buf[p:p + extra_size])
        p += extra_size
        id_str = bytes(buf[p:p + id_size]).decode(errors="replace")
        p += id_size
        name = bytes(buf[p:p + name_size]).decode(errors="replace")
        size = ((end - pos) + 7) & ~7
        return cls(l1_off, l1_size, id_str, name, vm_state_size, extra, size)
