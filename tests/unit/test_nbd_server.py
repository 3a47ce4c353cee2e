"""The asyncio NBD server in process, over real unix sockets, driven by the client core.

What the wire-level tests of the core cannot see: requests reach the block layer (writes land
and are recorded in the bitmaps, reads come back with holes where the image is sparse, block
status reports the live bitmap), exported bitmaps are busy while exported and free after,
the daemon's QMP commands build and remove exports, and a client that floods requests is
throttled instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest

import dirtybits
import peers
from dirtybits.block.aio import AsyncBlockLayer
from dirtybits.block.owner import BlockOwner
from dirtybits.errors import DirtybitsError
from dirtybits.proto.nbd.client import SimpleReply
from dirtybits.proto.nbd.constants import (
    NBD_REPLY_FLAG_DONE,
    Cmd,
    CmdFlag,
    Errno,
    ReplyType,
)
from dirtybits.qcow2.image import Qcow2Image
from dirtybits.services.nbd.export import ExportError, ExportSpec, create_export
from dirtybits.services.nbd.server import NbdServer
from peers.nbdclient import Client, extents

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "d.qcow2"
    Qcow2Image.create(str(img), 8 * MiB)
    with dirtybits.open(str(img)) as node:
        node.write(0, b"\x11" * (64 << 10))
        node.bitmaps.add("b0", 65536, persistent=True)
        node.bitmaps.add("off", 65536, persistent=True, disabled=True)
    return img


async def _serve(image: Path, spec: ExportSpec, *, inline: bool = False
                 ) -> tuple[NbdServer, Any, str, Any]:
    owner = BlockOwner("test-nbd")
    layer = AsyncBlockLayer(owner)
    node = await layer.open(str(image))
    server = NbdServer(layer, inline=inline)
    server.add_export(await layer.call(create_export, spec, node))
    d = peers.socket_dir("dbnbd-")
    path = str(d.__enter__() / "s")
    await server.listen_unix(path)
    return server, node, path, (layer, owner, d)


async def _stop(server: NbdServer, node: Any, rest: Any) -> None:
    layer, owner, d = rest
    await server.close()
    await layer.close(node)
    owner.stop()
    d.__exit__(None, None, None)


@pytest.mark.parametrize("inline", [False, True])
async def test_writes_land_are_tracked_and_read_back(image: Path, inline: bool) -> None:
    server, node, path, rest = await _serve(
        image, ExportSpec("e0", "disk", writable=True, bitmaps=["b0"]), inline=inline)
    try:
        c = await Client.connect(path, "disk", contexts=("base:allocation",
                                                         "qemu:dirty-bitmap:b0"))
        (ok,) = await c.call(Cmd.NBD_CMD_WRITE, 1 * MiB, 4096, CmdFlag.NBD_CMD_FLAG_FUA,
                             b"\x22" * 4096)
        assert ok.type == ReplyType.NBD_REPLY_TYPE_NONE and ok.flags & NBD_REPLY_FLAG_DONE
        await c.call(Cmd.NBD_CMD_WRITE_ZEROES, 3 * MiB, 65536)
        assert await c.read(1 * MiB - 4096, 8192) == bytes(4096) + b"\x22" * 4096
        # a sparse read: data where written, holes elsewhere, covering the whole request
        evs = await c.call(Cmd.NBD_CMD_READ, 0, 2 * MiB)
        kinds = [(e.type, struct.unpack_from(">Q", e.payload)[0]) for e in evs]
        assert kinds[0] == (ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, 0)
        assert (ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE, 65536) in kinds
        assert evs[-1].flags & NBD_REPLY_FLAG_DONE
        # DF: one data chunk
        evs = await c.call(Cmd.NBD_CMD_READ, 0, 2 * MiB, CmdFlag.NBD_CMD_FLAG_DF)
        assert len(evs) == 1 and len(evs[0].payload) == 8 + 2 * MiB
        bs = await c.call(Cmd.NBD_CMD_BLOCK_STATUS, 0, 8 * MiB)
        assert [extents(e)[0] for e in bs] == [0, 2]
        assert extents(bs[1])[1] == [(1 * MiB, 0), (65536, 1), (2 * MiB - 65536, 0),
                                      (65536, 1), (8 * MiB - 3 * MiB - 65536, 0)]
        base = extents(bs[0])[1]
        assert base[0] == (65536, 0) and sum(n for n, _ in base) == 8 * MiB
        one = await c.call(Cmd.NBD_CMD_BLOCK_STATUS, 1 * MiB, MiB,
                           CmdFlag.NBD_CMD_FLAG_REQ_ONE)
        assert extents(one[1])[1] == [(65536, 1)]
        (err,) = await c.call(Cmd.NBD_CMD_READ, 8 * MiB, 1)
        assert err.type == ReplyType.NBD_REPLY_TYPE_ERROR
        assert err.payload[6:] == b"operation past EOF; From: 8388608, Len: 1, Size: 8388608"
        await c.call(Cmd.NBD_CMD_FLUSH)
        await c.close()
        sha = await server.layer.call(node.bitmaps.sha256, "b0")
        bits = await server.layer.call(node.bitmaps.extents, "b0")
        assert bits == [(1 * MiB, 65536), (3 * MiB, 65536)] and sha
    finally:
        await _stop(server, node, rest)


async def test_exported_bitmaps_are_busy_until_the_server_closes(image: Path) -> None:
    server, node, _, rest = await _serve(
        image, ExportSpec("e0", "", writable=True, bitmaps=["b0", "off"]))
    layer = server.layer
    try:
        info = await layer.call(node.bitmaps.info, "b0")
        assert info.busy and info.owner == "nbd export 'e0'"
        with pytest.raises(DirtybitsError, match="in use by another operation"):
            await layer.call(node.bitmaps.clear, "b0")
        with pytest.raises(ExportError, match="Bitmap 'b0' is currently in use"):
            await layer.call(create_export, ExportSpec("e1", "x", bitmaps=["b0"]), node)
        with pytest.raises(ExportError, match="Bitmap 'nope' is not found"):
            await layer.call(create_export, ExportSpec("e1", "x", bitmaps=["nope"]), node)
    finally:
        await server.close()
    assert not (await layer.call(node.bitmaps.info, "b0")).busy
    await layer.call(node.bitmaps.clear, "b0")
    await _stop(server, node, rest)


async def test_a_read_only_export_refuses_an_enabled_bitmap_of_a_writable_node(
        image: Path) -> None:
    owner = BlockOwner("t")
    layer = AsyncBlockLayer(owner)
    node = await layer.open(str(image))
    try:
        with pytest.raises(ExportError, match="Enabled bitmap 'b0' incompatible with readonly "
                                              "export"):
            await layer.call(create_export, ExportSpec("e", "", bitmaps=["b0"]), node)
        exp = await layer.call(create_export, ExportSpec("e", "", bitmaps=["off"]), node)
        await layer.call(exp.close)
    finally:
        await layer.close(node)
        owner.stop()


async def test_simple_replies_and_errors_without_structured_replies(image: Path) -> None:
    server, node, path, rest = await _serve(image, ExportSpec("e0", "", writable=False))
    try:
        c = await Client.connect(path, structured=False)
        assert await c.read(0, 4096) == b"\x11" * 4096
        (err,) = await c.call(Cmd.NBD_CMD_WRITE, 0, 3, 0, b"abc")
        assert err == SimpleReply(c.cookie, Errno.NBD_EPERM)
        (bs,) = await c.call(Cmd.NBD_CMD_BLOCK_STATUS, 0, 512)
        assert bs.error == Errno.NBD_EINVAL
        await c.close()
    finally:
        await _stop(server, node, rest)


async def test_a_client_that_never_reads_is_throttled(image: Path) -> None:
    import tracemalloc

    server, node, path, rest = await _serve(image, ExportSpec("e0", "", writable=False))
    try:
        c = await Client.connect(path)
        tracemalloc.start()
        for _ in range(400):  # 400 x 8 MiB of replies asked for, none read
            c.send(Cmd.NBD_CMD_READ, 0, 8 * MiB, CmdFlag.NBD_CMD_FLAG_DF)
        await asyncio.sleep(1.0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 256 * MiB, peak  # a bounded backlog, not 3.2 GiB
        other = await Client.connect(path)  # the server still serves others
        assert await other.read(0, 16) == b"\x11" * 16
        await other.close()
        c.w.close()
    finally:
        await _stop(server, node, rest)


async def test_daemon_qmp_exports(tmp_path: Path, image: Path) -> None:
    from dirtybits.services.daemon import Daemon, DaemonConfig
    from dirtybits.services.qmp.nbd_commands import export_options, nbd_server_options

    with peers.socket_dir("dbnbdq-") as d:
        sock = str(d / "n")
        config = DaemonConfig(
            blockdevs=[{"driver": "qcow2", "node-name": "n0",
                        "file": {"driver": "file", "filename": str(image)}}],
            nbd_server=nbd_server_options(f"addr.type=unix,addr.path={sock}"),
            exports=[export_options("type=nbd,id=e0,node-name=n0,writable=on,bitmaps.0=b0")])
        daemon = Daemon(config)
        events: list[tuple[str, Any]] = []
        await daemon.start()
        daemon.commands.emit = lambda name, data: events.append((name, data))
        run = daemon.commands.run
        try:
            assert await run("query-block-exports", {}) == [
                {"type": "nbd", "id": "e0", "node-name": "n0", "shutting-down": False}]
            c = await Client.connect(sock, "n0", contexts=("qemu:dirty-bitmap:b0",))
            await c.call(Cmd.NBD_CMD_WRITE, 2 * MiB, 512, 0, b"x" * 512)
            with pytest.raises(Exception, match="export 'n0' still in use"):
                await run("block-export-del", {"id": "e0"})
            with pytest.raises(Exception, match="Node n0 is in use"):
                await run("blockdev-del", {"node-name": "n0"})
            await run("block-export-del", {"id": "e0", "mode": "hard"})
            for _ in range(100):
                if events:
                    break
                await asyncio.sleep(0.02)
            assert events == [("BLOCK_EXPORT_DELETED", {"id": "e0"})]
            assert await run("query-block-exports", {}) == []
            assert await run("x-debug-block-dirty-bitmap-sha256",
                             {"node": "n0", "name": "b0"}) != ""
            await run("nbd-server-add", {"device": "n0", "name": "legacy"})
            with pytest.raises(Exception, match="Export 'nope' is not found"):
                await run("nbd-server-remove", {"name": "nope"})
            await run("nbd-server-remove", {"name": "legacy"})
            await run("nbd-server-stop", {})
            with pytest.raises(Exception, match="NBD server not running"):
                await run("nbd-server-stop", {})
            with pytest.raises(Exception, match="NBD server not running"):
                await run("block-export-add", {"type": "nbd", "id": "x", "node-name": "n0"})
            with pytest.raises(Exception, match="does not support tls-authz"):
                await run("nbd-server-start", {"addr": {"type": "unix",
                                                        "data": {"path": sock}},
                                               "tls-authz": "authz0"})
        finally:
            daemon.stop()
            await daemon.wait()
