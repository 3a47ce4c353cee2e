#!/usr/bin/env python3
"""I/O throughput: ``dirtybits io`` against ``qemu-io`` on the same qemu-io command lists.

Workloads (on fresh sparse qcow2 images, 64 KiB clusters, made by qemu-img for every tool):
sequential 64 KiB writes, sequential 1 MiB writes, random 4 KiB allocating writes (fixed seed,
distinct 4K-aligned offsets over the whole disk), then the same data read back with pattern
verification (``read -P``) on the image each tool wrote. Each write command uses its own
pattern byte, so a misplaced write fails the read-back.

Each phase is one process, timed wall clock including start-up and a final ``flush``. Both tools
run with ``-t none`` (O_DIRECT: the issue's reference numbers) and with their default
(writeback); each ratio compares the same cache mode. Results count only if every run exited 0,
``qemu-img check`` is clean on every result image and ``qemu-img compare`` finds them identical.
"""

from __future__ import annotations

import argparse
import random
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
    KiB,
    MiB,
    Table,
    choose_feed,
    command_argv,
    create_image,
    dirtybits_argv,
    dirtybits_has,
    drop_caches,
    environment,
    fail,
    fmt_num,
    fmt_ratio,
    human_size,
    median,
    need,
    parse_size,
    peers,
    run_commands,
    warm_bytecode,
    write_json,
)

# key -> (column title, argv before the commands and the image, how to feed the commands).
# Each tool gets its fast path by default: qemu-io runs -c commands in a tight loop, but reads
# stdin through its main loop with a prompt per line (7-30% slower on these workloads);
# dirtybits reads stdin faster than it parses 20,000 -c options. --feed args|stdin feeds every
# tool the same way. Both tools' default is writethrough (a flush per write): the columns name
# their cache mode explicitly.
_DB = [*dirtybits_argv(), "io", "-f", "qcow2"]
TOOLS: dict[str, tuple[str, list[str], str]] = {
    "dirtybits-none": ("dirtybits -t none", [*_DB, "-t", "none"], "stdin"),
    "qemu-none": ("qemu-io -t none", ["qemu-io", "-f", "qcow2", "-t", "none"], "auto"),
    "dirtybits": ("dirtybits -t writeback", [*_DB, "-t", "writeback"], "stdin"),
    "qemu-writeback": (
        "qemu-io -t writeback", ["qemu-io", "-f", "qcow2", "-t", "writeback"], "auto"),
    # both defaults: a flush after every write (run with --workloads rand4k or a small --size:
    # one fdatasync per command)
    "dirtybits-wt": ("dirtybits (writethrough)", _DB, "stdin"),
    "qemu-wt": ("qemu-io (writethrough)", ["qemu-io", "-f", "qcow2"], "auto"),
}
# qemu-io column -> the dirtybits column its ratio compares (same cache mode)
PAIRS = {"qemu-none": "dirtybits-none", "qemu-writeback": "dirtybits", "qemu-wt": "dirtybits-wt"}
DEFAULT_TOOLS = ("dirtybits-none", "qemu-none", "dirtybits", "qemu-writeback")


@dataclass
class Workload:
    name: str
    block: int
    writes: list[str]
    reads: list[str]
    unit: str  # "MiB/s" or "ops/s"

    @property
    def nbytes(self) -> int:
        return self.block * len(self.writes)

    def rate(self, seconds: float) -> float:
        ops = len(self.writes)
        return ops / seconds if self.unit == "ops/s" else self.nbytes / MiB / seconds


@dataclass
class Result:
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # tool -> phase -> s
    ok: bool = True
    problems: list[str] = field(default_factory=list)


def pattern(i: int) -> str:
    return f"0x{1 + i % 255:02x}"


def sequential(name: str, total: int, block: int) -> Workload:
    offsets = range(0, total, block)
    size = human_size(block)
    return Workload(
        name, block,
        [f"write -P {pattern(i)} -q {off} {size}" for i, off in enumerate(offsets)],
        [f"read -P {pattern(i)} -q {off} {size}" for i, off in enumerate(offsets)],
        "MiB/s",
    )


