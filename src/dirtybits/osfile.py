"""Operating-system file operations shared by the drivers (lowest layer: no imports up)."""

from __future__ import annotations


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeros; False where the OS or filesystem can't."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
        rc = libc.fallocate(fd, falloc_fl_punch_hole | falloc_fl_keep_size,
                            ctypes.c_long(offset), ctypes.c_long(length))
        return bool(rc == 0)
    except (OSError, AttributeError):
        return False
