"""Persistent dirty bitmaps in qcow2: the bitmaps header extension, the bitmap directory, bitmap
table entries and QEMU's size rules.

Pure records (``docs/interop/qcow2.txt`` "Bitmaps extension" / "Bitmaps"; limits and messages
from QEMU's ``block/qcow2-bitmap.c`` and ``block/qcow2.c``). Bytes in, frozen dataclasses out.

Validation is split on purpose. A directory that cannot be walked (an entry running past its
end, more or fewer entries than the extension says) is an error of the whole directory:
``BitmapDirectory.unpack`` raises. Everything else QEMU refuses at open (bad granularity, an
unaligned table, extra data, a table too small for the disk, ...) is a property of one entry:
``check_entry`` lists the reasons, so the layer above can open the image and report just that
bitmap as unusable. QEMU instead refuses to open the whole image; ``qemu_entry_error`` gives
QEMU's message for when QEMU's behaviour is wanted.

Names are kept as the raw bytes on disk (``raw_name``), so an entry is rewritten byte for byte
whatever it holds. ``name`` decodes them as UTF-8 with ``surrogateescape``, which round-trips
invalid UTF-8 through ``encode_name``. Limits on names count bytes, as QEMU's do.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dirtybits.errors import FormatError

# Header extension (block/qcow2.h)
BITMAPS_EXTENSION_SIZE = 24
QCOW2_MAX_BITMAPS = 65535
QEMU_MAX_BITMAPS = QCOW2_MAX_BITMAPS
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS

# Directory entry constraints (block/qcow2-bitmap.c)
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000  # 512 MiB of bitmap data
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023  # bytes
BME_MIN_GRANULARITY = 1 << BME_MIN_GRANULARITY_BITS
BME_MAX_GRANULARITY = 1 << BME_MAX_GRANULARITY_BITS

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
# QEMU's mask: it knows no extra data, so it refuses extra_data_compatible like a reserved bit.
BME_RESERVED_FLAGS = 0xFFFFFFFC
BME_SPEC_RESERVED_FLAGS = 0xFFFFFFF8

BT_DIRTY_TRACKING_BITMAP = 1

# Bitmap table entries
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1 << 0

DIR_ENTRY_HEADER_SIZE = 24

_EXT = struct.Struct(">IIQQ")
_DIR_ENTRY = struct.Struct(">QIIBBHI")

_U16 = 1 << 16
_U32 = 1 << 32
_U64 = 1 << 64


def _broken(pos: int, base: int | None, reason: str = "Broken bitmap directory") -> FormatError:
    return FormatError(reason, structure="bitmap directory",
                       offset=None if base is None else base + pos)


# --- header extension -------------------------------------------------------------------------


@dataclass(frozen=True)
class BitmapsExtension:
    """The 24-byte data of header extension 0x23852875."""

    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int
    reserved: int = 0  # kept so a bad value is reported by validate(), not lost

    @classmethod
    def unpack(cls, data: bytes, *, offset: int | None = None) -> BitmapsExtension:
        """Parse; only the length is checked here.

        QEMU checks the length even when autoclear bit 0 is clear, but the other fields only
        when it is set (otherwise it drops the extension unread), so those are ``validate``'s.
        """
        if len(data) != BITMAPS_EXTENSION_SIZE:
            raise FormatError("bitmaps_ext: Invalid extension length",
                              structure="bitmaps extension", offset=offset)
        nb, reserved, size, dir_offset = _EXT.unpack(data)
        return cls(nb, size, dir_offset, reserved)

    def validate(self, cluster_size: int, *, offset: int | None = None) -> None:
        """QEMU's open-time checks, in QEMU's order and words; raise ``FormatError``."""

        def bad(msg: str) -> FormatError:
            return FormatError(msg, structure="bitmaps extension", offset=offset)

        if self.reserved:
            raise bad("bitmaps_ext: Reserved field is not zero")
        if self.nb_bitmaps > QCOW2_MAX_BITMAPS:
            raise bad(f"bitmaps_ext: Image has {self.nb_bitmaps} bitmaps, exceeding the QEMU "
                      f"supported maximum of {QCOW2_MAX_BITMAPS}")
        if self.nb_bitmaps == 0:
            raise bad("found bitmaps extension with zero bitmaps")
        if self.bitmap_directory_offset % cluster_size:
            raise bad("bitmaps_ext: invalid bitmap directory offset")
        if self.bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise bad(f"bitmaps_ext: bitmap directory size ({self.bitmap_directory_size}) "
                      f"exceeds the maximum supported size ({QCOW2_MAX_BITMAP_DIRECTORY_SIZE})")
        if self.bitmap_directory_size == 0:
            # QEMU says this when it loads the directory, which every open with nb >= 1 does.
            raise bad("Requested bitmap directory size is zero")

    def pack(self) -> bytes:
        return _EXT.pack(self.nb_bitmaps, self.reserved, self.bitmap_directory_size,
                         self.bitmap_directory_offset)


# --- directory entries ------------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    """The on-disk bytes of a bitmap name (inverse of ``BitmapDirectoryEntry.name``)."""
    return name.encode("utf-8", errors="surrogateescape")


def dir_entry_size(name_size: int, extra_data_size: int = 0) -> int:
    """Bytes a directory entry occupies, padding included (QEMU's calc_dir_entry_size)."""
    return (DIR_ENTRY_HEADER_SIZE + name_size + extra_data_size + 7) & ~7


def granularity_bits_of(granularity: int) -> int:
    """log2 of a power-of-two granularity; ``ValueError`` otherwise."""
    if granularity <= 0 or granularity & (granularity - 1):
        raise ValueError(f"granularity {granularity} is not a power of 2")
    return granularity.bit_length() - 1


@dataclass(frozen=True)
class BitmapDirectoryEntry:
    """One bitmap directory entry. ``extra_data`` is kept verbatim, as the spec demands."""

    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    raw_name: bytes
    extra_data: bytes = b""

    def __post_init__(self) -> None:
        # Catch caller bugs here rather than as a struct.error deep inside pack().
        for what, value, limit in (
            ("bitmap_table_offset", self.bitmap_table_offset, _U64),
            ("bitmap_table_size", self.bitmap_table_size, _U32),
            ("flags", self.flags, _U32),
            ("type", self.type, 256),
            ("granularity_bits", self.granularity_bits, 256),
            ("name_size", len(self.raw_name), _U16),
            ("extra_data_size", len(self.extra_data), _U32),
        ):
            if not 0 <= value < limit:
                raise ValueError(f"{what} {value} does not fit its field")

    @classmethod
    def new(cls, name: str, *, granularity: int, bitmap_table_offset: int = 0,
            bitmap_table_size: int = 0, flags: int = 0) -> BitmapDirectoryEntry:
        """An entry as QEMU writes one: dirty tracking type, no extra data."""
        return cls(bitmap_table_offset, bitmap_table_size, flags, BT_DIRTY_TRACKING_BITMAP,
                   granularity_bits_of(granularity), encode_name(name))

    @property
    def name(self) -> str:
        return self.raw_name.decode("utf-8", errors="surrogateescape")

    @property
    def name_size(self) -> int:
        return len(self.raw_name)

    @property
    def extra_data_size(self) -> int:
        return len(self.extra_data)

    @property
    def entry_size(self) -> int:
        return dir_entry_size(self.name_size, self.extra_data_size)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        """The bits on disk may be stale (a writer had the bitmap open)."""
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        """The bitmap records writes once loaded (QEMU: enabled)."""
        return bool(self.flags & BME_FLAG_AUTO)

    @classmethod
    def unpack(cls, buf: bytes, pos: int = 0, *,
               offset: int | None = None) -> tuple[BitmapDirectoryEntry, int]:
        """Parse the entry at ``buf[pos:]``; return it and its size with padding.

        ``buf`` ends where the directory ends, so an entry crossing its end is "Broken bitmap
        directory" (QEMU's words). ``offset`` is the file offset of ``buf[0]``, for errors.
        Padding bytes are not checked (QEMU doesn't either); ``pack`` writes zeros.
        """
        if pos + DIR_ENTRY_HEADER_SIZE > len(buf):
            raise _broken(pos, offset)
        (table_offset, table_size, flags, bm_type, gran_bits, name_size,
         extra_size) = _DIR_ENTRY.unpack_from(buf, pos)
        size = dir_entry_size(name_size, extra_size)
        if pos + size > len(buf):
            raise _broken(pos, offset)
        extra_at = pos + DIR_ENTRY_HEADER_SIZE
        name_at = extra_at + extra_size
        entry = cls(table_offset, table_size, flags, bm_type, gran_bits,
                    bytes(buf[name_at:name_at + name_size]),
                    bytes(buf[extra_at:name_at]))
        return entry, size

    def pack(self) -> bytes:
        head = _DIR_ENTRY.pack(self.bitmap_table_offset, self.bitmap_table_size, self.flags,
                               self.type, self.granularity_bits, self.name_size,
                               self.extra_data_size)
        body = head + self.extra_data + self.raw_name
        return body + b"\0" * (self.entry_size - len(body))


# --- sizes (QEMU's arithmetic) ----------------------------------------------------------------


def bitmap_bits(disk_size: int, granularity: int) -> int:
    """Number of bits covering ``disk_size`` bytes."""
    return -(-disk_size // granularity)


def bitmap_bytes_needed(disk_size: int, granularity: int) -> int:
    """ceil(bits / 8): what QEMU's add-time size check measures (get_bitmap_bytes_needed)."""
    return -(-bitmap_bits(disk_size, granularity) // 8)


def bitmap_serialized_size(disk_size: int, granularity: int) -> int:
    """Bytes of bitmap data QEMU writes: whole 64-bit words (hbitmap serialization)."""
    return -(-bitmap_bits(disk_size, granularity) // 64) * 8


def bitmap_table_size(disk_size: int, granularity: int, cluster_size: int) -> int:
    """The exact table_size QEMU writes and requires when loading.

    0 for an empty disk: QEMU then fails to store the bitmap at close ("No memory") rather than
    write an entry with table_size 0, which no reader would accept.
    """
    return -(-bitmap_serialized_size(disk_size, granularity) // cluster_size)


def bitmap_cluster_coverage(granularity: int, cluster_size: int) -> int:
    """Disk bytes described by one bitmap data cluster."""
    return cluster_size * 8 * granularity


# --- per-entry validation ---------------------------------------------------------------------


def check_entry(entry: BitmapDirectoryEntry, cluster_size: int, disk_size: int, *,
                loading: bool = True) -> list[str]:
    """Why ``entry`` is unusable (empty list: it is fine). Never raises.

    QEMU's check_dir_entry and load rules, plus two of ours: a zero name_size (the spec forbids
    it, QEMU doesn't check) and a NUL in the name (QEMU would cut the name there, so the bitmap
    it shows and rewrites is not the one on disk). ``disk_size`` is the length QEMU measures
    (bdrv_getlength: the virtual size rounded down to 512). ``loading``: the bits will be read,
    so a clean (not in_use) bitmap's table must have exactly the size the disk needs.
    """
    reasons: list[str] = []
    table_size = entry.bitmap_table_size
    gbits = entry.granularity_bits
    if entry.extra_data_size:
        reasons.append("Bitmap extra data is not supported")
    if table_size == 0:
        reasons.append("bitmap_table_size is zero")
    elif table_size > BME_MAX_TABLE_SIZE:
        reasons.append(f"bitmap_table_size {table_size} exceeds the maximum of "
                       f"{BME_MAX_TABLE_SIZE}")
    if entry.bitmap_table_offset == 0:
        reasons.append("bitmap_table_offset is zero")
    elif entry.bitmap_table_offset % cluster_size:
        reasons.append(f"bitmap_table_offset {entry.bitmap_table_offset:#x} is not cluster "
                       "aligned")
    gran_ok = BME_MIN_GRANULARITY_BITS <= gbits <= BME_MAX_GRANULARITY_BITS
    if not gran_ok:
        reasons.append(f"granularity_bits {gbits} is outside {BME_MIN_GRANULARITY_BITS}.."
                       f"{BME_MAX_GRANULARITY_BITS}")
    if entry.flags & BME_RESERVED_FLAGS:
        reasons.append(f"reserved flags are set ({entry.flags & BME_RESERVED_FLAGS:#x})")
    if entry.name_size == 0:
        reasons.append("name_size is zero")
    elif entry.name_size > BME_MAX_NAME_SIZE:
        reasons.append(f"name_size {entry.name_size} exceeds the maximum of "
                       f"{BME_MAX_NAME_SIZE}")
    if b"\0" in entry.raw_name:
        reasons.append("name contains a NUL byte")
    if entry.type != BT_DIRTY_TRACKING_BITMAP:
        reasons.append(f"type {entry.type} is not a dirty tracking bitmap")
    phys = table_size * cluster_size
    if phys > BME_MAX_PHYS_SIZE:
        reasons.append(f"bitmap table describes {phys} bytes of bitmap data, above the "
                       f"maximum of {BME_MAX_PHYS_SIZE}")
    if entry.in_use or table_size == 0 or not gran_ok:
        return reasons  # an in_use bitmap may have any size (e.g. after an unclean resize)
    if disk_size > (phys * 8) << gbits:
        reasons.append(f"bitmap table ({table_size} clusters) is too small for the disk size "
                       f"{disk_size}")
    elif loading:
        want = bitmap_table_size(disk_size, 1 << gbits, cluster_size)
        if table_size != want:
            reasons.append(f"bitmap_table_size {table_size} differs from the {want} the disk "
                           "size requires")
    return reasons


def qemu_entry_error(entry: BitmapDirectoryEntry, cluster_size: int,
                     disk_size: int) -> str | None:
    """The message with which QEMU 7.2 refuses to open an image because of ``entry``.

    Only the entry's own fields are judged; QEMU reads the bitmap table before the size rule,
    so a bad table entry would be reported first (see ``table_entry_error``).
    """
    if entry.extra_data_size:
        return "Bitmap extra data is not supported"
    table_size = entry.bitmap_table_size
    gbits = entry.granularity_bits
    phys = table_size * cluster_size
    if (table_size == 0 or entry.bitmap_table_offset == 0
            or entry.bitmap_table_offset % cluster_size or table_size > BME_MAX_TABLE_SIZE
            or not BME_MIN_GRANULARITY_BITS <= gbits <= BME_MAX_GRANULARITY_BITS
            or entry.flags & BME_RESERVED_FLAGS or entry.name_size > BME_MAX_NAME_SIZE
            or entry.type != BT_DIRTY_TRACKING_BITMAP or phys > BME_MAX_PHYS_SIZE
            or (not entry.in_use and disk_size > (phys * 8) << gbits)):
        return f"Bitmap '{_qemu_name(entry)}' doesn't satisfy the constraints"
    if not entry.in_use and table_size != bitmap_table_size(disk_size, 1 << gbits,
                                                            cluster_size):
        return f"Could not read bitmap '{_qemu_name(entry)}' from image: Invalid argument"
    return None


def _qemu_name(entry: BitmapDirectoryEntry) -> str:
    """The name as QEMU holds it: a C string, cut at the first NUL."""
    return entry.raw_name.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")


def qemu_directory_error(buf: bytes, nb_bitmaps: int, cluster_size: int,
                         disk_size: int) -> str | None:
    """The message with which QEMU 7.2 refuses the directory ``buf`` at open, or None.

    QEMU's bitmap_list_load walk, in its order: each entry is judged as soon as it is read, so
    the first damaged entry wins over a broken tail (a directory of zeros, as read past the
    end of the file, is "Bitmap '' doesn't satisfy the constraints"). Its entry size is a C
    ``int`` (calc_dir_entry_size), so a huge extra_data_size wraps to a small entry and is
    reported as "Bitmap extra data is not supported". Only the walk: the table-size rule
    QEMU applies later, when it reads each bitmap, is ``qemu_entry_error``'s.
    """
    if len(buf) == 0:
        return "Requested bitmap directory size is zero"
    if len(buf) > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        return "Requested bitmap directory size is too big"
    pos = count = 0
    while pos < len(buf):
        if pos + DIR_ENTRY_HEADER_SIZE > len(buf):
            return "Broken bitmap directory"
        count += 1
        if count > nb_bitmaps:
            return "More bitmaps found than specified in header extension"
        (table_offset, table_size, flags, bm_type, gran_bits, name_size,
         extra_size) = _DIR_ENTRY.unpack_from(buf, pos)
        size = _c_int(_c_int(DIR_ENTRY_HEADER_SIZE + name_size + extra_size) + 7) & ~7
        if pos + size > len(buf):
            return "Broken bitmap directory"
        if extra_size:
            return "Bitmap extra data is not supported"
        name_at = pos + DIR_ENTRY_HEADER_SIZE
        entry = BitmapDirectoryEntry(table_offset, table_size, flags, bm_type, gran_bits,
                                     bytes(buf[name_at:name_at + name_size]))
        err = qemu_entry_error(entry, cluster_size, disk_size)
        if err is not None and err.endswith("doesn't satisfy the constraints"):
            return err
        if size <= 0:  # a wrapped size QEMU would step back by; extra data stopped it above
            return "Broken bitmap directory"
        pos += size
    if count != nb_bitmaps:
        return "Less bitmaps found than specified in header extension"
    return None if pos == len(buf) else "Broken bitmap directory"


def _c_int(value: int) -> int:
    """``value`` as a 32-bit C int (two's complement wrap)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


# --- the directory ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BitmapDirectory:
    """The contiguous array of directory entries, in on-disk order."""

    entries: tuple[BitmapDirectoryEntry, ...] = ()

    @property
    def nb_bitmaps(self) -> int:
        return len(self.entries)

    @property
    def size(self) -> int:
        """bitmap_directory_size for this directory."""
        return sum(e.entry_size for e in self.entries)

    @classmethod
    def unpack(cls, buf: bytes, nb_bitmaps: int, *, offset: int | None = None) -> BitmapDirectory:
        """Walk a whole directory (``buf`` is exactly bitmap_directory_size bytes).

        Raises only for what makes the directory as a whole unreadable, with QEMU's messages
        (bitmap_list_load); judge each entry with ``check_entry``. ``offset`` is the directory's
        file offset, used in errors.
        """
        if len(buf) == 0:
            raise _broken(0, offset, "Requested bitmap directory size is zero")
        if len(buf) > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise _broken(0, offset, "Requested bitmap directory size is too big")
        entries: list[BitmapDirectoryEntry] = []
        pos = 0
        while pos < len(buf):
            if pos + DIR_ENTRY_HEADER_SIZE > len(buf):
                raise _broken(pos, offset)
            if len(entries) >= nb_bitmaps:
                raise _broken(pos, offset,
                              "More bitmaps found than specified in header extension")
            entry, size = BitmapDirectoryEntry.unpack(buf, pos, offset=offset)
            entries.append(entry)
            pos += size
        if len(entries) != nb_bitmaps:
            raise _broken(pos, offset, "Less bitmaps found than specified in header extension")
        return cls(tuple(entries))

    def pack(self) -> bytes:
        return b"".join(e.pack() for e in self.entries)

    def extension(self, bitmap_directory_offset: int) -> BitmapsExtension:
        """The header extension that points at this directory stored at the given offset."""
        return BitmapsExtension(self.nb_bitmaps, self.size, bitmap_directory_offset)

    def find(self, name: str | bytes) -> BitmapDirectoryEntry | None:
        raw = encode_name(name) if isinstance(name, str) else name
        for e in self.entries:
            if e.raw_name == raw:
                return e
        return None

    def check_entries(self, cluster_size: int, disk_size: int, *,
                      loading: bool = True) -> list[list[str]]:
        """``check_entry`` for each entry, plus: a name already used by an earlier entry.

        QEMU loads the first of two same-named entries and then fails the open ("Bitmap
        already exists") or, if the later one is in_use, silently skips it; either way only the
        first is usable.
        """
        seen: set[bytes] = set()
        out: list[list[str]] = []
        for e in self.entries:
            reasons = check_entry(e, cluster_size, disk_size, loading=loading)
            if e.raw_name in seen:
                reasons.append("an earlier bitmap has the same name")
            seen.add(e.raw_name)
            out.append(reasons)
        return out


# --- adding a bitmap --------------------------------------------------------------------------


class BitmapConstraintError(FormatError):
    """A new persistent bitmap would break the format's limits; ``str()`` is QEMU's text."""


def check_new_bitmap(name: str, granularity: int, disk_size: int, cluster_size: int,
                     existing_count: int, existing_dir_size: int) -> None:
    """QEMU's add-time checks that depend only on the format, in QEMU's order.

    ``existing_count``/``existing_dir_size``: the persistent bitmaps already on the node (QEMU
    counts its in-memory persistent bitmaps, which include ones not yet stored). The empty-name
    check is QMP's (made first there too), repeated so no caller builds an entry the spec
    forbids; a granularity that is not a power of 2 gets QMP's message (QEMU asserts there).
    Duplicate names and qcow2 v2 are the caller's.
    """
    def fail(msg: str) -> BitmapConstraintError:
        return BitmapConstraintError(msg)

    raw = encode_name(name)
    if not raw:
        raise fail("Bitmap name cannot be empty")
    if granularity <= 0 or granularity & (granularity - 1):
        raise fail("Granularity must be power of 2 and at least 512")  # QEMU asserts here
    gbits = granularity_bits_of(granularity)
    if gbits > BME_MAX_GRANULARITY_BITS:
        raise fail(f"Granularity exceeds maximum ({BME_MAX_GRANULARITY} bytes)")
    if gbits < BME_MIN_GRANULARITY_BITS:
        raise fail(f"Granularity is under minimum ({BME_MIN_GRANULARITY} bytes)")
    needed = bitmap_bytes_needed(disk_size, granularity)
    if needed > BME_MAX_PHYS_SIZE or needed > BME_MAX_TABLE_SIZE * cluster_size:
        raise fail("Too much space will be occupied by the bitmap. Use larger granularity")
    if len(raw) > BME_MAX_NAME_SIZE:
        raise fail(f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)")
    if existing_count + 1 > QCOW2_MAX_BITMAPS:
        raise fail("Maximum number of persistent bitmaps is already reached")
    if existing_dir_size + dir_entry_size(len(raw)) > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise fail("Not enough space in the bitmap directory")


# --- bitmap table entries ---------------------------------------------------------------------


class TableEntryKind(enum.Enum):
    ZEROS = "zeros"  # no data cluster; the range reads as all clean
    ONES = "ones"  # no data cluster; the range reads as all dirty (QEMU reads, never writes)
    DATA = "data"  # a data cluster at ``offset``


def table_entry_error(raw: int, cluster_size: int) -> str | None:
    """Why QEMU would reject this table entry (check_table_entry), or None."""
    if raw & BME_TABLE_ENTRY_RESERVED_MASK:
        return f"reserved bits are set in bitmap table entry {raw:#x}"
    offset = raw & BME_TABLE_ENTRY_OFFSET_MASK
    if offset:
        if raw & BME_TABLE_ENTRY_FLAG_ALL_ONES:
            return f"bitmap table entry {raw:#x} has both a data offset and the all-ones bit"
        if offset % cluster_size:
            return f"bitmap table entry {raw:#x} points to an unaligned data cluster"
    return None


@dataclass(frozen=True)
class BitmapTableEntry:
    """A decoded bitmap table entry (u64 BE on disk)."""

    kind: TableEntryKind
    offset: int = 0

    def __post_init__(self) -> None:
        if self.kind is TableEntryKind.DATA:
            if not self.offset or self.offset & ~BME_TABLE_ENTRY_OFFSET_MASK:
                raise ValueError(f"invalid data cluster offset {self.offset:#x}")
        elif self.offset:
            raise ValueError(f"a {self.kind.value} entry has no offset")

    @classmethod
    def decode(cls, raw: int, cluster_size: int, *,
               offset: int | None = None) -> BitmapTableEntry:
        """Validate as QEMU does; ``offset`` is where the entry lies in the file, for errors."""
        err = table_entry_error(raw, cluster_size)
        if err is not None:
            raise FormatError(err, structure="bitmap table", offset=offset)
        data = raw & BME_TABLE_ENTRY_OFFSET_MASK
        if data:
            return cls(TableEntryKind.DATA, data)
        return cls(TableEntryKind.ONES if raw & BME_TABLE_ENTRY_FLAG_ALL_ONES
                   else TableEntryKind.ZEROS)

    def encode(self) -> int:
        if self.kind is TableEntryKind.DATA:
            return self.offset
        return BME_TABLE_ENTRY_FLAG_ALL_ONES if self.kind is TableEntryKind.ONES else 0


def pack_table(entries: Sequence[int]) -> bytes:
    """Raw u64 entries to the on-disk table (big-endian)."""
    return struct.pack(f">{len(entries)}Q", *entries)


def unpack_table(buf: bytes, n: int, *, offset: int | None = None) -> list[int]:
    """The first ``n`` raw entries of a table; values are not judged (see ``decode``)."""
    if len(buf) < n * 8:
        raise FormatError(f"bitmap table truncated ({len(buf)} bytes for {n} entries)",
                          structure="bitmap table", offset=offset)
    return list(struct.unpack_from(f">{n}Q", buf, 0))
