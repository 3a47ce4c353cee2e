"""QEMU-compatible image locking: the same OFD byte locks as QEMU's ``file-posix`` driver.

QEMU (``raw_apply_lock_bytes`` / ``raw_check_lock_bytes`` in block/file-posix.c) takes one
shared (``F_RDLCK``) OFD lock per permission it holds, on byte ``100 + bit``, and one per
permission it refuses to share, on byte ``200 + bit``. An opener then tests (``F_OFD_GETLK``
with ``F_WRLCK``) the "unshare" byte of every permission it wants and the "perm" byte of every
permission it will not share; any lock there held by another open file description is a
conflict. Read locks never block each other, so only the test can fail. Taking the same bytes
makes qemu-img / qemu-io / qemu-nbd and dirtybits refuse each other exactly as QEMU processes
refuse each other. OFD locks belong to the open file description, so two opens of one image in
one process conflict too, as they do inside QEMU.

The permission sets below are the ones QEMU 7.2's tools were observed to lock (strace and
/proc/locks), not guesses: see ``tests/unit/test_filelock.py`` for the table.
Lowest layer: imports nothing from the package but ``errors`` and ``osfile``.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
import os
import struct
from typing import NamedTuple

from dirtybits.errors import ImageIOError, LockError, UsageError
from dirtybits.osfile import open_file, read_at

try:
    import fcntl

    _F_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None)
    _F_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
    _F_RDLCK, _F_WRLCK, _F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
except ImportError:  # pragma: no cover - not POSIX
    _F_OFD_GETLK = _F_OFD_SETLK = None
    _F_RDLCK, _F_WRLCK, _F_UNLCK = 0, 1, 2

log = logging.getLogger(__name__)

# block-common.h (QEMU >= 7.0; the retired GRAPH_MOD bit 0x10 is never locked)
PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_ALL = 0x0F
_PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# struct flock on 64-bit Linux: short type, short whence, off_t start, off_t len, pid_t pid
_FLOCK = struct.Struct("hhqqi4x")


class Perms(NamedTuple):
    """What an opener holds (``perm``) and what it lets others hold (``shared``)."""

    perm: int
    shared: int

    def force_shared(self) -> Perms:
        """``-U`` / force-share: share everything, hold the same."""
        return Perms(self.perm, PERM_ALL)


_CR, _W, _WU, _RS = PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE

# What QEMU 7.2 locks on each file (bytes in brackets: 1xx held, 2xx unshared):
QCOW2_RW = Perms(_CR | _W | _RS, _CR | _WU)   # qemu-io/qemu-nbd rw: [100 101 103 201 203]
QCOW2_RO = Perms(_CR, _CR | _WU)              # -r, check, map, compare, convert src, backing:
#                                               [100 201 203]
QCOW2_INFO = Perms(0, _CR | _WU)              # qemu-img info: [201 203]
DATA_FILE_RW = Perms(_CR | _W | _RS, PERM_ALL & ~_RS)  # external data file: [100 101 103 203]
DATA_FILE_RO = Perms(_CR, PERM_ALL & ~_RS)    # [100 203]
RAW_RW = Perms(_CR | _W, PERM_ALL)            # qemu-io -f raw rw: [100 101]
RAW_RO = Perms(_CR, PERM_ALL)                 # raw read-only, raw backing file: [100]
CREATE = Perms(_W | _RS, PERM_ALL & ~_RS)     # qemu-img create, before truncating: [101 103 203]


def qcow2_perms(*, readonly: bool, force_share: bool = False) -> Perms:
    """The image-file perms of a qcow2 open (qemu-io, qemu-img), ``-U`` applied."""
    p = QCOW2_RO if readonly else QCOW2_RW
    return p.force_shared() if force_share else p


def image_perms(fmt: str, *, readonly: bool, force_share: bool = False) -> Perms:
    """What qemu-img / qemu-io lock on the image file of a ``fmt`` image (``check``,
    ``check -r``, ``map``...); ``-U`` applied."""
    if fmt == "qcow2":
        return qcow2_perms(readonly=readonly, force_share=force_share)
    return RAW_RO if readonly else RAW_RW


def info_perms(fmt: str, *, force_share: bool = False) -> Perms:
    """``qemu-img info``: holds nothing, keeps a qcow2's writers out unless ``-U``; a raw
    image is not locked at all."""
    if fmt != "qcow2" or force_share:
        return Perms(0, PERM_ALL)
    return QCOW2_INFO


def check_force_share(readonly: bool, force_share: bool) -> None:
    """QEMU refuses -U on a writable open (bdrv_fill_options)."""
    if force_share and not readonly:
        raise UsageError("force-share=on can only be used with read-only images")


_ofd_supported: bool | None = None


def locking_supported() -> bool:
    """OFD locks available (QEMU's ``qemu_has_ofd_lock``); without them QEMU doesn't lock."""
    global _ofd_supported
    if _ofd_supported is None:
        _ofd_supported = False
        if _F_OFD_GETLK is not None:
            try:
                fd = os.open("/dev/null", os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return False
            try:
                fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(_F_WRLCK, os.SEEK_SET, 0, 0, 0))
                _ofd_supported = True
            except OSError as exc:
                _ofd_supported = exc.errno != _errno.EINVAL
            finally:
                os.close(fd)
    return _ofd_supported


def _setlk(fd: int, ltype: int, offset: int) -> None:
    assert _F_OFD_SETLK is not None
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(ltype, os.SEEK_SET, offset, 1, 0))


def _conflicts(fd: int, offset: int) -> bool:
    """Does another open file description hold a lock on this byte (``qemu_lock_fd_test``)?"""
    assert _F_OFD_GETLK is not None
    res = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(_F_WRLCK, os.SEEK_SET, offset, 1, 0))
    return bool(_FLOCK.unpack(res)[0] != _F_UNLCK)


def _errno_text(exc: OSError) -> str:
    # raw_lock_error_setg_errno: EAGAIN/EACCES mean "someone holds it", said without errno
    return "" if exc.errno in (_errno.EAGAIN, _errno.EACCES) else f": {exc.strerror}"


class FileLock:
    """The lock bytes one open file description holds on an image file.

    ``apply`` moves from the bytes held now to those of a new ``Perms`` the way QEMU's
    prepare/commit/abort does: lock the new bytes, test for conflicts, and on a conflict go
    back to exactly the bytes held before. ``release`` drops every byte (closing the fd would
    too; QEMU unlocks explicitly, and so do we, so a dup'd fd can't keep them).
    """

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path
        self.perms = Perms(0, PERM_ALL)
        self._locked = 0  # bit i: byte 100+i; bit 8+i: byte 200+i

    @staticmethod
    def _wanted(p: Perms) -> int:
        return (p.perm & PERM_ALL) | ((~p.shared & PERM_ALL) << 8)

    @staticmethod
    def _offset(b: int) -> int:
        return LOCK_PERM_BASE + b if b < 8 else LOCK_SHARED_BASE + b - 8

    def _set_bytes(self, wanted: int, *, unlock: bool) -> None:
        for b in (*range(4), *range(8, 12)):
            bit = 1 << b
            off = self._offset(b)
            if wanted & bit and not self._locked & bit:
                try:
                    _setlk(self.fd, _F_RDLCK, off)
                except OSError as exc:
                    raise LockError(f"Failed to lock byte {off}{_errno_text(exc)}") from None
                self._locked |= bit
            elif unlock and self._locked & bit and not wanted & bit:
                try:
                    _setlk(self.fd, _F_UNLCK, off)
                except OSError as exc:
                    raise LockError(f"Failed to unlock byte {off}: {exc.strerror}") from None
                self._locked &= ~bit

    def _check(self, p: Perms) -> None:
        for i in range(4):
            if p.perm >> i & 1 and self._test(LOCK_SHARED_BASE + i):
                raise LockError(f'Failed to get "{_PERM_NAMES[i]}" lock')
        for i in range(4):
            if not p.shared >> i & 1 and self._test(LOCK_PERM_BASE + i):
                raise LockError(f'Failed to get shared "{_PERM_NAMES[i]}" lock')

    def _test(self, off: int) -> bool:
        try:
            return _conflicts(self.fd, off)
        except OSError as exc:
            raise LockError(f"Failed to get lock byte {off}{_errno_text(exc)}") from None

    def apply(self, p: Perms) -> None:
        """Hold ``p`` (and drop what it no longer needs), or raise ``LockError`` unchanged."""
        if not locking_supported():
            self.perms = p
            return
        old = self.perms
        try:
            self._set_bytes(self._wanted(old) | self._wanted(p), unlock=False)
            self._check(p)
        except LockError as exc:
            with contextlib.suppress(LockError):  # only unlocks; report the first error
                self._set_bytes(self._wanted(old), unlock=True)
            msg = exc.reason
            hint = (f"Is another process using the image [{self.path}]?"
                    if msg.startswith("Failed to get") else "")
            log.debug("%s: lock conflict for perm=%#x shared=%#x: %s", self.path, p.perm,
                      p.shared, exc)
            raise LockError(msg, hint) from None
        self._set_bytes(self._wanted(p), unlock=True)
        self.perms = p
        log.debug("%s: locked perm=%#x shared=%#x (bytes %s)", self.path, p.perm, p.shared,
                  self.locked_bytes)

    def release(self) -> None:
        """Drop every lock byte; errors are ignored (closing the fd drops them anyway)."""
        if self._locked:
            try:
                self._set_bytes(0, unlock=True)
            except LockError:
                self._locked = 0
        self.perms = Perms(0, PERM_ALL)

    @property
    def locked_bytes(self) -> list[int]:
        """The byte offsets this description holds, for tests and diagnostics."""
        return [self._offset(b) for b in (*range(4), *range(8, 12)) if self._locked >> b & 1]


def lock_fd(fd: int, path: str, perms: Perms) -> FileLock:
    """Take ``perms`` on an open ``fd`` of ``path``; ``LockError`` (QEMU's words) if in use."""
    lock = FileLock(fd, path)
    lock.apply(perms)
    return lock


class ImageLock:
    """Hold QEMU's locks on ``path`` through a descriptor of its own, for code that reads the
    file some other way (``dirtybits info`` / ``check``); see ``command_lock``. A missing or
    unreadable file is left to the caller's own open to report. ``prefix`` goes before a
    lock error (qemu-img's ``Could not open 'F': ``).
    """

    def __init__(self, path: str, perms: Perms, *, prefix: str = ""):
        self.path = path
        self.perms = perms
        self.prefix = prefix
        self._fd = -1
        self._lock: FileLock | None = None

    def __enter__(self) -> ImageLock:
        if self.perms.perm == 0 and self.perms.shared == PERM_ALL:
            return self  # nothing to hold (info -U, raw info)
        try:  # read locks need only read access, even for a writer's perms
            self._fd = open_file(self.path, os.O_RDONLY)
        except ImageIOError:
            return self
        try:
            self._lock = lock_fd(self._fd, self.path, self.perms)
        except LockError as exc:
            os.close(self._fd)
            self._fd = -1
            raise LockError(f"{self.prefix}{exc.reason}", exc.hint) from None
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _probe(path: str) -> str:
    try:
        return "qcow2" if read_at(path, 0, 4) == b"QFI\xfb" else "raw"
    except ImageIOError:
        return "raw"


def command_lock(path: str, fmt: str | None, *, readonly: bool = True,
                 force_share: bool = False, info: bool = False) -> ImageLock:
    """The lock a qemu-img command holds on its image file while it runs::

        with command_lock(args.filename, args.fmt, info=True, force_share=args.force_share):
            ...                                    # qemu-img info [-U]
        with command_lock(args.filename, args.fmt, readonly=not args.repair,
                          force_share=args.force_share):
            ...                                    # qemu-img check [-r] [-U]

    ``fmt`` None probes the file as qemu-img does; errors read ``Could not open 'F': ...``.
    """
    fmt = fmt or _probe(path)
    perms = (info_perms(fmt, force_share=force_share) if info
             else image_perms(fmt, readonly=readonly, force_share=force_share))
    return ImageLock(path, perms, prefix=f"Could not open '{path}': ")
