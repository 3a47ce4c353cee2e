#!/usr/bin/env python3
"""NBD serving: ``dirtybits nbd`` against ``qemu-nbd``, the same exports of copies of the same
images, the same options, read by the same clients over a unix socket.

Both servers run as ``SERVER -t -e 8 -k SOCKET -f FMT --cache MODE [-r] [-B b0] IMAGE``
(``--cache writeback``, the default of both, or ``--cache none``; ``-e 8`` so nbdcopy's
connections are all taken at once). Every timed run starts a fresh server (not timed), waits
until it listens, calls ``os.sync()`` (so no run pays for the last one's dirty pages), then
runs the client; runs alternate the servers' order. The cases (the aims are the NBD issue's, the
ratio is dirtybits / qemu-nbd):

1. ``seq read``: sequential 1 MiB reads at 1 and at 4 requests in flight, ``qemu-img bench
   -f raw -t none -c N -d DEPTH -s 1M -S 1M nbd+unix://...`` over a ``--size`` (1 GiB) image
   of random data, ``--seq-bytes`` (4 GiB) per run (wrapping around); MiB/s from the time
   qemu-img bench prints (after its connect). Aim >= 0.6x.
2. ``random read``: ``--rand-ops`` 4 KiB reads at seeded random 4 KiB-aligned offsets of the
   same image, at 1 and at 8 in flight, through the libnbd client ``nbd_client.py`` (run by
   ``--client-python``, Debian's ``/usr/bin/python3``, which has python3-libnbd); timed
   inside the client after the handshake. Aim >= 0.4x.
3. ``seq write``: ``qemu-img bench -w --pattern=0xa5`` over a fresh empty image of
   ``--size`` on a writable export, 1 MiB requests at 1 and 4 in flight, one pass; the time
   is the client's whole process (connect, the writes and the flush qemu-img sends at close,
   which makes the server write its data and metadata back). Aim >= 0.5x.
4. ``block status``: a ``--map-size`` (100 GiB) qcow2 whose persistent bitmap ``b0`` (64 KiB
   granularity) has ``--dirty-runs`` (10,000) runs of 1..``--run-granules`` (4) granules, one
   in each equal slot of the disk, each run written by qemu-io (a pattern byte per run) while
   the bitmap recorded it; exported with ``-r -B b0``. The libnbd client walks
   ``qemu:dirty-bitmap:b0`` over the whole export (requests of up to 4 GiB - 1 MiB, each
   starting where the last reply ended) ``--status-passes`` (5) times on one connection;
   the first walk and the median of the others, ms. Aim <= 2x.
5. ``pull``: on the same connection, the reads of every dirty extent the first walk found
   (``--pull-depth``, 16, in flight, requests of at most 1 MiB); MiB/s. Aim >= 0.6x.
6. ``nbdcopy``: ``nbdcopy URI null:`` and ``nbdcopy URI FILE`` of the data image (MiB/s of
   the whole process), and ``nbdcopy URI null:`` of the sparse 100 GiB bitmap image (ms: it
   asks ``base:allocation`` and reads only the data). Aim >= 0.5x (<= 2x for the time).

Checks before the numbers count (exit 1 otherwise), on each server in an untimed pass before
the timed runs (which also warms the page cache): the whole data export read through the
client has the source's sha256 (with ``--cache none`` the image is evicted first and that read
must leave it out of the page cache, by ``fincore``: else the server does not read with
O_DIRECT and its rates do not compare); the random reads' digest equals the one computed from the
source file; the block status walk gives exactly the runs written (merged extents, on both
servers the same) and the pulled data equals each run's pattern. On every timed run: the
client and server succeed; after each write run the server, stopped with SIGTERM, exits 0,
``qemu-img check`` is clean and ``qemu-io`` reads the pattern back over the whole image; each
nbdcopy file has the source's sha256; each walk gives the expected extents.

``--tools dirtybits,qemu-nbd`` is the default; ``--tools qemu-nbd,qemu-nbd`` measures qemu-nbd
against itself (the spread between identical servers: a sanity check of the harness).

    .venv/bin/python bench/nbd_bench.py [--quick] [--runs 5] [--cases seq-read,rand-read,
        seq-write,status,copy] [--cache writeback|none] [--format qcow2|raw] [--size 1G]
        [--map-size 100G] [--dirty-runs 10000] [--tools dirtybits,qemu-nbd] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    KiB,
    MiB,
    Table,
    dirtybits_has,
    environment,
    fail,
    human_disk,
    human_size,
    median,
    need,
    parse_size,
    peers,
    run_timed,
    warm_bytecode,
    write_json,
)

from peers import nbd as nbd_peers
from peers.nbd import Served

CLIENT = Path(__file__).resolve().parent / "nbd_client.py"
GRAN = 64 * KiB
BITMAP = "b0"
CONTEXT = f"qemu:dirty-bitmap:{BITMAP}"
SEQ_DEPTHS = (1, 4)
RAND_DEPTHS = (1, 8)
WRITE_DEPTHS = (1, 4)
WRITE_PATTERN = 0xA5
PULL_REQUEST = MiB
CASES = ("seq-read", "rand-read", "seq-write", "status", "copy")
SERVERS = ("dirtybits", "qemu-nbd")


@dataclass
class Row:
    """One line of the table: a measure (``unit``; ``higher`` or ``lower`` is better) and the
    values of each side over the runs."""

    case: str
    unit: str
    better: str
    aim: float
    values: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Bench:
    args: argparse.Namespace
    scratch: Path
    labels: list[str]  # the sides' names in the table (the server tool, made unique)
    tools: dict[str, str]  # label -> "dirtybits" | "qemu-nbd"
    data: Path = Path()  # the exported data image
    source: Path = Path()  # its raw contents
    source_sha: str = ""
    map_image: Path = Path()
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (offset, length, byte)
    rows: dict[str, Row] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, case: str, unit: str, better: str, aim: float) -> Row:
        if case not in self.rows:
            self.rows[case] = Row(case, unit, better, aim, {s: [] for s in self.labels})
        return self.rows[case]


# ---------------------------------------------------------------- servers and clients
@contextlib.contextmanager
def serving(b: Bench, label: str, image: Path, fmt: str, *, readonly: bool = True,
            bitmap: str | None = None) -> Iterator[Served]:
    """A fresh server of ``label``'s tool on ``image`` (``peers.nbd.serve``: ``-t``, a fresh
    unix socket), with the options both get here; yields once it listens; stopped with
    SIGTERM afterwards (its exit status in ``proc.returncode``)."""
    with nbd_peers.serve(b.tools[label], image, fmt=fmt, readonly=readonly,
                         bitmaps=[bitmap] if bitmap else [],
                         options=["-e", "8", "--cache", b.args.cache], timeout=120) as srv:
        yield srv


def server_stderr(srv: Served) -> str:
    """What the server wrote to stderr so far (while it runs: ``serve`` keeps it beside the
    socket)."""
    assert srv.sock is not None
    path = srv.sock.parent / "stderr"
    return path.read_text(errors="replace").strip()[-600:] if path.exists() else ""


def client(b: Bench, server: Served, spec: dict[str, Any], timeout: float = 3600
           ) -> dict[str, Any]:
    """Run the libnbd client on ``server``: its JSON answer (timings taken inside it)."""
    os.sync()
    proc = subprocess.run([b.args.client_python, str(CLIENT)],
                          input=json.dumps({"socket": str(server.sock), **spec}),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"nbd_client {spec['mode']}: exit {proc.returncode}: "
                           f"{proc.stderr.strip()[-600:]}; server: {server_stderr(server)}")
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def timed_tool(argv: Sequence[str], what: str, server: Served) -> tuple[float, str]:
    """Run a client tool after ``os.sync()``: (wall seconds, output); fails on non-zero exit."""
    run = run_timed(argv)
    if not run.ok:
        raise RuntimeError(f"{what}: exit {run.returncode}: {run.tail()}; server: "
                           f"{server_stderr(server)}")
    return run.seconds, run.output


def qemu_img_bench(server: Served, count: int, depth: int, write: bool) -> tuple[float, float]:
    """``qemu-img bench`` of 1 MiB requests on the server: (seconds it reports, which leave
    out its start-up, connect and close; wall seconds of the whole process)."""
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", str(depth),
            "-s", "1M", "-S", "1M",
            *(["-w", f"--pattern={WRITE_PATTERN}"] if write else []), server.uri]
    wall, out = timed_tool(argv, "qemu-img bench", server)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(f"qemu-img bench said: {out[-400:]}")
    return float(m[1]), wall


def sh(*argv: str | Path, stdin: str | None = None) -> str:
    proc = peers.run(*argv, input=stdin, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {proc.returncode}: "
                           f"{(proc.stdout + proc.stderr).strip()[-400:]}")
    return proc.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- the images
def build_data(b: Bench) -> None:
    """``--size`` bytes of random data, as a raw source file and the exported image."""
    size = b.args.size
    b.source = b.scratch / "source.raw"
    with open(b.source, "wb") as f:
        for off in range(0, size, 16 * MiB):
            f.write(os.urandom(min(16 * MiB, size - off)))
    b.source_sha = sha256_file(b.source)
    b.data = b.scratch / f"data.{b.args.format}"
    if b.args.format == "qcow2":
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={GRAN}",
           b.source, b.data)
        sh("qemu-img", "check", "-q", b.data)
    else:
        shutil.copyfile(b.source, b.data)


def plan_runs(size: int, runs: int, max_granules: int, seed: int) -> list[tuple[int, int, int]]:
    """(offset, length, pattern byte) of each dirty run: one in each of ``runs`` equal slots,
    1..``max_granules`` granules long, never touching the next slot's."""
    rnd = random.Random(seed)
    slot = size // runs // GRAN  # granules
    if slot < max_granules + 2:
        raise SystemExit(f"nbd_bench: {runs} runs of up to {max_granules} granules do not fit "
                         f"{human_disk(size)}")
    plan = []
    for i in range(runs):
        k = rnd.randint(1, max_granules)
        g = i * slot + rnd.randrange(slot - max_granules - 1)
        plan.append((g * GRAN, k * GRAN, i % 255 + 1))
    return plan


