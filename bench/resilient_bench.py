#!/usr/bin/env python3
"""Resilient mode vs plain tracking: what the write-intent map costs ``dirtybits io``.

io_bench's write workloads (its code: sequential 64 KiB and 1 MiB writes over ``--size``,
default 1 GiB; random 4 KiB writes, ``--random-ops`` distinct 4K-aligned offsets in the first
``--random-span`` bytes, default 1 GiB) on a fresh sparse qcow2 (``--image-size``, default
64 GiB, 64 KiB clusters) with one enabled persistent bitmap (64 KiB granularity), one process
per run with a final ``flush``, cache mode writeback for every tool (``-t writeback``; both
tools default to writethrough), default checkpoint policy:

- ``plain``: ``dirtybits io``, resilient mode off;
- ``resilient``: ``dirtybits io`` after ``dirtybits amend -o resilient=on`` (default region:
  at least 1 MiB, at most 32768 regions: 2 MiB on 64 GiB);
- ``qemu-io``: the same commands through ``qemu-io`` on the same kind of image (reference).

Printed: each time (median of ``--runs``, tools interleaved), resilient / plain (issue 5's aim:
<= 1.1x), plain / qemu-io, and fdatasync+fsync calls per GiB written for each tool. The sync
counts come from separate, untimed runs of the same commands: with ``strace -f -c -e
trace=fdatasync,fsync`` when strace is installed (every tool, every thread), else in-process
for dirtybits (the real CLI ``main`` with the ``os`` module seen by ``dirtybits.qcow2.image``,
the only module that syncs image files, wrapped by a counter, as tests/crash/faultfs.py does;
qemu-io then shows ``-``). The method is printed.

Checks (exit 1 otherwise): every run exits 0; ``qemu-img check`` clean on every result image;
``qemu-img compare`` identical across the tools; the bitmap is consistent (not in-use) and has
the same QEMU sha256 in all three images (resilient mode changes no bit); the resilient image's
write-intent map is valid.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    Feed,
    GiB,
    KiB,
    MiB,
    Table,
    bitmap_digests,
    choose_feed,
    command_argv,
    create_image,
    dirtybits_argv,
    dirtybits_has,
    environment,
    fail,
    fmt_num,
    human_size,
    import_dirtybits,
    median,
    need,
    parse_size,
    peers,
    qemu_bitmap_list,
    run_commands,
    warm_bytecode,
    write_json,
)
from io_bench import Result as IoResult
from io_bench import Workload, random_4k, sequential
from io_bench import verify as verify_images

# both tools in writeback (their default, writethrough, would flush after every write)
_DB = [*dirtybits_argv(), "io", "-f", "qcow2", "-t", "writeback"]
# key -> (column title, argv before the commands and the image, preferred feed)
TOOLS: dict[str, tuple[str, list[str], str]] = {
    "qemu": ("qemu-io", ["qemu-io", "-f", "qcow2", "-t", "writeback"], "auto"),
    "plain": ("plain", _DB, "stdin"),
    "resilient": ("resilient", _DB, "stdin"),
}
BITMAP = "b0"

# Runs the dirtybits CLI in this process with the engine's fdatasync/fsync counted; the count
# is written to the file named by DIRTYBITS_BENCH_SYNCS at exit.
_COUNTER = """
import atexit, os, sys
import dirtybits.qcow2.image as m
real = m.os
counts = {"fdatasync": 0, "fsync": 0}
class Proxy:
    def __getattr__(self, name):
        attr = getattr(real, name)
        if name in counts:
            def call(*a, _n=name, _f=attr):
                counts[_n] += 1
                return _f(*a)
            return call
        return attr
m.os = Proxy()
out = os.environ["DIRTYBITS_BENCH_SYNCS"]
atexit.register(lambda: open(out, "w").write(str(sum(counts.values()))))
from dirtybits.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Outcome:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    syncs: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def prepare(img: Path, tool: str, args: argparse.Namespace) -> None:
    """A fresh image with one enabled bitmap (and resilient mode for ``resilient``)."""
    create_image(img, args.image_size, args.cluster_size)
    peers.qemu_img("bitmap", "--add", "-g", "64k", img, BITMAP)
    if tool == "resilient":
        subprocess.run([*dirtybits_argv(), "amend", "-o", "resilient=on", str(img)],
                       check=True)


def strace_syncs(argv: list[str], stdin: bytes | None, out: Path) -> tuple[int | None, str]:
    """(fdatasync + fsync calls of the process and its threads, error text) via strace -c."""
    proc = subprocess.run(["strace", "-f", "-qq", "-c", "-e", "trace=fdatasync,fsync", "-o",
                           str(out), *argv], input=stdin, capture_output=True, timeout=3600)
    if proc.returncode != 0:
        return None, proc.stdout.decode(errors="replace")[-500:] + proc.stderr.decode(
            errors="replace")[-500:]
    calls = 0
    for line in out.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fdatasync", "fsync") and len(parts) >= 5:
            calls += int(parts[3])
    return calls, ""


