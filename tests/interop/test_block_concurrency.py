"""Many callers at once: asyncio tasks through the facade and plain threads through the
synchronous API, on two qcow2 nodes and two raw drives sharing one container, while the block
thread runs timed checkpoints. Afterwards every write is in the bitmaps that were recording
(the oracle) and ``qemu-img check`` finds nothing wrong. A deadlock fails by timeout."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import threading
from pathlib import Path

import dirtybits
from dirtybits.block.aio import AsyncBlockLayer, LazyResultError
from dirtybits.block.checkpoint import CheckpointPolicy
from dirtybits.block.container import Container
from dirtybits.block.owner import BlockOwner
from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
from dirtybits.qcow2.image import Qcow2Image

MiB = 1 << 20
GRAN = 65536
DEADLINE = 120.0  # seconds for the whole workload: a hang fails, it does not eat CI
FAST = CheckpointPolicy(interval=0.05, idle=0.01, threshold_bits=64)


def granules(ranges: list[tuple[int, int]]) -> set[int]:
    return {g for off, n in ranges for g in range(off // GRAN, (off + n - 1) // GRAN + 1)}


def stored(path: str, name: str) -> set[int]:
    with Qcow2Image.open(path, readonly=True, force_share=True) as img:
        bm = Qcow2BitmapStore(img).load(name)
        return {s // GRAN + i for s, n in bm.dirty_extents(0, bm.size)
                for i in range(-(-n // GRAN))}


def qemu_check(path: str) -> dict[str, object]:
    proc = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def test_tasks_and_threads_on_two_nodes_and_a_shared_container(tmp_path: Path) -> None:
    size = 32 * MiB
    q1, q2 = str(tmp_path / "1.qcow2"), str(tmp_path / "2.qcow2")
    for p in (q1, q2):
        Qcow2Image.create(p, size)
        with dirtybits.open(p) as d:
            d.bitmaps.add("a", GRAN, persistent=True)
    c, ra, rb = str(tmp_path / "c.qcow2"), str(tmp_path / "a.raw"), str(tmp_path / "b.raw")
    for r in (ra, rb):
        Path(r).write_bytes(b"")
        os.truncate(r, 8 * MiB)
    Container.create(c, 64 * MiB)
    with Container.open(c) as ct:
        for r, drive in ((ra, "a"), (rb, "b")):
            ct.attach(r, drive)
            ct.add_bitmap(drive, "b0", GRAN)

    owner = BlockOwner("test-block")
    layer = AsyncBlockLayer(owner)
    written: dict[str, list[tuple[int, int]]] = {"1": [], "2": [], "a": [], "b": []}
    errors: list[BaseException] = []

    async def main() -> None:
        n1 = await layer.open(q1, checkpoint=FAST)
        n2 = await layer.open(q2, checkpoint=FAST)
        da = await layer.open(ra, bitmap_file=c, checkpoint=FAST)
        db = await layer.open(rb, bitmap_file=c, checkpoint=FAST)
        # a lazy result never crosses the facade
        try:
            await layer.call(lambda: iter(range(3)))
        except LazyResultError:
            pass
        else:
            raise AssertionError("a lazy result crossed the facade")

        async def writer(node: dirtybits.BlockNode, key: str, seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(60):
                off = rnd.randrange(0, node.size - 70_000)
                n = rnd.randrange(1, 70_000)
                await layer.call(node.write, off, bytes([seed]) * n)
                written[key].append((off, n))
                await layer.call(node.read, off, n)

        async def prodder(node: dirtybits.BlockNode) -> None:
            for i in range(25):
                name = f"scratch{i}"
                await layer.call(node.bitmaps.add, name, GRAN, persistent=i % 2 == 0)
                await layer.call(node.bitmaps.merge, name, ["a"])
                await layer.call(node.bitmaps.sha256, "a")
                await layer.call(node.bitmaps.extents, "a")
                await layer.call(node.bitmaps.remove, name)
                await layer.call(node.flush)

        def thread_writer(node: dirtybits.BlockNode, key: str, seed: int) -> None:
            try:
                rnd = random.Random(seed)
                for _ in range(60):
                    off = rnd.randrange(0, node.size - 70_000)
                    n = rnd.randrange(1, 70_000)
                    node.write(off, bytes([seed]) * n)  # the synchronous API, inline
                    written[key].append((off, n))
                    node.bitmaps.count("b0")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=thread_writer, args=(da, "a", 3)),
                   threading.Thread(target=thread_writer, args=(db, "b", 4))]
        for t in threads:
            t.start()
        await asyncio.gather(writer(n1, "1", 1), writer(n1, "1", 5), writer(n2, "2", 2),
                             writer(n2, "2", 6), prodder(n1), prodder(n2))
        for t in threads:
            await asyncio.to_thread(t.join, DEADLINE)
            assert not t.is_alive(), "a writer thread hung"
        # the block thread ran timed checkpoints among the requests
        assert all(node.stats.checkpoints > 1 for node in (n1, n2, da, db))
        for node in (n1, n2, da, db):
            await layer.close(node)

    asyncio.run(asyncio.wait_for(main(), DEADLINE))
    owner.stop()
    assert not errors, errors
    assert stored(q1, "a") == granules(written["1"])
    assert stored(q2, "a") == granules(written["2"])
    with Container.open(c, readonly=True) as ct:
        for drive in ("a", "b"):
            bm = ct.load_bitmap(drive, "b0")
            got = {s // GRAN + i for s, n in bm.dirty_extents(0, bm.size)
                   for i in range(-(-n // GRAN))}
            assert got == granules(written[drive])
    for p in (q1, q2, c):
        report = qemu_check(p)
        assert not report.get("corruptions") and not report.get("leaks"), report
