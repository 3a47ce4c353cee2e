"""QEMU processes driven over QMP (``qemu.qmp``, the client QEMU's own tests use), for the
differential tests of our servers: ``qemu-system-x86_64 -M none`` (no guest, no devices: a
block layer and a QMP monitor) and ``qemu-storage-daemon``.

Both are async context managers that start the process with its QMP monitor on a fresh unix
socket, connect within ``timeout`` seconds and yield a :class:`Qemu` whose ``qmp`` is the
connected ``QMPClient``; afterwards the client disconnects and the process is stopped (it may
have quit already). Tests using them are asyncio tests with a short timeout::

    @pytest.mark.asyncio
    @pytest.mark.timeout(60)
    async def test_version() -> None:
        async with peers.qmp.qemu_system() as vm:
            assert (await vm.qmp.execute("query-version"))["qemu"]["major"] >= 7
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from . import Arg, argv, listening, stop

QEMU_SYSTEM = "qemu-system-x86_64"
STORAGE_DAEMON = "qemu-storage-daemon"


@dataclass
class Qemu:
    """A running QEMU process and its QMP client."""

    proc: subprocess.Popen[str]
    qmp: QMPClient
    sock: Path  # the QMP socket
    dir: Path  # a private scratch directory beside it (removed afterwards): other sockets
    stderr_path: Path

    @property
    def stderr(self) -> str:
        """What the process wrote to its stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        """What the process wrote to its stdout so far (HMP ``qemu-io`` prints there; QEMU's
        stdio buffers it: read it after the process exited)."""
        return (self.dir / "stdout").read_text(errors="replace")

    async def execute(self, cmd: str, arguments: dict[str, Any] | None = None) -> Any:
        """``qmp.execute``: the command's return value, or ``qemu.qmp.ExecuteError``."""
        return await self.qmp.execute(cmd, arguments)

    async def quit(self, timeout: float = 10) -> int:
        """``quit``, then wait for the process to exit: its exit status."""
        await self.qmp.execute("quit")
        await _disconnect(self.qmp)
        return await asyncio.to_thread(self.proc.wait, timeout)


async def _disconnect(qmp: QMPClient) -> None:
    with contextlib.suppress(EOFError, ConnectionResetError):  # it quit (or died) first
        await qmp.disconnect()


@asynccontextmanager
async def _with_qmp(name: str, command: Callable[[Path], list[str]],
                    timeout: float) -> AsyncIterator[Qemu]:
    d = Path(tempfile.mkdtemp(prefix=f"dirtybits-{name}-", dir="/tmp"))
    sock, errpath = d / "qmp.sock", d / "stderr"
    cmd = command(sock)
    try:
        with open(errpath, "w") as err, open(d / "stdout", "w") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    text=True)
        qmp = QMPClient(name)
        try:
            deadline = time.monotonic() + timeout
            while not listening(sock):  # (connecting earlier would log an error per try)
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"{' '.join(cmd)}: no QMP on {sock} (exit {proc.returncode}): "
                        f"{errpath.read_text(errors='replace').strip()}")
                await asyncio.sleep(0.01)
            await asyncio.wait_for(qmp.connect(str(sock)), max(1.0, deadline - time.monotonic()))
            try:
                yield Qemu(proc, qmp, sock, d, errpath)
            finally:
                await _disconnect(qmp)
        finally:
            await asyncio.to_thread(stop, proc)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def qemu_system(*args: Arg, machine: str = "none", binary: str = QEMU_SYSTEM,
                      timeout: float = 10) -> AsyncIterator[Qemu]:
    """``qemu-system-x86_64 -M MACHINE -nodefaults -display none -qmp unix:SOCK,server=on,
    wait=off ARGS`` (``-blockdev ...``, say), connected over QMP."""
    def command(sock: Path) -> list[str]:
        return argv(binary, "-M", machine, "-nodefaults", "-display", "none",
                    "-qmp", f"unix:{sock},server=on,wait=off", *args)

    async with _with_qmp("qemu-system", command, timeout) as vm:
        yield vm


@asynccontextmanager
async def storage_daemon(*args: Arg, binary: str = STORAGE_DAEMON,
                         timeout: float = 10) -> AsyncIterator[Qemu]:
    """``qemu-storage-daemon --chardev socket,path=SOCK,server=on,wait=off,id=qmp0 --monitor
    chardev=qmp0 ARGS`` (``--blockdev``, ``--nbd-server``, ``--export`` ...), connected over
    QMP."""
    def command(sock: Path) -> list[str]:
        return argv(binary, "--chardev", f"socket,path={sock},server=on,wait=off,id=qmp0",
                    "--monitor", "chardev=qmp0", *args)

    async with _with_qmp("qemu-storage-daemon", command, timeout) as qsd:
        yield qsd


@asynccontextmanager
async def dirtybits_serve(*args: Arg, timeout: float = 10) -> AsyncIterator[Qemu]:
    """``dirtybits serve --qmp unix:SOCK ARGS`` (``--blockdev ...``, ``--drive ...``), our
    daemon, connected over QMP like the QEMU peers (its stderr, with ``--log-level info``,
    in ``stderr``)."""
    from . import DIRTYBITS

    def command(sock: Path) -> list[str]:
        return argv(*DIRTYBITS, "--log-level", "info", "serve", "--qmp", f"unix:{sock}",
                    *args)

    async with _with_qmp("dirtybits-serve", command, timeout) as d:
        yield d


def missing(binaries: Iterable[str] = (QEMU_SYSTEM, STORAGE_DAEMON)) -> list[str]:
    """Which of the QMP peers are not on PATH."""
    return [b for b in binaries if shutil.which(b) is None]


@dataclass
class InProcess:
    """Our daemon running in this process (``services.daemon.Daemon``) and a connected
    ``qemu.qmp`` client; ``hmp`` collects what HMP ``qemu-io`` printed (stdout and stderr)."""

    daemon: Any
    qmp: QMPClient
    sock: str
    hmp: list[str]
    waiter: asyncio.Future[None]

    async def client(self, name: str = "extra") -> QMPClient:
        c = QMPClient(name)
        await c.connect(self.sock)
        return c


@asynccontextmanager
async def in_process(config: Any, timeout: float = 20) -> AsyncIterator[InProcess]:
    """Start ``Daemon(config)`` on the running loop (its first ``--qmp`` monitor is the one
    connected), yield it; afterwards disconnect and stop it (it may have quit already), and
    wait for it to close every node."""
    from dirtybits.services.daemon import Daemon

    hmp: list[str] = []
    d = Daemon(config, hmp_out=hmp.append, hmp_err=hmp.append)
    await d.start()
    waiter = asyncio.ensure_future(d.wait())
    sock = config.monitors[0].path
    c = QMPClient("in-process")
    try:
        await c.connect(sock)
        yield InProcess(d, c, sock, hmp, waiter)
    finally:
        with contextlib.suppress(EOFError, ConnectionError):
            await c.disconnect()
        d.stop()
        await asyncio.wait_for(waiter, timeout)
