"""A bitmap container: one qcow2 file holding persistent bitmaps for many raw drives.

QEMU's bitmaps always describe the image that stores them, so a container is a qcow2 image
whose guest area is never written: its virtual size is the largest drive it can serve (the
``max size``, sparse: no data clusters, one L1 table), and every bitmap in it has that size.
A drive's bitmap tracks the drive's first ``size`` bytes; the bits past its end stay clean
(``DriveNode`` refuses requests past the drive's end before anything is marked).

The binding, and why it survives QEMU's tools:

* **Bitmap names** are ``DRIVEID/NAME``. The name travels with the directory entry through
  everything QEMU does (``qemu-img check -r all``, ``qemu-img bitmap``, a qemu-nbd export,
  QEMU's store at close), so no second record can fall out of step with the directory.
  Stored names are unique per container (qcow2 requires it); adding a name that exists is
  refused up front with the drive it belongs to.
* **Drive records** live in a private header extension, ``EXT_DRIVES`` (0x44425244, "DBRD";
  QEMU's are 0xe2792aca, 0x6803f857, 0x23852875, 0x0537be77, 0x44415441, dirtybits'
  write-intent map is 0x44425749). QEMU keeps unknown extensions verbatim whenever it
  rewrites the header, and no autoclear bit guards them (QEMU clears unknown autoclear bits on
  a read-write open): the records are facts about the drives, not about the bitmaps' data,
  so a foreign writer cannot make them stale. Nothing lives outside cluster 0, so
  ``qemu-img check`` sees no cluster it cannot account for.
* **Identity.** A record keeps the drive's size, ``st_dev``/``st_ino``, the inode's
  generation number (``FS_IOC_GETVERSION``, where the filesystem has one: a new file that
  reuses a deleted file's inode number gets a new generation, which a bare inode check
  misses) and a random UUID. The UUID is also written to the drive file's extended attribute
  ``user.dirtybits.drive`` (never into its data) when the filesystem allows; then a drive
  must carry that UUID *and* the recorded inode number (a ``cp -a`` copy carries the UUID
  but not the inode; ``st_dev`` is not compared because device numbers change across
  remounts and reboots). Without the attribute, ``st_dev`` and ``st_ino`` must both match.
  The generation, when both sides know it, must match too. A wrong file or a changed size is
  refused at load with the reason; ``rebind`` accepts a replaced file on the user's word
  (dirtying any grown area, dropping bits past a shrunk end). Renaming or moving the drive
  within its filesystem keeps the binding (the drive is found by identity, then by path).

Extension layout (all big-endian, like qcow2)::

    0   u32  version (1)
    4   u32  crc32 of bytes 8..end
    8   16   container UUID
    24  u16  number of drive records
    26  u16  reserved (0)
    28       records: u16 record length (all of it), u8 id length, u8 flags (bit 0: the UUID
             is in the drive's xattr), u16 path length, u16 reserved, u64 size, u64 st_dev,
             u64 st_ino, 16-byte drive UUID, id bytes, path bytes (UTF-8). Readers skip
             bytes past the fields they know (record length), so records can grow.

The header cluster is rewritten in one write; keeping all of it within ``HEADER_LIMIT``
(one page) keeps that write atomic even for a process killed mid-write. Relative drive paths
are stored relative to the container's directory, as qcow2 stores its file names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
import uuid
import zlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from dirtybits.block.node import BlockNode
from dirtybits.block.qcow2_bitmaps import default_granularity
from dirtybits.errors import DirtybitsError, ImageError, UsageError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
    from dirtybits.block.checkpoint import CheckpointPolicy
    from dirtybits.block.driver import Buffer, ImageDriver
    from dirtybits.block.owner import BlockOwner
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore, StoredBitmap
    from dirtybits.block.registry import BitmapRegistry
    from dirtybits.qcow2.image import Qcow2Image

EXT_DRIVES = 0x44425244  # "DBRD"
TABLE_VERSION = 1
XATTR = "user.dirtybits.drive"
DEFAULT_MAX_SIZE = 4 << 40  # 4 TiB: 8 MiB per 64 KiB-granularity bitmap in memory
HEADER_LIMIT = 4096  # cluster 0's used bytes: one page, so a header write is all-or-nothing
MAX_ID_LEN = 64
FLAG_XATTR = 1
FLAG_GENERATION = 2

_HEAD = struct.Struct(">II16sHH")
_REC = struct.Struct(">HBBHHQQQ16sI")
FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long): the inode's generation number


class ContainerError(DirtybitsError):
    """A container operation was refused."""


class NotAContainerError(ContainerError):
    """The qcow2 image has no drive table."""


class DriveMismatchError(ContainerError):
    """The file given is not the drive a record describes (other file, other size)."""


# ---------------------------------------------------------------------- records
@dataclass(frozen=True)
class DriveRecord:
    id: str
    path: str  # as stored: absolute, or relative to the container's directory
    size: int
    dev: int
    ino: int
    uuid: uuid.UUID
    xattr: bool  # the UUID is also in the drive's user.dirtybits.drive attribute
    generation: int | None = None  # the inode's generation number, where the fs has one

    def resolve(self, container_path: str) -> str:
        if os.path.isabs(self.path):
            return self.path
        return os.path.join(os.path.dirname(os.path.abspath(container_path)), self.path)

    def pack(self) -> bytes:
        rid, path = self.id.encode(), self.path.encode("utf-8", errors="surrogateescape")
        n = _REC.size + len(rid) + len(path)
        flags = (FLAG_XATTR if self.xattr else 0) | (
            FLAG_GENERATION if self.generation is not None else 0)
        return _REC.pack(n, len(rid), flags, len(path), 0, self.size, self.dev, self.ino,
                         self.uuid.bytes, self.generation or 0) + rid + path


@dataclass(frozen=True)
class DriveTable:
    container_uuid: uuid.UUID
    drives: tuple[DriveRecord, ...] = ()

    def pack(self) -> bytes:
        body = _HEAD.pack(TABLE_VERSION, 0, self.container_uuid.bytes, len(self.drives), 0)[8:]
        body += b"".join(d.pack() for d in self.drives)
        return struct.pack(">II", TABLE_VERSION, zlib.crc32(body)) + body

    @classmethod
    def unpack(cls, data: bytes) -> DriveTable:
        def bad(msg: str) -> ContainerError:
            return ContainerError(f"drive table (header extension {EXT_DRIVES:#x}) is "
                                  f"damaged: {msg}")

        if len(data) < _HEAD.size:
            raise bad("too short")
        version, crc, cuuid, count, _ = _HEAD.unpack_from(data)
        if version != TABLE_VERSION:
            raise ContainerError(f"drive table version {version} is not supported")
        if zlib.crc32(data[8:]) != crc:
            raise bad("checksum mismatch")
        pos, drives = _HEAD.size, []
        for _ in range(count):
            if pos + _REC.size > len(data):
                raise bad("record runs past the end")
            (n, id_len, flags, path_len, _r, size, dev, ino, duuid,
             gen) = _REC.unpack_from(data, pos)
            if n < _REC.size + id_len + path_len or pos + n > len(data):
                raise bad("bad record length")
            p = pos + _REC.size
            rid = data[p:p + id_len].decode("utf-8", errors="replace")
            path = data[p + id_len:p + id_len + path_len].decode("utf-8",
                                                                errors="surrogateescape")
            drives.append(DriveRecord(rid, path, size, dev, ino, uuid.UUID(bytes=duuid),
                                      bool(flags & FLAG_XATTR),
                                      gen if flags & FLAG_GENERATION else None))
            pos += n
        return cls(uuid.UUID(bytes=cuuid), tuple(drives))


def bitmap_name(drive_id: str, name: str) -> str:
    """The qcow2 name of a drive's bitmap."""
    return f"{drive_id}/{name}"