def counted_syncs(tool: str, img: Path, cmds: list[str], feed: Feed,
                  method: str, scratch: Path) -> tuple[int | None, str]:
    """One untimed run of the workload with its syncs counted."""
    cmds = [*cmds, "flush"]
    stdin = "".join(c + "\n" for c in cmds).encode() if feed == "stdin" else None
    argv = command_argv(TOOLS[tool][1], img, cmds, feed)
    if method == "strace":
        return strace_syncs(argv, stdin, scratch / "strace.out")
    if tool == "qemu":
        return None, ""
    count_file = scratch / "syncs.txt"
    count_file.unlink(missing_ok=True)
    # the CLI's argv after "io": same arguments, run by _COUNTER in one interpreter
    io_args = argv[argv.index("io"):]
    env = dict(os.environ, DIRTYBITS_BENCH_SYNCS=str(count_file))
    proc = subprocess.run([sys.executable, "-c", _COUNTER, *io_args], input=stdin,
                          capture_output=True, env=env, timeout=3600)
    if proc.returncode != 0 or not count_file.exists():
        return None, (proc.stdout + proc.stderr).decode(errors="replace")[-500:]
    return int(count_file.read_text()), ""


def check_bitmaps(images: dict[str, Path], out: Outcome) -> None:
    """The bitmap is consistent and identical in every image; the resilient map is valid."""
    import_dirtybits()
    from dirtybits.block import write_intent
    from dirtybits.qcow2.image import Qcow2Image

    digests = {}
    for tool, img in images.items():
        flags = [b["flags"] for b in qemu_bitmap_list(img) if b["name"] == BITMAP]
        if flags != [["auto"]]:
            out.problems.append(f"{tool}: bitmap {BITMAP} flags {flags} (want [['auto']])")
        digests[tool] = bitmap_digests(img).get(BITMAP)
    if len(set(digests.values())) != 1:
        out.problems.append(f"bitmap {BITMAP} differs between the tools: {digests}")
    if "resilient" in images:
        with Qcow2Image.open(str(images["resilient"]), readonly=True, force_share=True) as q:
            rec = write_intent.describe(q)
            if rec is None or not write_intent.is_valid(q):
                out.problems.append("resilient: the write-intent map is missing or invalid")


