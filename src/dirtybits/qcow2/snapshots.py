"""Internal snapshots: create, apply, delete and load, as QEMU 7.2's qcow2 driver does them.

A snapshot is a copy of the active L1 table plus one more reference on every cluster it
reaches (its L2 tables, data clusters, compressed payloads). A cluster with a refcount above 1
is shared, so the engine copies it before changing it (``Qcow2Image._cow_l2`` for L2 tables,
``_write_allocating`` for data), and ``QCOW_OFLAG_COPIED`` marks, in the active view only,
exactly the clusters whose refcount is 1 (``qemu-img check`` verifies it).

Order of the steps, the same as QEMU's, with what a crash at each point leaves:

* create: copy the L1 table to new clusters; raise the refcounts and clear COPIED in the
  active view, durable (refcounts first); then the new snapshot table, durable, and the header
  switch to it. Before the switch a crash leaks the copy and leaves the refcounts one too
  high (leaks); between the refcount and COPIED writes ``qemu-img check`` reports the COPIED
  flags, as it does for QEMU's own crash there (fixed by ``check -r all``; no data at risk).
* delete: the table without the entry, durable; only then the references drop (a crash
  leaks) and COPIED is set where a refcount fell to 1.
* apply: raise the refcounts of the snapshot's view, durable; switch the active L1 table to
  the snapshot's (COPIED clear: every cluster is shared at that point, where QEMU writes the
  stale flags until its last step); drop the old view's references; set COPIED. A crash
  leaves the old view or the new one, with leaks. An L1 table of one sector is overwritten
  in place, as QEMU does; a larger one is written to new clusters and the header switched
  to them, where QEMU overwrites it in place too (a power cut there can leave some entries
  old and some new: a disk that is neither state). A failed in-place write is undone by
  the next flush (the table written back whole).

A sync only where a later write must not reach the disk before an earlier one
(``tests/crash/test_power_loss.py`` removes each in turn): fewer than QEMU, whose flush
between allocating a snapshot table and writing it, and between raising refcounts and
clearing the flags of an inactive view, order nothing a crash could tell apart.

What QEMU refuses, so does this module, with QEMU's words: any snapshot operation on an
image with an external data file; apply on an image with persistent bitmaps (they would not
know the data changed under them).
"""

from __future__ import annotations

import errno
import logging
import struct
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from dirtybits.errors import ImageError, UsageError
from dirtybits.format.qcow2 import refcount as rc
from dirtybits.format.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    INCOMPAT_EXTL2,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
)
from dirtybits.format.qcow2.snapshot import (
    EXTRA_KNOWN,
    MAX_SNAPSHOTS,
    SnapshotTableEntry,
    pack_table,
)
from dirtybits.format.qcow2.tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFT_OFFSET_MASK,
    compressed_offset_bits,
)

if TYPE_CHECKING:
    from dirtybits.qcow2.image import Qcow2Image

log = logging.getLogger(__name__)

_Q = struct.Struct(">Q")


class SnapshotError(ImageError):
    """A snapshot operation QEMU would refuse; ``errno`` is the code QEMU returns."""

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


def _refuse_data_file(img: Qcow2Image) -> None:
    if img.has_data_file:
        raise SnapshotError("Operation not supported", errno=errno.EOPNOTSUPP)


# ------------------------------------------------------------------ lookups
def find(img: Qcow2Image, id_or_name: str) -> int:
    """Index of the snapshot with this ID, else the first with this name (QEMU's
    find_snapshot_by_id_or_name, used to apply and to load); -1 when none."""
    for i, sn in enumerate(img.snapshots):
        if sn.id_str == id_or_name:
            return i
    return find_by_name(img, id_or_name)


def find_by_name(img: Qcow2Image, name: str) -> int:
    """Index of the first snapshot named ``name`` (bdrv_snapshot_find: qemu-img -d)."""
    for i, sn in enumerate(img.snapshots):
        if sn.name == name:
            return i
    return -1