def split_name(stored: str) -> tuple[str, str] | None:
    """``(drive id, name)`` of a stored bitmap name, None when it names no drive."""
    drive_id, sep, name = stored.partition("/")
    return (drive_id, name) if sep and drive_id and name else None


def check_drive_id(drive_id: str) -> None:
    if not drive_id or "/" in drive_id or len(drive_id.encode()) > MAX_ID_LEN or any(
            not c.isprintable() or c.isspace() for c in drive_id):
        raise UsageError(f"invalid drive id {drive_id!r}: 1-{MAX_ID_LEN} bytes, printable, "
                         "no spaces, no '/'")


# ---------------------------------------------------------------------- identity
@dataclass(frozen=True)
class FileIdentity:
    """What can be learned about a drive file without reading its data."""

    path: str
    size: int
    dev: int
    ino: int
    uuid: uuid.UUID | None  # from the xattr
    generation: int | None = None

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ContainerError(f"Could not open '{path}': {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ContainerError(f"'{path}' is not a regular file (only raw image files "
                                 "can be attached)")
        return cls(path, st.st_size, st.st_dev, st.st_ino, read_xattr_uuid(path),
                   read_generation(path))


def read_generation(path: str) -> int | None:
    """The inode generation (FS_IOC_GETVERSION: ext4, xfs, btrfs): a new file that reuses a
    deleted file's inode number gets a new one."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(struct.unpack_from("=I", buf)[0])  # the kernel stores an int


def read_xattr_uuid(path: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(os.getxattr(path, XATTR).decode("ascii"))
    except (OSError, ValueError, AttributeError):
        return None


def identity_problem(rec: DriveRecord, ident: FileIdentity) -> str | None:
    """Why ``ident`` is not the drive ``rec`` describes, or None when it is."""
    if rec.xattr:
        if ident.uuid is None:
            return (f"it carries no drive UUID (extended attribute {XATTR} missing: "
                    "another file, or a copy made without attributes)")
        if ident.uuid != rec.uuid:
            return f"it carries drive UUID {ident.uuid}, not {rec.uuid}"
        if ident.ino != rec.ino:
            return (f"it is inode {ident.ino}, not {rec.ino}: a copy of the drive, not "
                    "the drive")
    elif (ident.dev, ident.ino) != (rec.dev, rec.ino):
        return (f"it is inode {ident.ino} on device {ident.dev:#x}, not inode {rec.ino} on "
                f"device {rec.dev:#x}")
    if rec.generation is not None and ident.generation is not None \
            and ident.generation != rec.generation:
        return (f"it is a new file reusing the drive's inode number {rec.ino} (generation "
                f"{ident.generation}, not {rec.generation})")
    if ident.size != rec.size:
        return f"its size is {ident.size} bytes, the bitmaps are for {rec.size} bytes"
    return None


# ---------------------------------------------------------------------- the container
@dataclass
class BitmapInfo:
    """One of a drive's bitmaps, as ``container list`` shows it."""

    name: str  # without the drive prefix
    stored_name: str
    granularity: int
    enabled: bool
    state: str  # "consistent", "in_use" (inconsistent) or "damaged"
    dirty_bytes: int | None  # None when not readable
    problems: list[str] = field(default_factory=list)


class Container:
    """An open container: its qcow2 image, bitmap store and drive table."""

    def __init__(self, path: str, img: Qcow2Image, store: Qcow2BitmapStore,
                 table: DriveTable):
        self.path = path
        self.img = img
        self.store = store
        self.table = table
        self._closed = False
        self.nodes: dict[str, DriveNode] = {}  # open drives by id: many at once (one store)
        self._users = 0  # open drives sharing this container in the process (open_drive)

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: str, max_size: int = DEFAULT_MAX_SIZE, *,
               cluster_size: int = 65536) -> None:
        """A new, empty container (refuses to overwrite a file).

        Raises ``ContainerError`` when ``path`` exists, ``UsageError`` for a size QEMU's L1
        limit refuses (``Qcow2Image.create``'s message), I/O errors; a failure leaves no file.
        """
        from dirtybits.qcow2.image import Qcow2Image

        if os.path.lexists(path):
            raise ContainerError(f"'{path}' already exists")
        if max_size <= 0:
            raise UsageError("the maximum drive size must be positive")
        Qcow2Image.create(path, (max_size + 511) & ~511, cluster_size=cluster_size)
        try:
            img = Qcow2Image.open(path, keep_bitmaps=True)  # new: no children
            try:
                img.update_header(extensions={EXT_DRIVES: DriveTable(uuid.uuid4()).pack()})
            finally:
                img.close()
        except BaseException:
            # the name was free before: whatever is there is this half-made container
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    @classmethod
    def open(cls, path: str, *, readonly: bool = False) -> Container:
        from dirtybits.block.children import open_qcow2
        from dirtybits.block.open import probe_format
        from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore

        if probe_format(path) != "qcow2":
            raise NotAContainerError(f"'{path}' is not a qcow2 image, so not a container")
        img = open_qcow2(path, readonly=readonly, keep_bitmaps=not readonly,
                         open_backing=False)
        try:
            ext = img.hc.extension(EXT_DRIVES)
            if ext is None:
                raise NotAContainerError(
                    f"'{path}' is not a bitmap container (no drive table); create one with "
                    "'dirtybits container create'")
            if img.has_data_file or img.hc.backing_file:
                raise ContainerError(f"'{path}': a container has no data file or backing file")
            table = DriveTable.unpack(ext.data)
            store = Qcow2BitmapStore(img)
        except BaseException:
            img.close()
            raise
        return cls(path, img, store, table)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.img.close()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ drives
    @property
    def max_size(self) -> int:
        return self.img.size

    @property
    def drives(self) -> tuple[DriveRecord, ...]:
        return self.table.drives

    def drive(self, drive_id: str) -> DriveRecord:
        for rec in self.table.drives:
            if rec.id == drive_id:
                return rec
        known = ", ".join(d.id for d in self.table.drives) or "none"
        raise ContainerError(f"no drive '{drive_id}' in {self.path} (drives: {known})")

    def _write_table(self, table: DriveTable) -> None:
        from dirtybits.format.qcow2.header import EXT_BITMAPS

        data = table.pack()
        hc = self.img.hc.with_extension(EXT_DRIVES, data)
        if hc.extension(EXT_BITMAPS) is None:  # leave room for the first bitmap's extension
            hc = hc.with_extension(EXT_BITMAPS, bytes(24))
        used = len(hc.pack())
        if used > HEADER_LIMIT:
            raise ContainerError(
                f"the drive table does not fit: the header would use {used} of "
                f"{HEADER_LIMIT} bytes ({len(table.drives)} drives); use shorter ids or "
                "paths, or a second container")
        self.img.update_header(extensions={EXT_DRIVES: data})
        self.table = table

    def _stored_path(self, raw_path: str) -> str:
        if os.path.isabs(raw_path):
            return raw_path
        base = os.path.dirname(os.path.abspath(self.path))
        return os.path.relpath(os.path.abspath(raw_path), base)

    def attach(self, raw_path: str, drive_id: str | None = None) -> DriveRecord:
        """Record a raw drive; grows the container while it holds no bitmaps."""
        from dirtybits.block.open import probe_format

        ident = FileIdentity.of(raw_path)
        if probe_format(raw_path) != "raw":
            raise ContainerError(f"'{raw_path}' is a qcow2 image: it keeps its own bitmaps "
                                 "('dirtybits bitmap'); only raw drives are attached")
        if drive_id is None:
            drive_id = self._free_id(raw_path)
        check_drive_id(drive_id)
        for rec in self.table.drives:
            if rec.id == drive_id:
                raise ContainerError(f"drive id '{drive_id}' is already attached "
                                     f"({rec.path})")
            if identity_problem(rec, replace(ident, size=rec.size)) is None:
                raise ContainerError(f"'{raw_path}' is already attached as '{rec.id}'")
        orphans = [sb.name for sb in self.store.bitmaps
                   if (split_name(sb.name) or ("", ""))[0] == drive_id]
        if orphans:
            raise ContainerError(
                f"bitmaps {', '.join(orphans)} already carry the id '{drive_id}' but describe "
                "no attached drive: remove them first or choose another --id")
        self._fit(ident.size)
        duuid, in_xattr = self._tag(raw_path, ident)
        rec = DriveRecord(drive_id, self._stored_path(raw_path), ident.size, ident.dev,
                          ident.ino, duuid, in_xattr, ident.generation)
        self._write_table(replace(self.table, drives=(*self.table.drives, rec)))
        return rec

    def _free_id(self, raw_path: str) -> str:
        base = os.path.splitext(os.path.basename(raw_path))[0] or "drive"
        base = "".join(c if c.isprintable() and not c.isspace() and c != "/" else "_"
                       for c in base)[:MAX_ID_LEN - 4] or "drive"
        taken = {d.id for d in self.table.drives}
        taken |= {p[0] for sb in self.store.bitmaps if (p := split_name(sb.name))}
        cand, n = base, 2
        while cand in taken:
            cand, n = f"{base}-{n}", n + 1
        return cand

    def _fit(self, size: int) -> None:
        if size <= self.max_size:
            return
        if self.store.bitmaps:
            raise ContainerError(
                f"the drive ({size} bytes) is larger than the container's maximum drive size "
                f"({self.max_size} bytes), which cannot grow while it holds bitmaps (QEMU "
                "refuses to resize images with bitmaps); create a container with a larger "
                "--max-size")
        self.img.resize((size + 511) & ~511)

    @staticmethod
    def _tag(raw_path: str, ident: FileIdentity) -> tuple[uuid.UUID, bool]:
        """The drive's UUID, in its xattr when the filesystem keeps one."""
        if ident.uuid is not None:
            return ident.uuid, True
        duuid = uuid.uuid4()
        try:
            os.setxattr(raw_path, XATTR, str(duuid).encode("ascii"))
        except (OSError, AttributeError):
            return duuid, False
        return duuid, read_xattr_uuid(raw_path) == duuid

    def detach(self, drive_id: str, *, force: bool = False) -> list[str]:
        """Forget a drive; with ``force`` its bitmaps are removed first. Returns them."""
        rec = self.drive(drive_id)
        names = [sb.name for sb in self.bitmaps_of(drive_id)]
        if names and not force:
            raise ContainerError(
                f"drive '{drive_id}' has bitmaps "
                f"({', '.join(n.partition('/')[2] for n in names)}); remove them or "
                "use --force")
        reg = self.registry(drive_id) if names else None
        for name in names:  # bitmaps first: a crash leaves a drive without them, never
            assert reg is not None  # bitmaps without a drive
            reg.remove(name.partition("/")[2])
        self._write_table(replace(self.table, drives=tuple(
            d for d in self.table.drives if d is not rec)))
        return names

    def rebind(self, drive_id: str, raw_path: str | None = None) -> DriveRecord:
        """Accept the file now at ``raw_path`` (default: the recorded path) as the drive.

        The user vouches that it holds the drive's data. A grown drive gets its new area
        marked dirty in every bitmap (a backup has not seen it); a shrunk one loses the bits
        past its new end.
        """
        rec = self.drive(drive_id)
        path = raw_path if raw_path is not None else rec.resolve(self.path)
        ident = FileIdentity.of(path)
        for other in self.table.drives:
            if other is not rec and identity_problem(other, replace(ident, size=other.size)) \
                    is None:
                raise ContainerError(f"'{path}' is already attached as '{other.id}'")
        if ident.size != rec.size:
            self._fit(ident.size)  # grows an empty container, else refuses a larger drive
            for sb in self.bitmaps_of(drive_id):
                if not self.store.is_usable(sb):
                    continue
                bm = self.store.load(sb.name)
                if ident.size > rec.size:
                    bm.set(rec.size, ident.size - rec.size)
                else:
                    bm.reset(ident.size, bm.size - ident.size)
                self.store.store(sb.name, bm)
        duuid, in_xattr = self._tag(path, ident)
        new = replace(rec, path=self._stored_path(path), size=ident.size, dev=ident.dev,
                      ino=ident.ino, uuid=duuid, xattr=in_xattr, generation=ident.generation)
        self._write_table(replace(self.table, drives=tuple(
            new if d is rec else d for d in self.table.drives)))
        return new

    def verify(self, drive_id: str, raw_path: str | None = None) -> str:
        """The drive's path, checked to be the recorded file at the recorded size."""
        rec = self.drive(drive_id)
        path = raw_path if raw_path is not None else rec.resolve(self.path)
        try:
            ident = FileIdentity.of(path)
        except ContainerError as exc:
            raise DriveMismatchError(f"drive '{drive_id}': {exc}") from None
        problem = identity_problem(rec, ident)
        if problem is not None:
            raise DriveMismatchError(
                f"'{path}' is not drive '{drive_id}' of {self.path}: {problem} (if it holds "
                f"the drive's data, 'dirtybits container rebind {self.path} {drive_id}' "
                "accepts it)")
        return path

    def drive_status(self, drive_id: str) -> str:
        """"ok", or why the drive cannot be used now."""
        try:
            self.verify(drive_id)
        except ContainerError as exc:
            return str(exc)
        return "ok"

    def find_drive(self, raw_path: str) -> DriveRecord:
        """The record of the drive file at ``raw_path``, identity and size checked."""
        ident = FileIdentity.of(raw_path)
        real = os.path.realpath(raw_path)
        by_identity = [r for r in self.table.drives
                       if identity_problem(r, replace(ident, size=r.size)) is None]
        by_uuid = [r for r in self.table.drives if r.xattr and r.uuid == ident.uuid]
        by_path = [r for r in self.table.drives
                   if os.path.realpath(r.resolve(self.path)) == real]
        for rec in by_identity or by_uuid or by_path:
            self.verify(rec.id, raw_path)  # raises with the reason
            return rec
        attached = ", ".join(f"{r.id}={r.path}" for r in self.table.drives) or "none"
        raise DriveMismatchError(
            f"'{raw_path}' is not attached to {self.path} (drives: {attached})")

    # ------------------------------------------------------------------ bitmaps
    def bitmaps_of(self, drive_id: str) -> list[StoredBitmap]:
        return [sb for sb in self.store.bitmaps
                if (split_name(sb.name) or ("", ""))[0] == drive_id]

    def unbound_bitmaps(self) -> list[str]:
        """Bitmaps whose name names no attached drive (added by another tool)."""
        ids = {d.id for d in self.table.drives}
        return [sb.name for sb in self.store.bitmaps
                if (split_name(sb.name) or ("", ""))[0] not in ids]

    def registry(self, drive_id: str) -> BitmapRegistry:
        """The bitmap registry of a drive: its open node's, or one over the container alone
        (every bitmap operation goes through a registry, never to the store directly)."""
        node = self.nodes.get(drive_id)
        if node is not None:
            return node.bitmaps
        from dirtybits.block.registry import BitmapRegistry, StoreView

        rec = self.drive(drive_id)
        return BitmapRegistry(drive_id, rec.size, StoreView(self.store, bitmap_name(drive_id, "")),
                              readonly=self.img.readonly, cluster_size=self.img.cluster_size)

    def add_bitmap(self, drive_id: str, name: str, granularity: int | None = None, *,
                   disabled: bool = False) -> str:
        self.verify(drive_id)
        if not name:
            raise ContainerError("Bitmap name cannot be empty")
        full = bitmap_name(drive_id, name)
        if self.store.find(full) is not None:
            raise ContainerError(
                f"Bitmap '{name}' already exists for drive '{drive_id}' in {self.path} "
                f"(stored as '{full}'; names are unique per container)")
        gran = granularity or default_granularity(self.img.cluster_size)
        try:
            self.store.check_new(full, gran)  # the store's own words, without a node prefix
            self.registry(drive_id).add(name, gran, persistent=True, disabled=disabled)
        except DirtybitsError as exc:
            raise ContainerError(str(exc)) from exc
        return full

    def _stored(self, drive_id: str, name: str) -> str:
        self.drive(drive_id)
        full = bitmap_name(drive_id, name)
        if self.store.find(full) is None:
            raise ContainerError(f"drive '{drive_id}' has no bitmap '{name}'")
        return full

    def remove_bitmap(self, drive_id: str, name: str) -> list[str]:
        """Remove a drive's bitmap; returns what it left allocated (``Qcow2BitmapStore.remove``)."""
        self._stored(drive_id, name)
        return self.registry(drive_id).remove(name)

    def clear_bitmap(self, drive_id: str, name: str) -> None:
        self._stored(drive_id, name)
        self.verify(drive_id)
        self.registry(drive_id).clear(name)

    def set_bitmap_enabled(self, drive_id: str, name: str, enabled: bool) -> None:
        self._stored(drive_id, name)
        reg = self.registry(drive_id)
        if enabled:
            reg.enable(name)
        else:
            reg.disable(name)

    def load_bitmap(self, drive_id: str, name: str, *, verify: bool = True) -> DirtyBitmap:
        """The bitmap's bits over the drive's size (the drive is checked first)."""
        self._stored(drive_id, name)
        if verify:
            self.verify(drive_id)
        return self.registry(drive_id).bits(name)

    def bitmap_infos(self, drive_id: str) -> list[BitmapInfo]:
        reg = self.registry(drive_id)
        out = []
        for sb in self.bitmaps_of(drive_id):
            local = sb.name.partition("/")[2]
            state = "damaged" if sb.problems else "in_use" if sb.in_use and \
                sb.name not in self.store.ours else "consistent"
            dirty = reg.count_bytes(local) if state == "consistent" else None
            out.append(BitmapInfo(local, sb.name, sb.entry.granularity, sb.entry.auto, state,
                                  dirty, list(sb.problems)))
        return out

    # ------------------------------------------------------------------ tracking
    def open_drive(self, raw_path: str, *, readonly: bool = False,
                   checkpoint: CheckpointPolicy | None = None, track: bool = True,
                   owns_container: bool = False, cache: str = "writeback",
                   owner: BlockOwner | None = None) -> DriveNode:
        """A node writing ``raw_path`` and recording into its drive's enabled bitmaps.

        Many drives may be open at once: their nodes share this container's bitmap store
        and its owner (the block thread), each with its own registry over its own names.
        A drive already open is refused.
        """
        from dirtybits.block.raw import RawImage

        rec = self.find_drive(raw_path)
        if rec.id in self.nodes:
            raise ContainerError(f"drive '{rec.id}' of {self.path} is already open")
        raw = RawImage(raw_path, readonly=readonly, cache=cache)
        try:
            if raw.size != rec.size:  # changed between the check and the open
                raise DriveMismatchError(f"'{raw_path}': size changed to {raw.size} bytes, "
                                         f"the bitmaps are for {rec.size}")
            node = DriveNode(raw, self, rec, policy=checkpoint, track=track,
                             owns_container=owns_container, cache=cache, owner=owner)
            self.nodes[rec.id] = node
            return node
        except BaseException:
            raw.close()
            raise


