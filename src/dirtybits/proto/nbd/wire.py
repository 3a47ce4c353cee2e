"""NBD wire layouts: packing and unpacking of every fixed-size frame both ends exchange.

All integers are big-endian. Layouts (byte offsets)::

    greeting (server)      0 u64 NBDMAGIC  8 u64 IHAVEOPT  16 u16 handshake flags   = 18
    client flags           0 u32 flags                                               = 4
    option (client)        0 u64 IHAVEOPT  8 u32 option  12 u32 length  16 data      = 16 + len
    option reply (server)  0 u64 NBD_REP_MAGIC  8 u32 option  12 u32 type  16 u32 length
                           20 data                                                   = 20 + len
    EXPORT_NAME reply      0 u64 size  8 u16 transmission flags  10 124 zero bytes
                           (left out when both sides set NO_ZEROES)                  = 10 or 134
    request                0 u32 NBD_REQUEST_MAGIC  4 u16 flags  6 u16 type  8 u64 cookie
                           16 u64 offset  24 u32 length  (28: WRITE's payload)      = 28
    simple reply           0 u32 NBD_SIMPLE_REPLY_MAGIC  4 u32 error  8 u64 cookie
                           (16: READ's data)                                         = 16
    structured chunk       0 u32 NBD_STRUCTURED_REPLY_MAGIC  4 u16 flags  6 u16 type
                           8 u64 cookie  16 u32 length  (20: payload)                = 20
      OFFSET_DATA payload  0 u64 offset  8 data
      OFFSET_HOLE payload  0 u64 offset  8 u32 length
      BLOCK_STATUS payload 0 u32 context id  4 {u32 length, u32 flags} * n
      ERROR payload        0 u32 error  4 u16 message length  6 message (UTF-8)
    NBD_REP_INFO payloads  0 u16 info type, then
      NBD_INFO_EXPORT      2 u64 size  10 u16 transmission flags
      NBD_INFO_NAME        2 name;  NBD_INFO_DESCRIPTION  2 description
      NBD_INFO_BLOCK_SIZE  2 u32 minimum  6 u32 preferred  10 u32 maximum
    NBD_REP_SERVER         0 u32 name length  4 name  (description)
    NBD_REP_META_CONTEXT   0 u32 context id  4 name
    INFO/GO option data    0 u32 name length  4 name  u16 n  u16 * n info requests
    LIST/SET_META_CONTEXT  0 u32 export name length  4 name  u32 n  {u32 length, query} * n
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dirtybits.proto.nbd.constants import (
    IHAVEOPT,
    NBD_REP_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    Info,
    ReplyType,
)

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
CHUNK_DATA = struct.Struct(">IHHQIQ")  # a chunk header and OFFSET_DATA's offset: 28 bytes
OFFSET_HOLE = struct.Struct(">IHHQIQI")  # a whole OFFSET_HOLE chunk
ERROR_HEAD = struct.Struct(">IH")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
EXTENT = struct.Struct(">II")

NO_ZEROES_PAD = bytes(124)


def greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def option(opt: int, data: bytes = b"") -> bytes:
    """A client's option request."""
    return OPTION.pack(IHAVEOPT, opt, len(data)) + data


def info_request(name: str, *infos: int) -> bytes:
    """NBD_OPT_INFO/GO's data: the export's name and the NBD_INFO_* items asked for."""
    raw = name.encode()
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i)
                                                                      for i in infos)


def meta_request(name: str, queries: Sequence[str]) -> bytes:
    """NBD_OPT_LIST/SET_META_CONTEXT's data: the export's name and the queries."""
    raw = name.encode()
    out = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for q in queries:
        qb = q.encode()
        out += [U32.pack(len(qb)), qb]
    return b"".join(out)


def option_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(NBD_REP_MAGIC, opt, rep, len(data)) + data


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else NO_ZEROES_PAD)


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.NBD_INFO_EXPORT, size, flags)


def info_text(kind: Info, text: str) -> bytes:
    return U16.pack(kind) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum)


def rep_server(name: str, description: str) -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + description.encode()


def rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


@dataclass(frozen=True, slots=True)
class Request:
    """One transmission-phase request header."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> tuple[int, Request]:
        """(magic, request) from the 28 header bytes; the caller checks the magic."""
        magic, flags, typ, cookie, offset, length = REQUEST.unpack_from(data)
        return magic, cls(flags, typ, cookie, offset, length)

    def pack(self) -> bytes:
        return REQUEST.pack(NBD_REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset,
                            self.length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, flags: int, typ: int, payload: bytes = b"") -> bytes:
    return CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, typ, cookie, len(payload)) + payload


def pack_data_chunk_header(buf: bytearray | memoryview, cookie: int, flags: int, offset: int,
                           length: int) -> None:
    """Write an OFFSET_DATA chunk's 28 header bytes at the start of ``buf`` (the data
    follows there: the reply is one buffer, no copy)."""
    CHUNK_DATA.pack_into(buf, 0, NBD_STRUCTURED_REPLY_MAGIC, flags,
                         ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)


def pack_simple_reply_header(buf: bytearray | memoryview, cookie: int) -> None:
    SIMPLE_REPLY.pack_into(buf, 0, NBD_SIMPLE_REPLY_MAGIC, 0, cookie)


def hole_chunk(cookie: int, flags: int, offset: int, length: int) -> bytes:
    return OFFSET_HOLE.pack(NBD_STRUCTURED_REPLY_MAGIC, flags,
                            ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12, offset, length)


def error_chunk(cookie: int, flags: int, error: int, message: str) -> bytes:
    msg = message.encode()[:4096]
    return chunk(cookie, flags, ReplyType.NBD_REPLY_TYPE_ERROR,
                 ERROR_HEAD.pack(error, len(msg)) + msg)


def block_status_chunk(cookie: int, flags: int, context_id: int, extents: bytes) -> bytes:
    """A BLOCK_STATUS chunk: ``extents`` packed (``{u32 length, u32 flags}`` each,
    ``proto.nbd.status.pack``)."""
    return chunk(cookie, flags, ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS,
                 U32.pack(context_id) + extents)


__all__ = [
    "CHUNK", "CHUNK_DATA", "CLIENT_FLAGS", "GREETING", "OPTION", "OPTION_REPLY", "REQUEST",
    "SIMPLE_REPLY", "Request", "block_status_chunk", "chunk", "error_chunk",
    "export_name_reply", "greeting", "hole_chunk", "info_block_size", "info_export",
    "info_request", "info_text", "meta_request", "option", "option_reply", "pack_data_chunk_header",
    "pack_simple_reply_header", "rep_meta_context", "rep_server", "simple_reply",
]
