"""A blocking NBD client that speaks the wire byte by byte, for tests that poke an NBD server
(``dirtybits nbd``, ``qemu-nbd``) with good and bad frames; and ``dirtybits nbd`` started
as a user runs it.

Written from the protocol's ``doc/proto.md``, not from ``dirtybits.proto.nbd`` (so a
misreading of the spec there is not repeated here). Every socket operation has a timeout: a
server that neither answers nor closes raises ``TimeoutError`` (a hang is a test failure,
never a hung test). A server that closes raises ``Closed``.

    with serve_nbd(image, "-B", "b0", "--discard", "unmap") as srv:
        c = Client(srv.sock)
        c.go(structured=True, contexts=["qemu:dirty-bitmap:b0"])
        c.send(c.request(WRITE, 1, 0, 4096, payload=b"x" * 4096))
        assert c.reply().error == 0
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import DIRTYBITS, Arg, argv, listening, socket_dir, stop

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1, 2

# options
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK_EXPORT, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT = 6, 7, 8, 9
OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERROR_BIT = 1 << 31
REP_ERR_TOO_BIG = REP_ERROR_BIT | 9
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

# transmission flags
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_DF = 32, 64, 128

# commands and their flags
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, RESIZE = range(9)
CMD_NAMES = {READ: "READ", WRITE: "WRITE", DISC: "DISC", FLUSH: "FLUSH", TRIM: "TRIM",
             CACHE: "CACHE", WRITE_ZEROES: "WRITE_ZEROES", BLOCK_STATUS: "BLOCK_STATUS",
             RESIZE: "RESIZE"}
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16

# structured reply chunk types
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR_BIT = 1 << 15

# errors
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
ERRNOS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

MAX_PAYLOAD = 32 << 20  # QEMU's largest READ/WRITE

REQUEST = struct.Struct(">IHHQQI")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")


class Closed(Exception):
    """The server closed the connection (or reset it)."""


class ProtocolViolation(AssertionError):
    """The server sent something the protocol does not allow."""


@dataclass
class OptionReply:
    option: int
    rep: int
    data: bytes

    @property
    def final(self) -> bool:
        return self.rep == REP_ACK or bool(self.rep & REP_ERROR_BIT)


@dataclass
class Reply:
    """One request's whole reply: ``error`` 0 on success; a READ's ``data``; a
    BLOCK_STATUS's ``extents`` (context id -> [(length, flags)]); an error's ``message``
    (structured replies only)."""

    cookie: int
    error: int = 0
    data: bytes = b""
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    message: str = ""


@dataclass
class Pending:
    cmd: int
    offset: int
    length: int


class Client:
    """One connection. ``go`` negotiates; ``send``/``request``/``reply`` run requests."""

    def __init__(self, path: Arg, *, timeout: float = 10.0, greet: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.structured = False
        self.size = -1
        self.flags = 0
        self.contexts: dict[int, str] = {}
        self.pending: dict[int, Pending] = {}
        self.handshake_flags = -1
        self.no_zeroes = False
        if greet:
            self.greeting()

    # ---------------------------------------------------------------- bytes
    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                more = self.sock.recv(min(n - len(buf), 1 << 20))
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise Closed(f"reset after {len(buf)} of {n} bytes: {exc}") from None
            if not more:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += more
        return bytes(buf)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise Closed(f"send: {exc}") from None

    def closed_soon(self) -> bool:
        """Reads until EOF (data the server still sends is dropped): True at EOF; a
        ``TimeoutError`` when the server neither sends nor closes."""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while self.sock.recv(1 << 20):
                pass
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # ---------------------------------------------------------------- negotiation
    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProtocolViolation(f"not a fixed newstyle greeting: {magic:#x} {opt_magic:#x}")
        self.handshake_flags = flags
        return flags

    def client_flags(self, flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> None:
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.send(struct.pack(">I", flags))

    @staticmethod
    def option_frame(opt: int, data: bytes = b"", *, length: int | None = None,
                     magic: int = IHAVEOPT) -> bytes:
        return OPTION.pack(magic, opt, len(data) if length is None else length) + data

    def option_reply(self) -> OptionReply:
        magic, opt, rep, length = OPTION_REPLY.unpack(self.recv_exact(OPTION_REPLY.size))
        if magic != REP_MAGIC:
            raise ProtocolViolation(f"option reply magic {magic:#x}")
        if length > 64 << 20:
            raise ProtocolViolation(f"option reply of {length} bytes")
        return OptionReply(opt, rep, self.recv_exact(length))

    def option_replies(self, opt: int) -> list[OptionReply]:
        """Replies up to the final one (ACK or an error) of option ``opt``."""
        out = []
        while True:
            r = self.option_reply()
            if r.option != opt:
                raise ProtocolViolation(f"a reply to option {r.option} for option {opt}")
            out.append(r)
            if r.final:
                return out

    def export_name_reply(self) -> tuple[int, int]:
        size, flags = struct.unpack(">QH", self.recv_exact(10))
        if not self.no_zeroes:
            self.recv_exact(124)
        return size, flags

    @staticmethod
    def info_data(name: bytes, requests: Sequence[int] = ()) -> bytes:
        return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
                + b"".join(struct.pack(">H", r) for r in requests))

    @staticmethod
    def meta_data(name: bytes, queries: Sequence[bytes]) -> bytes:
        return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
                + b"".join(struct.pack(">I", len(q)) + q for q in queries))

    def go(self, name: str = "", *, structured: bool = True,
           contexts: Sequence[str] = (), flags: int | None = None) -> None:
        """Client flags, then (``structured``) STRUCTURED_REPLY and SET_META_CONTEXT of
        ``contexts``, then GO: transmission starts (fails unless everything is acked)."""
        self.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES if flags is None else flags)
        if structured:
            self.send(self.option_frame(OPT_STRUCTURED_REPLY))
            (r,) = self.option_replies(OPT_STRUCTURED_REPLY)
            assert r.rep == REP_ACK, r
            self.structured = True
            if contexts:
                self.send(self.option_frame(OPT_SET_META_CONTEXT, self.meta_data(
                    name.encode(), [c.encode() for c in contexts])))
                for r in self.option_replies(OPT_SET_META_CONTEXT):
                    if r.rep == REP_META_CONTEXT:
                        (cid,) = struct.unpack_from(">I", r.data)
                        self.contexts[cid] = r.data[4:].decode()
                    else:
                        assert r.rep == REP_ACK, r
                assert sorted(self.contexts.values()) == sorted(contexts), self.contexts
        self.send(self.option_frame(OPT_GO, self.info_data(name.encode())))
        self.take_go(self.option_replies(OPT_GO))

    def take_go(self, replies: list[OptionReply]) -> bool:
        """Read the export's size and flags from GO's replies: True when it was acked."""
        for r in replies:
            if r.rep == REP_INFO and len(r.data) >= 2 and \
                    struct.unpack_from(">H", r.data)[0] == INFO_EXPORT:
                _, self.size, self.flags = struct.unpack(">HQH", r.data)
        ok = replies[-1].rep == REP_ACK
        if ok and self.size < 0:
            raise ProtocolViolation("GO acked without NBD_INFO_EXPORT")
        return ok

    # ---------------------------------------------------------------- transmission
    def request(self, cmd: int, cookie: int, offset: int = 0, length: int = 0,
                flags: int = 0, payload: bytes = b"", *, magic: int = REQUEST_MAGIC) -> bytes:
        """A request's frame (``payload`` follows a WRITE's header), remembered by cookie
        so its reply can be parsed."""
        self.pending[cookie] = Pending(cmd, offset, length)
        return REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload

    def reply(self) -> Reply:
        """The next whole reply (structured: its chunks up to the one flagged DONE)."""
        magic, = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            req = self._pending(cookie)
            if error and error not in ERRNOS:
                raise ProtocolViolation(f"error {error} is not the protocol's")
            data = b""
            if req.cmd == READ and not error:
                data = self.recv_exact(req.length)
            if req.cmd == BLOCK_STATUS and not error:
                raise ProtocolViolation("a simple reply to BLOCK_STATUS")
            return Reply(cookie, error, data)
        if magic != STRUCTURED_MAGIC:
            raise ProtocolViolation(f"reply magic {magic:#x}")
        if not self.structured:
            raise ProtocolViolation("a structured reply that was not negotiated")
        return self._structured()

    def _pending(self, cookie: int) -> Pending:
        req = self.pending.pop(cookie, None)
        if req is None:
            raise ProtocolViolation(f"a reply for cookie {cookie}, which no request pends")
        return req

    def _structured(self) -> Reply:
        cookie = -1
        req: Pending | None = None
        out: Reply | None = None
        pieces: list[tuple[int, bytes | int]] = []  # (offset, data or hole length)
        first = True
        while True:
            if not first:
                magic, = struct.unpack(">I", self.recv_exact(4))
                if magic != STRUCTURED_MAGIC:
                    raise ProtocolViolation(f"chunk magic {magic:#x} inside a reply")
            first = False
            flags, typ, ck, length = struct.unpack(">HHQI", self.recv_exact(16))
            if req is None:
                cookie = ck
                req = self.pending.get(ck)
                if req is None:
                    raise ProtocolViolation(f"a chunk for cookie {ck}, which no request pends")
                out = Reply(ck)
            elif ck != cookie:
                # chunks of different requests may interleave in the protocol; this client
                # does not send overlapping requests that the server could split that way
                raise ProtocolViolation(f"chunks of {ck} inside the reply to {cookie}")
            assert out is not None
            payload = self.recv_exact(length)
            if typ & CHUNK_ERROR_BIT:
                if len(payload) < 6:
                    raise ProtocolViolation(f"error chunk of {len(payload)} bytes")
                err, mlen = struct.unpack_from(">IH", payload)
                if err == 0 or err not in ERRNOS or 6 + mlen > len(payload):
                    raise ProtocolViolation(f"error chunk {err} message {mlen} of {length}")
                out.error = err
                out.message = payload[6:6 + mlen].decode(errors="replace")
            elif typ == CHUNK_OFFSET_DATA:
                if req.cmd != READ or len(payload) < 8:
                    raise ProtocolViolation(f"a data chunk for {CMD_NAMES.get(req.cmd)}")
                off, = struct.unpack_from(">Q", payload)
                pieces.append((off, payload[8:]))
            elif typ == CHUNK_OFFSET_HOLE:
                if req.cmd != READ or len(payload) != 12:
                    raise ProtocolViolation(f"a hole chunk for {CMD_NAMES.get(req.cmd)}")
                off, n = struct.unpack(">QI", payload)
                pieces.append((off, n))
            elif typ == CHUNK_BLOCK_STATUS:
                if req.cmd != BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
                    raise ProtocolViolation(f"a block status chunk of {len(payload)} bytes")
                cid, = struct.unpack_from(">I", payload)
                if cid in out.extents or cid not in self.contexts:
                    raise ProtocolViolation(f"block status for context {cid}")
                out.extents[cid] = [struct.unpack_from(">II", payload, 4 + 8 * i)
                                    for i in range((len(payload) - 4) // 8)]
            elif typ == CHUNK_NONE:
                if not flags & REPLY_FLAG_DONE or length:
                    raise ProtocolViolation("a NONE chunk that is not the last, empty one")
            else:
                raise ProtocolViolation(f"chunk type {typ}")
            if flags & REPLY_FLAG_DONE:
                break
        self.pending.pop(cookie)
        if out.error:
            return out
        if req.cmd == READ:
            out.data = _assemble(req, pieces)
        elif pieces:
            raise ProtocolViolation("data for a request that is not a READ")
        if req.cmd == BLOCK_STATUS:
            if not out.extents:
                raise ProtocolViolation("BLOCK_STATUS succeeded without extents")
            for cid, ext in out.extents.items():
                total = sum(n for n, _ in ext)
                if not ext or any(n == 0 for n, _ in ext) or total > req.length:
                    raise ProtocolViolation(f"context {cid}: extents {ext[:8]} for "
                                            f"{req.length} bytes")
        return out

    def status(self, cookie: int, offset: int, length: int, flags: int = 0) -> Reply:
        self.send(self.request(BLOCK_STATUS, cookie, offset, length, flags))
        return self.reply()

    def read(self, offset: int, length: int, cookie: int = 1, flags: int = 0) -> bytes:
        self.send(self.request(READ, cookie, offset, length, flags))
        r = self.reply()
        if r.error:
            raise AssertionError(f"READ {offset}+{length}: error {r.error} {r.message}")
        return r.data

    def disconnect(self) -> None:
        with contextlib.suppress(Closed, OSError):
            self.send(REQUEST.pack(REQUEST_MAGIC, 0, DISC, 0, 0, 0))
        self.close()


def _assemble(req: Pending, pieces: list[tuple[int, bytes | int]]) -> bytes:
    """A structured READ's data: the chunks must cover the request exactly, no overlap."""
    buf = bytearray(req.length)
    covered = 0
    spans = []
    for off, piece in pieces:
        n = piece if isinstance(piece, int) else len(piece)
        if off < req.offset or off + n > req.offset + req.length or (n == 0 and req.length):
            raise ProtocolViolation(f"a chunk at {off}+{n} outside {req.offset}+{req.length}")
        if not isinstance(piece, int):
            buf[off - req.offset:off - req.offset + n] = piece
        spans.append((off, n))
        covered += n
    spans.sort()
    for (a, n), (b, _) in itertools.pairwise(spans):
        if a + n > b:
            raise ProtocolViolation(f"chunks overlap at {b}")
    if covered != req.length:
        raise ProtocolViolation(f"chunks cover {covered} of {req.length} bytes")
    return bytes(buf)


