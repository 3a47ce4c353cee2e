"""Refcount blocks: one cluster of ``refcount_bits``-wide unsigned entries.

Widths of 8 bits and more are big-endian integers; narrower widths pack several entries per
byte with entry 0 in the least significant bits (qcow2.txt). Every order qemu-img can create
(0..6, i.e. 1..64 bits) is supported.
"""

from __future__ import annotations

import struct

_WIDE = {
    3: struct.Struct(">B"),
    4: struct.Struct(">H"),
    5: struct.Struct(">I"),
    6: struct.Struct(">Q"),
}


def entries_per_block(cluster_bits: int, refcount_order: int) -> int:
    return 1 << (cluster_bits + 3 - refcount_order)


def max_refcount(refcount_order: int) -> int:
    return (1 << (1 << refcount_order)) - 1


def get_refcount(block: bytes | bytearray | memoryview, index: int, order: int) -> int:
    if order >= 3:
        fmt = _WIDE[order]
        return int(fmt.unpack_from(block, index * fmt.size)[0])
    bits = 1 << order
    per_byte = 8 >> order
    byte = block[index // per_byte]
    shift = (index % per_byte) * bits
    return (byte >> shift) & ((1 << bits) - 1)


def set_refcount(block: bytearray, index: int, order: int, value: int) -> None:
    if order >= 3:
        fmt = _WIDE[order]
        fmt.pack_into(block, index * fmt.size, value)
        return
    bits = 1 << order
    per_byte = 8 >> order
    mask = (1 << bits) - 1
    pos = index // per_byte
    shift = (index % per_byte) * bits
    block[pos] = (block[pos] & ~(mask << shift)) | ((value & mask) << shift)


def find_free(block: bytes | bytearray, start: int, order: int) -> int:
    """Index of the first zero entry at or after ``start``, or -1."""
    n = len(block) * 8 >> order
    if order >= 3:
        width = 1 << (order - 3)
        zero = b"\0" * width
        i = start
        while i < n:
            pos = block.find(zero, i * width)
            if pos < 0:
                return -1
            if pos % width == 0:
                return pos // width
            i = pos // width + 1
        return -1
    for i in range(start, n):
        if get_refcount(block, i, order) == 0:
            return i
    return -1


def all_refcounts(block: bytes | bytearray, order: int) -> list[int]:
    """Every entry of a block, for checking; wide widths decode in one call."""
    if order >= 3:
        fmt = _WIDE[order]
        n = len(block) // fmt.size
        return list(struct.unpack(f">{n}{fmt.format[-1]}", bytes(block)))
    n = len(block) * 8 >> order
    return [get_refcount(block, i, order) for i in range(n)]
