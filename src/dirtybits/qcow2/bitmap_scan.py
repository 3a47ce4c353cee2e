"""The one loader of an image's bitmap directory and tables: parsing, judgement, messages.

Built on the records of ``dirtybits.format.qcow2.bitmaps`` and a plain ``pread`` callable, so
it needs no image engine and no numpy: ``info`` must work on images the engine (or QEMU)
refuses, and ``check`` must stay an independent judge. The bitmap store
(``block/qcow2_bitmaps.py``) builds on ``scan_bitmaps`` too, so info, check and the store
agree on which bitmaps are damaged and say why in the same words (QEMU's where QEMU has them).

Two kinds of damage. A directory that cannot be read as a whole (``directory_error``) leaves
no bitmap to track: a writable open must refuse it (``BitmapScan.qemu_error`` is QEMU's
message), since writes would land with the bitmaps looking consistent. A damaged entry or
table makes that bitmap unusable, with the reasons, instead of making the whole image
unreadable as in QEMU.

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
    BME_MAX_PHYS_SIZE,
    BME_MAX_TABLE_SIZE,
    BME_TABLE_ENTRY_FLAG_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BitmapDirectory,
    BitmapDirectoryEntry,
    BitmapsExtension,
    qemu_directory_error,
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

#: The way out named when a writable open is refused (``directory_refusal``).
REPAIR_HINT = "'dirtybits check -r all' drops the unreadable bitmap directory"


@dataclass
class ScannedBitmap:
    """One directory entry; ``problems`` non-empty means damaged (usable only for removal).

    ``table`` holds the raw table entries whenever the table could be read (it lies inside
    the file at an aligned offset), damaged bitmap or not: removing a damaged bitmap frees
    what it can prove is its own.
    """

    entry: BitmapDirectoryEntry
    problems: list[str] = field(default_factory=list)
    table: list[int] | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def in_use(self) -> bool:
        return self.entry.in_use

    @property
    def usable(self) -> bool:
        """Its bits can be read: sound and not left in use (inconsistent)."""
        return not self.problems and not self.entry.in_use


@dataclass
class BitmapScan:
    """The bitmaps extension as found.

    ``directory_error`` is set when the directory cannot be read as a whole (then there are
    no ``bitmaps``); ``qemu_error`` is the message QEMU 7.2 refuses such an image with.
    """

    extension: BitmapsExtension | None
    bitmaps: list[ScannedBitmap]
    directory_error: FormatError | None = None
    qemu_error: str | None = None

    @property
    def directory_problem(self) -> str | None:
        """Why the directory is unreadable, with where (None when it is readable)."""
        return None if self.directory_error is None else str(self.directory_error)


def disk_length(hc: HeaderCluster) -> int:
    """The length QEMU's bitmaps cover (bdrv_getlength: virtual size rounded down to 512)."""
    return hc.header.size & ~511


def read_directory(ext: BitmapsExtension, cluster_size: int, pread: Pread,
                   file_size: int | None = None) -> BitmapDirectory:
    """The directory the extension points at; ``FormatError`` when it cannot be walked.

    A directory reaching past the end of the file (``file_size``) is unreadable: the zeros
    read there would be judged, not the directory that was written.
    """
    ext.validate(cluster_size)
    off, size = ext.bitmap_directory_offset, ext.bitmap_directory_size
    if file_size is not None and off + size > file_size:
        raise FormatError(f"the directory ({size} bytes) lies past the end of the file "
                          f"({file_size} bytes)", structure="bitmap directory", offset=off)
    return BitmapDirectory.unpack(pread(off, size), ext.nb_bitmaps, offset=off)


def qemu_open_error(hc: HeaderCluster, pread: Pread) -> str | None:
    """The message QEMU 7.2 refuses to open the image with because of its bitmap directory."""
    raw_ext = hc.extension(EXT_BITMAPS)
    if raw_ext is None or not hc.header.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    try:
        ext = BitmapsExtension.unpack(raw_ext.data)
        ext.validate(hc.header.cluster_size)
    except FormatError as exc:
        return exc.reason
    raw = pread(ext.bitmap_directory_offset, ext.bitmap_directory_size)
    return qemu_directory_error(raw, ext.nb_bitmaps, hc.header.cluster_size, disk_length(hc))


