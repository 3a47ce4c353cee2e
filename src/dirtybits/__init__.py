"""dirtybits: persistent dirty bitmaps for virtual disk images, byte-compatible with QEMU.

``dirtybits.open(path)`` returns a ``BlockNode`` (see ``dirtybits.api``). The API is imported
on first use so that the command line starts without loading it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["BlockNode", "CheckpointPolicy", "open"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dirtybits import api

        return getattr(api, name)
    raise AttributeError(f"module 'dirtybits' has no attribute {name!r}")
