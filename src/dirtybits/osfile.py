"""Operating-system file operations shared by the drivers (lowest layer: imports nothing from
the package but ``errors``)."""

from __future__ import annotations

import errno
import os
import stat

from dirtybits.errors import ImageIOError

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
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
        rc = libc.fallocate(fd, falloc_fl_punch_hole | falloc_fl_keep_size,
                            ctypes.c_long(offset), ctypes.c_long(length))
        return bool(rc == 0)
    except (OSError, AttributeError):
        return False
