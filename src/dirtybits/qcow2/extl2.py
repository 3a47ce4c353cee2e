"""Extended L2 entries (subclusters): the engine for images with incompatible bit 4.

Each L2 entry is 128 bits: the standard 64-bit descriptor (its bit 0, the zero flag, is
reserved) and a subcluster bitmap, bits 0-31 "subcluster x is allocated" (read from the host
cluster), bits 32-63 "subcluster x reads as zeros". A cluster has 32 subclusters. The rules
are QEMU 7.2's (block/qcow2-cluster.c, qcow2.h qcow2_get_subcluster_type):

* an allocated cluster (a host offset, or COPIED with an external data file) whose bitmap
  has a subcluster both allocated and zero, or an unallocated one with any allocated bit, is
  invalid: QEMU signals corruption on any read or write of it, and so does this engine;
* a compressed cluster ignores its bitmap (``check`` reports a non-zero one);
* a write to a cluster without a writable host cluster allocates one but writes only the
  subclusters it touches (copy-on-write of the partially covered ones' edges); a write into
  a host cluster it owns (COPIED) writes in place and sets the allocation bits it covered;
* write-zeroes works per subcluster (zero bits), discard per cluster (QEMU 7.2 has no
  subcluster discard).

A subclass, so the standard engine's hot paths (``Qcow2Image._read_into`` and ``write``) keep
their code and speed; everything else (refcounts, flush order, backing files, data files,
resize, bitmaps) is inherited unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from dirtybits.format.qcow2.header import MAX_HOST_OFFSET
from dirtybits.format.qcow2.tables import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    compressed_descriptor,
    compressed_offset_bits,
)
from dirtybits.osfile import punch_hole
from dirtybits.qcow2.extent import MapExtent
from dirtybits.qcow2.image import Buffer, Qcow2Image

_QQ = struct.Struct(">QQ")
_unpack_qq = _QQ.unpack_from
_pack_qq = _QQ.pack_into

SUBCLUSTERS = 32
ALL_ALLOC = (1 << 32) - 1  # QCOW_L2_BITMAP_ALL_ALLOC
ALL_ZERO = ALL_ALLOC << 32  # QCOW_L2_BITMAP_ALL_ZEROES

# subcluster types (QCow2SubclusterType)
UNALLOC, NORMAL, ZERO_PLAIN, COMPRESSED, ZERO_ALLOC, UNALLOC_ALLOC = range(6)


def sc_range(first: int, end: int) -> int:
    """Allocation bits of subclusters ``[first, end)`` (QCOW_OFLAG_SUB_ALLOC_RANGE)."""
    return ((1 << end) - 1) ^ ((1 << first) - 1)


def bitmap_invalid(allocated: bool, bitmap: int) -> bool:
    """QEMU's QCOW2_SUBCLUSTER_INVALID for a cluster that is not compressed."""
    if allocated:
        return bool((bitmap >> 32) & bitmap & ALL_ALLOC)
    return bool(bitmap & ALL_ALLOC)


def sc_type(allocated: bool, bitmap: int, sc: int) -> int:
    """The type of subcluster ``sc`` of a valid, uncompressed cluster."""
    if bitmap >> (32 + sc) & 1:
        return ZERO_ALLOC if allocated else ZERO_PLAIN
    if allocated:
        return NORMAL if bitmap >> sc & 1 else UNALLOC_ALLOC
    return UNALLOC


def _set_bits(first: int, last: int, bitmap: int) -> int:
    """``bitmap`` with subclusters [first, last) allocated and not zero (link_l2)."""
    r = sc_range(first, last)
    return (bitmap | r) & ~(r << 32)


def _ctz32(x: int) -> int:
    return (x & -x).bit_length() - 1 if x else 32


def _clz32(x: int) -> int:
    return 32 - x.bit_length()


