"""Read-only view of an image's persistent bitmaps for ``info`` and ``check``.

Built on the records of ``dirtybits.format.qcow2.bitmaps`` and a plain ``pread`` callable, so
it needs no image engine: ``info`` must work on images the engine (or QEMU) refuses, and
``check`` must stay an independent judge. It judges each bitmap the way the bitmap store does
(``block/qcow2_bitmaps.py``): a damaged directory entry or table makes that bitmap unusable,
with the reasons, instead of making the whole image unreadable as in QEMU.

``count_dirty`` counts a bitmap's dirty bytes from the data clusters alone: all-zero table
entries cost nothing, all-ones entries count without a read, and data clusters are popcounted
in bulk with numpy (imported only when there is data to count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dirtybits.errors import FormatError
from dirtybits.format.qcow2.bitmaps import (
    BME_TABLE_ENTRY_FLAG_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BitmapDirectory,
    BitmapDirectoryEntry,
    BitmapsExtension,
    table_entry_error,
    unpack_table,
)
from dirtybits.format.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    MAX_HOST_OFFSET,
    HeaderCluster,
)

#: ``pread(offset, length)``: exactly ``length`` bytes, zeros past the end of the file.
Pread = Callable[[int, int], bytes]

#: Bytes of data clusters read by one ``pread`` while counting (contiguous clusters only).
_COUNT_READ_BYTES = 8 << 20


@dataclass
class ScannedBitmap:
    """One directory entry; ``problems`` non-empty means damaged (usable only for removal)."""

    entry: BitmapDirectoryEntry
    problems: list[str] = field(default_factory=list)
    table: list[int] | None = None  # raw table entries, read when the entry itself is sound

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def usable(self) -> bool:
        """Its bits can be read: sound and not left in use (inconsistent)."""
        return not self.problems and not self.entry.in_use


@dataclass
class BitmapScan:
    """The bitmaps extension as found: ``directory_problem`` set when no entry is readable."""

    extension: BitmapsExtension | None
    bitmaps: list[ScannedBitmap]
    directory_problem: str | None = None


def disk_length(hc: HeaderCluster) -> int:
    """The length QEMU's bitmaps cover (bdrv_getlength: virtual size rounded down to 512)."""
    return hc.header.size & ~511


def read_directory(ext: BitmapsExtension, cluster_size: int, pread: Pread) -> BitmapDirectory:
    """The directory the extension points at; ``FormatError`` when it cannot be walked."""
    ext.validate(cluster_size)
    raw = pread(ext.bitmap_directory_offset, ext.bitmap_directory_size)
    return BitmapDirectory.unpack(raw, ext.nb_bitmaps, offset=ext.bitmap_directory_offset)


def scan_bitmaps(hc: HeaderCluster, pread: Pread,
                 file_size: int | None = None) -> BitmapScan | None:
    """The image's bitmaps as the bitmap store would judge them; None without (trusted) ones.

    An extension without autoclear bit 0 is void (a program without bitmap support wrote the
    image), as in QEMU. Tables are read only for entries that are sound; never any data.
    """
    raw_ext = hc.extension(EXT_BITMAPS)
    if raw_ext is None or not hc.header.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    cs = hc.header.cluster_size
    try:
        ext = BitmapsExtension.unpack(raw_ext.data)
        directory = read_directory(ext, cs, pread)
    except FormatError as exc:
        return BitmapScan(None, [], str(exc))
    out: list[ScannedBitmap] = []
    for entry, reasons in zip(directory.entries,
                              directory.check_entries(cs, disk_length(hc)), strict=True):
        sb = ScannedBitmap(entry, list(reasons))
        if not reasons:
            table, problem = read_table(entry, cs, pread, file_size)
            if problem is None:
                sb.table = table
            else:
                sb.problems.append(problem)
        out.append(sb)
    return BitmapScan(ext, out)


