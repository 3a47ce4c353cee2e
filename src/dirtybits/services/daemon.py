"""``dirtybits serve``: a daemon shaped like qemu-storage-daemon, with QMP monitors.

It owns one block thread (every node, registry and checkpoint lives there), one block graph,
and an asyncio loop running the QMP monitors. Start-up builds the graph from the command
line (``--blockdev``, ``--drive``, ``--dirty-bitmap``) before any socket accepts, so a
client never sees a half-built graph; any failure there stops start-up with the reason and
leaves nothing open. ``quit``, SIGTERM and SIGINT stop it the same way: monitors closed,
every node closed (each checkpoints its bitmaps: clean on disk), the pidfile removed.

``--daemonize`` forks before any thread exists; the parent returns only once the child's
sockets accept (exit 0) or start-up failed (its reason on the parent's stderr, exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dirtybits.block.aio import AsyncBlockLayer
from dirtybits.block.graph import BlockGraph
from dirtybits.block.node import NodeEvent, NodeEventKind
from dirtybits.block.owner import BlockOwner
from dirtybits.errors import DirtybitsError
from dirtybits.services.qmp.commands import Commands
from dirtybits.services.qmp.server import QmpServer
from dirtybits.services.serve_options import ServeOptions

log = logging.getLogger(__name__)

#: What query-version reports: the QEMU release whose QMP the daemon speaks.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


def package() -> str:
    from dirtybits import __version__

    return f"dirtybits {__version__}"


@dataclass(frozen=True)
class Monitor:
    path: str
    mode: int = 0o600


@dataclass
class DaemonConfig:
    blockdevs: list[dict[str, Any]] = field(default_factory=list)  # checked BlockdevOptions
    drives: ServeOptions = field(default_factory=lambda: ServeOptions((), ()))
    monitors: list[Monitor] = field(default_factory=list)
    pidfile: str | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)  # --object (tls-creds-x509)
    nbd_server: dict[str, Any] | None = None  # --nbd-server (NbdServerOptions)
    exports: list[dict[str, Any]] = field(default_factory=list)  # --export (BlockExportOptions)


class Daemon:
    """One running daemon (``start`` then ``wait``; ``stop`` from anywhere on the loop)."""

    def __init__(self, config: DaemonConfig, *,
                 hmp_out: Callable[[str], None] | None = None,
                 hmp_err: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.owner = BlockOwner("dirtybits-block")
        self.layer = AsyncBlockLayer(self.owner)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.graph = BlockGraph(self.owner, on_event=self._node_event)
        self.commands = Commands(self.layer, self.graph, version=QEMU_VERSION,
                                 package=package(), quit=self._quit, hmp_out=hmp_out,
                                 hmp_err=hmp_err)
        self.server = QmpServer(self.commands)
        self.commands.emit = self.server.broadcast
        self._stopped = asyncio.Event()
        self._pidfile_written = False

    # ------------------------------------------------------------------ start / stop
    async def start(self) -> None:
        """Build the graph, then listen. Raises ``DirtybitsError`` (all closed again)."""
        self._loop = asyncio.get_running_loop()
        try:
            await self.layer.call(self._build)
            await self._start_nbd()
            for mon in self.config.monitors:
                await self.server.listen_unix(mon.path, mon.mode)
            if self.config.pidfile is not None:
                write_pidfile(self.config.pidfile)
                self._pidfile_written = True
        except BaseException:
            await self._teardown()
            raise
        log.info("ready: %d node(s), %d monitor(s)", len(self.graph.nodes),
                 len(self.config.monitors))

    def _build(self) -> None:
        for opts in self.config.blockdevs:
            self.graph.add(opts)
        if self.config.drives.drives:
            from dirtybits.services.drives import open_drives

            open_drives(self.graph, self.config.drives)

    async def _start_nbd(self) -> None:
        """``--object``, ``--nbd-server``, ``--export``, in qemu-storage-daemon's order."""
        from dirtybits.proto.qmp.core import QmpError

        nbd = self.commands.nbd
        try:
            for props in self.config.objects:
                nbd.add_object(props)
            opts = self.config.nbd_server
            if opts is not None:
                if "tls-authz" in opts:  # refused, never ignored
                    from dirtybits.services.qmp.nbd_commands import NO_TLS_AUTHZ

                    raise QmpError(NO_TLS_AUTHZ)
                await nbd.start_server(opts["addr"], opts.get("tls-creds"),
                                       opts.get("max-connections"))
            for exp in self.config.exports:
                await nbd.add_export(exp)
        except QmpError as exc:
            raise DirtybitsError(exc.desc) from exc

    def stop(self) -> None:
        """Ask the daemon to stop (idempotent)."""
        self._stopped.set()

    def _quit(self) -> None:
        self.server.broadcast("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        assert self._loop is not None
        self._loop.call_soon(self.stop)

    async def wait(self) -> None:
        """Run until stopped, then close everything."""
        await self._stopped.wait()
        await self._teardown()

    async def _teardown(self) -> None:
        try:
            await self.commands.nbd.close()
        except Exception:  # the graph still closes: bitmaps checkpointed
            log.exception("closing the NBD server failed")
        await self.server.close()
        try:
            await self.layer.call(self.graph.close)
        finally:
            self.owner.stop()
            if self._pidfile_written and self.config.pidfile is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.pidfile)
        log.info("stopped: every bitmap checkpointed")

    # ------------------------------------------------------------------ events
    def _node_event(self, event: NodeEvent) -> None:
        """On the block thread: node events that QEMU reports become QMP events."""
        if event.kind is not NodeEventKind.CORRUPTED or self._loop is None:
            return
        device = next((d for d, n in self.graph.devices.items() if n == event.node), "")
        data: dict[str, Any] = {"device": device, "node-name": event.node,
                                "msg": event.message, "fatal": event.fatal}
        if event.offset is not None and event.size is not None:
            data["offset"], data["size"] = event.offset, event.size
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.server.broadcast, "BLOCK_IMAGE_CORRUPTED",
                                            data)


