"""What ``qemu-img info`` reports about an image, read straight from the metadata.

Returns plain dicts keyed exactly like QEMU's ``ImageInfo`` (``qapi/block-core.json``), so the
CLI can print them as qemu-img does and services can hand them out unchanged. Only the header
cluster, the snapshot table, the bitmap directory and the bitmap tables are read (bitmap data
only when dirty counts are asked for): no image engine is involved, which keeps ``info`` usable
on images the engine refuses to open, and a damaged bitmap is listed as unusable instead of
making the image unreadable.
"""

from __future__ import annotations

import os
import struct
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from dirtybits.errors import FormatError, ImageIOError, UnsupportedFeatureError, UsageError
from dirtybits.format.qcow2.bitmaps import BME_FLAG_AUTO, BME_FLAG_IN_USE
from dirtybits.format.qcow2.header import (
    AUTOCLEAR_DATA_FILE_RAW,
    AUTOCLEAR_WRITE_INTENT,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZSTD,
    EXT_FEATURE_TABLE,
    FEATURE_TYPE_INCOMPAT,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    MAX_CLUSTER_BITS,
    QCOW_MAGIC,
    HeaderCluster,
    unpack_feature_table,
)
from dirtybits.format.qcow2.write_intent import EXT_WRITE_INTENT, WriteIntentExtension
from dirtybits.osfile import file_size, open_file, read_at
from dirtybits.qcow2.bitmap_scan import (
    BitmapScan,
    Pread,
    count_dirty,
    disk_length,
    scan_bitmaps,
)

ImageInfo = dict[str, Any]

_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
QCOW_MAX_SNAPSHOTS = 65536
SECTOR = 512


def probe_format(path: str) -> str:
    """qemu-img's probe, restricted to the formats dirtybits reads."""
    magic = read_at(path, 0, 4)
    return "qcow2" if magic == struct.pack(">I", QCOW_MAGIC) else "raw"


def _open_error(path: str, exc: OSError) -> ImageIOError:
    return ImageIOError(f"Could not open '{path}': {exc.strerror}", errno=exc.errno)


def read_header_cluster(path: str) -> HeaderCluster:
    """Cluster 0 of a qcow2 file, parsed; QEMU's open-time refusals become errors."""
    head = read_at(path, 0, 1 << MAX_CLUSTER_BITS)
    if head[:4] != struct.pack(">I", QCOW_MAGIC):
        raise FormatError("Image is not in qcow2 format")
    hc = HeaderCluster.unpack(head)
    unknown = hc.header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise UnsupportedFeatureError(unsupported_features(hc, unknown))
    return hc


