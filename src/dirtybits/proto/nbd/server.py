"""The server end of NBD, with no I/O: bytes in, events and bytes out.

    conn = ServerConnection(catalog, tls=TlsMode.OFF)
    transport.write(conn.data_to_send())          # the greeting
    conn.receive_data(bytes_from_peer)
    while (event := conn.next_event()) is not None:
        ...                                       # Request, StartTls, Ready, Close
        transport.write(conn.data_to_send())

Negotiation (fixed newstyle) runs entirely here: options are answered from the ``Catalog``
(what each export offers, plain data: no I/O), with QEMU's texts. The option phase is a state
table: ``_HANDLERS`` maps each option to its handler, gated by the phase and the TLS mode
(before TLS, with TLS required, only STARTTLS and ABORT). In transmission the core parses and
validates requests as QEMU's ``nbd_co_receive_request`` does (magic, length limit, read-only,
bounds, flags) and hands the service either a valid ``Request`` or a ``BadRequest`` to
answer with an error (``reply_error``). The service runs requests and builds replies with the
helpers here (``reply_ok``, ``reply_error``, ``read_header``...), which pick simple or
structured replies as negotiated.

Two kinds of failure are kept apart: a peer that breaks the protocol (bad magic, unknown
client flags, a truncated frame at close, a write payload over the limit) gets a ``Close``
event: drop the connection. A request that fails gets an error reply and the connection goes
on.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dirtybits.proto.nbd import wire
from dirtybits.proto.nbd.constants import (
    CONTEXT_ALLOCATION_DEPTH,
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_DIRTY_BITMAP,
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_OPTION_SIZE,
    NBD_MAX_STRING_SIZE,
    NBD_REPLY_FLAG_DONE,
    NBD_REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Option,
    Rep,
    TransmissionFlag,
)

log = logging.getLogger(__name__)

TF = TransmissionFlag


class Phase(enum.Enum):
    GREETING = "greeting"  # sent ours; waiting for the client's flags
    OPTIONS = "options"  # option haggling
    TLS = "tls"  # STARTTLS acknowledged: the I/O layer runs the TLS handshake
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class TlsMode(enum.Enum):
    OFF = "off"  # no credentials: STARTTLS is refused
    ALLOWED = "allowed"  # STARTTLS is offered, plaintext works too
    REQUIRED = "required"  # nothing but STARTTLS and ABORT before TLS (qemu-nbd --tls-creds)


@dataclass(frozen=True)
class ExportView:
    """What negotiation needs to know of an export. ``contexts``: the meta contexts it
    offers, in id order (QEMU's: ``base:allocation`` 0, ``qemu:allocation-depth`` 1 when
    offered, then each bitmap); ``flags`` without ``NBD_FLAG_SEND_DF`` (added when structured
    replies are negotiated)."""

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = NBD_MAX_BUFFER_SIZE
    allocation_depth: bool = False
    bitmaps: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        return bool(self.flags & TF.NBD_FLAG_READ_ONLY)

    def contexts(self) -> list[tuple[int, str]]:
        out = [(0, CONTEXT_BASE_ALLOCATION)]
        if self.allocation_depth:
            out.append((1, CONTEXT_ALLOCATION_DEPTH))
        out += [(2 + i, CONTEXT_DIRTY_BITMAP + b) for i, b in enumerate(self.bitmaps)]
        return out


class Catalog(Protocol):
    """The exports a server offers now (looked up at each option: exports come and go)."""

    def lookup(self, name: str) -> ExportView | None: ...

    def listing(self) -> Sequence[ExportView]: ...


# ------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class StartTls:
    """STARTTLS was acknowledged: send what is queued, then run the TLS handshake as the
    server and call ``tls_established``."""


@dataclass(frozen=True)
class Ready:
    """Negotiation is over: transmission on ``export`` begins."""

    export: ExportView
    structured: bool
    contexts: tuple[tuple[int, str], ...]  # (id, name) selected by SET_META_CONTEXT


@dataclass(frozen=True)
class RequestEvent:
    """A valid request. ``payload``: WRITE's data (a view owned by the event)."""

    cmd: Cmd
    flags: CmdFlag
    cookie: int
    offset: int
    length: int
    payload: memoryview | None = None


