"""Open an image by name, probing the format the way qemu-img does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dirtybits.block.driver import ImageDriver
from dirtybits.errors import UsageError

if TYPE_CHECKING:
    from dirtybits.block.checkpoint import CheckpointPolicy
    from dirtybits.block.node import BlockNode
    from dirtybits.block.owner import BlockOwner
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.block.write_intent import WriteIntentMap
    from dirtybits.qcow2.children import BackingImage, DataFile

FORMATS = ("qcow2", "raw")


def probe_format(path: str, *, writable: bool = False) -> str:
    """qemu-img's probe: qcow2 by its magic, else raw (``read_at``'s errors: a directory, FIFO
    or character device is refused, not read; ``writable`` fails as a read-write open)."""
    from dirtybits.osfile import read_at

    return "qcow2" if read_at(path, 0, 4, writable=writable) == b"QFI\xfb" else "raw"


def open_image(path: str, fmt: str | None = None, *, readonly: bool = False,
               open_backing: bool = True, cache: str = "writeback",
               bitmaps: str = "auto", checkpoint: CheckpointPolicy | None = None,
               always_node: bool = False, force_share: bool = False,
               owner: BlockOwner | None = None, backing: BackingImage | None = None,
               data_file: DataFile | None = None,
               node_name: str | None = None) -> ImageDriver:
    """Open ``path`` as ``fmt`` (probed when None) and return its driver.

    ``cache`` takes qemu's cache modes (``dirtybits.osfile.CACHE_MODES``): ``none`` and
    ``directsync`` use O_DIRECT for data, ``writethrough`` and ``directsync`` flush after
    every write and write-zeroes, ``unsafe`` ignores flushes. A
    writable qcow2 with persistent bitmaps comes back as a ``BlockNode`` whose enabled bitmaps
    record every write, as with qemu-io, checkpointed per ``checkpoint``. ``bitmaps="no"``
    loads none: the enabled ones are then marked in_use (inconsistent) before the first write,
    since they would miss it. ``always_node`` wraps every image in a ``BlockNode`` (the
    Python API's uniform interface); otherwise a plain driver comes back when there is nothing
    to track, without loading the bitmap engine (numpy).
    ``force_share`` is qemu's -U (read-only opens only): lock nothing others could trip on.
    A qcow2 image's children (``dirtybits.block.children``): the backing file and data file
    its header names, or ``backing`` / ``data_file`` handed in open (QMP's ``backing: NODE``,
    ``data-file: NODE``), which stay the caller's; ``open_backing=False`` opens no backing.
    ``node_name`` names the node (default: the file's base name).
    """
    if bitmaps not in ("auto", "no"):
        raise UsageError(f"bitmaps must be 'auto' or 'no', not '{bitmaps}'")
    if fmt is None:
        fmt = probe_format(path, writable=not readonly)
    if fmt == "qcow2":
        from dirtybits.block.children import open_qcow2

        img = open_qcow2(path, readonly=readonly, open_backing=open_backing, cache=cache,
                         keep_bitmaps=not readonly, force_share=force_share, backing=backing,
                         data_file=data_file)
        from dirtybits.format.qcow2.header import EXT_BITMAPS

        has_bitmaps = img.hc.extension(EXT_BITMAPS) is not None
        if not always_node and (readonly or not has_bitmaps):
            return img
        from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore

        try:
            store = None
            if has_bitmaps or not readonly:
                store = Qcow2BitmapStore(img)
            if store is not None and not store.bitmaps and not always_node:
                return img
            intent = None
            from dirtybits.format.qcow2.write_intent import EXT_WRITE_INTENT

            if not readonly and img.hc.extension(EXT_WRITE_INTENT) is not None:
                from dirtybits.block.write_intent import WriteIntentMap

                intent = WriteIntentMap(img)
            return _node(img, store, checkpoint, bitmaps == "auto", intent, cache, owner,
                         node_name)
        except BaseException:
            img.close()
            raise
    if fmt == "raw":
        from dirtybits.block.raw import RawImage

        if backing is not None or data_file is not None:
            raise UsageError("a raw image has no backing file or data file")
        raw = RawImage(path, readonly=readonly, force_share=force_share, cache=cache)
        if not always_node:
            return raw
        return _node(raw, None, checkpoint, True, None, cache, owner, node_name)
    raise UsageError(f"Unknown file format '{fmt}'")


def _node(driver: ImageDriver, store: Qcow2BitmapStore | None,
          policy: CheckpointPolicy | None, track: bool,
          intent: WriteIntentMap | None = None, cache: str = "writeback",
          owner: BlockOwner | None = None, node_name: str | None = None) -> BlockNode:
    from dirtybits.block.node import BlockNode

    return BlockNode(driver, store, policy=policy, track=track, intent=intent, cache=cache,
                     owner=owner, node_name=node_name)


def open_node(path: str, fmt: str | None = None, *, readonly: bool = False,
              bitmaps: str = "auto", checkpoint: CheckpointPolicy | None = None,
              cache: str = "writeback", open_backing: bool = True,
              bitmap_file: str | None = None, force_share: bool = False,
              owner: BlockOwner | None = None, node_name: str | None = None) -> BlockNode:
    """Open any image as a ``BlockNode`` (``dirtybits.open``'s work; see there)."""
    from dirtybits.block.node import BlockNode

    if bitmap_file is not None:
        from dirtybits.block.container import open_drive

        if fmt not in (None, "raw"):
            raise UsageError(f"bitmap_file needs a raw drive, not fmt='{fmt}'")
        return open_drive(bitmap_file, path, readonly=readonly, checkpoint=checkpoint,
                          bitmaps=bitmaps, cache=cache, owner=owner)
    node = open_image(path, fmt, readonly=readonly, open_backing=open_backing, cache=cache,
                      bitmaps=bitmaps, checkpoint=checkpoint, always_node=True,
                      force_share=force_share, owner=owner, node_name=node_name)
    assert isinstance(node, BlockNode)
    return node


def open_for_bitmaps(path: str, *, readonly: bool, open_backing: bool = True) -> BlockNode:
    """A qcow2 image opened to manage its bitmaps (``dirtybits bitmap``, as ``qemu-img
    bitmap`` opens it), as a node whose registry does the work. No timed checkpoints: every
    operation stores its result before it returns."""
    from dirtybits.block.checkpoint import CheckpointPolicy
    from dirtybits.block.children import open_qcow2
    from dirtybits.block.node import BlockNode
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore

    img = open_qcow2(path, readonly=readonly, keep_bitmaps=True, open_backing=open_backing)
    try:
        return BlockNode(img, Qcow2BitmapStore(img),
                         policy=CheckpointPolicy(interval=None, idle=None, threshold_bits=None))
    except BaseException:
        img.close()
        raise
