"""dirtybits' write-intent map: a private qcow2 header extension (resilient mode).

One bit per region of the disk (md's write-intent bitmap, Hyper-V's RCT): a region's bit is set
and synced before the first write to it since the last bitmap checkpoint. After a crash, an
``in_use`` bitmap is its last checkpoint plus the marked regions: a superset of the truth.

Where it lives, and why there: in cluster 0, as an unknown header extension. QEMU preserves
unknown extensions byte for byte on every header rewrite (``unknown_header_ext``), and cluster 0
is never reported as leaked, so ``qemu-img check`` stays clean. The map is aligned to a 512-byte
sector inside cluster 0 so that updating it in place never rewrites a sector of the header.
Autoclear bit ``AUTOCLEAR_WRITE_INTENT`` says the map is current; QEMU clears unknown autoclear
bits on its first read-write open, so after a foreign writer the map is ignored.

Layout (big-endian), ``data`` of extension ``EXT_WRITE_INTENT``::

    0   u32  version (1)
    4   u32  region_bits: a region is 2^region_bits bytes
    8   u32  nb_regions (ceil(disk size / region))
    12  u32  map_start: offset of the map within this extension's data
    16  u32  nb_excluded
    20  u32  reserved (0)
    24  u64  excluded[nb_excluded]: bitmap table offsets of bitmaps that were already
             inconsistent when the map was started (the map does not cover them)
    ..  zero padding up to map_start
    map_start  ceil(nb_regions / 8) bytes, LE bit order, padded with zeros to 512 bytes
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dirtybits.errors import FormatError

EXT_WRITE_INTENT = 0x44425749  # "DBWI"; QEMU's are 0xe2792aca, 0x6803f857, 0x23852875, ...
WRITE_INTENT_VERSION = 1
SECTOR = 512
MIN_REGION_BITS = 16  # 64 KiB
MAX_REGION_BITS = 40  # 1 TiB
DEFAULT_MAX_REGIONS = 32768  # a 4 KiB map
DEFAULT_MIN_REGION_BITS = 24  # 16 MiB: few syncs per GiB written; the over-report is cheap
MAX_EXCLUDED = 1024
_FIXED = struct.Struct(">IIIIII")


def default_region_bits(disk_size: int, max_regions: int = DEFAULT_MAX_REGIONS) -> int:
    """The smallest region (>= 16 MiB) that keeps the map at ``max_regions`` bits or fewer."""
    bits = DEFAULT_MIN_REGION_BITS
    while (disk_size + (1 << bits) - 1) >> bits > max_regions and bits < MAX_REGION_BITS:
        bits += 1
    return bits


def map_bytes(nb_regions: int) -> int:
    """The map's size on disk: whole sectors."""
    return -(-((nb_regions + 7) // 8) // SECTOR) * SECTOR


@dataclass(frozen=True)
class WriteIntentExtension:
    region_bits: int
    nb_regions: int
    map_start: int
    excluded: tuple[int, ...] = ()
    map: bytes = b""
    version: int = WRITE_INTENT_VERSION

    @property
    def region_size(self) -> int:
        return 1 << self.region_bits

    @classmethod
    def new(cls, disk_size: int, region_bits: int, data_offset: int,
            excluded: tuple[int, ...] = ()) -> WriteIntentExtension:
        """An empty map whose data will start at file offset ``data_offset`` (in cluster 0):
        ``map_start`` is chosen so the map begins on a sector boundary of the file."""
        if not MIN_REGION_BITS <= region_bits <= MAX_REGION_BITS:
            raise FormatError(f"write-intent region must be 2^{MIN_REGION_BITS}.."
                              f"2^{MAX_REGION_BITS} bytes", structure="write-intent map")
        if len(excluded) > MAX_EXCLUDED:
            raise FormatError(f"more than {MAX_EXCLUDED} inconsistent bitmaps",
                              structure="write-intent map")
        nb = max(1, (disk_size + (1 << region_bits) - 1) >> region_bits)
        fixed_end = data_offset + _FIXED.size + 8 * len(excluded)
        start = -(-fixed_end // SECTOR) * SECTOR - data_offset
        return cls(region_bits, nb, start, tuple(excluded), bytes(map_bytes(nb)))

    def pack(self) -> bytes:
        head = _FIXED.pack(self.version, self.region_bits, self.nb_regions, self.map_start,
                           len(self.excluded), 0)
        head += b"".join(struct.pack(">Q", off) for off in self.excluded)
        return head + bytes(self.map_start - len(head)) + self.map

    @classmethod
    def unpack(cls, data: bytes) -> WriteIntentExtension:
        def bad(msg: str) -> FormatError:
            return FormatError(msg, structure="write-intent map")

        if len(data) < _FIXED.size:
            raise bad("extension too short")
        version, rbits, nb, start, nex, reserved = _FIXED.unpack_from(data)
        if version != WRITE_INTENT_VERSION:
            raise bad(f"unsupported version {version}")
        if reserved or not MIN_REGION_BITS <= rbits <= MAX_REGION_BITS or nb == 0:
            raise bad("invalid region size or count")
        if nex > MAX_EXCLUDED or start < _FIXED.size + 8 * nex:
            raise bad("invalid excluded list or map offset")
        if start + map_bytes(nb) != len(data):
            raise bad(f"map of {nb} regions does not fit the extension ({len(data)} bytes)")
        excluded = struct.unpack_from(f">{nex}Q", data, _FIXED.size)
        return cls(rbits, nb, start, tuple(excluded), bytes(data[start:]), version)

    def regions(self) -> list[int]:
        """Indices of the marked regions."""
        out = []
        for i, byte in enumerate(self.map):
            while byte:
                low = byte & -byte
                r = i * 8 + low.bit_length() - 1
                if r < self.nb_regions:
                    out.append(r)
                byte ^= low
        return out
