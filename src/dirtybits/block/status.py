"""Block status of an image and its backing chain, as qemu-img map, compare and convert see it.

A driver's ``block_status`` is not what QEMU's tools report; ``ChainStatus`` redoes what QEMU
7.2's block layer adds on top, so that the same image gives the same answers here:

- An area no layer of the backing chain has is reported at the layer where the search stopped:
  the bottom image, or the first image whose backing file is shorter than the offset
  (``bdrv_co_block_status`` calls that area zero right there).
- A qcow2 image that looks metadata-preallocated (more clusters in use than the file has
  blocks on disk, ``qcow2_detect_metadata_preallocation``) gets its data clusters checked
  against the holes of the file holding them; holes and anything past the end of that file are
  reported as ``zero`` (``BDRV_BLOCK_RECURSE``). Images with partly written clusters, such as
  ``preallocation=metadata`` ones, look like that.
- A raw image's size is rounded up to a whole sector; the tail past the end of the file is a
  zero area of the file.
- Adjacent runs are merged when qemu-img's ``entry_mergeable`` would merge them.

``map_entries`` is qemu-img map's list (``Entry.json`` its JSON form, allocation depth
included); ``dirtybits.cli.map`` prints it, ``compare`` and ``convert`` (``dirtybits.block.copy``)
read allocation through the same class, and so can an NBD export's ``base:allocation``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dirtybits.block.options import INT64_MAX, SECTOR

if TYPE_CHECKING:
    from dirtybits.block.driver import ImageDriver

log = logging.getLogger(__name__)

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


@dataclass(frozen=True)
class Entry:
    """qemu-img's MapEntry; ``allocated`` is BDRV_BLOCK_ALLOCATED of the whole chain (what
    ``compare`` looks at), which differs from ``present`` past a short backing file."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None
    allocated: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    def json(self) -> str:
        text = (f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth},'
                f' "present": {_b(self.present)}, "zero": {_b(self.zero)},'
                f' "data": {_b(self.data)}')
        if self.offset is not None:
            text += f', "offset": {self.offset}'
        return text + "}"


def _b(value: bool) -> str:
    return "true" if value else "false"