def unsupported_features(hc: HeaderCluster, bits: int) -> str:
    """QEMU's report_unsupported_feature: names from the feature table, then the rest as a mask."""
    names = []
    table = hc.extension(EXT_FEATURE_TABLE)
    if table is not None:
        for e in unpack_feature_table(table.data):
            if e.type == FEATURE_TYPE_INCOMPAT and bits & (1 << e.bit):
                names.append(e.name)
                bits &= ~(1 << e.bit)
    if bits:
        names.append(f"Unknown incompatible feature: {bits:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def full_backing_filename(image: str, backing: str) -> str:
    """QEMU's path_combine: a relative backing name is relative to the image's directory."""
    if backing.startswith("/") or ":" in backing.split("/", 1)[0]:
        return backing
    slash = image.rfind("/")
    return image[: slash + 1] + backing


def _actual_size(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError as exc:
        raise _open_error(path, exc) from exc


def image_info(path: str, fmt: str | None = None, *, dirty: bool = False) -> ImageInfo:
    """``qemu-img info --output=json`` for one image (backing file not opened).

    ``dirty``: also count each bitmap's dirty bytes (reads the bitmaps' data clusters).
    """
    if fmt is None:
        fmt = probe_format(path)
    if fmt == "raw":
        fd = open_file(path, os.O_RDONLY)  # refuses a directory, FIFO or /dev/null
        try:
            length = file_size(fd)
        finally:
            os.close(fd)
        return {
            "virtual-size": -(-length // SECTOR) * SECTOR,
            "filename": path,
            "format": "raw",
            "actual-size": _actual_size(path),
            "dirty-flag": False,
        }
    if fmt != "qcow2":
        raise UsageError(f"Unknown driver '{fmt}'")
    return qcow2_info(path, read_header_cluster(path), dirty=dirty)


def qcow2_info(path: str, hc: HeaderCluster, *, dirty: bool = False,
               scanned: BitmapScan | None = None) -> ImageInfo:
    """``image_info`` of a qcow2 image from its header cluster; ``scanned``: its bitmap
    directory as an open image holds it (a live node's query reads no metadata then)."""
    hdr = hc.header
    info: ImageInfo = {
        "virtual-size": hdr.size // SECTOR * SECTOR,
        "filename": path,
        "cluster-size": hdr.cluster_size,
        "format": "qcow2",
        "actual-size": _actual_size(path),
        "dirty-flag": hdr.version == 3 and bool(hdr.incompatible_features & INCOMPAT_DIRTY),
    }
    if hdr.crypt_method:
        info["encrypted"] = True
    if hc.backing_name:
        info["backing-filename"] = hc.backing_name
        info["full-backing-filename"] = full_backing_filename(path, hc.backing_name or "")
        if hc.backing_format:
            info["backing-filename-format"] = hc.backing_format
    if hdr.nb_snapshots:
        info["snapshots"] = read_snapshots(path, hdr.snapshots_offset, hdr.nb_snapshots)
    info["format-specific"] = {"type": "qcow2",
                               "data": _qcow2_specific(path, hc, dirty, scanned)}
    return info


def _qcow2_specific(path: str, hc: HeaderCluster, dirty: bool,
                    scanned: BitmapScan | None = None) -> dict[str, Any]:
    hdr = hc.header
    compression = "zstd" if hdr.compression_type == COMPRESSION_ZSTD else "zlib"
    if hdr.version == 2:
        return {"compat": "0.10", "compression-type": compression,
                "refcount-bits": hdr.refcount_bits}
    data: dict[str, Any] = {
        "compat": "1.1",
        "compression-type": compression,
        "lazy-refcounts": bool(hdr.compatible_features & COMPAT_LAZY_REFCOUNTS),
        "refcount-bits": hdr.refcount_bits,
        "corrupt": bool(hdr.incompatible_features & INCOMPAT_CORRUPT),
        "extended-l2": bool(hdr.incompatible_features & INCOMPAT_EXTL2),
    }
    if scanned is not None and not dirty:
        bitmaps, directory_problem = _bitmap_items(scanned, False, hc, _no_read, 0)
    else:
        bitmaps, directory_problem = read_bitmap_list(path, hc, dirty=dirty)
    resilient = _resilient(hc)
    if bitmaps:
        data["bitmaps"] = bitmaps
        if resilient is not None and resilient.get("map-valid"):
            excluded = resilient.pop("_excluded")
            for item in bitmaps:
                if "in-use" in item["flags"] and "unusable" not in item:
                    item["recoverable"] = item.pop("_table") not in excluded
    for item in bitmaps:
        item.pop("_table", None)
    if resilient is not None:
        resilient.pop("_excluded", None)
        data["resilient"] = resilient
    if directory_problem is not None:
        data["bitmaps-unusable"] = directory_problem
    if hc.data_file is not None:
        data["data-file"] = hc.data_file
    if hdr.incompatible_features & INCOMPAT_DATA_FILE:
        data["data-file-raw"] = bool(hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
    return data


def _resilient(hc: HeaderCluster) -> dict[str, Any] | None:
    """Resilient mode's state (dirtybits' write-intent map), None when it is off."""
    ext = hc.extension(EXT_WRITE_INTENT)
    if ext is None:
        return None
    try:
        rec = WriteIntentExtension.unpack(ext.data)
    except FormatError as exc:
        return {"map-valid": False, "unusable": exc.reason}
    return {"region-size": rec.region_size,
            "map-valid": bool(hc.header.autoclear_features & AUTOCLEAR_WRITE_INTENT),
            "marked-regions": len(rec.regions()), "_excluded": set(rec.excluded)}


def read_bitmap_list(path: str, hc: HeaderCluster, *,
                     dirty: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """``format-specific.data.bitmaps`` and why the whole directory is unreadable, if it is.

    Directory order, flags ``in-use`` then ``auto``, as qemu-img. Only trusted when autoclear
    bit 0 is set, as QEMU does (otherwise a program without bitmap support wrote the image and
    every bitmap is void). Beyond qemu-img: a damaged bitmap (which makes QEMU refuse the whole
    image) is listed with ``"unusable": REASONS``; with ``dirty`` every usable bitmap gets
    ``dirty-bytes`` and ``dirty-percent`` (its data clusters are read only then), an in-use one
    ``"inconsistent": true`` instead.
    """
    fd = open_file(path, os.O_RDONLY)
    try:
        def pread(offset: int, length: int) -> bytes:
            try:
                data = os.pread(fd, length, offset)
            except OSError as exc:
                raise ImageIOError(f"Could not read '{path}' at {offset:#x}: "
                                   f"{exc.strerror}", errno=exc.errno) from exc
            return data + bytes(length - len(data)) if len(data) < length else data

        return _bitmap_list(hc, pread, dirty, file_size(fd))
    finally:
        os.close(fd)


def _no_read(offset: int, length: int) -> bytes:  # pragma: no cover - never called
    raise AssertionError("a live query reads nothing")


def _bitmap_list(hc: HeaderCluster, pread: Pread, dirty: bool,
                 file_size: int) -> tuple[list[dict[str, Any]], str | None]:
    scan = scan_bitmaps(hc, pread, file_size)
    if scan is None:
        return [], None
    return _bitmap_items(scan, dirty, hc, pread, file_size)


def _bitmap_items(scan: BitmapScan, dirty: bool, hc: HeaderCluster, pread: Pread,
                  file_size: int) -> tuple[list[dict[str, Any]], str | None]:
    size = disk_length(hc)
    out: list[dict[str, Any]] = []
    for sb in scan.bitmaps:
        e = sb.entry
        flags = [n for bit, n in ((BME_FLAG_IN_USE, "in-use"), (BME_FLAG_AUTO, "auto"))
                 if e.flags & bit]
        item: dict[str, Any] = {"name": e.raw_name.decode("utf-8", errors="replace"),
                                "granularity": e.granularity, "flags": flags,
                                "_table": e.bitmap_table_offset}
        if sb.problems:
            item["unusable"] = "; ".join(sb.problems)
        elif dirty and e.in_use:
            item["inconsistent"] = True
        elif dirty and sb.table is not None:
            count = count_dirty(sb.table, e.granularity, size, hc.header.cluster_size, pread)
            item["dirty-bytes"] = count
            item["dirty-percent"] = dirty_percent(count, size)
        out.append(item)
    return out, scan.directory_problem


def dirty_percent(dirty: int, size: int) -> Decimal:
    """``dirty`` as a percentage of ``size``, two decimals (a fixed-point ``Decimal``).

    Rounded half up, except that a non-zero count never shows as 0.00 and a partial one never
    as 100.00: a bitmap that will copy something must not look clean, nor the reverse.
    QEMU's JSON printer would print a double as ``%.17g`` (12.339999999999999), so the
    percentage is a fixed-point number that prints as written.
    """
    if size <= 0 or dirty <= 0:
        return Decimal("0.00")
    if dirty >= size:
        return Decimal("100.00")
    pct = (Decimal(dirty) * 100 / Decimal(size)).quantize(Decimal("0.01"),
                                                          rounding=ROUND_HALF_UP)
    return min(max(pct, Decimal("0.01")), Decimal("99.99"))


QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024  # QEMU's limit (block/qcow2.h)


def read_snapshots(path: str, offset: int, count: int) -> list[dict[str, Any]]:
    """SnapshotInfo records in table order (``icount`` only when the entry stores one)."""
    if count > QCOW_MAX_SNAPSHOTS:
        raise FormatError("Snapshot table too large", structure="snapshot table")
    out: list[dict[str, Any]] = []
    pos = offset
    for _ in range(count):
        # past the end of the file reads as zeros, as QEMU reads it (and lists the entries)
        head = _pread_file(path, pos, _SNAPSHOT_HEADER.size).ljust(_SNAPSHOT_HEADER.size,
                                                                    b"\0")
        (_l1_off, _l1_size, id_size, name_size, date_sec, date_nsec, vm_clock_nsec,
         vm_state_size, extra_size) = _SNAPSHOT_HEADER.unpack(head)
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError(f"Too much extra metadata in snapshot table entry {len(out)}",
                              structure="snapshot table", offset=pos)
        rest = _pread_file(path, pos + _SNAPSHOT_HEADER.size,
                           extra_size + id_size + name_size).ljust(
            extra_size + id_size + name_size, b"\0")
        extra = rest[:extra_size]
        id_str = rest[extra_size:extra_size + id_size].decode("utf-8", errors="replace")
        name = rest[extra_size + id_size:].decode("utf-8", errors="replace")
        if len(extra) >= 8:
            vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        entry: dict[str, Any] = {
            "id": id_str,
            "name": name,
            "vm-state-size": vm_state_size,
            "date-sec": date_sec,
            "date-nsec": date_nsec,
            "vm-clock-sec": vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": vm_clock_nsec % 1_000_000_000,
        }
        if len(extra) >= 24:
            entry["icount"] = struct.unpack_from(">Q", extra, 16)[0]
        out.append(entry)
        pos += (_SNAPSHOT_HEADER.size + extra_size + id_size + name_size + 7) & ~7
    return out


def _pread_file(path: str, offset: int, length: int) -> bytes:
    return read_at(path, offset, length)


def backing_chain_info(path: str, fmt: str | None = None, *,
                       dirty: bool = False) -> list[ImageInfo]:
    """``qemu-img info --backing-chain``: the image, then each backing file in turn."""
    chain: list[ImageInfo] = []
    seen: set[str] = set()
    name: str | None = path
    while name is not None:
        key = os.path.realpath(name)
        if key in seen:
            raise UsageError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(key)
        info = image_info(name, fmt, dirty=dirty)
        chain.append(info)
        name = info.get("full-backing-filename")
        fmt = info.get("backing-filename-format")
    return chain