class Qcow2ExtL2Image(Qcow2Image):
    """An open qcow2 image with extended L2 entries; opened through ``Qcow2Image.open``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # subcluster bitmap (and "allocated" as bit 64) -> runs a read walks
        self._runs_memo: dict[int, tuple[tuple[int, int, int], ...]] = {}

    # ------------------------------------------------------------------ entries
    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // SUBCLUSTERS

    def _scb(self) -> int:
        return self.cluster_bits - 5

    def _allocated(self, ent: int) -> bool:
        return bool(ent & L2E_OFFSET_MASK or ent & self._dfa)

    def _invalid(self, l1i: int, idx: int) -> None:
        self._signal_or_raise(f"Invalid cluster entry found (L2 offset: "
                              f"{self._l1[l1i] & L1E_OFFSET_MASK:#x}, L2 index: {idx:#x})")

    def _checked(self, l1i: int, idx: int, ent: int, bm: int) -> bool:
        """Validate an uncompressed entry (signals corruption); return whether allocated."""
        allocated = self._allocated(ent)
        if bitmap_invalid(allocated, bm):
            self._invalid(l1i, idx)
        host = ent & L2E_OFFSET_MASK
        if host & self._cmask or host >= MAX_HOST_OFFSET:
            self._signal_or_raise(
                f"Cluster allocation offset {host:#x} unaligned (L2 offset: "
                f"{self._l1[l1i] & L1E_OFFSET_MASK:#x}, L2 index: {idx:#x})")
        return allocated

    def _entry(self, goff: int) -> int:
        cb = self.cluster_bits
        tbl = self._l2_table(goff >> (cb + self.l2_bits), allocate=False)
        if tbl is None:
            return 0
        return int(_unpack_qq(tbl, ((goff >> cb) & (self.l2_entries - 1)) * 16)[0])

    def entry_pair(self, goff: int) -> tuple[int, int]:
        """(descriptor, subcluster bitmap) of the cluster holding ``goff`` (tests, tools)."""
        cb = self.cluster_bits
        tbl = self._l2_table(goff >> (cb + self.l2_bits), allocate=False)
        if tbl is None:
            return 0, 0
        ent, bm = _unpack_qq(tbl, ((goff >> cb) & (self.l2_entries - 1)) * 16)
        return int(ent), int(bm)

    def guest_clusters(self) -> set[int]:
        cb, cs = self.cluster_bits, self.cluster_size
        x = compressed_offset_bits(cb)
        out: set[int] = set()
        for l1e in self._l1:
            off = l1e & L1E_OFFSET_MASK
            if not off:
                continue
            out.add(off >> cb)
            tbl = self._l2_cache.get(off)
            raw = bytes(tbl) if tbl is not None else self._read_exact(self._fd, off, cs,
                                                                      "L2 table")
            for e in struct.unpack(f">{cs // 8}Q", raw)[0::2]:
                if e & OFLAG_COMPRESSED:
                    host = e & ((1 << x) - 1)
                    end = (host & ~511) + (((e >> x) & ((1 << (cb - 8)) - 1)) + 1) * 512
                    out.update(range(host >> cb, ((end - 1) >> cb) + 1))
                elif e & L2E_OFFSET_MASK and not self._uses_data_file:
                    out.add((e & L2E_OFFSET_MASK) >> cb)
        return out

    # ------------------------------------------------------------------ read
    def _cluster_runs(self, l1i: int, idx: int, ent: int,
                      bm: int) -> tuple[tuple[int, int, int], ...]:
        """Runs ``(start, end, kind)`` (bytes in the cluster) of an uncompressed cluster as a
        read sees them: NORMAL (host), ZERO_PLAIN (zeros) or UNALLOC (backing / zeros).
        Memoized by bitmap; an invalid entry signals corruption."""
        allocated = self._checked(l1i, idx, ent, bm)
        key = bm | (allocated << 64)
        runs = self._runs_memo.get(key)
        if runs is not None:
            return runs
        scb = self._scb()
        out: list[tuple[int, int, int]] = []
        for sc in range(SUBCLUSTERS):
            kind = sc_type(allocated, bm, sc)
            kind = (ZERO_PLAIN if kind in (ZERO_PLAIN, ZERO_ALLOC)
                    else UNALLOC if kind in (UNALLOC, UNALLOC_ALLOC) else NORMAL)
            if out and out[-1][2] == kind:
                out[-1] = (out[-1][0], (sc + 1) << scb, kind)
            else:
                out.append((sc << scb, (sc + 1) << scb, kind))
        if len(self._runs_memo) > 4096:
            self._runs_memo.clear()
        runs = self._runs_memo[key] = tuple(out)
        return runs

    def _read_unallocated(self, goff: int, view: memoryview) -> None:
        n = len(view)
        backing = self.backing
        if backing is not None and goff < backing.size:
            m = min(n, backing.size - goff)
            backing.read_into(goff, view[:m])  # straight into the caller's buffer
            if m < n:
                view[m:] = bytes(n - m)
        else:
            view[:] = bytes(n)

    def _read_into(self, offset: int, view: memoryview) -> None:
        """Read by runs of subclusters of one kind, merged across clusters (one pread per
        run of host-contiguous data, one backing read per run of unallocated subclusters)."""
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = cs - 1
        l2b = self.l2_bits
        l2mask = self.l2_entries - 1
        dfa = self._dfa
        memo = self._runs_memo
        data_fd = self._data_fd
        total = len(view)
        # the pending run: kind (-1: none), view range, host offset of its start
        pk, pstart, pend, phost = -1, 0, 0, 0

        def emit() -> None:
            if pk == NORMAL:
                self._pread_into(data_fd, phost, view[pstart:pend])
            elif pk == ZERO_PLAIN:
                view[pstart:pend] = bytes(pend - pstart)
            elif pk == UNALLOC:
                self._read_unallocated(offset + pstart, view[pstart:pend])

        pos = 0
        while pos < total:
            goff = offset + pos
            l1i = goff >> (cb + l2b)
            tbl = self._l2_table(l1i, allocate=False)
            stop = min(total, ((l1i + 1) << (cb + l2b)) - offset)
            if tbl is None:
                if pk == UNALLOC and pend == pos:
                    pend = stop
                else:
                    emit()
                    pk, pstart, pend = UNALLOC, pos, stop
                pos = stop
                continue
            while pos < stop:
                goff = offset + pos
                idx = (goff >> cb) & l2mask
                ent, bm = _unpack_qq(tbl, idx * 16)
                in_cluster = goff & cmask
                base = pos - in_cluster  # view position of the cluster's start
                cend = min(cs, stop - base)
                if ent & OFLAG_COMPRESSED:
                    emit()
                    pk = -1
                    data = self._decompress(ent, goff)
                    view[pos:base + cend] = data[in_cluster:cend]
                    pos = base + cend
                    continue
                host = ent & L2E_OFFSET_MASK
                allocated = bool(host or ent & dfa)
                runs = memo.get(bm | (allocated << 64))
                if runs is None:
                    runs = self._cluster_runs(l1i, idx, ent, bm)
                if host & cmask or host >= MAX_HOST_OFFSET:
                    self._checked(l1i, idx, ent, bm)
                for a, b, kind in runs:
                    if b <= in_cluster:
                        continue
                    if a >= cend:
                        break
                    a = max(a, in_cluster)
                    vs = base + a
                    ve = base + min(b, cend)
                    if kind == pk and pend == vs and (kind != NORMAL
                                                      or phost + (vs - pstart) == host + a):
                        pend = ve
                    else:
                        emit()
                        pk, pstart, pend, phost = kind, vs, ve, host + a
                pos = base + cend
        emit()

    # ------------------------------------------------------------------ write
    def write(self, offset: int, data: Buffer, *, compress: bool = False) -> None:
        if compress:  # whole clusters: the base class packs them (_write_compressed_cluster)
            super().write(offset, data, compress=True)
            return
        self._check_writable()
        length = len(data)
        self._check_request(offset, length)
        if not length:
            return
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        cb = self.cluster_bits
        l2b = self.l2_bits
        pos = 0
        while pos < length:
            goff = offset + pos
            l1i = goff >> (cb + l2b)
            tbl = self._l2_table(l1i, allocate=True)
            assert tbl is not None
            stop = min(length, ((l1i + 1) << (cb + l2b)) - offset)
            while pos < stop:
                idx = ((offset + pos) >> cb) & (self.l2_entries - 1)
                ent = _unpack_qq(tbl, idx * 16)[0]
                if self._in_place(ent):
                    pos = self._write_in_place(tbl, l1i, offset, pos, stop, view)
                else:
                    pos = self._write_new(tbl, l1i, offset, pos, stop, view)
        if self._writethrough:
            self.flush()

    def _write_compressed_cluster(self, goff: int, payload: bytes) -> None:
        """The base class's, with a 16-byte entry: a compressed cluster's subcluster bitmap
        is 0 (qcow2.txt; QEMU writes it so)."""
        cb = self.cluster_bits
        l1i = goff >> (cb + self.l2_bits)
        tbl = self._l2_table(l1i, allocate=True)
        assert tbl is not None
        idx = (goff >> cb) & (self.l2_entries - 1)
        host = self._alloc_compressed_bytes(len(payload))
        self._write_data(host, payload)
        tbl = self._l2_table(l1i, allocate=True)  # the same table, still cached
        assert tbl is not None
        old = _unpack_qq(tbl, idx * 16)[0]
        _pack_qq(tbl, idx * 16, compressed_descriptor(host, len(payload), cb), 0)
        self._decomp_key = -1
        self._l2_dirty.add(self._l2_offset_of(l1i))
        if old:
            self._release_entry(old)

    def _guest_bytes(self, goff: int, length: int) -> bytearray:
        """What the guest reads at ``[goff, goff+length)`` now (copy-on-write source)."""
        out = bytearray(length)
        if length:
            self._read_into(goff, memoryview(out))
        return out

    def _write_in_place(self, tbl: bytearray, l1i: int, offset: int, pos: int, stop: int,
                        view: memoryview) -> int:
        """Write into host clusters this image owns (QEMU's handle_copied, keep_old): data
        in place, copy-on-write only of the edges of partly covered subclusters that were
        not allocated, then the allocation bits (at flush, after the data)."""
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = cs - 1
        scb = cb - 5
        scmask = (1 << scb) - 1
        l2mask = self.l2_entries - 1
        goff = offset + pos
        idx = (goff >> cb) & l2mask
        ent = _unpack_qq(tbl, idx * 16)[0]
        host = ent & L2E_OFFSET_MASK
        if host & cmask or host >= MAX_HOST_OFFSET:
            self._signal_or_raise(f"Data cluster offset {host:#x} unaligned "
                                  f"(guest offset: {goff & ~cmask:#x})")
        in_cluster = goff & cmask
        n = min(cs - in_cluster, stop - pos)
        count = 1
        while pos + n < stop and idx + count <= l2mask:
            nent = _unpack_qq(tbl, (idx + count) * 16)[0]
            if not self._in_place(nent) or (nent & L2E_OFFSET_MASK) != host + (count << cb):
                break
            n = min(n + cs, stop - pos)
            count += 1
        pairs = [_unpack_qq(tbl, (idx + i) * 16) for i in range(count)]
        if all(b == ALL_ALLOC for _, b in pairs):
            self._write_data(host + in_cluster, view[pos:pos + n])
            return pos + n
        for i, (_e, b) in enumerate(pairs):
            if bitmap_invalid(True, b):
                self._invalid(l1i, idx + i)
        # edges: a partly written first/last subcluster that was not allocated
        first_sc = in_cluster >> scb
        wstart = in_cluster
        if in_cluster & scmask and sc_type(True, pairs[0][1], first_sc) != NORMAL:
            wstart = first_sc << scb
        rel_end = in_cluster + n  # relative to the first cluster
        last_off = (rel_end - 1) & cmask
        last_sc = last_off >> scb
        wend = rel_end
        if rel_end & scmask and sc_type(True, pairs[-1][1], last_sc) != NORMAL:
            wend = (rel_end + scmask) & ~scmask
        base = goff - in_cluster
        if wstart == in_cluster and wend == rel_end:
            buf: Buffer = view[pos:pos + n]
        else:
            buf = (self._guest_bytes(base + wstart, in_cluster - wstart) + view[pos:pos + n]
                   + self._guest_bytes(base + rel_end, wend - rel_end))
        self._write_data(host + wstart, buf)
        changed = False
        for i, (e, b) in enumerate(pairs):
            lo = max(wstart, i << cb) - (i << cb)
            hi = min(wend, (i + 1) << cb) - (i << cb)
            nb = _set_bits(lo >> scb, ((hi - 1) >> scb) + 1, b)
            if nb != b:
                _pack_qq(tbl, (idx + i) * 16, e, nb)
                changed = True
        if changed:
            self._l2_dirty.add(self._l2_offset_of(l1i))
        return pos + n

    def _write_new(self, tbl: bytearray, l1i: int, offset: int, pos: int, stop: int,
                   view: memoryview) -> int:
        """Write into clusters that need a new host cluster (QEMU's handle_alloc): only the
        subclusters the write touches are written and marked, with copy-on-write of the
        partly covered ones' edges (and of the old cluster's allocated subclusters when it
        had a host cluster it shared or was compressed)."""
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = cs - 1
        scb = cb - 5
        scmask = (1 << scb) - 1
        l2mask = self.l2_entries - 1
        goff = offset + pos
        first_idx = (goff >> cb) & l2mask
        end_goff = offset + stop
        last_idx_excl = ((end_goff - 1) >> cb & l2mask) + 1
        olds: list[tuple[int, int]] = []
        for i in range(first_idx, last_idx_excl):
            e, b = _unpack_qq(tbl, i * 16)
            if self._in_place(e):
                break
            if not e & OFLAG_COMPRESSED and bitmap_invalid(self._allocated(e), b):
                self._invalid(l1i, i)
            olds.append((e, b))
        count = len(olds)
        cluster_start = goff & ~cmask
        run_end = min(end_goff, cluster_start + (count << cb))
        in_cluster = goff - cluster_start
        # where the copy-on-write starts in the first cluster (calculate_l2_meta)
        e0, b0 = olds[0]
        sc0 = in_cluster >> scb
        if e0 & OFLAG_COMPRESSED:
            cow_from = 0
        elif self._allocated(e0):
            cow_from = min(sc0, _ctz32(b0 & ALL_ALLOC)) << scb
        else:
            cow_from = sc0 << scb
        # where it ends in the last cluster (relative to the run start)
        el, bl = olds[-1]
        last_base = (count - 1) << cb
        rel_end = run_end - cluster_start
        scl = ((rel_end - 1) & cmask) >> scb
        if el & OFLAG_COMPRESSED:
            cow_to = count << cb
        elif self._allocated(el):
            cow_to = (count << cb) - (min(SUBCLUSTERS - scl - 1, _clz32(bl & ALL_ALLOC)) << scb)
        else:
            cow_to = last_base + ((rel_end - last_base + scmask) & ~scmask)
        if self.has_data_file:
            host = cluster_start  # external data files map guest offsets 1:1
            # never grow the data file past the disk
            cow_to = min(cow_to, max(rel_end, self.hc.header.size - cluster_start))
        else:
            host = self._alloc_clusters(count)
        data_len = run_end - goff
        if cow_from == in_cluster and cow_to == rel_end:
            buf: Buffer = view[pos:pos + data_len]
        else:
            buf = (self._guest_bytes(cluster_start + cow_from, in_cluster - cow_from)
                   + view[pos:pos + data_len]
                   + self._guest_bytes(run_end, cow_to - rel_end))
        self._write_data(host + cow_from, buf)
        for i, (e, b) in enumerate(olds):
            lo = max(cow_from, i << cb) - (i << cb)
            hi = min(cow_to, (i + 1) << cb) - (i << cb)
            base_bm = 0 if e & OFLAG_COMPRESSED else b
            nb = _set_bits(lo >> scb, ((hi - 1) >> scb) + 1, base_bm)
            _pack_qq(tbl, (first_idx + i) * 16, (host + (i << cb)) | OFLAG_COPIED, nb)
        # dirty before the releases: a flush they trigger must write the table first
        self._l2_dirty.add(self._l2_offset_of(l1i))
        for e, _b in olds:
            if not self.has_data_file or (e & L2E_OFFSET_MASK) != host:
                self._release_entry(e)
        return pos + data_len

    # ------------------------------------------------------------------ zeroes / discard
    def _is_zero(self, offset: int, length: int) -> bool:
        """QEMU's is_zero: the range reads as zero by block status (clamped to the disk)."""
        length = min(length, self.size - offset)
        if length <= 0:
            return True
        return all(e.zero for e in self.block_status(offset, length))

    def _reads_as_zero(self, offset: int, length: int) -> bool:
        return self._is_zero(offset, length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """QEMU 7.2's write-zeroes: the block layer cuts the request at subcluster
        boundaries; an unaligned piece becomes a zero subcluster when the rest of that
        subcluster reads as zero already, else zero bytes are written; aligned pieces set
        zero bits (whole clusters: the L2 entry, unmapped with ``unmap``)."""
        scs = self.subcluster_size
        end = offset + length
        tail = end % scs
        head = offset % scs
        pos = offset
        while pos < end:
            num = end - pos
            if head:
                num = min(num, scs - head)
                head = 0
            elif tail and num > scs:
                num -= tail
            self._zero_piece(pos, num, unmap)
            pos += num

    def _zero_piece(self, offset: int, length: int, unmap: bool) -> None:
        scs = self.subcluster_size
        size = self.size
        head = offset % scs
        end = offset + length
        tail = 0 if end == size else (-end) % scs
        if head or tail:
            start = offset - head
            if not (self._is_zero(start, head) and self._is_zero(end, tail)
                    and self._subcluster_kind(start) in (UNALLOC, UNALLOC_ALLOC, ZERO_PLAIN,
                                                         ZERO_ALLOC)):
                self._write_zero_data(offset, length)
                return
            offset, length = start, scs
        if not self._zeroize(offset, length, unmap):
            self._write_zero_data(offset, length)

    def _subcluster_kind(self, goff: int) -> int:
        cb = self.cluster_bits
        l1i = goff >> (cb + self.l2_bits)
        tbl = self._l2_table(l1i, allocate=False)
        if tbl is None:
            return UNALLOC
        idx = (goff >> cb) & (self.l2_entries - 1)
        ent, bm = _unpack_qq(tbl, idx * 16)
        if ent & OFLAG_COMPRESSED:
            return COMPRESSED
        allocated = self._checked(l1i, idx, ent, bm)
        return sc_type(allocated, bm, (goff & self._cmask) >> self._scb())

    def _write_zero_data(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zero = bytes(min(chunk, length))
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            self.write(offset, zero[:n])
            offset += n

    def _zeroize(self, offset: int, length: int, unmap: bool) -> bool:
        """qcow2_subcluster_zeroize; False where QEMU returns ENOTSUP (a compressed cluster
        partly zeroed), after doing what it does before that."""
        cs = self.cluster_size
        scs = self.subcluster_size
        end = offset + length
        if self.has_data_file and self.data_file_raw:
            # the raw data file must read as the disk: zero it there first (as QEMU)
            n = max(0, min(end, self.size) - offset)
            self._unsynced = True
            if n and not punch_hole(self._data_fd, offset, n):
                zero = bytes(min(n, 1 << 20))
                for o in range(offset, offset + n, len(zero)):
                    self._pwrite(self._data_fd, o, zero[:min(len(zero), offset + n - o)])
        head = min(end, (offset + cs - 1) & ~(cs - 1)) - offset
        offset += head
        tail = 0 if end >= self.size else end - max(offset, end & ~(cs - 1))
        end -= tail
        if head and not self._zero_subclusters(offset - head, -(-head // scs)):
            return False
        if end > offset:
            self._zero_clusters(offset, end - offset, unmap=unmap, discard=False)
        return not tail or self._zero_subclusters(end, -(-tail // scs))

    def _zero_subclusters(self, goff: int, nsc: int) -> bool:
        """zero_l2_subclusters: set zero bits (and clear allocation bits) of part of one
        cluster; False for a compressed cluster."""
        cb = self.cluster_bits
        l1i = goff >> (cb + self.l2_bits)
        tbl = self._l2_table(l1i, allocate=True)
        assert tbl is not None
        idx = (goff >> cb) & (self.l2_entries - 1)
        ent, bm = _unpack_qq(tbl, idx * 16)
        if ent & OFLAG_COMPRESSED:
            return False
        sc = (goff & self._cmask) >> self._scb()
        r = sc_range(sc, sc + nsc)
        nb = (bm | r << 32) & ~r
        if nb != bm:
            _pack_qq(tbl, idx * 16, ent, nb)
            self._l2_dirty.add(self._l2_offset_of(l1i))
        return True

    def _zero_clusters(self, offset: int, length: int, *, unmap: bool, discard: bool) -> None:
        """Whole clusters: write-zeroes (zero_in_l2_slice) or discard (discard_in_l2_slice)
        with extended entries: the bitmap says all zeros, the descriptor is dropped when the
        host cluster goes."""
        cb = self.cluster_bits
        l2b = self.l2_bits
        l2mask = self.l2_entries - 1
        has_backing = self.backing is not None or bool(self.hc.backing_name)
        goff = offset
        end = offset + length
        while goff < end:
            l1i = goff >> (cb + l2b)
            table_end = min(end, (l1i + 1) << (cb + l2b))
            tbl = self._l2_table(l1i, allocate=False)
            if tbl is None:
                if discard and not has_backing:
                    goff = table_end
                    continue
                tbl = self._l2_table(l1i, allocate=True)
                assert tbl is not None
            elif not self._l1[l1i] & OFLAG_COPIED:
                tbl = self._l2_table(l1i, allocate=True)  # shared with a snapshot: copy it
                assert tbl is not None
            l2off = self._l2_offset_of(l1i)
            while goff < table_end:
                idx = (goff >> cb) & l2mask
                ent, bm = _unpack_qq(tbl, idx * 16)
                compressed = ent & OFLAG_COMPRESSED
                allocated = bool(compressed) or self._allocated(ent)
                release = 0
                if discard:
                    if has_backing or allocated:
                        new, nbm, release = 0, ALL_ZERO, ent
                    else:
                        new, nbm = ent, bm
                elif compressed or (allocated and unmap):  # a shared cluster stays
                    new, nbm, release = 0, ALL_ZERO, ent
                else:
                    new, nbm = ent, ALL_ZERO
                if (new, nbm) != (ent, bm):
                    _pack_qq(tbl, idx * 16, new, nbm)
                    # dirty first: a flush the release triggers must write the table
                    self._l2_dirty.add(l2off)
                    if release:
                        self._release_entry(release, discard=True)
                goff += 1 << cb

    def _preallocate_raw_mapping(self, start: int, end: int) -> None:
        """data_file_raw: every cluster maps 1:1 onto the data file; as QEMU's metadata
        preallocation, the bitmap stays 0 (subclusters allocated-but-unwritten)."""
        cb = self.cluster_bits
        l2mask = self.l2_entries - 1
        goff = start & ~self._cmask
        while goff < end:
            l1i = goff >> (cb + self.l2_bits)
            tbl = self._l2_table(l1i, allocate=True)
            assert tbl is not None
            table_end = min(end, (l1i + 1) << (cb + self.l2_bits))
            while goff < table_end:
                idx = (goff >> cb) & l2mask
                ent, bm = _unpack_qq(tbl, idx * 16)
                if not ent:
                    _pack_qq(tbl, idx * 16, goff | OFLAG_COPIED, bm)
                goff += 1 << cb
            self._l2_dirty.add(self._l2_offset_of(l1i))

    # ------------------------------------------------------------------ block status
    def _raw_status(self, offset: int, end: int) -> Iterator[MapExtent]:
        """Runs of subclusters of one type (qcow2_get_host_offset), cluster by cluster;
        ``block_status`` merges them as qemu-img map does."""
        cb = self.cluster_bits
        cs = self.cluster_size
        scb = cb - 5
        span_bits = cb + self.l2_bits
        fname = self._data_file_path or self.path
        goff = offset
        while goff < end:
            l1i = goff >> span_bits
            span_end = min(end, (l1i + 1) << span_bits)
            tbl = self._l2_table(l1i, allocate=False)
            if tbl is None:
                yield from self._unallocated_status(goff, span_end - goff)
                goff = span_end
                continue
            while goff < span_end:
                idx = (goff >> cb) & (self.l2_entries - 1)
                ent, bm = _unpack_qq(tbl, idx * 16)
                base = goff & ~(cs - 1)
                cend = min(span_end, base + cs)
                if ent & OFLAG_COMPRESSED:
                    yield MapExtent(goff, cend - goff, 0, True, False, True, None, self.path,
                                    compressed=True)
                    goff = cend
                    continue
                allocated = self._checked(l1i, idx, ent, bm)
                host = ent & L2E_OFFSET_MASK
                a = goff - base
                stop = cend - base
                while a < stop:
                    kind = sc_type(allocated, bm, a >> scb)
                    b = min(stop, ((a >> scb) + 1) << scb)
                    while b < stop and sc_type(allocated, bm, b >> scb) == kind:
                        b = min(stop, b + (1 << scb))
                    yield from self._kind_extent(kind, base + a, b - a, host + a, fname)
                    a = b
                goff = cend

    def _kind_extent(self, kind: int, start: int, n: int, host: int,
                     fname: str) -> Iterator[MapExtent]:
        if kind == NORMAL:
            yield MapExtent(start, n, 0, True, False, True, host, fname)
        elif kind == ZERO_ALLOC:
            yield MapExtent(start, n, 0, True, True, False, host, fname)
        elif kind == ZERO_PLAIN:
            yield MapExtent(start, n, 0, True, True, False)
        elif kind == UNALLOC_ALLOC:
            # not allocated here: the backing file's status where it reaches; past it (or
            # without one) zero, with the host offset QEMU reports
            m = max(0, min(n, self.backing.size - start)) if self.backing is not None else 0
            if m:
                yield from self._unallocated_status(start, m)
            if m < n:
                yield MapExtent(start + m, n - m, 0, False, True, False, host + m, fname)
        else:
            yield from self._unallocated_status(start, n)
