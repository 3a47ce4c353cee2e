"""Persistent bitmaps kept inside a qcow2 image (QEMU's bitmaps extension).

Every change is copy-on-write, as QEMU does it: new data clusters, table and directory are
written and made durable first, one synced header write switches to them, and only then are
the old clusters released. A crash at any point leaves either the old or the new set of
bitmaps, never a mix; at worst some clusters leak.

The directory and tables are read and judged by the one loader, ``qcow2/bitmap_scan.py``
(shared with info and check). A directory that cannot be read as a whole refuses a writable
open with QEMU's message: writes would land with every bitmap still looking consistent.
Unlike QEMU, a damaged directory entry does not make the image unopenable: that bitmap is
reported unusable (with the reasons) and may only be removed; an enabled one is marked in_use
before the first write (``BlockNode``), so repairing the damaged field never makes it read
as consistent without the writes it missed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Protocol

from dirtybits.bitmap.serialized_runs import ONES, ZEROS, runs_from_edges, serialized_edges
from dirtybits.errors import CorruptImageError, DirtybitsError, FormatError
from dirtybits.format.qcow2.bitmaps import (
    BME_FLAG_AUTO,
    BME_FLAG_IN_USE,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BitmapDirectory,
    BitmapDirectoryEntry,
    BitmapsExtension,
    BitmapTableEntry,
    TableEntryKind,
    bitmap_table_size,
    check_new_bitmap,
    pack_table,
    table_entry_error,
)
from dirtybits.format.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS
from dirtybits.qcow2.bitmap_scan import ScannedBitmap, directory_refusal, scan_bitmaps
from dirtybits.qcow2.image import Qcow2Image

if TYPE_CHECKING:
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

# In-place updates of a data cluster write the changed span rounded out to this: the page
# cache's unit, so no read-modify-write below it, and small next to a 64 KiB cluster.
WRITE_PAGE = 4096
# Past this many run edges a dump hands the bitmap to the numpy engine.
DENSE_EDGES = 1 << 18
FLAGS_FIELD_OFFSET = 12  # in a directory entry: table offset u64, table size u32, then flags u32


class BitmapOperationError(DirtybitsError):
    """A bitmap operation was refused (QEMU's wording where QEMU has one)."""


#: One directory entry and what the loader found (``problems`` non-empty: remove only).
StoredBitmap = ScannedBitmap


def default_granularity(cluster_size: int) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the cluster size within [4 KiB, 64 KiB]."""
    return min(max(cluster_size, 4096), 65536)


class Qcow2BitmapStore:
    """The bitmaps of one open qcow2 image (opened with ``keep_bitmaps=True`` to write)."""

    def __init__(self, img: Qcow2Image):
        self.img = img
        self.cluster_size = img.cluster_size
        self.bitmaps: list[StoredBitmap] = []
        self.directory_problem: str | None = None  # the whole directory is unreadable
        self.stale = False  # extension present, autoclear bit clear: all bitmaps invalid
        self._ext: BitmapsExtension | None = None
        self.ours: set[str] = set()  # bitmaps this store set in_use (live tracking)
        self._load_directory()

    # ------------------------------------------------------------------ loading
    @property
    def disk_size(self) -> int:
        return self.img.size

    def _load_directory(self) -> None:
        """Read the directory and tables through the one loader; register what is ours.

        Raises ``CorruptImageError`` (QEMU's message) on a writable image whose directory
        cannot be read. Sound bitmaps' tables and data are registered as metadata, so guest
        writes never land on them.
        """
        img = self.img
        if img.hc.extension(EXT_BITMAPS) is None:
            return
        if not img.header.autoclear_features & AUTOCLEAR_BITMAPS:
            self.stale = True
            return
        scan = scan_bitmaps(img.hc, self._pread, os.fstat(img.fileno()).st_size)
        assert scan is not None
        if scan.directory_error is not None:
            self.directory_problem = scan.directory_problem
            if not img.readonly:
                raise CorruptImageError(directory_refusal(scan))
            return
        ext = scan.extension
        assert ext is not None
        self._ext = ext
        img.register_metadata(ext.bitmap_directory_offset, ext.bitmap_directory_size,
                              "bitmap directory")
        cs, end = self.cluster_size, os.fstat(img.fileno()).st_size
        for sb in scan.bitmaps:
            # a damaged bitmap's table may be anything (guest data, say): not registered,
            # so nothing is refused or protected on its word
            if sb.table is not None and not sb.problems:
                img.register_metadata(sb.entry.bitmap_table_offset,
                                      sb.entry.bitmap_table_size * 8, "bitmap table")
                for raw_entry in sb.table:
                    off = raw_entry & BME_TABLE_ENTRY_OFFSET_MASK
                    if off and off < end and table_entry_error(raw_entry, cs) is None:
                        img.register_metadata(off, cs, "bitmap data")
            self.bitmaps.append(sb)

    def _pread(self, offset: int, length: int) -> bytes:
        return self.img.read_metadata(offset, length, "bitmap metadata")

    def find(self, name: str) -> StoredBitmap | None:
        for sb in self.bitmaps:
            if sb.name == name:
                return sb
        return None

    def _get(self, name: str) -> StoredBitmap:
        sb = self.find(name)
        if sb is None:
            raise BitmapOperationError(f"Dirty bitmap '{name}' not found")
        return sb

    def _require_usable(self, sb: StoredBitmap) -> None:
        if sb.problems:
            raise BitmapOperationError(
                f"Bitmap '{sb.name}' is damaged and cannot be used ({'; '.join(sb.problems)}); "
                "it can only be removed")
        if sb.in_use and sb.name not in self.ours:
            raise BitmapOperationError(
                f"Bitmap '{sb.name}' is inconsistent and cannot be used")

    def load(self, name: str) -> DirtyBitmap:
        """Read a bitmap's bits (only the data clusters it has)."""
        sb = self._get(name)
        self._require_usable(sb)
        assert sb.table is not None
        from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

        bm = DirtyBitmap(self.disk_size, sb.entry.granularity)
        cs = self.cluster_size
        for i, raw_entry in enumerate(sb.table):
            te = BitmapTableEntry.decode(raw_entry, cs)
            if te.kind is TableEntryKind.DATA:
                bm.load_bytes(i * cs, self.img.read_metadata(te.offset, cs, "bitmap data"))
            elif te.kind is TableEntryKind.ONES:
                bm.load_bytes(i * cs, b"\xff" * cs)
        return bm

    def extents(self, name: str, end: int) -> Iterator[tuple[int, int, bool]]:
        """A bitmap's alternating clean/dirty byte runs over ``[0, end)`` (``--dump``).

        Sparse bitmaps are scanned from their clusters without the numpy engine (a one-shot
        dump then starts about as fast as qemu-nbd); dense ones go through ``load``.
        """
        sb = self._get(name)
        self._require_usable(sb)
        assert sb.table is not None
        gran = sb.entry.granularity
        nbits = -(-self.disk_size // gran)
        edges = serialized_edges(self._clusters(sb.table), self.cluster_size, nbits,
                                 DENSE_EDGES)
        if edges is None:
            return self.load(name).extents(0, end)
        return runs_from_edges(edges, nbits, gran, end)

    def _clusters(self, table: list[int]) -> Iterator[bytes | int]:
        cs = self.cluster_size
        for raw_entry in table:
            te = BitmapTableEntry.decode(raw_entry, cs)
            if te.kind is TableEntryKind.DATA:
                yield self.img.read_metadata(te.offset, cs, "bitmap data")
            else:
                yield ONES if te.kind is TableEntryKind.ONES else ZEROS

    # ------------------------------------------------------------------ writing
    def _write_bitmap(self, bm: DirtyBitmap) -> tuple[int, int, list[int]]:
        """Write data clusters and a table for ``bm``; (table offset, size, table)."""
        cs = self.cluster_size
        n = bitmap_table_size(self.disk_size, bm.granularity, cs)
        table = [0] * n
        for i in range(n):
            if bm.is_zero_range(i * cs, cs):
                continue
            off = self.img.allocate_metadata(cs, "bitmap data")
            self.img.write_metadata(off, bm.to_bytes(i * cs, cs), "bitmap data")
            table[i] = off
        table_off = self.img.allocate_metadata(n * 8, "bitmap table")
        self.img.write_metadata(table_off, pack_table(table), "bitmap table")
        return table_off, n, table

    def _owns(self, offset: int, role: str, file_size: int | None = None) -> bool:
        """Is the cluster at ``offset`` this bitmap structure's alone: inside the file,
        refcount exactly 1, and registered as ``role`` (not as another structure)?

        The checker's judgement of a reference (``qcow2/check.py``), made cheaply: what fails
        it is never written in place nor freed. (Unregistered: a damaged bitmap's cluster.)
        """
        img = self.img
        end = os.fstat(img.fileno()).st_size if file_size is None else file_size
        return (offset < end and img.metadata_role(offset) in (None, role)
                and img.get_refcount(offset // self.cluster_size) == 1)

    def _release(self, sb: StoredBitmap) -> list[str]:
        """Queue a bitmap's clusters for freeing once the new directory is durable.

        Only clusters provably the bitmap's own are freed (each passes ``_owns`` and no other
        bitmap names it; for a damaged bitmap, whose table may point anywhere, nor does the
        guest's L1/L2, which costs a read of every L2 table). Returns what was left
        allocated, in words for the user (``check -r leaks`` reclaims it).
        """
        cs = self.cluster_size
        e = sb.entry
        if sb.table is None:
            return [f"bitmap '{sb.name}': its table at {e.bitmap_table_offset:#x} cannot be "
                    "read; its table and data clusters are left allocated"]
        others = self._referenced(exclude=sb)
        if sb.problems:
            others |= self.img.guest_clusters()
        first = e.bitmap_table_offset // cs
        last = -(-(e.bitmap_table_offset + e.bitmap_table_size * 8) // cs)
        clusters = [(k * cs, "bitmap table") for k in range(first, last)]
        clusters += [(raw & BME_TABLE_ENTRY_OFFSET_MASK, "bitmap data") for raw in sb.table
                     if raw & BME_TABLE_ENTRY_OFFSET_MASK and table_entry_error(raw, cs) is None]
        end = os.fstat(self.img.fileno()).st_size
        seen: set[int] = set()
        left = 0
        for off, role in clusters:
            k = off // cs
            if k in seen:
                continue
            seen.add(k)
            if k in others or not self._owns(off, role, end):
                left += 1
            else:
                self.img.free_metadata(off, cs)
        if not left:
            return []
        return [f"bitmap '{sb.name}': left {left} cluster(s) of its table and data allocated "
                "(not provably its own)"]

    def _referenced(self, exclude: StoredBitmap) -> set[int]:
        """Clusters the directory's other bitmaps' tables and data name."""
        cs = self.cluster_size
        out: set[int] = set()
        for sb in self.bitmaps:
            if sb is exclude or sb.table is None:
                continue
            e = sb.entry
            out.update(range(e.bitmap_table_offset // cs,
                             -(-(e.bitmap_table_offset + e.bitmap_table_size * 8) // cs)))
            out.update((raw & BME_TABLE_ENTRY_OFFSET_MASK) // cs for raw in sb.table
                       if raw & BME_TABLE_ENTRY_OFFSET_MASK)
        return out

    def _commit(self, bitmaps: list[StoredBitmap], after: list[StoredBitmap]) -> list[str]:
        """Write a new directory for ``bitmaps``, switch the header, release ``after``;
        return what ``_release`` left allocated."""
        img = self.img
        old_ext = self._ext
        if bitmaps:
            directory = BitmapDirectory(tuple(sb.entry for sb in bitmaps))
            raw = directory.pack()
            dir_off = img.allocate_metadata(len(raw), "bitmap directory")
            img.write_metadata(dir_off, raw, "bitmap directory")
            new_ext = directory.extension(dir_off)
            img.flush()  # everything new is durable before the header names it
            img.update_header(extensions={EXT_BITMAPS: new_ext.pack()},
                              autoclear_set=AUTOCLEAR_BITMAPS)
            self._ext = new_ext
        else:
            img.flush()
            img.update_header(extensions={EXT_BITMAPS: None}, autoclear_clear=AUTOCLEAR_BITMAPS)
            self._ext = None
        if old_ext is not None:
            img.free_metadata(old_ext.bitmap_directory_offset, old_ext.bitmap_directory_size)
        left: list[str] = []
        for sb in after:
            left += self._release(sb)
        img.flush()
        self.bitmaps = bitmaps
        self.stale = False
        return left

    def _replace(self, old: StoredBitmap, new: StoredBitmap, *, release_old: bool) -> None:
        bitmaps = [new if sb is old else sb for sb in self.bitmaps]
        # what a usable bitmap's old clusters leave (one with refcount 0, say) leaks nothing
        self._commit(bitmaps, [old] if release_old else [])

    # ------------------------------------------------------------------ operations
    def add(self, name: str, granularity: int | None = None, *, disabled: bool = False) -> None:
        if not name:
            raise BitmapOperationError("Bitmap name cannot be empty")
        if self.find(name) is not None:
            raise BitmapOperationError(f"Bitmap already exists: {name}")
        if self.img.header.version < 3:
            raise BitmapOperationError("Cannot store dirty bitmaps in qcow2 v2 files")
        gran = granularity or default_granularity(self.cluster_size)
        dir_size = sum(sb.entry.entry_size for sb in self.bitmaps)
        try:
            check_new_bitmap(name, gran, self.disk_size, self.cluster_size,
                             len(self.bitmaps), dir_size)
        except FormatError as exc:
            raise BitmapOperationError(exc.reason) from exc
        table_off, n, table = self._write_empty_table(gran)
        self._commit_new(name, gran, table_off, n, table, auto=not disabled)

    def _write_empty_table(self, granularity: int) -> tuple[int, int, list[int]]:
        """A clean bitmap is a table of zeros: no data clusters, no bitmap engine (numpy)."""
        n = bitmap_table_size(self.disk_size, granularity, self.cluster_size)
        table = [0] * n
        table_off = self.img.allocate_metadata(n * 8, "bitmap table")
        self.img.write_metadata(table_off, pack_table(table), "bitmap table")
        return table_off, n, table

    def _commit_new(self, name: str, granularity: int, table_off: int, n: int,
                    table: list[int], *, auto: bool) -> None:
        entry = BitmapDirectoryEntry.new(name, granularity=granularity,
                                         bitmap_table_offset=table_off, bitmap_table_size=n,
                                         flags=BME_FLAG_AUTO if auto else 0)
        self._commit([*self.bitmaps, StoredBitmap(entry, [], table)], [])

    def _add_bitmap(self, name: str, bm: DirtyBitmap, *, auto: bool) -> None:
        table_off, n, table = self._write_bitmap(bm)
        self._commit_new(name, bm.granularity, table_off, n, table, auto=auto)

    def remove(self, name: str) -> list[str]:
        """Drop a bitmap (damaged ones too) and free its clusters where they are provably its
        own; returns what was left allocated (``check -r leaks`` reclaims it), in words for
        the user. Raises ``BitmapOperationError`` when there is no such bitmap."""
        sb = self._get(name)
        return self._commit([b for b in self.bitmaps if b is not sb], [sb])

    def clear(self, name: str) -> None:
        sb = self._get(name)
        self._require_usable(sb)
        table_off, n, table = self._write_empty_table(sb.entry.granularity)
        entry = _with(sb.entry, bitmap_table_offset=table_off, bitmap_table_size=n)
        self._replace(sb, StoredBitmap(entry, [], table), release_old=True)

    def store(self, name: str, bm: DirtyBitmap) -> None:
        """Replace a bitmap's bits (copy-on-write)."""
        sb = self._get(name)
        self._require_usable(sb)
        table_off, n, table = self._write_bitmap(bm)
        entry = _with(sb.entry, bitmap_table_offset=table_off, bitmap_table_size=n)
        self._replace(sb, StoredBitmap(entry, [], table), release_old=True)

    def replace_inconsistent(self, name: str, bm: DirtyBitmap) -> None:
        """Replace a bitmap's bits and clear its ``in_use`` flag in one directory switch.

        The way back from an inconsistent bitmap without losing it: ``bm`` must be a full
        rebuild (``dirtybits.block.recover``), never the stale stored bits. Copy-on-write as
        ``store``, so a crash leaves either the old in_use bitmap or the new consistent one.
        Allowed on a consistent bitmap too; damaged entries and bitmaps a live tracker holds
        are refused.
        """
        sb = self._get(name)
        if sb.problems:
            self._require_usable(sb)  # raises the damaged-bitmap error
        if sb.name in self.ours:
            raise BitmapOperationError(f"Bitmap '{name}' is being tracked and cannot be replaced")
        if bm.granularity != sb.entry.granularity or bm.size != self.disk_size:
            raise BitmapOperationError(
                f"Bitmap '{name}' has granularity {sb.entry.granularity} over {self.disk_size} "
                f"bytes, not {bm.granularity} over {bm.size}")
        table_off, n, table = self._write_bitmap(bm)
        entry = _with(sb.entry, bitmap_table_offset=table_off, bitmap_table_size=n,
                      flags=sb.entry.flags & ~BME_FLAG_IN_USE)
        self._replace(sb, StoredBitmap(entry, [], table), release_old=True)

    def set_enabled(self, name: str, enabled: bool) -> None:
        sb = self._get(name)
        self._require_usable(sb)
        flags = (sb.entry.flags | BME_FLAG_AUTO) if enabled else (sb.entry.flags & ~BME_FLAG_AUTO)
        if flags == sb.entry.flags:
            return
        self._replace(sb, StoredBitmap(_with(sb.entry, flags=flags), [], sb.table),
                      release_old=False)

    def merge(self, target: str, sources: list[DirtyBitmap]) -> None:
        if not sources:
            raise BitmapOperationError("At least one source bitmap is needed for a merge")
        bm = self.load(target)
        merged = bm.copy()
        for src in sources:
            try:
                merged.merge_from(src)
            except DirtybitsError as exc:
                raise BitmapOperationError(str(exc)) from exc
        if merged == bm:
            return
        self.store(target, merged)

    def rename(self, name: str, new_name: str) -> None:
        sb = self._get(name)
        if not new_name:
            raise BitmapOperationError("Bitmap name cannot be empty")
        if self.find(new_name) is not None:
            raise BitmapOperationError(f"Bitmap already exists: {new_name}")
        if sb.in_use:
            raise BitmapOperationError(f"Bitmap '{name}' is inconsistent and cannot be used")
        raw = new_name.encode()
        if len(raw) > 1023:
            raise BitmapOperationError("Name length exceeds maximum (1023 characters)")
        self._replace(sb, StoredBitmap(_with(sb.entry, raw_name=raw), sb.problems, sb.table),
                      release_old=False)

    def copy(self, name: str, new_name: str) -> None:
        sb = self._get(name)
        self._require_usable(sb)
        if self.find(new_name) is not None:
            raise BitmapOperationError(f"Bitmap already exists: {new_name}")
        dir_size = sum(b.entry.entry_size for b in self.bitmaps)
        try:
            check_new_bitmap(new_name, sb.entry.granularity, self.disk_size, self.cluster_size,
                             len(self.bitmaps), dir_size)
        except FormatError as exc:
            raise BitmapOperationError(exc.reason) from exc
        self._add_bitmap(new_name, self.load(name), auto=sb.entry.auto)

    # ------------------------------------------------------------------ live tracking
    # While a BlockNode records writes, the bitmaps it tracks are ``in_use`` on disk: their
    # on-disk bits are "possibly stale", so they may be updated in place (no copy-on-write),
    # and only the clusters that changed are written (DESIGN.md, persistence protocol).

    def resize(self, new_size: int) -> None:
        """Grow the disk with its bitmaps, as QEMU 7.2 does: each bitmap follows the new
        size, the grown area clean.

        A bitmap whose table grows gets a new table (its data clusters are kept: growing
        leaves the bits they hold where they are), a new directory names them, and one header
        write switches the size and the directory together (``Qcow2Image.resize``): a crash
        leaves the old size with the old bitmaps, or the new with the new. Every bitmap must
        be usable and not in_use on disk (a tracking node checkpoints first): QEMU refuses
        inconsistent ones the same way. Raises ``BitmapOperationError``,
        ``UnsupportedFeatureError`` (shrinking), ``ImageIOError``.
        """
        from dirtybits.errors import UnsupportedFeatureError

        img, cs = self.img, self.cluster_size
        if new_size < self.disk_size:
            raise UnsupportedFeatureError(
                "shrinking a qcow2 image with persistent bitmaps is not supported")
        for sb in self.bitmaps:
            if sb.problems or sb.table is None:
                raise BitmapOperationError(
                    f"Bitmap '{sb.name}' is damaged and cannot be used; 'dirtybits bitmap "
                    f"--remove {img.path} {sb.name}' deletes it")
            if sb.in_use:
                raise BitmapOperationError(
                    f"Bitmap '{sb.name}' is inconsistent and cannot be used; 'dirtybits "
                    f"bitmap --remove {img.path} {sb.name}' deletes it")
        if self._ext is None or self.stale or not self.bitmaps:
            img.resize(new_size)
            return
        bitmaps: list[StoredBitmap] = []
        old_tables: list[tuple[int, int]] = []
        for sb in self.bitmaps:
            e = sb.entry
            assert sb.table is not None
            n = bitmap_table_size(new_size & ~511, e.granularity, cs)
            if n == e.bitmap_table_size:
                bitmaps.append(sb)
                continue
            table = [*sb.table, *[0] * (n - len(sb.table))]
            off = img.allocate_metadata(n * 8, "bitmap table")
            img.write_metadata(off, pack_table(table), "bitmap table")
            bitmaps.append(StoredBitmap(_with(e, bitmap_table_offset=off,
                                              bitmap_table_size=n), [], table))
            old_tables.append((e.bitmap_table_offset, e.bitmap_table_size * 8))
        directory = BitmapDirectory(tuple(sb.entry for sb in bitmaps))
        raw = directory.pack()
        dir_off = img.allocate_metadata(len(raw), "bitmap directory")
        img.write_metadata(dir_off, raw, "bitmap directory")
        new_ext = directory.extension(dir_off)
        img.resize(new_size, extensions={EXT_BITMAPS: new_ext.pack()})  # durable, then switch
        old_ext, self._ext = self._ext, new_ext
        img.free_metadata(old_ext.bitmap_directory_offset, old_ext.bitmap_directory_size)
        for off, nbytes in old_tables:  # the tables only: the data clusters moved over
            img.free_metadata(off, nbytes)
        img.flush()
        self.bitmaps = bitmaps

    def is_usable(self, sb: StoredBitmap) -> bool:
        """Consistent, or in_use only because this store set it (its bits are ours)."""
        return not sb.problems and (not sb.in_use or sb.name in self.ours)

    def set_in_use(self, names: list[str], in_use: bool, *, force: bool = False) -> None:
        """Set or clear ``in_use`` on these bitmaps in place, durable on return.

        Only flags change: an aligned 4-byte field never straddles a sector, so a crash
        leaves each entry's flags wholly old or wholly new, and every other byte written
        holds what it held. (QEMU rewrites the whole directory in place
        behind a cleared autoclear bit; with nothing but flags changing that dance is not
        needed.) Setting is only allowed on consistent bitmaps; clearing only on ours.
        ``force`` writes every named flag whatever memory says: after a failed call the disk
        may hold any mix of old and new flags. The flags go out in one ``O_DSYNC`` write
        (durable without writing back the guest data an fdatasync would).
        """
        if self._ext is None:
            return
        base = self._ext.bitmap_directory_offset
        pos = 0
        flag_at: list[tuple[int, int]] = []  # (offset in the directory, new flags)
        new_list: list[StoredBitmap] = []
        for sb in self.bitmaps:
            entry = sb.entry
            if sb.name in names and not sb.problems:
                if in_use and (force or not entry.in_use):
                    entry = _with(entry, flags=entry.flags | BME_FLAG_IN_USE)
                    self.ours.add(sb.name)
                elif not in_use and (entry.in_use or force) and sb.name in self.ours:
                    entry = _with(entry, flags=entry.flags & ~BME_FLAG_IN_USE)
                if entry is not sb.entry:
                    flag_at.append((pos + FLAGS_FIELD_OFFSET, entry.flags))
                    sb = StoredBitmap(entry, sb.problems, sb.table)
            new_list.append(sb)
            pos += sb.entry.entry_size
        if not flag_at:
            return
        self._write_flags(base, flag_at)
        self.bitmaps = new_list
        if not in_use:
            self.ours.difference_update(names)

    def _write_flags(self, base: int, flag_at: list[tuple[int, int]]) -> None:
        """One durable write of the span holding every changed flag: the bytes between are
        rewritten with what they already hold, so a torn write changes only flags. On
        failure memory keeps the old flags; the caller must assume any mix is on disk."""
        lo, hi = flag_at[0][0], flag_at[-1][0] + 4
        span = bytearray(self.img.read_metadata(base + lo, hi - lo, "bitmap directory"))
        for at, flags in flag_at:
            struct.pack_into(">I", span, at - lo, flags)
        self.img.write_metadata_durable(base + lo, span, "bitmap directory")

    def damaged_enabled(self, only: Collection[str] | None = None) -> list[StoredBitmap]:
        """Damaged bitmaps with the auto flag and not in_use (``only``: of these names).

        They cannot record writes, yet would read as consistent once the damage is repaired
        (a field put back by hand, a table entry restored): ``invalidate`` them first.
        """
        return [sb for sb in self.bitmaps if sb.problems and sb.entry.auto
                and not sb.entry.in_use and (only is None or sb.name in only)]

    def invalidate(self, bitmaps: list[StoredBitmap]) -> None:
        """Set ``in_use`` on these entries in place (damaged ones too), durable on return.

        Never cleared by this store: a bitmap that missed writes stays inconsistent until
        it is rebuilt (``bitmap --recover``) or removed. The directory itself is sound (it
        was read), so only the flags field of each entry is rewritten.
        """
        if self._ext is None or not bitmaps:
            return
        pos = 0
        flag_at: list[tuple[int, int]] = []
        new_list: list[StoredBitmap] = []
        for sb in self.bitmaps:
            if any(sb is b for b in bitmaps) and not sb.entry.in_use:
                entry = _with(sb.entry, flags=sb.entry.flags | BME_FLAG_IN_USE)
                flag_at.append((pos + FLAGS_FIELD_OFFSET, entry.flags))
                sb = StoredBitmap(entry, sb.problems, sb.table)
            new_list.append(sb)
            pos += sb.entry.entry_size
        if flag_at:
            self._write_flags(self._ext.bitmap_directory_offset, flag_at)
            self.bitmaps = new_list

    def write_changes(self, name: str, bits: DirtyBitmap, chunks: list[int]) -> int:
        """OR the serialized chunks ``chunks`` of ``bits`` into the stored bitmap, in place.

        The bitmap must be in_use by us (its on-disk bits are not trusted while this runs).
        A chunk is one data cluster: an existing data cluster is read, merged and rewritten
        only where it changed (whole pages); an all-zeros entry gets a new cluster, and the
        table is rewritten after the new clusters' refcounts are durable; an all-ones entry
        needs nothing.
        Returns the bytes written (data clusters and table).
        """
        sb = self._get(name)
        if sb.name not in self.ours or sb.table is None:
            raise BitmapOperationError(f"Bitmap '{name}' is not being tracked")
        img, cs = self.img, self.cluster_size
        # one fstat a checkpoint, not one a chunk (clusters allocated below only make the
        # file longer: a stale end judges more conservatively, never less)
        end = os.fstat(img.fileno()).st_size
        table = list(sb.table)
        written = 0
        for c in chunks:
            if c >= len(table):
                continue
            te = BitmapTableEntry.decode(table[c], cs)
            if te.kind is TableEntryKind.ONES:
                continue
            new = bits.to_bytes(c * cs, cs)
            if te.kind is TableEntryKind.DATA and not self._owns(te.offset, "bitmap data",
                                                                 end):
                # refcount 0 (anything may be allocated there), shared, or another
                # structure's cluster: never written in place; the bits move to a new one
                old_bits = int.from_bytes(img.read_metadata(te.offset, cs, "bitmap data"), "big")
                merged_raw = (old_bits | int.from_bytes(new, "big")).to_bytes(cs, "big")
                off = img.allocate_metadata(cs, "bitmap data")
                img.write_metadata(off, merged_raw, "bitmap data")
                table[c] = off
                written += cs
            elif te.kind is TableEntryKind.DATA:
                import numpy as np

                old = np.frombuffer(img.read_metadata(te.offset, cs, "bitmap data"), np.uint8)
                merged = old | np.frombuffer(new, np.uint8)
                diff = np.flatnonzero(merged != old)
                if diff.size:  # write only the pages that changed
                    lo = int(diff[0]) & ~(WRITE_PAGE - 1)
                    hi = min(cs, (int(diff[-1]) | (WRITE_PAGE - 1)) + 1)
                    img.write_metadata(te.offset + lo, merged[lo:hi].tobytes(), "bitmap data")
                    written += hi - lo
            elif any(new):
                off = img.allocate_metadata(cs, "bitmap data")
                img.write_metadata(off, new, "bitmap data")
                table[c] = off
                written += cs
        if table != sb.table:
            img.flush()  # the new clusters' refcounts are durable before the table names them
            raw = pack_table(table)
            img.write_metadata(sb.entry.bitmap_table_offset, raw, "bitmap table")
            written += len(raw)
            sb.table = table
        return written


    def write_chunks(self, name: str, bits: ChunkSource, chunks: list[int]) -> int:
        """Overwrite the serialized chunks ``chunks`` of the stored bitmap with ``bits``.

        For a bitmap held whole in memory (a clear, a merge, a bitmap added while open): the
        stored cluster becomes exactly ``bits``' bytes, so cleared bits are cleared on disk
        too (``write_changes`` only ORs). The bitmap must be in_use by us. An owned data
        cluster is rewritten where it changed (whole pages); a chunk that becomes all zeros
        keeps its cluster (written with zeros); an all-ones or zero entry, or a cluster that
        is not provably the bitmap's own, gets a new cluster, and the table is rewritten
        after the new clusters' refcounts are durable. Returns the bytes written.
        """
        sb = self._get(name)
        if sb.name not in self.ours or sb.table is None:
            raise BitmapOperationError(f"Bitmap '{name}' is not being tracked")
        import numpy as np

        img, cs = self.img, self.cluster_size
        end = os.fstat(img.fileno()).st_size
        table = list(sb.table)
        written = 0
        for c in chunks:
            if c >= len(table):
                continue
            new = bits.to_bytes(c * cs, cs)
            te = BitmapTableEntry.decode(table[c], cs)
            if te.kind is TableEntryKind.DATA and self._owns(te.offset, "bitmap data", end):
                old = np.frombuffer(img.read_metadata(te.offset, cs, "bitmap data"), np.uint8)
                diff = np.flatnonzero(old != np.frombuffer(new, np.uint8))
                if diff.size:
                    lo = int(diff[0]) & ~(WRITE_PAGE - 1)
                    hi = min(cs, (int(diff[-1]) | (WRITE_PAGE - 1)) + 1)
                    img.write_metadata(te.offset + lo, new[lo:hi], "bitmap data")
                    written += hi - lo
                continue
            if te.kind is TableEntryKind.ZEROS and not any(new):
                continue
            if te.kind is TableEntryKind.ONES and new == b"\xff" * cs:
                continue
            if not any(new):
                table[c] = 0  # a zero entry; the old cluster (not ours, or all-ones) stays
                continue
            off = img.allocate_metadata(cs, "bitmap data")
            img.write_metadata(off, new, "bitmap data")
            table[c] = off
            written += cs
        if table != sb.table:
            img.flush()  # the new clusters' refcounts are durable before the table names them
            raw = pack_table(table)
            img.write_metadata(sb.entry.bitmap_table_offset, raw, "bitmap table")
            written += len(raw)
            sb.table = table
        return written

    def add_with_bits(self, name: str, bm: DirtyBitmap, *, disabled: bool = False) -> None:
        """A new bitmap holding ``bm``'s bits (copy-on-write: data, table, directory)."""
        if not name:
            raise BitmapOperationError("Bitmap name cannot be empty")
        if self.find(name) is not None:
            raise BitmapOperationError(f"Bitmap already exists: {name}")
        self.check_new(name, bm.granularity)
        self._add_bitmap(name, bm, auto=not disabled)

    def check_new(self, name: str, granularity: int) -> None:
        """QEMU's checks for a new persistent bitmap (``qcow2_co_can_store_new_dirty_bitmap``);
        raises ``BitmapOperationError`` with QEMU's reason."""
        if self.img.header.version < 3:
            raise BitmapOperationError("Cannot store dirty bitmaps in qcow2 v2 files")
        dir_size = sum(sb.entry.entry_size for sb in self.bitmaps)
        try:
            check_new_bitmap(name, granularity, self.disk_size, self.cluster_size,
                             len(self.bitmaps), dir_size)
        except FormatError as exc:
            raise BitmapOperationError(exc.reason) from exc


class ChunkSource(Protocol):
    """What ``write_chunks`` reads: a bitmap's serialized bytes."""

    def to_bytes(self, start: int = 0, length: int | None = None) -> bytes: ...


def _with(entry: BitmapDirectoryEntry, **changes: object) -> BitmapDirectoryEntry:
    from dataclasses import replace

    return replace(entry, **changes)  # type: ignore[arg-type]