def random_4k(count: int, disk: int, seed: int) -> Workload:
    blocks = random.Random(seed).sample(range(disk // (4 * KiB)), count)
    offsets = [b * 4 * KiB for b in blocks]
    return Workload(
        "random 4k",
        4 * KiB,
        [f"write -P {pattern(i)} -q {off} 4k" for i, off in enumerate(offsets)],
        [f"read -P {pattern(i)} -q {off} 4k" for i, off in enumerate(offsets)],
        "ops/s",
    )


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return peers.qemu_img(*args, ok=None, timeout=3600)


def verify(images: dict[str, Path], result: Result) -> None:
    """``qemu-img check`` clean on each image, ``qemu-img compare`` identical to the first."""
    for tool, img in images.items():
        chk = qemu_img("check", "-f", "qcow2", str(img))
        if chk.returncode != 0:
            result.problems.append(f"qemu-img check {tool}: exit {chk.returncode}: "
                                   f"{(chk.stdout + chk.stderr).strip()[-500:]}")
    (first, ref), *others = images.items()
    for tool, img in others:
        cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(ref), str(img))
        if cmp.returncode != 0:
            result.problems.append(f"qemu-img compare {first} {tool}: exit {cmp.returncode}: "
                                   f"{(cmp.stdout + cmp.stderr).strip()[-500:]}")


def feeds(wl: Workload, tools: Sequence[str], feed: str) -> dict[str, Feed]:
    """How each tool gets its commands (``auto``: the tool's preference, ``-c`` if it fits)."""
    return {
        t: choose_feed(TOOLS[t][2] if feed == "auto" else feed, [
            command_argv(TOOLS[t][1], Path("/var/tmp/x.qcow2"), [*cmds, "flush"], "args")
            for cmds in (wl.writes, wl.reads)
        ])
        for t in tools
    }


def run_workload(
    wl: Workload, tools: Sequence[str], args: argparse.Namespace, scratch: Path,
    feed: dict[str, Feed],
) -> Result:
    result = Result({t: {"write": [], "read": []} for t in tools})
    images: dict[str, Path] = {}
    for rep in range(args.runs):
        # interleaved, and in alternating order, so drift on the machine hits every tool alike
        for tool in (tools if rep % 2 == 0 else list(reversed(tools))):
            img = scratch / f"{wl.name.replace(' ', '-')}-{tool}.qcow2"
            create_image(img, args.image_size, args.cluster_size)
            images[tool] = img
            for phase, cmds in (("write", wl.writes), ("read", wl.reads)):
                if phase == "read" and args.drop_caches:
                    drop_caches()
                run = run_commands(TOOLS[tool][1], img, cmds, feed[tool])
                if not run.ok:
                    result.problems.append(
                        f"{wl.name} {phase} with {tool} (run {rep + 1}) exited "
                        f"{run.returncode}:\n{run.tail()}")
                result.seconds[tool][phase].append(run.seconds)
        if rep == args.runs - 1 or result.problems:
            verify(images, result)
        if result.problems:
            break
    if not args.keep:
        for img in images.values():
            img.unlink(missing_ok=True)
    result.ok = not result.problems
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="CI size: 64 MiB sequential, 2,000 random writes (unless given)")
    p.add_argument("--size", type=parse_size, help="bytes per sequential workload (default 1G)")
    p.add_argument("--random-ops", type=int, help="random 4 KiB writes (default 20000)")
    p.add_argument("--image-size", type=parse_size, default=parse_size("64G"))
    p.add_argument("--cluster-size", type=parse_size, default=parse_size("64k"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=1, help="runs per tool; the median counts")
    p.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                   help=f"comma-separated subset of {', '.join(TOOLS)}")
    p.add_argument("--workloads", default="seq64k,seq1m,rand4k",
                   help="comma-separated subset of seq64k, seq1m, rand4k")
    p.add_argument("--feed", choices=("auto", "args", "stdin"), default="auto",
                   help="commands as -c arguments or on stdin for every tool (auto: qemu-io -c "
                   "when ARG_MAX allows, else stdin; dirtybits stdin)")
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the images")
    p.add_argument("--drop-caches", action="store_true",
                   help="sync and drop the page cache between write and read phases (root)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.size = args.size or (64 * MiB if args.quick else 1 << 30)
    args.random_ops = args.random_ops or (2000 if args.quick else 20000)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    need("qemu-img")
    need("qemu-io")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := set(tools) - set(TOOLS):
        sys.exit(f"io_bench: unknown tools {sorted(unknown)}")
    if any(t.startswith("dirtybits") for t in tools) and not dirtybits_has("io"):
        fail("`dirtybits io` is not available; use --tools qemu-none,qemu-writeback")
        return 2
    makers = {
        "seq64k": lambda: sequential("seq 64k", args.size, 64 * KiB),
        "seq1m": lambda: sequential("seq 1M", args.size, MiB),
        "rand4k": lambda: random_4k(args.random_ops, args.image_size, args.seed),
    }
    workloads = [makers[w.strip()]() for w in args.workloads.split(",") if w.strip()]

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-io-bench-", dir=args.dir or "/var/tmp"))
    warm_bytecode(scratch)
    print(f"io_bench: {human_size(args.size)} sequential, {args.random_ops} random 4k writes, "
          f"{human_size(args.image_size)} qcow2 images, cluster {human_size(args.cluster_size)}, "
          f"median of {args.runs} run(s), scratch {scratch}")
    ratios = {t: PAIRS[t] for t in tools if PAIRS.get(t) in tools}
    headers = ["workload"]
    for t in tools:
        headers += [TOOLS[t][0]] + (["ratio"] if t in ratios else [])
    table = Table(headers, [24] + [max(len(h), 9) for h in headers[1:]])

    records: list[dict[str, Any]] = []
    failed = False
    try:
        for wl in workloads:
            feed = feeds(wl, tools, args.feed)
            res = run_workload(wl, tools, args, scratch, feed)
            for phase in ("write", "read"):
                rates = {t: wl.rate(median(res.seconds[t][phase]))
                         for t in tools if res.seconds[t][phase]}
                cells = [f"{wl.name} {phase} ({wl.unit})"]
                for t in tools:
                    cells.append(fmt_num(rates.get(t)))
                    if t in ratios:
                        cells.append(fmt_ratio(rates.get(ratios[t]), rates.get(t)))
                table.row(*cells)
                records.append({
                    "workload": wl.name, "phase": phase, "unit": wl.unit, "ops": len(wl.writes),
                    "bytes": wl.nbytes, "feed": feed, "ok": res.ok,
                    "seconds": {t: res.seconds[t][phase] for t in tools},
                    "rate": rates,
                })
            for problem in res.problems:
                fail(problem)
            failed |= not res.ok
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    fed = sorted({f"{TOOLS[t][0]}: {f}" for r in records for t, f in r["feed"].items()})
    print(f"(commands fed as {'; '.join(fed)})\n(ratio = dirtybits rate / qemu-io rate in the "
          "same cache mode, above 1 = dirtybits faster)")
    write_json(args.json, {
        "benchmark": "io", "environment": environment(), "ok": not failed,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": records,
    })
    if failed:
        fail("io_bench: results above are INVALID (a run failed or the images differ)")
        return 1
    print("io_bench: all runs exited 0; qemu-img check clean; qemu-img compare identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