def qemu_size(img: ImageDriver) -> int:
    """The virtual size QEMU sees: whole sectors (a raw file of 1000 bytes is 1024)."""
    return -(-img.size // SECTOR) * SECTOR


def read_padded(img: ImageDriver, offset: int, length: int) -> bytes:
    """Guest bytes; what lies past the driver's size (the sector tail) reads as zeros."""
    n = max(0, min(length, img.size - offset))
    data = img.read(offset, n) if n else b""
    return data + bytes(length - n) if n < length else data


class ChainStatus:
    """Allocation of an open image (and its backing chain) as qemu-img sees it."""

    def __init__(self, img: ImageDriver, *, recurse: bool = True):
        self.img = img
        self.layers: list[Any] = []
        layer: Any = img
        while layer is not None:
            self.layers.append(layer)
            layer = getattr(layer, "backing", None)
        self.sizes = [qemu_size(layer) for layer in self.layers]
        self.size = self.sizes[0]
        self.recurse = recurse
        self._prealloc: dict[int, bool] = {}
        self._fds: dict[str, tuple[int, int]] = {}

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ChainStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self, start: int, end: int) -> Iterator[Entry]:
        """Unmerged runs covering ``[start, end)`` (``end`` at most ``self.size``)."""
        top = self.img
        inner_end = min(end, top.size)
        if start < inner_end:
            for ext in top.block_status(start, inner_end - start):
                yield from self._fix(Entry(ext.start, ext.length, ext.depth, ext.present,
                                           ext.zero, ext.data, ext.offset,
                                           ext.filename if ext.offset is not None else None))
        tail = max(inner_end, start)
        if tail < end:  # the sector tail of a raw file: a zero area of the file
            yield Entry(tail, end - tail, 0, True, True, False, tail, top.path, allocated=True)

    def _fix(self, e: Entry) -> Iterator[Entry]:
        if not e.present:
            # the engine merges across backing-file ends; QEMU's answer changes there
            cuts = sorted({s for s in self.sizes[1:] if e.start < s < e.end} | {e.end})
            pos = e.start
            for cut in cuts:
                depth = self._stop_depth(pos)
                yield replace(e, start=pos, length=cut - pos, depth=depth,
                              allocated=depth + 1 < len(self.layers))
                pos = cut
            return
        e = replace(e, allocated=True)
        if (self.recurse and e.data and not e.zero and e.offset is not None
                and e.filename is not None and self._preallocated(e.depth)):
            yield from self._split_holes(e)
        else:
            yield e

    def _stop_depth(self, offset: int) -> int:
        """The layer where QEMU stops looking: the bottom, or one whose backing is too short."""
        for depth in range(len(self.layers) - 1):
            if offset >= self.sizes[depth + 1]:
                return depth
        return len(self.layers) - 1

    def _preallocated(self, depth: int) -> bool:
        """``qcow2_detect_metadata_preallocation``: clusters in use outnumber those on disk."""
        if depth not in self._prealloc:
            layer = self.layers[depth]
            found = False
            if getattr(layer, "format_name", "") == "qcow2":
                st = os.fstat(layer.fileno())
                cs = int(layer.cluster_size)
                real_clusters = st.st_blocks * 512 // cs
                threshold = max(real_clusters * 10 // 9, real_clusters + 2)
                end_cluster = -(-(-(-st.st_size // SECTOR) * SECTOR) // cs)
                count = 0
                # a file with fewer clusters than the threshold can't reach it: skip the scan
                for i in range(end_cluster if end_cluster >= threshold else 0):
                    if count >= threshold:
                        break
                    if layer.get_refcount(i):
                        count += 1
                found = count >= threshold
                if found:
                    log.debug("%s: looks metadata-preallocated; its data runs are cut at "
                              "the holes of the file", layer.path)
            self._prealloc[depth] = found
        return self._prealloc[depth]

    def _file(self, name: str) -> tuple[int, int]:
        """(fd, length in whole sectors) of a file holding guest data."""
        if name not in self._fds:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[name] = (fd, -(-os.fstat(fd).st_size // SECTOR) * SECTOR)
        return self._fds[name]

    def _split_holes(self, e: Entry) -> Iterator[Entry]:
        """Cut a data run at the holes of its file (BDRV_BLOCK_RECURSE into file-posix)."""
        assert e.offset is not None and e.filename is not None
        fd, flen = self._file(e.filename)
        host, end = e.offset, e.offset + e.length
        while host < end:
            zero = True
            n = end - host  # past EOF, or a trailing hole: the rest of the run is zero
            if host < flen:
                try:
                    data = os.lseek(fd, host, SEEK_DATA)
                except OSError as exc:
                    data = -1 if exc.errno == errno.ENXIO else host
                if data > host:
                    n = min(data - host, n)
                elif data == host:
                    try:
                        hole = os.lseek(fd, host, SEEK_HOLE)
                    except OSError:
                        hole = end
                    n, zero = min(max(hole, host + 1) - host, n), False
            yield replace(e, start=e.start + host - e.offset, length=n, offset=host, zero=zero)
            host += n


def mergeable(a: Entry, b: Entry) -> bool:
    """qemu-img's ``entry_mergeable``."""
    if a.length == 0 or (a.zero, a.data, a.depth, a.present, a.filename,
                         a.offset is None) != (b.zero, b.data, b.depth, b.present, b.filename,
                                               b.offset is None):
        return False
    return a.offset is None or b.offset is None or a.offset + a.length == b.offset


def merged(entries: Iterable[Entry]) -> Iterator[Entry]:
    cur: Entry | None = None
    for e in entries:
        if cur is not None and mergeable(cur, e):
            cur = replace(cur, length=cur.length + e.length)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def map_json(entries: Iterable[Entry]) -> str:
    """qemu-img map's ``--output=json``: the entries as one JSON list, a line each."""
    return "[" + ",\n".join(e.json() for e in entries) + "]\n"


def map_entries(img: ImageDriver, start: int = 0, max_length: int = INT64_MAX
                ) -> Iterator[Entry]:
    """What ``qemu-img map`` lists for ``[start, start+max_length)``, merged."""
    with ChainStatus(img) as status:
        end = min(start + max_length, status.size)
        if start >= end:
            yield Entry(start, 0, 0, False, False, False)
            return
        yield from merged(status.entries(start, end))
