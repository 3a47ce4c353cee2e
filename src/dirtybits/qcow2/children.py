"""What the qcow2 engine needs of its children: a backing image and an external data file.

The engine opens neither by itself. Whoever opens an image (the block layer) hands them in,
either already open (``Qcow2Image.open(..., backing=..., data_file=...)``, as QMP's
``blockdev-add`` with ``backing: NODE`` / ``data-file: NODE`` will) or through a
``ChildOpener`` the engine asks for the children its header names, at the moment QEMU opens
them (QEMU's ``bdrv_open_child``): the data file once the image's own tables are read, the
backing file after that, both before an open for writing changes anything, so a failed open
still writes nothing and reports what QEMU reports first.

Ownership: a child the engine got from a ``ChildOpener`` is the engine's (it closes it at
``close``, and when the open fails); a child handed in open stays its caller's, to be closed
after the image (a node can be the backing of several images, as in QEMU).

Lowest layers only: ``osfile``, ``filelock``, ``errors``, and the engine's ``MapExtent``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from dirtybits.filelock import DATA_FILE_RO, DATA_FILE_RW, FileLock, Perms, lock_fd
from dirtybits.osfile import open_file
from dirtybits.qcow2.extent import MapExtent

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class BackingImage(Protocol):
    """What the engine reads through a backing image (a raw file, a qcow2 image, a node).

    ``block_status`` reports the backing chain below as ``MapExtent`` runs whose ``depth``
    counts from the backing image (0 = the backing image itself): the engine adds one.
    """

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def read_into(self, offset: int, buf: Buffer) -> None: ...

    def block_status(self, offset: int, length: int) -> Iterator[MapExtent]: ...

    def close(self) -> None: ...


class DataFile:
    """An external data file, open and locked as QEMU's file driver holds one: the engine's
    own low-level kind of file (a descriptor, its path, its lock bytes).

    ``close`` releases the lock and the descriptor (idempotent).
    """

    def __init__(self, path: str, fd: int, lock: FileLock | None, *, readonly: bool):
        self.path = path
        self.fd = fd
        self.lock = lock
        self.readonly = readonly
        self.closed = False

    @classmethod
    def open(cls, path: str, *, readonly: bool, force_share: bool = False) -> DataFile:
        """Open and lock ``path`` as the data file of an image opened ``readonly`` or not.

        Raises ``ImageIOError`` (``Could not open data file 'PATH': REASON``, or a file that
        is not a regular file or block device) and ``LockError`` (in use elsewhere).
        """
        fd = open_file(path, os.O_RDONLY if readonly else os.O_RDWR, what="open data file")
        perms = DATA_FILE_RO if readonly else DATA_FILE_RW
        if force_share:
            perms = perms.force_shared()
        try:
            # QEMU attaches the data file in two steps (first only what it unshares), which
            # decides the message when the data file is in use: do the same
            lock = lock_fd(fd, path, Perms(0, perms.shared))
            lock.apply(perms)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, lock, readonly=readonly)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.lock is not None:
                self.lock.release()
        finally:
            os.close(self.fd)

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChildOpener(Protocol):
    """Opens the children an image's header names, when the engine asks (the block layer
    implements it). ``parent`` is the path of the image whose header names the child; the
    name is as the header has it (relative names are relative to the parent's directory)."""

    def open_data_file(self, name: str, *, parent: str, readonly: bool,
                       force_share: bool) -> DataFile:
        """The data file ``name``; the engine owns what comes back."""
        ...

    def open_backing(self, name: str, fmt: str | None, *, parent: str,
                     force_share: bool) -> BackingImage | None:
        """The backing file ``name`` (``fmt`` from the header, None: probe), read-only; None
        when the caller wants the image without its backing file. The engine owns it."""
        ...
