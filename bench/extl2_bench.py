#!/usr/bin/env python3
"""Sequential reads of an extended-L2 (subcluster) image: ``dirtybits io`` against ``qemu-io``.

The image (``--size``, 1 GiB by default, 64 KiB clusters of 32 subclusters) lies over a backing
file full of data and was written by qemu-io with a mix that makes every kind of subcluster:
in each group of four clusters one is written whole, one in part (3 KiB from offset 5000:
subclusters 2-3 allocated, the rest read from the backing file), one gets 8 KiB of zeroes (4
zero subclusters) and one is left to the backing file. A standard-L2 twin with the same writes
is read too, for comparison. Each tool reads the whole disk in ``read -q OFF 1M`` commands in
one process, with the same cache mode (``--cache``, writeback by default); runs alternate the
tools' order. Before the numbers count: ``qemu-img check`` on both images, ``qemu-img
compare`` says they hold the same data, and ``dirtybits convert`` of the extended-L2 image
equals ``qemu-img convert``'s.

Numbers are MiB/s (higher is better); the ratio is dirtybits / qemu-io.

    .venv/bin/python bench/extl2_bench.py [--quick] [--size 1G] [--runs 3] [--cache none]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    KiB,
    MiB,
    Table,
    dirtybits_argv,
    environment,
    fail,
    fmt_num,
    fmt_ratio,
    median,
    parse_size,
    peers,
    run_commands,
    warm_bytecode,
    write_json,
)

CLUSTER = 64 * KiB
BLOCK = MiB


def sh(*argv: str | Path, stdin: str | None = None) -> str:
    proc = peers.run(*argv, input=stdin, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {proc.returncode}: "
                           f"{proc.stderr.strip()[-400:]}")
    return proc.stdout


def mix_commands(size: int) -> list[str]:
    """The writes that give each group of four clusters a different subcluster layout."""
    cmds = []
    for c in range(size // CLUSTER):
        off = c * CLUSTER
        kind = c % 4
        if kind == 0:
            cmds.append(f"write -q -P 0x11 {off} {CLUSTER}")
        elif kind == 1:
            cmds.append(f"write -q -P 0x22 {off + 5000} 3k")
        elif kind == 2:
            cmds.append(f"write -q -z {off + 16 * KiB} 8k")
    return cmds


def build(scratch: Path, size: int) -> dict[str, Path]:
    base = scratch / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, str(size))
    step = 64 * MiB
    fill = "".join(f"write -q -P 0x5a {o} {min(step, size - o)}\n" for o in range(0, size, step))
    sh("qemu-io", "-f", "qcow2", "-t", "writeback", base, stdin=fill)
    mix = "".join(c + "\n" for c in mix_commands(size))
    images = {}
    for layout, opts in (("extended L2", "extended_l2=on"), ("standard L2", "extended_l2=off")):
        img = scratch / f"{opts.split('=')[1]}.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"{opts},cluster_size={CLUSTER}",
           "-b", base.name, "-F", "qcow2", img)
        sh("qemu-io", "-f", "qcow2", "-t", "writeback", img, stdin=mix)
        images[layout] = img
    return images


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def verify(images: dict[str, Path], scratch: Path) -> str | None:
    """None when both images check clean, hold the same data, and dirtybits reads the
    extended-L2 one as QEMU does; else what failed."""
    try:
        for img in images.values():
            sh("qemu-img", "check", "-q", img)
        sh("qemu-img", "compare", "-q", *images.values())
        ext = images["extended L2"]
        ours, theirs = scratch / "ours.raw", scratch / "theirs.raw"
        sh(*dirtybits_argv(), "convert", "-O", "raw", ext, ours)
        sh("qemu-img", "convert", "-O", "raw", ext, theirs)
        same = digest(ours) == digest(theirs)
        ours.unlink()
        theirs.unlink()
        return None if same else "dirtybits convert of the extended-L2 image differs from QEMU's"
    except RuntimeError as exc:
        return str(exc)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="CI size: 32M, one run")
    p.add_argument("--size", default=None, help="disk size (default 1G; --quick: 32M)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per tool (default 3)")
    p.add_argument("--cache", default="writeback", choices=("writeback", "none"),
                   help="cache mode of both tools (-t)")
    p.add_argument("--dir", type=Path, default=None, help="scratch directory")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    size = parse_size(args.size or ("32M" if args.quick else "1G"))
    size -= size % CLUSTER
    runs = args.runs or (1 if args.quick else 3)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-extl2-", dir=args.dir or "/var/tmp"))
    try:
        warm_bytecode(scratch)
        print(f"building {size // MiB} MiB images (backing file + mixed writes) ...", flush=True)
        images = build(scratch, size)
        problem = verify(images, scratch)
        if problem:
            fail(problem)
            return 1
        tools = {"dirtybits": ([*dirtybits_argv(), "io", "-t", args.cache], "stdin"),
                 "qemu-io": (["qemu-io", "-f", "qcow2", "-t", args.cache], "args")}
        reads = [f"read -q {off} {min(BLOCK, size - off)}" for off in range(0, size, BLOCK)]
        print(f"sequential reads of {size // MiB} MiB in 1 MiB requests, -t {args.cache}, "
              f"median of {runs} (MiB/s, higher is better)")
        table = Table(["image", "dirtybits", "qemu-io", "ratio"], [12, 10, 10, 6])
        records = []
        for layout, img in images.items():
            secs: dict[str, list[float]] = {t: [] for t in tools}
            for rep in range(runs):
                order = list(tools) if rep % 2 == 0 else list(reversed(tools))
                for t in order:
                    argv0, feed = tools[t]
                    run = run_commands(argv0, img, reads, feed)  # type: ignore[arg-type]
                    if not run.ok:
                        fail(f"{t} on {layout}: exit {run.returncode}\n{run.tail()}")
                        return 1
                    secs[t].append(run.seconds)
            rate = {t: size / MiB / median(s) for t, s in secs.items()}
            table.row(layout, fmt_num(rate["dirtybits"]), fmt_num(rate["qemu-io"]),
                      fmt_ratio(rate["dirtybits"], rate["qemu-io"]))
            records.append({"image": layout, "mib_per_s": rate, "seconds": secs})
        write_json(args.json, {"benchmark": "extl2", "size": size, "cache": args.cache,
                               "runs": runs, "results": records, "env": environment()})
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