def build_map(b: Bench) -> None:
    """The big sparse qcow2 whose bitmap b0 holds exactly the planned runs, each written
    (with its pattern byte) by one qemu-io process while b0 recorded."""
    a = b.args
    b.map_image = b.scratch / "map.qcow2"
    b.runs = plan_runs(a.map_size, a.dirty_runs, a.run_granules, a.seed)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={GRAN}", b.map_image,
       str(a.map_size))
    sh("qemu-img", "bitmap", "--add", "-g", str(GRAN), b.map_image, BITMAP)
    cmds = "".join(f"write -q -P {p} {off} {n}\n" for off, n, p in b.runs)
    sh("qemu-io", "-f", "qcow2", "-t", "writeback", b.map_image, stdin=cmds)
    sh("qemu-img", "check", "-q", b.map_image)
    listed = peers.qemu_bitmaps(b.map_image)
    if [(x["name"], x["granularity"]) for x in listed] != [(BITMAP, GRAN)]:
        raise RuntimeError(f"the map image's bitmaps are not as built: {listed}")


def expected_extents(b: Bench) -> list[list[int]]:
    out: list[list[int]] = []
    pos = 0
    for off, n, _ in b.runs:
        if off > pos:
            out.append([pos, off - pos, 0])
        out.append([off, n, 1])
        pos = off + n
    if pos < b.args.map_size:
        out.append([pos, b.args.map_size - pos, 0])
    return out


