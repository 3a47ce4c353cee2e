"""The client end of NBD, with no I/O: requests out, parsed replies in.

It pairs with ``proto.nbd.server.ServerConnection`` in memory (the core's tests), and is the
base of dirtybits' own NBD client. It builds frames (``client_flags``, ``option``,
``request``) and parses what the server sends into events: the greeting, option replies,
the EXPORT_NAME reply, simple replies (a READ's data included: the client remembers each
read's length by its cookie) and structured reply chunks. It does not judge the server: a
frame it cannot parse raises ``NbdClientError``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dirtybits.errors import DirtybitsError
from dirtybits.proto.nbd import wire
from dirtybits.proto.nbd.constants import (
    IHAVEOPT,
    NBD_REP_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    Cmd,
)


class NbdClientError(DirtybitsError):
    """The server sent something this client cannot parse."""


class ClientPhase(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    EXPORT_NAME = "export-name"  # sent NBD_OPT_EXPORT_NAME: its reply has no header
    TRANSMISSION = "transmission"


@dataclass(frozen=True)
class Greeting:
    flags: int


@dataclass(frozen=True)
class OptionReply:
    option: int
    rep: int
    data: bytes


@dataclass(frozen=True)
class ExportNameReply:
    size: int
    flags: int


@dataclass(frozen=True)
class SimpleReply:
    cookie: int
    error: int
    data: bytes = b""


@dataclass(frozen=True)
class Chunk:
    cookie: int
    flags: int
    type: int
    payload: bytes


ClientEvent = Greeting | OptionReply | ExportNameReply | SimpleReply | Chunk


class ClientConnection:
    """One connection's client-side parsing state."""

    def __init__(self) -> None:
        self.phase = ClientPhase.GREETING
        self.no_zeroes = False
        self._in = bytearray()
        self._events: list[ClientEvent] = []
        self._reads: dict[int, int] = {}  # cookie -> length of a pending simple-reply READ
        self.structured = False

    # ---------------------------------------------------------------- building frames
    def client_flags(self, flags: int) -> bytes:
        self.no_zeroes = bool(flags & 2)
        return wire.CLIENT_FLAGS.pack(flags)

    def option(self, opt: int, data: bytes = b"") -> bytes:
        from dirtybits.proto.nbd.constants import Option

        if opt == Option.NBD_OPT_EXPORT_NAME:
            self.phase = ClientPhase.EXPORT_NAME
        return wire.option(opt, data)

    def request(self, cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"") -> bytes:
        if cmd == Cmd.NBD_CMD_READ and not self.structured:
            self._reads[cookie] = length
        return wire.Request(flags, cmd, cookie, offset, length).pack() + payload

    def transmission(self, structured: bool) -> None:
        """Negotiation ended (GO acknowledged)."""
        self.phase = ClientPhase.TRANSMISSION
        self.structured = structured

    # ---------------------------------------------------------------- parsing
    def receive_data(self, data: bytes) -> None:
        self._in += data
        while self._parse_one():
            pass

    def next_event(self) -> ClientEvent | None:
        return self._events.pop(0) if self._events else None

    def _parse_one(self) -> bool:
        buf = self._in
        if self.phase is ClientPhase.GREETING:
            if len(buf) < wire.GREETING.size:
                return False
            magic, opt_magic, flags = wire.GREETING.unpack_from(buf)
            if magic != NBDMAGIC or opt_magic != IHAVEOPT:
                raise NbdClientError("not a newstyle NBD server")
            del buf[:wire.GREETING.size]
            self._events.append(Greeting(flags))
            self.phase = ClientPhase.OPTIONS
            return True
        if self.phase is ClientPhase.EXPORT_NAME:
            need = wire.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else 124)
            if len(buf) < need:
                return False
            size, flags = wire.EXPORT_NAME_REPLY.unpack_from(buf)
            del buf[:need]
            self._events.append(ExportNameReply(size, flags))
            self.phase = ClientPhase.TRANSMISSION
            return True
        if self.phase is ClientPhase.OPTIONS:
            if len(buf) < wire.OPTION_REPLY.size:
                return False
            magic, opt, rep, length = wire.OPTION_REPLY.unpack_from(buf)
            if magic != NBD_REP_MAGIC:
                raise NbdClientError(f"bad option reply magic 0x{magic:x}")
            end = wire.OPTION_REPLY.size + length
            if len(buf) < end:
                return False
            self._events.append(OptionReply(opt, rep, bytes(buf[wire.OPTION_REPLY.size:end])))
            del buf[:end]
            return True
        if len(buf) < 4:
            return False
        (magic,) = wire.U32.unpack_from(buf)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            if len(buf) < wire.SIMPLE_REPLY.size:
                return False
            _, error, cookie = wire.SIMPLE_REPLY.unpack_from(buf)
            n = self._reads.get(cookie, 0) if not error else 0
            end = wire.SIMPLE_REPLY.size + n
            if len(buf) < end:
                return False
            self._reads.pop(cookie, None)
            self._events.append(SimpleReply(cookie, error,
                                            bytes(buf[wire.SIMPLE_REPLY.size:end])))
            del buf[:end]
            return True
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            if len(buf) < wire.CHUNK.size:
                return False
            _, flags, typ, cookie, length = wire.CHUNK.unpack_from(buf)
            end = wire.CHUNK.size + length
            if len(buf) < end:
                return False
            self._events.append(Chunk(cookie, flags, typ, bytes(buf[wire.CHUNK.size:end])))
            del buf[:end]
            return True
        raise NbdClientError(f"bad reply magic 0x{magic:x}")


__all__ = [
    "Chunk", "ClientConnection", "ClientEvent", "ClientPhase", "ExportNameReply", "Greeting",
    "NbdClientError", "OptionReply", "SimpleReply",
]
