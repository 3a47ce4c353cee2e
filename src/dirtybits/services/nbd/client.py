"""A small blocking NBD client over the sans-I/O client core: what dirtybits' own tools use
to pull data from an NBD export (``dirtybits demo``'s incremental pull, and later the backup
tool's ``--pull``).

    with NbdClient.connect_unix("/tmp/nbd.sock", contexts=["qemu:dirty-bitmap:b0"]) as c:
        for offset, length, flags in c.block_status("qemu:dirty-bitmap:b0"):
            if flags & NBD_STATE_DIRTY:
                data = c.read(offset, length)

Fixed newstyle with structured replies and meta contexts, one request at a time. Errors:
``NbdClientError`` (a reply with an error, a server that broke the protocol, a context the
server did not grant).
"""

from __future__ import annotations

import socket
import struct
from types import TracebackType

from dirtybits.proto.nbd import wire
from dirtybits.proto.nbd.client import (
    Chunk,
    ClientConnection,
    NbdClientError,
    OptionReply,
    SimpleReply,
)
from dirtybits.proto.nbd.constants import (
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_MAX_BUFFER_SIZE,
    NBD_REP_FLAG_ERROR,
    NBD_REPLY_FLAG_DONE,
    Cmd,
    Option,
    Rep,
    ReplyType,
)

TIMEOUT = 60.0


class NbdClient:
    """One connection to one export."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.core = ClientConnection()
        self.size = 0
        self.flags = 0
        self.contexts: dict[str, int] = {}  # granted context name -> id
        self._cookie = 0

    @classmethod
    def connect_unix(cls, path: str, export: str = "", *,
                     contexts: list[str] | tuple[str, ...] = ()) -> NbdClient:
        """Connect, negotiate structured replies and ``contexts``, enter transmission.
        Raises ``NbdClientError`` (``OSError`` when the socket cannot connect)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(path)
            client = cls(sock)
            client._negotiate(export, list(contexts))
        except BaseException:
            sock.close()
            raise
        return client

    # ---------------------------------------------------------------- plumbing
    def _event(self) -> object:
        while (ev := self.core.next_event()) is None:
            data = self.sock.recv(1 << 20)
            if not data:
                raise NbdClientError("the server closed the connection")
            self.core.receive_data(data)
        return ev

    def _option(self, opt: Option, data: bytes = b"") -> list[OptionReply]:
        self.sock.sendall(self.core.option(opt, data))
        out: list[OptionReply] = []
        while True:
            ev = self._event()
            assert isinstance(ev, OptionReply)
            out.append(ev)
            if ev.rep == Rep.NBD_REP_ACK or ev.rep & NBD_REP_FLAG_ERROR:
                return out

    def _negotiate(self, export: str, contexts: list[str]) -> None:
        self._event()  # the greeting
        self.sock.sendall(self.core.client_flags(NBD_FLAG_C_FIXED_NEWSTYLE
                                                 | NBD_FLAG_C_NO_ZEROES))
        if self._option(Option.NBD_OPT_STRUCTURED_REPLY)[-1].rep != Rep.NBD_REP_ACK:
            raise NbdClientError("the server does not do structured replies")
        if contexts:
            data = wire.meta_request(export, contexts)
            for rep in self._option(Option.NBD_OPT_SET_META_CONTEXT, data)[:-1]:
                if rep.rep == Rep.NBD_REP_META_CONTEXT:
                    self.contexts[rep.data[4:].decode()] = struct.unpack_from(">I",
                                                                              rep.data)[0]
            missing = [c for c in contexts if c not in self.contexts]
            if missing:
                raise NbdClientError(f"the server does not support metadata context "
                                     f"\"{missing[0]}\"")
        replies = self._option(Option.NBD_OPT_GO, wire.info_request(export))
        if replies[-1].rep != Rep.NBD_REP_ACK:
            raise NbdClientError(f"export '{export}': "
                                 f"{replies[-1].data.decode(errors='replace')}")
        for rep in replies:
            if rep.rep == Rep.NBD_REP_INFO and struct.unpack_from(">H", rep.data)[0] == 0:
                self.size, self.flags = struct.unpack_from(">QH", rep.data, 2)
        self.core.transmission(structured=True)

    def _request(self, cmd: Cmd, offset: int = 0, length: int = 0,
                 payload: bytes = b"") -> list[Chunk]:
        self._cookie += 1
        self.sock.sendall(self.core.request(cmd, self._cookie, offset, length, 0, payload))
        chunks: list[Chunk] = []
        while True:
            ev = self._event()
            if isinstance(ev, SimpleReply):
                if ev.error:
                    raise NbdClientError(f"{cmd.name} at {offset}+{length}: error {ev.error}")
                return chunks
            assert isinstance(ev, Chunk)
            if ev.type & (1 << 15):
                err, n = struct.unpack_from(">IH", ev.payload)
                raise NbdClientError(f"{cmd.name} at {offset}+{length}: "
                                     f"{ev.payload[6:6 + n].decode(errors='replace')} "
                                     f"(error {err})")
            chunks.append(ev)
            if ev.flags & NBD_REPLY_FLAG_DONE:
                return chunks

    # ---------------------------------------------------------------- requests
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (split in requests of at most 32 MiB)."""
        out = bytearray(length)
        pos = 0
        while pos < length:
            n = min(NBD_MAX_BUFFER_SIZE, length - pos)
            for ch in self._request(Cmd.NBD_CMD_READ, offset + pos, n):
                (off,) = struct.unpack_from(">Q", ch.payload)
                at = off - offset
                if ch.type == ReplyType.NBD_REPLY_TYPE_OFFSET_DATA:
                    out[at:at + len(ch.payload) - 8] = ch.payload[8:]
                # OFFSET_HOLE: zeroes, already there
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        self._request(Cmd.NBD_CMD_WRITE, offset, len(data), data)

    def flush(self) -> None:
        self._request(Cmd.NBD_CMD_FLUSH)

    def block_status(self, context: str, offset: int = 0, length: int | None = None
                     ) -> list[tuple[int, int, int]]:
        """``(offset, length, flags)`` runs of ``context`` over ``[offset, offset+length)``
        (the whole export by default), asking again where a reply covers less."""
        cid = self.contexts.get(context)
        if cid is None:
            raise NbdClientError(f"metadata context \"{context}\" was not negotiated")
        end = self.size if length is None else offset + length
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            n = min(end - pos, 0xFFFFFFFF & ~0x1FF)
            progressed = False
            for ch in self._request(Cmd.NBD_CMD_BLOCK_STATUS, pos, n):
                if struct.unpack_from(">I", ch.payload)[0] != cid:
                    continue
                vals = struct.unpack_from(f">{(len(ch.payload) - 4) // 4}I", ch.payload, 4)
                for ln, fl in zip(vals[::2], vals[1::2], strict=True):
                    ln = min(ln, end - pos)
                    if ln <= 0:
                        break
                    if out and out[-1][2] == fl and out[-1][0] + out[-1][1] == pos:
                        out[-1] = (out[-1][0], out[-1][1] + ln, fl)
                    else:
                        out.append((pos, ln, fl))
                    pos += ln
                    progressed = True
            if not progressed:
                raise NbdClientError(f"block status at {pos} made no progress")
        return out

    def close(self) -> None:
        try:
            self._cookie += 1
            self.sock.sendall(self.core.request(Cmd.NBD_CMD_DISC, self._cookie))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["NbdClient", "NbdClientError"]