def expected_pull_digest(b: Bench) -> str:
    """What the client's ``dirty`` mode digests when it pulls the planned runs."""
    digests: dict[int, str] = {}
    for off, n, p in b.runs:
        for i in range(0, n, PULL_REQUEST):
            digests[off + i] = hashlib.sha256(bytes([p]) * min(PULL_REQUEST, n - i)).hexdigest()
    h = hashlib.sha256()
    for off in sorted(digests):
        h.update(f"{off}:{digests[off]}\n".encode())
    return h.hexdigest()


def expected_rand_digest(b: Bench, count: int) -> str:
    """The client's ``rand`` digest, computed from the source file (same seed, same
    offsets)."""
    rnd = random.Random(b.args.seed)
    slots = b.args.size // (4 * KiB)
    h = hashlib.sha256()
    with open(b.source, "rb") as f:
        for _ in range(count):
            off = rnd.randrange(slots) * 4 * KiB
            h.update(f"{off}:".encode())
            h.update(os.pread(f.fileno(), 4 * KiB, off))
    return h.hexdigest()


# ---------------------------------------------------------------- untimed checks
def evict(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (after a sync: none are dirty)."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (``fincore``), None without fincore."""
    if shutil.which("fincore") is None:
        return None
    out = peers.run("fincore", "--bytes", "--noheadings", "--output", "RES", path).stdout
    return int(out.split()[0]) if out.strip() else None


def verify(b: Bench, label: str) -> None:
    """The untimed pass on one server: data, random reads, bitmap walk and pull all as
    expected (it also warms the page cache for the timed runs)."""
    a = b.args
    if {"seq-read", "rand-read", "copy"} & set(a.cases):
        if a.cache == "none":
            evict(b.data)
        with serving(b, label, b.data, a.format) as srv:
            got = client(b, srv, {"mode": "read", "length": MiB, "depth": 1, "verify": True})
            if got["digest"] != b.source_sha:
                b.problems.append(f"{label}: the data export's sha256 is not the source's")
            cached = resident(b.data) if a.cache == "none" else None
            if cached is not None and cached > b.data.stat().st_size // 2:
                b.problems.append(f"{label}: --cache none, yet reading the export left "
                                  f"{cached / MiB:.0f} MiB of the image in the page cache: "
                                  "it does not read with O_DIRECT, the rates do not compare")
            got = client(b, srv, {"mode": "rand", "length": 4 * KiB, "depth": 1,
                                  "count": a.rand_ops, "seed": a.seed, "verify": True})
            if got["digest"] != expected_rand_digest(b, a.rand_ops):
                b.problems.append(f"{label}: the random 4k reads returned other data")
            if not got.get("multi_conn"):
                b.notes.append(f"{label} does not advertise multi-conn on a read-only export: "
                               "nbdcopy uses one connection")
    if {"status", "copy"} & set(a.cases):
        with serving(b, label, b.map_image, "qcow2", bitmap=BITMAP) as srv:
            got = client(b, srv, {"mode": "dirty", "context": CONTEXT, "passes": 1,
                                  "depth": a.pull_depth, "max_request": PULL_REQUEST,
                                  "verify": True})
            if got["extents"] != expected_extents(b):
                b.problems.append(f"{label}: the walk of {CONTEXT} is not the runs written "
                                  f"({len(got['extents'])} merged extents, "
                                  f"{len(expected_extents(b))} expected)")
            if got["digest"] != expected_pull_digest(b):
                b.problems.append(f"{label}: the pulled dirty data is not what was written")


# ---------------------------------------------------------------- the timed cases
def case_seq_read(b: Bench, label: str) -> None:
    count = b.args.seq_bytes // MiB
    for depth in SEQ_DEPTHS:
        with serving(b, label, b.data, b.args.format) as srv:
            seconds, _ = qemu_img_bench(srv, count, depth, write=False)
        b.row(f"seq read 1M, {depth} in flight", "MiB/s", "higher", 0.6).values[label].append(
            count / seconds)


def case_rand_read(b: Bench, label: str) -> None:
    for depth in RAND_DEPTHS:
        with serving(b, label, b.data, b.args.format) as srv:
            got = client(b, srv, {"mode": "rand", "length": 4 * KiB, "depth": depth,
                                  "count": b.args.rand_ops, "seed": b.args.seed})
        b.row(f"random read 4k, {depth} in flight", "MiB/s", "higher", 0.4).values[
            label].append(got["bytes"] / MiB / got["seconds"])


def fresh_target(b: Bench) -> Path:
    target = b.scratch / f"write.{b.args.format}"
    target.unlink(missing_ok=True)
    if b.args.format == "qcow2":
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={GRAN}", target,
           str(b.args.size))
    else:
        with open(target, "wb") as f:
            f.truncate(b.args.size)
    return target