def _new_id(entries: list[SnapshotTableEntry]) -> str:
    """One past the largest numeric ID (strtoul: leading digits, else 0)."""
    top = 0
    for sn in entries:
        digits = ""
        for ch in sn.id_str.lstrip(" \t\n"):
            if not ch.isdigit():
                break
            digits += ch
        top = max(top, int(digits) if digits else 0)
    return str(top + 1)


# ------------------------------------------------------------------ views
def _extl2(img: Qcow2Image) -> bool:
    return bool(img.hc.header.incompatible_features & INCOMPAT_EXTL2)


def _table(img: Qcow2Image, off: int) -> bytes | bytearray:
    tbl = img._l2_cache.get(off)
    if tbl is not None:
        return tbl
    return img._read_exact(img._fd, off, img.cluster_size, "L2 table")


def _check_table_offset(img: Qcow2Image, off: int, what: str) -> None:
    if off & (img.cluster_size - 1) or off >= MAX_HOST_OFFSET:
        raise ImageError(f"{img.path}: {what} offset {off:#x} is invalid")


def _compressed_clusters(img: Qcow2Image, ent: int) -> range:
    cb = img.cluster_bits
    x = compressed_offset_bits(cb)
    host = ent & ((1 << x) - 1)
    end = (host & ~511) + (((ent >> x) & ((1 << (cb - 8)) - 1)) + 1) * 512
    return range(host >> cb, ((end - 1) >> cb) + 1)


def _array(img: Qcow2Image, tbl: bytes | bytearray) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """The table's standard descriptors as native integers (numpy: a snapshot of a 1 TiB
    disk walks 16 million of them)."""
    a = np.frombuffer(bytes(tbl), dtype=">u8").astype(np.uint64)
    return a[::2] if _extl2(img) else a


def references(img: Qcow2Image, l1: list[int]) -> Counter[int]:
    """How many references the view ``l1`` holds on each host cluster: its L2 tables, the
    data and preallocated-zero clusters they name, and each host cluster a compressed
    payload touches (once per compressed cluster, as QEMU counts them)."""
    cb = np.uint64(img.cluster_bits)
    mask, comp_bit = np.uint64(L2E_OFFSET_MASK), np.uint64(OFLAG_COMPRESSED)
    parts: list[np.ndarray[Any, np.dtype[np.uint64]]] = []
    refs: Counter[int] = Counter()
    for ent in l1:
        off = ent & L1E_OFFSET_MASK
        if not off:
            continue
        _check_table_offset(img, off, "L2 table")
        refs[off >> img.cluster_bits] += 1
        e = _array(img, _table(img, off))
        comp = (e & comp_bit) != 0
        hosts = e[~comp] & mask
        parts.append(hosts[hosts != 0] >> cb)
        for ce in e[comp].tolist():
            for c in _compressed_clusters(img, ce):
                refs[c] += 1
    if parts:
        uniq, counts = np.unique(np.concatenate(parts), return_counts=True)
        refs.update(dict(zip(uniq.tolist(), counts.tolist(), strict=True)))
    return refs


def _refcounts(img: Qcow2Image, clusters: np.ndarray[Any, np.dtype[np.uint64]]
               ) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """The in-memory refcount of each cluster (0 past the refcount table)."""
    out = np.zeros(len(clusters), dtype=np.uint64)
    if not len(clusters):
        return out
    order = img._rc_order
    rbb = img._rb_entries_bits
    groups = clusters >> np.uint64(rbb)
    for g in np.unique(groups).tolist():
        sel = np.nonzero(groups == g)[0]
        blk = img._refblock(g, create=False) if g < len(img._reftable) else None
        if blk is None:
            continue
        idx = (clusters[sel] & np.uint64(img._rb_entries - 1)).astype(np.int64)
        if order >= 3:
            view = np.frombuffer(bytes(blk), dtype=f">u{1 << (order - 3)}")
            out[sel] = view[idx].astype(np.uint64)
        else:
            out[sel] = [rc.get_refcount(blk, i, order) for i in idx.tolist()]
    return out


