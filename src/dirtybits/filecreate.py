"""The one creator of image files: a raw image, the file under a qcow2 image, a data file.

It does what QEMU 7.2's file-posix ``raw_co_create`` does (create without truncating, lock,
only then truncate, so an image in use keeps its data; size rounded up to a sector; space
reserved per the preallocation mode; the first block written so that O_DIRECT alignment
probing finds data there), and one thing QEMU does not: a creation that fails leaves nothing
behind, because a half-made file blocks a retry. Only a file this creation made is removed,
never one that was there before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from dirtybits.errors import ImageIOError
from dirtybits.filelock import CREATE, FileLock, lock_fd
from dirtybits.osfile import file_size, not_a_file_error, open_file

SECTOR = 512
PREALLOC_MODES = ("off", "falloc", "full")


class CreatedFile:
    """A file ``create_file`` made or reused: open and locked until ``close``.

    ``made`` says whether this creation made it (a pre-existing file was reused); ``remove``
    undoes a failed creation by deleting the file when it is one this creation made and still
    the same inode under the same name.
    """

    def __init__(self, path: str, fd: int, made: bool):
        self.path = path
        self.fd = fd
        self.made = made
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)
        self._lock: FileLock | None = None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Close, and delete the file if this creation made it (a pre-existing file stays)."""
        self.close()
        if not self.made:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)


def _open_new(path: str) -> CreatedFile:
    """Open ``path`` for creation without truncating it, knowing whether it existed."""
    flags = os.O_RDWR
    try:
        fd = open_file(path, flags | os.O_CREAT | os.O_EXCL, what="create")
        return CreatedFile(path, fd, True)
    except ImageIOError as exc:
        if exc.errno != errno.EEXIST:
            raise
    try:
        fd = open_file(path, flags, what="create")
    except ImageIOError as exc:
        if exc.errno != errno.ENOENT:
            raise
        # a dangling symlink: create through it, as QEMU does, but never delete it later
        fd = open_file(path, flags | os.O_CREAT, what="create")
    return CreatedFile(path, fd, False)


def create_file(path: str, size: int, *, prealloc: str = "off",
                keep_data: bool = False) -> CreatedFile:
    """Create or reuse ``path`` as a raw file of ``size`` bytes (rounded up to a sector).

    Returned open and locked (QEMU's create permissions); ``close`` it when done, ``remove``
    it when the creation it is part of fails. ``keep_data`` keeps the bytes of a pre-existing
    file (a raw drive getting a metadata image) and only grows it to ``size``. A block device
    is used as it is, as QEMU's host_device does: it must be at least ``size`` bytes.

    Raises ``ImageIOError`` with QEMU's texts: ``Could not create 'PATH': REASON``, the file
    driver's refusal of a directory, FIFO or character device, ``Could not resize file:
    REASON`` (errno ``EFBIG`` when the filesystem cannot hold ``size``), ``Cannot grow device
    files``; ``LockError`` when another process has the file open. A failure leaves no file
    this call made.
    """
    if prealloc not in PREALLOC_MODES:
        raise ValueError(f"preallocation mode {prealloc!r}")
    size = -(-size // SECTOR) * SECTOR
    f = _open_new(path)
    try:
        f._lock = lock_fd(f.fd, path, CREATE)
        mode = os.fstat(f.fd).st_mode
        if stat.S_ISBLK(mode):
            if size > file_size(f.fd):
                raise ImageIOError("Cannot grow device files", errno=errno.ENOSPC)
        elif not stat.S_ISREG(mode):  # pragma: no cover - open_file refused it already
            raise not_a_file_error(path)
        elif keep_data and not f.made:
            if os.fstat(f.fd).st_size < size:
                _truncate(f.fd, size)
        else:
            _fill(f.fd, size, prealloc)
    except BaseException:
        f.remove()
        raise
    return f


def _truncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise ImageIOError(f"Could not resize file: {exc.strerror}", errno=exc.errno) from exc


def _fill(fd: int, size: int, prealloc: str) -> None:
    # the size first: a filesystem that cannot hold it refuses before old data is dropped
    _truncate(fd, size)
    _truncate(fd, 0)
    try:
        if prealloc == "full":
            chunk = bytes(min(size, 1 << 20))
            for off in range(0, size, len(chunk) or 1):
                os.pwrite(fd, chunk[:size - off], off)
            return
        if prealloc == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
        os.pwrite(fd, bytes(min(size, 4096)), 0)
    except OSError as exc:
        what = {"full": "Could not write zeros for preallocation",
                "falloc": "Could not preallocate new data"}.get(prealloc, "Could not resize file")
        raise ImageIOError(f"{what}: {exc.strerror}", errno=exc.errno) from exc


def replace_text_file(path: str, text: str, mode: int = 0o644) -> None:
    """Write a small text file (a pidfile) atomically: a reader sees the old one or the
    whole new one, never half of it. Raises ``OSError``."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
