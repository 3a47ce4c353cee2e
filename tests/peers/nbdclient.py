"""A small asyncio NBD client over our sans-I/O client core (``proto.nbd.client``), for tests
that drive an NBD server request by request: the in-process server's tests and the load test
of the daemon's exports (many of these at once, one connection each).

    c = await Client.connect(sock, "disk", contexts=("qemu:dirty-bitmap:b0",))
    await c.write(0, b"x" * 4096)
    assert await c.read(0, 4096) == b"x" * 4096
    ext = await c.block_status(0, 1 << 20)  # {context name: [(length, flags), ...]}
    await c.close()

``call`` returns a reply's raw events (``SimpleReply`` or ``Chunk``s); the helpers (``read``,
``write``, ``write_zeroes``, ``trim``, ``flush``, ``block_status``) check the reply and raise
``NbdReplyError`` on an error reply. Replies are read in the order requests were sent (our
server and qemu-nbd answer one connection's requests in order); ``send`` then ``reply``
pipelines several requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from dirtybits.proto.nbd import wire
from dirtybits.proto.nbd.client import Chunk, ClientConnection, OptionReply, SimpleReply
from dirtybits.proto.nbd.constants import (
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_REPLY_FLAG_DONE,
    Cmd,
    Option,
    Rep,
    ReplyType,
)

EVENT_TIMEOUT = 10.0  # seconds to wait for the server's next bytes


class NbdReplyError(Exception):
    """The server answered a request with an error."""

    def __init__(self, cmd: int, error: int, message: str = "") -> None:
        super().__init__(f"{Cmd(cmd).name}: error {error}" + (f": {message}" if message else ""))
        self.cmd = cmd
        self.error = error
        self.message = message


def meta(export: str, contexts: tuple[str, ...]) -> bytes:
    """The data of ``NBD_OPT_SET_META_CONTEXT`` / ``LIST_META_CONTEXT``."""
    return wire.meta_request(export, contexts)


def extents(ev: Chunk) -> tuple[int, list[tuple[int, int]]]:
    """A BLOCK_STATUS chunk: (context id, [(length, flags), ...])."""
    cid = struct.unpack_from(">I", ev.payload)[0]
    n = (len(ev.payload) - 4) // 8
    vals = struct.unpack_from(f">{2 * n}I", ev.payload, 4)
    return cid, list(zip(vals[::2], vals[1::2], strict=True))


def _error(ev: Any, cmd: int) -> NbdReplyError | None:
    if isinstance(ev, SimpleReply):
        return NbdReplyError(cmd, ev.error) if ev.error else None
    if ev.type & (1 << 15):  # an error chunk: errno, message length, message
        err, n = struct.unpack_from(">IH", ev.payload)
        return NbdReplyError(cmd, err, ev.payload[6:6 + n].decode(errors="replace"))
    return None


class Client:
    """One connection. ``contexts`` maps each negotiated meta context's id to its name."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 timeout: float = EVENT_TIMEOUT) -> None:
        self.r, self.w = reader, writer
        self.core = ClientConnection()
        self.cookie = 0
        self.timeout = timeout
        self.contexts: dict[int, str] = {}
        self.size = 0
        self.flags = 0

    @classmethod
    async def connect(cls, path: str, export: str = "", *, structured: bool = True,
                      contexts: tuple[str, ...] = (), timeout: float = EVENT_TIMEOUT) -> Client:
        """Connect to the unix socket ``path``, negotiate (fixed newstyle, no zeroes;
        structured replies and ``contexts`` when asked) and ``NBD_OPT_GO`` to ``export``."""
        r, w = await asyncio.open_unix_connection(path)
        c = cls(r, w, timeout=timeout)
        await c.event()  # greeting
        w.write(c.core.client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
        if structured:
            assert (await c.option(Option.NBD_OPT_STRUCTURED_REPLY))[-1].rep == Rep.NBD_REP_ACK
        if contexts:
            for rep in await c.option(Option.NBD_OPT_SET_META_CONTEXT, meta(export, contexts)):
                if rep.rep == Rep.NBD_REP_META_CONTEXT:
                    c.contexts[struct.unpack_from(">I", rep.data)[0]] = rep.data[4:].decode()
        replies = await c.option(Option.NBD_OPT_GO, wire.info_request(export))
        assert replies[-1].rep == Rep.NBD_REP_ACK, replies
        for rep in replies:
            if rep.rep == Rep.NBD_REP_INFO and struct.unpack_from(">H", rep.data)[0] == 0:
                c.size, c.flags = struct.unpack_from(">QH", rep.data, 2)
        c.core.transmission(structured)
        return c

    async def event(self) -> Any:
        while (ev := self.core.next_event()) is None:
            # (not wait_for: on 3.11 it may swallow a cancellation that races the data)
            async with asyncio.timeout(self.timeout):
                data = await self.r.read(1 << 20)
            if not data:
                raise EOFError
            self.core.receive_data(data)
        return ev

    async def option(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        self.w.write(self.core.option(opt, data))
        out = []
        while True:
            ev = await self.event()
            out.append(ev)
            if ev.rep == Rep.NBD_REP_ACK or ev.rep & (1 << 31):
                return out

    def send(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> int:
        """Send one request; its cookie."""
        self.cookie += 1
        self.w.write(self.core.request(cmd, self.cookie, offset, length, flags, payload))
        return self.cookie

    async def reply(self) -> list[Any]:
        """The events of one whole reply (chunks until DONE, or one simple reply)."""
        out = []
        while True:
            ev = await self.event()
            out.append(ev)
            if isinstance(ev, SimpleReply) or ev.flags & NBD_REPLY_FLAG_DONE:
                return out

    async def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                   payload: bytes = b"") -> list[Any]:
        self.send(cmd, offset, length, flags, payload)
        return await self.reply()

    @staticmethod
    def check(cmd: int, events: list[Any]) -> list[Any]:
        """``events`` when no event is an error; else raises ``NbdReplyError``."""
        for ev in events:
            if (err := _error(ev, cmd)) is not None:
                raise err
        return events

    @staticmethod
    def read_data(offset: int, length: int, events: list[Any]) -> bytes:
        """The data of a READ reply's events (holes read as zeroes)."""
        Client.check(Cmd.NBD_CMD_READ, events)
        buf = bytearray(length)
        for ev in events:
            if isinstance(ev, SimpleReply):
                buf[:] = ev.data
            elif ev.type == ReplyType.NBD_REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", ev.payload)
                buf[off - offset:off - offset + len(ev.payload) - 8] = ev.payload[8:]
            elif ev.type == ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE:
                pass
            else:
                raise AssertionError(ev)
        return bytes(buf)

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        return self.read_data(offset, length, await self.call(Cmd.NBD_CMD_READ, offset, length,
                                                              flags))

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.check(Cmd.NBD_CMD_WRITE, await self.call(Cmd.NBD_CMD_WRITE, offset, len(data),
                                                      flags, data))

    async def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self.check(Cmd.NBD_CMD_WRITE_ZEROES,
                   await self.call(Cmd.NBD_CMD_WRITE_ZEROES, offset, length, flags))

    async def trim(self, offset: int, length: int, flags: int = 0) -> None:
        self.check(Cmd.NBD_CMD_TRIM, await self.call(Cmd.NBD_CMD_TRIM, offset, length, flags))

    async def flush(self) -> None:
        self.check(Cmd.NBD_CMD_FLUSH, await self.call(Cmd.NBD_CMD_FLUSH))

    async def block_status(self, offset: int, length: int,
                           flags: int = 0) -> dict[str, list[tuple[int, int]]]:
        """Each negotiated context's extents, by context name."""
        events = self.check(Cmd.NBD_CMD_BLOCK_STATUS,
                            await self.call(Cmd.NBD_CMD_BLOCK_STATUS, offset, length, flags))
        out: dict[str, list[tuple[int, int]]] = {}
        for ev in events:
            if ev.type == ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS:
                cid, ext = extents(ev)
                out[self.contexts[cid]] = ext
        return out

    async def close(self) -> None:
        self.send(Cmd.NBD_CMD_DISC)
        self.w.close()
        with contextlib.suppress(ConnectionError, OSError):  # the server closed first
            async with asyncio.timeout(self.timeout):
                await self.w.wait_closed()


__all__ = ["EVENT_TIMEOUT", "Client", "NbdReplyError", "extents", "meta"]