def write_pidfile(path: str) -> None:
    """Write our pid to ``path`` (atomically: a reader never sees it half written)."""
    from dirtybits.filecreate import replace_text_file

    try:
        replace_text_file(path, f"{os.getpid()}\n")
    except OSError as exc:
        raise DirtybitsError(f"cannot write the pidfile '{path}': {exc.strerror}") from exc


async def _serve(config: DaemonConfig, ready: Callable[[str | None], None]) -> int:
    daemon = Daemon(config)
    try:
        await daemon.start()
    except DirtybitsError as exc:
        ready(str(exc))
        return 1
    except OSError as exc:  # anything the layers below did not put in words of their own
        ready(f"{exc.strerror or exc}" + (f": '{exc.filename}'" if exc.filename else ""))
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    ready(None)
    await daemon.wait()
    return 0


def run(config: DaemonConfig, *, daemonize: bool = False,
        report: Callable[[str], None] | None = None) -> int:
    """Run the daemon until it is stopped; its exit status. ``report`` gets a start-up
    failure's text (default: stderr). With ``daemonize`` the caller's process returns once
    the daemon is ready (0) or failed (1), and the daemon runs on in a child."""
    from dirtybits.services.background import run_service

    return run_service(lambda ready: _serve(config, ready), daemonize=daemonize,
                       report=report)


def configure(*, blockdevs: Sequence[str] = (), drives: Sequence[str] = (),
              bitmaps: Sequence[str] = (), qmp: Sequence[str] = (),
              pidfile: str | None = None, objects: Sequence[str] = (),
              nbd_server: str | None = None, exports: Sequence[str] = ()) -> DaemonConfig:
    """A daemon's configuration from its command-line option values (parsed and checked,
    nothing opened). Raises ``UsageError`` (``QmpError`` for a bad ``--blockdev``, with
    QEMU's text)."""
    from dirtybits.errors import UsageError
    from dirtybits.proto.qmp.core import QmpError

    config = DaemonConfig(monitors=monitors(qmp), pidfile=pidfile)
    for text in blockdevs:
        try:
            config.blockdevs.append(_blockdev(text))
        except QmpError as exc:
            raise UsageError(f"--blockdev {text}: {exc.desc}") from exc
    if drives or bitmaps:
        from dirtybits.services.serve_options import (
            parse_dirty_bitmap,
            parse_drive,
            resolve,
        )

        config.drives = resolve([*(parse_drive(t) for t in drives),
                                 *(parse_dirty_bitmap(t) for t in bitmaps)])
    from dirtybits.services.qmp import nbd_commands

    for option, texts, parse in (("--object", objects, nbd_commands.object_options),
                                 ("--nbd-server", [nbd_server] if nbd_server else [],
                                  nbd_commands.nbd_server_options),
                                 ("--export", exports, nbd_commands.export_options)):
        for text in texts:
            try:
                value = parse(text)
            except QmpError as exc:
                raise UsageError(f"{option} {text}: {exc.desc}") from exc
            if option == "--object":
                config.objects.append(value)
            elif option == "--nbd-server":
                config.nbd_server = value
            else:
                config.exports.append(value)
    if config.exports and config.nbd_server is None:
        raise UsageError("--export type=nbd needs --nbd-server")
    if not config.monitors:
        log.warning("no --qmp monitor: the daemon can only be stopped by a signal")
    return config


def _blockdev(text: str) -> dict[str, Any]:
    from dirtybits.proto.keyval import parse_blockdev

    return parse_blockdev(text)


def monitors(specs: Sequence[str]) -> list[Monitor]:
    """``--qmp unix:PATH[,mode=OCTAL]`` values. Raises ``UsageError``."""
    from dirtybits.errors import UsageError

    out = []
    for spec in specs:
        if not spec.startswith("unix:"):
            raise UsageError(f"--qmp '{spec}': only unix:PATH sockets are supported")
        path, _, rest = spec[5:].partition(",")
        mode = 0o600
        if rest:
            key, _, value = rest.partition("=")
            if key != "mode":
                raise UsageError(f"--qmp '{spec}': unknown option '{key}'")
            try:
                mode = int(value, 8)
            except ValueError:
                raise UsageError(f"--qmp '{spec}': mode must be octal, like 0600") from None
            if not 0 <= mode <= 0o777:
                raise UsageError(f"--qmp '{spec}': mode must be between 0 and 0777")
        if not path:
            raise UsageError(f"--qmp '{spec}': a socket path is needed")
        out.append(Monitor(path, mode))
    return out


__all__ = ["QEMU_VERSION", "Daemon", "DaemonConfig", "Monitor", "configure", "monitors", "run"]
