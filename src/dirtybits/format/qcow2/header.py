"""The qcow2 header (cluster 0): fixed fields, header extensions and the backing file name.

Pure records: bytes in, validated frozen dataclasses out, and back. Field names follow
``docs/interop/qcow2.txt``. Anything we do not understand (additional header fields, unknown
extensions) is kept byte for byte so a rewrite never loses another writer's data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from dirtybits.errors import FormatError

QCOW_MAGIC = 0x514649FB
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # QEMU >= 5.1 writes compression_type, padded to a multiple of 8

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_FILE_NAME = 1023
MAX_L1_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_HOST_OFFSET = 1 << 56
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS  # QCOW2_MAX_BITMAP_DIRECTORY_SIZE
MAX_BACKING_FORMAT = 15  # QEMU keeps the name in char[16], NUL included

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW
# dirtybits' own: the write-intent map (extension EXT_WRITE_INTENT) is up to date. Any writer that
# does not know it (QEMU) clears it, so the map is then never trusted.
AUTOCLEAR_WRITE_INTENT = 1 << 62

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

_V2_FIELDS = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
_V3_FIELDS = struct.Struct(">QQQII")  # 32 bytes: offsets 72..104
_EXT_HEADER = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved32, directory size, offset

# (field, on-disk width in bytes) of every fixed header field, for range checks
_FIELD_WIDTHS = (
    ("version", 4), ("backing_file_offset", 8), ("backing_file_size", 4), ("cluster_bits", 4),
    ("size", 8), ("crypt_method", 4), ("l1_size", 4), ("l1_table_offset", 8),
    ("refcount_table_offset", 8), ("refcount_table_clusters", 4), ("nb_snapshots", 4),
    ("snapshots_offset", 8), ("incompatible_features", 8), ("compatible_features", 8),
    ("autoclear_features", 8), ("refcount_order", 4), ("header_length", 4),
    ("compression_type", 1),
)

FEATURE_TYPE_INCOMPAT = 0
FEATURE_TYPE_COMPAT = 1
FEATURE_TYPE_AUTOCLEAR = 2


@dataclass(frozen=True)
class Qcow2Header:
    """The fixed part of the qcow2 header (bytes 0 .. header_length)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    # Bytes 105 .. header_length: padding and any additional fields newer writers added.
    unknown_fields: bytes = b"\0" * 7

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @classmethod
    def unpack(cls, buf: bytes) -> Qcow2Header:
        """Parse and validate; raise ``FormatError`` naming the bad field."""
        if len(buf) < V2_HEADER_LENGTH:
            raise FormatError("file too short for a qcow2 header",
                              structure="qcow2 header", offset=0)
        (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
         l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
         snapshots_offset) = _V2_FIELDS.unpack_from(buf, 0)
        if magic != QCOW_MAGIC:
            raise FormatError("not a qcow2 image (bad magic)", structure="qcow2 header", offset=0)
        if version not in (2, 3):
            raise FormatError(f"unsupported qcow2 version {version}", structure="qcow2 header")
        incompat = compat = autoclear = 0
        refcount_order = 4
        header_length = V2_HEADER_LENGTH
        compression_type = COMPRESSION_ZLIB
        unknown = b""
        if version == 3:
            if len(buf) < V3_MIN_HEADER_LENGTH:
                raise FormatError("file too short for a qcow2 v3 header",
                                  structure="qcow2 header")
            incompat, compat, autoclear, refcount_order, header_length = _V3_FIELDS.unpack_from(
                buf, 72
            )
            if header_length < V3_MIN_HEADER_LENGTH:
                raise FormatError(
                    f"header_length {header_length} is below {V3_MIN_HEADER_LENGTH}",
                    structure="qcow2 header",
                )
            if header_length % 8:
                raise FormatError(
                    f"header_length {header_length} is not a multiple of 8",
                    structure="qcow2 header",
                )
            if header_length > len(buf):
                raise FormatError(
                    f"header_length {header_length} runs past the header cluster",
                    structure="qcow2 header",
                )
            if header_length > V3_MIN_HEADER_LENGTH:
                compression_type = buf[104]
                unknown = bytes(buf[105:header_length])
        hdr = cls(
            version=version,
            backing_file_offset=backing_file_offset,
            backing_file_size=backing_file_size,
            cluster_bits=cluster_bits,
            size=size,
            crypt_method=crypt_method,
            l1_size=l1_size,
            l1_table_offset=l1_table_offset,
            refcount_table_offset=refcount_table_offset,
            refcount_table_clusters=refcount_table_clusters,
            nb_snapshots=nb_snapshots,
            snapshots_offset=snapshots_offset,
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
            compression_type=compression_type,
            unknown_fields=unknown,
        )
        hdr.validate()
        return hdr

    def validate(self) -> None:
        """The checks QEMU makes in qcow2_do_open, with its limits."""

        def bad(msg: str) -> FormatError:
            return FormatError(msg, structure="qcow2 header")

        for name, width in _FIELD_WIDTHS:
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << (8 * width):
                raise bad(f"{name} {value!r} does not fit its {width}-byte field")
        if self.version not in (2, 3):
            raise bad(f"unsupported qcow2 version {self.version}")
        if not MIN_CLUSTER_BITS <= self.cluster_bits <= MAX_CLUSTER_BITS:
            raise bad(f"unsupported cluster size 2^{self.cluster_bits}")
        cs = self.cluster_size
        if self.version == 2 and self.refcount_order != 4:
            raise bad("v2 images must use 16-bit refcounts")
        if self.refcount_order > MAX_REFCOUNT_ORDER:
            raise bad(f"refcount_order {self.refcount_order} is above {MAX_REFCOUNT_ORDER}")
        if self.version == 3 and (self.header_length < V3_MIN_HEADER_LENGTH
                                  or self.header_length % 8):
            raise bad(f"header_length {self.header_length} is invalid")
        if self.header_length > cs:
            raise bad("header_length exceeds the cluster size")
        if self.size >= 1 << 63:
            raise bad(f"virtual size {self.size} is too large")
        if self.crypt_method > CRYPT_LUKS:
            raise bad(f"Unsupported encryption method: {self.crypt_method}")
        if self.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
            raise bad(f"unknown compression type {self.compression_type}")
        if self.compression_type != COMPRESSION_ZLIB and not (
            self.incompatible_features & INCOMPAT_COMPRESSION
        ):
            raise bad("compression type set without the compression-type incompatible bit")
        if self.backing_file_offset:
            if self.backing_file_size > MAX_BACKING_FILE_NAME:
                raise bad("backing file name is too long")
            if self.backing_file_offset + self.backing_file_size > cs:
                raise bad("backing file name lies outside the header cluster")
        for name, off in (
            ("L1 table", self.l1_table_offset),
            ("refcount table", self.refcount_table_offset),
            ("snapshot table", self.snapshots_offset),
        ):
            if off % cs:
                raise bad(f"{name} offset {off:#x} is not cluster aligned")
            if off >= MAX_HOST_OFFSET:
                raise bad(f"{name} offset {off:#x} is out of range")
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise bad(f"active L1 table too large ({self.l1_size} entries)")
        if self.l1_size < l1_entries_for(self.size, self.cluster_bits,
                                         bool(self.incompatible_features & INCOMPAT_EXTL2)):
            raise bad(f"L1 table is too small ({self.l1_size} entries for size {self.size})")
        if self.l1_size and not self.l1_table_offset:
            raise bad("L1 table offset is zero")
        if self.refcount_table_clusters == 0 or not self.refcount_table_offset:
            raise bad("image has no refcount table")
        if self.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
            raise bad(f"refcount table too large ({self.refcount_table_clusters} clusters)")
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise bad("Snapshot table too large")
        if self.nb_snapshots and not self.snapshots_offset:
            raise bad("snapshot table offset is zero")

    def pack(self) -> bytes:
        try:
            return self._pack()
        except (struct.error, ValueError, TypeError) as exc:
            raise FormatError(f"a field does not fit its on-disk width ({exc})",
                              structure="qcow2 header") from None

    def _pack(self) -> bytes:
        out = bytearray(
            _V2_FIELDS.pack(
                QCOW_MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
                self.cluster_bits, self.size, self.crypt_method, self.l1_size,
                self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
                self.nb_snapshots, self.snapshots_offset,
            )
        )
        if self.version == 3:
            out += _V3_FIELDS.pack(
                self.incompatible_features, self.compatible_features, self.autoclear_features,
                self.refcount_order, self.header_length,
            )
            if self.header_length > V3_MIN_HEADER_LENGTH:
                out.append(self.compression_type)
                tail = self.unknown_fields[: self.header_length - 105]
                out += tail + b"\0" * (self.header_length - 105 - len(tail))
        return bytes(out)

    def replace(self, **changes: int) -> Qcow2Header:
        return replace(self, **changes)  # type: ignore[arg-type]