class DriveNode(BlockNode):
    """A ``BlockNode`` over a raw drive whose bitmaps live in a container.

    Requests past the drive's end are refused before any bit is marked, so the container's
    bits past the drive stay clean. ``load_bitmap`` takes a drive-local name. Resizing is
    refused: the size is part of the binding (``container rebind`` after a resize).
    """

    def __init__(self, driver: ImageDriver, container: Container, rec: DriveRecord, *,
                 policy: CheckpointPolicy | None = None, track: bool = True,
                 owns_container: bool = False, cache: str = "writeback",
                 owner: BlockOwner | None = None):
        self.container = container
        self.drive_id = rec.id
        self._owns_container = owns_container
        super().__init__(driver, container.store, policy=policy, track=track,
                         prefix=bitmap_name(rec.id, ""), node_name=rec.id, cache=cache,
                         owner=owner)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.driver.size:
            raise ImageError(f"request [{offset}, {offset + length}) is outside the image "
                             f"(size {self.driver.size})")

    def write(self, offset: int, data: Buffer, *, compress: bool = False,
              fua: bool = False) -> None:
        self._check(offset, len(data))
        super().write(offset, data, compress=compress, fua=fua)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False,
                     fua: bool = False) -> None:
        self._check(offset, length)
        super().write_zeroes(offset, length, unmap=unmap, fua=fua)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        super().discard(offset, length)

    def resize(self, new_size: int) -> None:
        from dirtybits.errors import UnsupportedFeatureError

        raise UnsupportedFeatureError(
            f"drive '{self.drive_id}' is bound to {self.container.path} at {self.size} bytes; "
            "resize the file, then run 'dirtybits container rebind'")

    def load_bitmap(self, name: str) -> DirtyBitmap:
        """A bitmap's bits over the drive's size (a drive-local name, or the stored one)."""
        prefix = bitmap_name(self.drive_id, "")
        if name.startswith(prefix) and self.bitmaps.find(name) is None:
            name = name[len(prefix):]
        return super().load_bitmap(name)

    def __enter__(self) -> DriveNode:
        return self

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.container.nodes.get(self.drive_id) is self:
                del self.container.nodes[self.drive_id]
            if self._owns_container:
                _release_container(self.container)