def run_workload(wl: Workload, tools: Sequence[str], args: argparse.Namespace,
                 scratch: Path, method: str) -> Outcome:
    out = Outcome({t: [] for t in tools})
    feeds: dict[str, Feed] = {
        t: choose_feed(TOOLS[t][2], [command_argv(TOOLS[t][1], scratch / "x.qcow2",
                                                  [*wl.writes, "flush"], "args")])
        for t in tools}
    images: dict[str, Path] = {}
    for rep in range(args.runs):
        for tool in tools:  # interleaved: drift on the machine hits every tool alike
            img = scratch / f"{wl.name.replace(' ', '-')}-{tool}.qcow2"
            prepare(img, tool, args)
            images[tool] = img
            run = run_commands(TOOLS[tool][1], img, wl.writes, feeds[tool])
            if not run.ok:
                out.problems.append(f"{wl.name} with {tool} (run {rep + 1}) exited "
                                    f"{run.returncode}:\n{run.tail()}")
            out.seconds[tool].append(run.seconds)
        if out.problems:
            break
    if not out.problems:
        res = IoResult()
        verify_images(images, res)
        out.problems += res.problems
        check_bitmaps(images, out)
    if not out.problems and method != "none":
        for tool in tools:
            img = scratch / f"count-{tool}.qcow2"
            prepare(img, tool, args)
            calls, err = counted_syncs(tool, img, wl.writes, feeds[tool], method, scratch)
            if err:
                out.problems.append(f"{wl.name}: counting the syncs of {tool} failed: {err}")
            out.syncs[tool] = calls
            img.unlink(missing_ok=True)
    if not args.keep:
        for img in images.values():
            img.unlink(missing_ok=True)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="CI size: 64 MiB sequential, 2,000 random writes in 64 MiB")
    p.add_argument("--size", type=parse_size, help="bytes per sequential workload (default 1G)")
    p.add_argument("--random-ops", type=int, help="random 4 KiB writes (default 20000)")
    p.add_argument("--random-span", type=parse_size,
                   help="the random writes fall in the first SPAN bytes (default 1G)")
    p.add_argument("--image-size", type=parse_size, default=parse_size("64G"))
    p.add_argument("--cluster-size", type=parse_size, default=parse_size("64k"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="timed runs per tool; the median counts")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated subset of {', '.join(TOOLS)}")
    p.add_argument("--workloads", default="seq64k,seq1m,rand4k",
                   help="comma-separated subset of seq64k, seq1m, rand4k")
    p.add_argument("--count", choices=("auto", "strace", "inprocess", "none"), default="auto",
                   help="how to count syncs (auto: strace if installed, else in-process)")
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the timed runs' images")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.size = args.size or (64 * MiB if args.quick else GiB)
    args.random_ops = args.random_ops or (2000 if args.quick else 20000)
    args.random_span = args.random_span or (64 * MiB if args.quick else GiB)
    if args.quick and "--runs" not in (argv if argv is not None else sys.argv):
        args.runs = 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    need("qemu-img")
    need("qemu-io")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := set(tools) - set(TOOLS):
        sys.exit(f"resilient_bench: unknown tools {sorted(unknown)}")
    if not dirtybits_has("amend"):
        fail("`dirtybits amend` (resilient mode) is not available")
        return 2
    method = args.count
    if method == "auto":
        method = "strace" if shutil.which("strace") else "inprocess"
    makers = {
        "seq64k": lambda: sequential("seq 64k", args.size, 64 * KiB),
        "seq1m": lambda: sequential("seq 1M", args.size, MiB),
        "rand4k": lambda: random_4k(args.random_ops, args.random_span, args.seed),
    }
    workloads = [makers[w.strip()]() for w in args.workloads.split(",") if w.strip()]
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-resilient-bench-",
                                    dir=args.dir or "/var/tmp"))
    warm_bytecode(scratch)
    print(f"resilient_bench: {human_size(args.size)} sequential, {args.random_ops} random 4k "
          f"writes in {human_size(args.random_span)}, {human_size(args.image_size)} qcow2, "
          f"cluster {human_size(args.cluster_size)}, 1 bitmap, median of {args.runs} run(s); "
          f"syncs counted by {method}; scratch {scratch}")
    cols = [TOOLS[t][0] + " s" for t in tools]
    ratio_cols = []
    if "resilient" in tools and "plain" in tools:
        ratio_cols.append("resil/plain")
    if "plain" in tools and "qemu" in tools:
        ratio_cols.append("plain/qemu")
    sync_cols = [f"{TOOLS[t][0]} sync/GiB" for t in tools]
    headers = ["workload", *cols, *ratio_cols, *sync_cols]
    table = Table(headers, [12] + [max(len(h), 8) for h in headers[1:]])
    records: list[dict[str, Any]] = []
    failed = False
    try:
        for wl in workloads:
            out = run_workload(wl, tools, args, scratch, method)
            secs = {t: median(out.seconds[t]) for t in tools if out.seconds[t]}
            gib = wl.nbytes / GiB
            per_gib = {t: (None if (n := out.syncs.get(t)) is None else n / gib)
                       for t in tools}
            cells = [wl.name, *(fmt_num(secs.get(t)) for t in tools)]
            ratios: dict[str, float | None] = {}
            if "resil/plain" in ratio_cols:
                ratios["resilient/plain"] = (secs["resilient"] / secs["plain"]
                                             if {"resilient", "plain"} <= secs.keys() else None)
            if "plain/qemu" in ratio_cols:
                ratios["plain/qemu"] = (secs["plain"] / secs["qemu"]
                                        if {"plain", "qemu"} <= secs.keys() else None)
            cells += ["-" if r is None else f"{r:.2f}x" for r in ratios.values()]
            cells += [fmt_num(per_gib[t]) for t in tools]
            table.row(*cells)
            records.append({"workload": wl.name, "ops": len(wl.writes), "bytes": wl.nbytes,
                            "ok": not out.problems, "seconds": out.seconds,
                            "median_seconds": secs, "ratios": ratios, "syncs": out.syncs,
                            "syncs_per_gib": per_gib})
            for problem in out.problems:
                fail(problem)
            failed |= bool(out.problems)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if "resil/plain" in ratio_cols:
        worst = max((r["ratios"]["resilient/plain"] or 0) for r in records) if records else 0
        print(f"(times in seconds per process, lower is better; resilient / plain worst "
              f"{worst:.2f}x, aim <= 1.10x: {'met' if worst <= 1.1 else 'NOT met'})")
    write_json(args.json, {
        "benchmark": "resilient", "environment": environment(), "ok": not failed,
        "sync_count_method": method,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": records,
    })
    if failed:
        fail("resilient_bench: results above are INVALID (a run or a check failed)")
        return 1
    print("resilient_bench: all runs exited 0; qemu-img check clean; qemu-img compare "
          "identical; the bitmap identical and consistent in every image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