@dataclass(frozen=True)
class BadRequest:
    """A request to answer with an error reply (QEMU's text); ``fatal``: close after it."""

    cookie: int
    error: Errno
    message: str
    fatal: bool = False


@dataclass(frozen=True)
class Close:
    """End the connection: the client left (``error`` False) or broke the protocol."""

    reason: str
    error: bool = True


Event = StartTls | Ready | RequestEvent | BadRequest | Close


class NbdProtocolError(Exception):
    """Raised inside the core only; becomes a ``Close`` event."""


_CMD_NAMES: dict[int, str] = {
    Cmd.NBD_CMD_READ: "read", Cmd.NBD_CMD_WRITE: "write", Cmd.NBD_CMD_DISC: "disconnect",
    Cmd.NBD_CMD_FLUSH: "flush", Cmd.NBD_CMD_TRIM: "trim", Cmd.NBD_CMD_CACHE: "cache",
    Cmd.NBD_CMD_WRITE_ZEROES: "write zeroes", Cmd.NBD_CMD_BLOCK_STATUS: "block status",
}

_OPT_NAMES: dict[int, str] = {
    Option.NBD_OPT_EXPORT_NAME: "export name", Option.NBD_OPT_ABORT: "abort",
    Option.NBD_OPT_LIST: "list", Option.NBD_OPT_PEEK_EXPORT: "peek export",
    Option.NBD_OPT_STARTTLS: "starttls", Option.NBD_OPT_INFO: "info", Option.NBD_OPT_GO: "go",
    Option.NBD_OPT_STRUCTURED_REPLY: "structured reply",
    Option.NBD_OPT_LIST_META_CONTEXT: "list meta context",
    Option.NBD_OPT_SET_META_CONTEXT: "set meta context",
    Option.NBD_OPT_EXTENDED_HEADERS: "extended headers",
}


def opt_name(opt: int) -> str:
    return _OPT_NAMES.get(opt, "<unknown>")


def cmd_name(cmd: int) -> str:
    return _CMD_NAMES.get(cmd, "<unknown>")


class _OptionError(Exception):
    """An option answered with an error reply (the connection goes on)."""

    def __init__(self, rep: Rep, message: str) -> None:
        super().__init__(message)
        self.rep = rep
        self.message = message


