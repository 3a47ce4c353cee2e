"""The NBD server: asyncio connections over the sans-I/O core, requests run on the block thread.

One ``NbdServer`` listens on any number of unix and TCP sockets and serves a changing set of
exports (``add_export``/``remove_export``: the daemon's ``block-export-add``/``-del``; the
``dirtybits nbd`` command makes one). Each connection is an ``asyncio.BufferedProtocol``
that feeds the core (``proto.nbd.server.ServerConnection``; a WRITE's payload is received
straight into its own buffer) and runs the requests it yields, in order, on the block thread
through the async facade, or inline under the owner's lock (``inline``: what both
``dirtybits nbd`` and the daemon use, nbd_bench measured it four times faster on 4 KiB
reads).

Bounds: a connection holds at most ``MAX_INFLIGHT`` parsed requests (reading pauses above
it, so a client that floods requests is throttled by TCP), and stops running requests while
its transport's write buffer is above the high-water mark (a client that never reads its
replies stops being served, it does not grow our memory). ``shared`` limits the clients
served at once: further connections wait, before the greeting, as qemu-nbd's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from dirtybits.block.aio import AsyncBlockLayer
from dirtybits.errors import DirtybitsError, ReadOnlyError
from dirtybits.proto.nbd.constants import Cmd, CmdFlag, Errno
from dirtybits.proto.nbd.server import (
    BadRequest,
    Close,
    ExportView,
    Ready,
    RequestEvent,
    ServerConnection,
    StartTls,
    TlsMode,
)
from dirtybits.services.nbd.export import NbdExport

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_INFLIGHT = 16  # parsed requests a connection may hold before it stops reading
MAX_PENDING_BYTES = 64 << 20  # write payloads held per connection before it stops reading
WRITE_HIGH_WATER = 4 << 20  # transport buffer above which a connection stops running requests
SOCKET_BUFFER = 4 << 20  # SO_SNDBUF asked for each connection
RECV_SCRATCH = 256 << 10  # what one receive takes outside a WRITE payload

_ERRNO = {
    errno.EPERM: Errno.NBD_EPERM, errno.EROFS: Errno.NBD_EPERM, errno.EIO: Errno.NBD_EIO,
    errno.ENOMEM: Errno.NBD_ENOMEM, errno.ENOSPC: Errno.NBD_ENOSPC,
    errno.EDQUOT: Errno.NBD_ENOSPC, errno.EFBIG: Errno.NBD_ENOSPC,
    errno.EOVERFLOW: Errno.NBD_EOVERFLOW, errno.ENOTSUP: Errno.NBD_ENOTSUP,
    errno.ESHUTDOWN: Errno.NBD_ESHUTDOWN, errno.EINVAL: Errno.NBD_EINVAL,
}


def nbd_errno(exc: BaseException) -> Errno:
    """The reply's error for a failed request (QEMU's ``system_errno_to_nbd_errno``)."""
    if isinstance(exc, ReadOnlyError):
        return Errno.NBD_EPERM
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return _ERRNO.get(code, Errno.NBD_EINVAL)
    return Errno.NBD_EIO


MMAP_THRESHOLD = 4 << 20  # buffers above this are mmapped and given back when freed


def tame_malloc() -> None:
    """Fix glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``). By default it grows to
    the largest buffer freed so far, so after a few 32 MiB requests every such buffer comes
    from the heap, and the heap, fragmented by clients that come and go, never shrinks:
    rounds of large requests grew a server by ~64 MiB each. With a fixed threshold a large
    buffer is its own mapping, returned to the system when freed; 1 MiB requests still
    reuse heap memory. Nothing happens where there is no glibc."""
    global _tamed
    if _tamed:
        return
    _tamed = True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    if not mallopt(m_mmap_threshold, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


_tamed = False


class NbdListenError(DirtybitsError):
    """A socket could not be made (QEMU's text)."""


class NbdServer:
    """Exports and listeners; the ``Catalog`` the protocol core consults."""

    def __init__(self, layer: AsyncBlockLayer | None = None, *, inline: bool = False,
                 tls: ssl.SSLContext | None = None, tls_mode: TlsMode | None = None,
                 shared: int = 0, persistent: bool = True, zero_copy: bool = True,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.layer = layer if layer is not None else AsyncBlockLayer()
        tame_malloc()
        self.inline = inline
        self.zero_copy = zero_copy  # data chunks of read-only images by os.sendfile
        self.tls = tls
        self.tls_id: str | None = None  # the credentials object's id (the daemon's)
        self.tls_mode = tls_mode if tls_mode is not None else (
            TlsMode.REQUIRED if tls is not None else TlsMode.OFF)
        self.shared = shared  # 0: no limit
        self.persistent = persistent
        self.on_idle = on_idle  # called when a non-persistent server's last client left
        self.exports: dict[str, NbdExport] = {}  # by name
        self.connections: set[NbdConnection] = set()
        self._serving = 0
        self._waiting: deque[NbdConnection] = deque()
        self._servers: list[asyncio.base_events.Server] = []
        self._unix_paths: list[str] = []
        self._ever = False

    # ---------------------------------------------------------------- catalog
    def lookup(self, name: str) -> ExportView | None:
        exp = self.exports.get(name)
        return exp.view if exp is not None else None

    def listing(self) -> list[ExportView]:
        return [exp.view for exp in self.exports.values()]

    # ---------------------------------------------------------------- exports
    def add_export(self, exp: NbdExport) -> None:
        if exp.name in self.exports:
            raise DirtybitsError(f"NBD export '{exp.name}' already exists")
        self.exports[exp.name] = exp

    async def remove_export(self, exp: NbdExport, *, hard: bool = True) -> None:
        """Stop serving ``exp``: its clients are disconnected (``hard``) or left to finish;
        its bitmaps are given back once no client uses it."""
        self.exports.pop(exp.name, None)
        users = [c for c in self.connections if c.export is exp]
        for c in users:
            if hard:
                c.abort("the export was removed")
        for c in users:
            await c.finished()
        await self.call(exp.close)

    # ---------------------------------------------------------------- running block calls
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self.inline:
            return self.layer.owner.call(fn, *args)
        return await self.layer.call(fn, *args)

    # ---------------------------------------------------------------- listening
    async def listen_unix(self, path: str, *, mode: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            if not os.path.exists(path) or _is_socket(path):
                os.unlink(path)
        try:
            srv = await loop.create_unix_server(self._protocol, path)
        except OSError as exc:
            raise NbdListenError(f"Failed to bind socket to {path}: "
                                 f"{exc.strerror or exc}") from exc
        if mode is not None:
            os.chmod(path, mode)
        self._servers.append(srv)
        self._unix_paths.append(path)
        log.info("NBD server listening on unix:%s", path)

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0: any); returns the port."""
        loop = asyncio.get_running_loop()
        try:
            srv = await loop.create_server(self._protocol, host, port, reuse_address=True)
        except OSError as exc:
            raise NbdListenError(f"Failed to find an available port: "
                                 f"{exc.strerror or exc}") from exc
        self._servers.append(srv)
        sock = srv.sockets[0]
        bound = int(sock.getsockname()[1])
        log.info("NBD server listening on %s:%d", host, bound)
        return bound

    def _protocol(self) -> NbdConnection:
        return NbdConnection(self)

    async def close(self) -> None:
        """Stop listening, disconnect every client, give every export's bitmaps back."""
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                if _is_socket(path):
                    os.unlink(path)
        self._unix_paths.clear()
        for c in list(self.connections):
            c.abort("the server is shutting down")
        for c in list(self.connections):
            await c.finished()
        for exp in list(self.exports.values()):
            await self.call(exp.close)
        self.exports.clear()

    # ---------------------------------------------------------------- client slots
    def _admit(self, conn: NbdConnection) -> None:
        self.connections.add(conn)
        if self.shared and self._serving >= self.shared:
            self._waiting.append(conn)
            log.debug("client waits for a slot (%d served)", self._serving)
            return
        self._serving += 1
        self._ever = True
        conn.start()

    def _left(self, conn: NbdConnection) -> None:
        self.connections.discard(conn)
        if conn in self._waiting:
            self._waiting.remove(conn)
            return
        if not conn.started:
            return
        self._serving -= 1
        while self._waiting and (not self.shared or self._serving < self.shared):
            nxt = self._waiting.popleft()
            self._serving += 1
            nxt.start()
        if (not self.persistent and self._ever and self._serving == 0 and not self._waiting
                and self.on_idle is not None):
            self.on_idle()


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


Work = RequestEvent | BadRequest | Close


class NbdConnection(asyncio.BufferedProtocol):
    """One client. Bytes are received into a scratch buffer, or (the rest of a WRITE's
    payload) straight into the payload's own buffer (``ServerConnection.receive_into``)."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.core = ServerConnection(server, tls=server.tls_mode)
        self.transport: asyncio.Transport | None = None
        self.export: NbdExport | None = None
        self.started = False
        self._queue: deque[Work] = deque()
        self._pending_bytes = 0
        self._wakeup = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self._closing = False
        self._done = asyncio.get_running_loop().create_future()
        self._worker: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        self._scratch = memoryview(bytearray(RECV_SCRATCH))
        self._into = False
        self.peer = "?"

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.transport is not None:  # start_tls hands us the TLS transport
            self.transport = transport
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a 1 MiB reply in one send (the kernel caps what it allows)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.peer = str(transport.get_extra_info("peername") or "unix")
        self.server._admit(self)

    def start(self) -> None:
        """A slot is free: greet the client and serve it."""
        self.started = True
        self._worker = asyncio.get_running_loop().create_task(self._work())
        self._send(self.core.data_to_send())
        for data in self._early:
            self.core.receive_data(data)
        self._early.clear()
        self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self.core.receive_into() if self.started else None
        if target is not None:
            self._into = True
            return target
        self._into = False
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._into:
            self.core.received_into(nbytes)
            self._pump()
        elif self.started:  # the core copies what it keeps: the scratch is reused
            self.core.receive_data(self._scratch[:nbytes])
            self._pump()
        else:
            self.data_received(bytes(self._scratch[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if not self.started:
            if sum(map(len, self._early)) + len(data) > 1 << 16:
                self.abort("sent too much before the greeting")
                return
            self._early.append(data)
            return
        self.core.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        if self.started:
            self.core.receive_data(b"")
            self._pump()
        else:
            self.abort("left before the greeting")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._writable.set()
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._finish()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---------------------------------------------------------------- the core's events
    def _send(self, data: bytes | bytearray) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            # a view: what the socket does not take at once is copied once, not sliced first
            self.transport.write(memoryview(data))

    def _pump(self) -> None:
        core = self.core
        while (ev := core.next_event()) is not None:
            if isinstance(ev, Ready):
                exp = self.server.exports.get(ev.export.name)
                if exp is None or exp.view is not ev.export:
                    self.abort("the export went away during negotiation")
                    return
                self.export = exp
                log.debug("%s: serving export '%s'", self.peer, exp.name)
            elif isinstance(ev, StartTls):
                self._send(core.data_to_send())
                asyncio.get_running_loop().create_task(self._start_tls())
                return
            elif isinstance(ev, RequestEvent | BadRequest | Close):
                self._queue.append(ev)
                if isinstance(ev, RequestEvent) and ev.payload is not None:
                    self._pending_bytes += len(ev.payload)
                self._wakeup.set()
        self._send(core.data_to_send())
        self._throttle()

    def _throttle(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        over = len(self._queue) >= MAX_INFLIGHT or self._pending_bytes >= MAX_PENDING_BYTES
        if over and not self._paused:
            self._paused = True
            t.pause_reading()
        elif not over and self._paused:
            self._paused = False
            t.resume_reading()

    async def _start_tls(self) -> None:
        ctx = self.server.tls
        t = self.transport
        assert ctx is not None and t is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(t, self, ctx, server_side=True, ssl_handshake_timeout=30)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("%s: TLS handshake failed: %s", self.peer, exc)
            self.abort(f"TLS handshake failed: {exc}")
            return
        if new is None:
            self.abort("TLS handshake failed")
            return
        self.transport = new
        self.core.tls_established()
        self._pump()

    # ---------------------------------------------------------------- serving requests
    async def _work(self) -> None:
        core = self.core
        try:
            while True:
                while not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                await self._writable.wait()
                if self._closing:
                    return
                ev = self._queue.popleft()
                if isinstance(ev, RequestEvent) and ev.payload is not None:
                    self._pending_bytes -= len(ev.payload)
                self._throttle()
                if isinstance(ev, Close):
                    (log.info if ev.error else log.debug)("%s: closing: %s", self.peer,
                                                          ev.reason)
                    self.abort(ev.reason)
                    return
                if isinstance(ev, BadRequest):
                    log.debug("%s: bad request: %s", self.peer, ev.message)
                    self._send(core.reply_error(ev.cookie, ev.error, ev.message))
                    if ev.fatal:
                        self.abort(ev.message)
                        return
                    continue
                await self._run(ev)
        except Exception:
            log.exception("%s: request handling failed", self.peer)
            self.abort("internal error")
        finally:
            if self.transport is None or self.transport.is_closing():
                self._finish()

    async def _run(self, ev: RequestEvent) -> None:
        exp = self.export
        assert exp is not None
        core = self.core
        cmd = ev.cmd
        fua = bool(ev.flags & CmdFlag.NBD_CMD_FLAG_FUA) or exp.spec.writethrough
        node = exp.node
        try:
            if cmd == Cmd.NBD_CMD_READ:
                sparse = core.structured and not ev.flags & CmdFlag.NBD_CMD_FLAG_DF
                zero_copy = sparse and self.server.zero_copy and not core.tls_active
                pieces = await self.server.call(exp.read_pieces, ev.offset, ev.length,
                                                core.read_header_size(), sparse, zero_copy)
                last = len(pieces) - 1
                for i, p in enumerate(pieces):
                    if p.buf is not None:
                        core.pack_read_header(p.buf, ev.cookie, p.offset, p.length,
                                              final=i == last)
                        self._send(p.buf)
                    elif p.fd is None:
                        self._send(core.hole(ev.cookie, p.offset, p.length, final=i == last))
                    else:
                        head = bytearray(core.read_header_size())
                        core.pack_read_header(head, ev.cookie, p.offset, p.length,
                                              final=i == last)
                        self._send(head)
                        await self._sendfile(p.fd, p.host, p.length)
                return
            if cmd == Cmd.NBD_CMD_WRITE:
                assert ev.payload is not None
                await self.server.call(_write, node, ev.offset, ev.payload, fua,
                                       exp.spec.detect_zeroes)
            elif cmd == Cmd.NBD_CMD_WRITE_ZEROES:
                unmap = not ev.flags & CmdFlag.NBD_CMD_FLAG_NO_HOLE
                fast = bool(ev.flags & CmdFlag.NBD_CMD_FLAG_FAST_ZERO)
                await self.server.call(_write_zeroes, node, ev.offset, ev.length, unmap, fua,
                                       fast)
            elif cmd == Cmd.NBD_CMD_TRIM:
                await self.server.call(_trim, node, ev.offset, ev.length, fua)
            elif cmd == Cmd.NBD_CMD_FLUSH:
                await self.server.call(node.flush)
            elif cmd == Cmd.NBD_CMD_CACHE:
                pass  # a hint: the page cache does this for us
            elif cmd == Cmd.NBD_CMD_BLOCK_STATUS:
                req_one = bool(ev.flags & CmdFlag.NBD_CMD_FLAG_REQ_ONE)
                replies = await self.server.call(exp.status_extents, core.contexts, ev.offset,
                                                 ev.length, req_one)
                last = len(replies) - 1
                self._send(b"".join(core.block_status(ev.cookie, cid, ext, final=i == last)
                                    for i, (cid, ext) in enumerate(replies)))
                return
            self._send(core.reply_ok(ev.cookie))
        except DirtybitsError as exc:
            log.info("%s: %s at %d+%d failed: %s", self.peer, cmd.name, ev.offset, ev.length,
                     exc)
            self._send(core.reply_error(ev.cookie, nbd_errno(exc), str(exc)))
        except OSError as exc:
            self._send(core.reply_error(ev.cookie, nbd_errno(exc), str(exc)))

    async def _sendfile(self, fd: int, offset: int, count: int) -> None:
        """``count`` bytes of the file ``fd`` at ``offset`` to the client with
        ``os.sendfile``: page cache to socket, never through Python."""
        t = self.transport
        if t is None or t.is_closing():
            return
        sock = t.get_extra_info("socket")
        if sock is not None and not t.get_write_buffer_size():
            # nothing queued before it: straight to the socket, no event-loop round trip
            try:
                sent = os.sendfile(sock.fileno(), fd, offset, count)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # the loop's sendfile below reports it (or closes)
            offset += sent
            count -= sent
            if not count:
                return
        with open(fd, "rb", buffering=0, closefd=False) as f:
            await asyncio.get_running_loop().sendfile(t, f, offset, count)

    # ---------------------------------------------------------------- ending
    def abort(self, reason: str) -> None:
        """Close the connection (what is queued for sending goes first)."""
        log.debug("%s: disconnect: %s", self.peer, reason)
        self._closing = True
        self._wakeup.set()
        self._writable.set()
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
        if self._worker is None or self._worker.done():
            self._finish()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)
            self.server._left(self)

    async def finished(self) -> None:
        await asyncio.shield(self._done)


class FastZeroError(DirtybitsError):
    """NBD_CMD_FLAG_FAST_ZERO asked for a zeroing that would write data."""

    errno = errno.ENOTSUP


def _write(node: Any, offset: int, data: memoryview, fua: bool, detect: str) -> None:
    if detect != "off" and data.nbytes and data == bytes(data.nbytes):
        node.write_zeroes(offset, data.nbytes, unmap=detect == "unmap", fua=fua)
        return
    node.write(offset, data, fua=fua)


def _write_zeroes(node: Any, offset: int, length: int, unmap: bool, fua: bool,
                  fast: bool) -> None:
    if fast:
        cs = node.cluster_size or 1
        if (offset | length) % cs:
            raise FastZeroError("fast zeroing needs whole clusters")
    node.write_zeroes(offset, length, unmap=unmap, fua=fua)


def _trim(node: Any, offset: int, length: int, fua: bool) -> None:
    node.discard(offset, length)
    if fua:
        node.flush()


__all__ = ["NbdConnection", "NbdListenError", "NbdServer", "nbd_errno"]