# ---------------------------------------------------------------------------- the server
@dataclass
class Served:
    """A running ``dirtybits nbd``: its process, socket and stderr log."""

    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rss(self) -> int:
        """The server's resident memory, bytes (``VmRSS``)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def nbd_argv(image: Arg, sock: Path, *options: Arg, log_level: str = "info") -> list[str]:
    return argv(*DIRTYBITS, "--log-level", log_level, "nbd", "-k", sock, *options, image)


@contextlib.contextmanager
def serve_nbd(image: Arg, *options: Arg, timeout: float = 20,
              log_level: str = "info") -> Iterator[Served]:
    """``dirtybits nbd -k SOCKET OPTIONS IMAGE`` on a fresh socket; yields once it listens.
    Stopped (SIGTERM, then SIGKILL) afterwards, unless it ended already."""
    with socket_dir("dirtybits-rawnbd-") as d:
        sock = d / "s"
        log = d / "stderr"
        cmd = nbd_argv(image, sock, *options, log_level=log_level)
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while not listening(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    stop(proc)
                    raise AssertionError(f"{' '.join(cmd)} did not come up (exit "
                                         f"{proc.returncode}): {log.read_text()[-2000:]}")
                time.sleep(0.01)
            yield Served(proc, sock, log)
        finally:
            stop(proc)
