"""Resilient mode: the live write-intent map of a writable qcow2 (DESIGN.md, step 4c).

The protocol, on top of the bitmaps' checkpointed ``in_use``:

1. The first tracked write after the map was invalid (new image, or a foreign writer cleared
   the autoclear bit) starts an epoch: an empty map, the inconsistent bitmaps of that moment
   listed as *excluded* (the map cannot vouch for writes it never saw), autoclear bit set.
2. Before a write reaches a region whose bit is not set on disk, the bit is written in place
   and synced, together with the ``in_use`` flags when those are being set too.
3. After a checkpoint (bitmap data synced, ``in_use`` cleared and synced), regions not written
   since the previous checkpoint are cleared, lazily (no sync: a lost clear over-reports).
   Hot regions stay marked, so a steady workload does not pay a sync per region per epoch.
4. At a tracked writable open with a valid map, every ``in_use`` bitmap that is not excluded is
   recovered: its stored bits (the last checkpoint, or more) ORed with the marked regions,
   written in place, synced, ``in_use`` cleared. That is a superset of the truth.

Writes that bypass the map (``bitmaps=no``, an unaware engine, QEMU) clear the autoclear bit
first, so a stale map is never trusted.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from dirtybits.errors import DirtybitsError, FormatError
from dirtybits.format.qcow2.header import AUTOCLEAR_WRITE_INTENT, HeaderExtension
from dirtybits.format.qcow2.write_intent import (
    EXT_WRITE_INTENT,
    SECTOR,
    WriteIntentExtension,
    default_region_bits,
)

if TYPE_CHECKING:
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

log = logging.getLogger(__name__)

class ResilientModeError(DirtybitsError):
    """Resilient mode cannot be enabled on this image."""


def _data_offset(img: Qcow2Image, ext_type: int) -> int | None:
    """File offset of an extension's data in cluster 0, as the header is laid out now."""
    pos = img.hc.header.header_length
    for ext in img.hc.extensions:
        if ext.type == ext_type:
            return pos + 8
        pos += len(ext.pack())
    return None


def _tail_data_offset(img: Qcow2Image) -> int:
    """Where our extension's data starts once (re)written: header updates put an unknown
    extension they replace after all the others."""
    hc = img.hc
    return hc.header.header_length + sum(
        len(e.pack()) for e in hc.extensions if e.type != EXT_WRITE_INTENT) + 8


def enable(img: Qcow2Image, region_size: int | None = None) -> WriteIntentExtension:
    """Turn resilient mode on: add an (invalid, empty) map; the first tracked write starts it."""
    if img.header.version < 3:
        raise ResilientModeError("Resilient mode needs a qcow2 v3 image")
    if region_size is not None and (region_size & (region_size - 1) or region_size <= 0):
        raise ResilientModeError(f"Region size must be a power of two, not {region_size}")
    bits = (region_size.bit_length() - 1) if region_size else default_region_bits(img.size)
    data_off = _tail_data_offset(img)
    try:
        rec = WriteIntentExtension.new(img.size, bits, data_off)
        img.update_header(extensions={EXT_WRITE_INTENT: rec.pack()},
                          autoclear_clear=AUTOCLEAR_WRITE_INTENT)
    except FormatError as exc:
        raise ResilientModeError(
            f"The write-intent map does not fit in the header cluster ({exc.reason}); use a "
            "larger region size or a larger cluster size") from exc
    log.info("%s: resilient mode on (%d-byte regions)", img.path, rec.region_size)
    return rec


def disable(img: Qcow2Image) -> None:
    log.info("%s: resilient mode off", img.path)
    img.update_header(extensions={EXT_WRITE_INTENT: None},
                      autoclear_clear=AUTOCLEAR_WRITE_INTENT)


def describe(img: Qcow2Image) -> WriteIntentExtension | None:
    """The map as stored (None: resilient mode off); raises FormatError when damaged."""
    ext = img.hc.extension(EXT_WRITE_INTENT)
    return None if ext is None else WriteIntentExtension.unpack(ext.data)


def is_valid(img: Qcow2Image) -> bool:
    return bool(img.header.autoclear_features & AUTOCLEAR_WRITE_INTENT)


# A write that continues a run of regions written this epoch marks this many regions at once:
# a sequential stream then pays one sync per MARK_AHEAD regions, at the price of over-reporting
# at most MARK_AHEAD - 1 unwritten regions after a crash.
MARK_AHEAD = 8