def case_seq_write(b: Bench, label: str) -> None:
    size = b.args.size
    for depth in WRITE_DEPTHS:
        target = fresh_target(b)
        with serving(b, label, target, b.args.format, readonly=False) as srv:
            _, wall = qemu_img_bench(srv, size // MiB, depth, write=True)
        if srv.proc.returncode != 0:
            b.problems.append(f"{label}: the writable server exited {srv.proc.returncode} "
                              "on SIGTERM")
        try:
            if b.args.format == "qcow2":
                sh("qemu-img", "check", "-q", target)
            out = sh("qemu-io", "-r", "-f", b.args.format, "-c",
                     f"read -q -P {WRITE_PATTERN} 0 {size}", target)
            if "fail" in out.lower():
                raise RuntimeError(out.strip()[-300:])
        except RuntimeError as exc:
            b.problems.append(f"{label}: seq write, {depth} in flight: the image is wrong: "
                              f"{exc}")
        b.row(f"seq write 1M, {depth} in flight", "MiB/s", "higher", 0.5).values[label].append(
            size / MiB / wall)
        target.unlink()


def case_status(b: Bench, label: str) -> None:
    a = b.args
    with serving(b, label, b.map_image, "qcow2", bitmap=BITMAP) as srv:
        got = client(b, srv, {"mode": "dirty", "context": CONTEXT, "passes": a.status_passes,
                              "depth": a.pull_depth, "max_request": PULL_REQUEST})
    if got["extents"] != expected_extents(b):
        b.problems.append(f"{label}: a timed walk of {CONTEXT} gave other extents")
    walks = got["status_seconds"]
    b.row("block status b0, first walk", "ms", "lower", 2.0).values[label].append(
        walks[0] * 1000)
    if len(walks) > 1:
        b.row("block status b0, later walks", "ms", "lower", 2.0).values[label].append(
            median(walks[1:]) * 1000)
    b.row(f"pull dirty extents, {a.pull_depth} in flight", "MiB/s", "higher", 0.6).values[
        label].append(got["pull_bytes"] / MiB / got["pull_seconds"])
    b.notes.append(f"{label}: a walk took {got['replies']} block status replies of "
                   f"{got['sent']} extents in all; the pull {got['pull_requests']} reads")


def case_copy(b: Bench, label: str) -> None:
    a = b.args
    with serving(b, label, b.data, a.format) as srv:
        wall, _ = timed_tool(["nbdcopy", srv.uri, "null:"], "nbdcopy to null:", srv)
    b.row("nbdcopy data -> null:", "MiB/s", "higher", 0.5).values[label].append(
        a.size / MiB / wall)
    out = b.scratch / "copy.raw"
    out.unlink(missing_ok=True)
    with serving(b, label, b.data, a.format) as srv:
        wall, _ = timed_tool(["nbdcopy", srv.uri, str(out)], "nbdcopy to a file", srv)
    if sha256_file(out) != b.source_sha:
        b.problems.append(f"{label}: nbdcopy's file is not the source")
    out.unlink()
    b.row("nbdcopy data -> file", "MiB/s", "higher", 0.5).values[label].append(
        a.size / MiB / wall)
    with serving(b, label, b.map_image, "qcow2", bitmap=BITMAP) as srv:
        wall, _ = timed_tool(["nbdcopy", srv.uri, "null:"], "nbdcopy of the map image", srv)
    b.row(f"nbdcopy {human_disk(a.map_size)} sparse -> null:", "ms", "lower", 2.0).values[
        label].append(wall * 1000)


CASE_FUNCS: dict[str, Callable[[Bench, str], None]] = {
    "seq-read": case_seq_read, "rand-read": case_rand_read, "seq-write": case_seq_write,
    "status": case_status, "copy": case_copy}


# ---------------------------------------------------------------- report
def report(b: Bench) -> list[dict[str, Any]]:
    a, (one, two) = b.args, b.labels
    print(f"\nmedians of {a.runs} run(s); ratio = {one} / {two}; MiB/s: higher is better, "
          "ms: lower is better")
    table = Table(["case", f"{one}", f"{two}", "ratio", "aim"], [40, 12, 12, 7, 13])
    records = []
    for row in b.rows.values():
        med = {s: median(v) if v else None for s, v in row.values.items()}
        ratio = med[one] / med[two] if med[one] is not None and med[two] else None
        if ratio is None:
            met = None
        else:
            met = ratio >= row.aim if row.better == "higher" else ratio <= row.aim
        aim = f"{'>=' if row.better == 'higher' else '<='}{row.aim:g}x "
        aim += "-" if met is None else "yes" if met else "NO"
        table.row(f"{row.case} ({row.unit})",
                  *("-" if med[s] is None else f"{med[s]:,.1f}" for s in b.labels),
                  "-" if ratio is None else f"{ratio:.2f}x", aim)
        records.append({"case": row.case, "unit": row.unit, "better": row.better,
                        "values": row.values, "median": med, "ratio": ratio, "aim": row.aim,
                        "aim_met": met})
    return records


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="CI sizes: a 32M data image, 200 dirty runs, one run of each case")
    p.add_argument("--runs", type=int, help="timed runs of each case per server (default 5)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated, of {','.join(CASES)} (default all)")
    p.add_argument("--tools", default="dirtybits,qemu-nbd",
                   help="the two servers, compared first / second (qemu-nbd,qemu-nbd: the "
                        "harness's own spread)")
    p.add_argument("--cache", choices=("writeback", "none"), default="writeback",
                   help="--cache of both servers")
    p.add_argument("--format", choices=("qcow2", "raw"), default="qcow2",
                   help="format of the data and write images (the bitmap image is qcow2)")
    p.add_argument("--size", type=parse_size, help="data image size (default 1G; quick 32M)")
    p.add_argument("--seq-bytes", type=parse_size,
                   help="bytes read per sequential read run (default 4G; quick 64M)")
    p.add_argument("--rand-ops", type=int, help="random 4k reads per run (default 20000; "
                   "quick 500)")
    p.add_argument("--map-size", type=parse_size, default=100 << 30,
                   help="virtual size of the bitmap image (default 100G)")
    p.add_argument("--dirty-runs", type=int, help="dirty runs in b0 (default 10000; quick 200)")
    p.add_argument("--run-granules", type=int, help="longest dirty run in 64k granules "
                   "(default 4: ~1.5 GiB dirty over 10,000 runs; quick 2)")
    p.add_argument("--status-passes", type=int, help="block status walks per connection "
                   "(default 5; quick 2)")
    p.add_argument("--pull-depth", type=int, default=16, help="reads in flight in the pull")
    p.add_argument("--client-python", default="/usr/bin/python3",
                   help="the interpreter with python3-libnbd that runs nbd_client.py")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /var/tmp)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    a = p.parse_args(argv)
    q = a.quick
    a.runs = a.runs or (1 if q else 5)
    a.size = a.size or (32 * MiB if q else 1 << 30)
    a.size -= a.size % MiB
    a.seq_bytes = a.seq_bytes or (64 * MiB if q else 4 << 30)
    a.rand_ops = a.rand_ops or (500 if q else 20000)
    a.dirty_runs = a.dirty_runs or (200 if q else 10000)
    a.run_granules = a.run_granules or (2 if q else 4)
    a.status_passes = a.status_passes or (2 if q else 5)
    a.cases = [c for c in a.cases.split(",") if c]
    if bad := set(a.cases) - set(CASES):
        p.error(f"unknown cases {sorted(bad)}: choose from {','.join(CASES)}")
    a.tools = a.tools.split(",")
    if len(a.tools) != 2 or set(a.tools) - set(SERVERS):
        p.error(f"--tools takes two of {','.join(SERVERS)}")
    if a.size < MiB:
        p.error("--size must be at least 1M")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    for tool in ("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy"):
        need(tool)
    if subprocess.run([a.client_python, "-c", "import nbd"], capture_output=True).returncode:
        sys.exit(f"nbd_bench: {a.client_python} cannot import nbd (apt-get install "
                 "python3-libnbd)")
    if "dirtybits" in a.tools and not dirtybits_has("nbd"):
        sys.exit("nbd_bench: this dirtybits has no `nbd` (try --tools qemu-nbd,qemu-nbd)")
    labels = a.tools if a.tools[0] != a.tools[1] else [f"{t}#{i + 1}"
                                                        for i, t in enumerate(a.tools)]
    if a.dir:
        a.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-nbd-", dir=a.dir or "/var/tmp"))
    records: list[dict[str, Any]] = []
    b: Bench | None = None
    problems: list[str] = []
    try:
        warm_bytecode(scratch)
        b = Bench(a, scratch, labels, dict(zip(labels, a.tools, strict=True)))
        print(f"nbd_bench: {labels[0]} against {labels[1]}, --cache {a.cache}; data image "
              f"{human_size(a.size)} {a.format} of random data; bitmap image "
              f"{human_disk(a.map_size)} qcow2, b0 with {a.dirty_runs} runs of 1-"
              f"{a.run_granules} x 64k; {a.runs} run(s) per case; scratch {scratch}",
              flush=True)
        if {"seq-read", "rand-read", "copy"} & set(a.cases):
            build_data(b)
        if {"status", "copy"} & set(a.cases):
            build_map(b)
            dirty = sum(n for _, n, _ in b.runs)
            print(f"  b0: {len(b.runs)} runs, {dirty / MiB:,.1f} MiB dirty", flush=True)
        for label in labels:
            verify(b, label)
        if not b.problems:
            for case in a.cases:
                print(f"  {case} ...", flush=True)
                for rep in range(a.runs):
                    for label in labels if rep % 2 == 0 else labels[::-1]:
                        CASE_FUNCS[case](b, label)
            records = report(b)
        problems = b.problems
        for note in dict.fromkeys(b.notes):
            print(f"  note: {note}")
    except (RuntimeError, OSError, AssertionError, subprocess.SubprocessError) as exc:
        problems = [*(b.problems if b else []), f"{type(exc).__name__}: {exc}"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for problem in problems:
        fail(problem)
    write_json(a.json, {
        "benchmark": "nbd", "environment": environment(), "ok": not problems,
        "problems": problems, "tools": labels,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "notes": list(dict.fromkeys(b.notes)) if b else [],
        "results": records,
    })
    if problems:
        fail("nbd_bench: results above are INVALID (a run failed or the results differ)")
        return 1
    print("nbd_bench: every run succeeded and every check passed (the data and extents each "
          "server served, the written images, the copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