def table_location_problem(entry: BitmapDirectoryEntry, file_size: int | None) -> str | None:
    """Why an entry's table cannot be where it says (past the largest host offset QEMU
    allows, or starting past the end of the file: the bits would be invented), or None."""
    offset, size = entry.bitmap_table_offset, entry.bitmap_table_size * 8
    if offset + size > MAX_HOST_OFFSET:
        return (f"bitmap table: offset {offset:#x} lies past the largest host offset "
                f"({MAX_HOST_OFFSET:#x})")
    if file_size is not None and offset >= file_size:
        return f"bitmap table: offset {offset:#x} lies past the end of the file"
    return None


def read_table(entry: BitmapDirectoryEntry, cluster_size: int, pread: Pread,
               file_size: int | None = None) -> tuple[list[int], str | None]:
    """An entry's raw table, and why it is unusable (the first bad entry), if it is."""
    size = entry.bitmap_table_size * 8
    where = table_location_problem(entry, file_size)
    if where is not None:
        return [], where
    try:
        table = unpack_table(pread(entry.bitmap_table_offset, size), entry.bitmap_table_size,
                             offset=entry.bitmap_table_offset)
    except FormatError as exc:
        return [], f"bitmap table: {exc.reason}"
    for raw in table:
        err = table_entry_error(raw, cluster_size)
        if err is not None:
            return table, f"bitmap table: {err}"
    return table, None


# --------------------------------------------------------------------------- counting


def _popcount(buf: bytes) -> int:
    import numpy as np

    if not buf:
        return 0
    if len(buf) % 8:
        arr: Any = np.frombuffer(buf, dtype=np.uint8)
    else:
        arr = np.frombuffer(buf, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(arr).sum(dtype=np.uint64))
    return int(np.unpackbits(arr.view(np.uint8)).sum(dtype=np.uint64))  # pragma: no cover


def count_dirty(table: Sequence[int], granularity: int, disk_size: int, cluster_size: int,
                pread: Pread) -> int:
    """Dirty bytes of a bitmap: dirty granules x granularity, the last granule clipped.

    A last granule that reaches past ``disk_size`` counts only the bytes inside the disk, so
    the result equals the sum of the dirty extents an NBD client sees (QEMU's ``count`` in
    query-block rounds it up to a whole granule instead). Bits past the disk in the last data
    cluster are ignored, as QEMU ignores them when it loads the bitmap.
    """
    bits = -(-disk_size // granularity)
    if bits == 0:
        return 0
    per_cluster = cluster_size * 8
    n = min(len(table), -(-bits // per_cluster))
    last = (bits - 1) // per_cluster  # the table index holding the last bit
    dirty = 0
    last_set = False
    run_start = run_offset = run_len = 0

    def flush_run() -> None:
        nonlocal dirty
        pos = 0
        total = run_len * cluster_size
        while pos < total:
            step = min(_COUNT_READ_BYTES, total - pos)
            dirty += _popcount(pread(run_offset + pos, step))
            pos += step

    for i in range(n):
        raw = table[i]
        offset = raw & BME_TABLE_ENTRY_OFFSET_MASK
        if i == last:
            valid = bits - i * per_cluster
            if offset:
                data = pread(offset, -(-valid // 8))
                full, rest = divmod(valid, 8)
                dirty += _popcount(data[:full])
                if rest:
                    dirty += bin(data[full] & ((1 << rest) - 1)).count("1")
                last_set = bool(data[(valid - 1) // 8] >> ((valid - 1) % 8) & 1)
            elif raw & BME_TABLE_ENTRY_FLAG_ALL_ONES:
                dirty += valid
                last_set = True
            continue
        if offset:
            follows = i == run_start + run_len and offset == run_offset + run_len * cluster_size
            if run_len and follows:
                run_len += 1
                continue
            if run_len:
                flush_run()
            run_start, run_offset, run_len = i, offset, 1
        elif raw & BME_TABLE_ENTRY_FLAG_ALL_ONES:
            dirty += per_cluster
    if run_len:
        flush_run()
    total = dirty * granularity
    if last_set:
        total -= bits * granularity - disk_size
    return total
