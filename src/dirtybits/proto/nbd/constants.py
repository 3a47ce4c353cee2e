"""NBD protocol constants, with the names of the protocol's ``doc/proto.md``.

Everything on the wire is big-endian. Only what dirtybits speaks is here: fixed newstyle
negotiation, structured replies, meta contexts (no extended headers, no resize).
"""

from __future__ import annotations

import enum

# -- magics (u64 / u32) -------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC": the server's first 8 bytes
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting, and each option's header
NBD_REP_MAGIC = 0x0003E889045565A9  # each option reply
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (u16, server) and client flags (u32) ----------------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export flags (u16) sent with the export's size."""

    NBD_FLAG_HAS_FLAGS = 1 << 0
    NBD_FLAG_READ_ONLY = 1 << 1
    NBD_FLAG_SEND_FLUSH = 1 << 2
    NBD_FLAG_SEND_FUA = 1 << 3
    NBD_FLAG_ROTATIONAL = 1 << 4
    NBD_FLAG_SEND_TRIM = 1 << 5
    NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
    NBD_FLAG_SEND_DF = 1 << 7
    NBD_FLAG_CAN_MULTI_CONN = 1 << 8
    NBD_FLAG_SEND_RESIZE = 1 << 9
    NBD_FLAG_SEND_CACHE = 1 << 10
    NBD_FLAG_SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    """Option haggling requests (``NBD_OPT_*``)."""

    NBD_OPT_EXPORT_NAME = 1
    NBD_OPT_ABORT = 2
    NBD_OPT_LIST = 3
    NBD_OPT_PEEK_EXPORT = 4  # withdrawn
    NBD_OPT_STARTTLS = 5
    NBD_OPT_INFO = 6
    NBD_OPT_GO = 7
    NBD_OPT_STRUCTURED_REPLY = 8
    NBD_OPT_LIST_META_CONTEXT = 9
    NBD_OPT_SET_META_CONTEXT = 10
    NBD_OPT_EXTENDED_HEADERS = 11


NBD_REP_FLAG_ERROR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types (``NBD_REP_*``); errors have bit 31 set."""

    NBD_REP_ACK = 1
    NBD_REP_SERVER = 2
    NBD_REP_INFO = 3
    NBD_REP_META_CONTEXT = 4
    NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
    NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
    NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
    NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
    NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
    NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
    NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
    NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
    NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9


class Info(enum.IntEnum):
    """``NBD_REP_INFO`` item types (u16), also what ``NBD_OPT_INFO``/``GO`` may request."""

    NBD_INFO_EXPORT = 0
    NBD_INFO_NAME = 1
    NBD_INFO_DESCRIPTION = 2
    NBD_INFO_BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """Transmission-phase request types (``NBD_CMD_*``)."""

    NBD_CMD_READ = 0
    NBD_CMD_WRITE = 1
    NBD_CMD_DISC = 2
    NBD_CMD_FLUSH = 3
    NBD_CMD_TRIM = 4
    NBD_CMD_CACHE = 5
    NBD_CMD_WRITE_ZEROES = 6
    NBD_CMD_BLOCK_STATUS = 7
    NBD_CMD_RESIZE = 8


class CmdFlag(enum.IntFlag):
    """Request flags (u16, ``NBD_CMD_FLAG_*``)."""

    NBD_CMD_FLAG_FUA = 1 << 0
    NBD_CMD_FLAG_NO_HOLE = 1 << 1
    NBD_CMD_FLAG_DF = 1 << 2
    NBD_CMD_FLAG_REQ_ONE = 1 << 3
    NBD_CMD_FLAG_FAST_ZERO = 1 << 4


NBD_REPLY_FLAG_DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types (u16, ``NBD_REPLY_TYPE_*``)."""

    NBD_REPLY_TYPE_NONE = 0
    NBD_REPLY_TYPE_OFFSET_DATA = 1
    NBD_REPLY_TYPE_OFFSET_HOLE = 2
    NBD_REPLY_TYPE_BLOCK_STATUS = 5
    NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
    NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2


class Errno(enum.IntEnum):
    """Error values of replies (the protocol's own numbers, not the host's errno)."""

    NBD_SUCCESS = 0
    NBD_EPERM = 1
    NBD_EIO = 5
    NBD_ENOMEM = 12
    NBD_EINVAL = 22
    NBD_ENOSPC = 28
    NBD_EOVERFLOW = 75
    NBD_ENOTSUP = 95
    NBD_ESHUTDOWN = 108


# -- meta context flags -------------------------------------------------------------------
NBD_STATE_HOLE = 1 << 0  # base:allocation
NBD_STATE_ZERO = 1 << 1  # base:allocation
NBD_STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_DIRTY_BITMAP = "qemu:dirty-bitmap:"  # + the bitmap's name

# -- limits -------------------------------------------------------------------------------
NBD_MAX_BUFFER_SIZE = 32 << 20  # QEMU's largest READ/WRITE payload
NBD_MAX_STRING_SIZE = 4096  # export names, descriptions, context names
NBD_MAX_OPTION_SIZE = 64 << 10  # the largest option payload a server need accept
NBD_MAX_BLOCK_STATUS_EXTENTS = (1 << 20) // 8  # QEMU: 1 MiB of extents per reply
INT32_MAX = (1 << 31) - 1

__all__ = [name for name in dir() if name.isupper() or name[0].isupper()]
