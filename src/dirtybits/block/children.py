"""Opening an image's children: the backing file and the external data file.

The qcow2 engine opens no file but its own (``dirtybits.qcow2.children``). This module opens
the children for it, as QEMU's block layer does (``bdrv_open_child``, ``bdrv_open_backing_file``):

* by the names in the header, relative to the image's directory; the backing file with the
  header's backing format, or probed (qcow2 by its magic, else raw) when it names none;
* or explicitly: a child handed in open (QMP's ``blockdev-add`` with ``backing: NODE`` /
  ``data-file: NODE``), which the engine uses as is.

How each child is opened and locked, as QEMU 7.2 does it and as dirtybits always has:

* the backing file read-only, with the image's force-share, in the page cache
  (``writeback``) whatever the image's cache mode; a qcow2 backing file locked as a qcow2
  reader (``[100 201 203]``), a raw one as a plain read (``[100]``, nothing unshared); its
  own children opened the same way, down to ``MAX_BACKING_DEPTH`` images;
* the data file like the image (read-only or read-write, force-share), locked as QEMU's
  data-file child (``filelock.DATA_FILE_RO`` / ``DATA_FILE_RW``); the image's cache mode
  applies to it (the engine moves its aligned I/O to O_DIRECT for ``none``/``directsync``).

Children opened here for the engine are the engine's to close (with the image, or when its
open fails); children handed in stay their caller's.
"""

from __future__ import annotations

import logging
import os

from dirtybits.block.open import probe_format
from dirtybits.errors import ImageError, LockError, UnsupportedFeatureError
from dirtybits.qcow2.children import BackingImage, DataFile
from dirtybits.qcow2.image import DEFAULT_L2_CACHE_BYTES, Qcow2Image

log = logging.getLogger(__name__)

MAX_BACKING_DEPTH = 64  # images below the top one before a chain counts as a loop


def child_path(parent: str, name: str) -> str:
    """Where a child named ``name`` in the header of ``parent`` is: an absolute name as is,
    a relative one relative to the parent's directory."""
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(parent), name)


def open_data_file(path: str, *, readonly: bool, force_share: bool = False) -> DataFile:
    """Open and lock ``path`` as an image's external data file (``DataFile.open``)."""
    log.debug("opening data file %s (%s%s)", path, "read-only" if readonly else "read-write",
              ", force-share" if force_share else "")
    return DataFile.open(path, readonly=readonly, force_share=force_share)


def open_backing_file(path: str, fmt: str | None, *, force_share: bool = False,
                      depth: int = 0) -> BackingImage:
    """Open ``path`` read-only as a backing file of format ``fmt`` (None: probed), with its
    own children; ``depth`` counts the images above it (1: the backing of a top image).

    Raises what the open raises; a lock conflict as ``Could not open backing file: ...``
    (qemu-img's words), a format other than qcow2 or raw as ``UnsupportedFeatureError``.
    """
    if fmt is None:
        fmt = probe_format(path)
    log.debug("opening backing file %s (format %s, depth %d%s)", path, fmt, depth,
              ", force-share" if force_share else "")
    try:
        if fmt == "qcow2":
            return Qcow2Image.open(path, readonly=True, force_share=force_share,
                                   children=HeaderChildren(depth=depth))
        if fmt == "raw":
            from dirtybits.block.raw import RawImage

            # QEMU 7.2 locks a raw backing file as a plain read: [100], nothing unshared
            return RawImage(path, readonly=True, force_share=force_share)
        raise UnsupportedFeatureError(f"backing file format '{fmt}' is not supported")
    except LockError as exc:
        raise LockError(f"Could not open backing file: {exc.reason}", exc.hint) from None


class HeaderChildren:
    """The ``ChildOpener`` that opens the children an image's header names.

    ``open_backing=False`` leaves the backing file closed (``qemu-img info``, ``check``, a
    bitmap container). ``depth`` is the image's place in its chain (0: the top image).
    """

    def __init__(self, *, open_backing: bool = True, depth: int = 0):
        self.with_backing = open_backing
        self.depth = depth

    def open_data_file(self, name: str, *, parent: str, readonly: bool,
                       force_share: bool) -> DataFile:
        return open_data_file(child_path(parent, name), readonly=readonly,
                              force_share=force_share)

    def open_backing(self, name: str, fmt: str | None, *, parent: str,
                     force_share: bool) -> BackingImage | None:
        if not self.with_backing:
            return None
        if self.depth >= MAX_BACKING_DEPTH:
            raise ImageError(f"backing chain of '{parent}' is too deep (loop?)")
        return open_backing_file(child_path(parent, name), fmt, force_share=force_share,
                                 depth=self.depth + 1)


def open_qcow2(path: str, *, readonly: bool = False, open_backing: bool = True,
               l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES, cache: str = "writeback",
               keep_bitmaps: bool = False, force_share: bool = False,
               backing: BackingImage | None = None,
               data_file: DataFile | None = None) -> Qcow2Image:
    """Open the qcow2 image ``path`` with its children: ``backing`` / ``data_file`` when
    given (they stay the caller's: close them after the image), else those its header names
    (closed with the image); ``open_backing=False`` opens no backing file.

    The other arguments are ``Qcow2Image.open``'s, whose errors it raises, and those of the
    children's opens (``Could not open data file 'PATH': ...``, ``Could not open 'PATH': ...``
    for a backing file, a lock conflict on it as ``Could not open backing file: ...``).
    """
    return Qcow2Image.open(path, readonly=readonly, l2_cache_bytes=l2_cache_bytes,
                           cache=cache, keep_bitmaps=keep_bitmaps, force_share=force_share,
                           backing=backing, data_file=data_file,
                           children=HeaderChildren(open_backing=open_backing))
