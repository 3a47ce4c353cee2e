#!/usr/bin/env python3
"""QMP round trips: ``dirtybits serve`` against ``qemu-system-x86_64 -M none -nodefaults``,
the same commands on copies of the same image, over the same client (``qemu.qmp``).

The image (``--size``, default 64 GiB; 16 GiB with ``--quick``) is a qcow2 made by qemu-img
with ``--bitmaps`` (default 100) persistent enabled bitmaps at 64 KiB granularity, each with
``--runs-per-bitmap`` (100) scattered dirty runs, written in-process through dirtybits'
bitmap store and checked with ``qemu-img check``. Each session starts one server on a fresh
sparse copy of it (copy not timed), adds it as node ``n0`` (``blockdev-add`` of a qcow2 node
over an inline file node, the same ``cache`` options for both: ``--cache writeback``, the
default, or ``none``) and then times, one call at a time (µs from sending the command until
its reply is read):

- ``query-named-block-nodes`` (the node with its 100 ``dirty-bitmaps`` entries, and its file
  node);
- ``block-dirty-bitmap-add`` of a transient bitmap and its ``block-dirty-bitmap-remove``
  (alternately, so the count stays at 100), and the same for a persistent one (no aim: QEMU
  writes a new persistent bitmap only at close, dirtybits at once, so this row shows what that
  costs);
- ``block-dirty-bitmap-merge`` of two of the stored bitmaps into an empty transient one, then
  its ``block-dirty-bitmap-clear`` (alternately: each merge has work to do, each clear has bits
  to clear);
- a ``transaction`` of 6 actions that leaves the node as it found it: add ``t``, merge two
  stored bitmaps into it, disable it, enable it, clear it, remove it.

Also timed, once per session: start-up, from the fork until the QMP socket listens
(``/proc/net/unix``; the daemon builds nothing before it listens here: no ``--blockdev``),
the ``blockdev-add`` and the first ``query-named-block-nodes`` after it (QEMU has read every
bitmap at the open; dirtybits reads them when first asked: the first query pays for it).
Every batch of calls starts after ``os.sync()``; each operation runs ``--calls`` times per
session (the first 3 not counted), ``--sessions`` sessions alternate which server goes first;
the figures are medians over all counted calls (start-up: over sessions). Aims: each
operation <= 1.5x QEMU's round trip, start-up <= 2x.

Checks (exit 1 otherwise): both servers start, every call returns, each merge gives the same
``x-debug-block-dirty-bitmap-sha256`` on both and the query lists the same 100 bitmaps (names,
granularity, counts) on both; after ``quit`` both exit 0, ``qemu-img check`` is clean on both
copies, ``qemu-img info`` lists the template's bitmaps in both, and every stored bitmap has the
template's sha256.

    .venv/bin/python bench/qmp_bench.py [--quick] [--sessions N] [--calls N] [--size 64G]
        [--bitmaps 100] [--cache writeback|none] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    KiB,
    Table,
    bitmap_digests,
    copy_sparse,
    dirtybits_argv,
    dirtybits_has,
    environment,
    fail,
    human_disk,
    make_bitmap_image,
    median,
    need,
    parse_size,
    peers,
    qemu_bitmap_list,
    qemu_img_check,
    run_timed,
    scattered_bitmap,
    warm_bytecode,
    write_json,
)

GRAN = 64 * KiB
QEMU_SYSTEM = "qemu-system-x86_64"
SIDES = ("dirtybits", "qemu")
WARMUP = 3  # calls of each operation per session not counted
OP_AIM = 1.5
STARTUP_AIM = 2.0

#: (row, aim) in the order printed; the timed loops below fill them.
OPS: list[tuple[str, float | None]] = [
    ("query-named-block-nodes", OP_AIM),
    ("block-dirty-bitmap-add", OP_AIM),
    ("block-dirty-bitmap-remove", OP_AIM),
    ("block-dirty-bitmap-add persistent", None),
    ("block-dirty-bitmap-remove persistent", None),
    ("block-dirty-bitmap-merge", OP_AIM),
    ("block-dirty-bitmap-clear", OP_AIM),
    ("transaction (6 actions)", OP_AIM),
]
ONCE = ["start-up until QMP listens", "blockdev-add (open)", "first query-named-block-nodes"]


@dataclass
class Results:
    us: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {op: {s: [] for s in SIDES} for op, _ in OPS})
    once: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {op: {s: [] for s in SIDES} for op in ONCE})
    merged: dict[str, set[str]] = field(default_factory=lambda: {s: set() for s in SIDES})
    listed: dict[str, list[Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def server_argv(side: str, sock: Path) -> list[str]:
    if side == "qemu":
        return [QEMU_SYSTEM, "-M", "none", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{sock},server=on,wait=off"]
    return [*dirtybits_argv(), "serve", "--qmp", f"unix:{sock}"]


def blockdev(image: Path, cache: str) -> dict[str, Any]:
    c = {"direct": cache == "none", "no-flush": False}
    return {"driver": "qcow2", "node-name": "n0", "cache": c,
            "file": {"driver": "file", "filename": str(image), "cache": c}}


async def timed(qmp: Any, cmd: str, args: dict[str, Any] | None = None) -> tuple[float, Any]:
    start = time.perf_counter()
    reply = await qmp.execute(cmd, args)
    return (time.perf_counter() - start) * 1e6, reply


def bitmap_rows(nodes: list[dict[str, Any]]) -> list[tuple[str, int, int, bool]]:
    (n0,) = [n for n in nodes if n["node-name"] == "n0"]
    return [(b["name"], b["granularity"], b["count"], b["recording"])
            for b in n0.get("dirty-bitmaps", [])]


async def session(side: str, args: argparse.Namespace, template: Path, scratch: Path,
                  socks: Path, res: Results) -> Path:
    """One server on a fresh copy of the template: start-up, open, the timed calls, quit.
    Returns the copy (checked by the caller)."""
    from qemu.qmp import QMPClient

    image = scratch / f"{side}.qcow2"
    copy_sparse(template, image)
    sock, errpath = socks / f"{side}.sock", scratch / f"{side}.stderr"
    sock.unlink(missing_ok=True)
    with open(errpath, "w") as err:
        os.sync()
        start = time.perf_counter()
        proc = subprocess.Popen(server_argv(side, sock), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    qmp = QMPClient(side)
    try:
        while not peers.listening(sock):
            if proc.poll() is not None or time.perf_counter() > start + 60:
                raise RuntimeError(f"{side}: no QMP socket (exit {proc.returncode}): "
                                   f"{errpath.read_text()[-500:]}")
            time.sleep(0.0002)
        res.once[ONCE[0]][side].append((time.perf_counter() - start) * 1e6)
        await qmp.connect(str(sock))
        us, _ = await timed(qmp, "blockdev-add", blockdev(image, args.cache))
        res.once[ONCE[1]][side].append(us)
        us, nodes = await timed(qmp, "query-named-block-nodes")
        res.once[ONCE[2]][side].append(us)
        res.listed[side] = bitmap_rows(nodes)
        await timed_loops(side, qmp, args, res)
        await qmp.execute("quit")
        code = await asyncio.to_thread(proc.wait, 30)
        if code != 0:
            res.problems.append(f"{side}: exited {code} after quit: "
                                f"{errpath.read_text()[-500:]}")
    finally:
        with contextlib.suppress(EOFError, ConnectionResetError):
            await qmp.disconnect()
        peers.stop(proc)
        sock.unlink(missing_ok=True)
    return image


async def timed_loops(side: str, qmp: Any, args: argparse.Namespace, res: Results) -> None:
    us = res.us
    n = args.calls + WARMUP
    names = [f"b{i:03d}" for i in range(args.bitmaps)]

    async def batch(body: Callable[[int], Awaitable[None]]) -> None:
        os.sync()
        for i in range(n):
            await body(i)

    def keep(op: str, i: int, t: float) -> None:
        if i >= WARMUP:
            us[op][side].append(t)

    async def query(i: int) -> None:
        t, nodes = await timed(qmp, "query-named-block-nodes")
        keep("query-named-block-nodes", i, t)
        if i == 0 and bitmap_rows(nodes) != res.listed[side]:
            res.problems.append(f"{side}: the query changed between calls")

    async def add_remove(i: int) -> None:
        t, _ = await timed(qmp, "block-dirty-bitmap-add", {"node": "n0", "name": f"new{i}"})
        keep("block-dirty-bitmap-add", i, t)
        t, _ = await timed(qmp, "block-dirty-bitmap-remove", {"node": "n0", "name": f"new{i}"})
        keep("block-dirty-bitmap-remove", i, t)

    async def add_remove_persistent(i: int) -> None:
        t, _ = await timed(qmp, "block-dirty-bitmap-add",
                           {"node": "n0", "name": f"p{i}", "persistent": True})
        keep("block-dirty-bitmap-add persistent", i, t)
        t, _ = await timed(qmp, "block-dirty-bitmap-remove", {"node": "n0", "name": f"p{i}"})
        keep("block-dirty-bitmap-remove persistent", i, t)

    async def merge_clear(i: int) -> None:
        a, b = names[(2 * i) % len(names)], names[(2 * i + 1) % len(names)]
        t, _ = await timed(qmp, "block-dirty-bitmap-merge",
                           {"node": "n0", "target": "scratch", "bitmaps": [a, b]})
        keep("block-dirty-bitmap-merge", i, t)
        if i < 4:  # the same bits on both sides
            sha = await qmp.execute("x-debug-block-dirty-bitmap-sha256",
                                    {"node": "n0", "name": "scratch"})
            res.merged[side].add(f"{a}+{b}:{sha['sha256']}")
        t, _ = await timed(qmp, "block-dirty-bitmap-clear", {"node": "n0", "name": "scratch"})
        keep("block-dirty-bitmap-clear", i, t)

    async def transaction(i: int) -> None:
        a, b = names[(3 * i) % len(names)], names[(3 * i + 1) % len(names)]
        t, _ = await timed(qmp, "transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "t"}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": "n0", "target": "t", "bitmaps": [a, b]}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "n0", "name": "t"}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": "n0", "name": "t"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "t"}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": "n0", "name": "t"}}]})
        keep("transaction (6 actions)", i, t)

    for body in (query, add_remove, add_remove_persistent):
        await batch(body)
    await qmp.execute("block-dirty-bitmap-add", {"node": "n0", "name": "scratch"})
    await batch(merge_clear)
    await qmp.execute("block-dirty-bitmap-remove", {"node": "n0", "name": "scratch"})
    await batch(transaction)
    _, nodes = await timed(qmp, "query-named-block-nodes")
    if bitmap_rows(nodes) != res.listed[side]:
        res.problems.append(f"{side}: the bitmaps are not as they were after the calls")


def check_image(side: str, image: Path, template: Path, digests: dict[str, str],
                res: Results) -> None:
    if (problem := qemu_img_check(image)) is not None:
        res.problems.append(f"{side}: {problem}")
    if qemu_bitmap_list(image) != qemu_bitmap_list(template):
        res.problems.append(f"{side}: qemu-img info lists other bitmaps than the template's")
    if bitmap_digests(image) != digests:
        res.problems.append(f"{side}: the stored bitmaps changed")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="CI sizes: a 16G disk, 2 sessions of 30 calls (unless given)")
    p.add_argument("--sessions", type=int, help="sessions per server (default 4), their "
                   "order alternating")
    p.add_argument("--calls", type=int, help="counted calls of each operation per session "
                   "(default 200)")
    p.add_argument("--size", type=parse_size, help="virtual disk size (default 64G)")
    p.add_argument("--bitmaps", type=int, default=100)
    p.add_argument("--runs-per-bitmap", type=int, default=100,
                   help="scattered dirty runs in each stored bitmap")
    p.add_argument("--cache", choices=("writeback", "none"), default="writeback",
                   help="cache.direct off (writeback) or on (none), the same for both")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /var/tmp)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.sessions = args.sessions or (2 if args.quick else 4)
    args.calls = args.calls or (30 if args.quick else 200)
    args.size = args.size or (16 << 30 if args.quick else 64 << 30)
    if args.bitmaps < 2:
        p.error("--bitmaps must be at least 2 (the merges take two)")
    return args


def report(res: Results, table: Table) -> list[dict[str, Any]]:
    records = []
    rows: list[tuple[str, float | None, dict[str, list[float]]]] = [
        (op, aim, res.us[op]) for op, aim in OPS]
    rows += [(op, STARTUP_AIM if op == ONCE[0] else None, res.once[op]) for op in ONCE]
    for op, aim, samples in rows:
        med = {s: median(v) if v else None for s, v in samples.items()}
        ratio = (med["dirtybits"] / med["qemu"]
                 if med["dirtybits"] is not None and med["qemu"] else None)
        met = None if aim is None or ratio is None else ratio <= aim
        aim_text = "" if aim is None else f"{'met' if met else 'MISSED'} <={aim:g}x"
        table.row(op, *("-" if med[s] is None else f"{med[s]:,.0f}" for s in SIDES),
                  "-" if ratio is None else f"{ratio:.2f}x", aim_text)
        records.append({"operation": op, "us": samples, "median_us": med, "ratio": ratio,
                        "aim": aim, "aim_met": met})
    return records


async def run(args: argparse.Namespace, scratch: Path) -> tuple[Results, list[dict[str, Any]]]:
    template = scratch / "template.qcow2"
    make_bitmap_image(template, args.size, [
        (f"b{i:03d}", scattered_bitmap(args.size, GRAN, args.runs_per_bitmap, args.seed + i))
        for i in range(args.bitmaps)])
    if (problem := qemu_img_check(template)) is not None:
        raise SystemExit(f"qmp_bench: the template is broken: {problem}")
    digests = bitmap_digests(template)
    floor = median([run_timed([sys.executable, "-c", "pass"]).seconds for _ in range(5)])
    print(f"qmp_bench: {human_disk(args.size)} qcow2 with {args.bitmaps} persistent bitmaps "
          f"(64k, {args.runs_per_bitmap} dirty runs each); cache {args.cache}; "
          f"{args.sessions} sessions per server, {args.calls} counted calls per operation "
          f"each; python interpreter floor (`python -c pass`) {floor * 1000:.1f} ms; "
          f"scratch {scratch}", flush=True)
    res = Results()
    with peers.socket_dir("dirtybits-qmp-bench-") as socks:  # a short path for the sockets
        for s in range(args.sessions + 1):  # session 0 warms the page cache and bytecode
            for side in SIDES if s % 2 else SIDES[::-1]:
                into = Results() if s == 0 else res  # (session 0 is not counted)
                image = await session(side, args, template, scratch, socks, into)
                if into is not res:
                    res.problems += into.problems
                check_image(side, image, template, digests, res)
                image.unlink()
    if res.listed.get("dirtybits") != res.listed.get("qemu"):
        res.problems.append("the first query lists other bitmaps on each side: "
                            f"{res.listed.get('dirtybits', [])[:3]}... vs "
                            f"{res.listed.get('qemu', [])[:3]}...")
    if len(res.listed.get("qemu", [])) != args.bitmaps:
        res.problems.append(f"QEMU lists {len(res.listed.get('qemu', []))} bitmaps, not "
                            f"{args.bitmaps}")
    if res.merged["dirtybits"] != res.merged["qemu"]:
        res.problems.append("the merges gave other bits: "
                            f"{sorted(res.merged['dirtybits'] ^ res.merged['qemu'])[:4]}")
    table = Table(["operation", "dirtybits µs", "qemu µs", "ratio", "aim"], [38, 12, 9, 7, 14])
    records = report(res, table)
    print("(median round trip of one call, from sending it to reading the reply, over "
          f"{args.sessions} x {args.calls} calls per server; start-up and open: median over "
          "sessions; ratio = dirtybits / qemu, below 1 = dirtybits faster)")
    return res, records


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("qemu-img", QEMU_SYSTEM, "cp"):
        need(tool)
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        sys.exit("qmp_bench: needs qemu.qmp (the test extras: run scripts/setup)")
    if not dirtybits_has("serve"):
        sys.exit("qmp_bench: this dirtybits has no `serve`")
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-qmp-", dir=args.dir or "/var/tmp"))
    warm_bytecode(scratch)
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        res, records = asyncio.run(run(args, scratch))
        problems = res.problems
    except (RuntimeError, OSError, AssertionError) as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for problem in problems:
        fail(problem)
    write_json(args.json, {
        "benchmark": "qmp", "environment": environment(), "ok": not problems,
        "problems": problems,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": records,
    })
    if problems:
        fail("qmp_bench: results above are INVALID (a call failed or the results differ)")
        return 1
    print("qmp_bench: every call returned; both servers exited 0; the merges and queries "
          "agree; qemu-img check clean and the stored bitmaps unchanged on both copies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