class _Reader:
    """Bounds-checked reads from one option's payload."""

    def __init__(self, data: bytes, opt: int) -> None:
        self.data = data
        self.pos = 0
        self.opt = opt

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _OptionError(Rep.NBD_REP_ERR_INVALID,
                               f"option '{opt_name(self.opt)}' has invalid length")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(wire.U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(wire.U32.unpack(self._take(4))[0])

    def string(self, n: int) -> bytes:
        return self._take(n)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise _OptionError(Rep.NBD_REP_ERR_INVALID,
                               f"option '{opt_name(self.opt)}' has invalid length")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


@dataclass
class _Meta:
    export: str | None = None  # the export SET_META_CONTEXT named
    contexts: list[tuple[int, str]] = field(default_factory=list)


class ServerConnection:
    """One client's protocol state (see the module's docstring)."""

    def __init__(self, catalog: Catalog, *, tls: TlsMode = TlsMode.OFF,
                 max_request: int = NBD_MAX_BUFFER_SIZE) -> None:
        self.catalog = catalog
        self.tls_mode = tls
        self.max_request = max_request
        self.phase = Phase.GREETING
        self.tls_active = False
        self.fixed = False
        self.no_zeroes = False
        self.structured = False
        self.export: ExportView | None = None
        self.contexts: tuple[tuple[int, str], ...] = ()
        self._meta = _Meta()
        self._in = bytearray()
        self._payload: bytearray | None = None  # a WRITE's payload being received
        self._payload_got = 0
        self._payload_req: wire.Request | None = None
        self._out: list[bytes] = [wire.greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)]
        self._events: list[Event] = []
        self._drain = 0  # bytes of an oversized option still to discard
        self._drain_opt = 0

    # ---------------------------------------------------------------- the I/O side
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer (``b""``: the peer closed its side)."""
        if self.phase is Phase.CLOSED:
            return
        if not data:
            self._eof()
            return
        if self._payload is not None:
            view = memoryview(data).cast("B")
            n = min(len(view), len(self._payload) - self._payload_got)
            self._payload[self._payload_got:self._payload_got + n] = view[:n]
            self.received_into(n)
            data = view[n:]
            if not data or self.closed:
                return
        self._in += data
        self._parse()

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def receive_into(self) -> memoryview | None:
        """Where the next bytes may be received directly (the rest of a WRITE's payload: no
        copy through the parser's buffer), or None: then use ``receive_data``."""
        if self._payload is None:
            return None
        return memoryview(self._payload)[self._payload_got:]

    def received_into(self, n: int) -> None:
        """``n`` bytes were received into ``receive_into``'s buffer."""
        assert self._payload is not None and self._payload_req is not None
        self._payload_got += n
        if self._payload_got < len(self._payload):
            return
        payload, req = memoryview(self._payload), self._payload_req
        self._payload = self._payload_req = None
        self._payload_got = 0
        self._events.append(self._validate(req, payload))
        if self.phase is Phase.TRANSMISSION and self._in:
            self._parse()

    def next_event(self) -> Event | None:
        if self._events:
            return self._events.pop(0)
        return None

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The TLS handshake succeeded: negotiation goes on inside it."""
        assert self.phase is Phase.TLS
        self.tls_active = True
        self.phase = Phase.OPTIONS
        self._parse()

    def close(self, reason: str, *, error: bool = True) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._events.append(Close(reason, error))
            self._in.clear()
            self._payload = self._payload_req = None

    def _eof(self) -> None:
        if self._payload is not None:
            self.close(f"the client disconnected in the middle of a frame "
                       f"({wire.REQUEST.size + self._payload_got} bytes pending)")
        elif self.phase is Phase.TRANSMISSION and not self._in:
            self.close("the client disconnected", error=False)
        elif self._in:
            self.close(f"the client disconnected in the middle of a frame ({len(self._in)} "
                       "bytes pending)")
        else:
            self.close(f"the client disconnected during negotiation ({self.phase.value})")

    def _parse(self) -> None:
        try:
            while self.phase is not Phase.CLOSED:
                if self.phase is Phase.GREETING:
                    if not self._greeting():
                        return
                elif self.phase is Phase.OPTIONS:
                    if not self._option():
                        return
                elif self.phase is Phase.TRANSMISSION:
                    if not self._request():
                        return
                else:  # TLS: the handshake's bytes are not ours
                    return
        except NbdProtocolError as exc:
            self.close(str(exc))

    # ---------------------------------------------------------------- negotiation
    def _greeting(self) -> bool:
        if len(self._in) < 4:
            return False
        (flags,) = wire.CLIENT_FLAGS.unpack_from(self._in)
        del self._in[:4]
        unknown = flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        if unknown:
            raise NbdProtocolError(f"Unknown client flags 0x{unknown:x} received")
        self.fixed = bool(flags & NBD_FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return True

    def _option(self) -> bool:
        if self._drain:
            n = min(self._drain, len(self._in))
            del self._in[:n]
            self._drain -= n
            if self._drain:
                return False
            self._reply(self._drain_opt, Rep.NBD_REP_ERR_TOO_BIG,
                        f"option '{opt_name(self._drain_opt)}' is too large")
            return True
        if len(self._in) < wire.OPTION.size:
            return False
        magic, opt, length = wire.OPTION.unpack_from(self._in)
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"Bad magic received: 0x{magic:x}")
        if length > NBD_MAX_BUFFER_SIZE:
            raise NbdProtocolError(
                f"len ({length}) is larger than max len ({NBD_MAX_BUFFER_SIZE})")
        if length > NBD_MAX_OPTION_SIZE:
            # EXPORT_NAME has no option reply, nor has any option of a client that is not
            # fixed newstyle: QEMU drops those (their handlers' texts); the rest is drained
            if opt == Option.NBD_OPT_EXPORT_NAME:
                raise NbdProtocolError("Bad length received")
            if not self.fixed:
                raise NbdProtocolError(f"Unsupported option {opt} (not fixed newstyle)")
            del self._in[:wire.OPTION.size]
            self._drain, self._drain_opt = length, opt
            return True
        if len(self._in) < wire.OPTION.size + length:
            return False
        data = bytes(self._in[wire.OPTION.size:wire.OPTION.size + length])
        del self._in[:wire.OPTION.size + length]
        log.debug("option %s (%d), %d bytes", opt_name(opt), opt, length)
        if not self.fixed and opt != Option.NBD_OPT_EXPORT_NAME:
            raise NbdProtocolError(f"Unsupported option {opt} (not fixed newstyle)")
        if (self.tls_mode is TlsMode.REQUIRED and not self.tls_active
                and opt not in (Option.NBD_OPT_STARTTLS, Option.NBD_OPT_ABORT)):
            if opt == Option.NBD_OPT_EXPORT_NAME:
                raise NbdProtocolError(f"Option 0x{opt:x} not permitted before TLS")
            self._reply(opt, Rep.NBD_REP_ERR_TLS_REQD,
                        f"Option 0x{opt:x} not permitted before TLS")
            return True
        handler = _HANDLERS.get(opt)
        if handler is None:
            self._reply(opt, Rep.NBD_REP_ERR_UNSUP, f"Unsupported option {opt} "
                        f"({opt_name(opt)})")
            return True
        try:
            handler(self, opt, data)
        except _OptionError as exc:
            self._reply(opt, exc.rep, exc.message)
        return self.phase is Phase.OPTIONS or self.phase is Phase.TRANSMISSION

    def _reply(self, opt: int, rep: Rep, data: bytes | str = b"") -> None:
        if isinstance(data, str):
            data = data.encode()
        self._out.append(wire.option_reply(opt, rep, data))

    def _no_data(self, opt: int, data: bytes) -> None:
        if data:
            raise _OptionError(Rep.NBD_REP_ERR_INVALID,
                               f"option '{opt_name(opt)}' has unexpected length")

    def _opt_export_name(self, opt: int, data: bytes) -> None:
        if len(data) > NBD_MAX_STRING_SIZE:
            raise NbdProtocolError("Bad length received")
        name = _text(data)
        exp = self.catalog.lookup(name)
        if exp is None:
            raise NbdProtocolError(f"export '{name}' not present")
        self._out.append(wire.export_name_reply(exp.size, int(self._flags(exp)),
                                                self.no_zeroes))
        self._enter(exp)

    def _opt_abort(self, opt: int, data: bytes) -> None:
        self._reply(opt, Rep.NBD_REP_ACK)
        self.close("the client aborted negotiation", error=False)

    def _opt_list(self, opt: int, data: bytes) -> None:
        self._no_data(opt, data)
        for exp in self.catalog.listing():
            self._reply(opt, Rep.NBD_REP_SERVER, wire.rep_server(exp.name, exp.description))
        self._reply(opt, Rep.NBD_REP_ACK)

    def _opt_starttls(self, opt: int, data: bytes) -> None:
        self._no_data(opt, data)
        if self.tls_active:
            raise _OptionError(Rep.NBD_REP_ERR_INVALID, "TLS already enabled")
        if self.tls_mode is TlsMode.OFF:
            raise _OptionError(Rep.NBD_REP_ERR_POLICY, "TLS not configured")
        self._reply(opt, Rep.NBD_REP_ACK)
        self.phase = Phase.TLS
        self._events.append(StartTls())

    def _opt_structured_reply(self, opt: int, data: bytes) -> None:
        self._no_data(opt, data)
        if self.structured:
            raise _OptionError(Rep.NBD_REP_ERR_INVALID, "structured reply already negotiated")
        self.structured = True
        self._reply(opt, Rep.NBD_REP_ACK)

    def _opt_info(self, opt: int, data: bytes) -> None:
        r = _Reader(data, opt)
        namelen = r.u32()
        if namelen > NBD_MAX_STRING_SIZE:
            raise _OptionError(Rep.NBD_REP_ERR_INVALID, f"name too long for qemu: {namelen}")
        name = _text(r.string(namelen))
        requests = [r.u16() for _ in range(r.u16())]
        r.done()
        exp = self.catalog.lookup(name)
        if exp is None:
            raise _OptionError(Rep.NBD_REP_ERR_UNKNOWN, f"export '{name}' not present")
        if Info.NBD_INFO_NAME in requests:
            self._reply(opt, Rep.NBD_REP_INFO, wire.info_text(Info.NBD_INFO_NAME, exp.name))
        if Info.NBD_INFO_DESCRIPTION in requests and exp.description:
            self._reply(opt, Rep.NBD_REP_INFO,
                        wire.info_text(Info.NBD_INFO_DESCRIPTION, exp.description))
        # QEMU: minimum 1 for a client that did not ask (and will not obey) on GO
        asked = Info.NBD_INFO_BLOCK_SIZE in requests
        minimum = exp.min_block if (opt == Option.NBD_OPT_INFO or asked) else 1
        self._reply(opt, Rep.NBD_REP_INFO,
                    wire.info_block_size(minimum, max(exp.preferred_block, minimum),
                                         exp.max_block))
        self._reply(opt, Rep.NBD_REP_INFO, wire.info_export(exp.size, int(self._flags(exp))))
        if opt == Option.NBD_OPT_GO and exp.min_block > 1 and not asked:
            raise _OptionError(Rep.NBD_REP_ERR_BLOCK_SIZE_REQD,
                               "request NBD_INFO_BLOCK_SIZE to use this export")
        self._reply(opt, Rep.NBD_REP_ACK)
        if opt == Option.NBD_OPT_GO:
            self._enter(exp)

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        listing = opt == Option.NBD_OPT_LIST_META_CONTEXT
        if not self.structured:
            raise _OptionError(Rep.NBD_REP_ERR_INVALID, f"request option '{opt_name(opt)}' "
                               "when structured reply is not negotiated")
        r = _Reader(data, opt)
        namelen = r.u32()
        if namelen > NBD_MAX_STRING_SIZE:
            raise _OptionError(Rep.NBD_REP_ERR_INVALID, f"name too long for qemu: {namelen}")
        name = _text(r.string(namelen))
        count = r.u32()
        queries: list[str] = []
        for _ in range(count):
            qlen = r.u32()
            raw = r.string(qlen)
            if qlen <= NBD_MAX_STRING_SIZE:
                queries.append(_text(raw))
        r.done()
        exp = self.catalog.lookup(name)
        if exp is None:
            raise _OptionError(Rep.NBD_REP_ERR_UNKNOWN, f"export '{name}' not present")
        offered = exp.contexts()
        if listing and count == 0:
            chosen = offered
        else:
            wanted: set[str] = set()
            for q in queries:
                wanted |= _match(q, offered, listing)
            chosen = [c for c in offered if c[1] in wanted]
        for cid, cname in chosen:
            self._reply(opt, Rep.NBD_REP_META_CONTEXT,
                        wire.rep_meta_context(0 if listing else cid, cname))
        if not listing:
            self._meta = _Meta(exp.name, chosen)
        self._reply(opt, Rep.NBD_REP_ACK)

    def _flags(self, exp: ExportView) -> TransmissionFlag:
        flags = exp.flags
        if self.structured:
            flags |= TF.NBD_FLAG_SEND_DF
        return flags

    def _enter(self, exp: ExportView) -> None:
        self.export = exp
        if self.structured and self._meta.export == exp.name:
            self.contexts = tuple(self._meta.contexts)
        self.phase = Phase.TRANSMISSION
        self._events.append(Ready(exp, self.structured, self.contexts))
        log.debug("transmission on export '%s' (structured=%s, contexts=%s)", exp.name,
                  self.structured, [c[1] for c in self.contexts])

    # ---------------------------------------------------------------- transmission
    def _request(self) -> bool:
        if len(self._in) < wire.REQUEST.size:
            return False
        magic, req = wire.Request.unpack(self._in)
        if magic != NBD_REQUEST_MAGIC:
            raise NbdProtocolError(f"invalid magic (got 0x{magic:x})")
        cmd, length = req.type, req.length
        payload: memoryview | None = None
        if cmd == Cmd.NBD_CMD_WRITE:
            if length > self.max_request:
                del self._in[:wire.REQUEST.size]
                self._events.append(BadRequest(
                    req.cookie, Errno.NBD_EINVAL,
                    f"len ({length}) is larger than max len ({self.max_request})", fatal=True))
                self.phase = Phase.CLOSED
                return False
            # the payload gets a buffer of its own: what arrived is moved there, the rest
            # is received into it (``receive_into``), never through ``_in``
            buf = bytearray(length)
            have = min(length, len(self._in) - wire.REQUEST.size)
            with memoryview(self._in) as view:
                buf[:have] = view[wire.REQUEST.size:wire.REQUEST.size + have]
            del self._in[:wire.REQUEST.size + have]
            if have < length:
                self._payload, self._payload_got, self._payload_req = buf, have, req
                return False
            payload = memoryview(buf)
        else:
            del self._in[:wire.REQUEST.size]
        self._events.append(self._validate(req, payload))
        return self.phase is Phase.TRANSMISSION

    def _validate(self, req: wire.Request, payload: memoryview | None) -> Event:
        exp = self.export
        assert exp is not None
        cmd = req.type
        if cmd == Cmd.NBD_CMD_DISC:
            self.phase = Phase.CLOSED
            return Close("the client sent NBD_CMD_DISC", error=False)

        def bad(error: Errno, message: str) -> BadRequest:
            return BadRequest(req.cookie, error, message)

        if cmd in (Cmd.NBD_CMD_READ, Cmd.NBD_CMD_CACHE) and req.length > self.max_request:
            return bad(Errno.NBD_EINVAL,
                       f"len ({req.length}) is larger than max len ({self.max_request})")
        if exp.readonly and cmd in (Cmd.NBD_CMD_WRITE, Cmd.NBD_CMD_WRITE_ZEROES,
                                    Cmd.NBD_CMD_TRIM):
            return bad(Errno.NBD_EPERM, "Export is read-only")
        if req.offset > exp.size or req.length > exp.size - req.offset:
            return bad(Errno.NBD_ENOSPC if cmd in (Cmd.NBD_CMD_WRITE, Cmd.NBD_CMD_WRITE_ZEROES)
                       else Errno.NBD_EINVAL,
                       f"operation past EOF; From: {req.offset}, Len: {req.length}, "
                       f"Size: {exp.size}")
        valid = CmdFlag.NBD_CMD_FLAG_FUA
        if cmd == Cmd.NBD_CMD_READ and self.structured:
            valid |= CmdFlag.NBD_CMD_FLAG_DF
        elif cmd == Cmd.NBD_CMD_WRITE_ZEROES:
            valid |= CmdFlag.NBD_CMD_FLAG_NO_HOLE | CmdFlag.NBD_CMD_FLAG_FAST_ZERO
        elif cmd == Cmd.NBD_CMD_BLOCK_STATUS:
            valid |= CmdFlag.NBD_CMD_FLAG_REQ_ONE
        if req.flags & ~int(valid):  # every bit: ~ of an IntFlag keeps only known flags
            return bad(Errno.NBD_EINVAL, f"unsupported flags for command {cmd_name(cmd)} "
                       f"(got 0x{req.flags:x})")
        try:
            command = Cmd(cmd)
        except ValueError:
            return bad(Errno.NBD_EINVAL, f"invalid request type ({cmd}) received")
        if command == Cmd.NBD_CMD_RESIZE:
            return bad(Errno.NBD_EINVAL, f"invalid request type ({cmd}) received")
        if command == Cmd.NBD_CMD_BLOCK_STATUS:
            if not req.length:
                return bad(Errno.NBD_EINVAL, "need non-zero length")
            if not self.contexts:
                return bad(Errno.NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated")
        return RequestEvent(command, CmdFlag(req.flags), req.cookie, req.offset, req.length,
                            payload)

    # ---------------------------------------------------------------- replies
    def reply_ok(self, cookie: int) -> bytes:
        """Success of a request without data."""
        if self.structured:
            return wire.chunk(cookie, NBD_REPLY_FLAG_DONE, 0)
        return wire.simple_reply(cookie)

    def reply_error(self, cookie: int, error: Errno, message: str) -> bytes:
        if self.structured:
            return wire.error_chunk(cookie, NBD_REPLY_FLAG_DONE, error, message)
        return wire.simple_reply(cookie, error)

    def read_header_size(self) -> int:
        """Bytes of a READ reply's header before its data (one chunk or a simple reply)."""
        return wire.CHUNK_DATA.size if self.structured else wire.SIMPLE_REPLY.size

    def pack_read_header(self, buf: bytearray | memoryview, cookie: int, offset: int,
                         length: int, *, final: bool = True) -> None:
        """Fill ``buf[:read_header_size()]`` with the header of ``length`` data bytes read at
        ``offset``."""
        if self.structured:
            wire.pack_data_chunk_header(buf, cookie, NBD_REPLY_FLAG_DONE if final else 0,
                                        offset, length)
        else:
            wire.pack_simple_reply_header(buf, cookie)

    def hole(self, cookie: int, offset: int, length: int, *, final: bool) -> bytes:
        return wire.hole_chunk(cookie, NBD_REPLY_FLAG_DONE if final else 0, offset, length)

    def block_status(self, cookie: int, context_id: int, extents: bytes, *,
                     final: bool) -> bytes:
        """A BLOCK_STATUS chunk; ``extents`` packed (``proto.nbd.status.pack``)."""
        return wire.block_status_chunk(cookie, NBD_REPLY_FLAG_DONE if final else 0,
                                       context_id, extents)


def _match(query: str, offered: list[tuple[int, str]], listing: bool) -> set[str]:
    """The offered context names a query selects (QEMU's ``nbd_meta_*_query``): exact names;
    while listing, ``base:``, ``qemu:`` and ``qemu:dirty-bitmap:`` select their namespace."""
    names = {name for _, name in offered}
    if query in names:
        return {query}
    if not listing:
        return set()
    if query == "base:":
        return names & {CONTEXT_BASE_ALLOCATION}
    if query == "qemu:":
        return {n for n in names if n.startswith("qemu:")}
    if query == CONTEXT_DIRTY_BITMAP:
        return {n for n in names if n.startswith(CONTEXT_DIRTY_BITMAP)}
    return set()


_HANDLERS = {
    Option.NBD_OPT_EXPORT_NAME: ServerConnection._opt_export_name,
    Option.NBD_OPT_ABORT: ServerConnection._opt_abort,
    Option.NBD_OPT_LIST: ServerConnection._opt_list,
    Option.NBD_OPT_STARTTLS: ServerConnection._opt_starttls,
    Option.NBD_OPT_INFO: ServerConnection._opt_info,
    Option.NBD_OPT_GO: ServerConnection._opt_info,
    Option.NBD_OPT_STRUCTURED_REPLY: ServerConnection._opt_structured_reply,
    Option.NBD_OPT_LIST_META_CONTEXT: ServerConnection._opt_meta_context,
    Option.NBD_OPT_SET_META_CONTEXT: ServerConnection._opt_meta_context,
}


__all__ = [
    "BadRequest", "Catalog", "Close", "Event", "ExportView", "Phase", "Ready",
    "RequestEvent", "ServerConnection", "StartTls", "TlsMode", "cmd_name", "opt_name",
]
