"""What a range of a disk is backed by: the unit of ``map`` and block-status answers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MapExtent:
    """One run of guest bytes with the same allocation state (qemu-img map's JSON fields).

    ``depth`` is the layer of the backing chain that provides the data (0 = the image itself);
    ``present`` is False only where no layer has anything (reads as zeros). ``offset`` is the
    host offset in ``filename`` when the data is stored uncompressed, else None.
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None
    compressed: bool = False
