"""A small blocking QMP client over the sans-I/O core, for dirtybits' own tools (the demo,
later the backup tool) talking to a daemon or to QEMU. Tests use ``qemu.qmp``, QEMU's
client; this one needs no event loop and nothing outside the standard library.

    with QmpClient.connect("/run/db.sock") as c:
        c.execute("block-dirty-bitmap-add", {"node": "n0", "name": "b0"})
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType
from typing import Any

from dirtybits.errors import DirtybitsError
from dirtybits.proto.qmp.core import (
    ClientConnection,
    ErrorReply,
    Event,
    Greeting,
    QmpProtocolError,
    Return,
)

log = logging.getLogger(__name__)


class QmpCommandError(DirtybitsError):
    """The server answered a command with an error (its class and text)."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.cls = cls
        self.desc = desc


class QmpClient:
    """One negotiated connection; ``execute`` runs a command and returns its value."""

    def __init__(self, sock: socket.socket, timeout: float | None = 30) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.conn = ClientConnection()
        self.events: list[Event] = []
        self._pending: list[Greeting | Return | ErrorReply | Event] = []
        self._ids = 0
        first = self._next()
        if not isinstance(first, Greeting):
            raise QmpProtocolError(f"expected the QMP greeting, got {first!r}")
        self.greeting = first
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: str, timeout: float | None = 30) -> QmpClient:
        """Connect to a unix socket. Raises ``OSError`` and ``QmpProtocolError``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            return cls(sock, timeout)
        except BaseException:
            sock.close()
            raise

    def _next(self) -> Greeting | Return | ErrorReply | Event:
        while not self._pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise QmpProtocolError("the server closed the connection")
            self._pending.extend(self.conn.receive(data))
        return self._pending.pop(0)

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``name``; its return value. Raises ``QmpCommandError`` for an error reply,
        ``QmpProtocolError``/``OSError`` when the connection fails."""
        self._ids += 1
        ident = f"db{self._ids}"
        self.sock.sendall(self.conn.command(name, arguments, id=ident))
        while True:
            msg = self._next()
            if isinstance(msg, Event):
                self.events.append(msg)
            elif isinstance(msg, Return) and msg.id == ident:
                return msg.value
            elif isinstance(msg, ErrorReply) and msg.id == ident:
                raise QmpCommandError(name, msg.cls, msg.desc)
            else:
                log.debug("ignoring %r", msg)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["QmpClient", "QmpCommandError"]
