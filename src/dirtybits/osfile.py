"""Operating-system file operations shared by the drivers (lowest layer: no imports up)."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    """The C library, loaded once: finding it runs ``ldconfig``, a millisecond per call,
    which a discard that punches many separate runs would pay for each one."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeros; False where the OS or filesystem can't."""
    try:
        import ctypes

        falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
        rc = _libc().fallocate(fd, falloc_fl_punch_hole | falloc_fl_keep_size,
                               ctypes.c_long(offset), ctypes.c_long(length))
        return bool(rc == 0)
    except (OSError, AttributeError):
        return False
