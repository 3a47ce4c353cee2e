"""A file layer that fails (or kills the process at) a chosen write or sync of the engine.

``inject(Fault(...))`` replaces the ``os`` module seen by ``dirtybits.qcow2.image`` (the only
module that writes or syncs image files) with a proxy. Every ``pwrite``/``pwritev``/``write``/
``ftruncate`` (a *write*) and ``fdatasync``/``fsync`` (a *sync*) the engine makes is counted;
the ``at``-th one (0-based, among the kinds selected) gets the fault:

- ``fail``: raise ``OSError(errno)`` without doing anything (the write never landed);
- ``fail-after``: do the call, then raise (the write landed, or the sync happened, but the
  caller was told it failed: what a lost completion or a late EIO looks like);
- ``partial``: write the first half, then raise (a short write, then ENOSPC);
- ``kill-before`` / ``kill-after``: SIGKILL this process just before / just after the call
  (a crash at an exact point of the protocol; the page cache survives, as with kill -9).

After the first fault, ``sticky=True`` makes every later call of the selected kinds fail too
(a disk that stays broken); otherwise later calls succeed (a transient error).

Hole punches (``PUNCH``: ``osfile.punch_hole`` as the engine calls it, for snapshots too)
are counted only when ``kinds`` names them. A punch that fails reports False as the real one
does (the engine treats a punch as advisory): ``fail`` skips it, ``fail-after`` and
``partial`` do all or half of it, and every one of them then answers False.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

WRITES = ("pwrite", "pwritev", "write", "ftruncate")
SYNCS = ("fdatasync", "fsync")
PUNCH = ("punch_hole",)
ACTIONS = ("fail", "fail-after", "partial", "kill-before", "kill-after")
PUNCHING_MODULES = ("dirtybits.qcow2.image",)  # every punch goes through the engine


@dataclass
class Fault:
    at: int  # which selected call (0-based) gets the fault; -1: none (just count)
    action: str = "fail"
    errno: int = errno_mod.EIO
    kinds: tuple[str, ...] = WRITES + SYNCS
    sticky: bool = False
    match: Callable[[str, tuple[Any, ...]], bool] | None = None  # narrows the selected calls
    calls: int = 0  # selected calls seen so far
    fired: str | None = None  # "pwrite#12" once the fault happened
    log: list[str] = field(default_factory=list)  # kinds of the selected calls, in order


class OsProxy:
    """Looks like ``os``; intercepts the calls named in WRITES and SYNCS."""

    def __init__(self, real: Any, fault: Fault):
        self._real = real
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name in WRITES or name in SYNCS:
            return lambda *args: self._call(name, attr, args)
        return attr

    def _call(self, name: str, fn: Any, args: tuple[Any, ...]) -> Any:
        f = self._fault
        if name not in f.kinds or (f.match is not None and not f.match(name, args)):
            return fn(*args)
        index = f.calls
        f.calls += 1
        f.log.append(name)
        if f.fired is not None and f.sticky:
            raise OSError(f.errno, os.strerror(f.errno))
        if index != f.at:
            return fn(*args)
        f.fired = f"{name}#{index}"
        if f.action == "kill-before":
            os.kill(os.getpid(), signal.SIGKILL)
        if f.action == "fail":
            raise OSError(f.errno, os.strerror(f.errno))
        if f.action == "partial" and name in ("pwrite", "pwritev"):
            data = memoryview(args[1] if name == "pwrite" else b"".join(args[1]))
            if len(data) // 2:
                self._real.pwrite(args[0], data[:len(data) // 2], args[2])
            raise OSError(f.errno, os.strerror(f.errno))
        result = fn(*args)
        if f.action == "kill-after":
            os.kill(os.getpid(), signal.SIGKILL)
        if f.action in ("fail-after", "partial"):
            raise OSError(f.errno, os.strerror(f.errno))
        return result


def _punch_proxy(real: Callable[[int, int, int], bool],
                 fault: Fault) -> Callable[[int, int, int], bool]:
    def punch(fd: int, offset: int, length: int) -> bool:
        f = fault
        if "punch_hole" not in f.kinds or (f.match is not None
                                           and not f.match("punch_hole", (fd, offset, length))):
            return real(fd, offset, length)
        index = f.calls
        f.calls += 1
        f.log.append("punch_hole")
        if f.fired is not None and f.sticky:
            return False
        if index != f.at:
            return real(fd, offset, length)
        f.fired = f"punch_hole#{index}"
        if f.action == "kill-before":
            os.kill(os.getpid(), signal.SIGKILL)
        if f.action == "fail":
            return False
        if f.action == "partial":
            half = length // 2 // 512 * 512
            if half:
                real(fd, offset, half)
            return False
        done = real(fd, offset, length)
        if f.action == "kill-after":
            os.kill(os.getpid(), signal.SIGKILL)
        return False if f.action == "fail-after" else done

    return punch


def write_length(name: str, args: tuple[Any, ...]) -> int | None:
    """Bytes a ``pwrite``/``pwritev`` call writes; None for any other call."""
    if name == "pwrite":
        return len(args[1])
    if name == "pwritev":
        return sum(len(b) for b in args[1])
    return None


@contextlib.contextmanager
def inject(fault: Fault) -> Iterator[Fault]:
    """Route the engine's file calls through ``OsProxy`` (and its hole punches, when
    ``fault.kinds`` selects them) for the duration."""
    import importlib

    import dirtybits.qcow2.image as image_mod

    real = getattr(image_mod, "os")  # noqa: B009 (not an exported name)
    setattr(image_mod, "os", OsProxy(real, fault))  # noqa: B010
    punches: list[tuple[Any, Any]] = []
    if "punch_hole" in fault.kinds:
        for name in PUNCHING_MODULES:
            mod = importlib.import_module(name)
            punches.append((mod, mod.punch_hole))
            mod.punch_hole = _punch_proxy(mod.punch_hole, fault)
    try:
        yield fault
    finally:
        setattr(image_mod, "os", real)  # noqa: B010
        for mod, fn in punches:
            mod.punch_hole = fn
