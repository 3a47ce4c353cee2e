"""Dirty bitmap engine: pure in-memory bitmaps with QEMU's semantics and on-disk bit order.

The engine (``DirtyBitmap``, ``ChangeTracker``) is numpy; it is imported on first use of those
names, so that ``serialized_runs`` (numpy-free) and commands that need no bitmap do not pay for
numpy at start-up.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BitmapError", "ChangeTracker", "DirtyBitmap"]


def __getattr__(name: str) -> Any:
    if name in ("BitmapError", "DirtyBitmap"):
        from dirtybits.bitmap import dirty_bitmap

        return getattr(dirty_bitmap, name)
    if name == "ChangeTracker":
        from dirtybits.bitmap.meta import ChangeTracker

        return ChangeTracker
    raise AttributeError(f"module 'dirtybits.bitmap' has no attribute {name!r}")
