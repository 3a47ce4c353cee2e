"""Running a service in the foreground or as a daemon, the way QEMU's tools do.

``qemu-storage-daemon --daemonize`` and ``qemu-nbd --fork`` return to their caller only once
the service is ready (its sockets accept) or has failed, with the reason on the caller's
stderr. ``run_service`` does the same for any asyncio service: it forks before any thread
exists, the child reports "ready" or its error through a pipe, and the parent exits with 0
or 1 accordingly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

Ready = Callable[[str | None], None]


def run_service(serve: Callable[[Ready], Coroutine[Any, Any, int]], *, daemonize: bool = False,
                report: Callable[[str], None] | None = None) -> int:
    """Run ``serve(ready)`` (it calls ``ready(None)`` once it serves, ``ready(error)`` when
    start-up failed) until it returns; its exit status. ``report`` gets a start-up failure's
    text (default: stderr). With ``daemonize`` the caller's process returns once the service
    is ready (0) or failed (1), and the service runs on in a detached child."""
    say = report or (lambda text: print(text, file=sys.stderr))
    if not daemonize:
        def ready(err: str | None) -> None:
            if err is not None:
                say(err)

        return asyncio.run(serve(ready))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read()
        if msg == b"ok":
            return 0
        say(msg.decode(errors="replace") or "the service died during start-up")
        os.waitpid(pid, 0)
        return 1
    os.close(rfd)
    os.setsid()
    _detach_stdio()

    def tell(err: str | None) -> None:
        with contextlib.suppress(OSError):
            os.write(wfd, b"ok" if err is None else err.encode())
            os.close(wfd)
        if err is None:  # started: let go of the caller's stderr too, as QEMU does
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 2)
            os.close(null)

    code = 1
    try:
        code = asyncio.run(serve(tell))
    finally:
        with contextlib.suppress(OSError):
            os.close(wfd)
        os._exit(code)


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)


__all__ = ["Ready", "run_service"]
