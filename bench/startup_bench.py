#!/usr/bin/env python3
"""Start-up cost of one-shot commands: ``dirtybits info`` vs ``qemu-img info`` and
``dirtybits io -c 'read 0 4k'`` vs ``qemu-io -c 'read 0 4k'``, median wall clock of N runs,
then ``python -X importtime`` top offenders for ``dirtybits info``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    Table,
    create_image,
    dirtybits_argv,
    dirtybits_has,
    environment,
    fail,
    median,
    need,
    parse_size,
    peers,
    run_timed,
    warm_bytecode,
    write_json,
)


def make_image(path: Path, size: int) -> None:
    """A 64 GiB qcow2 with 1 MiB of data and a persistent bitmap, as a real disk might have."""
    create_image(path, size)
    peers.qemu_io(path, "write -q -P 0x5a 0 1M", fmt="qcow2")
    peers.qemu_img("bitmap", "-f", "qcow2", "--add", path, "b0")


def import_offenders(
    argv: Sequence[str], top: int
) -> tuple[float, list[tuple[float, float, str]]]:
    """(total self ms, [(self ms, cumulative ms, module)] by self time) for ``dirtybits ARGV``."""
    python, *script = dirtybits_argv()
    proc = subprocess.run([python, "-X", "importtime", *script, *argv],
                          capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            rows.append((int(m[1]) / 1000, int(m[2]) / 1000, m[3]))
    return sum(r[0] for r in rows), sorted(rows, reverse=True)[:top]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="5 runs per command (default 20)")
    p.add_argument("--runs", type=int, help="runs per command; the median counts")
    p.add_argument("--image-size", type=parse_size, default=parse_size("64G"))
    p.add_argument("--top", type=int, default=12, help="import-time offenders to list")
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /var/tmp)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.runs = args.runs or (5 if args.quick else 20)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    need("qemu-img")
    need("qemu-io")
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-startup-", dir=args.dir or "/var/tmp"))
    warm_bytecode(scratch)
    img = scratch / "disk.qcow2"
    db = dirtybits_argv()
    cases = [
        ("info", [*db, "info", str(img)], ["qemu-img", "info", str(img)]),
        ("io -c 'read 0 4k'", [*db, "io", "-c", "read 0 4k", str(img)],
         ["qemu-io", "-c", "read 0 4k", str(img)]),
    ]
    missing = [sub for sub in ("info", "io") if not dirtybits_has(sub)]
    records: list[dict[str, Any]] = []
    import_notes: dict[str, Any] = {}
    failed = False
    try:
        make_image(img, args.image_size)
        floor = median([run_timed([sys.executable, "-c", "pass"]).seconds for _ in range(5)])
        print(f"startup_bench: median of {args.runs} runs; python interpreter floor "
              f"(`python -c pass`) {floor * 1000:.1f} ms")
        table = Table(["command", "dirtybits ms", "qemu ms", "ratio (time)"], [22, 12, 9, 12])
        for name, ours, theirs in cases:
            if name.split()[0] in missing:
                fail(f"`dirtybits {name.split()[0]}` is not available yet: skipped")
                failed = True
                continue
            times: dict[str, list[float]] = {"dirtybits": [], "qemu": []}
            for i in range(args.runs + 1):  # the first round warms the page cache, not counted
                for tool, argv_ in (("dirtybits", ours), ("qemu", theirs)):
                    run = run_timed(argv_)
                    if not run.ok:
                        fail(f"{' '.join(argv_)} exited {run.returncode}:\n{run.tail()}")
                        return 1
                    if i:
                        times[tool].append(run.seconds)
            a, b = median(times["dirtybits"]), median(times["qemu"])
            table.row(name, f"{a * 1000:.1f}", f"{b * 1000:.1f}", f"{a / b:.2f}x")
            records.append({"command": name, "seconds": times, "median": {"dirtybits": a,
                                                                          "qemu": b}})
        print("(ratio = dirtybits time / qemu time, below 1 = dirtybits faster)")

        for name, ours, _ in cases:
            total, offenders = import_offenders(ours[len(db):], args.top)
            print(f"\npython -X importtime, dirtybits {name}: {total:.1f} ms of imports; "
                  f"top {args.top} by self time")
            imports = Table(["module", "self ms", "cumul. ms"], [44, 8, 9])
            for self_ms, cum_ms, module in offenders:
                imports.row(module, f"{self_ms:.1f}", f"{cum_ms:.1f}")
            import_notes[name] = {"total_ms": total, "top": [
                {"module": m, "self_ms": s, "cumulative_ms": c} for s, c, m in offenders]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(args.json, {
        "benchmark": "startup", "environment": environment(), "ok": not failed,
        "python_floor_seconds": floor, "results": records, "imports": import_notes,
    })
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
