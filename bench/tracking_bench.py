#!/usr/bin/env python3
"""Write tracking: what persistent bitmaps cost ``dirtybits io`` and ``qemu-io``, same inputs.

Three parts (sizes are the defaults; ``--quick`` shrinks them):

1. **Tracking cost.** io_bench's write workloads (its code: sequential 64 KiB, sequential
   1 MiB, random 4 KiB allocating writes, one process each, ``flush`` at the end) on a fresh
   64 GiB qcow2 with 0, 1 and 8 persistent enabled (``auto``) bitmaps (64 KiB granularity,
   empty at the start), both tools in their default cache mode (writeback; ``--cache none``
   for O_DIRECT). Printed: each tool's time, its time relative to its *own* 0-bitmap time
   (issue 4's aim: dirtybits <= 1.05x with 8 bitmaps), and dirtybits / qemu-io.
2. **Close after one 4 KiB write** on a 16 TiB disk with 8 populated bitmaps (64 KiB
   granularity, dirty bits in every bitmap data cluster: 32 MiB each, 256 MiB in all):
   ``dirtybits io -c 'write 0 4k'`` vs ``qemu-io -c 'write 0 4k'``, whole process. QEMU
   loads, marks in-use and at close rewrites all 256 MiB (issue 4: 256.5 MiB, 1.63 s; aim
   >= 100x fewer bytes and >= 10x faster).
3. **Open** of that image: ``io -c 'read 0 512'`` on a writable open (open, load what the
   bitmaps need, mark in-use, one read, close: for QEMU that close rewrites every bitmap
   although nothing changed) and the same with ``-r`` (a read-only open: only the loading
   of the bitmaps differs from a bitmap-less image). Aim (issue 4): no slower than qemu-io.

Times are wall clock from fork to exit, the median of ``--runs`` runs with the tools
interleaved. Bytes written and read are the child's own ``/proc/PID/io`` counters ``wchar`` /
``rchar`` (every byte through write/pwrite resp. read/pread, page cache or not), read after
it exited and before it was reaped (``os.waitid`` with ``WNOWAIT``); ``write_bytes`` is in
the JSON. Images that a run changes are fresh sparse copies of a template (copy not timed).

Checks (the bench fails, exit 1, otherwise): every run exits 0. Part 1: ``qemu-img check``
clean, ``qemu-img compare`` identical across the tools, the same bitmaps (names, flags, none
in-use) and the same QEMU sha256 for each in both tools' images. Parts 2 and 3, after every
dirtybits run (and the last qemu-io run): ``qemu-img check`` clean, ``qemu-img info`` shows
all 8 bitmaps without ``in-use``, and each bitmap's sha256 (read through dirtybits) is the
template's bitmap plus the written granule (part 2) or unchanged (part 3).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    KiB,
    Measured,
    Table,
    bitmap_digests,
    command_argv,
    copy_sparse,
    create_image,
    dirtybits_argv,
    dirtybits_has,
    environment,
    fail,
    fmt_bytes,
    human_disk,
    import_dirtybits,
    make_bitmap_image,
    median,
    need,
    parse_size,
    peers,
    populated_bitmap,
    qemu_bitmap_list,
    qemu_img_check,
    run_measured,
    warm_bytecode,
    write_json,
)
from io_bench import TOOLS, Workload, feeds, random_4k, sequential

GRAN = 64 * KiB
DB = [*dirtybits_argv(), "io", "-f", "qcow2"]
QIO = ["qemu-io", "-f", "qcow2"]


def run_io(tool_argv: Sequence[str], img: Path, commands: Sequence[str],
           feed: str) -> Measured:
    cmds = [*commands, "flush"]
    stdin = "".join(c + "\n" for c in cmds).encode() if feed == "stdin" else None
    return run_measured(command_argv(tool_argv, img, cmds, feed), stdin)  # type: ignore[arg-type]


# ------------------------------------------------------------------ part 1: tracking cost
def cost_templates(scratch: Path, counts: Sequence[int], size: int) -> dict[int, Path]:
    """One fresh image per bitmap count, bitmaps added by qemu-img (as a user would)."""
    out = {}
    for n in counts:
        path = scratch / f"cost-template-{n}.qcow2"
        create_image(path, size)
        for i in range(n):
            peers.qemu_img("bitmap", "-f", "qcow2", "--add", path, f"b{i}")
        out[n] = path
    return out


def verify_cost(wl: Workload, n: int, images: dict[str, Path], empty: str) -> list[str]:
    """Both tools' results clean, identical, with ``n`` consistent bitmaps that recorded
    the writes (``empty``: the sha256 of a bitmap with nothing dirty)."""
    problems = [p for img in images.values() if (p := qemu_img_check(img)) is not None]
    (first, ref), *others = images.items()
    for tool, img in others:
        cmp = peers.run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", ref, img,
                        timeout=3600)
        if cmp.returncode != 0:
            problems.append(f"qemu-img compare {first} {tool}: {cmp.stdout + cmp.stderr}")
    lists = {t: qemu_bitmap_list(img) for t, img in images.items()}
    digests = {t: bitmap_digests(img) for t, img in images.items()}
    for tool in images:
        if len(lists[tool]) != n or any(b["flags"] != ["auto"] for b in lists[tool]):
            problems.append(f"{wl.name}, {n} bitmaps, {tool}: qemu-img info shows "
                            f"{lists[tool]}")
    if len({repr(d) for d in digests.values()}) != 1:
        problems.append(f"{wl.name}, {n} bitmaps: bitmap contents differ between tools: "
                        f"{digests}")
    if any(d == empty for d in digests[first].values()):
        problems.append("a bitmap recorded nothing")
    return [f"{wl.name}, {n} bitmaps: {p}" for p in problems]


def tracking_cost(args: argparse.Namespace, scratch: Path, tools: dict[str, str],
                  records: list[dict[str, Any]]) -> bool:
    counts = (0, 1, 8)
    templates = cost_templates(scratch, counts, args.image_size)
    makers = {
        "seq64k": lambda: sequential("seq 64k", args.size, 64 * KiB),
        "seq1m": lambda: sequential("seq 1M", args.size, 1 << 20),
        "rand4k": lambda: random_4k(args.random_ops, args.image_size, args.seed),
    }
    workloads = [makers[w.strip()]() for w in args.workloads.split(",") if w.strip()]
    print(f"\n1. tracking cost: {human_disk(args.size)} sequential, {args.random_ops} random 4k "
          f"writes, {human_disk(args.image_size)} images, 0/1/8 empty auto bitmaps at 64k, "
          f"cache {args.cache}, median of {args.runs} run(s)", flush=True)
    names = {t: TOOLS[t][0] for t in tools.values()}
    table = Table(["workload (write)", "bitmaps", f"{names[tools['dirtybits']]} s",
                   "vs own 0", f"{names[tools['qemu']]} s", "vs own 0",
                   "dirtybits/qemu"], [16, 7, 19, 8, 21, 8, 14])
    import_dirtybits()
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

    empty = DirtyBitmap(args.image_size, GRAN).sha256()
    for warm in ([*DB, "-c", "read 0 512", str(templates[8])],  # bytecode, page cache
                 [*QIO, "-c", "read 0 512", str(templates[8])]):
        run_measured(warm)
    ok = True
    for wl in workloads:
        feed = feeds(wl, list(tools.values()), "auto")
        secs: dict[tuple[str, int], list[float]] = {(t, n): [] for t in tools for n in counts}
        problems: list[str] = []
        images: dict[int, dict[str, Path]] = {n: {} for n in counts}
        for rep in range(args.runs):
            for n in counts:
                for role, key in tools.items():
                    img = scratch / f"cost-{n}-{role}.qcow2"
                    copy_sparse(templates[n], img)
                    images[n][role] = img
                    run = run_io(TOOLS[key][1], img, wl.writes, feed[key])
                    if not run.ok:
                        problems.append(f"{wl.name}, {n} bitmaps, {role} (run {rep + 1}) "
                                        f"exited {run.returncode}:\n{run.tail()}")
                        break
                    secs[(role, n)].append(run.seconds)
                if problems:
                    break
                if rep == args.runs - 1:
                    problems += verify_cost(wl, n, images[n], empty)
            if problems:
                break
        med = {k: median(v) if v else None for k, v in secs.items()}
        for n in counts:
            a, b = med[("dirtybits", n)], med[("qemu", n)]
            a0, b0 = med[("dirtybits", 0)], med[("qemu", 0)]
            table.row(wl.name, str(n), fmt_s(a), rel(a, a0), fmt_s(b), rel(b, b0), rel(a, b))
            records.append({"part": "tracking cost", "workload": wl.name, "bitmaps": n,
                            "ops": len(wl.writes), "bytes": wl.nbytes,
                            "seconds": {r: secs[(r, n)] for r in tools},
                            "median_seconds": {r: med[(r, n)] for r in tools},
                            "vs_own_0": {"dirtybits": ratio(a, a0), "qemu": ratio(b, b0)},
                            "ok": not problems})
        for p in problems:
            fail(p)
        ok &= not problems
        for n in counts:
            for img in images[n].values():
                img.unlink(missing_ok=True)
    print("(vs own 0 = the tool's time / its own time with no bitmap; aim: dirtybits <= 1.05x "
          "with 8 bitmaps. dirtybits/qemu = time ratio, below 1 = dirtybits faster)")
    return ok


def fmt_s(s: float | None) -> str:
    return "-" if s is None else f"{s:.3f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def rel(a: float | None, b: float | None) -> str:
    r = ratio(a, b)
    return "-" if r is None else f"{r:.2f}x"


# ------------------------------------------------------------------ parts 2 and 3
def big_template(args: argparse.Namespace, scratch: Path) -> tuple[Path, dict[str, str],
                                                                     dict[str, str]]:
    """The 16 TiB image with 8 populated bitmaps; (path, digests now, digests after a 4 KiB
    write at offset 0)."""
    bitmaps = [(f"b{i}", populated_bitmap(args.big_size, GRAN, 64 * KiB, args.seed + i))
               for i in range(args.big_bitmaps)]
    path = scratch / "big-template.qcow2"
    make_bitmap_image(path, args.big_size, bitmaps)
    if (problem := qemu_img_check(path)) is not None:
        raise SystemExit(f"tracking_bench: template is broken: {problem}")
    before = {name: bm.sha256() for name, bm in bitmaps}
    after = {}
    for name, bm in bitmaps:
        bm.set(0, 4 * KiB)
        after[name] = bm.sha256()
    if bitmap_digests(path) != before:
        raise SystemExit("tracking_bench: the template's bitmaps do not read back as written")
    return path, before, after


def verify_big(img: Path, expected: dict[str, str]) -> list[str]:
    problems = []
    if (p := qemu_img_check(img)) is not None:
        problems.append(p)
    listed = qemu_bitmap_list(img)
    if [b["name"] for b in listed] != list(expected) or any(
            b["flags"] != ["auto"] or b["granularity"] != GRAN for b in listed):
        problems.append(f"qemu-img info shows {listed}")
    got = bitmap_digests(img)
    if got != expected:
        bad = sorted(k for k in expected if got.get(k) != expected[k])
        problems.append(f"bitmaps {bad} do not hold the expected bits: {got}")
    return problems


def big_cases(args: argparse.Namespace, scratch: Path, records: list[dict[str, Any]]) -> bool:
    template, before, after = big_template(args, scratch)
    size = human_disk(args.big_size)
    print(f"\n2./3. {size} disk, {args.big_bitmaps} populated auto bitmaps at 64k "
          f"({fmt_bytes(args.big_size // GRAN // 8 * args.big_bitmaps)} of bitmap data), "
          f"median of {args.runs} run(s)", flush=True)
    cases = [
        ("close after write 0 4k", [], ["write 0 4k"], after, (0.1, 0.01)),
        ("open rw, read 0 512", [], ["read 0 512"], before, (1.0, None)),
        ("open -r, read 0 512", ["-r"], ["read 0 512"], before, (1.0, None)),
    ]
    for warm in ([*DB, "-r", "-c", "read 0 512", str(template)],
                 [*QIO, "-r", "-c", "read 0 512", str(template)]):
        run_measured(warm)  # page cache and bytecode warm; not counted
    table = Table(["case", "dirtybits ms", "qemu-io ms", "time", "dirtybits wrote",
                   "qemu wrote", "dirtybits read", "qemu read", "aim"],
                  [22, 12, 10, 7, 15, 11, 14, 10, 26])
    ok = True
    for name, opts, cmds, expected, aim in cases:
        runs: dict[str, list[Measured]] = {"dirtybits": [], "qemu": []}
        problems: list[str] = []
        for rep in range(args.runs):
            for tool, base in (("dirtybits", DB), ("qemu", QIO)):
                img = scratch / f"big-{tool}.qcow2"
                copy_sparse(template, img)
                argv = [*base, *opts, *(a for c in cmds for a in ("-c", c)), str(img)]
                run = run_measured(argv)
                if not run.ok:
                    problems.append(f"{name}: {tool} (run {rep + 1}) exited {run.returncode}:"
                                    f"\n{run.tail()}")
                    break
                runs[tool].append(run)
                if tool == "dirtybits" or rep == args.runs - 1:
                    problems += [f"{name}: after {tool} run {rep + 1}: {p}"
                                 for p in verify_big(img, expected)]
                img.unlink()
            if problems:
                break
        med_s = {t: median([r.seconds for r in v]) if v else None for t, v in runs.items()}
        med_w = {t: median([r.wchar for r in v]) if v else None for t, v in runs.items()}
        med_r = {t: median([r.rchar for r in v]) if v else None for t, v in runs.items()}
        t_ratio = ratio(med_s["dirtybits"], med_s["qemu"])
        w_ratio = ratio(med_w["dirtybits"], med_w["qemu"])
        met = None
        aim_text = ""
        if t_ratio is not None:
            max_t, max_w = aim
            met = t_ratio <= max_t and (max_w is None or (w_ratio is not None
                                                          and w_ratio <= max_w))
            aim_text = f"<={max_t:g}x time" + (f", <={max_w:g}x bytes" if max_w else "")
            aim_text = f"{'met' if met else 'MISSED'} {aim_text}"
        table.row(name, ms(med_s["dirtybits"]), ms(med_s["qemu"]), rel(*med_s.values()),
                  fmt_bytes(med_w["dirtybits"]), fmt_bytes(med_w["qemu"]),
                  fmt_bytes(med_r["dirtybits"]), fmt_bytes(med_r["qemu"]), aim_text)
        records.append({
            "part": "big", "case": name, "ok": not problems, "problems": problems,
            "seconds": {t: [r.seconds for r in v] for t, v in runs.items()},
            "wchar": {t: [r.wchar for r in v] for t, v in runs.items()},
            "write_bytes": {t: [r.write_bytes for r in v] for t, v in runs.items()},
            "rchar": {t: [r.rchar for r in v] for t, v in runs.items()},
            "median_seconds": med_s, "median_wchar": med_w, "median_rchar": med_r,
            "time_ratio": t_ratio, "bytes_ratio": w_ratio, "aim_met": met,
        })
        for p in problems:
            fail(p)
        ok &= not problems
    print("(time = dirtybits / qemu-io wall clock, below 1 = dirtybits faster; wrote/read = "
          "wchar/rchar of the process from /proc/PID/io)")
    return ok


def ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.0f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="CI sizes: 16 MiB sequential, 500 random writes, 1 TiB big disk, "
                   "1 run (unless given)")
    p.add_argument("--runs", type=int, help="runs per tool and case; the median counts "
                   "(default 3)")
    p.add_argument("--size", type=parse_size, help="bytes per sequential workload (default 1G)")
    p.add_argument("--random-ops", type=int, help="random 4 KiB writes (default 20000)")
    p.add_argument("--workloads", default="seq64k,seq1m,rand4k",
                   help="part 1: comma-separated subset of seq64k, seq1m, rand4k")
    p.add_argument("--image-size", type=parse_size, default=parse_size("64G"))
    p.add_argument("--big-size", type=parse_size, help="disk of parts 2 and 3 (default 16T)")
    p.add_argument("--big-bitmaps", type=int, default=8)
    p.add_argument("--cache", choices=("writeback", "none"), default="writeback",
                   help="cache mode of both tools in part 1")
    p.add_argument("--parts", default="cost,big", help="comma-separated subset of cost, big")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch images")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.size = args.size or (16 << 20 if args.quick else 1 << 30)
    args.random_ops = args.random_ops or (500 if args.quick else 20000)
    args.big_size = args.big_size or (1 << 40 if args.quick else 16 << 40)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("qemu-img", "qemu-io", "cp"):
        need(tool)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if unknown := parts - {"cost", "big"}:
        sys.exit(f"tracking_bench: unknown parts {sorted(unknown)}")
    if not dirtybits_has("io"):
        fail("`dirtybits io` is not available")
        return 2
    tools = ({"dirtybits": "dirtybits", "qemu": "qemu-writeback"} if args.cache == "writeback"
             else {"dirtybits": "dirtybits-none", "qemu": "qemu-none"})
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-tracking-", dir=args.dir or "/var/tmp"))
    warm_bytecode(scratch)
    print(f"tracking_bench: scratch {scratch}", flush=True)
    records: list[dict[str, Any]] = []
    ok = True
    try:
        if "cost" in parts:
            ok &= tracking_cost(args, scratch, tools, records)
        if "big" in parts:
            ok &= big_cases(args, scratch, records)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    write_json(args.json, {
        "benchmark": "tracking", "environment": environment(), "ok": ok,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": records,
    })
    if not ok:
        fail("tracking_bench: results above are INVALID (a run failed or a check failed)")
        return 1
    print("tracking_bench: all runs exited 0; qemu-img check clean; bitmaps consistent and "
          "identical to the expected bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
