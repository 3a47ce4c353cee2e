"""Refcount blocks: one cluster of ``refcount_bits``-wide unsigned entries.

Widths of 8 bits and more are big-endian integers; narrower widths pack several entries per
byte with entry 0 in the least significant bits (qcow2.txt). Every order qemu-img can create
(0..6, i.e. 1..64 bits) is supported. A bad order, an index outside the block or a value that
does not fit the width raises ``FormatError``: nothing is silently truncated or wrapped.
"""

from __future__ import annotations

import struct

from dirtybits.errors import FormatError

MAX_REFCOUNT_ORDER = 6

_WIDE = {
    3: struct.Struct(">B"),
    4: struct.Struct(">H"),
    5: struct.Struct(">I"),
    6: struct.Struct(">Q"),
}
_MAX = tuple((1 << (1 << order)) - 1 for order in range(MAX_REFCOUNT_ORDER + 1))


def _bad(msg: str) -> FormatError:
    return FormatError(msg, structure="refcount block")


def _check_order(order: int) -> None:
    if not 0 <= order <= MAX_REFCOUNT_ORDER:
        raise _bad(f"refcount_order {order} is outside 0..{MAX_REFCOUNT_ORDER}")


def entries_per_block(cluster_bits: int, refcount_order: int) -> int:
    _check_order(refcount_order)
    if not 9 <= cluster_bits <= 21:
        raise _bad(f"unsupported cluster size 2^{cluster_bits}")
    return 1 << (cluster_bits + 3 - refcount_order)


def max_refcount(refcount_order: int) -> int:
    _check_order(refcount_order)
    return _MAX[refcount_order]


def _out_of_range(block: bytes | bytearray | memoryview, index: int, order: int) -> FormatError:
    n = len(block) * 8 >> order
    return _bad(f"refcount index {index} is outside the block ({n} entries)")


def get_refcount(block: bytes | bytearray | memoryview, index: int, order: int) -> int:
    if index < 0 or not 0 <= order <= MAX_REFCOUNT_ORDER:
        _check_order(order)
        raise _out_of_range(block, index, order)
    if order >= 3:
        fmt = _WIDE[order]
        try:
            return int(fmt.unpack_from(block, index * fmt.size)[0])
        except struct.error:
            raise _out_of_range(block, index, order) from None
    bits = 1 << order
    per_byte = 8 >> order
    try:
        byte = block[index // per_byte]
    except IndexError:
        raise _out_of_range(block, index, order) from None
    shift = (index % per_byte) * bits
    return (byte >> shift) & ((1 << bits) - 1)


def set_refcount(block: bytearray, index: int, order: int, value: int) -> None:
    if index < 0 or not 0 <= order <= MAX_REFCOUNT_ORDER:
        _check_order(order)
        raise _out_of_range(block, index, order)
    if not 0 <= value <= _MAX[order]:
        raise _bad(f"refcount {value} does not fit in {1 << order} bits")
    if order >= 3:
        fmt = _WIDE[order]
        try:
            fmt.pack_into(block, index * fmt.size, value)
        except struct.error:
            raise _out_of_range(block, index, order) from None
        return
    bits = 1 << order
    per_byte = 8 >> order
    mask = (1 << bits) - 1
    pos = index // per_byte
    if pos >= len(block):
        raise _out_of_range(block, index, order)
    shift = (index % per_byte) * bits
    block[pos] = (block[pos] & ~(mask << shift)) | (value << shift)


def find_free(block: bytes | bytearray, start: int, order: int) -> int:
    """Index of the first zero entry at or after ``start``, or -1."""
    _check_order(order)
    if start < 0:
        raise _bad(f"refcount index {start} is negative")
    n = len(block) * 8 >> order
    if order >= 3:
        width = 1 << (order - 3)
        zero = b"\0" * width
        i = start
        while i < n:
            pos = block.find(zero, i * width)
            if pos < 0 or pos // width >= n:
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
    _check_order(order)
    if order >= 3:
        fmt = _WIDE[order]
        n = len(block) // fmt.size
        return list(struct.unpack(f">{n}{fmt.format[-1]}", bytes(block[:n * fmt.size])))
    n = len(block) * 8 >> order
    return [get_refcount(block, i, order) for i in range(n)]


def refcount_blocks_needed(clusters: int, cluster_size: int, refcount_order: int, *,
                           generous: bool = False) -> int:
    """Refcount blocks that count ``clusters`` clusters plus the refcount structure itself
    (QEMU's qcow2_refcount_metadata_size, the fixed point of blocks and table clusters).

    ``generous``: room for a table half again as large (QEMU's generous_increase), which
    is what QEMU sizes a grown refcount table from.
    """
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
        if n == last:
            return blocks
