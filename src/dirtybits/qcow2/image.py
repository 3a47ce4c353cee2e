"""The qcow2 image engine: read, write, allocate, refcount, backing chains.

Crash-safety rules (the order QEMU keeps, made explicit):

* guest data is written to its host cluster before any L2 entry points at it;
* refcount increments reach the file before the L2/L1 entries that use the clusters;
* refcount decrements are held back until the L2/L1 entries that stopped using the clusters
  are on disk, so a freed cluster is never reused while old metadata still names it.
* a cluster a guest discard frees is punched out of the file at that same point, once its
  refcount is 0 and before anything can allocate it again (never while an entry on disk
  names it, never after it is reused).

A process killed at any moment therefore leaves at worst leaked clusters, never a cluster that
is referenced with a refcount too low. ``flush`` adds ``fdatasync`` between the steps so the
same holds across power loss.

Metadata is cached (L2 tables, refcount blocks) and written back at flush, on eviction, and on
close; sequential I/O touches one cached L2 table per 512 MiB (64 KiB clusters).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import replace
from types import TracebackType
from typing import Any

from dirtybits.errors import (
    CorruptImageError,
    FormatError,
    ImageError,
    ImageIOError,
    ReadOnlyError,
    UnsupportedFeatureError,
    UsageError,
)
from dirtybits.filecreate import CreatedFile, create_file
from dirtybits.filelock import (
    FileLock,
    check_force_share,
    lock_fd,
    qcow2_perms,
)
from dirtybits.format.qcow2 import refcount as rc
from dirtybits.format.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    AUTOCLEAR_KNOWN,
    AUTOCLEAR_WRITE_INTENT,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    CRYPT_NONE,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    MAX_CLUSTER_BITS,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    HeaderCluster,
    HeaderExtension,
    Qcow2Header,
    l1_entries_for,
    pack_feature_table,
    unpack_feature_table,
)
from dirtybits.format.qcow2.snapshot import (
    MAX_SNAPSHOTS_SIZE,
    SNAPSHOT_HEADER,
    SnapshotTableEntry,
)
from dirtybits.format.qcow2.tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    compressed_descriptor,
    compressed_offset_bits,
)
from dirtybits.osfile import (
    CACHE_MODES,
    DIRECT_ALIGN,
    open_file,
    punch_hole,
    reopen_same_file,
)
from dirtybits.qcow2.children import BackingImage, ChildOpener, DataFile
from dirtybits.qcow2.extent import MapExtent

log = logging.getLogger(__name__)

_Q = struct.Struct(">Q")
_unpack_q = _Q.unpack_from
_pack_q = _Q.pack_into

Buffer = bytes | bytearray | memoryview

DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_REFBLOCK_CACHE_BYTES = 8 * 1024 * 1024
MAX_PENDING_FREES = 1 << 16
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
_rwf_dsync = bool(_RWF_DSYNC)  # cleared at the first EOPNOTSUPP (a kernel before 4.7)


_TOO_LARGE = ("The image size is too large for file format 'qcow2' "
              "(try using a larger cluster size)")


def _io_error(what: str, exc: OSError) -> ImageIOError:
    return ImageIOError(f"{what}: {exc.strerror}", errno=exc.errno)


class Qcow2Image:
    """An open qcow2 image. Use ``Qcow2Image.open`` / ``Qcow2Image.create``."""

    format_name = "qcow2"

    # ------------------------------------------------------------------ construction
    def __init__(self, path: str, fd: int, hc: HeaderCluster, *, readonly: bool,
                 l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES):
        self.path = path
        self.readonly = readonly
        self._fd = fd
        self._closed = False
        self.hc = hc
        h = hc.header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self._cmask = self.cluster_size - 1
        self.extended_l2 = bool(h.incompatible_features & INCOMPAT_EXTL2)
        self.l2_bits = h.cluster_bits - (4 if self.extended_l2 else 3)  # 16-byte entries
        self.l2_entries = 1 << self.l2_bits
        self._rc_order = h.refcount_order
        self._rb_entries_bits = h.cluster_bits + 3 - h.refcount_order
        self._rb_entries = 1 << self._rb_entries_bits
        self._rc_max = rc.max_refcount(h.refcount_order)
        self._l2_cache_max = max(4, l2_cache_bytes // self.cluster_size)
        self._rb_cache_max = max(4, DEFAULT_REFBLOCK_CACHE_BYTES // self.cluster_size)
        self.backing: BackingImage | None = None  # the backing image, when one is attached
        self.data_file: DataFile | None = None  # the external data file, when the image has one
        self._data_fd = fd  # where guest data lives: the data file's descriptor, or the image's
        self._data_file_path: str | None = None
        self._owned: list[BackingImage | DataFile] = []  # children this image closes
        self.force_share = False
        self._lock: FileLock | None = None  # QEMU's lock bytes on the image
        self.cache = "writeback"
        self._unsafe = False  # cache=unsafe: flushes (fdatasync) are skipped
        self._writethrough = False  # writethrough/directsync: a flush after every write
        self._sync_failed: str | None = None  # why an fdatasync failed: none succeeds after
        self._unsynced = False  # written since the last completed flush (QEMU's write_gen)
        self._file_end = os.fstat(fd).st_size
        self._file_end_at_open = self._file_end
        # metadata state
        self._l1: list[int] = []
        self._l1_dirty = False
        self._l1_dirty_idx: set[int] = set()  # entries changed since the last flush
        self._l2_cache: dict[int, bytearray] = {}
        self._l2_dirty: set[int] = set()
        self._reftable: list[int] = []
        self._reftable_dirty = False
        self._rb_cache: dict[int, bytearray] = {}
        self._rb_dirty: set[int] = set()
        self._pending_frees: list[int] = []  # host cluster indices to decrement at flush
        self._pending_count: dict[int, int] = {}  # queued decrements per cluster
        self._pending_punch: set[int] = set()  # freed by a guest discard: punch at 0
        self._free_hint = 0
        self._meta: dict[int, str] = {}  # host cluster index -> metadata role
        self._last_l2_key = -1
        self._last_l2: bytearray | None = None
        self._decomp_key = -1
        self._decomp_buf = b""
        self._header_len_on_disk = len(hc.pack())
        self._corrupt_reason: str | None = None
        # with an external data file, COPIED marks an allocated cluster even at host offset 0
        # QEMU uses a data-file name only with the external-data-file incompatible bit
        self._uses_data_file = bool(hc.data_file is not None
                                    and hc.header.incompatible_features & INCOMPAT_DATA_FILE)
        self._dfa = OFLAG_COPIED if self._uses_data_file else 0
        self._direct: dict[int, int] = {}  # buffered fd -> O_DIRECT fd of the same file
        self._abuf: mmap.mmap | None = None
        self._growing_to = 0  # resize in progress: the allocation bound counts the new size
        self._snapshots: list[SnapshotTableEntry] = []  # the internal snapshot table
        self._snapshots_size = 0  # its length in bytes
        self._comp_next = 0  # where the next compressed cluster's bytes go (qcow2_alloc_bytes)

    @classmethod
    def open(cls, path: str, *, readonly: bool = False,
             l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES, cache: str = "writeback",
             keep_bitmaps: bool = False, force_share: bool = False,
             backing: BackingImage | None = None, data_file: DataFile | None = None,
             children: ChildOpener | None = None) -> Qcow2Image:
        """Open an existing image; a failed or read-only open never writes to the file.

        ``cache="none"`` moves aligned data I/O to ``O_DIRECT`` descriptors (qemu's
        cache=none), the data file's too: large sequential I/O then bypasses the page
        cache's write-back. The image is locked as QEMU locks it (a writer excludes other
        writers and consistent readers; ``force_share`` (-U, read-only only) reads past a
        writer and keeps no one out).

        The engine opens no other file (``dirtybits.qcow2.children``): ``backing`` and
        ``data_file`` are children handed in open (they stay the caller's); a child not
        handed in that the header names is asked of ``children`` (and is then the image's
        own). Without either, the image has no backing file (reads of unallocated clusters
        see zeros, as ``open_backing=False``), and one that needs its data file is refused.
        ``dirtybits.block.children.open_qcow2`` opens an image with what its header names.
        """
        if cache not in CACHE_MODES:
            raise UsageError(f"Invalid cache option: {cache}")
        check_force_share(readonly, force_share)
        # a regular file or a block device; a directory, FIFO or /dev/null is refused
        fd = open_file(path, os.O_RDONLY if readonly else os.O_RDWR)
        img: Qcow2Image | None = None
        lock: FileLock | None = None
        try:
            # locked before anything is read: a writer elsewhere may be mid-update
            lock = lock_fd(fd, path, qcow2_perms(readonly=readonly, force_share=force_share))
            st = os.fstat(fd)
            raw = os.pread(fd, 4096, 0)
            if len(raw) >= 24:
                cluster_bits = struct.unpack_from(">I", raw, 20)[0]
                if 12 < cluster_bits <= MAX_CLUSTER_BITS:
                    raw = os.pread(fd, 1 << cluster_bits, 0)
            hc = HeaderCluster.unpack(raw)
            klass = cls
            if hc.header.incompatible_features & INCOMPAT_EXTL2:
                from dirtybits.qcow2.extl2 import Qcow2ExtL2Image

                klass = Qcow2ExtL2Image  # the subcluster engine: standard paths stay as fast
            img = klass(path, fd, hc, readonly=readonly, l2_cache_bytes=l2_cache_bytes)
            img._lock, img.force_share = lock, force_share
            img._file_end = img._file_end_at_open = st.st_size
            img._validate_features()
            img._load_tables()
            img._attach_data_file(data_file, children)
            if backing is not None:
                img.backing = backing
            elif children is not None and hc.backing_name:
                img.backing = children.open_backing(hc.backing_name, hc.backing_format,
                                                    parent=path, force_share=force_share)
                if img.backing is not None:
                    img._owned.append(img.backing)
            img.cache = cache
            img._unsafe = cache == "unsafe"
            img._writethrough = cache in ("writethrough", "directsync")
            if cache in ("none", "directsync"):
                img._enable_direct_io()
            if not readonly:
                if keep_bitmaps:
                    img._refuse_unreadable_bitmaps()
                img._on_writable_open(keep_bitmaps)
            log.debug("%s: opened %s (qcow2 v%d, %d-byte clusters, %d bytes, cache=%s%s)",
                      path, "read-only" if readonly else "read-write", hc.header.version,
                      img.cluster_size, img.size, cache, ", shared" if force_share else "")
            return img
        except FormatError as exc:
            cls._abandon(img, fd, lock)
            raise FormatError(exc.reason, structure=exc.structure, offset=exc.offset) from None
        except BaseException:
            cls._abandon(img, fd, lock)
            raise

    @staticmethod
    def _abandon(img: Qcow2Image | None, fd: int, lock: FileLock | None) -> None:
        """Undo a failed open: every descriptor and lock it took, the children it was given
        by a ``ChildOpener`` included (those handed in stay open: their caller's)."""
        if img is not None:
            for dfd in img._direct.values():
                os.close(dfd)
            with contextlib.suppress(Exception):  # the open's own error is the one to report
                img._close_children()
        if lock is not None:
            lock.release()
        os.close(fd)

    def _validate_features(self) -> None:
        h = self.hc.header
        unknown = h.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            names = []
            ft = self.hc.extension(EXT_FEATURE_TABLE)
            table = unpack_feature_table(ft.data) if ft else []
            for bit in range(64):
                if unknown >> bit & 1:
                    name = next((e.name for e in table if e.type == 0 and e.bit == bit),
                                f"Unknown incompatible feature: {1 << bit:x}")
                    names.append(name)
            raise UnsupportedFeatureError(f"Unsupported qcow2 feature(s): {', '.join(names)}")
        if h.crypt_method != CRYPT_NONE:
            raise UnsupportedFeatureError("encrypted qcow2 images are not supported")
        if h.incompatible_features & INCOMPAT_DATA_FILE and self.hc.data_file is None:
            raise FormatError("image requires an external data file but names none",
                              structure="qcow2 header")
        if self.readonly:
            return
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise CorruptImageError(
                f"{self.path}: image is marked corrupt; it can only be opened read-only "
                "(run 'dirtybits check -r all' to repair)")
        if h.incompatible_features & INCOMPAT_DIRTY:
            raise CorruptImageError(
                f"{self.path}: image has the dirty bit set (lazy refcounts); "
                "run 'dirtybits check -r all' before writing")
        if h.nb_snapshots and self._uses_data_file:
            raise UnsupportedFeatureError(
                f"{self.path}: images with internal snapshots and an external data file "
                "can only be opened read-only")

    def _read_exact(self, fd: int, offset: int, length: int, what: str) -> bytes:
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise _io_error(f"reading {what} at {offset:#x}", exc) from exc
        if len(data) < length:
            data += b"\0" * (length - len(data))
        return data

    def _load_tables(self) -> None:
        h = self.hc.header
        cs = self.cluster_size
        if h.l1_size:
            raw = self._read_exact(self._fd, h.l1_table_offset, h.l1_size * 8, "L1 table")
            self._l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        rt_len = h.refcount_table_clusters * cs
        raw = self._read_exact(self._fd, h.refcount_table_offset, rt_len, "refcount table")
        self._reftable = list(struct.unpack(f">{rt_len // 8}Q", raw))
        meta = self._meta
        meta[0] = "header"
        for i in range(h.refcount_table_clusters):
            meta[(h.refcount_table_offset >> self.cluster_bits) + i] = "refcount table"
        for i in range((h.l1_size * 8 + cs - 1) // cs):
            meta[(h.l1_table_offset >> self.cluster_bits) + i] = "active L1 table"
        for idx, ent in enumerate(self._reftable):
            off = ent & REFT_OFFSET_MASK
            if off:
                meta.setdefault(off >> self.cluster_bits, "refcount block")
            elif ent:
                raise CorruptImageError(
                    f"refcount table entry {idx} has reserved bits set ({ent:#x})")
        for ent in self._l1:
            off = ent & L1E_OFFSET_MASK
            if off:
                meta.setdefault(off >> self.cluster_bits, "active L2 table")
        if h.nb_snapshots:
            self._load_snapshots()

    def _load_snapshots(self) -> None:
        """Read the snapshot table (QEMU refuses to open an image whose table it cannot
        read) and register it and the snapshots' L1 tables as metadata."""
        h = self.hc.header
        cb, cs = self.cluster_bits, self.cluster_size
        start = pos = h.snapshots_offset
        entries: list[SnapshotTableEntry] = []
        for i in range(h.nb_snapshots):
            pos = start + ((pos - start + 7) & ~7)
            head = self._read_exact(self._fd, pos, SNAPSHOT_HEADER.size, "snapshot table")
            (_l1o, _l1s, id_size, name_size, *_rest, extra_size) = SNAPSHOT_HEADER.unpack(head)
            try:
                if extra_size > 1024:
                    raise FormatError("Too much extra metadata", structure="snapshot table")
                rest = self._read_exact(self._fd, pos + len(head),
                                        extra_size + id_size + name_size, "snapshot table")
                sn, used = SnapshotTableEntry.unpack_from(head + rest, 0)
            except FormatError:
                raise FormatError(f"Too much extra metadata in snapshot table entry {i}",
                                  structure="snapshot table", offset=pos) from None
            entries.append(sn)
            pos += used
            if pos - start > MAX_SNAPSHOTS_SIZE:
                raise FormatError("Snapshot table is too big", structure="snapshot table")
        self._snapshots = entries
        self._snapshots_size = pos - start
        for c in range(start >> cb, ((pos - 1) >> cb) + 1):
            self._meta.setdefault(c, "snapshot table")
        for sn in entries:
            off = sn.l1_table_offset
            if off & (cs - 1) or not sn.l1_size or sn.l1_size * 8 > MAX_L1_BYTES:
                continue  # damaged: QEMU refuses it when used, as snapshots.py does
            for i in range((sn.l1_size * 8 + cs - 1) // cs):
                self._meta.setdefault((off >> cb) + i, "inactive L1 table")

    def _enable_direct_io(self) -> None:
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | getattr(os, "O_DIRECT", 0)
        if not flags & getattr(os, "O_DIRECT", 0):
            return
        for fd in {self._fd, self._data_fd}:
            if fd in self._direct:
                continue
            # a filesystem without O_DIRECT (tmpfs) keeps buffered I/O: still correct
            with contextlib.suppress(OSError):
                self._direct[fd] = reopen_same_file(fd, flags | getattr(os, "O_CLOEXEC", 0))

    def _aligned_buffer(self, size: int) -> mmap.mmap:
        if self._abuf is None or len(self._abuf) < size:
            if self._abuf is not None:
                self._abuf.close()
            self._abuf = mmap.mmap(-1, max(size, 1 << 20))
        return self._abuf

    def _attach_data_file(self, data_file: DataFile | None,
                          children: ChildOpener | None) -> None:
        """Take the data file handed in, or ask ``children`` for the one the header names
        (QEMU's checks and words, qcow2_do_open)."""
        if not self._uses_data_file:
            if data_file is not None:
                raise UsageError("'data-file' can only be set for images with an external "
                                 "data file")
            return
        if data_file is None:
            if children is None:
                raise UsageError("'data-file' is required for this image")
            data_file = children.open_data_file(self.hc.data_file or "", parent=self.path,
                                                readonly=self.readonly,
                                                force_share=self.force_share)
            self._owned.append(data_file)
        elif data_file.closed:
            raise UsageError(f"data file '{data_file.path}' is closed")
        elif data_file.readonly and not self.readonly:
            raise ReadOnlyError(f"data file '{data_file.path}' is opened read-only")
        self.data_file = data_file
        self._data_fd = data_file.fd
        self._data_file_path = data_file.path

    def _close_children(self) -> None:
        """Close the children this image owns, the last opened first (the backing file,
        then the data file), every one even when one fails; the first failure is raised."""
        owned, self._owned = self._owned, []
        first: BaseException | None = None
        for child in reversed(owned):
            try:
                child.close()
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    def _refuse_unreadable_bitmaps(self) -> None:
        """A caller keeping the bitmaps cannot keep them when their directory is unreadable:
        refuse with QEMU's message before anything is written (QEMU refuses every open)."""
        from dirtybits.qcow2.bitmap_scan import directory_refusal, scan_bitmaps

        scan = scan_bitmaps(self.hc, lambda off, n: self.read_metadata(off, n, "bitmap "
                                                                       "directory"),
                            self._file_end, tables=False)
        if scan is not None and scan.directory_error is not None:
            raise CorruptImageError(directory_refusal(scan))

    def _on_writable_open(self, keep_bitmaps: bool) -> None:
        """Clear autoclear bits nobody keeps up to date, as the spec requires of writers.

        The bitmaps bit, and dirtybits' own write-intent bit, stay only when the caller (the
        block layer) has taken charge of the bitmaps; a bare engine writing guest data would
        make them stale.
        """
        h = self.hc.header
        keep = (AUTOCLEAR_KNOWN | AUTOCLEAR_WRITE_INTENT if keep_bitmaps
                else AUTOCLEAR_KNOWN & ~AUTOCLEAR_BITMAPS)
        if h.autoclear_features & ~keep:
            log.info("%s: clearing autoclear bits %#x at a writable open (no one keeps "
                     "them up to date)", self.path, h.autoclear_features & ~keep)
            self._set_header(h.replace(autoclear_features=h.autoclear_features & keep))

    # ------------------------------------------------------------------ properties
    @property
    def header(self) -> Qcow2Header:
        return self.hc.header

    @property
    def size(self) -> int:
        return self.hc.header.size

    @property
    def data_file_raw(self) -> bool:
        return bool(self.hc.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def has_data_file(self) -> bool:
        return self._uses_data_file

    def fileno(self) -> int:
        return self._fd

    # ------------------------------------------------------------------ metadata services
    # For structures kept beside the guest data (the bitmap store): allocation with
    # refcounts, overlap-checked writes, and atomic header switches.
    def allocate_metadata(self, nbytes: int, role: str) -> int:
        """Allocate contiguous clusters for ``role`` (refcount 1) and return the offset."""
        self._check_writable()
        n = max(1, (nbytes + self.cluster_size - 1) >> self.cluster_bits)
        off = self._alloc_clusters(n)
        for i in range(n):
            self._meta[(off >> self.cluster_bits) + i] = role
        return off

    def register_metadata(self, offset: int, nbytes: int, role: str) -> None:
        """Record clusters that hold metadata so guest writes can never land on them."""
        first = offset >> self.cluster_bits
        for i in range(max(1, (nbytes + self.cluster_size - 1) >> self.cluster_bits)):
            self._meta.setdefault(first + i, role)

    def metadata_role(self, offset: int) -> str | None:
        """The metadata role registered for the cluster holding ``offset``, if any."""
        return self._meta.get(offset >> self.cluster_bits)

    def guest_clusters(self) -> set[int]:
        """Host cluster indices the active L1 table references in this file: L2 tables,
        data clusters (preallocated zero ones too) and compressed payloads.

        Reads every L2 table (unwritten changes from the cache): for rare callers that must
        prove a cluster is not guest data before freeing it (removing a damaged bitmap).
        """
        cb, cs = self.cluster_bits, self.cluster_size
        x = compressed_offset_bits(cb)
        out: set[int] = set()
        for ent in self._l1:
            off = ent & L1E_OFFSET_MASK
            if not off:
                continue
            out.add(off >> cb)
            tbl = self._l2_cache.get(off)
            raw = bytes(tbl) if tbl is not None else self._read_exact(self._fd, off, cs,
                                                                      "L2 table")
            for e in struct.unpack(f">{cs // 8}Q", raw):
                if e & OFLAG_COMPRESSED:
                    host = e & ((1 << x) - 1)
                    end = (host & ~511) + (((e >> x) & ((1 << (cb - 8)) - 1)) + 1) * 512
                    out.update(range(host >> cb, ((end - 1) >> cb) + 1))
                elif e & L2E_OFFSET_MASK and not self._uses_data_file:
                    out.add((e & L2E_OFFSET_MASK) >> cb)
        return out

    def free_metadata(self, offset: int, nbytes: int) -> None:
        """Release clusters at the next flush (after whatever replaced them is durable)."""
        self._check_writable()
        first = offset >> self.cluster_bits
        for i in range(max(1, (nbytes + self.cluster_size - 1) >> self.cluster_bits)):
            self._queue_free(first + i)

    def write_metadata(self, offset: int, data: Buffer, role: str) -> None:
        self._check_writable()
        self._pwrite_meta(offset, data, role)

    def write_metadata_durable(self, offset: int, data: Buffer, role: str) -> None:
        """Write metadata in place and return once just these bytes are durable.

        One ``pwritev`` with ``RWF_DSYNC`` on the image's own descriptor (the inode that was
        opened and locked, whatever has happened to its name since): the kernel syncs the
        written range only, where ``fdatasync`` would first write back every dirty page of
        the image (all guest data written since the last sync). Where the kernel lacks
        ``RWF_DSYNC``, a plain write and an ``fdatasync``. Raises ``ImageIOError``.
        """
        self._check_writable()
        if self._unsafe:
            self._pwrite_meta(offset, data, role)
            return
        self._pwrite_meta(offset, data, role, dsync=True)

    def read_metadata(self, offset: int, length: int, what: str) -> bytes:
        return self._read_exact(self._fd, offset, length, what)

    def update_header(self, *, autoclear_set: int = 0, autoclear_clear: int = 0,
                      extensions: dict[int, bytes | None] | None = None) -> None:
        """Switch header fields and extensions in one synced write of cluster 0."""
        self._check_writable()
        hc = self.hc
        for ext_type, data in (extensions or {}).items():
            hc = hc.with_extension(ext_type, data)
        h = hc.header
        h = h.replace(autoclear_features=(h.autoclear_features | autoclear_set)
                      & ~autoclear_clear)
        self._set_header(h, hc)

    def sync(self) -> None:
        """fdatasync the image file (no metadata write-back)."""
        if not self.readonly:
            self._sync()

    # ------------------------------------------------------------------ create
    @classmethod
    def create(cls, path: str, size: int, *, cluster_size: int = 65536, refcount_bits: int = 16,
               compat: str = "1.1", backing_file: str | None = None,
               backing_format: str | None = None, data_file: str | None = None,
               data_file_raw: bool = False, lazy_refcounts: bool = False,
               extended_l2: bool = False, compression_type: str = "zlib") -> None:
        """Write a new empty image with QEMU's layout (header, reftable, refblock, L1).

        ``compression_type`` (``zlib`` or ``zstd``) is what compressed writes use; zstd sets
        the header field and its incompatible bit (v3 only), as qemu-img create does.

        Raises ``UsageError`` for options QEMU refuses (a size whose L1 table would pass
        QEMU's 32 MiB limit among them, before any file is touched), ``ImageIOError`` /
        ``LockError`` from the files (``filecreate.create_file``). A failed creation removes
        the files it made (the image, the data file), never a file that was there before.
        """
        if cluster_size & (cluster_size - 1) or not (
                1 << MIN_CLUSTER_BITS <= cluster_size <= 1 << MAX_CLUSTER_BITS):
            raise UsageError("Cluster size must be a power of two between 512 and 2048k")
        if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
            raise UsageError("Refcount width must be a power of two and may not exceed 64 bits")
        if compat not in ("0.10", "1.1", "v2", "v3"):
            raise UsageError(f"Invalid compatibility level: '{compat}'")
        version = 2 if compat in ("0.10", "v2") else 3
        if version == 2 and refcount_bits != 16:
            raise UsageError("Different refcount widths than 16 bits require compatibility "
                             "level 1.1 or above (use compat=1.1 or greater)")
        if version == 2 and (data_file or lazy_refcounts):
            raise UsageError("Lazy refcounts and data files require compatibility level 1.1")
        if data_file_raw and not data_file:
            raise UsageError("data-file-raw requires data-file")
        if extended_l2 and (version == 2 or cluster_size < 16384):
            raise UsageError("Extended L2 entries need compat=1.1 and clusters of 16k or more")
        if compression_type not in ("zlib", "zstd"):
            raise UsageError(f"Parameter 'compression-type' does not accept value "
                             f"'{compression_type}'")
        zstd = compression_type == "zstd"
        if zstd and version == 2:
            raise UsageError("Non-zlib compression type is only supported with compatibility "
                             "level 1.1 and above (use version=v3 or greater)")
        if size < 0 or size % 512:
            size = (size + 511) & ~511
        cb = cluster_size.bit_length() - 1
        if l1_entries_for(size, cb, extended_l2) * 8 > MAX_L1_BYTES:  # before any file
            raise UsageError(_TOO_LARGE)
        order = refcount_bits.bit_length() - 1
        ext: list[HeaderExtension] = []
        if backing_format:
            ext.append(HeaderExtension(EXT_BACKING_FORMAT, backing_format.encode()))
        if data_file:
            ext.append(HeaderExtension(EXT_DATA_FILE, data_file.encode()))
        if version == 3 and cluster_size > 4096:
            ext.append(HeaderExtension(EXT_FEATURE_TABLE, pack_feature_table()))
        incompat = (INCOMPAT_DATA_FILE if data_file else 0) | (
            INCOMPAT_EXTL2 if extended_l2 else 0) | (INCOMPAT_COMPRESSION if zstd else 0)
        autoclear = AUTOCLEAR_DATA_FILE_RAW if data_file_raw else 0
        header = Qcow2Header(
            version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
            size=0, crypt_method=0, l1_size=0, l1_table_offset=0,
            refcount_table_offset=cluster_size, refcount_table_clusters=1, nb_snapshots=0,
            snapshots_offset=0, incompatible_features=incompat,
            compatible_features=1 if lazy_refcounts else 0, autoclear_features=autoclear,
            refcount_order=order,
            header_length=V3_HEADER_LENGTH if version == 3 else V2_HEADER_LENGTH,
            compression_type=COMPRESSION_ZSTD if zstd else COMPRESSION_ZLIB,
        )
        hc = HeaderCluster(header, tuple(ext), backing_file)
        head = hc.pack()
        refblock = bytearray(cluster_size)
        for i in range(3):
            rc.set_refcount(refblock, i, order, 1)
        reftable = bytearray(cluster_size)
        _pack_q(reftable, 0, 2 * cluster_size)
        made = create_file(path, 0)
        data: CreatedFile | None = None
        try:
            fd = made.fd
            try:
                os.pwrite(fd, head + bytes(cluster_size - len(head)), 0)  # a cluster, as QEMU
                os.pwrite(fd, bytes(reftable), cluster_size)
                os.pwrite(fd, bytes(refblock), 2 * cluster_size)
                if data_file:
                    dpath = data_file if os.path.isabs(data_file) else os.path.join(
                        os.path.dirname(path), data_file)
                    data = create_file(dpath, size, keep_data=data_file_raw)
                    data.close()
                os.fsync(fd)
            except OSError as exc:
                raise _io_error(f"creating '{path}'", exc) from exc
            made.close()
            if size:
                # the data file this creation made is its to open (no other opener knows it
                # yet); the backing file is not opened, as qemu-img create -u
                dfile = DataFile.open(dpath, readonly=False) if data_file else None
                try:
                    with cls.open(path, data_file=dfile) as img:
                        img.resize(size)
                finally:
                    if dfile is not None:
                        dfile.close()
        except ImageIOError as exc:
            made.remove()
            if data is not None:
                data.remove()
            if exc.errno == errno.EFBIG:  # the data file: qemu-img's words for it
                raise ImageIOError(_TOO_LARGE, errno=exc.errno) from None
            raise
        except BaseException:
            made.remove()
            if data is not None:
                data.remove()
            raise

    # ------------------------------------------------------------------ header
    def _set_header(self, header: Qcow2Header, hc: HeaderCluster | None = None, *,
                    sync: bool = True) -> None:
        """Rewrite cluster 0 (header, extensions, backing name) and sync it (``sync=False``:
        the caller's next step is a ``flush``, whose first sync covers it)."""
        new = replace(hc or self.hc, header=header)
        packed = new.pack()
        pad = max(0, self._header_len_on_disk - len(packed))
        self._pwrite_meta(0, packed + b"\0" * pad, "header")
        self._header_len_on_disk = len(packed)
        self.hc = HeaderCluster.unpack(packed)
        if sync:
            self._sync()

    def _sync(self) -> None:
        self._fdatasync(self._fd, "fdatasync")

    def _fdatasync(self, fd: int, what: str) -> None:
        """fdatasync, and after one fails, fail every later one (QEMU's
        page_cache_inconsistent): Linux drops the dirty pages it could not write and the
        next fdatasync would succeed without them, so nothing written before the failure
        may ever be reported durable. Bitmaps then stay in_use: they say so."""
        if self._unsafe:
            return
        if self._sync_failed is not None:
            raise ImageIOError(f"{what}: an earlier flush of {self.path} failed "
                               f"({self._sync_failed}); what it covered may be lost",
                               errno=errno.EIO)
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self._sync_failed = exc.strerror or str(exc)
            raise _io_error(what, exc) from exc

    def _pwrite_meta(self, offset: int, data: Buffer, role: str, *,
                     dsync: bool = False) -> None:
        """Write metadata after the overlap check QEMU does (refuse + mark corrupt)."""
        cb = self.cluster_bits
        first = offset >> cb
        last = (offset + len(data) - 1) >> cb
        for c in range(first, last + 1):
            have = self._meta.get(c)
            if have is not None and have != role:
                self._signal_corruption(
                    f"Preventing invalid write on metadata (overlaps with {have})",
                    offset, len(data))
        if dsync:
            self._pwrite_dsync(offset, data)
        else:
            self._pwrite(self._fd, offset, data)

    def _pwrite_dsync(self, offset: int, data: Buffer) -> None:
        """``_pwrite`` on the image's descriptor, durable on return (RWF_DSYNC)."""
        global _rwf_dsync
        if _rwf_dsync and self._sync_failed is None:
            try:
                self._pwrite(self._fd, offset, data, flags=_RWF_DSYNC)
                return
            except ImageIOError as exc:
                if exc.errno == errno.EIO:
                    # the write-back of this range failed: as a failed fdatasync
                    self._sync_failed = self._sync_failed or str(exc)
                    raise
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise  # ENOSPC and the like: the write failed, nothing was lost
                _rwf_dsync = False  # an old kernel: plain write, then fdatasync
        self._pwrite(self._fd, offset, data)
        self._sync()

    def _pwrite(self, fd: int, offset: int, data: Buffer, *, flags: int = 0) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: image is opened read-only")
        view = memoryview(data)
        length = len(view)
        is_main = fd == self._fd
        dfd = self._direct.get(fd) if self._direct and not flags else None
        if dfd is not None and not (offset | length) & (DIRECT_ALIGN - 1):
            buf = self._aligned_buffer(length)
            buf[:length] = view
            view = memoryview(buf)[:length]
            fd = dfd
        if not flags:
            self._unsynced = True
        try:
            while view:
                n = (os.pwritev(fd, [view], offset, flags) if flags
                     else os.pwrite(fd, view, offset))
                offset += n
                view = view[n:]
        except OSError as exc:
            raise _io_error(f"writing {self.path} at {offset:#x}", exc) from exc
        finally:
            del view
        if is_main and offset > self._file_end:
            self._file_end = offset

    def _signal_corruption(self, reason: str, offset: int | None = None,
                           size: int | None = None) -> None:
        """Mark the image corrupt (QEMU's qcow2_signal_corruption) and refuse the write."""
        msg = f"{reason}; image marked as corrupt"
        if not self.readonly and self._corrupt_reason is None:
            log.info("%s: %s; marking the image corrupt", self.path, reason)
            self._corrupt_reason = reason
            h = self.hc.header
            if h.version >= 3:
                packed = replace(self.hc, header=h.replace(
                    incompatible_features=h.incompatible_features | INCOMPAT_CORRUPT)).pack()
                try:
                    os.pwrite(self._fd, packed, 0)
                    os.fdatasync(self._fd)
                    self.hc = HeaderCluster.unpack(packed)
                except OSError:
                    pass
            self.readonly = True
        raise CorruptImageError(f"{self.path}: {msg}", reason=reason, offset=offset, size=size)

    # ------------------------------------------------------------------ refcounts
    def _refblock(self, rt_index: int, *, create: bool, cluster: int = -1) -> bytearray | None:
        if not self._has_refblock(rt_index):
            if not create:
                return None
            # QEMU's update_refcount: alloc_refcount_block, -EAGAIN, try again
            while not self._has_refblock(rt_index):
                self._new_refblock(rt_index, max(cluster, rt_index << self._rb_entries_bits))
        off = self._reftable[rt_index] & REFT_OFFSET_MASK
        blk = self._rb_cache.get(off)
        if blk is None:
            if off % self.cluster_size or off >= MAX_HOST_OFFSET:
                self._signal_or_raise(f"refcount block offset {off:#x} is invalid")
            blk = bytearray(self._read_exact(self._fd, off, self.cluster_size, "refcount block"))
            if len(self._rb_cache) >= self._rb_cache_max:
                self._evict_refblock()
            self._rb_cache[off] = blk
        return blk

    def _has_refblock(self, rt_index: int) -> bool:
        return rt_index < len(self._reftable) and bool(self._reftable[rt_index]
                                                       & REFT_OFFSET_MASK)

    def _signal_or_raise(self, reason: str) -> None:
        if self.readonly:
            raise CorruptImageError(f"{self.path}: {reason}")
        self._signal_corruption(reason)

    def _evict_refblock(self) -> None:
        for off in self._rb_cache:
            if off in self._rb_dirty:
                # increments may land early: that can only leak, never corrupt
                self._pwrite_meta(off, self._rb_cache[off], "refcount block")
                self._rb_dirty.discard(off)
            del self._rb_cache[off]
            return

    def get_refcount(self, cluster_index: int) -> int:
        blk = self._refblock(cluster_index >> self._rb_entries_bits, create=False)
        if blk is None:
            return 0
        return rc.get_refcount(blk, cluster_index & (self._rb_entries - 1), self._rc_order)

    def _update_refcount(self, cluster_index: int, delta: int) -> int:
        rt_index = cluster_index >> self._rb_entries_bits
        blk = self._refblock(rt_index, create=True, cluster=cluster_index)
        assert blk is not None
        i = cluster_index & (self._rb_entries - 1)
        cur = rc.get_refcount(blk, i, self._rc_order)
        new = cur + delta
        if new < 0:
            self._signal_or_raise(f"refcount of cluster {cluster_index} would drop below zero")
        if new > self._rc_max:
            raise ImageError(f"refcount of cluster {cluster_index} would overflow")
        rc.set_refcount(blk, i, self._rc_order, new)
        self._rb_dirty.add(self._reftable[rt_index] & REFT_OFFSET_MASK)
        if new == 0:
            self._meta.pop(cluster_index, None)
            if cluster_index == self._comp_next >> self.cluster_bits:
                self._comp_next = 0  # free now, may be reused whole: no more packing into it
            if cluster_index < self._free_hint:
                self._free_hint = cluster_index
        return new

    def _new_refblock(self, rt_index: int, cluster_index: int) -> None:
        """QEMU 7.2's alloc_refcount_block for group ``rt_index`` (which has no block), as
        the caller then retries: the same clusters, so the same file layout.

        The block takes the first free cluster from the allocation cursor (QEMU's
        free_cluster_index, past the run being allocated). Inside its own group it counts
        itself; elsewhere its group's block counts it, and when that group has no block
        either, only that one is made this round (QEMU's nested -EAGAIN). A group past the
        end of the refcount table grows the table (``_grow_reftable``).
        """
        rbb = self._rb_entries_bits
        idx = self._find_free_run(1, self._free_hint)
        self._free_hint = idx + 1
        if idx == 0:
            self._signal_or_raise("refusing to place a refcount block at offset 0")
        g = idx >> rbb
        if g != rt_index and not self._has_refblock(g):
            self._new_refblock(g, idx)
            self._free_hint = min(self._free_hint, idx)
            return
        off = idx << self.cluster_bits
        blk = bytearray(self.cluster_size)
        if g == rt_index:
            rc.set_refcount(blk, idx & (self._rb_entries - 1), self._rc_order, 1)
        else:
            self._update_refcount(idx, 1)
        self._meta[idx] = "refcount block"
        if len(self._rb_cache) >= self._rb_cache_max:
            self._evict_refblock()
        self._rb_cache[off] = blk
        self._rb_dirty.add(off)
        if rt_index < len(self._reftable):
            self._reftable[rt_index] = off
            self._reftable_dirty = True
        else:
            self._grow_reftable(rt_index, idx, cluster_index)

    def _alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous host clusters with refcount 1; return the byte offset.

        QEMU 7.2's qcow2_alloc_clusters: the first free run from the cursor; when a group
        of the run has no refcount block, that block is made and the search starts again
        no later than the run (QEMU's -EAGAIN and rollback), so the layout is QEMU's.
        """
        rbb = self._rb_entries_bits
        again = -1  # the run found last time, when the search would find it again
        group = 0
        while True:
            if again < 0:
                start = self._find_free_run(n, self._free_hint)
                group = start >> rbb
            else:
                start = again
            end = start + n
            # as QEMU's free_cluster_index: past the run, even over holes too small for it
            # (they are found again once a free moves the cursor back); rescanning them on
            # every allocation is quadratic
            self._free_hint = end
            missing = next((g for g in range(group, ((end - 1) >> rbb) + 1)
                            if not self._has_refblock(g)), None)
            if missing is None:
                for idx in range(start, end):
                    self._update_refcount(idx, 1)
                return start << self.cluster_bits
            self._new_refblock(missing, max(start, missing << rbb))
            # New blocks land past the run; only a free below it (the old refcount table
            # after a growth) can make the search find another run.
            again = start if self._free_hint >= start else -1
            group = missing
            self._free_hint = min(self._free_hint, start)

    def _alloc_limit(self) -> int:
        """Host cluster index no allocation of a sane image can reach.

        Everything the disk can ever need (every data cluster, its L2 and refcount
        metadata, twice over for copy-on-write structures, once more for each internal
        snapshot) past what the file already holds.
        A scan beyond it means damaged refcounts; refusing beats filling the filesystem.
        """
        size = max(self.hc.header.size, self._growing_to)
        data = (size + self._cmask) >> self.cluster_bits
        meta = data // max(1, min(self.l2_entries, self._rb_entries)) + 1
        start = (self._file_end_at_open + self._cmask) >> self.cluster_bits
        # each internal snapshot may hold a whole copy of the disk (and its L1 table)
        views = 2 + len(self._snapshots)
        l1 = len(self._l1) * 8 // self.cluster_size + 1
        return start + views * (data + meta + l1) + len(self._meta) + 4096

    def _find_free_run(self, n: int, hint: int) -> int:
        idx = hint
        limit = self._alloc_limit()
        run_start = idx
        run = 0
        rb_bits = self._rb_entries_bits
        rb_mask = self._rb_entries - 1
        order = self._rc_order
        meta = self._meta
        while run < n:
            if idx > limit:
                self._signal_or_raise(
                    "no free cluster within the image's bounds (refcounts look damaged)")
            g = idx >> rb_bits
            blk = self._refblock(g, create=False) if g < len(self._reftable) else None
            if blk is None:
                # whole rest of the group is free (except reserved metadata)
                if idx in meta:
                    idx += 1
                    run, run_start = 0, idx
                    continue
                run += 1
                idx += 1
                continue
            if idx in meta:
                idx += 1
                run, run_start = 0, idx
                continue
            if rc.get_refcount(blk, idx & rb_mask, order):
                # in use: jump to the next free entry of this block in one C-speed search
                # (a scan from the start of a full disk otherwise costs a call a cluster)
                idx = self._next_zero_refcount(blk, idx) if order >= 3 else idx + 1
                run, run_start = 0, idx
                continue
            run += 1
            idx += 1
        return run_start

    def _next_zero_refcount(self, blk: bytearray, idx: int) -> int:
        """First cluster index after ``idx`` whose entry in ``blk`` (``idx``'s refcount
        block, 8 bits a refcount or more) is 0, or the first index of the next block."""
        width = 1 << (self._rc_order - 3)
        zero = bytes(width)
        base = idx & ~(self._rb_entries - 1)
        pos = blk.find(zero, ((idx & (self._rb_entries - 1)) + 1) * width)
        while pos != -1 and pos % width:
            pos = blk.find(zero, pos + width - pos % width)
        return base + (pos // width if pos != -1 else self._rb_entries)

    def _grow_reftable(self, rt_index: int, new_block: int, cluster_index: int) -> None:
        """QEMU 7.2's reftable growth (alloc_refcount_block + qcow2_refcount_area).

        New refcount blocks and a table half again as large as needed go right after the
        last group in use, the blocks first, counting themselves and the table. They are
        written and synced, then the header switches to them (synced), then the old table
        is freed at once: nothing durable names it any more.
        """
        cs = self.cluster_size
        cb = self.cluster_bits
        rbe = self._rb_entries
        blocks_used = -(-max(cluster_index + 1, new_block + 1) // rbe)
        meta = blocks_used * rbe
        total = rc.refcount_blocks_needed(meta, cs, self._rc_order, generous=True)
        table_size = total + -(-total // 2)
        per_cluster = cs // 8
        table_size = -(-table_size // per_cluster) * per_cluster
        t_clusters = table_size // per_cluster
        if t_clusters * cs > MAX_REFTABLE_BYTES:
            raise ImageError("refcount table would exceed its maximum size")
        table = (self._reftable + [0] * table_size)[:table_size]
        table[rt_index] = new_block << cb
        # the groups from ``meta`` on are past the old table's and the new block's: every
        # block there is new (QEMU would reuse one it found)
        table_at = meta + total - blocks_used
        end = table_at + t_clusters
        new_blocks: dict[int, bytearray] = {}
        for i in range(blocks_used, total):
            pos = meta + i - blocks_used
            blk = bytearray(cs)
            table[i] = pos << cb
            new_blocks[pos << cb] = blk
            self._meta[pos] = "refcount block"
            first = i * rbe
            for j in range(max(meta - first, 0), max(0, min(end - first, rbe))):
                rc.set_refcount(blk, j, self._rc_order, 1)
        for idx in range(table_at, end):
            self._meta[idx] = "refcount table"
        for boff, blk in new_blocks.items():
            self._pwrite_meta(boff, blk, "refcount block")
        self._write_dirty_refblocks()
        raw = struct.pack(f">{table_size}Q", *table)
        self._pwrite_meta(table_at << cb, raw, "refcount table")
        self._sync()
        old_off = self.hc.header.refcount_table_offset
        old_clusters = self.hc.header.refcount_table_clusters
        self._reftable = table
        for boff, blk in new_blocks.items():
            if len(self._rb_cache) >= self._rb_cache_max:
                self._evict_refblock()
            self._rb_cache[boff] = blk
        self._set_header(self.hc.header.replace(refcount_table_offset=table_at << cb,
                                                refcount_table_clusters=t_clusters))
        self._reftable_dirty = False
        for i in range(old_clusters):
            self._meta.pop((old_off >> cb) + i, None)
            self._update_refcount((old_off >> cb) + i, -1)

    def _end_cluster(self) -> int:
        """First host cluster index past the file and everything allocated in memory."""
        cs = self.cluster_size
        end = (self._file_end + cs - 1) >> self.cluster_bits
        if self._meta:
            end = max(end, max(self._meta) + 1)
        # refblocks known in memory may describe allocations not yet written
        for g in range(len(self._reftable) - 1, -1, -1):
            if self._reftable[g] & REFT_OFFSET_MASK:
                blk = self._refblock(g, create=False)
                assert blk is not None
                base = g << self._rb_entries_bits
                for i in range(self._rb_entries - 1, -1, -1):
                    if rc.get_refcount(blk, i, self._rc_order):
                        end = max(end, base + i + 1)
                        break
                break
        return end

    def _write_dirty_refblocks(self) -> None:
        for off in sorted(self._rb_dirty):
            self._pwrite_meta(off, self._rb_cache[off], "refcount block")
        self._rb_dirty.clear()
        if self._reftable_dirty:
            # a new refcount block, and the count of its own cluster, durable before the
            # table names it (as QEMU's alloc_refcount_block): else a power cut can leave a
            # table entry past the end of the file, or a block with refcount 0
            self._sync()
            h = self.hc.header
            raw = struct.pack(f">{len(self._reftable)}Q", *self._reftable)
            self._pwrite_meta(h.refcount_table_offset, raw, "refcount table")
            self._reftable_dirty = False

    # ------------------------------------------------------------------ L1 / L2
    def _l2_table(self, l1_index: int, *, allocate: bool) -> bytearray | None:
        if l1_index == self._last_l2_key and (
                not allocate or self._l1[l1_index] & OFLAG_COPIED):
            return self._last_l2
        if l1_index >= len(self._l1):
            raise ImageError(f"guest offset beyond the L1 table (index {l1_index})")
        ent = self._l1[l1_index]
        off = ent & L1E_OFFSET_MASK
        if not off:
            if not allocate:
                return None
            return self._new_l2(l1_index)
        if off & self._cmask or off >= MAX_HOST_OFFSET:
            self._signal_or_raise(
                f"L2 table offset {off:#x} unaligned (L1 index: {l1_index:#x})")
        tbl = self._l2_cache.get(off)
        if tbl is None:
            tbl = bytearray(self._read_exact(self._fd, off, self.cluster_size, "L2 table"))
            if len(self._l2_cache) >= self._l2_cache_max:
                self._evict_l2()
            self._l2_cache[off] = tbl
        if allocate and not ent & OFLAG_COPIED:
            return self._cow_l2(l1_index, off, tbl)
        self._last_l2_key = l1_index
        self._last_l2 = tbl
        return tbl

    def _cow_l2(self, l1_index: int, old_off: int, old: bytearray) -> bytearray:
        """Copy a shared L2 table (refcount above 1: a snapshot holds it too) before it
        changes, as QEMU's l2_allocate: the copy keeps the entries as they are (their
        clusters stay shared, their COPIED flags clear), the L1 entry moves to it with
        COPIED, and the old table loses this reference once that L1 entry is durable."""
        if old_off in self._l2_dirty:  # the snapshot's view of it must be on disk as is
            self._write_dirty_refblocks()
            self._sync()
            self._pwrite_meta(old_off, old, "active L2 table")
            self._l2_dirty.discard(old_off)
        tbl = self._install_l2(l1_index, bytearray(old))
        self._meta[old_off >> self.cluster_bits] = "inactive L2 table"
        self._queue_free(old_off >> self.cluster_bits)
        return tbl

    def _evict_l2(self) -> None:
        for off in self._l2_cache:
            if off in self._l2_dirty:
                # refcounts of what this table references must be on disk first
                self._write_dirty_refblocks()
                self._sync()
                self._pwrite_meta(off, self._l2_cache[off], "active L2 table")
                self._l2_dirty.discard(off)
            del self._l2_cache[off]
            self._last_l2_key = -1
            self._last_l2 = None
            return

    def _new_l2(self, l1_index: int) -> bytearray:
        return self._install_l2(l1_index, bytearray(self.cluster_size))

    def _install_l2(self, l1_index: int, tbl: bytearray) -> bytearray:
        """Give ``tbl`` (a new table's contents) a new cluster, the cache and L1 entry
        ``l1_index`` (with COPIED); both are written at the next flush, the table first."""
        off = self._alloc_clusters(1)
        self._meta[off >> self.cluster_bits] = "active L2 table"
        if len(self._l2_cache) >= self._l2_cache_max:
            self._evict_l2()
        self._l2_cache[off] = tbl
        self._l2_dirty.add(off)
        self._l1[l1_index] = off | OFLAG_COPIED
        self._l1_dirty = True
        self._l1_dirty_idx.add(l1_index)
        self._last_l2_key = l1_index
        self._last_l2 = tbl
        return tbl

    def _l2_offset_of(self, l1_index: int) -> int:
        return self._l1[l1_index] & L1E_OFFSET_MASK

    # ------------------------------------------------------------------ read
    def _check_request(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.hc.header.size:
            raise ImageError(f"request [{offset}, {offset + length}) is outside the image "
                             f"(size {self.hc.header.size})")

    def read(self, offset: int, length: int) -> bytes:
        self._check_request(offset, length)
        if self._closed:
            raise ImageError("image is closed")
        out = bytearray(length)
        view = memoryview(out)
        self._read_into(offset, view)
        return bytes(out)

    def read_into(self, offset: int, buf: Buffer) -> None:
        """Read ``len(buf)`` guest bytes at ``offset`` into ``buf`` (no allocation: the hot
        path of scans that reuse one buffer)."""
        view = memoryview(buf).cast("B")
        self._check_request(offset, len(view))
        if self._closed:
            raise ImageError("image is closed")
        self._read_into(offset, view)

    def _read_into(self, offset: int, view: memoryview) -> None:
        cb = self.cluster_bits
        cs = self.cluster_size
        l2b = self.l2_bits
        l2mask = self.l2_entries - 1
        pos = 0
        total = len(view)
        while pos < total:
            goff = offset + pos
            l1i = goff >> (cb + l2b)
            tbl = self._l2_table(l1i, allocate=False)
            # how far this L2 table reaches
            table_end = ((l1i + 1) << (cb + l2b)) - offset
            stop = min(total, table_end)
            if tbl is None:
                self._read_unallocated(goff, view[pos:stop])
                pos = stop
                continue
            while pos < stop:
                goff = offset + pos
                idx = (goff >> cb) & l2mask
                ent = _unpack_q(tbl, idx * 8)[0]
                in_cluster = goff & (cs - 1)
                n = min(cs - in_cluster, stop - pos)
                if ent & OFLAG_COMPRESSED:
                    data = self._decompress(ent, goff)
                    view[pos:pos + n] = data[in_cluster:in_cluster + n]
                    pos += n
                    continue
                host = ent & L2E_OFFSET_MASK
                if ent & OFLAG_ZERO:
                    view[pos:pos + n] = bytes(n)
                    pos += n
                    continue
                if not host and not ent & self._dfa:
                    # coalesce unallocated clusters
                    while pos + n < stop:
                        nidx = ((offset + pos + n) >> cb) & l2mask
                        if nidx == 0 or _unpack_q(tbl, nidx * 8)[0]:
                            break
                        n = min(n + cs, stop - pos)
                    self._read_unallocated(goff, view[pos:pos + n])
                    pos += n
                    continue
                if host & self._cmask or host >= MAX_HOST_OFFSET:
                    self._signal_or_raise(f"L2 entry {ent:#x} has an unaligned host offset")
                # coalesce physically contiguous clusters
                hstart = host + in_cluster
                while pos + n < stop:
                    nidx = ((offset + pos + n) >> cb) & l2mask
                    if nidx == 0:
                        break
                    nxt = _unpack_q(tbl, nidx * 8)[0]
                    if nxt & (OFLAG_COMPRESSED | OFLAG_ZERO) or (
                            nxt & L2E_OFFSET_MASK) != hstart + n:
                        break
                    n = min(n + cs, stop - pos)
                self._pread_into(self._data_fd, hstart, view[pos:pos + n])
                pos += n

    def _pread_into(self, fd: int, offset: int, view: memoryview) -> None:
        length = len(view)
        dfd = self._direct.get(fd) if self._direct else None
        try:
            if dfd is not None and not (offset | length) & (DIRECT_ALIGN - 1):
                buf = self._aligned_buffer(length)
                bview = memoryview(buf)[:length]
                got = os.preadv(dfd, [bview], offset)
                view[:got] = bview[:got]
                del bview
            else:
                got = os.preadv(fd, [view], offset)
        except OSError as exc:
            raise _io_error(f"reading {self.path} at {offset:#x}", exc) from exc
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    def _read_unallocated(self, goff: int, view: memoryview) -> None:
        n = len(view)
        if self.backing is not None and goff < self.backing.size:
            m = min(n, self.backing.size - goff)
            view[:m] = self.backing.read(goff, m)
            if m < n:
                view[m:] = bytes(n - m)
        else:
            view[:] = bytes(n)

    def _decompress(self, ent: int, goff: int) -> bytes:
        key = ent
        if key == self._decomp_key:
            return self._decomp_buf
        cb = self.cluster_bits
        x = compressed_offset_bits(cb)
        host = ent & ((1 << x) - 1)
        sectors = ((ent >> x) & ((1 << (cb - 8)) - 1)) + 1
        length = (host & ~511) + sectors * 512 - host
        raw = self._read_exact(self._fd, host, length, "compressed cluster")
        cs = self.cluster_size
        try:
            if self.hc.header.compression_type == COMPRESSION_ZLIB:
                d = zlib.decompressobj(-12)
                data = d.decompress(raw, cs)
            elif self.hc.header.compression_type == COMPRESSION_ZSTD:
                try:
                    import zstandard
                except ImportError:
                    raise UnsupportedFeatureError(
                        "zstd-compressed clusters need the 'zstandard' module") from None
                data = _zstd_cluster(zstandard, raw, cs, goff)
            else:
                raise UnsupportedFeatureError("unknown compression type")
        except zlib.error as exc:
            raise CorruptImageError(
                f"compressed cluster for guest offset {goff:#x} is damaged: {exc}") from exc
        if len(data) < cs:
            raise CorruptImageError(
                f"compressed cluster for guest offset {goff:#x} decompresses to {len(data)} "
                f"bytes, expected {cs}")
        self._decomp_key = key
        self._decomp_buf = data
        return data

    # ------------------------------------------------------------------ write
    def _check_writable(self) -> None:
        if self._closed:
            raise ImageError("image is closed")
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: image is opened read-only")

    def write(self, offset: int, data: Buffer, *, compress: bool = False) -> None:
        """Write guest bytes. ``compress``: store them compressed, whole clusters only (up to
        the end of the disk for the last one), as QEMU's compressed writes: ``UsageError``
        otherwise, ``UnsupportedFeatureError`` with an external data file (details:
        ``_write_compressed``). Raises ``ImageIOError`` when the file does."""
        self._check_writable()
        length = len(data)
        self._check_request(offset, length)
        if compress:
            self._write_compressed(offset, data)
            if self._writethrough:
                self.flush()
            return
        if not length:
            return
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = cs - 1
        l2b = self.l2_bits
        l2mask = self.l2_entries - 1
        pos = 0
        while pos < length:
            goff = offset + pos
            l1i = goff >> (cb + l2b)
            tbl = self._l2_table(l1i, allocate=True)
            assert tbl is not None
            table_end = ((l1i + 1) << (cb + l2b)) - offset
            stop = min(length, table_end)
            while pos < stop:
                goff = offset + pos
                idx = (goff >> cb) & l2mask
                ent = _unpack_q(tbl, idx * 8)[0]
                in_cluster = goff & cmask
                host = ent & L2E_OFFSET_MASK
                if self._in_place(ent):
                    if host & cmask:  # QEMU refuses (and reads refuse it too)
                        kind = "Preallocated zero" if ent & OFLAG_ZERO else "Data"
                        self._signal_or_raise(f"{kind} cluster offset {host:#x} unaligned "
                                              f"(guest offset: {goff & ~cmask:#x})")
                    if ent & OFLAG_ZERO:
                        pos = self._write_zero_alloc(tbl, l1i, idx, host, offset, pos, stop, view)
                        continue
                    n = min(cs - in_cluster, stop - pos)
                    # extend over following in-place clusters that are physically contiguous
                    nidx = idx + 1
                    while pos + n < stop and nidx <= l2mask:
                        nxt = _unpack_q(tbl, nidx * 8)[0]
                        if (nxt & (OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO)) != \
                                OFLAG_COPIED or (nxt & L2E_OFFSET_MASK) != host + \
                                ((nidx - idx) << cb):
                            break
                        n = min(n + cs, stop - pos)
                        nidx += 1
                    self._write_data(host + in_cluster, view[pos:pos + n])
                    pos += n
                    continue
                pos = self._write_allocating(tbl, offset, pos, stop, view)
        if self._writethrough:
            self.flush()

    # ------------------------------------------------------------------ compressed write
    def _write_compressed(self, offset: int, data: Buffer) -> None:
        """Store whole clusters compressed with the image's compression type.

        As QEMU: only whole clusters (the disk's partial last cluster counts as whole, padded
        with zeros), else ``UsageError`` (qemu-io: Invalid argument); an image with an
        external data file cannot hold compressed clusters (``UnsupportedFeatureError``:
        Operation not supported); a cluster that does not compress below the cluster size
        is written uncompressed. A zero-length compressed write pads the file to a whole
        sector (qemu-img convert -c ends with one, so the last compressed bytes can be read
        with sector I/O). Where QEMU 7.2 refuses a cluster that is already allocated
        (EIO), the old allocation is released here in the crash-safe order, after the new
        entry is durable. Clusters are compressed in parallel (``compress.compress_clusters``).
        """
        if self.has_data_file:
            raise UnsupportedFeatureError(
                f"{self.path}: compressed clusters cannot be written to an image with an "
                "external data file")
        length = len(data)
        cs = self.cluster_size
        if not length:  # checked first, as QEMU
            end = (self._file_end + 511) & ~511
            if end != self._file_end:
                try:
                    os.ftruncate(self._fd, end)
                except OSError as exc:
                    raise _io_error(f"resizing {self.path}", exc) from exc
                self._unsynced = True
                self._file_end = end
            return
        if offset & self._cmask or (length & self._cmask
                                    and offset + length != self.hc.header.size):
            raise UsageError(f"compressed write [{offset}, {offset + length}) does not cover "
                             f"whole {cs}-byte clusters")
        from dirtybits.qcow2.compress import compress_clusters

        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        batch = 64  # clusters compressed together: bounds the memory a huge write holds
        for start in range(0, length, batch * cs):
            chunks: list[Buffer] = [view[p:min(length, p + cs)]
                                    for p in range(start, min(length, start + batch * cs), cs)]
            outs = compress_clusters(chunks, self.hc.header.compression_type, cs)
            plain = -1  # first of a run of clusters that did not compress: one plain write
            for i, out in enumerate(outs):
                if out is None:
                    plain = i if plain < 0 else plain
                    continue
                if plain >= 0:
                    self._write_uncompressed(offset + start + plain * cs,
                                             view[start + plain * cs:start + i * cs])
                    plain = -1
                self._write_compressed_cluster(offset + start + i * cs, out)
            if plain >= 0:
                self._write_uncompressed(offset + start + plain * cs,
                                         view[start + plain * cs:start + len(chunks) * cs])

    def _write_uncompressed(self, goff: int, chunk: Buffer) -> None:
        """A cluster that did not compress, written as a plain write (without the
        writethrough flush, which the compressed write does once at its end)."""
        wt, self._writethrough = self._writethrough, False
        try:
            self.write(goff, chunk)
        finally:
            self._writethrough = wt

    def _write_compressed_cluster(self, goff: int, payload: bytes) -> None:
        """Point the guest cluster at ``payload``, packed after the last compressed bytes.

        Order: the L2 table (allocated first, as QEMU), the bytes' refcount, the payload
        itself, then the entry; the old entry's clusters are queued to be freed at the next
        flush, after the new entry is durable.
        """
        cb = self.cluster_bits
        l1i = goff >> (cb + self.l2_bits)
        tbl = self._l2_table(l1i, allocate=True)
        assert tbl is not None
        idx = (goff >> cb) & (self.l2_entries - 1)
        host = self._alloc_compressed_bytes(len(payload))
        self._write_data(host, payload)
        tbl = self._l2_table(l1i, allocate=True)  # the same table, still cached
        assert tbl is not None
        old = _unpack_q(tbl, idx * 8)[0]
        _pack_q(tbl, idx * 8, compressed_descriptor(host, len(payload), cb))
        self._decomp_key = -1
        self._l2_dirty.add(self._l2_offset_of(l1i))
        if old:
            self._release_entry(old)

    def _alloc_compressed_bytes(self, size: int) -> int:
        """Host bytes for ``size`` bytes of compressed data, as QEMU's qcow2_alloc_bytes.

        Compressed clusters are packed back to back, byte-granular, across host clusters:
        a piece that does not fit the rest of the current host cluster starts a new one,
        or continues into it when the new cluster is the next one in the file. Each host
        cluster's refcount counts every compressed cluster touching it (so a cluster at
        its maximum refcount takes no more). The refcount increments are in the refcount
        cache before the entry that uses them, and reach the disk first (flush, eviction).
        """
        cb = self.cluster_bits
        cmask = self._cmask
        off = self._comp_next
        if off and self.get_refcount(off >> cb) >= self._rc_max:
            off = 0
        if off and self.cluster_size - (off & cmask) >= size:
            self._update_refcount(off >> cb, 1)
            start = off
        else:
            new = self._alloc_clusters(1)  # refcount 1: counts this piece
            if off and ((off + cmask) & ~cmask) == new:
                self._update_refcount(off >> cb, 1)
                start = off
            else:
                start = new
        end = start + size
        self._comp_next = end if end & cmask else 0
        return start

    def _in_place(self, ent: int) -> bool:
        """Whether a write goes to the entry's own host cluster (QEMU's handle_copied): an
        allocated cluster with refcount 1 (COPIED), plain or preallocated zero."""
        return (ent & (OFLAG_COPIED | OFLAG_COMPRESSED)) == OFLAG_COPIED and bool(
            ent & L2E_OFFSET_MASK or self._dfa)

    def _write_zero_alloc(self, tbl: bytearray, l1i: int, idx: int, host: int, offset: int,
                          pos: int, stop: int, view: memoryview) -> int:
        """Write into a preallocated zero cluster where it lies, as QEMU does.

        Its refcount is 1 (COPIED), so no allocation and no free: the cluster is written
        whole (the data and zeros around it, since its old bytes are stale), and only then
        does the entry lose its zero flag, at the next flush. A crash before that leaves it
        reading as zeros. Reallocating instead would drop the old cluster's refcount, to 0
        while in use when a damaged image shares it.
        """
        cs = self.cluster_size
        goff = offset + pos
        in_cluster = goff & (cs - 1)
        n = min(cs - in_cluster, stop - pos)
        whole = cs
        if self.has_data_file:  # never grow the data file past the disk
            whole = min(cs, self.hc.header.size - (goff - in_cluster))
        if n == whole:
            buf: Buffer = view[pos:pos + n]
        else:
            buf = bytearray(whole)
            buf[in_cluster:in_cluster + n] = view[pos:pos + n]
        self._write_data(host, buf)
        _pack_q(tbl, idx * 8, host | OFLAG_COPIED)
        self._l2_dirty.add(self._l2_offset_of(l1i))
        return pos + n

    def _write_data(self, host: int, chunk: Buffer) -> None:
        if self._data_fd == self._fd:
            cb = self.cluster_bits
            meta = self._meta
            if meta:
                for c in range(host >> cb, ((host + len(chunk) - 1) >> cb) + 1):
                    if c in meta:
                        self._signal_corruption(
                            f"Preventing invalid write on metadata (overlaps with {meta[c]})",
                            host, len(chunk))
        self._pwrite(self._data_fd, host, chunk)

    def _write_allocating(self, tbl: bytearray, offset: int, pos: int, stop: int,
                          view: memoryview) -> int:
        """Write into clusters that need new host clusters (with copy-on-write of the edges)."""
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = cs - 1
        l2mask = self.l2_entries - 1
        goff = offset + pos
        first_idx = (goff >> cb) & l2mask
        end_goff = offset + stop
        last_idx_excl = min(((end_goff - 1) >> cb & l2mask) + 1, self.l2_entries)
        # run of consecutive entries that all need allocation
        count = 0
        olds: list[int] = []
        for i in range(first_idx, last_idx_excl):
            ent = _unpack_q(tbl, i * 8)[0]
            if self._in_place(ent):
                break
            olds.append(ent)
            count += 1
        cluster_start = goff & ~cmask
        run_end = min(end_goff, cluster_start + (count << cb))
        if self.has_data_file:
            host = cluster_start  # external data files map guest offsets 1:1
            fresh = False
        else:
            host = self._alloc_clusters(count)
            fresh = host >= self._file_end
        head = goff - cluster_start
        data_len = run_end - goff
        tail_end = cluster_start + (count << cb)
        tail = tail_end - run_end
        if tail_end > self.hc.header.size and self.has_data_file:
            # never grow the data file past the disk; in our own file the whole cluster is
            # written so no stale bytes wait past the end for a later resize to expose
            tail = max(0, min(tail, self.hc.header.size - run_end))
        head_data = self._old_content(olds[0], cluster_start, head, fresh) if head else None
        tail_data = self._old_content(olds[-1], run_end, tail, fresh) if tail else None
        if fresh and ((head and head_data is None) or (tail and tail_data is None)):
            self._zero_fresh(host, count << cb)
        parts: list[Buffer] = []
        wstart = host
        if head:
            if head_data is None:
                wstart = host + head
            else:
                parts.append(head_data)
        parts.append(view[pos:pos + data_len])
        if tail_data is not None:
            parts.append(tail_data)
        buf: Buffer = parts[0] if len(parts) == 1 else b"".join(parts)
        self._write_data(wstart, buf)
        for i in range(count):
            _pack_q(tbl, (first_idx + i) * 8, (host + (i << cb)) | OFLAG_COPIED)
        # dirty before the releases: a flush they trigger must write the table first
        self._l2_dirty.add(self._l2_offset_of(goff >> (cb + self.l2_bits)))
        for old in olds:
            self._release_entry(old)
        return pos + data_len

    def _zero_fresh(self, host: int, length: int) -> None:
        """New clusters past the end of the file whose copy-on-write parts are zeros: one
        fallocate over them instead of writing those zeros (QEMU's handle_alloc_space, a
        write-zeroes without fallback), so the file ends where QEMU's does."""
        try:
            os.posix_fallocate(self._fd, host, length)
        except OSError:
            return  # no space, or no support: the data write still does the job
        self._unsynced = True
        self._file_end = max(self._file_end, host + length)

    def _old_content(self, ent: int, goff: int, length: int, fresh: bool) -> Buffer | None:
        """Bytes ``[goff, goff+length)`` as the cluster read before this write; None = zeros
        that need not be written because the new cluster lies past the end of the file."""
        in_cluster = goff & (self.cluster_size - 1)
        if ent & OFLAG_COMPRESSED:
            return self._decompress(ent, goff)[in_cluster:in_cluster + length]
        if ent & OFLAG_ZERO:
            return None if fresh else bytes(length)
        host = ent & L2E_OFFSET_MASK
        if host or ent & self._dfa:
            out = bytearray(length)
            self._pread_into(self._data_fd, host + in_cluster, memoryview(out))
            return out
        if self.has_data_file and self.data_file_raw:
            out = bytearray(length)
            self._pread_into(self._data_fd, goff, memoryview(out))
            return out
        if self.backing is not None and goff < self.backing.size:
            out = bytearray(length)
            self._read_unallocated(goff, memoryview(out))
            return out
        return None if fresh else bytes(length)

    def _release_entry(self, ent: int, *, discard: bool = False) -> None:
        """Queue the host clusters an L2 entry owned for freeing once the new entry is durable.

        ``discard``: the entry goes because the guest discarded or unmapped it (QEMU's
        QCOW2_DISCARD_REQUEST, passed down by default): clusters whose refcount reaches 0 are
        then punched out of the file. Clusters freed by copy-on-write are not (QEMU's
        DISCARD_NEVER: the next allocation reuses them anyway).

        A free is dropped (the cluster leaks, which ``check -r leaks`` repairs) where it could
        release something still in use: a damaged entry naming metadata, an unaligned host
        offset (QEMU: "Cannot free unaligned cluster"), a cluster whose refcount is already
        spent, or a compressed descriptor that is garbage (see _compressed_frees).
        """
        if not ent:
            return
        cb = self.cluster_bits
        if self.has_data_file:
            # guest offsets map 1:1 and nothing is refcounted: QEMU discards the range in the
            # data file at once. Safe at any time: the cluster is not reallocated (a later
            # write lands after the punch), and until the new entry is durable the old one
            # reads the punched range as zeros, which is what the guest asked for.
            # A raw data file was punched by discard() already.
            if discard and not ent & OFLAG_COMPRESSED and not self.data_file_raw and (
                    ent & L2E_OFFSET_MASK or ent & self._dfa):
                host = ent & L2E_OFFSET_MASK
                self._unsynced = True
                punch_hole(self._data_fd, host, min(self.cluster_size,
                                                     max(0, self.hc.header.size - host)))
            return
        if ent & OFLAG_COMPRESSED:
            for c in self._compressed_frees(ent):
                self._queue_free(c, punch=discard)
            self._decomp_key = -1
            return
        host = ent & L2E_OFFSET_MASK
        if host and not host & self._cmask and self._may_free((host >> cb,)):
            self._queue_free(host >> cb, punch=discard)

    def _may_free(self, clusters: range | tuple[int, ...]) -> bool:
        """Whether one more decrement of each cluster is safe: none is metadata (an L2 entry
        pointing there is damage) and each has a reference left to give once the decrements
        already queued are applied (QEMU's update_refcount refuses the whole range then)."""
        meta = self._meta
        pending = self._pending_count
        for c in clusters:
            if c in meta or self.get_refcount(c) - pending.get(c, 0) < 1:
                return False
        return True

    def _compressed_frees(self, ent: int) -> range:
        """Host clusters a compressed descriptor's bytes touch, or none when it is garbage.

        QEMU frees the descriptor's byte range without a look (qcow2_free_any_cluster), so a
        descriptor pointing at an L2 table, a refcount block or another guest cluster's data
        drops their refcounts while they are in use. Here the range must lie inside the
        file, clear of metadata, and refcounted (_may_free); and where a decrement would
        bring a cluster to 0 (so it could be reused), the bytes must decompress to a whole
        cluster, as every real compressed cluster does. That costs one decompression per
        host cluster of a compressed image that is overwritten or discarded, which a shared
        host cluster's earlier frees (refcount > 1) do not pay.
        """
        cb = self.cluster_bits
        x = compressed_offset_bits(cb)
        host = ent & ((1 << x) - 1)
        sectors = ((ent >> x) & ((1 << (cb - 8)) - 1)) + 1
        end = (host & ~511) + sectors * 512
        clusters = range(host >> cb, ((end - 1) >> cb) + 1)
        # the last compressed bytes of a file may end inside a sector (QEMU packs by bytes)
        if end > (self._file_end + 511) & ~511 or not self._may_free(clusters):
            return range(0)
        pending = self._pending_count
        if any(self.get_refcount(c) - pending.get(c, 0) == 1 for c in clusters):
            try:
                self._decompress(ent, -1)
            except CorruptImageError:
                return range(0)
            except UnsupportedFeatureError:
                pass  # zstd without its module: the structural checks have to do
        return clusters

    def _queue_free(self, cluster_index: int, *, punch: bool = False) -> None:
        self._pending_frees.append(cluster_index)
        self._pending_count[cluster_index] = self._pending_count.get(cluster_index, 0) + 1
        if punch:
            self._pending_punch.add(cluster_index)
        if len(self._pending_frees) > MAX_PENDING_FREES:
            self.flush()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_writable()
        self._check_request(offset, length)
        if not length:
            return
        self._write_zeroes(offset, length, unmap)
        if self._writethrough:
            self.flush()

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        cs = self.cluster_size
        end = offset + length
        first_full = (offset + cs - 1) & ~(cs - 1)
        last_full = end & ~(cs - 1)
        if end == self.hc.header.size and end & (cs - 1):
            last_full = end  # the partial last cluster of the disk counts as whole
            last_full_cluster_end = (end + cs - 1) & ~(cs - 1)
        else:
            last_full_cluster_end = last_full
        use_flag = self.hc.header.version >= 3 and not (self.has_data_file and self.data_file_raw)
        # v2 has no zero flag: without a backing file a whole cluster reads as zeros once
        # deallocated, which QEMU does (qcow2_subcluster_zeroize falls back to a discard)
        v2_drop = (self.hc.header.version < 3 and self.backing is None
                   and not self.hc.backing_name)
        if not use_flag:
            if not v2_drop or first_full >= last_full:
                self._write_zero_bytes(offset, length)
                return
            if offset < first_full:
                self._write_zero_bytes(offset, first_full - offset)
            self._zero_clusters(first_full, last_full_cluster_end - first_full, unmap=unmap,
                                discard=True)
            if last_full < end:
                self._write_zero_bytes(last_full, end - last_full)
            return
        if first_full >= last_full:  # within one cluster (or two partial ones)
            head_end = min(end, first_full)
            self._zero_partial(offset, head_end, unmap)
            if head_end < end:
                self._zero_partial(head_end, end, unmap)
            return
        if offset < first_full:
            self._zero_partial(offset, first_full, unmap)
        self._zero_clusters(first_full, last_full_cluster_end - first_full, unmap=unmap,
                            discard=False)
        if last_full < end:
            self._zero_partial(last_full, end, unmap)

    def _zero_partial(self, start: int, stop: int, unmap: bool) -> None:
        """Zero ``[start, stop)`` inside one cluster as QEMU's ``qcow2_co_pwrite_zeroes``
        does: a cluster that is unallocated or already zero, the rest of which reads as zero
        (through the backing chain), becomes a zero cluster whole; any other gets zero
        bytes written (QEMU's fallback)."""
        cs = self.cluster_size
        cstart = start & ~(cs - 1)
        cend = min(cstart + cs, self.hc.header.size)
        ent = self._entry(cstart)
        plain = not ent & OFLAG_COMPRESSED and bool(
            ent & OFLAG_ZERO or not ent & (L2E_OFFSET_MASK | self._dfa))
        if plain and self._zero_through(cstart, start) and self._zero_through(stop, cend):
            self._zero_clusters(cstart, cs, unmap=unmap, discard=False)
            return
        self._write_zero_bytes(start, stop - start)

    def _zero_through(self, start: int, stop: int) -> bool:
        """Whether ``[start, stop)`` reads as zeroes, backing chain included."""
        if start >= stop:
            return True
        return all(e.zero for e in self.block_status(start, stop - start))

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zero = bytes(min(chunk, length))
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            if not self._reads_as_zero(offset, n):
                self.write(offset, zero[:n])
            offset += n

    def _reads_as_zero(self, offset: int, length: int) -> bool:
        """Cheap test: every cluster touched is unallocated (no backing data) or zero."""
        cb = self.cluster_bits
        for c in range(offset >> cb, ((offset + length - 1) >> cb) + 1):
            ent = self._entry(c << cb)
            if ent & OFLAG_COMPRESSED:
                return False
            if ent & OFLAG_ZERO:
                continue
            if ent & (L2E_OFFSET_MASK | self._dfa):
                return False
            if self.backing is not None and (c << cb) < self.backing.size:
                return False
            if self.has_data_file and self.data_file_raw:
                return False
        return True

    def _entry(self, goff: int) -> int:
        cb = self.cluster_bits
        tbl = self._l2_table(goff >> (cb + self.l2_bits), allocate=False)
        if tbl is None:
            return 0
        return int(_unpack_q(tbl, ((goff >> cb) & (self.l2_entries - 1)) * 8)[0])

    def _zero_clusters(self, offset: int, length: int, *, unmap: bool, discard: bool) -> None:
        """Set whole clusters to read as zero (v3 zero flag) or, for discard, drop them."""
        cb = self.cluster_bits
        l2b = self.l2_bits
        l2mask = self.l2_entries - 1
        has_backing = self.backing is not None or bool(self.hc.backing_name)
        v3 = self.hc.header.version >= 3
        goff = offset
        end = offset + length
        while goff < end:
            l1i = goff >> (cb + l2b)
            tbl = self._l2_table(l1i, allocate=False)
            table_end = min(end, (l1i + 1) << (cb + l2b))
            if tbl is None:
                if discard and not has_backing:
                    goff = table_end
                    continue
                tbl = self._l2_table(l1i, allocate=True)
                assert tbl is not None
            elif not self._l1[l1i] & OFLAG_COPIED:
                tbl = self._l2_table(l1i, allocate=True)  # shared: copy it first
                assert tbl is not None
            changed = False
            while goff < table_end:
                idx = (goff >> cb) & l2mask
                ent = _unpack_q(tbl, idx * 8)[0]
                compressed = ent & OFLAG_COMPRESSED
                host = 0 if compressed else ent & L2E_OFFSET_MASK
                release = 0
                if discard:
                    if has_backing or compressed or host or ent & self._dfa:
                        # v2 has no zero flag; it only gets here without a backing file
                        new, release = (OFLAG_ZERO if v3 else 0), ent
                    else:
                        new = ent
                elif compressed or (host and unmap):
                    new, release = OFLAG_ZERO, ent
                else:
                    # QEMU's zero_in_l2_slice: keep any allocation (shared or not), add
                    # the zero flag
                    new = ent | OFLAG_ZERO
                if new != ent:
                    _pack_q(tbl, idx * 8, new)
                    if release:
                        # dirty first: a flush the release triggers must write the table
                        self._l2_dirty.add(self._l2_offset_of(l1i))
                        self._release_entry(release, discard=True)
                    changed = True
                goff += 1 << cb
            if changed:
                self._l2_dirty.add(self._l2_offset_of(l1i))

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters (they read as zeros afterwards); partial clusters are kept."""
        self._check_writable()
        self._check_request(offset, length)
        if self.hc.header.version < 3 and (self.backing is not None or self.hc.backing_name):
            return  # v2 cannot hide backing data without a zero flag
        cs = self.cluster_size
        start = (offset + cs - 1) & ~(cs - 1)
        end = offset + length
        if end == self.hc.header.size:
            end = (end + cs - 1) & ~(cs - 1)
        else:
            end &= ~(cs - 1)
        if start >= end:
            return
        if self.has_data_file and self.data_file_raw:
            # keep the raw file reading as the guest disk: drop the data there too
            data_end = min(end, self.hc.header.size)
            self._unsynced = True
            if not punch_hole(self._data_fd, start, data_end - start):
                self._write_zero_bytes(start, data_end - start)
                return
        self._zero_clusters(start, end - start, unmap=True, discard=True)

    # ------------------------------------------------------------------ flush / resize
    def flush(self) -> None:
        """Metadata written back in the crash-safe order, everything durable. Nothing to do
        (not even an fdatasync) when nothing was written since the last flush, as QEMU."""
        if self.readonly or self._closed:
            return
        if not (self._unsynced or self._l2_dirty or self._l1_dirty or self._rb_dirty
                or self._reftable_dirty or self._pending_frees):
            return
        if self._data_fd != self._fd:
            self._fdatasync(self._data_fd, "fdatasync of the data file")
        # 1. refcount increments (and new refblocks / reftable entries), then data, durable
        self._write_dirty_refblocks()
        self._sync()
        # 2. L2 tables, then the L1 entries pointing at them
        if self._l2_dirty:
            for off in sorted(self._l2_dirty):
                self._pwrite_meta(off, self._l2_cache[off], "active L2 table")
            self._l2_dirty.clear()
            self._sync()
        if self._l1_dirty:
            # only the 512-byte sectors holding changed entries, as QEMU's qcow2_write_l1_entry
            # (a 16 TiB disk has a 256 KiB L1 table; one new L2 table changes 8 bytes of it)
            base = self.hc.header.l1_table_offset
            per = 512 // 8
            sectors = sorted({i // per for i in self._l1_dirty_idx})
            run_start = 0
            for k, sec in enumerate(sectors):
                if k + 1 < len(sectors) and sectors[k + 1] == sec + 1:
                    continue
                a = sectors[run_start] * per
                b = min(len(self._l1), (sec + 1) * per)
                self._pwrite_meta(base + a * 8, struct.pack(f">{b - a}Q", *self._l1[a:b]),
                                  "active L1 table")
                run_start = k + 1
            self._l1_dirty = False
            self._l1_dirty_idx.clear()
            self._sync()
        # 3. decrements for clusters no longer referenced by anything on disk
        if self._pending_frees:
            self._process_frees()
        self._unsynced = False

    def _process_frees(self) -> None:
        """Apply the queued decrements, punch what a guest discard freed, write them back.

        A cluster freed by a discard is punched when its refcount reaches 0 (QEMU's
        update_refcount with discard passthrough), here and nowhere else because:
        only now is it known to reach 0 (a cluster still shared keeps its data); the
        entries that stopped naming it are durable (flush, steps 1-2), so no crash state
        reads a hole through old metadata; and nothing allocates between the decrement and
        the punch, so the punch never lands on data written into a reused cluster. A crash
        after the punch, before the refcount block is written, leaves a leaked hole.
        """
        frees, self._pending_frees = self._pending_frees, []
        punch, self._pending_punch = self._pending_punch, set()
        self._pending_count.clear()
        holes: list[int] = []
        for idx in frees:
            if self._update_refcount(idx, -1) == 0 and idx in punch:
                holes.append(idx)
        self._punch_clusters(holes)
        self._write_dirty_refblocks()
        self._sync()

    def _punch_clusters(self, clusters: list[int]) -> None:
        """Punch these (freed) host clusters out of the file, a run of neighbours at a time.
        Without punch support (tmpfs of old kernels, other systems) the space stays, as in
        QEMU where discard is advisory."""
        cb = self.cluster_bits
        holes = sorted(clusters)
        i = 0
        while i < len(holes):
            j = i + 1
            while j < len(holes) and holes[j] == holes[j - 1] + 1:
                j += 1
            self._unsynced = True
            punch_hole(self._fd, holes[i] << cb, (j - i) << cb)
            i = j

    def resize(self, new_size: int, *,
               extensions: dict[int, bytes | None] | None = None) -> None:
        """Grow the virtual disk (shrinking is refused: it would drop guest data).

        ``extensions`` are switched in the same header write as the new size (the bitmap
        store's directory for the new size: a crash leaves the old size with the old bitmaps
        or the new with the new). Everything they point at must be written already: it is
        made durable before the switch. Raises ``UsageError``, ``UnsupportedFeatureError``,
        ``ImageIOError``.
        """
        self._check_writable()
        h = self.hc.header
        if new_size % 512:
            raise UsageError("Image size must be a multiple of 512 bytes")
        if h.nb_snapshots and h.version < 3:
            raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots")
        if new_size < h.size:
            raise UnsupportedFeatureError("shrinking a qcow2 image is not supported")
        need = l1_entries_for(new_size, self.cluster_bits, self.extended_l2)
        if need * 8 > MAX_L1_BYTES:  # QEMU's limit, before a table that size is built
            raise ImageIOError("Failed to grow the L1 table: File too large", errno=errno.EFBIG)
        if need > len(self._l1) or (need and not h.l1_table_offset):
            cs = self.cluster_size
            new_clusters = (need * 8 + cs - 1) // cs
            old_off, old_len = h.l1_table_offset, len(self._l1)
            old_clusters = (old_len * 8 + cs - 1) // cs
            self._growing_to = new_size  # the new L1 and its refblocks are sane allocations
            try:
                new_off = self._alloc_clusters(new_clusters)
            finally:
                self._growing_to = 0
            for i in range(new_clusters):
                self._meta[(new_off >> self.cluster_bits) + i] = "active L1 table"
            l1 = self._l1 + [0] * (need - old_len)
            self._pwrite_meta(new_off, struct.pack(f">{need}Q", *l1), "active L1 table")
            self._l1 = l1
            self._l1_dirty = False
            self._l1_dirty_idx.clear()
            self.flush()  # refcounts (incl. the new L1) and tables durable first
            for i in range(old_clusters):
                self._meta.pop((old_off >> self.cluster_bits) + i, None)
            # allocation may have moved the refcount table: start from the current header
            hc = self._with_extensions(extensions)
            # durable at the flush that ends the resize: its first step syncs before it frees
            # what the switch released (the old L1, the old bitmap tables), so either
            # header is sound until then; the test of removed syncs found this one redundant
            self._set_header(hc.header.replace(l1_table_offset=new_off, l1_size=need,
                                               size=new_size), hc, sync=False)
            for i in range(old_clusters if old_off else 0):
                self._pending_frees.append((old_off >> self.cluster_bits) + i)
        else:
            self.flush()
            hc = self._with_extensions(extensions)
            self._set_header(hc.header.replace(size=new_size), hc, sync=False)  # as above
        if self.has_data_file:
            try:
                if os.fstat(self._data_fd).st_size < new_size:
                    self._unsynced = True
                    os.ftruncate(self._data_fd, new_size)
            except OSError as exc:
                raise _io_error("resizing the data file", exc) from exc
            if self.data_file_raw:
                self._preallocate_raw_mapping(h.size, new_size)
        old = h.size
        if self.backing is not None and self.backing.size > old:
            # QEMU zero-fills the grown area so a longer backing file cannot show through
            self.write_zeroes(old, min(new_size, self.backing.size) - old)
        else:
            tail_end = min(new_size, (old + self._cmask) & ~self._cmask)
            if tail_end > old and not self._reads_as_zero(old, tail_end - old):
                self.write(old, bytes(tail_end - old))
        self.flush()

    def _with_extensions(self, extensions: dict[int, bytes | None] | None) -> HeaderCluster:
        hc = self.hc
        for ext_type, data in (extensions or {}).items():
            hc = hc.with_extension(ext_type, data)
        return hc

    def _preallocate_raw_mapping(self, start: int, end: int) -> None:
        """With data_file_raw every cluster maps 1:1 onto the data file (QEMU preallocates)."""
        cb = self.cluster_bits
        l2mask = self.l2_entries - 1
        goff = start & ~(self.cluster_size - 1)
        while goff < end:
            l1i = goff >> (cb + self.l2_bits)
            tbl = self._l2_table(l1i, allocate=True)
            assert tbl is not None
            table_end = min(end, (l1i + 1) << (cb + self.l2_bits))
            first = (goff >> cb) & l2mask
            n = ((table_end - goff) + self.cluster_size - 1) >> cb
            old = struct.unpack_from(f">{n}Q", tbl, first * 8)
            step = 1 << cb
            new = [e or (goff + i * step) | OFLAG_COPIED for i, e in enumerate(old)]
            struct.pack_into(f">{n}Q", tbl, first * 8, *new)
            goff += n << cb
            self._l2_dirty.add(self._l2_offset_of(l1i))

    # ------------------------------------------------------------------ block status
    def block_status(self, offset: int, length: int) -> Iterator[MapExtent]:
        """Allocation of ``[offset, offset+length)`` in runs, merged like qemu-img map."""
        end = min(offset + length, self.size)
        pending: MapExtent | None = None
        for ext in self._raw_status(offset, end):
            if pending is None:
                pending = ext
                continue
            if _mergeable(pending, ext):
                pending = replace(pending, length=pending.length + ext.length)
            else:
                yield pending
                pending = ext
        if pending is not None:
            yield pending

    @property
    def data_fd(self) -> int:
        """The descriptor of the file holding guest data (the image's, or its external data
        file's): where ``block_status``'s host offsets point, for zero-copy sends."""
        return self._data_fd

    def _raw_status(self, offset: int, end: int) -> Iterator[MapExtent]:
        """Runs of clusters with the same state, one L2 table at a time: a table that is not
        allocated is one run, an allocated one is unpacked at once and walked for run breaks
        (state change, or host offsets that stop being contiguous)."""
        cb = self.cluster_bits
        span_bits = cb + self.l2_bits
        fname = self._data_file_path or self.path
        dfa = self._dfa
        goff = offset
        while goff < end:
            span_end = min(end, ((goff >> span_bits) + 1) << span_bits)
            tbl = self._l2_table(goff >> span_bits, allocate=False)
            if tbl is None:
                yield from self._unallocated_status(goff, span_end - goff)
                goff = span_end
                continue
            first = (goff >> cb) & (self.l2_entries - 1)
            count = ((span_end - 1) >> cb) - (goff >> cb) + 1
            ents = struct.unpack_from(f">{count}Q", tbl, first * 8)
            run_kind, run_host, run_start, run_i = -1, 0, goff, 0
            base_ci = goff >> cb
            for i, ent in enumerate(ents):
                host = ent & L2E_OFFSET_MASK
                if ent & OFLAG_COMPRESSED:
                    kind = 3
                elif ent & OFLAG_ZERO:
                    kind = 4 if host else 2
                elif host or ent & dfa:
                    kind = 1
                else:
                    kind = 0
                if kind != run_kind or (kind in (1, 4)
                                        and host != run_host + ((i - run_i) << cb)):
                    cstart = goff if i == 0 else (base_ci + i) << cb
                    if run_kind >= 0:
                        yield from self._run_extent(run_kind, run_start, cstart - run_start,
                                                    run_host, fname)
                    run_kind, run_host, run_start, run_i = kind, host, cstart, i
            yield from self._run_extent(run_kind, run_start, span_end - run_start, run_host,
                                        fname)
            goff = span_end

    def _run_extent(self, kind: int, start: int, n: int, host: int,
                    fname: str) -> Iterator[MapExtent]:
        """One run from _raw_status; ``host`` is the run's first cluster's host offset."""
        within = start & (self.cluster_size - 1)
        if kind == 3:
            yield MapExtent(start, n, 0, True, False, True, None, self.path, compressed=True)
        elif kind == 2:
            yield MapExtent(start, n, 0, True, True, False)
        elif kind == 4:
            yield MapExtent(start, n, 0, True, True, False, host + within, fname)
        elif kind == 1:
            yield MapExtent(start, n, 0, True, False, True, host + within, fname)
        else:
            yield from self._unallocated_status(start, n)

    def _unallocated_status(self, goff: int, n: int) -> Iterator[MapExtent]:
        if self.backing is not None and goff < self.backing.size:
            m = min(n, self.backing.size - goff)
            for b in self.backing.block_status(goff, m):
                yield replace(b, depth=b.depth + 1)
            if m < n:
                yield MapExtent(goff + m, n - m, 1, False, True, False)
        else:
            yield MapExtent(goff, n, 1 if self.backing is not None else 0, False, True, False)

    # ------------------------------------------------------------------ snapshots
    @property
    def snapshots(self) -> list[SnapshotTableEntry]:
        """The internal snapshots, in table order (a copy)."""
        return list(self._snapshots)

    def snapshot_create(self, name: str, **fields: int) -> SnapshotTableEntry:
        """Take an internal snapshot; see ``dirtybits.qcow2.snapshots.create``."""
        from dirtybits.qcow2 import snapshots

        return snapshots.create(self, name, **fields)

    def snapshot_delete(self, index: int) -> None:
        """Delete snapshot ``index``; see ``dirtybits.qcow2.snapshots.delete``."""
        from dirtybits.qcow2 import snapshots

        snapshots.delete(self, index)

    def snapshot_apply(self, index: int) -> None:
        """Revert to snapshot ``index``; see ``dirtybits.qcow2.snapshots.apply``."""
        from dirtybits.qcow2 import snapshots

        snapshots.apply(self, index)

    def snapshot_load(self, index: int) -> None:
        """Show snapshot ``index`` read-only; see ``dirtybits.qcow2.snapshots.load``."""
        from dirtybits.qcow2 import snapshots

        snapshots.load(self, index)

    # ------------------------------------------------------------------ close
    def locks(self) -> list[FileLock]:
        """The lock descriptions held on the image and its data file (for inactivation)."""
        data_lock = self.data_file.lock if self.data_file is not None else None
        return [lk for lk in (self._lock, data_lock) if lk is not None]

    def close(self) -> None:
        if self._closed:
            return
        log.debug("%s: closing (%s)", self.path, "read-only" if self.readonly else "read-write")
        try:
            if not self.readonly:
                self.flush()
        finally:
            self._closed = True
            for dfd in self._direct.values():
                os.close(dfd)
            self._direct.clear()
            if self._abuf is not None:
                self._abuf.close()
            try:
                self._close_children()
            finally:
                if self._lock is not None:
                    self._lock.release()
                os.close(self._fd)

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _zstd_cluster(zstandard: Any, raw: bytes, cs: int, goff: int) -> bytes:
    """At most ``cs`` bytes out of zstd frames, as QEMU's qcow2_zstd_decompress (it stops
    once the cluster is full, whatever the frame claims): a damaged frame is
    ``CorruptImageError``, and a frame that would expand without bound is not expanded."""
    parts: list[bytes] = []
    got = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as r:
            while got < cs:
                b = r.read(cs - got)
                if not b:
                    break
                parts.append(b)
                got += len(b)
    except zstandard.ZstdError as exc:
        raise CorruptImageError(
            f"compressed cluster for guest offset {goff:#x} is damaged: {exc}") from exc
    return b"".join(parts)


def _mergeable(a: MapExtent, b: MapExtent) -> bool:
    if (a.depth, a.present, a.zero, a.data, a.compressed, a.filename) != \
            (b.depth, b.present, b.zero, b.data, b.compressed, b.filename):
        return False
    if a.start + a.length != b.start:
        return False
    if a.offset is None or b.offset is None:
        return a.offset is None and b.offset is None
    return a.offset + a.length == b.offset
