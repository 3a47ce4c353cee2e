#!/usr/bin/env python3
"""Random 4 KiB writes on an image with an internal snapshot: ``dirtybits io`` vs ``qemu-io``.

The image (64 KiB clusters) is fully written, then ``qemu-img snapshot -c s1`` shares every
cluster and L2 table with the snapshot. Each tool then writes the same distinct 4 KiB-aligned
offsets (fixed seed, one pattern byte a write): every first write into a cluster copies it
(copy-on-write of 64 KiB and, once per 512 MiB, of the L2 table). Every timed run starts on a
fresh copy of that image, after ``os.sync()``, and the tools alternate order run to run. Both
tools run in the same cache mode (``-t none`` and ``-t writeback`` by default; the column
says). Results count only when every run exited 0, ``qemu-img check`` is clean, ``qemu-img
compare`` finds the tools' results identical, and the snapshot still reads as it did before
(``qemu-img convert -l s1``, the same digest for every result).

Prints writes per second for each tool and the ratio dirtybits / qemu-io (higher is better;
the aim of issue 11 is >= 0.5x).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common import (
    KiB,
    MiB,
    Table,
    choose_feed,
    command_argv,
    dirtybits_argv,
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

_DB = [*dirtybits_argv(), "io", "-f", "qcow2"]
MODES = {"none": "-t none", "writeback": "-t writeback"}


def tools(mode: str) -> dict[str, tuple[list[str], str]]:
    """tool -> (argv before the image, preferred feed)."""
    return {"dirtybits": ([*_DB, "-t", mode], "stdin"),
            "qemu-io": (["qemu-io", "-f", "qcow2", "-t", mode], "auto")}


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return peers.sh(*argv, timeout=3600)


def make_base(path: Path, size: int) -> None:
    """A fully written image (distinct data per MiB) with snapshot s1 over all of it."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path),
       str(size))
    cmds: list[str] = []
    for i, off in enumerate(range(0, size, 4 * MiB)):
        cmds += ["-c", f"write -P {1 + i % 250} -q {off} 4M"]
    sh("qemu-io", "-f", "qcow2", *cmds, str(path))
    sh("qemu-img", "snapshot", "-c", "s1", str(path))


def snapshot_digest(path: Path, scratch: Path) -> str:
    out = scratch / "snap.raw"
    sh("qemu-img", "convert", "-U", "-l", "s1", "-O", "raw", str(path), str(out))
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    out.unlink()
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="CI size: 64 MiB image, 2,000 writes")
    p.add_argument("--size", type=parse_size, help="image size (default 1G)")
    p.add_argument("--ops", type=int, help="random 4 KiB writes (default 20000)")
    p.add_argument("--runs", type=int, default=3, help="runs per tool and mode (median)")
    p.add_argument("--modes", default="none,writeback", help="cache modes, comma-separated")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, help="scratch directory (default: under /var/tmp)")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    size = args.size or (64 * MiB if args.quick else 1024 * MiB)
    ops = args.ops or (2000 if args.quick else 20000)
    ops = min(ops, size // (4 * KiB))
    runs = 1 if args.quick and args.runs == 3 else args.runs
    for tool in ("qemu-img", "qemu-io"):
        need(tool)
    scratch = Path(tempfile.mkdtemp(prefix="snapshot-bench-", dir=args.dir or "/var/tmp"))
    try:
        warm_bytecode(scratch)
        base = scratch / "base.qcow2"
        make_base(base, size)
        before = snapshot_digest(base, scratch)
        offsets = random.Random(args.seed).sample(range(size // (4 * KiB)), ops)
        writes = [f"write -P {1 + i % 255} -q {b * 4 * KiB} 4k" for i, b in enumerate(offsets)]
        print(f"{ops} random 4 KiB writes over a {human_size(size)} image whose every cluster "
              f"a snapshot shares; median of {runs} run(s); writes/s, higher is better")
        table = Table(["cache mode", "dirtybits", "qemu-io", "ratio"], [16, 11, 11, 7])
        results: dict[str, dict[str, float]] = {}
        problems: list[str] = []
        for mode in args.modes.split(","):
            tl = tools(mode)
            feed = {t: choose_feed(f, [command_argv(a, base, [*writes, "flush"], "args")])
                    for t, (a, f) in tl.items()}
            secs: dict[str, list[float]] = {t: [] for t in tl}
            images: dict[str, Path] = {}
            for rep in range(runs):
                order = list(tl) if rep % 2 == 0 else list(reversed(tl))
                for tool in order:
                    img = scratch / f"{mode}-{tool}.qcow2"
                    shutil.copyfile(base, img)
                    run = run_commands(tl[tool][0], img, writes, feed[tool])
                    if not run.ok:
                        problems.append(f"{tool} {MODES.get(mode, mode)} exited "
                                        f"{run.returncode}: {run.tail()}")
                    secs[tool].append(run.seconds)
                    images[tool] = img
            for tool, img in images.items():
                chk = peers.run("qemu-img", "check", img, timeout=3600)
                if chk.returncode:
                    problems.append(f"qemu-img check {tool}: {chk.stdout[-300:]}")
                if snapshot_digest(img, scratch) != before:
                    problems.append(f"{tool}: the snapshot changed")
            cmp = peers.run("qemu-img", "compare", *images.values(), timeout=3600)
            if cmp.returncode:
                problems.append(f"results differ: {cmp.stdout.strip()}")
            rate = {t: ops / median(s) for t, s in secs.items()}
            results[mode] = rate
            table.row(MODES.get(mode, mode), fmt_num(rate["dirtybits"]), fmt_num(rate["qemu-io"]),
                      fmt_ratio(rate["dirtybits"], rate["qemu-io"]))
        write_json(args.json, {"environment": environment(), "size": size, "ops": ops,
                               "writes_per_second": results, "problems": problems})
        if problems:
            for problem in problems:
                fail(problem)
            return 1
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
