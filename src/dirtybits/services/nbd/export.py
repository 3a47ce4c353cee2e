"""An NBD export: a block node shared under a name, and the block-thread work of its requests.

An export is made on the block thread (``create_export``): the bitmaps it shares are checked
as QEMU checks them (found on the node, not busy, not inconsistent, not an enabled bitmap
under a read-only export of a writable node) and marked busy with the export as owner until
it is closed, so nothing merges into or clears a bitmap a client is reading. The functions
here (``read_pieces``, ``status_extents``) each run as one call on the block thread: they
return plain data for the event loop to send.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dirtybits.block.node import BlockNode
from dirtybits.errors import DirtybitsError
from dirtybits.proto.nbd import status
from dirtybits.proto.nbd.constants import (
    CONTEXT_ALLOCATION_DEPTH,
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_DIRTY_BITMAP,
    NBD_MAX_BUFFER_SIZE,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    TransmissionFlag,
)
from dirtybits.proto.nbd.server import ExportView

log = logging.getLogger(__name__)

TF = TransmissionFlag
SECTOR = 512


ZERO_COPY_MIN = 64 << 10  # shorter runs are read and sent from a buffer: one chunk, not many


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk of a READ reply: ``buf`` (header space, then the data), a hole (no
    ``buf``, no ``fd``), or ``length`` bytes at ``host`` in the file ``fd`` (zero copy)."""

    offset: int
    length: int
    buf: bytearray | None
    fd: int | None = None
    host: int = 0


class ExportError(DirtybitsError):
    """An export cannot be made or changed (QEMU's text)."""


@dataclass
class ExportSpec:
    """What ``block-export-add`` / ``qemu-nbd`` ask for."""

    id: str
    name: str
    description: str = ""
    writable: bool = False
    bitmaps: list[str] = field(default_factory=list)
    allocation_depth: bool = False
    multi_conn: bool | None = None  # None: QEMU's auto (on for read-only exports)
    writethrough: bool = False  # flush after every write (block-export-add's writethrough)
    detect_zeroes: str = "off"  # off | on | unmap: a write of zeroes becomes write-zeroes