def l1_entries_for(size: int, cluster_bits: int, extended_l2: bool = False) -> int:
    """How many L1 entries a disk of ``size`` bytes needs (QEMU's size_to_l1); extended L2
    entries are 16 bytes, so a table maps half as much."""
    shift = cluster_bits + (cluster_bits - (4 if extended_l2 else 3))
    return (size + (1 << shift) - 1) >> shift


@dataclass(frozen=True)
class HeaderExtension:
    """One ``{type, length, data}`` record after the fixed header; ``data`` excludes padding."""

    type: int
    data: bytes

    def pack(self) -> bytes:
        pad = (-len(self.data)) % 8
        return _EXT_HEADER.pack(self.type, len(self.data)) + self.data + b"\0" * pad


@dataclass(frozen=True)
class FeatureNameEntry:
    type: int
    bit: int
    name: str

    SIZE = 48

    def pack(self) -> bytes:
        """48 bytes; a name QEMU could not read back the same (too long, NUL) is refused."""
        raw = self.name.encode("utf-8", errors="surrogateescape")
        if not (0 <= self.type <= 255 and 0 <= self.bit <= 255):
            raise FormatError(f"feature type {self.type} / bit {self.bit} out of range",
                              structure="feature name table")
        if len(raw) > 46 or b"\0" in raw:
            raise FormatError(f"feature name {self.name!r} does not fit in 46 bytes",
                              structure="feature name table")
        return bytes([self.type, self.bit]) + raw + b"\0" * (46 - len(raw))

    @classmethod
    def unpack(cls, buf: bytes) -> FeatureNameEntry:
        """The first 48 bytes of ``buf``; the name ends at its first NUL, as QEMU reads it."""
        if len(buf) < cls.SIZE:
            raise FormatError(f"feature name entry is {len(buf)} bytes, not 48",
                              structure="feature name table")
        name = bytes(buf[2:48]).split(b"\0", 1)[0]
        return cls(buf[0], buf[1], name.decode(errors="replace"))


