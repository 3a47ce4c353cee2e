"""Operating-system file operations shared by the drivers (lowest layer: no imports up)."""

from __future__ import annotations

import functools
from typing import Any

# QEMU's cache modes (bdrv_parse_cache_mode), for every driver:
#   writeback     the page cache; data durable at flush (the default of qemu-img, qemu-nbd)
#   writethrough  the page cache, and a flush after every write (qemu-io's default)
#   none          O_DIRECT for aligned data I/O; durable at flush
#   directsync    O_DIRECT, and a flush after every write
#   unsafe        the page cache; flushes are ignored (a host crash may lose anything)
CACHE_MODES = ("writeback", "none", "writethrough", "directsync", "unsafe")
DIRECT_ALIGN = 4096  # buffer, offset and length alignment for O_DIRECT I/O


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


def reopen_same_file(fd: int, flags: int) -> int:
    """Open the file behind ``fd`` again with other ``flags`` (O_DIRECT, say).

    Through ``/proc/self/fd``, which names the open inode itself: a rename, a replacement
    under the old name or a ``chdir`` since the first open cannot make the new descriptor
    another file. The result is checked (device and inode) all the same. Raises ``OSError``
    (``ESTALE`` when what opened is not the same file).
    """
    import errno
    import os

    try:
        new = os.open(f"/proc/self/fd/{fd}", flags)
    except FileNotFoundError:  # no /proc: nothing else names the inode
        raise OSError(errno.ENOENT, "cannot reopen an open file without /proc") from None
    try:
        a, b = os.fstat(fd), os.fstat(new)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise OSError(errno.ESTALE, "reopened descriptor is another file")
    except BaseException:
        os.close(new)
        raise
    return new