class WriteIntentMap:
    """The map of one image opened for tracked writing."""

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        self.rec: WriteIntentExtension | None = None
        self.problem: str | None = None
        try:
            self.rec = describe(img)
        except FormatError as exc:
            self.problem = exc.reason
        self.valid = self.rec is not None and is_valid(img)
        self._map = bytearray(self.rec.map) if self.rec else bytearray()
        self._epoch = bytearray(len(self._map))
        self.syncs = 0  # map writes that needed a sync before a guest write

    @property
    def enabled(self) -> bool:
        return self.rec is not None

    # ------------------------------------------------------------------ recovery
    def recover(self, store: Qcow2BitmapStore) -> list[str]:
        """Make the covered in_use bitmaps consistent: stored bits OR the marked regions."""
        if not self.valid or self.rec is None:
            return []
        from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

        rec = self.rec
        size = store.disk_size
        regions = rec.regions()
        names: list[str] = []
        for sb in list(store.bitmaps):
            e = sb.entry
            if (not e.in_use or sb.problems or sb.table is None
                    or e.bitmap_table_offset in rec.excluded):
                continue
            bits = DirtyBitmap(size, e.granularity)
            bits.track_changes(store.cluster_size)
            for r in regions:
                start = r << rec.region_bits
                if start < size:
                    bits.set(start, min(size, start + rec.region_size) - start)
            store.ours.add(sb.name)
            store.write_changes(sb.name, bits, bits.take_changed_chunks())
            names.append(sb.name)
        if names:
            store.img.sync()
            store.set_in_use(names, False)
            log.info("%s: recovered in-use bitmaps from the write-intent map: %s",
                     store.img.path, ", ".join(names))
        return names

    # ------------------------------------------------------------------ epochs
    def start(self, excluded: list[int]) -> None:
        """Begin an epoch: an empty map excluding these inconsistent bitmaps, bit set."""
        assert self.rec is not None
        rec = WriteIntentExtension.new(self.img.size, self.rec.region_bits,
                                       _tail_data_offset(self.img),
                                       tuple(sorted(set(excluded))))
        self.img.update_header(extensions={EXT_WRITE_INTENT: rec.pack()},
                               autoclear_set=AUTOCLEAR_WRITE_INTENT)
        self.rec = rec
        self._map = bytearray(rec.map)
        self._epoch = bytearray(len(self._map))
        self.valid = True
        log.debug("%s: write-intent epoch started (%d bitmaps excluded)", self.img.path,
                  len(rec.excluded))

    def invalidate(self) -> None:
        """A write the map will not see is coming: stop trusting the map (synced)."""
        if self.valid:
            log.debug("%s: write-intent map invalidated (an untracked write)", self.img.path)
            self.img.update_header(autoclear_clear=AUTOCLEAR_WRITE_INTENT)
            self.valid = False

    def mark(self, offset: int, length: int) -> bool:
        """Record a write's regions; True when the map was written (durably: on return the
        new marks are on stable storage)."""
        rec = self.rec
        assert rec is not None and self.valid
        r0 = offset >> rec.region_bits
        r1 = min((offset + length - 1) >> rec.region_bits, rec.nb_regions - 1)
        lo = hi = -1
        for r in range(r0, r1 + 1):
            i, bit = r >> 3, 1 << (r & 7)
            self._epoch[i] |= bit
            if self._map[i] & bit:
                continue
            prev = r - 1
            ahead = (MARK_AHEAD if prev >= 0 and self._epoch[prev >> 3] & (1 << (prev & 7))
                     else 1)
            for a in range(r, min(r + ahead, rec.nb_regions)):
                self._map[a >> 3] |= 1 << (a & 7)
            lo = i if lo < 0 else lo
            hi = max(hi, (min(r + ahead, rec.nb_regions) - 1) >> 3)
        if lo < 0:
            return False
        self._write(lo, hi + 1, durable=True)
        self.syncs += 1
        return True

    def end_epoch(self) -> None:
        """After a checkpoint: keep only the regions written since the previous one."""
        if not self.valid or self._map == self._epoch:
            self._epoch = bytearray(len(self._map))
            return
        diff = [i for i in range(len(self._map)) if self._map[i] != self._epoch[i]]
        self._map = self._epoch
        self._epoch = bytearray(len(self._map))
        self._write(diff[0], diff[-1] + 1)  # no sync: a clear that is lost over-reports

    def _write(self, lo: int, hi: int, *, durable: bool = False) -> None:
        """Write map bytes [lo, hi) rounded out to sectors, in place in cluster 0
        (``durable``: an O_DSYNC write, which syncs these sectors and nothing else)."""
        rec = self.rec
        assert rec is not None
        data_off = _data_offset(self.img, EXT_WRITE_INTENT)
        assert data_off is not None
        map_off = data_off + rec.map_start
        a = max(0, ((map_off + lo) // SECTOR) * SECTOR - map_off)
        b = min(len(self._map), -(-(map_off + hi) // SECTOR) * SECTOR - map_off)
        write = self.img.write_metadata_durable if durable else self.img.write_metadata
        write(map_off + a, bytes(self._map[a:b]), "header")
        # keep the header the engine holds in step, or its next rewrite would undo this
        data = bytes(self.img.hc.extension(EXT_WRITE_INTENT).data)  # type: ignore[union-attr]
        data = data[:rec.map_start] + bytes(self._map)
        self.rec = replace(rec, map=bytes(self._map))
        hc = self.img.hc
        self.img.hc = replace(hc, extensions=tuple(
            HeaderExtension(e.type, data) if e.type == EXT_WRITE_INTENT else e
            for e in hc.extensions))