QEMU_FEATURE_TABLE: tuple[FeatureNameEntry, ...] = (
    FeatureNameEntry(FEATURE_TYPE_INCOMPAT, 0, "dirty bit"),
    FeatureNameEntry(FEATURE_TYPE_INCOMPAT, 1, "corrupt bit"),
    FeatureNameEntry(FEATURE_TYPE_INCOMPAT, 2, "external data file"),
    FeatureNameEntry(FEATURE_TYPE_INCOMPAT, 3, "compression type"),
    FeatureNameEntry(FEATURE_TYPE_INCOMPAT, 4, "extended L2 entries"),
    FeatureNameEntry(FEATURE_TYPE_COMPAT, 0, "lazy refcounts"),
    FeatureNameEntry(FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    FeatureNameEntry(FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
)


def pack_feature_table(entries: tuple[FeatureNameEntry, ...] = QEMU_FEATURE_TABLE) -> bytes:
    return b"".join(e.pack() for e in entries)


def unpack_feature_table(data: bytes) -> list[FeatureNameEntry]:
    if len(data) % FeatureNameEntry.SIZE:
        raise FormatError("feature name table length is not a multiple of 48",
                          structure="feature name table")
    return [FeatureNameEntry.unpack(data[i:i + 48]) for i in range(0, len(data), 48)]


@dataclass(frozen=True)
class HeaderCluster:
    """Everything qcow2 keeps in cluster 0: header, extensions in file order, backing name."""

    header: Qcow2Header
    extensions: tuple[HeaderExtension, ...] = field(default_factory=tuple)
    backing_file: str | None = None

    def extension(self, ext_type: int) -> HeaderExtension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def extension_string(self, ext_type: int) -> str | None:
        """An extension holding a name, as QEMU reads it: a C string, cut at the first NUL."""
        ext = self.extension(ext_type)
        if ext is None:
            return None
        return ext.data.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")

    @property
    def backing_name(self) -> str | None:
        """The backing file name as QEMU uses it (a C string: cut at the first NUL);
        ``backing_file`` keeps the stored bytes for rewriting."""
        if self.backing_file is None:
            return None
        return self.backing_file.split("\0", 1)[0]

    @property
    def backing_format(self) -> str | None:
        return self.extension_string(EXT_BACKING_FORMAT)

    @property
    def data_file(self) -> str | None:
        return self.extension_string(EXT_DATA_FILE)

    def with_extension(self, ext_type: int, data: bytes | None) -> HeaderCluster:
        """Replace (or remove when ``data`` is None) one extension, keeping QEMU's order."""
        kept = [e for e in self.extensions if e.type != ext_type]
        if data is not None:
            kept.append(HeaderExtension(ext_type, data))
        order = {EXT_BACKING_FORMAT: 0, EXT_DATA_FILE: 1, EXT_CRYPTO_HEADER: 2,
                 EXT_FEATURE_TABLE: 3, EXT_BITMAPS: 4}
        kept.sort(key=lambda e: order.get(e.type, 5))  # stable: unknown ones keep their order
        return replace(self, extensions=tuple(kept))

    @classmethod
    def unpack(cls, buf: bytes) -> HeaderCluster:
        """Parse cluster 0 (``buf`` may be longer or shorter than a cluster)."""
        header = Qcow2Header.unpack(buf)
        cs = header.cluster_size
        area = bytes(buf[:cs])
        pos = header.header_length
        exts: list[HeaderExtension] = []
        seen: set[int] = set()
        while True:
            if pos + 8 > len(area):
                if pos + 8 > cs:
                    raise FormatError("header extensions run past the first cluster",
                                      structure="header extension", offset=pos)
                raise FormatError("file ends inside the header extensions",
                                  structure="header extension", offset=pos)
            ext_type, length = _EXT_HEADER.unpack_from(area, pos)
            pos += 8
            if length > cs - pos:  # QEMU checks this before the type, end marker included
                raise FormatError("Header extension too large", structure="header extension",
                                  offset=pos - 8)
            if ext_type == EXT_END:
                break
            if pos + length > len(area):
                raise FormatError("file ends inside a header extension",
                                  structure="header extension", offset=pos - 8)
            if ext_type in seen:
                raise FormatError(f"header extension {ext_type:#010x} appears twice",
                                  structure="header extension", offset=pos - 8)
            seen.add(ext_type)
            data = area[pos:pos + length]
            _validate_extension(header, ext_type, data, pos - 8)
            exts.append(HeaderExtension(ext_type, data))
            pos += (length + 7) & ~7
        backing = None
        if header.backing_file_offset:
            start = header.backing_file_offset
            end = start + header.backing_file_size
            if end > len(area):
                raise FormatError("backing file name runs past the end of the file",
                                  structure="qcow2 header", offset=start)
            if start < pos and header.backing_file_size:
                raise FormatError("backing file name overlaps the header extensions",
                                  structure="qcow2 header", offset=start)
            backing = area[start:end].decode("utf-8", errors="surrogateescape")
        return cls(header=header, extensions=tuple(exts), backing_file=backing)

    def pack(self) -> bytes:
        """Header, extensions, end marker, then the backing file name (QEMU's layout).

        Returns the header with ``backing_file_offset/size`` and ``header_length`` made
        consistent with the packed layout.
        """
        hdr = self.header
        ext_bytes = b"".join(e.pack() for e in self.extensions) + _EXT_HEADER.pack(EXT_END, 0)
        start = hdr.header_length
        backing_raw = (self.backing_file or "").encode("utf-8", errors="surrogateescape")
        backing_off = start + len(ext_bytes) if self.backing_file is not None else 0
        hdr = replace(hdr, backing_file_offset=backing_off,
                      backing_file_size=len(backing_raw) if self.backing_file is not None else 0)
        out = hdr.pack() + ext_bytes + backing_raw
        if len(out) > hdr.cluster_size:
            raise FormatError("header, extensions and backing file name exceed one cluster",
                              structure="qcow2 header")
        return out


def _validate_extension(header: Qcow2Header, ext_type: int, data: bytes, offset: int) -> None:
    """The checks qcow2_read_extensions makes, with QEMU's messages."""

    def bad(msg: str) -> FormatError:
        return FormatError(msg, structure="header extension", offset=offset)

    if ext_type == EXT_BACKING_FORMAT and len(data) > MAX_BACKING_FORMAT:
        raise bad(f"ERROR: ext_backing_format: len={len(data)} too large (>=16)")
    if ext_type == EXT_FEATURE_TABLE and len(data) % FeatureNameEntry.SIZE:
        raise bad("feature name table length is not a multiple of 48")
    if ext_type == EXT_CRYPTO_HEADER:
        if header.crypt_method != CRYPT_LUKS:
            raise bad("CRYPTO header extension only expected with LUKS encryption method")
        if len(data) != 16:
            raise bad("crypto header extension has the wrong length")
    if ext_type == EXT_BITMAPS:
        if len(data) != _BITMAPS_EXT.size:
            raise bad("bitmaps_ext: Invalid extension length")
        if header.version < 3 or not header.autoclear_features & AUTOCLEAR_BITMAPS:
            return  # QEMU ignores (and a writer drops) bitmaps it cannot trust
        nb_bitmaps, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(data)
        if reserved:
            raise bad("bitmaps_ext: Reserved field is not zero")
        if nb_bitmaps > MAX_BITMAPS:
            raise bad(f"bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU "
                      f"supported maximum of {MAX_BITMAPS}")
        if nb_bitmaps == 0:
            raise bad("found bitmaps extension with zero bitmaps")
        if dir_offset % header.cluster_size or dir_offset >= MAX_HOST_OFFSET:
            raise bad("bitmaps_ext: invalid bitmap directory offset")
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
            raise bad(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum "
                      f"supported size ({MAX_BITMAP_DIRECTORY_SIZE})")