def _add_refcounts(img: Qcow2Image, refs: Counter[int], sign: int) -> list[int]:
    """Add (``sign`` 1) or take away (-1) ``refs`` in memory, a refcount block at a time;
    the clusters that fell to 0 come back (QEMU's update_refcount does the same per
    cluster). The caller has checked the bounds."""
    order = img._rc_order
    rbb = img._rb_entries_bits
    zeros: list[int] = []
    by_block: dict[int, list[tuple[int, int]]] = {}
    for c, k in refs.items():
        by_block.setdefault(c >> rbb, []).append((c, k))
    for g, items in sorted(by_block.items()):
        blk = img._refblock(g, create=True)
        assert blk is not None
        img._rb_dirty.add(img._reftable[g] & REFT_OFFSET_MASK)
        idx = np.array([c & (img._rb_entries - 1) for c, _ in items], dtype=np.int64)
        delta = np.array([k for _, k in items], dtype=np.uint64)
        if order >= 3:
            view = np.frombuffer(blk, dtype=f">u{1 << (order - 3)}")
            cur = view[idx].astype(np.uint64)
            new = cur + delta if sign > 0 else cur - delta
            view[idx] = new
            zeros += [items[i][0] for i in np.nonzero(new == 0)[0].tolist()]
        else:
            for (c, k), i in zip(items, idx.tolist(), strict=True):
                value = rc.get_refcount(blk, i, order) + sign * k
                rc.set_refcount(blk, i, order, value)
                if not value:
                    zeros.append(c)
    for c in zeros:
        img._meta.pop(c, None)
        img._free_hint = min(img._free_hint, c)
    return zeros


def _check_room(img: Qcow2Image, refs: Counter[int]) -> None:
    """Refuse (EINVAL, as QEMU) when a refcount would overflow, as with refcount_bits=1."""
    if refs:
        clusters = np.array(list(refs), dtype=np.uint64)
        counts = np.array(list(refs.values()), dtype=np.uint64)
        if (_refcounts(img, clusters) > np.uint64(img._rc_max) - counts).any():
            raise SnapshotError("Invalid argument", errno=errno.EINVAL)


def _raise_refcounts(img: Qcow2Image, refs: Counter[int]) -> None:
    """Add ``refs`` to the refcounts in memory, all or nothing (an overflow is refused
    before anything changes: QEMU leaks the L1 copy there and answers EINVAL)."""
    _check_room(img, refs)
    _add_refcounts(img, refs, 1)


# what a view's references may name: its tables (the rest is metadata the image owns)
_L2_ROLES = ("inactive L2 table", "active L2 table")
_VIEW_ROLES = (*_L2_ROLES, "inactive L1 table")


def _check_l2_tables(img: Qcow2Image, sn: SnapshotTableEntry, l1: list[int]) -> None:
    """Refuse a snapshot whose L1 table names other metadata as an L2 table (a damaged
    table): made active, its "L2 tables" would be written over the metadata. QEMU finds out
    half-way, at the write, and marks the image corrupt."""
    cb = img.cluster_bits
    for i, ent in enumerate(l1):
        off = ent & L1E_OFFSET_MASK
        role = img._meta.get(off >> cb) if off else None
        if role is not None and role not in _L2_ROLES:
            raise ImageError(f"{img.path}: snapshot {sn.id_str}: L1 entry {i} names the "
                             f"{role} at {off:#x} as an L2 table")