def open_drive(container_path: str, raw_path: str, *, readonly: bool = False,
               checkpoint: CheckpointPolicy | None = None, bitmaps: str = "auto",
               cache: str = "writeback", owner: BlockOwner | None = None) -> DriveNode:
    """Open raw drive ``raw_path`` with its bitmaps from container ``container_path``.

    The drive's identity and size are checked against its record; its enabled bitmaps record
    every write. Closing the node checkpoints the bitmaps and closes the container.
    """
    if bitmaps not in ("auto", "no"):
        raise UsageError(f"bitmaps must be 'auto' or 'no', not '{bitmaps}'")
    container = _share_container(container_path, readonly)
    try:
        return container.open_drive(raw_path, readonly=readonly, checkpoint=checkpoint,
                                    track=bitmaps == "auto", owns_container=True,
                                    cache=cache, owner=owner)
    except BaseException:
        _release_container(container)
        raise


def ensure_drive(container_path: str, raw_path: str, drive_id: str, *,
                 create: bool) -> DriveRecord:
    """The record of ``raw_path`` in the container; with ``create`` the container is made
    when missing and the drive attached as ``drive_id`` when it is not yet. Uses the
    container this process has open already, if any (drives opened side by side). Raises
    ``ContainerError`` (and ``NotAContainerError``) saying what is missing."""
    if not os.path.exists(container_path):
        if not create:
            raise ContainerError(f"the bitmap file '{container_path}' does not exist "
                                 "(create=on makes it)")
        Container.create(container_path)
        log.info("created bitmap container %s", container_path)
    container = _share_container(container_path, False)
    try:
        try:
            return container.find_drive(raw_path)
        except ContainerError:
            if not create:
                raise
        rec = container.attach(raw_path, drive_id)
        log.info("attached %s to %s as '%s'", raw_path, container_path, rec.id)
        return rec
    finally:
        _release_container(container)


