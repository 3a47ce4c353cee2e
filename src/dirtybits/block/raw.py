"""The raw driver: guest offset == file offset, holes are what the filesystem says."""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from collections.abc import Iterator
from types import TracebackType

from dirtybits.block.driver import Buffer
from dirtybits.errors import (
    ImageError,
    ImageIOError,
    ReadOnlyError,
    UnsupportedFeatureError,
    UsageError,
)
from dirtybits.filecreate import create_file
from dirtybits.filelock import (
    PERM_RESIZE,
    RAW_RO,
    RAW_RW,
    FileLock,
    Perms,
    check_force_share,
    lock_fd,
)
from dirtybits.osfile import CACHE_MODES, DIRECT_ALIGN, file_size, open_file, reopen_same_file
from dirtybits.osfile import punch_hole as _punch_hole
from dirtybits.qcow2.extent import MapExtent

log = logging.getLogger(__name__)

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


class RawImage:
    format_name = "raw"

    def __init__(self, path: str, *, readonly: bool = False, force_share: bool = False,
                 cache: str = "writeback"):
        """Open and lock as qemu-io/qemu-img lock a raw image: a reader holds "consistent
        read", a writer also "write"; both share everything (QEMU 7.2's raw format node
        unshares nothing), so only a qcow2 or data-file user elsewhere can refuse us.

        ``cache`` is QEMU's cache mode (``CACHE_MODES``): ``none``/``directsync`` move
        aligned I/O to an O_DIRECT descriptor, ``writethrough``/``directsync`` flush after
        every write, ``unsafe`` ignores flushes. Raises ``UsageError``, ``ImageIOError``,
        ``LockError``.
        """
        if cache not in CACHE_MODES:
            raise UsageError(f"Invalid cache option: {cache}")
        check_force_share(readonly, force_share)
        self.path = path
        self.readonly = readonly
        self.cache = cache
        self._unsafe = cache == "unsafe"
        self._writethrough = cache in ("writethrough", "directsync")
        self._direct_fd: int | None = None
        self._sync_failed: str | None = None
        self._unsynced = False  # written since the last flush (QEMU's write_gen)
        self._abuf: mmap.mmap | None = None
        flags = os.O_RDONLY if readonly else os.O_RDWR
        # a regular file or a block device; a directory, FIFO or /dev/null is refused
        self._fd = open_file(path, flags)
        try:
            self._lock: FileLock | None = lock_fd(self._fd, path, RAW_RO if readonly else RAW_RW)
            self._size = file_size(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False
        if cache in ("none", "directsync") and hasattr(os, "O_DIRECT"):
            # a filesystem without O_DIRECT (tmpfs) keeps buffered I/O: still correct
            with contextlib.suppress(OSError):
                self._direct_fd = reopen_same_file(self._fd, flags | os.O_DIRECT
                                                   | getattr(os, "O_CLOEXEC", 0))
        log.debug("%s: opened raw %s (%d bytes, cache=%s%s)", path,
                  "read-only" if readonly else "read-write", self._size, cache,
                  ", shared" if force_share else "")

    @classmethod
    def create(cls, path: str, size: int, prealloc: str = "off") -> None:
        """A new raw image of ``size`` bytes (rounded up to a sector) as qemu-img makes one,
        ``prealloc`` being ``off``, ``falloc`` or ``full``: ``filecreate.create_file``, whose
        errors it raises, but a size the filesystem cannot hold reads as qemu-img says it."""
        try:
            create_file(path, size, prealloc=prealloc).close()
        except ImageIOError as exc:
            if exc.errno == errno.EFBIG:
                raise ImageIOError("The image size is too large for file format 'raw'",
                                   errno=exc.errno) from None
            raise

    @property
    def size(self) -> int:
        return self._size

    def fileno(self) -> int:
        return self._fd

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ImageError(
                f"request [{offset}, {offset + length}) is outside the image (size {self._size})"
            )

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: image is opened read-only")

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise ImageIOError(f"read failed at {offset}: {exc.strerror}", errno=exc.errno) from exc
        if len(data) < length:
            data += b"\0" * (length - len(data))
        return data

    def read_into(self, offset: int, buf: Buffer) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (past the end of file: zeros)."""
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        done = 0
        try:
            while done < len(view):
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got == 0:
                    view[done:] = bytes(len(view) - done)
                    break
                done += got
        except OSError as exc:
            raise ImageIOError(f"read failed at {offset}: {exc.strerror}", errno=exc.errno) from exc

    def _direct_view(self, offset: int, view: memoryview) -> tuple[int, memoryview]:
        """The O_DIRECT descriptor and an aligned copy of ``view``, when both fit."""
        n = len(view)
        if self._direct_fd is None or (offset | n) & (DIRECT_ALIGN - 1) or not n:
            return self._fd, view
        if self._abuf is None or len(self._abuf) < n:
            if self._abuf is not None:
                self._abuf.close()
            self._abuf = mmap.mmap(-1, max(n, 1 << 20))
        self._abuf[:n] = view
        return self._direct_fd, memoryview(self._abuf)[:n]

    def write(self, offset: int, data: Buffer, *, compress: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, len(data))
        if compress:
            raise UnsupportedFeatureError("Compression not supported for this file format")
        self._write(offset, memoryview(data).cast("B"))
        if self._writethrough:
            self.flush()

    def _write(self, offset: int, data: memoryview) -> None:
        self._unsynced = True
        fd, view = self._direct_view(offset, data)
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise ImageIOError(f"write failed at {offset}: {exc.strerror}",
                               errno=exc.errno) from exc
        finally:
            del view

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        self._unsynced = True
        if not (unmap and _punch_hole(self._fd, offset, length)):
            chunk = 1 << 20
            zero = memoryview(bytes(min(chunk, length)))
            pos, end = offset, offset + length
            while pos < end:
                n = min(chunk, end - pos)
                self._write(pos, zero[:n])
                pos += n
        if self._writethrough:
            self.flush()

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        self._unsynced = True
        _punch_hole(self._fd, offset, length)

    def flush(self) -> None:
        if self.readonly or self._unsafe or not self._unsynced:
            return  # nothing written since the last flush: no fdatasync, as QEMU
        if self._sync_failed is not None:  # as Qcow2Image._fdatasync: never retried into success
            raise ImageIOError(f"flush failed: an earlier flush of {self.path} failed "
                               f"({self._sync_failed}); what it covered may be lost",
                               errno=errno.EIO)
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._sync_failed = exc.strerror or str(exc)
            raise ImageIOError(f"flush failed: {exc.strerror}", errno=exc.errno) from exc
        self._unsynced = False

    def resize(self, new_size: int) -> None:
        self._check_writable()
        if new_size < self._size:
            raise ImageError("shrinking is not supported")
        if self._lock is not None:  # qemu-io's truncate takes "resize" first (and keeps it)
            p = self._lock.perms
            self._lock.apply(Perms(p.perm | PERM_RESIZE, p.shared))
        try:
            self._unsynced = True
            os.ftruncate(self._fd, new_size)
        except OSError as exc:
            raise ImageIOError(f"Could not resize file: {exc.strerror}",
                               errno=exc.errno) from exc
        self._size = new_size

    def block_status(self, offset: int, length: int) -> Iterator[MapExtent]:
        end = min(offset + length, self._size)
        pos = offset
        while pos < end:
            try:
                data_start = os.lseek(self._fd, pos, SEEK_DATA)
            except OSError as exc:
                # ENXIO: no data after pos; anything else: no SEEK_DATA, report data
                data_start = end if exc.errno == errno.ENXIO else pos
            data_start = min(data_start, end)
            if data_start > pos:
                yield MapExtent(pos, data_start - pos, 0, True, True, False, pos, self.path)
                pos = data_start
                continue
            try:
                hole = os.lseek(self._fd, pos, SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(max(hole, pos + 1), end)
            yield MapExtent(pos, hole - pos, 0, True, False, True, pos, self.path)
            pos = hole

    @property
    def data_fd(self) -> int:
        """The file's descriptor (``block_status``'s host offsets are the guest's)."""
        return self._fd

    def locks(self) -> list[FileLock]:
        """The lock description held on the file (for inactivation)."""
        return [self._lock] if self._lock is not None else []

    def close(self) -> None:
        """Flush (as QEMU does at close), then release the lock and the descriptors."""
        if not self._closed:
            log.debug("%s: closing raw (%s)", self.path,
                      "read-only" if self.readonly else "read-write")
            try:
                self.flush()
            finally:
                self._closed = True
                if self._direct_fd is not None:
                    os.close(self._direct_fd)
                if self._abuf is not None:
                    self._abuf.close()
                if self._lock is not None:
                    self._lock.release()
                os.close(self._fd)

    def __enter__(self) -> RawImage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
