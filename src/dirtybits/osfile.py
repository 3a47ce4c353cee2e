"""Operating-system file operations shared by the drivers (lowest layer: imports nothing from
the package but ``errors``)."""

from __future__ import annotations

import errno
import functools
import os
import stat
from typing import Any

from dirtybits.errors import ImageIOError

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


O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def not_a_file_error(path: str) -> ImageIOError:
    """QEMU's refusal of a directory, FIFO, socket or character device as an image file."""
    return ImageIOError(f"'file' driver requires '{path}' to be a regular file",
                        errno=errno.EINVAL)


def is_image_file(mode: int) -> bool:
    """What QEMU opens as an image: a regular file ('file' driver) or a block device
    ('host_device'). dirtybits has no driver for character devices (/dev/null, ttys)."""
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def open_file(path: str, flags: int, *, what: str = "open", mode: int = 0o644) -> int:
    """Open an image file as QEMU's file driver does, and refuse what is not one.

    The open is non-blocking, so a FIFO cannot hang it (QEMU's qemu-img does hang there); the
    descriptor comes back blocking. Raises ``ImageIOError``: ``Could not WHAT 'PATH': REASON``
    when the OS refuses the open, ``'file' driver requires 'PATH' to be a regular file`` for a
    directory, FIFO, socket or character device.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | O_CLOEXEC, mode)
    except OSError as exc:
        raise ImageIOError(f"Could not {what} '{path}': {exc.strerror}",
                           errno=exc.errno) from exc
    try:
        if not is_image_file(os.fstat(fd).st_mode):
            raise not_a_file_error(path)
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_size(fd: int) -> int:
    """Bytes in a regular file or a block device (whose ``st_size`` is 0)."""
    st = os.fstat(fd)
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


def read_at(path: str, offset: int, length: int, *, writable: bool = False) -> bytes:
    """Up to ``length`` bytes at ``offset`` of an image file (format probing, headers);
    ``open_file``'s errors, ``Could not read 'PATH': REASON``. ``writable`` opens it as a
    read-write open would, so a probe fails as that open would (QEMU probes the file it
    opened)."""
    fd = open_file(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    except OSError as exc:
        raise ImageIOError(f"Could not read '{path}': {exc.strerror}",
                           errno=exc.errno) from exc
    finally:
        os.close(fd)


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