def _drop_refcounts(img: Qcow2Image, refs: Counter[int], *, views: bool = False) -> None:
    """Take ``refs`` away (nothing on disk names them any more); a cluster whose refcount
    is already too low to give them is left alone (it leaks rather than underflows).

    ``views``: the references of a snapshot's or the old active view, as its tables say;
    a damaged table may name the header, a refcount block, the snapshot table or bitmap
    data, or an active L2 table as data: those keep their count (a leak), where QEMU takes it
    and can free and discard the header itself.

    A cluster that falls to 0 is punched out of the file at once, as QEMU does for what
    snapshots free (its discard-snapshot option is on by default): nothing names it and
    nothing can allocate it before the punch.
    """
    cb = img.cluster_bits
    if not refs:
        return
    clusters = np.array(list(refs), dtype=np.uint64)
    have = _refcounts(img, clusters)
    ok: Counter[int] = Counter()
    for c, k, h in zip(clusters.tolist(), refs.values(), have.tolist(), strict=True):
        role = img._meta.get(c)
        if h < k:
            log.warning("%s: cluster %#x has refcount %d, below the %d references of the "
                        "snapshot; left as it is", img.path, c << cb, h, k)
            continue
        if views and role is not None and (role not in _VIEW_ROLES
                                           or (role == "active L2 table" and h <= k)):
            log.warning("%s: a damaged snapshot table names the %s at %#x; its refcount "
                        "(%d) is left as it is", img.path, role, c << cb, h)
            continue
        ok[c] = k
    freed = _add_refcounts(img, ok, -1)
    if img._comp_next and (img._comp_next >> cb) in freed:
        img._comp_next = 0  # free now, may be reused whole: no more compressed bytes into it
    for c in freed:
        img._l2_cache.pop(c << cb, None)
        img._l2_dirty.discard(c << cb)
    img._last_l2_key = -1
    img._last_l2 = None
    img._punch_clusters(freed)


def _fixed_table(img: Qcow2Image, tbl: bytes | bytearray) -> bytearray | None:
    """A copy of ``tbl`` with every COPIED flag right (set iff a plain or
    preallocated-zero cluster has refcount 1), or None when none changes."""
    e = _array(img, tbl)
    copied = np.uint64(OFLAG_COPIED)
    want = e & ~copied
    plain = ((e & np.uint64(OFLAG_COMPRESSED)) == 0) & ((e & np.uint64(L2E_OFFSET_MASK)) != 0)
    pos = np.nonzero(plain)[0]
    if len(pos):
        rcs = _refcounts(img, (e[pos] & np.uint64(L2E_OFFSET_MASK))
                         >> np.uint64(img.cluster_bits))
        want[pos[rcs == 1]] |= copied
    changed = np.nonzero(want != e)[0]
    if not len(changed):
        return None
    out = bytearray(tbl)
    step = 16 if _extl2(img) else 8
    for i, v in zip(changed.tolist(), want[changed].tolist(), strict=True):
        _Q.pack_into(out, i * step, v)
    return out


def _fix_active_copied(img: Qcow2Image) -> None:
    """COPIED in the active L1 and L2 tables from the refcounts in memory (the next flush
    writes them, L2 tables before the L1 table)."""
    cb = img.cluster_bits
    for i, ent in enumerate(img._l1):
        off = ent & L1E_OFFSET_MASK
        if not off:
            continue
        fixed = _fixed_table(img, _table(img, off))
        if fixed is not None:
            cached = img._l2_cache.get(off)
            if cached is not None:
                cached[:] = fixed
            else:
                img._l2_cache[off] = fixed
            img._l2_dirty.add(off)
        want = off | (OFLAG_COPIED if img.get_refcount(off >> cb) == 1 else 0)
        if want != ent:
            img._l1[i] = want
            img._l1_dirty = True
            img._l1_dirty_idx.add(i)
    img._last_l2_key = -1
    img._last_l2 = None


def _fix_inactive_copied(img: Qcow2Image, l1: list[int], skip: set[int]) -> None:
    """COPIED in the surviving L2 tables of an inactive view, written at once (QEMU keeps
    them exact too; ``check`` looks only at the active view, so this is for byte parity)."""
    cb = img.cluster_bits
    for ent in l1:
        off = ent & L1E_OFFSET_MASK
        role = img._meta.get(off >> cb, "inactive L2 table")
        if not off or off in skip or not img.get_refcount(off >> cb) \
                or role not in _L2_ROLES:  # (a damaged table naming other metadata)
            continue
        fixed = _fixed_table(img, _table(img, off))
        if fixed is not None:
            img._pwrite_meta(off, fixed, role)
            cached = img._l2_cache.get(off)
            if cached is not None:
                cached[:] = fixed


