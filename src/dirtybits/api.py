"""The Python API a backup tool can use directly.

    import dirtybits
    with dirtybits.open("disk.qcow2") as disk:
        disk.write(0, b"x" * 4096)        # recorded in every enabled bitmap before it lands
        disk.flush()                     # data durable, bitmaps checkpointed (consistent)
"""

from __future__ import annotations

from dirtybits.block.checkpoint import CheckpointPolicy
from dirtybits.block.node import BlockNode
from dirtybits.block.open import open_node


def open(path: str, fmt: str | None = None, *, readonly: bool = False,
         bitmaps: str = "auto", checkpoint: CheckpointPolicy | None = None,
         cache: str = "writeback", open_backing: bool = True,
         bitmap_file: str | None = None, force_share: bool = False) -> BlockNode:
    """Open a disk image (format probed when ``fmt`` is None) as a ``BlockNode``.

    ``bitmaps="auto"`` loads the image's persistent bitmaps and records writes in the enabled
    ones; ``"no"`` loads none (the enabled ones are then marked inconsistent before the first
    write). ``checkpoint`` sets when bitmaps are made consistent on disk besides close and
    flush (default ``CheckpointPolicy()``).
    ``bitmap_file`` names a container (``dirtybits container``) that ``path``, a raw drive, is
    attached to: the drive's bitmaps there record the writes (identity and size checked).
    Images are locked as QEMU locks them; ``force_share`` (read-only only) is qemu's -U.
    """
    return open_node(path, fmt, readonly=readonly, bitmaps=bitmaps, checkpoint=checkpoint,
                     cache=cache, open_backing=open_backing, bitmap_file=bitmap_file,
                     force_share=force_share)


__all__ = ["BlockNode", "CheckpointPolicy", "open"]
