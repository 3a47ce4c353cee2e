"""``dirtybits nbd``'s work: one image served over NBD the way ``qemu-nbd`` serves it.

The options are qemu-nbd's (``NbdToolConfig``), with its defaults: export name ``""``,
``--shared 1`` (one client at a time; more wait), ``--discard ignore``, cache ``writeback``,
not persistent (the server exits when its last client leaves, unless ``-t``). Where qemu-nbd
listens on every address by default, ``dirtybits nbd`` listens on 127.0.0.1 unless ``-b``
says otherwise. ``--fork`` returns once the socket accepts (``services.background``).
SIGTERM and SIGINT stop it cleanly: exported bitmaps freed, the image closed (its bitmaps
checkpointed: clean on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dirtybits.block.aio import AsyncBlockLayer
from dirtybits.block.node import BlockNode
from dirtybits.block.owner import BlockOwner
from dirtybits.errors import DirtybitsError, UsageError
from dirtybits.services.background import Ready, run_service
from dirtybits.services.nbd.export import ExportSpec, create_export
from dirtybits.services.nbd.server import NbdServer
from dirtybits.services.nbd.tls import X509Creds

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
DEFAULT_PORT = 10809


@dataclass
class NbdToolConfig:
    image: str
    fmt: str | None = None
    readonly: bool = False
    bitmaps: list[str] = field(default_factory=list)
    allocation_depth: bool = False
    name: str = ""
    description: str = ""
    socket: str | None = None
    bind: str | None = None
    port: int | None = None
    persistent: bool = False
    shared: int = 1
    pidfile: str | None = None
    cache: str = "writeback"
    discard: str = "ignore"
    detect_zeroes: str = "off"
    tls: X509Creds | None = None
    inline: bool = True  # requests run under the owner's lock on the loop (one image, no QMP)


def configure(image: str, *, objects: Sequence[str] = (), tls_creds: str | None = None,
              **options: Any) -> NbdToolConfig:
    """Check qemu-nbd's option values (nothing opened). Raises ``UsageError``."""
    from dirtybits.proto.keyval import parse
    from dirtybits.proto.qmp.core import QmpError
    from dirtybits.services.nbd.tls import parse_object

    config = NbdToolConfig(image, **options)
    if config.cache not in CACHE_MODES:
        raise UsageError(f"Invalid cache mode '{config.cache}'")
    if config.discard not in ("ignore", "off", "unmap", "on"):
        raise UsageError(f"Invalid discard mode `{config.discard}'")
    if config.detect_zeroes not in ("off", "on", "unmap"):
        raise UsageError(f"Invalid detect-zeroes mode '{config.detect_zeroes}'")
    if config.detect_zeroes == "unmap" and config.discard not in ("unmap", "on"):
        raise UsageError("setting detect-zeroes to unmap is not allowed without setting "
                         "discard operation to unmap")
    if config.shared < 0:
        raise UsageError(f"Invalid shared device number '{config.shared}'")
    if config.socket is not None and (config.bind is not None or config.port is not None):
        raise UsageError("-p and -b are incompatible with -k")
    if config.port is not None and not 0 <= config.port <= 65535:
        raise UsageError(f"Invalid port number '{config.port}'")
    if len(config.name) > 4096:
        raise UsageError("Export name '...' too long")
    creds: dict[str, X509Creds] = {}
    for text in objects:
        try:
            props = parse(text, "qom-type")
        except QmpError as exc:
            raise UsageError(f"--object {text}: {exc.desc}") from exc
        if props.get("qom-type") != "tls-creds-x509":
            raise UsageError(f"--object {text}: only tls-creds-x509 objects are supported")
        obj = parse_object({k: str(v) for k, v in props.items()})
        creds[obj.id] = obj
    if tls_creds is not None:
        if tls_creds not in creds:
            raise UsageError(f"No TLS credentials with id '{tls_creds}'")
        if creds[tls_creds].endpoint != "server":
            raise UsageError("Expecting TLS credentials with a server endpoint")
        config.tls = creds[tls_creds]
    return config


def _open(config: NbdToolConfig, owner: BlockOwner) -> BlockNode:
    from dirtybits.block.open import open_node

    node = open_node(config.image, config.fmt, readonly=config.readonly, cache=config.cache,
                     owner=owner, node_name="nbd0")
    node.unmap = config.discard in ("unmap", "on")
    return node


async def _serve(config: NbdToolConfig, ready: Ready) -> int:
    owner = BlockOwner("dirtybits-nbd")
    layer = AsyncBlockLayer(owner)
    stop = asyncio.Event()
    node: BlockNode | None = None
    pidfile: str | None = None
    server = NbdServer(layer, inline=config.inline,
                       tls=config.tls.context() if config.tls is not None else None,
                       shared=config.shared, persistent=config.persistent,
                       on_idle=stop.set)
    try:
        try:
            node = await layer.call(_open, config, owner)
            spec = ExportSpec(id="qemu-nbd-export", name=config.name,
                              description=config.description, writable=not config.readonly,
                              # qemu-nbd's list: each -B goes in front (newest first)
                              bitmaps=list(reversed(config.bitmaps)),
                              allocation_depth=config.allocation_depth,
                              multi_conn=config.shared != 1,
                              detect_zeroes=config.detect_zeroes)
            exp = await layer.call(create_export, spec, node)
            server.add_export(exp)
            if config.socket is not None:
                await server.listen_unix(config.socket)
            else:
                await server.listen_tcp(config.bind or "127.0.0.1",
                                        DEFAULT_PORT if config.port is None else config.port)
            if config.pidfile is not None:
                from dirtybits.services.daemon import write_pidfile

                write_pidfile(config.pidfile)
                pidfile = config.pidfile
        except DirtybitsError as exc:
            ready(str(exc))
            return 1
        except OSError as exc:
            ready(f"{exc.strerror or exc}" + (f": '{exc.filename}'" if exc.filename else ""))
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready(None)
        await stop.wait()
        return 0
    finally:
        await server.close()
        if node is not None:
            with contextlib.suppress(DirtybitsError):
                await layer.call(node.close)
        owner.stop()
        if pidfile is not None:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)


def run(config: NbdToolConfig, *, fork: bool = False, report: Any = None) -> int:
    """Serve until stopped (or, not persistent, until the last client left)."""
    return run_service(lambda ready: _serve(config, ready), daemonize=fork, report=report)


__all__ = ["NbdToolConfig", "configure", "run"]
