"""The QMP server: monitors on unix sockets, each a connection run by the sans-I/O core.

A monitor handles its commands one at a time, in order, as QEMU's monitor does; monitors run
side by side (the block thread serializes what reaches the nodes). A peer that breaks the
protocol (``QmpProtocolError``: a message past the size limit, bytes that are not UTF-8) is
disconnected; everything else gets an error reply and the connection goes on. Events go to
every monitor past negotiation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Mapping
from typing import Any

from dirtybits.errors import DirtybitsError
from dirtybits.proto.qmp.core import (
    MAX_MESSAGE,
    Command,
    ErrorClass,
    QmpError,
    QmpProtocolError,
    Reply,
    ServerConnection,
    State,
)
from dirtybits.services.qmp.commands import Commands, qmp_text

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16
_ids = itertools.count(1)


class Monitor:
    """One client connection."""

    def __init__(self, server: QmpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = ServerConnection(server.commands.version, server.commands.package,
                                     max_message=server.max_message)
        self.log = log.getChild(f"mon{next(_ids)}")

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("-> %s", data[:400].decode(errors="replace").rstrip())
            self.writer.write(data)

    async def serve(self) -> None:
        self.log.info("connected")
        try:
            self.send(self.conn.greeting())
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                try:
                    items = self.conn.receive(data)
                except QmpProtocolError as exc:
                    self.log.warning("closing: the client broke the protocol: %s", exc)
                    break
                for item in items:
                    if isinstance(item, Reply):
                        self.send(item.data)
                    else:
                        self.send(await self._run(item))
                    await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.log.info("connection lost: %s", exc)
        finally:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            self.log.info("disconnected")

    async def _run(self, cmd: Command) -> bytes:
        self.log.debug("<- %s %s", cmd.name, cmd.arguments)
        if cmd.oob:
            return self.conn.error(cmd, ErrorClass.GENERIC,
                                   f"The command {cmd.name} does not support OOB")
        try:
            value = await self.server.commands.run(cmd.name, cmd.arguments)
        except QmpError as exc:
            return self.conn.error(cmd, exc.cls, exc.desc)
        except DirtybitsError as exc:
            return self.conn.error(cmd, ErrorClass.GENERIC, qmp_text(exc))
        except Exception as exc:  # a bug: say so, keep the daemon and the monitor up
            self.log.exception("command %s failed", cmd.name)
            return self.conn.error(cmd, ErrorClass.GENERIC,
                                   f"internal error in {cmd.name}: {type(exc).__name__}: {exc}")
        return self.conn.ok(cmd, value)

    @property
    def negotiated(self) -> bool:
        return self.conn.state is State.COMMAND


class QmpServer:
    """All monitors of one daemon, sharing one command table."""

    def __init__(self, commands: Commands, *, max_message: int = MAX_MESSAGE) -> None:
        self.commands = commands
        self.max_message = max_message
        self.monitors: set[Monitor] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen_unix(self, path: str, mode: int = 0o600) -> None:
        """Accept monitors on a unix socket at ``path`` (an old socket there is replaced;
        any other file is refused), readable and writable per ``mode``."""
        if os.path.lexists(path):
            import stat

            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise DirtybitsError(f"'{path}' exists and is not a socket")
            try:
                os.unlink(path)
            except OSError as exc:
                raise DirtybitsError(f"cannot replace the socket '{path}': "
                                     f"{exc.strerror or exc}") from exc
        old = os.umask(0o777 & ~mode)
        try:
            server = await asyncio.start_unix_server(self._accept, path)
        except OSError as exc:
            raise DirtybitsError(f"cannot listen on '{path}': {exc.strerror or exc}") from exc
        finally:
            os.umask(old)
        os.chmod(path, mode)
        self.servers.append(server)
        log.info("QMP monitor listening on %s", path)

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        mon = Monitor(self, reader, writer)
        self.monitors.add(mon)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await mon.serve()
        finally:
            self.monitors.discard(mon)
            if task is not None:
                self._tasks.discard(task)

    def broadcast(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every monitor past negotiation."""
        msg = ServerConnection.event(name, data)
        for mon in list(self.monitors):
            if mon.negotiated:
                mon.send(msg)

    async def close(self) -> None:
        """Stop listening and drop every monitor."""
        for server in self.servers:
            server.close()
        for mon in list(self.monitors):
            with contextlib.suppress(Exception):
                await mon.writer.drain()
            mon.writer.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers.clear()


__all__ = ["Monitor", "QmpServer"]