# Containers open in this process, by file identity: two drives of one container opened with
# ``open_drive`` share one open container (a second open would fail on its write lock).
_OPEN: dict[tuple[int, int], Container] = {}


def _share_container(path: str, readonly: bool) -> Container:
    from dirtybits.block.owner import default_owner

    with default_owner().lock:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None:
            found = _OPEN.get((st.st_dev, st.st_ino))
            if found is not None and not found._closed and (readonly or
                                                            not found.img.readonly):
                found._users += 1
                return found
        container = Container.open(path, readonly=readonly)
        if st is not None:
            _OPEN[(st.st_dev, st.st_ino)] = container
        container._users = 1
        return container


def _release_container(container: Container) -> None:
    from dirtybits.block.owner import default_owner

    with default_owner().lock:
        container._users -= 1
        if container._users > 0:
            return
        for key, c in list(_OPEN.items()):
            if c is container:
                del _OPEN[key]
        container.close()


__all__ = [
    "DEFAULT_MAX_SIZE",
    "EXT_DRIVES",
    "XATTR",
    "BitmapInfo",
    "Container",
    "ContainerError",
    "DriveMismatchError",
    "DriveNode",
    "DriveRecord",
    "DriveTable",
    "NotAContainerError",
    "bitmap_name",
    "ensure_drive",
    "open_drive",
    "split_name",
]
