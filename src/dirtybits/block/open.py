"""Open an image by name, probing the format the way qemu-img does."""

from __future__ import annotations

import os

from dirtybits.block.driver import ImageDriver
from dirtybits.errors import ImageIOError, UsageError

FORMATS = ("qcow2", "raw")


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImageIOError(f"Could not open '{path}': {exc.strerror}", errno=exc.errno) from exc
    return "qcow2" if magic == b"QFI\xfb" else "raw"


def open_image(path: str, fmt: str | None = None, *, readonly: bool = False,
               open_backing: bool = True, cache: str = "writeback",
               track_bitmaps: bool = True) -> ImageDriver:
    """Open ``path`` as ``fmt`` (probed when None) and return its driver.

    ``cache`` takes qemu's cache modes; ``none``/``directsync`` use O_DIRECT for data. A
    writable qcow2 with persistent bitmaps comes back as a ``BlockNode`` whose enabled bitmaps
    record every write, as with qemu-io; ``track_bitmaps=False`` leaves them alone (they are
    then invalidated by the first write, as the qcow2 spec demands of unaware writers).
    """
    if fmt is None:
        fmt = probe_format(path)
    if fmt == "qcow2":
        from dirtybits.qcow2.image import Qcow2Image

        img = Qcow2Image.open(path, readonly=readonly, open_backing=open_backing, cache=cache,
                              keep_bitmaps=track_bitmaps and not readonly)
        from dirtybits.format.qcow2.header import EXT_BITMAPS

        if not track_bitmaps or readonly or img.hc.extension(EXT_BITMAPS) is None:
            return img  # no bitmaps: no need to load the bitmap engine (numpy)
        from dirtybits.block.node import BlockNode
        from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore

        try:
            store = Qcow2BitmapStore(img)
            if not store.bitmaps:
                return img
            return BlockNode(img, store)
        except BaseException:
            img.close()
            raise
    if fmt == "raw":
        from dirtybits.block.raw import RawImage

        if not os.path.exists(path):
            raise ImageIOError(f"Could not open '{path}': No such file or directory")
        return RawImage(path, readonly=readonly)
    raise UsageError(f"Unknown file format '{fmt}'")
