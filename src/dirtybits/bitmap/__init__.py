"""Dirty bitmap engine: pure in-memory bitmaps with QEMU's semantics and on-disk bit order.

Importing this package imports numpy; nothing in ``dirtybits/__init__`` or the CLI's start-up
path imports it, so commands that need no bitmap do not pay for numpy.
"""

from dirtybits.bitmap.dirty_bitmap import BitmapError, DirtyBitmap
from dirtybits.bitmap.meta import ChangeTracker

__all__ = ["BitmapError", "ChangeTracker", "DirtyBitmap"]
