#!/usr/bin/env python3
"""``dirtybits convert -c`` against ``qemu-img convert -c``: the same source, zlib and zstd.

The source is a raw file of ``--size`` (1 GiB by default; ``--quick``: 64 MiB) of mixed data
in 1 MiB runs, one third each: zeros (skipped by both tools), random bytes (stored
uncompressed: they do not fit below the cluster size) and text-like words (compress to about a
third). Both tools run with the same settings: ``-c -f raw -O qcow2 -o compression_type=T``,
their default cache mode and threads, into a fresh file (removed before each run).

Timed (wall clock, fork to exit, after ``os.sync()``, median of ``--runs`` runs, the tools'
order alternating run to run). The throughput is source bytes per second; the ratio is
ours / qemu-img's (higher is better; aim >= 0.8x).

Checks (otherwise the bench fails, exit 1): every run exits 0, ``qemu-img check`` is clean,
``qemu-img compare`` finds both outputs identical to the source, and the two images are about
the same size (with zlib, the very same bytes).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    MiB,
    Run,
    Table,
    dirtybits_argv,
    environment,
    fail,
    fmt_ratio,
    human_size,
    median,
    need,
    parse_size,
    peers,
    qemu_img_check,
    run_timed,
    warm_bytecode,
    write_json,
)


def make_source(path: Path, size: int, seed: int = 1) -> None:
    """Zeros, random bytes and text-like words, in 1 MiB runs (a sparse file: holes)."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10)))
             for _ in range(2000)]
    pool = b" ".join(rng.choices(words, k=400_000))
    with path.open("wb") as f:
        f.truncate(size)
        for i in range(size // MiB):
            kind = i % 3
            if kind == 0:
                continue
            f.seek(i * MiB)
            if kind == 1:
                f.write(os.urandom(MiB))
            else:
                o = rng.randrange(len(pool) - MiB)
                f.write(pool[o:o + MiB])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default=None, help="source size (default 1G; --quick: 64M)")
    ap.add_argument("--runs", type=int, default=None, help="runs per tool (default 3; quick 1)")
    ap.add_argument("--types", default="zlib,zstd", help="compression types to run")
    ap.add_argument("--quick", action="store_true", help="CI sizes")
    ap.add_argument("--dir", default=None, help="scratch directory (default: under /var/tmp)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    size = parse_size(args.size or ("64M" if args.quick else "1G"))
    runs = args.runs or (1 if args.quick else 3)
    need("qemu-img")
    scratch = Path(tempfile.mkdtemp(prefix="compress-bench-", dir=args.dir or "/var/tmp"))
    ok = True
    results: list[dict[str, Any]] = []
    try:
        warm_bytecode(scratch)
        src = scratch / "src.raw"
        make_source(src, size)
        print(f"convert -c of {human_size(size)} raw (1/3 zeros, 1/3 random, 1/3 text) to "
              f"qcow2, median of {runs} runs, throughput of the source in MiB/s")
        table = Table(["compression", "dirtybits", "qemu-img", "ratio", "size ours", "size qemu"],
                      [12, 10, 10, 7, 12, 12])
        for ctype in args.types.split(","):
            outs = {"dirtybits": scratch / f"db-{ctype}.qcow2",
                    "qemu": scratch / f"q-{ctype}.qcow2"}
            opts = ["-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}",
                    str(src)]
            argv_of = {"dirtybits": [*dirtybits_argv(), "convert", *opts,
                                     str(outs["dirtybits"])],
                       "qemu": ["qemu-img", "convert", *opts, str(outs["qemu"])]}
            times: dict[str, list[float]] = {"dirtybits": [], "qemu": []}
            for r in range(runs):
                order = ("dirtybits", "qemu") if r % 2 == 0 else ("qemu", "dirtybits")
                for tool in order:
                    outs[tool].unlink(missing_ok=True)
                    run: Run = run_timed(argv_of[tool])
                    if not run.ok:
                        fail(f"{tool} convert -c ({ctype}) failed: {run.tail()}")
                        ok = False
                    times[tool].append(run.seconds)
            for tool, out in outs.items():
                problem = qemu_img_check(out)
                cmp = peers.run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, out,
                                timeout=3600)
                if problem or cmp.returncode != 0:
                    fail(f"{tool} ({ctype}): {problem or cmp.stdout + cmp.stderr}")
                    ok = False
            if not all(p.exists() for p in outs.values()):
                continue
            sizes = {t: p.stat().st_size for t, p in outs.items()}
            if ctype == "zlib" and outs["dirtybits"].read_bytes() != outs["qemu"].read_bytes():
                fail("zlib: the images differ (same zlib, same parameters: they should not)")
                ok = False
            if abs(sizes["dirtybits"] - sizes["qemu"]) > sizes["qemu"] // 50:
                fail(f"{ctype}: image sizes differ by more than 2%: {sizes}")
                ok = False
            rate = {t: size / MiB / median(v) for t, v in times.items()}
            table.row(ctype, f"{rate['dirtybits']:.1f}", f"{rate['qemu']:.1f}",
                      fmt_ratio(rate["dirtybits"], rate["qemu"]),
                      f"{sizes['dirtybits'] / MiB:.1f} MiB", f"{sizes['qemu'] / MiB:.1f} MiB")
            results.append({"compression": ctype, "seconds": times, "mib_per_s": rate,
                            "ratio": rate["dirtybits"] / rate["qemu"], "bytes": sizes})
            for out in outs.values():
                out.unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(args.json, {"benchmark": "compress", "size": size, "runs": runs, "ok": ok,
                           "env": environment(), "results": results})
    if not ok:
        print("compress_bench: FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