def _read_l1(img: Qcow2Image, sn: SnapshotTableEntry) -> list[int]:
    """A snapshot's L1 table, after QEMU's qcow2_validate_table checks."""
    if sn.l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"{img.path}: Snapshot L1 table too large")
    if sn.l1_table_offset & (img.cluster_size - 1) or \
            (1 << 63) - 1 - sn.l1_size * 8 < sn.l1_table_offset:
        raise ImageError(f"{img.path}: Snapshot L1 table offset invalid")
    if not sn.l1_size:
        return []
    raw = img._read_exact(img._fd, sn.l1_table_offset, sn.l1_size * 8, "snapshot L1 table")
    return list(struct.unpack(f">{sn.l1_size}Q", raw))


def _l1_clusters(img: Qcow2Image, offset: int, entries: int) -> range:
    cs = img.cluster_size
    return range(offset >> img.cluster_bits,
                 (offset >> img.cluster_bits) + (entries * 8 + cs - 1) // cs)


# ------------------------------------------------------------------ the table
def _write_table(img: Qcow2Image, entries: list[SnapshotTableEntry]) -> None:
    """Write ``entries`` as a new snapshot table and switch the header to it (QEMU's
    qcow2_write_snapshots): new clusters, durable, then the header, durable, then the old
    table's clusters are released."""
    h = img.hc.header
    data = pack_table(entries, img.size)
    old_off, old_size = h.snapshots_offset, img._snapshots_size
    cb = img.cluster_bits
    off = 0
    if entries:
        n = (len(data) + img.cluster_size - 1) >> cb
        off = img._alloc_clusters(n)
        for i in range(n):
            img._meta[(off >> cb) + i] = "snapshot table"
        img._write_dirty_refblocks()
        img._pwrite_meta(off, data, "snapshot table")
        img._sync()  # the table and its refcounts, durable before the header names it
    # (the header as it is now: the allocation may have moved the refcount table)
    img._set_header(img.hc.header.replace(nb_snapshots=len(entries), snapshots_offset=off))
    if old_off and h.nb_snapshots:
        first = old_off >> cb
        old = Counter(c for c in range(first, ((old_off + max(1, old_size) - 1) >> cb) + 1)
                      if img.get_refcount(c))
        _drop_refcounts(img, old)
    img._snapshots = list(entries)
    img._snapshots_size = len(data)


# ------------------------------------------------------------------ operations
def create(img: Qcow2Image, name: str, *, date_sec: int | None = None,
           date_nsec: int | None = None, vm_clock_nsec: int = 0, vm_state_size: int = 0,
           icount: int = 0) -> SnapshotTableEntry:
    """Take a disk-only snapshot of the active state (``qemu-img snapshot -c NAME``).

    Raises SnapshotError (an external data file: EOPNOTSUPP; 65536 snapshots already: EFBIG;
    a refcount that would overflow, as with refcount_bits=1: EINVAL), ReadOnlyError,
    ImageIOError.
    """
    img._check_writable()
    _refuse_data_file(img)
    if len(img.snapshots) >= MAX_SNAPSHOTS:
        raise SnapshotError("File too large", errno=errno.EFBIG)
    img.flush()
    refs = references(img, img._l1)
    _check_room(img, refs)  # before anything is allocated: a refusal leaks nothing
    if date_sec is None or date_nsec is None:
        now = time.time_ns()
        date_sec, date_nsec = now // 1_000_000_000, now % 1_000_000_000 // 1000 * 1000
    cb = img.cluster_bits
    l1_size = len(img._l1)
    l1_off = 0
    if l1_size:
        clusters = (l1_size * 8 + img.cluster_size - 1) >> cb
        l1_off = img._alloc_clusters(clusters)
        for i in range(clusters):
            img._meta[(l1_off >> cb) + i] = "inactive L1 table"
        # the flags as they are now, as QEMU copies them (only the active view's count)
        img._pwrite_meta(l1_off, struct.pack(f">{l1_size}Q", *img._l1), "inactive L1 table")
    _raise_refcounts(img, refs)
    _fix_active_copied(img)
    img.flush()  # refcounts, then L2 tables, then the L1 table, each durable
    # QEMU keeps a name in a 256-byte C string: longer names are cut to 255 bytes
    name = name.encode("utf-8", errors="surrogateescape")[:255].decode(
        "utf-8", errors="surrogateescape")
    entry = SnapshotTableEntry(
        l1_table_offset=l1_off, l1_size=l1_size, id_str=_new_id(img.snapshots), name=name,
        date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec,
        vm_state_size=vm_state_size, disk_size=img.size, icount=icount,
        extra_data_size=EXTRA_KNOWN)
    _write_table(img, [*img.snapshots, entry])
    img.flush()
    log.info("%s: snapshot %s (%r) created", img.path, entry.id_str, name)
    return entry


def delete(img: Qcow2Image, index: int) -> None:
    """Delete snapshot ``index`` and release what only it referenced.

    Raises SnapshotError (external data file), ImageError (its L1 table is invalid),
    ReadOnlyError, ImageIOError.
    """
    img._check_writable()
    _refuse_data_file(img)
    sn = img.snapshots[index]
    sn_l1 = _read_l1(img, sn)
    img.flush()
    refs = references(img, sn_l1)
    for c in _l1_clusters(img, sn.l1_table_offset, sn.l1_size) if sn.l1_size else ():
        refs[c] += 1
    _write_table(img, [s for i, s in enumerate(img.snapshots) if i != index])
    # nothing on disk names the snapshot now: its references can go
    _drop_refcounts(img, refs, views=True)
    img._write_dirty_refblocks()
    # COPIED set where a refcount fell to 1: in the active tables after the flush's first
    # sync, so after the decrements; an inactive view's flags are trusted by nobody
    active = {e & L1E_OFFSET_MASK for e in img._l1}
    _fix_inactive_copied(img, sn_l1, active)
    _fix_active_copied(img)
    img.flush()
    log.info("%s: snapshot %s (%r) deleted", img.path, sn.id_str, sn.name)


def has_bitmaps(img: Qcow2Image) -> bool:
    """Whether QEMU would load persistent bitmaps from this image."""
    h = img.hc.header
    ext = img.hc.extension(EXT_BITMAPS)
    return bool(ext is not None and h.autoclear_features & AUTOCLEAR_BITMAPS
                and len(ext.data) >= 4 and struct.unpack_from(">I", ext.data, 0)[0])


def apply(img: Qcow2Image, index: int) -> None:
    """Revert the disk to snapshot ``index`` (``qemu-img snapshot -a``); the disk takes the
    snapshot's size.

    Raises SnapshotError (bitmaps: EBUSY, "Device has active dirty bitmaps"; external data
    file; a disk size not a multiple of 512: EINVAL), ImageError (its L1 table is invalid or
    names other metadata as L2 tables), ReadOnlyError, ImageIOError.
    """
    img._check_writable()
    _refuse_data_file(img)
    if has_bitmaps(img):
        raise SnapshotError("Device has active dirty bitmaps", errno=errno.EBUSY)
    sn = img.snapshots[index]
    sn_l1 = _read_l1(img, sn)
    _check_l2_tables(img, sn, sn_l1)
    size = sn.disk_size if sn.disk_size is not None else img.size
    if size % 512:  # QEMU's truncate refuses it, before anything changes
        log.error("The new size must be a multiple of 512")
        raise SnapshotError("Failed to load snapshot: Invalid argument", errno=errno.EINVAL)
    if size > img.size:
        img.resize(size)
    if len(sn_l1) > len(img._l1):
        raise ImageError(f"{img.path}: snapshot {sn.id_str} has an L1 table larger than "
                         "its disk needs")
    img.flush()
    cb = img.cluster_bits
    new_refs = references(img, sn_l1)
    old_l1 = list(img._l1)
    old_refs = references(img, old_l1)
    _raise_refcounts(img, new_refs)
    img._write_dirty_refblocks()
    # the snapshot's own tables lose COPIED (everything they name is shared now), as QEMU
    _fix_inactive_copied(img, sn_l1, set())
    if sn.l1_size:
        cleared = [e & ~OFLAG_COPIED for e in sn_l1]
        if cleared != sn_l1:
            img._pwrite_meta(sn.l1_table_offset, struct.pack(f">{sn.l1_size}Q", *cleared),
                             "inactive L1 table")
    new_l1 = [e & ~OFLAG_COPIED for e in sn_l1] + [0] * (len(old_l1) - len(sn_l1))
    h = img.hc.header
    # the raised refcounts and the cleared flags are durable before the switch (by the
    # sync that makes the new table durable, or by this one)
    if len(new_l1) * 8 > 512:
        # more than one sector, which a power cut may tear into a mix of two views if
        # written in place (as QEMU does): the table goes to new clusters instead, durable,
        # and the header (written whole) switches to it
        _move_l1(img, new_l1)
    elif new_l1:
        img._sync()
        try:
            img._pwrite_meta(h.l1_table_offset, struct.pack(f">{len(new_l1)}Q", *new_l1),
                             "active L1 table")
        except BaseException:
            # part of it may have landed (a short write, a late error): the next flush
            # (the close's) writes the old table back, so the disk shows one view, never a
            # mix of two (both views' refcounts are raised: leaks at worst)
            img._l1_dirty = True
            img._l1_dirty_idx.update(range(len(old_l1)))
            raise
        img._sync()
    img._l1 = new_l1
    img._l1_dirty = False
    img._l1_dirty_idx.clear()
    for ent in old_l1:
        off = ent & L1E_OFFSET_MASK
        if off:
            img._meta[off >> cb] = "inactive L2 table"
    for ent in new_l1:
        off = ent & L1E_OFFSET_MASK
        if off:
            img._meta[off >> cb] = "active L2 table"
    _drop_refcounts(img, old_refs, views=True)
    img._write_dirty_refblocks()
    # COPIED set where a refcount fell to 1 by the flush below, after its first sync; the
    # old view's tables other snapshots still hold get theirs now (check reads only the
    # active view's, so no order is needed)
    _fix_inactive_copied(img, old_l1, {e & L1E_OFFSET_MASK for e in new_l1})
    if size < img.size:
        img._set_header(img.hc.header.replace(size=size))
    _fix_active_copied(img)
    img.flush()
    log.info("%s: snapshot %s (%r) applied", img.path, sn.id_str, sn.name)


def _move_l1(img: Qcow2Image, l1: list[int]) -> None:
    """Make ``l1`` the active L1 table by writing it to new clusters, durable, and switching
    the header to them; the old table's clusters are freed once the header is durable."""
    cb, cs = img.cluster_bits, img.cluster_size
    h = img.hc.header
    n = (len(l1) * 8 + cs - 1) >> cb
    off = img._alloc_clusters(n)
    for i in range(n):
        img._meta[(off >> cb) + i] = "active L1 table"
    raw = struct.pack(f">{len(l1)}Q", *l1)
    img._write_dirty_refblocks()
    img._pwrite_meta(off, raw + bytes(n * cs - len(raw)), "active L1 table")
    img._sync()
    # (the header as it is now: the allocation may have moved the refcount table)
    img._set_header(img.hc.header.replace(l1_table_offset=off))
    old = h.l1_table_offset >> cb
    _drop_refcounts(img, Counter(range(old, old + n)))


def load(img: Qcow2Image, index: int) -> None:
    """Show snapshot ``index`` instead of the active state, read-only (QEMU's
    qcow2_snapshot_load_tmp, for ``convert -l``). Raises UsageError on a writable image,
    ImageError when the snapshot's L1 table is invalid."""
    if not img.readonly:
        raise UsageError("a snapshot can only be loaded into a read-only image")
    sn = img.snapshots[index]
    sn_l1 = _read_l1(img, sn)
    need = len(img._l1)
    img._l1 = sn_l1 + [0] * max(0, need - len(sn_l1))
    img._l2_cache.clear()
    img._last_l2_key = -1
    img._last_l2 = None
    img._decomp_key = -1
