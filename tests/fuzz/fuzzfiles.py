"""Helpers shared by the fuzz tests (imported after putting this folder on ``sys.path``,
as pytest's ``--import-mode=importlib`` does not): their hypothesis settings, a file digest
and a time limit."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, settings


class FuzzTimeoutError(BaseException):
    """An example ran past its time limit (BaseException: no handler in the code swallows
    it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``FuzzTimeoutError`` in the block if it runs longer than ``seconds``."""
    def expired(signum: int, frame: FrameType | None) -> None:
        raise FuzzTimeoutError(f"example took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def file_digest(path: Path) -> str:
    """sha256 of a file's size and data extents (a write may leave a huge sparse file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(str(size).encode())
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(str(start).encode())
            while start < end:
                chunk = os.pread(fd, min(end - start, 1 << 20), start)
                if not chunk:
                    break
                h.update(chunk)
                start += len(chunk)
            pos = end
    return h.hexdigest()


def fuzz_settings(default: int, divisor: int = 1, **kw: Any) -> settings:
    """``default`` examples, or ``DIRTYBITS_FUZZ_EXAMPLES // divisor``; derandomized when CI
    is set (a red run replays); no deadline (the time limit guards each example)."""
    env = os.environ.get("DIRTYBITS_FUZZ_EXAMPLES")
    return settings(max_examples=max(1, int(env) // divisor) if env else default,
                    derandomize=bool(os.environ.get("CI")), deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large], **kw)