class NbdExport:
    """One export. ``view`` is what negotiation shows; ``owner`` marks its bitmaps busy."""

    def __init__(self, spec: ExportSpec, node: BlockNode) -> None:
        self.spec = spec
        self.node = node
        self.id = spec.id
        self.name = spec.name
        self.owner = f"nbd export '{spec.id}'"
        # QEMU sees whole sectors: a raw file of 1000 bytes is a 1024-byte disk whose tail
        # reads as zeroes
        self.size = -(-node.size // SECTOR) * SECTOR
        self.writable = spec.writable
        self.closed = False
        self._edges: dict[str, tuple[bool, Any]] = {}  # read-only node: runs read once
        flags = (TF.NBD_FLAG_HAS_FLAGS | TF.NBD_FLAG_SEND_FLUSH | TF.NBD_FLAG_SEND_FUA
                 | TF.NBD_FLAG_SEND_CACHE)
        if spec.writable:
            flags |= (TF.NBD_FLAG_SEND_TRIM | TF.NBD_FLAG_SEND_WRITE_ZEROES
                      | TF.NBD_FLAG_SEND_FAST_ZERO)
        else:
            flags |= TF.NBD_FLAG_READ_ONLY
        multi = spec.multi_conn if spec.multi_conn is not None else not spec.writable
        if multi:
            flags |= TF.NBD_FLAG_CAN_MULTI_CONN
        self.view = ExportView(
            name=spec.name, size=self.size, flags=flags, description=spec.description,
            allocation_depth=spec.allocation_depth, bitmaps=tuple(spec.bitmaps),
            max_block=NBD_MAX_BUFFER_SIZE)

    # ---------------------------------------------------------------- life (block thread)
    def close(self) -> None:
        """Give the bitmaps back (block thread); idempotent."""
        if self.closed:
            return
        self.closed = True
        for name in self.spec.bitmaps:
            try:
                if self.node.bitmaps.find(name) is not None:
                    self.node.bitmaps.set_busy(name, None)
            except DirtybitsError as exc:  # the node went away under us: nothing to give back
                log.debug("export %s: freeing bitmap %s: %s", self.id, name, exc)

    # ---------------------------------------------------------------- requests (block thread)
    def read_pieces(self, offset: int, length: int, header: int, sparse: bool,
                    zero_copy: bool = False) -> list[Piece]:
        """The READ of ``[offset, offset+length)`` as pieces, each one reply chunk: data in a
        buffer with ``header`` bytes free in front (the chunk is sent as one buffer), a hole
        (``sparse``: zero ranges become hole chunks, as QEMU's ``nbd_co_send_sparse_read``),
        or (``zero_copy``, a read-only node only: its mapping never changes; not with cache
        modes that bypass the page cache) a run of the image file to send from the page
        cache with ``os.sendfile``."""
        node = self.node
        real = max(0, min(length, node.size - offset))  # the rest: the sector's zero tail
        if not sparse or not length:
            buf = bytearray(header + length)
            if real:
                node.read_into(offset, memoryview(buf)[header:header + real])
            return [Piece(offset, length, buf)]
        data_fd = getattr(node.driver, "data_fd", None)
        zero_copy = zero_copy and node.readonly and node.cache not in ("none", "directsync") \
            and isinstance(data_fd, int)
        out: list[Piece] = []
        pending: list[int] = []  # [start, end) of data still to read into one buffer

        def flush_data() -> None:
            if pending:
                start, end = pending
                buf = bytearray(header + end - start)
                node.read_into(start, memoryview(buf)[header:])
                out.append(Piece(start, end - start, buf))
                pending.clear()

        pos, end = offset, offset + real
        for ext in node.block_status(offset, real) if real else ():
            stop = min(ext.start + ext.length, end)
            if stop <= pos:
                continue
            if ext.zero:
                flush_data()
                out.append(Piece(pos, stop - pos, None))
            elif (zero_copy and ext.offset is not None and not ext.depth and not ext.compressed
                    and ext.data and stop - pos >= ZERO_COPY_MIN):
                # one host run of the data file (block status breaks runs where host
                # offsets stop being contiguous)
                flush_data()
                out.append(Piece(pos, stop - pos, None, data_fd,
                                 ext.offset + (pos - ext.start)))
            else:
                pending[:] = [pending[0] if pending else pos, stop]
            pos = stop
        if pos < end:  # past what block status covered
            pending[:] = [pending[0] if pending else pos, end]
        flush_data()
        if real < length:
            out.append(Piece(offset + real, length - real, None))
        return out

    def status_extents(self, contexts: tuple[tuple[int, str], ...], offset: int, length: int,
                       req_one: bool) -> list[tuple[int, bytes]]:
        """The BLOCK_STATUS reply's extents for each negotiated context, in order, packed.

        A bitmap exported from a read-only node cannot change (nothing writes the node, and
        the bitmap is busy): its runs are read once and each request takes its window."""
        out: list[tuple[int, bytes]] = []
        entries = None
        for cid, name in contexts:
            if name in (CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH):
                if entries is None:
                    entries = self.node.allocation(offset, length)
                if name == CONTEXT_BASE_ALLOCATION:
                    runs = [(e.start, e.length, (0 if e.data else NBD_STATE_HOLE)
                             | (NBD_STATE_ZERO if e.zero else 0)) for e in entries]
                else:
                    runs = [(e.start, e.length, e.depth + 1 if e.present else 0)
                            for e in entries]
                out.append((cid, status.pack(status.from_runs(runs, offset, length,
                                                              req_one=req_one))))
                continue
            bitmap = name[len(CONTEXT_DIRTY_BITMAP):]
            reg = self.node.bitmaps
            if self.node.readonly:
                cached = self._edges.get(bitmap)
                if cached is None:
                    cached = self._edges[bitmap] = reg.run_edges(bitmap, 0, self.node.size)
                first, edges = cached
            else:
                first, edges = reg.run_edges(bitmap, offset, length)
            real = max(0, min(length, self.node.size - offset))
            payload = status.window(first, edges, offset, real, req_one=req_one)
            if real < length and not (req_one and payload):  # the sector's tail: clean
                payload = _extend_clean(payload, length - real)
            out.append((cid, payload))
        return out


def _extend_clean(payload: bytes, extra: int) -> bytes:
    """Packed extents with ``extra`` clean bytes after them (merged into a clean last one)."""
    import struct

    if not payload:
        return struct.pack(">II", extra, 0)
    n, fl = struct.unpack_from(">II", payload, len(payload) - 8)
    if fl == 0:
        return payload[:-8] + struct.pack(">II", n + extra, 0)
    return payload + struct.pack(">II", extra, 0)


def create_export(spec: ExportSpec, node: BlockNode) -> NbdExport:
    """Make an export of ``node`` (block thread): QEMU's checks and texts; the bitmaps are
    marked busy. Raises ``ExportError`` (or the registry's ``BitmapOperationError``)."""
    if spec.writable and node.readonly:
        raise ExportError("Cannot export read-only node as writable")
    if len(spec.name) > 4096:
        raise ExportError(f"export name '{spec.name[:64]}...' too long")
    if len(spec.description) > 4096:
        raise ExportError("description '...' too long")
    reg = node.bitmaps
    seen: set[str] = set()
    for name in spec.bitmaps:
        if name in seen:
            raise ExportError(f"Bitmap '{name}' is listed twice")  # QEMU: busy on the 2nd
        seen.add(name)
        lb = reg.find(name)
        if lb is None:
            raise ExportError(f"Bitmap '{name}' is not found")
        info = reg.info(name)
        if info.busy:
            raise ExportError(f"Bitmap '{name}' is currently in use by another operation "
                              "and cannot be used")
        if info.inconsistent:
            raise ExportError(f"Bitmap '{name}' is inconsistent and cannot be used")
        if not spec.writable and not node.readonly and info.recording:
            raise ExportError(f"Enabled bitmap '{name}' incompatible with readonly export")
    exp = NbdExport(spec, node)
    marked: list[str] = []
    try:
        for name in spec.bitmaps:
            reg.set_busy(name, exp.owner)
            marked.append(name)
    except BaseException:
        for name in marked:
            reg.set_busy(name, None)
        raise
    if node.readonly:  # read once, before a client asks (as qemu-nbd loads them)
        for name in spec.bitmaps:
            exp._edges[name] = reg.run_edges(name, 0, node.size)
    log.info("export '%s' (%s) of %s: %s, bitmaps %s", spec.id, spec.name, node.node_name,
             "writable" if spec.writable else "read-only", spec.bitmaps or "none")
    return exp


__all__ = ["ExportError", "ExportSpec", "NbdExport", "Piece", "create_export"]