def scan_bitmaps(hc: HeaderCluster, pread: Pread, file_size: int | None = None, *,
                 tables: bool = True) -> BitmapScan | None:
    """The image's bitmaps as info, check and the bitmap store judge them; None without
    (trusted) ones.

    An extension without autoclear bit 0 is void (a program without bitmap support wrote the
    image), as in QEMU. Tables are read when they can be addressed (``tables`` False: only
    the directory is read and judged); never any data.
    """
    raw_ext = hc.extension(EXT_BITMAPS)
    if raw_ext is None or not hc.header.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    cs = hc.header.cluster_size
    try:
        ext = BitmapsExtension.unpack(raw_ext.data)
        directory = read_directory(ext, cs, pread, file_size)
    except FormatError as exc:
        return BitmapScan(None, [], exc, qemu_open_error(hc, pread) or exc.reason)
    out: list[ScannedBitmap] = []
    for entry, reasons in zip(directory.entries, judge_entries(directory, cs, disk_length(hc),
                                                               file_size), strict=True):
        sb = ScannedBitmap(entry, reasons)
        if tables and table_addressable(entry, cs, file_size):
            table, problem = read_table(entry, cs, pread, file_size)
            sb.table = table
            if problem is not None and not reasons:
                sb.problems.append(problem)
        out.append(sb)
    return BitmapScan(ext, out)


def directory_refusal(scan: BitmapScan) -> str:
    """Why a writable open of an image with this unreadable directory is refused.

    QEMU's message first (qemu-io and qemu-img refuse every open with it), then where, then
    the way out: writes would land with every bitmap still looking consistent.
    """
    err = scan.directory_error
    assert err is not None and scan.qemu_error is not None
    where = str(err) if err.reason != scan.qemu_error else (
        f"{err.structure} at offset {err.offset:#x}" if err.offset is not None
        else err.structure or "bitmap directory")
    return (f"{scan.qemu_error} ({where}); writes would bypass the persistent bitmaps, so "
            f"only read-only opens are allowed: {REPAIR_HINT}")


def judge_entries(directory: BitmapDirectory, cluster_size: int, disk_size: int,
                  file_size: int | None) -> list[list[str]]:
    """Each entry's reasons to be unusable: its fields (``check_entries``), then where its
    table lies (judged only for entries whose fields are sound)."""
    out = directory.check_entries(cluster_size, disk_size)
    for entry, reasons in zip(directory.entries, out, strict=True):
        if not reasons:
            where = table_location_problem(entry, file_size)
            if where is not None:
                reasons.append(where)
    return out


def table_addressable(entry: BitmapDirectoryEntry, cluster_size: int,
                      file_size: int | None) -> bool:
    """Can the table be read at all (aligned, of a size QEMU allows, inside the file)?"""
    off, n = entry.bitmap_table_offset, entry.bitmap_table_size
    return (bool(off) and not off % cluster_size and 0 < n <= BME_MAX_TABLE_SIZE
            and n * cluster_size <= BME_MAX_PHYS_SIZE
            and table_location_problem(entry, file_size) is None)


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


def data_location_problem(index: int, offset: int, file_size: int | None) -> str | None:
    """Why table entry ``index``'s data cluster at ``offset`` cannot hold the bits, or None.

    A cluster starting past the end of the file reads as zeros (QEMU loads it so): the bits
    would be invented, and writing them back would grow the file to that offset (at 2^55 the
    write fails with "File too large" and leaves the bitmap in use), as ``check`` judges it.
    """
    if file_size is not None and offset >= file_size:
        return (f"bitmap table: entry {index} points to a data cluster at {offset:#x}, past "
                "the end of the file")
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
    for i, raw in enumerate(table):
        err = table_entry_error(raw, cluster_size)
        if err is not None:
            return table, f"bitmap table: {err}"
        problem = data_location_problem(i, raw & BME_TABLE_ENTRY_OFFSET_MASK, file_size)
        if raw & BME_TABLE_ENTRY_OFFSET_MASK and problem is not None:
            return table, problem
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
