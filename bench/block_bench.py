#!/usr/bin/env python3
"""The block layer in-process (issue 12's speed section): this checkout against an older
revision of dirtybits in the same run (``--baseline-rev``, by default c83ffba, the block layer
before the bitmap registry and the block thread), and against qemu-io where QEMU has a
counterpart.

Three parts (sizes are the defaults; ``--quick`` shrinks them):

1. **Tracking cost per write.** ``node.write`` of 4 KiB and of 64 KiB at random aligned offsets
   through ``dirtybits.open(...)`` (cache writeback, a checkpoint policy with no timers and no
   threshold, so nothing but the writes runs) on 256 MiB qcow2 images whose data is
   preallocated (``preallocation=full``: no cluster allocation, the engine's cost is steady)
   with 0, 1 and 8 persistent enabled bitmaps (64 KiB granularity, added by qemu-img). The
   counts are measured in interleaved batches, their order rotating, in one process per side
   and session. Printed: µs per write for each count, the cost of tracking (t[n] - t[0]: the
   median of the differences of paired batches) and t[n] / t[0]. Aims (issue 12): the cost no
   worse than the old code's (the issue measured 2.3 µs), and 8 bitmaps / none <= 1.05x for
   64 KiB writes. Beside them qemu-io does the same writes on the same images
   (``write -q OFF LEN`` commands, ``-t unsafe`` so that neither side flushes in what is timed,
   ``-i io_uring`` when it works: the default thread pool's CPU time per write varies 2-4x from
   run to run on a busy machine; ``--qemu-aio threads`` for it): its per-write figure is (run
   with N writes - run with 10 of them) / (N - 10), which cancels start-up, open and close.
2. **The asyncio facade's round trip.** A 4 KiB read (page cache) through
   ``await layer.call(node.read, off, 4096)`` against a direct ``node.read`` (µs per call), and
   4 asyncio tasks reading concurrently through the facade (reads/s). QEMU has no in-process
   facade to compare with (qemu-io's ``aio_read`` is a different thing: no thread handoff), so
   this part compares with the direct call only. The baseline revision has no facade; its
   direct read is shown.
3. **``x-debug-block-dirty-bitmap-sha256`` of a populated 16 TiB bitmap.** A qcow2 of virtual
   size 16 TiB (64 KiB clusters) with one bitmap at 64 KiB granularity (32 MiB of bits), 1% of
   its granules dirty at random plus 16 long runs, built in-process and checked with
   ``qemu-img check``. On a fresh open: the first query (``node.bitmaps.sha256``, which reads
   the bitmap) and a second one (in memory); aim: the second >= 10x faster. The baseline's
   ``node.load_bitmap(name).sha256()`` twice (it re-reads every cluster each time). QEMU has
   no command line for the sha256; beside it stands what loading the bitmap costs qemu-io at
   a read-only open (``qemu-io -r -c 'read 0 512'`` on the image minus the same on a
   bitmap-less 16 TiB twin, paired runs).

The machine these run on is usually shared (2 cores, other jobs): wall clock then includes
time other processes had the CPU. So the in-process parts also report CPU time (the thread's
for the writes, the process's, block thread included, for the facade and sha256) and qemu-io's
CPU time comes from ``wait4``'s rusage (all its threads); the tables say which is which, and
every figure is the median of several samples. Every timed batch and process starts after
``os.sync()``; the page cache is not dropped (the bitmap reads of part 3 hit the cache). The
sides' order rotates from session to session. The garbage collector is off inside a timed
batch.

Checks (the bench fails, exit 1, otherwise): every worker and qemu-io run exits 0; each
in-process side really runs the revision it names (``dirtybits.__file__``) and tracks n
bitmaps on the n-bitmap image. Part 1: before each side's session the bitmaps are cleared
(``qemu-img bitmap --clear``), after it ``qemu-img check`` is clean, ``qemu-img info`` lists
the n bitmaps ``auto`` and not in use, and every bitmap holds exactly the granules that
side's writes touched. Part 2: the facade's reads return the direct reads' bytes. Part 3:
every query returns the sha256 of the bits written, and the image is unchanged afterwards.

    .venv/bin/python bench/block_bench.py [--quick] [--sessions N] [--parts track,facade,sha]
        [--baseline-rev REV|none] [--span 256M] [--big-size 16T] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    KiB,
    Table,
    argv_fits,
    bitmap_digests,
    environment,
    fail,
    human_disk,
    make_bitmap_image,
    need,
    parse_size,
    qemu_bitmap_list,
    qemu_img_check,
    write_json,
)

DEFAULT_BASELINE = "c83ffba"
GRAN = 64 * KiB
COUNTS = (0, 1, 8)
SIZES = (4 * KiB, 64 * KiB)
QEMU_BASE = 10  # writes in qemu-io's short run, subtracted from the long one
NEW_SRC = ROOT / "src"


# ================================================================== the worker (one side)
# Runs in a child process whose PYTHONPATH is the side's src/ (this checkout's or the exported
# baseline's): it imports nothing of dirtybits before the path is set.
def _policy() -> Any:
    from dirtybits.block.checkpoint import CheckpointPolicy

    return CheckpointPolicy(interval=None, idle=None, threshold_bits=None)


def _work_track(spec: dict[str, Any]) -> dict[str, Any]:
    import dirtybits

    pol = _policy()
    nodes = {int(n): dirtybits.open(p, "qcow2", checkpoint=pol)
             for n, p in spec["images"].items()}
    out: dict[str, Any] = {"tracked": {str(n): len(node.tracked_bitmaps)
                                       for n, node in nodes.items()},
                           "cpu": {}, "wall": {}}
    try:
        for size_key, batches in spec["batches"].items():
            size = int(size_key)
            data = os.urandom(size)
            for node in nodes.values():  # in_use set and synced, caches warm: not timed
                for off in batches[0][:spec["warm"]]:
                    node.write(off, data)
            cpu: dict[str, list[float]] = {str(n): [] for n in nodes}
            wall: dict[str, list[float]] = {str(n): [] for n in nodes}
            counts = sorted(nodes)
            for b, offsets in enumerate(batches):
                for n in counts[b % len(counts):] + counts[:b % len(counts)]:
                    write = nodes[n].write
                    os.sync()
                    gc.disable()
                    c0, t0 = time.thread_time(), time.perf_counter()
                    for off in offsets:
                        write(off, data)
                    t1, c1 = time.perf_counter(), time.thread_time()
                    gc.enable()
                    wall[str(n)].append((t1 - t0) / len(offsets) * 1e6)
                    cpu[str(n)].append((c1 - c0) / len(offsets) * 1e6)
            out["cpu"][size_key], out["wall"][size_key] = cpu, wall
    finally:
        for node in nodes.values():
            node.close()
    return out


def _work_facade(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    import dirtybits

    layer_cls: Any = None  # the baseline has no facade
    try:
        from dirtybits.block.aio import AsyncBlockLayer

        layer_cls = AsyncBlockLayer
    except ImportError:
        pass
    batches: list[list[int]] = spec["batches"]
    tasks = spec["tasks"]
    samples: dict[str, dict[str, list[float]]] = {
        k: {"wall": [], "cpu": []} for k in ("direct", "facade", "concurrent")}

    def timed(kind: str, n: int, t0: float, c0: float) -> None:
        samples[kind]["wall"].append((time.perf_counter() - t0) / n * 1e6)
        samples[kind]["cpu"].append((time.process_time() - c0) / n * 1e6)

    if layer_cls is None:
        node = dirtybits.open(spec["image"], "qcow2", checkpoint=_policy())
        try:
            for offsets in batches:
                os.sync()
                gc.disable()
                c0, t0 = time.process_time(), time.perf_counter()
                for off in offsets:
                    node.read(off, 4096)
                timed("direct", len(offsets), t0, c0)
                gc.enable()
        finally:
            node.close()
        return {"facade": False, "samples": samples, "same_data": True}

    async def main() -> bool:
        layer = layer_cls()
        node = await layer.open(spec["image"], "qcow2", checkpoint=_policy())
        same = all([await layer.call(node.read, off, 4096) == node.read(off, 4096)
                    for off in batches[0]])

        async def reader(part: list[int]) -> list[bytes]:
            return [await layer.call(node.read, off, 4096) for off in part]

        try:
            for b, offsets in enumerate(batches):
                kinds = ["direct", "facade", "concurrent"]
                for kind in kinds[b % 3:] + kinds[:b % 3]:
                    os.sync()
                    gc.disable()
                    c0, t0 = time.process_time(), time.perf_counter()
                    if kind == "direct":
                        for off in offsets:
                            node.read(off, 4096)
                    elif kind == "facade":
                        for off in offsets:
                            await layer.call(node.read, off, 4096)
                    else:
                        parts = await asyncio.gather(
                            *(reader(offsets[i::tasks]) for i in range(tasks)))
                        same &= sum(len(p) for p in parts) == len(offsets)
                    timed(kind, len(offsets), t0, c0)
                    gc.enable()
        finally:
            await layer.close(node)
            layer.owner.stop()
        return same

    same = asyncio.run(main())
    return {"facade": True, "samples": samples, "same_data": same}


def _old_query(node: Any, name: str) -> str:
    return str(node.load_bitmap(name).sha256())


def _work_sha(spec: dict[str, Any]) -> dict[str, Any]:
    import functools

    import dirtybits

    rounds = []
    for r in range(spec["rounds"] + 1):  # round 0 warms lazy imports and caches: not kept
        node = dirtybits.open(spec["image"], "qcow2", checkpoint=_policy())
        try:
            registry = getattr(node, "bitmaps", None)
            if registry is not None and hasattr(registry, "sha256"):
                api = "node.bitmaps.sha256(name)"
                query = functools.partial(registry.sha256, spec["bitmap"])
            else:
                api = "node.load_bitmap(name).sha256()"
                query = functools.partial(_old_query, node, spec["bitmap"])
            one: dict[str, Any] = {"api": api}
            for which in ("first", "second"):
                os.sync()
                c0, t0 = time.process_time(), time.perf_counter()
                digest = str(query())
                t1, c1 = time.perf_counter(), time.process_time()
                one[which] = {"wall": (t1 - t0) * 1e3, "cpu": (c1 - c0) * 1e3,
                              "sha256": digest}
            if r:
                rounds.append(one)
        finally:
            node.close()
    return {"rounds": rounds}


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "track": _work_track, "facade": _work_facade, "sha": _work_sha}


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["src"])
    import dirtybits

    where = Path(dirtybits.__file__).resolve()
    if not where.is_relative_to(Path(spec["src"]).resolve()):
        print(f"block_bench worker: imported {where}, not from {spec['src']}", file=sys.stderr)
        return 3
    result = WORKERS[spec["part"]](spec)
    result["dirtybits"] = str(where)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ================================================================== the driver
class Side:
    """One in-process side: a name and the ``src/`` its worker imports dirtybits from."""

    def __init__(self, name: str, src: Path, label: str):
        self.name, self.src, self.label = name, src, label

    def run(self, scratch: Path, part: str, spec: dict[str, Any]) -> dict[str, Any]:
        spec_path = scratch / f"spec-{self.name}-{part}.json"
        result_path = scratch / f"result-{self.name}-{part}.json"
        result_path.unlink(missing_ok=True)
        spec_path.write_text(json.dumps({**spec, "part": part, "src": str(self.src),
                                         "result": str(result_path)}))
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                               str(spec_path)], env=env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0 or not result_path.exists():
            raise WorkerError(f"{self.label} worker ({part}) exited {proc.returncode}:\n"
                              f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
        result: dict[str, Any] = json.loads(result_path.read_text())
        return result


class WorkerError(Exception):
    pass


def export_baseline(rev: str, scratch: Path) -> tuple[Path | None, str]:
    """``git archive REV src`` into the scratch directory: (its src/, a note for the
    output). None when the checkout is no git repository or lacks REV."""
    if rev.lower() in ("", "none", "no"):
        return None, "baseline skipped (--baseline-rev none)"
    probe = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                            f"{rev}^{{commit}}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, (f"baseline skipped: {ROOT} is not a git checkout holding revision "
                      f"{rev} (fetch it, or pass --baseline-rev)")
    full = probe.stdout.strip()
    dest = scratch / f"baseline-{full[:12]}"
    dest.mkdir()
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", full, "src"],
                               stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0 or not (dest / "src" / "dirtybits").is_dir():
        return None, f"baseline skipped: git archive {full[:12]} src failed"
    subject = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%s", full],
                             capture_output=True, text=True).stdout.strip()
    if len(subject) > 60:
        subject = subject[:59] + "…"
    return dest / "src", f"baseline: {full[:12]} \"{subject}\", src/ exported by git archive"


def run_child(argv: Sequence[str]) -> tuple[int, float, float, str]:
    """One process after ``os.sync()``: (exit code, wall s, CPU s of all its threads (rusage
    from wait4), output tail)."""
    os.sync()
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")[-2000:]
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, text


def qemu_io(image: Path, commands: Sequence[str], *opts: str) -> tuple[float, float]:
    """qemu-io with these commands (``-c`` each, or stdin when they do not fit ARG_MAX):
    (wall s, CPU s). Raises ``WorkerError`` when it fails."""
    base = ["qemu-io", "-f", "qcow2", *opts]
    argv = [*base, *(a for c in commands for a in ("-c", c)), str(image)]
    if argv_fits(argv):
        code, wall, cpu, out = run_child(argv)
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".cmds") as f:
            f.write("".join(c + "\n" for c in commands))
            f.flush()
            code, wall, cpu, out = run_child(["sh", "-c", 'exec "$@" < "$0"', f.name,
                                              *base, str(image)])
    if code != 0 or "error" in out.lower() or "failed" in out.lower():
        raise WorkerError(f"qemu-io {' '.join(opts)} on {image.name} exited {code}: {out}")
    return wall, cpu


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    k %= len(items)
    return [*items[k:], *items[:k]]


def med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def paired_cost(samples: dict[int, list[float]], n: int) -> float | None:
    """t[n] - t[0]: the median of the differences of paired samples."""
    pairs = list(zip(samples.get(n, []), samples.get(0, []), strict=False))
    return statistics.median([a - b for a, b in pairs]) if pairs else None


def fmt_us(v: float | None, sign: bool = False) -> str:
    return "-" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")


def fmt_x(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def shared_note() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"machine: {os.cpu_count()} CPUs, load average {load} at the start; it is shared "
            "with other jobs, so wall clock includes time others had the CPU: CPU-time "
            "figures are the steadier ones; every figure is a median of several samples")


# ------------------------------------------------------------------ part 1
def make_track_images(scratch: Path, span: int) -> dict[int, Path]:
    """Per bitmap count a qcow2 with its data preallocated (written zeros: no allocation,
    no holes), the bitmaps added by qemu-img as a user would."""
    images = {}
    for n in COUNTS:
        path = scratch / f"track-{n}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        "cluster_size=64k,preallocation=full", str(path), str(span)], check=True)
        for i in range(n):
            subprocess.run(["qemu-img", "bitmap", "-f", "qcow2", "--add", str(path), f"b{i}"],
                           check=True)
        images[n] = path
    return images


def clear_bitmaps(images: dict[int, Path]) -> None:
    for n, path in images.items():
        for i in range(n):
            subprocess.run(["qemu-img", "bitmap", "-f", "qcow2", "--clear", str(path), f"b{i}"],
                           check=True)


def expected_sha(span: int, writes: dict[int, list[int]]) -> str:
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

    bm = DirtyBitmap(span, GRAN)
    for size, offsets in writes.items():
        for off in offsets:
            bm.set(off, size)
    return bm.sha256()


def verify_track(images: dict[int, Path], expected: str, who: str) -> list[str]:
    problems = []
    for n, path in images.items():
        if (p := qemu_img_check(path)) is not None:
            problems.append(p)
        listed = qemu_bitmap_list(path)
        if len(listed) != n or any(b["flags"] != ["auto"] or b["granularity"] != GRAN
                                   for b in listed):
            problems.append(f"{path.name}: qemu-img info shows {listed}")
        got = bitmap_digests(path)
        if any(d != expected for d in got.values()):
            problems.append(f"{path.name}: bitmaps {got} do not hold exactly the granules "
                            f"written (sha256 {expected})")
    return [f"after {who}: {p}" for p in problems]


def qemu_aio_opts(args: argparse.Namespace, image: Path, notes: list[str]) -> list[str]:
    """``-i io_uring`` when asked, or by default when this qemu-io has it: its CPU time per
    write is steady, where the default thread pool's varies by 2-4x from run to run on a
    busy machine (workers woken and put to sleep per request)."""
    if args.qemu_aio == "threads":
        return []
    try:
        qemu_io(image, ["read -q 0 512"], "-t", "unsafe", "-i", "io_uring")
    except WorkerError as exc:
        if args.qemu_aio == "io_uring":
            raise SystemExit(f"block_bench: qemu-io -i io_uring does not work here: {exc}"
                             ) from None
        notes.append("qemu-io -i io_uring failed here: qemu-io runs with its default thread "
                     "pool (expect noisy CPU figures)")
        print(notes[-1], flush=True)
        return []
    return ["-i", "io_uring"]


def part_track(args: argparse.Namespace, scratch: Path, sides: list[Side],
               records: list[dict[str, Any]], notes: list[str]) -> bool:
    span = args.span
    images = make_track_images(scratch, span)
    rnd = random.Random(args.seed)
    names = [s.name for s in sides] + ["qemu"]
    cpu: dict[tuple[str, int, int], list[float]] = {}
    wall: dict[tuple[str, int, int], list[float]] = {}
    problems: list[str] = []
    qopts = ["-t", "unsafe", *qemu_aio_opts(args, images[0], notes)]
    print(f"\n1. tracking cost per write: node.write at random aligned offsets in "
          f"{human_disk(span)} of preallocated qcow2 data, 0/1/8 auto bitmaps at 64k, "
          f"{args.sessions} session(s) x {args.batches} batches of {args.batch[4096]} (4k) / "
          f"{args.batch[65536]} (64k) writes per side; qemu-io {' '.join(qopts)}: "
          f"{args.qemu_writes[4096]} (4k) / {args.qemu_writes[65536]} (64k) writes "
          f"minus {QEMU_BASE}, {args.qemu_pairs} pair(s) per session", flush=True)
    try:
        for session in range(args.sessions):
            batches = {size: [[rnd.randrange(span // size) * size
                               for _ in range(args.batch[size])]
                              for _ in range(args.batches)] for size in SIZES}
            qlists = {size: [rnd.randrange(span // size) * size
                             for _ in range(args.qemu_writes[size])] for size in SIZES}
            for who in rotate(names, session):
                clear_bitmaps(images)
                if who == "qemu":
                    written = qlists
                    for size in SIZES:
                        cmds = [f"write -q {off} {size}" for off in qlists[size]]
                        per = 1e6 / (len(cmds) - QEMU_BASE)
                        for pair in range(args.qemu_pairs):
                            for n in rotate(COUNTS, session + pair):
                                w0, c0 = qemu_io(images[n], cmds[:QEMU_BASE], *qopts)
                                w1, c1 = qemu_io(images[n], cmds, *qopts)
                                cpu.setdefault(("qemu", size, n), []).append((c1 - c0) * per)
                                wall.setdefault(("qemu", size, n), []).append((w1 - w0) * per)
                else:
                    side = next(s for s in sides if s.name == who)
                    res = side.run(scratch, "track", {
                        "images": {str(n): str(p) for n, p in images.items()},
                        "batches": {str(size): b for size, b in batches.items()},
                        "warm": args.warm})
                    if res["tracked"] != {str(n): n for n in COUNTS}:
                        problems.append(f"{side.label} tracks {res['tracked']} bitmaps on the "
                                        "0/1/8-bitmap images")
                    for size in SIZES:
                        for n in COUNTS:
                            cpu.setdefault((who, size, n), []).extend(
                                res["cpu"][str(size)][str(n)])
                            wall.setdefault((who, size, n), []).extend(
                                res["wall"][str(size)][str(n)])
                    written = {size: [o for b in batches[size] for o in b] for size in SIZES}
                problems += verify_track(images, expected_sha(span, written),
                                         f"{who} session {session + 1}")
                if problems:
                    raise WorkerError("; ".join(problems))
    except WorkerError as exc:
        fail(f"block_bench part 1: {exc}")
        for path in images.values():
            path.unlink(missing_ok=True)
        return False
    for path in images.values():
        path.unlink(missing_ok=True)

    labels = {s.name: s.label for s in sides} | {"qemu": "qemu-io"}
    has_old = any(s.name == "old" for s in sides)
    print("CPU µs per write (median; in-process: the writing thread's CPU time; qemu-io: "
          "rusage of all its threads)")
    table = Table(["write", "bitmaps", "new µs", "old µs", "qemu µs", "new +µs", "old +µs",
                   "qemu +µs", "new n/0", "old n/0", "qemu n/0", "aim"],
                  [5, 7, 7, 7, 7, 7, 7, 8, 7, 7, 8, 30])
    for size in SIZES:
        for n in COUNTS:
            m = {w: med(cpu.get((w, size, n), [])) for w in names}
            m0 = {w: med(cpu.get((w, size, 0), [])) for w in names}
            cost = {w: paired_cost({c: cpu.get((w, size, c), []) for c in COUNTS}, n)
                    for w in names}
            aim = ""
            met = None
            if n:
                new_cost, old_cost = cost.get("new"), cost.get("old")
                parts = []
                if new_cost is not None:
                    parts.append(f"{new_cost:+.2f}µs " + ("<=" if new_cost <= 2.3 else ">")
                                 + " 2.3")
                    met = new_cost <= 2.3
                    if old_cost is not None:
                        better = new_cost <= old_cost
                        parts.append(("<=" if better else ">") + " old")
                if size == 64 * KiB and n == 8 and m["new"] and m0["new"]:
                    r8 = m["new"] / m0["new"]
                    parts.append(f"{r8:.2f}x " + ("<=" if r8 <= 1.05 else ">") + " 1.05x")
                    met = bool(met) and r8 <= 1.05
                aim = ("met: " if met else "MISSED: ") + ", ".join(parts) if parts else ""
            table.row(f"{size // KiB}k", str(n), *(fmt_us(m[w]) for w in ("new", "old", "qemu")),
                      *(fmt_us(cost[w], True) if n else "-" for w in ("new", "old", "qemu")),
                      *(fmt_x(m[w], m0[w]) if n else "-" for w in ("new", "old", "qemu")),
                      aim)
            records.append({
                "part": "track", "write": size, "bitmaps": n,
                "cpu_us": {labels[w]: cpu.get((w, size, n), []) for w in names},
                "wall_us": {labels[w]: wall.get((w, size, n), []) for w in names},
                "median_cpu_us": {labels[w]: m[w] for w in names},
                "median_wall_us": {labels[w]: med(wall.get((w, size, n), [])) for w in names},
                "tracking_cost_cpu_us": {labels[w]: cost[w] if n else 0.0 for w in names},
                "vs_own_0": {labels[w]: ratio(m[w], m0[w]) for w in names},
                "aim_met": met, "ok": True,
            })
    print("(+µs = t[n] - t[0], median of paired batches; n/0 = median t[n] / median t[0]; "
          "aims (issue 12): tracking <= 2.3 µs and no worse than the old code, 8 bitmaps / "
          "none <= 1.05x for 64k writes" + ("" if has_old else "; old: no baseline") + ")")
    inproc = [s.name for s in sides]
    print("wall µs per write (median; inflated by preemption on a shared machine; qemu-io's, "
          "a difference of two whole runs, is in the JSON):  " + "  ".join(
              f"{size // KiB}k/{n}: " + "/".join(fmt_us(med(wall.get((w, size, n), [])))
                                                 for w in inproc)
              for size in SIZES for n in COUNTS) + f"  ({'/'.join(inproc)})")
    return True


# ------------------------------------------------------------------ part 2
def part_facade(args: argparse.Namespace, scratch: Path, sides: list[Side],
                records: list[dict[str, Any]], notes: list[str]) -> bool:
    span = args.span
    image = scratch / "facade.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=64k,preallocation=full", str(image), str(span)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x5a 0 {span}", str(image)],
                   check=True, capture_output=True)
    rnd = random.Random(args.seed + 1)
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    facade_in: dict[str, bool] = {}
    print(f"\n2. the asyncio facade: 4 KiB reads at random offsets of {human_disk(span)} "
          f"(page cache), {args.sessions} session(s) x {args.batches} batches of "
          f"{args.reads} reads, {args.tasks} concurrent tasks", flush=True)
    try:
        for session in range(args.sessions):
            batches = [[rnd.randrange(span // 4096) * 4096 for _ in range(args.reads)]
                       for _ in range(args.batches)]
            for side in rotate(sides, session):
                res = side.run(scratch, "facade", {"image": str(image), "batches": batches,
                                                   "tasks": args.tasks})
                if not res["same_data"]:
                    raise WorkerError(f"{side.label}: the facade's reads differ from the "
                                      "direct reads")
                facade_in[side.name] = res["facade"]
                for kind, by in res["samples"].items():
                    for clock, values in by.items():
                        samples.setdefault(side.name, {}).setdefault(kind, {}).setdefault(
                            clock, []).extend(values)
    except WorkerError as exc:
        fail(f"block_bench part 2: {exc}")
        return False
    finally:
        image.unlink(missing_ok=True)
    new = samples["new"]
    old = samples.get("old", {})
    direct_wall = med(new["direct"]["wall"])
    table = Table(["call (4 KiB read)", "new wall µs", "new CPU µs", "reads/s", "vs direct",
                   "old wall µs", "old CPU µs"], [34, 11, 10, 9, 9, 11, 10])
    rows = [("direct node.read(off, 4096)", "direct"),
            ("await layer.call(node.read, ...)", "facade"),
            (f"{args.tasks} tasks x await layer.call", "concurrent")]
    for title, kind in rows:
        w, c = med(new[kind]["wall"]), med(new[kind]["cpu"])
        ow = med(old.get(kind, {}).get("wall", []))
        oc = med(old.get(kind, {}).get("cpu", []))
        rate = None if not w else 1e6 / w
        table.row(title, fmt_us(w), fmt_us(c), "-" if rate is None else f"{rate:,.0f}",
                  fmt_x(w, direct_wall) if kind != "direct" else "1.00x", fmt_us(ow),
                  fmt_us(oc))
        records.append({"part": "facade", "call": kind, "tasks": args.tasks if
                        kind == "concurrent" else 1,
                        "new": new[kind], "old": old.get(kind),
                        "median_wall_us": w, "median_cpu_us": c, "reads_per_s": rate,
                        "vs_direct_wall": ratio(w, direct_wall),
                        "old_median_wall_us": ow, "old_median_cpu_us": oc, "ok": True})
    note = ("no QEMU counterpart: qemu-io has no in-process asyncio facade (its aio_read "
            "involves no thread handoff), so the facade is compared with the direct call only")
    if "old" in facade_in and not facade_in["old"]:
        note += "; the baseline has no facade (old: direct reads only)"
    notes.append(note)
    print(f"(µs per call, concurrent: wall / reads; reads/s from wall; CPU = the process's, "
          f"block thread included. {note})")
    return True


# ------------------------------------------------------------------ part 3
def big_bitmap(size: int, seed: int) -> Any:
    """1% of the granules dirty at random (numpy) plus 16 long runs (up to 4 GiB)."""
    import numpy as np

    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

    bits = size // GRAN
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, bits, size=max(1, bits // 100), dtype=np.uint64)
    words = np.zeros(-(-bits // 64), dtype="<u8")
    np.bitwise_or.at(words, (idx >> np.uint64(6)).astype(np.intp),
                     np.left_shift(np.uint64(1), idx & np.uint64(63)))
    bm = DirtyBitmap.from_bytes(size, GRAN, words.tobytes())
    for _ in range(16):
        length = int(rng.integers(1, min(bits, 1 << 16) + 1))
        start = int(rng.integers(0, bits - length + 1))
        bm.set(start * GRAN, length * GRAN)
    return bm


def part_sha(args: argparse.Namespace, scratch: Path, sides: list[Side],
             records: list[dict[str, Any]], notes: list[str]) -> bool:
    size = args.big_size
    image, twin = scratch / "big.qcow2", scratch / "big-twin.qcow2"
    bm = big_bitmap(size, args.seed)
    expected = bm.sha256()
    make_bitmap_image(image, size, [("b0", bm)])
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k",
                    str(twin), str(size)], check=True)
    if (problem := qemu_img_check(image)) is not None:
        fail(f"block_bench part 3: the image is broken: {problem}")
        return False
    bits_bytes = bm.serialized_size
    del bm
    print(f"\n3. sha256 of a populated {human_disk(size)} bitmap (64k granularity, "
          f"{bits_bytes / (1 << 20):.1f} MiB of bits, 1% of granules at random + 16 runs), "
          f"first and second query on a fresh open, {args.sessions} session(s) x "
          f"{args.sha_rounds} open(s) per side; bitmap clusters in the page cache", flush=True)
    res: dict[str, list[dict[str, Any]]] = {}
    qemu: dict[str, list[float]] = {"wall": [], "cpu": []}
    problems: list[str] = []
    try:
        for session in range(args.sessions):
            for who in rotate([*(s.name for s in sides), "qemu"], session):
                if who == "qemu":
                    for _ in range(args.sha_rounds):
                        pair = {}
                        for which, path in rotate([("with", image), ("without", twin)],
                                                  session):
                            pair[which] = qemu_io(path, ["read -q 0 512"], "-r")
                        qemu["wall"].append((pair["with"][0] - pair["without"][0]) * 1e3)
                        qemu["cpu"].append((pair["with"][1] - pair["without"][1]) * 1e3)
                    continue
                side = next(s for s in sides if s.name == who)
                out = side.run(scratch, "sha", {"image": str(image), "bitmap": "b0",
                                                "rounds": args.sha_rounds})
                for r in out["rounds"]:
                    for which in ("first", "second"):
                        if r[which]["sha256"] != expected:
                            problems.append(f"{side.label}: {which} query returned "
                                            f"{r[which]['sha256']}, not {expected}")
                res.setdefault(who, []).extend(out["rounds"])
        if (p := qemu_img_check(image)) is not None:
            problems.append(p)
        listed = qemu_bitmap_list(image)
        if [(b["name"], b["flags"]) for b in listed] != [("b0", ["auto"])]:
            problems.append(f"after the queries qemu-img info shows {listed}")
        if bitmap_digests(image) != {"b0": expected}:
            problems.append("after the queries the stored bitmap changed")
    except WorkerError as exc:
        problems.append(str(exc))
    finally:
        image.unlink(missing_ok=True)
        twin.unlink(missing_ok=True)
    if problems:
        for p in problems:
            fail(f"block_bench part 3: {p}")
        return False
    table = Table(["query", "1st wall ms", "1st CPU ms", "2nd wall ms", "2nd CPU ms",
                   "1st/2nd wall", "1st/2nd CPU", "aim"], [38, 11, 10, 11, 10, 12, 11, 22])
    labels = {s.name: s.label for s in sides}
    for side in sides:
        rounds = res.get(side.name, [])
        api = rounds[0]["api"] if rounds else "?"
        m = {(which, clock): med([r[which][clock] for r in rounds])
             for which in ("first", "second") for clock in ("wall", "cpu")}
        rc = ratio(m[("first", "cpu")], m[("second", "cpu")])
        met = None if side.name != "new" or rc is None else rc >= 10
        aim = "" if met is None else ("met" if met else "MISSED") + " 2nd >= 10x faster (CPU)"
        table.row(f"{side.name}: {api}", *(f"{m[k]:.1f}" if m[k] is not None else "-" for k in
                                           (("first", "wall"), ("first", "cpu"),
                                            ("second", "wall"), ("second", "cpu"))),
                  fmt_x(m[("first", "wall")], m[("second", "wall")]),
                  fmt_x(m[("first", "cpu")], m[("second", "cpu")]), aim)
        records.append({"part": "sha256", "side": labels[side.name], "api": api,
                        "rounds": rounds, "median_ms": {f"{a}_{b}": v for (a, b), v in m.items()},
                        "first_over_second_cpu": rc, "aim_met": met, "ok": True})
    qw, qc = med(qemu["wall"]), med(qemu["cpu"])
    table.row("qemu-io -r: bitmap load at open", fmt_us(qw, False), fmt_us(qc, False), "-", "-",
              "-", "-", "no sha256 CLI")
    records.append({"part": "sha256", "side": "qemu-io",
                    "api": "qemu-io -r -c 'read 0 512': with bitmap - bitmap-less twin",
                    "load_ms": qemu, "median_load_ms": {"wall": qw, "cpu": qc}, "ok": True})
    note = ("QEMU has no command line for x-debug-block-dirty-bitmap-sha256: its row is what "
            "loading the bitmap costs a read-only qemu-io open (the same open of a bitmap-less "
            "twin subtracted, paired runs), to set beside a first query")
    notes.append(note)
    print(f"(first query on a fresh open reads the bitmap; second: in memory. {note})")
    return True


# ------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="CI sizes: 8 MiB of data, a 64 GiB disk for the sha256, tiny batches, "
                   "2 sessions (unless given)")
    p.add_argument("--sessions", type=int,
                   help="sessions per part; the sides' order rotates per session (default 5)")
    p.add_argument("--parts", default="track,facade,sha",
                   help="comma-separated subset of track, facade, sha")
    p.add_argument("--baseline-rev", default=DEFAULT_BASELINE,
                   help=f"the old code to compare with: src/ of this git revision, exported "
                   f"with git archive (default {DEFAULT_BASELINE}; 'none' skips it)")
    p.add_argument("--span", type=parse_size, help="bytes of preallocated data written/read "
                   "in parts 1 and 2 (default 256M)")
    p.add_argument("--big-size", type=parse_size, help="virtual size for part 3 (default 16T)")
    p.add_argument("--qemu-aio", choices=("auto", "io_uring", "threads"), default="auto",
                   help="qemu-io's -i in part 1 (auto: io_uring when it works, else threads)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    q = args.quick
    args.sessions = args.sessions or (2 if q else 5)
    args.span = args.span or (8 << 20 if q else 256 << 20)
    args.big_size = args.big_size or (64 << 30 if q else 16 << 40)
    # a batch short enough (~2 ms CPU) that most batches run within one scheduler time slice
    args.batches = 2 if q else 10
    args.batch = {4096: 50 if q else 250, 65536: 20 if q else 120}
    args.warm = 5 if q else 50
    args.qemu_writes = {4096: 200 if q else 5000, 65536: 60 if q else 1200}
    args.qemu_pairs = 1 if q else 2
    args.reads = 50 if q else 400
    args.tasks = 4
    args.sha_rounds = 1 if q else 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    args = parse_args(argv)
    for tool in ("qemu-img", "qemu-io", "git", "tar"):
        need(tool)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - {"track", "facade", "sha"}:
        sys.exit(f"block_bench: unknown parts {sorted(unknown)}")
    sys.path.insert(0, str(NEW_SRC))  # this checkout's dirtybits, for the checks
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-block-", dir=args.dir or "/var/tmp"))
    print(f"block_bench: scratch {scratch}", flush=True)
    notes = [shared_note()]
    records: list[dict[str, Any]] = []
    ok = True
    try:
        old_src, note = export_baseline(args.baseline_rev, scratch)
        notes.append(note)
        here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
        sides = [Side("new", NEW_SRC, f"new ({here})")]
        if old_src is not None:
            sides.append(Side("old", old_src, f"old ({args.baseline_rev})"))
        print(f"{notes[0]}\n{note}\nnew: {NEW_SRC} at {here}", flush=True)
        steps = {"track": part_track, "facade": part_facade, "sha": part_sha}
        for part in parts:
            ok &= steps[part](args, scratch, sides, records, notes)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    write_json(args.json, {
        "benchmark": "block", "environment": environment(), "ok": ok, "notes": notes,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": records,
    })
    if not ok:
        fail("block_bench: results above are INVALID (a run failed or a check failed)")
        return 1
    print("block_bench: every worker and qemu-io run exited 0; qemu-img check clean; every "
          "bitmap held exactly the granules written; every sha256 query matched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
