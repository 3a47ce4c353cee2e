"""The seed's command line for drives and bitmaps (``--drive``, ``--dirty-bitmap``), case by
case: a bitmap from the drive's own image, from a container by ``file=`` and by ``file_id=``,
two drives sharing one container, a missing bitmap without ``create=on``, a size mismatch, one
name for two drives in one container (refused at creation), ``bitmap=no``, and a restart with
the same command line. Each daemon runs in process, driven over QMP by ``qemu.qmp``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

import dirtybits
import peers.qmp
from dirtybits.errors import DirtybitsError, UsageError
from dirtybits.qcow2.image import Qcow2Image
from dirtybits.services.daemon import Daemon, configure

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

MiB = 1 << 20


def raw(path: Path, size: int = 8 * MiB) -> str:
    path.write_bytes(b"")
    with open(path, "r+b") as f:
        f.truncate(size)
    return str(path)


@contextlib.asynccontextmanager
async def serve(tmp: Path, drives: Sequence[str], bitmaps: Sequence[str] = ()
                ) -> AsyncIterator[QMPClient]:
    config = configure(drives=drives, bitmaps=bitmaps, qmp=[f"unix:{tmp / 'q.sock'}"])
    async with peers.qmp.in_process(config) as d:
        yield d.qmp


async def start_fails(tmp: Path, drives: Sequence[str], bitmaps: Sequence[str] = ()) -> str:
    d = Daemon(configure(drives=drives, bitmaps=bitmaps, qmp=[f"unix:{tmp / 'f.sock'}"]))
    with pytest.raises(DirtybitsError) as ei:
        await d.start()
    assert not (tmp / "f.sock").exists()
    return str(ei.value)


async def bitmaps(c: QMPClient, node: str) -> dict[str, dict[str, Any]]:
    for n in await c.execute("query-named-block-nodes", {"flat": True}):
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
    raise AssertionError(node)


async def write(c: QMPClient, node: str, cmd: str) -> None:
    await c.execute("human-monitor-command", {"command-line": f'qemu-io {node} "{cmd}"'})


async def test_a_bitmap_from_the_drives_own_image(tmp_path: Path) -> None:
    img = str(tmp_path / "a.qcow2")
    Qcow2Image.create(img, 64 * MiB)
    with dirtybits.open(img) as node:
        node.bitmaps.add("b0", persistent=True)
        node.bitmaps.add("off", persistent=True, disabled=True)
        node.write(0, b"x" * 512)
    async with serve(tmp_path, [f"file={img},id=d0"],
                     ["name=b0,drive=d0", "name=off,drive=d0,enabled=on",
                      "name=new,drive=d0,create=on,granularity=1M"]) as c:
        bm = await bitmaps(c, "d0")
        assert bm["b0"]["count"] == 65536 and bm["b0"]["recording"]
        assert bm["off"]["recording"] and bm["new"]["granularity"] == MiB
        await write(c, "d0", "write 4M 4k")
        (dev,) = await c.execute("query-block")
        assert dev["device"] == "d0" and dev["inserted"]["node-name"] == "d0"
        # a device name works where QEMU takes one
        await c.execute("block-dirty-bitmap-clear", {"node": "d0", "name": "b0"})
    with dirtybits.open(img, readonly=True) as node:
        assert node.bitmaps.info("new").count == MiB
        assert node.bitmaps.info("off").recording
        assert node.bitmaps.info("b0").count == 0


async def test_raw_drives_share_a_container_by_file_and_file_id(tmp_path: Path) -> None:
    a, b = raw(tmp_path / "a.raw"), raw(tmp_path / "b.raw")
    cont = str(tmp_path / "bitmaps.qcow2")
    drives = [f"file={a},id=da,format=raw", f"file={b},id=db,format=raw"]
    made = [f"name=x,drive=da,file={cont},file_id=C,create=on",
            "name=y,drive=db,file_id=C,create=on,granularity=128k"]
    async with serve(tmp_path, drives, made) as c:
        await write(c, "da", "write 0 64k")
        await write(c, "db", "write 1M 64k")
        assert (await bitmaps(c, "da"))["x"]["count"] == 65536
        assert (await bitmaps(c, "db"))["y"]["count"] == 128 * 1024
    # the restart with the same command line loads what create=on made
    async with serve(tmp_path, drives, made) as c:
        x = (await bitmaps(c, "da"))["x"]
        assert x["count"] == 65536 and x["x-dirtybits"]["disk-state"] == "clean"
    # and without create=on, by file= alone
    async with serve(tmp_path, drives[:1], [f"name=x,drive=da,file={cont}"]) as c:
        assert (await bitmaps(c, "da"))["x"]["count"] == 65536
    # one name, two drives, one container: refused when it is created
    err = await start_fails(tmp_path, drives, [*made, "name=x,drive=db,file_id=C,create=on"])
    assert "already holds a bitmap 'x' (for drive 'da')" in err
    with dirtybits.open(b, bitmap_file=cont, readonly=True) as node:
        assert node.bitmaps.names() == ["y"]  # nothing made by the refused start


async def test_missing_bitmap_needs_create(tmp_path: Path) -> None:
    img = str(tmp_path / "a.qcow2")
    Qcow2Image.create(img, 64 * MiB)
    err = await start_fails(tmp_path, [f"file={img},id=d0"], ["name=nope,drive=d0"])
    assert err == (f"--dirty-bitmap name=nope,drive=d0: no bitmap 'nope' in {img} "
                   "(create=on makes it)")
    a = raw(tmp_path / "a.raw")
    err = await start_fails(tmp_path, [f"file={a},id=da"],
                            [f"name=x,drive=da,file={tmp_path}/none.qcow2"])
    assert "does not exist (create=on makes it)" in err
    assert not (tmp_path / "none.qcow2").exists()
    with pytest.raises(UsageError, match="granularity"):
        configure(drives=[f"file={img},id=d0"], bitmaps=["name=b,drive=d0,granularity=64k"])


async def test_size_mismatch_is_refused(tmp_path: Path) -> None:
    a = raw(tmp_path / "a.raw")
    cont = str(tmp_path / "c.qcow2")
    async with serve(tmp_path, [f"file={a},id=da"],
                     [f"name=x,drive=da,file={cont},create=on"]):
        pass
    with open(a, "r+b") as f:
        f.truncate(16 * MiB)
    err = await start_fails(tmp_path, [f"file={a},id=da"], [f"name=x,drive=da,file={cont}"])
    assert "size" in err and str(8 * MiB) in err


async def test_bitmap_no_loads_none(tmp_path: Path) -> None:
    img = str(tmp_path / "a.qcow2")
    Qcow2Image.create(img, 64 * MiB)
    with dirtybits.open(img) as node:
        node.bitmaps.add("b0", persistent=True)
    async with serve(tmp_path, [f"file={img},id=d0,bitmap=no"]) as c:
        assert await bitmaps(c, "d0") == {}
    err = await start_fails(tmp_path, [f"file={img},id=d0,bitmap=no"], ["name=b0,drive=d0"])
    assert "bitmap=no" in err


async def test_a_qcow2_drive_keeps_its_bitmaps_itself(tmp_path: Path) -> None:
    img = str(tmp_path / "a.qcow2")
    Qcow2Image.create(img, 64 * MiB)
    err = await start_fails(tmp_path, [f"file={img},id=d0"],
                            [f"name=b,drive=d0,file={tmp_path}/c.qcow2,create=on"])
    assert "its bitmaps live in its own image" in err
