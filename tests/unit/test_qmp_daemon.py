"""The daemon in process: its QMP monitors driven by ``qemu.qmp`` (the client QEMU's tests
use), the block graph and the bitmap commands, judged by the registry's own state and by
an oracle of the writes made through ``human-monitor-command qemu-io``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from qemu.qmp import ExecuteError, QMPClient

import dirtybits
import peers.qmp
from dirtybits.qcow2.image import Qcow2Image
from dirtybits.services.daemon import Daemon, DaemonConfig, Monitor

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MiB = 1 << 20


def qcow2(path: Path, size: int = 64 * MiB) -> str:
    Qcow2Image.create(str(path), size)
    return str(path)


def blockdev(name: str, path: str) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path}}


class Running:
    def __init__(self, daemon: Daemon, sock: str, hmp: list[str]) -> None:
        self.daemon = daemon
        self.sock = sock
        self.hmp = hmp
        self.clients: list[QMPClient] = []

    async def client(self) -> QMPClient:
        c = QMPClient(f"t{len(self.clients)}")
        await c.connect(self.sock)
        self.clients.append(c)
        return c


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    img = qcow2(tmp_path / "a.qcow2")
    config = DaemonConfig(blockdevs=[blockdev("n0", img)],
                          monitors=[Monitor(str(tmp_path / "qmp.sock"))])
    async with peers.qmp.in_process(config) as d:
        run = Running(d.daemon, d.sock, d.hmp)
        try:
            yield run
        finally:
            for c in run.clients:
                with contextlib.suppress(EOFError, ConnectionError):
                    await c.disconnect()


async def error_of(c: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as ei:
        await c.execute(cmd, args)
    return ei.value.error_class, ei.value.error.error.desc


async def io(c: QMPClient, node: str, cmd: str) -> None:
    assert await c.execute("human-monitor-command",
                           {"command-line": f'qemu-io {node} "{cmd}"'}) == ""


async def test_socket_is_private_and_answers_version(served: Running) -> None:
    assert stat.S_IMODE(os.stat(served.sock).st_mode) == 0o600
    c = await served.client()
    v = await c.execute("query-version")
    assert v["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    names = {x["name"] for x in await c.execute("query-commands")}
    assert {"blockdev-add", "block-dirty-bitmap-merge", "transaction",
            "human-monitor-command", "block-dirty-bitmap-edit"} <= names
    assert await error_of(c, "nope") == ("CommandNotFound", "The command nope has not been found")


async def test_bitmap_commands_follow_the_writes(served: Running) -> None:
    c = await served.client()
    await c.execute("block-dirty-bitmap-add", {"node": "n0", "name": "a", "persistent": True})
    await c.execute("block-dirty-bitmap-add", {"node": "n0", "name": "b", "disabled": True})
    await io(c, "n0", "write 0 64k")
    await io(c, "n0", "write 1M 4k")
    assert "wrote 65536/65536 bytes at offset 0" in "".join(served.hmp)
    nodes = await c.execute("query-named-block-nodes")
    top = next(n for n in nodes if n["node-name"] == "n0")
    bm = {b["name"]: b for b in top["dirty-bitmaps"]}
    assert [b["name"] for b in top["dirty-bitmaps"]] == ["b", "a"]  # newest first
    assert bm["a"]["count"] == 128 * 1024 and bm["a"]["persistent"]
    assert bm["b"]["count"] == 0 and not bm["b"]["recording"]
    assert bm["a"]["x-dirtybits"]["disk-state"] in ("open", "clean")
    # merge, clear, enable, sha256 (the oracle: two clusters written)
    await c.execute("block-dirty-bitmap-merge", {"node": "n0", "target": "b",
                                                 "bitmaps": ["a", {"node": "n0", "name": "a"}]})
    ha = await c.execute("x-debug-block-dirty-bitmap-sha256", {"node": "n0", "name": "a"})
    hb = await c.execute("x-debug-block-dirty-bitmap-sha256", {"node": "n0", "name": "b"})
    assert ha == hb
    await c.execute("block-dirty-bitmap-clear", {"node": "n0", "name": "a"})
    await c.execute("block-dirty-bitmap-enable", {"node": "n0", "name": "b"})
    await io(c, "n0", "write 2M 512")
    nodes = await c.execute("query-named-block-nodes", {"flat": True})
    bm = {b["name"]: b for b in nodes[0]["dirty-bitmaps"]}
    assert bm["a"]["count"] == 64 * 1024 and bm["b"]["count"] == 3 * 64 * 1024
    await c.execute("block-dirty-bitmap-remove", {"node": "n0", "name": "b"})
    assert await error_of(c, "block-dirty-bitmap-remove", {"node": "n0", "name": "b"}) == \
        ("GenericError", "Dirty bitmap 'b' not found")
    assert await error_of(c, "block-dirty-bitmap-clear", {"node": "zz", "name": "a"}) == \
        ("GenericError", "Node 'zz' not found")
    assert await error_of(c, "block-dirty-bitmap-add", {"node": "zz", "name": "a"}) == \
        ("GenericError", "Cannot find device='zz' nor node-name='zz'")
    assert await error_of(c, "block-dirty-bitmap-add", {"node": "n0", "name": "a"}) == \
        ("GenericError", "Bitmap already exists: a")
    err = await error_of(c, "block-dirty-bitmap-merge",
                         {"node": "n0", "target": "a", "bitmaps": []})
    assert "empty" in err[1]
    assert await error_of(c, "block-dirty-bitmap-add", {"node": "n0"}) == \
        ("GenericError", "Parameter 'name' is missing")
    assert await error_of(c, "block-dirty-bitmap-add",
                          {"node": "n0", "name": "q", "granularity": 1000}) == \
        ("GenericError", "Granularity must be power of 2 and at least 512")


async def test_transaction_is_all_or_nothing(served: Running) -> None:
    c = await served.client()
    await c.execute("block-dirty-bitmap-add", {"node": "n0", "name": "a", "persistent": True})
    await io(c, "n0", "write 0 64k")
    err = await error_of(c, "transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "new"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "a"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "nope"}}]})
    assert err == ("GenericError", "Dirty bitmap 'nope' not found")
    nodes = await c.execute("query-named-block-nodes", {"flat": True})
    bm = {b["name"]: b for b in nodes[0]["dirty-bitmaps"]}
    assert set(bm) == {"a"} and bm["a"]["count"] == 64 * 1024
    assert await error_of(c, "transaction", {"actions": [{"type": "bogus", "data": {}}]}) == \
        ("GenericError", "Parameter 'type' does not accept value 'bogus'")
    await c.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "new"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "a"}}]})
    nodes = await c.execute("query-named-block-nodes", {"flat": True})
    bm = {b["name"]: b for b in nodes[0]["dirty-bitmaps"]}
    assert set(bm) == {"a", "new"} and bm["a"]["count"] == 0


async def test_copy_edit_and_checkpoint(served: Running, tmp_path: Path) -> None:
    c = await served.client()
    await c.execute("block-dirty-bitmap-add", {"node": "n0", "name": "a", "persistent": True})
    await io(c, "n0", "write 0 128k")
    await c.execute("block-dirty-bitmap-copy", {"node": "n0", "name": "a", "new-name": "c"})
    await c.execute("block-dirty-bitmap-edit", {"node": "n0", "name": "c", "new-name": "d",
                                                "persistent": True, "granularity": 1 << 20})
    err = await error_of(c, "block-dirty-bitmap-edit",
                         {"node": "n0", "name": "d", "granularity": 65536})
    assert "granularity can only grow" in err[1]
    states = await c.execute("x-dirtybits-checkpoint")
    (entry,) = states
    bm = {b["name"]: b for b in entry["dirty-bitmaps"]}
    assert bm["d"]["granularity"] == 1 << 20 and bm["d"]["count"] == 1 << 20
    assert bm["d"]["persistent"] and bm["d"]["x-dirtybits"]["disk-state"] == "clean"
    assert bm["a"]["x-dirtybits"]["disk-state"] == "clean"


async def test_blockdev_add_and_del(served: Running, tmp_path: Path) -> None:
    c = await served.client()
    img = qcow2(tmp_path / "b.qcow2")
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\0" * MiB)
    assert await error_of(c, "blockdev-add", blockdev("n0", img)) == \
        ("GenericError", "Duplicate nodes with node-name='n0'")
    await c.execute("blockdev-add", {"driver": "file", "node-name": "f1", "filename": str(raw)})
    await c.execute("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "f1"})
    assert await error_of(c, "blockdev-add", {"driver": "raw", "node-name": "r2",
                                              "file": "nope"}) == \
        ("GenericError", "Cannot find device='nope' nor node-name='nope'")
    err = await error_of(c, "blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "f1"})
    assert err[1] == "Node 'f1' is already the file of 'r1': two format nodes cannot share one file"
    assert await error_of(c, "blockdev-add", {"driver": "qcow2", "node-name": "x", "file": {
        "driver": "file", "filename": str(raw)}}) == \
        ("GenericError", "Image is not in qcow2 format")
    assert await error_of(c, "blockdev-add", {"driver": "file", "node-name": "x",
                                              "filename": "/nonexistent/q"}) == \
        ("GenericError", "Could not open '/nonexistent/q': No such file or directory")
    assert await error_of(c, "blockdev-add", {"driver": "file", "node-name": "9x",
                                              "filename": str(raw)}) == \
        ("GenericError", "Invalid node-name: '9x'")
    assert await error_of(c, "blockdev-add", {"driver": "file", "filename": str(raw)}) == \
        ("GenericError", "'node-name' must be specified for the root node")
    assert await error_of(c, "blockdev-del", {"node-name": "f1"}) == \
        ("GenericError", "Block device f1 is in use")
    assert await error_of(c, "blockdev-del", {"node-name": "zz"}) == \
        ("GenericError", "Failed to find node with node-name='zz'")
    await c.execute("block-dirty-bitmap-add", {"node": "r1", "name": "t"})
    await io(c, "r1", "write 0 4k")
    await c.execute("blockdev-del", {"node-name": "r1"})
    await c.execute("blockdev-del", {"node-name": "f1"})
    await c.execute("blockdev-add", blockdev("n1", img))
    names = [n["node-name"] for n in await c.execute("query-named-block-nodes")]
    assert names[0] == "n1" and names[2] == "n0" and all(n.startswith("#block")
                                                         for n in names[1::2])
    await c.execute("blockdev-del", {"node-name": "n1"})
    assert len(await c.execute("query-named-block-nodes")) == 2


async def test_hmp_answers_like_qemu(served: Running) -> None:
    c = await served.client()
    assert await c.execute("human-monitor-command",
                           {"command-line": 'qemu-io zz "write 0 64k"'}) == \
        "Error: Cannot find device='' nor node-name='zz'\r\n"
    assert await c.execute("human-monitor-command", {"command-line": "foo"}) == \
        "unknown command: 'foo'\r\n"
    await io(c, "n0", "read -P 0 0 4k")
    await io(c, "n0", "bogus")
    assert 'command "bogus" not found' in "".join(served.hmp)


async def test_monitors_are_independent(served: Running) -> None:
    a = await served.client()
    # a raw client that breaks the JSON and one that sends half a line, then the rest
    r, w = await asyncio.open_unix_connection(served.sock)
    assert b'"QMP"' in await r.readline()
    w.write(b'{"execute": "qmp_capabilities"}\n{"execute": nope}\n{"execute": "query-')
    await w.drain()
    assert await r.readline() == b'{"return": {}}\r\n'
    assert json.loads(await r.readline())["error"]["desc"] == \
        "JSON parse error, invalid keyword 'nope'"
    assert (await a.execute("query-version"))["qemu"]["major"] == 7
    w.write(b'version"}\n')
    await w.drain()
    assert json.loads(await r.readline())["return"]["qemu"]["minor"] == 2
    w.close()
    assert (await a.execute("query-version"))["qemu"]["major"] == 7


async def test_quit_stops_and_leaves_bitmaps_clean(tmp_path: Path) -> None:
    img = qcow2(tmp_path / "a.qcow2")
    config = DaemonConfig(blockdevs=[blockdev("n0", img)],
                          monitors=[Monitor(str(tmp_path / "q.sock"))])
    async with peers.qmp.in_process(config) as d:
        c = d.qmp
        await c.execute("block-dirty-bitmap-add", {"node": "n0", "name": "a",
                                                   "persistent": True})
        await io(c, "n0", "write 0 64k")
        events = c.events
        await c.execute("quit")
        ev = await asyncio.wait_for(events.get(), 5)
        assert ev["event"] == "SHUTDOWN" and ev["data"]["reason"] == "host-qmp-quit"
        await asyncio.wait_for(asyncio.shield(d.waiter), 20)
    with dirtybits.open(img, readonly=True) as node:
        info = node.bitmaps.info("a")
        assert info.disk_state.value == "clean" and info.count == 64 * 1024


async def test_corruption_is_a_block_image_corrupted_event(tmp_path: Path) -> None:
    """QEMU's event, with its text and the refused host range (as qemu-system-x86_64 7.2
    sends it for the same image: an L2 entry pointing at the L1 table)."""
    import struct

    img = qcow2(tmp_path / "c.qcow2")
    with dirtybits.open(img) as node:
        node.write(0, b"x" * 65536)
    with open(img, "r+b") as f:
        hdr = f.read(104)
        l1 = struct.unpack(">Q", hdr[40:48])[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 63) | l1))
    config = DaemonConfig(blockdevs=[blockdev("n0", img)],
                          monitors=[Monitor(str(tmp_path / "q.sock"))])
    async with peers.qmp.in_process(config) as d:
        await io(d.qmp, "n0", "write 0 512")
        ev = await asyncio.wait_for(d.qmp.events.get(), 5)
        assert ev["event"] == "BLOCK_IMAGE_CORRUPTED"
        assert ev["data"] == {"device": "", "node-name": "n0", "fatal": True, "offset": l1,
                              "size": 512, "msg": "Preventing invalid write on metadata "
                                                  "(overlaps with active L1 table)"}


async def test_query_reports_the_image_as_it_is_on_disk(served: Running) -> None:
    """The live image info (from the open image, no reads) is what a fresh read of the
    file says, bitmap flags included, after adds, writes, removes and checkpoints."""
    from dirtybits.qcow2.info import image_info

    c = await served.client()
    for name in ("p1", "p2", "p3"):
        await c.execute("block-dirty-bitmap-add", {"node": "n0", "name": name,
                                                   "persistent": True})
    await io(c, "n0", "write 0 64k")
    await c.execute("block-dirty-bitmap-remove", {"node": "n0", "name": "p2"})
    await c.execute("block-dirty-bitmap-disable", {"node": "n0", "name": "p3"})
    for checkpoint in (False, True):
        if checkpoint:
            await c.execute("x-dirtybits-checkpoint")
        (node,) = [n for n in await c.execute("query-named-block-nodes")
                   if n["node-name"] == "n0"]
        live = dict(node["image"])
        disk = dict(image_info(live["filename"], "qcow2"))
        for info in (live, disk):
            info.pop("actual-size")
        assert live == disk
        flags = {b["name"]: b["flags"] for b in live["format-specific"]["data"]["bitmaps"]}
        assert flags["p3"] == [] and set(flags) == {"p1", "p3"}


async def test_our_blocking_client(served: Running) -> None:
    """``services.qmp.client``: what the demo and (later) the backup tool use."""
    from dirtybits.services.qmp.client import QmpClient, QmpCommandError

    def session() -> tuple[Any, QmpCommandError]:
        with QmpClient.connect(served.sock, timeout=10) as c:
            assert c.greeting.version["qemu"]["major"] == 7
            c.execute("block-dirty-bitmap-add", {"node": "n0", "name": "x"})
            with pytest.raises(QmpCommandError) as ei:
                c.execute("block-dirty-bitmap-add", {"node": "n0", "name": "x"})
            return c.execute("query-named-block-nodes", {"flat": True}), ei.value

    nodes, err = await asyncio.to_thread(session)
    assert [b["name"] for b in nodes[0]["dirty-bitmaps"]] == ["x"]
    assert (err.cls, err.desc) == ("GenericError", "Bitmap already exists: x")


async def test_a_metadata_image_over_a_raw_data_file(served: Running, tmp_path: Path) -> None:
    """A raw drive's metadata image (qcow2, ``data_file_raw=on``): by the data file its
    header names, and with ``data-file`` naming a node; writes land in the raw file and
    are recorded in the image's persistent bitmap."""
    raw = tmp_path / "d.raw"
    meta = str(tmp_path / "d.qcow2")
    Qcow2Image.create(meta, 8 * MiB, data_file=str(raw), data_file_raw=True)
    c = await served.client()
    await c.execute("blockdev-add", blockdev("m0", meta))
    await c.execute("block-dirty-bitmap-add", {"node": "m0", "name": "b", "persistent": True})
    await io(c, "m0", "write -P 0x5a 1M 64k")
    await c.execute("blockdev-del", {"node-name": "m0"})
    assert raw.read_bytes()[MiB:MiB + 65536] == b"\x5a" * 65536
    await c.execute("blockdev-add", {"driver": "file", "node-name": "d", "filename": str(raw)})
    await c.execute("blockdev-add", {**blockdev("m1", meta), "data-file": "d"})
    bm = {b["name"]: b for n in await c.execute("query-named-block-nodes")
          if n["node-name"] == "m1" for b in n["dirty-bitmaps"]}
    assert bm["b"]["count"] == 65536 and bm["b"]["x-dirtybits"]["disk-state"] == "clean"
    await io(c, "m1", "read -P 0x5a 1M 64k")
    assert "read 65536/65536 bytes at offset 1048576" in served.hmp[-1]
    assert await error_of(c, "blockdev-del", {"node-name": "d"}) == \
        ("GenericError", "Block device d is in use")
