#!/usr/bin/env python3
"""Offline bitmap commands: ``dirtybits bitmap`` / ``info`` against ``qemu-img bitmap`` /
``qemu-img info`` / ``qemu-nbd -B`` + ``nbdinfo --map``, whole processes, same inputs.

Cases (sizes are the defaults; ``--quick`` shrinks them):

- ``--add``, ``--merge b1`` (into b0), ``--clear``, ``--remove`` on a 1 TiB sparse qcow2 with
  10 populated bitmaps (64 KiB granularity, every bitmap data cluster holds dirty bits, so a
  tool that rewrites bitmaps must write all 2 MiB of each);
- ``--add`` on a 1 TiB image that already has 100 populated bitmaps (QEMU rewrites all of
  them: 200 MiB; issue 3 aims at >= 10x faster and <= 1 MiB written);
- ``info`` with those 100 bitmaps, and with 8 populated bitmaps on a 16 TiB disk (QEMU loads
  all their data: 256 MiB);
- the dirty extents of a 16 TiB bitmap at 64 KiB with 10,000 scattered runs:
  ``dirtybits bitmap --dump`` against ``qemu-nbd --fork -r -t -B NAME`` (timed from its start
  until it returns, which it does once its socket listens) followed by
  ``nbdinfo --map=qemu:dirty-bitmap:NAME``; both outputs must be byte-identical.

Templates are built once (in-process, through dirtybits' bitmap store) and checked with
``qemu-img check``; every run of a command that changes the image gets a fresh sparse copy
(copy not timed). Times are wall clock from fork to exit, the median of ``--runs`` runs with
the tools interleaved. *Bytes written* are the child's own counters from ``/proc/PID/io``,
read after it exited and before it was reaped (``os.waitid`` with ``WNOWAIT``): ``wchar``
(every byte given to write/pwrite, page cache or not; shown in the table) and
``write_bytes`` (what went towards the disk; in the JSON). Output goes to a pipe.

A case counts only if every run exited 0 and then, for changing commands, ``qemu-img check`` is
clean on both results, ``qemu-img info`` lists the same bitmaps (names, granularity, flags) in
both, every bitmap has the same QEMU sha256 in both, and the command changed something;
for ``info``, dirtybits' JSON lists the same bitmaps as qemu-img's; for the dump, the outputs
are identical. Otherwise the bench fails (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    GiB,
    KiB,
    Measured,
    MiB,
    Table,
    bitmap_digests,
    copy_sparse,
    dirtybits_argv,
    environment,
    fail,
    fmt_bytes,
    human_disk,
    make_bitmap_image,
    median,
    need,
    parse_size,
    populated_bitmap,
    qemu_bitmap_list,
    qemu_img_check,
    run_measured,
    scattered_bitmap,
    warm_bytecode,
    write_json,
)

DB = dirtybits_argv()
GRAN = 64 * KiB


@dataclass
class Case:
    """One line of the table: the same job done by dirtybits and by QEMU."""

    name: str
    ours: Callable[[Path], list[list[str]]]  # image -> the process(es) to run, in order
    theirs: Callable[[Path], list[list[str]]]
    template: Path
    changes: bool  # runs on a fresh copy and is checked as a change
    aim: tuple[float, int] | None = None  # (max time ratio, max bytes written by dirtybits)
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"dirtybits": [],
                                                                     "qemu": []})
    wchar: dict[str, list[int]] = field(default_factory=lambda: {"dirtybits": [], "qemu": []})
    write_bytes: dict[str, list[int]] = field(default_factory=lambda: {"dirtybits": [],
                                                                       "qemu": []})
    outputs: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def qemu_nbd_map(name: str, sock: Path, pidfile: Path) -> Callable[[Path], list[list[str]]]:
    """qemu-nbd serving ``name`` (returns once listening) then nbdinfo reading its map."""

    def argv(img: Path) -> list[list[str]]:
        return [
            ["qemu-nbd", "--fork", "--pid-file", str(pidfile), "-r", "-t", "-k", str(sock),
             "-f", "qcow2", "-B", name, str(img)],
            ["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", f"nbd+unix:///?socket={sock}"],
        ]

    return argv


def stop_qemu_nbd(pidfile: Path, sock: Path) -> None:
    """End the qemu-nbd this bench forked (by the pid it wrote), wait until it is gone."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text().strip() or 0)
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        while running(pid):  # its zombie may linger unreaped (it was a daemon): gone enough
            time.sleep(0.005)
    pidfile.unlink(missing_ok=True)
    sock.unlink(missing_ok=True)


def running(pid: int) -> bool:
    """Whether ``pid`` still runs. A daemon's zombie may linger unreaped (its parent is
    init): once all its threads are gone it holds no file, socket or lock any more."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.M)
    threads = re.search(r"^Threads:\s+(\d+)", status, re.M)
    return not (state and state[1] in "ZX" and (not threads or int(threads[1]) <= 1))


def run_steps(steps: list[list[str]]) -> tuple[Measured, list[Measured]]:
    """Run the processes one after the other; their sums (time, bytes) and each run."""
    done = []
    for argv in steps:
        m = run_measured(argv)
        done.append(m)
        if not m.ok:
            break
    total = Measured(sum(m.seconds for m in done), max(abs(m.returncode) for m in done),
                     done[-1].output, wchar=sum(m.wchar for m in done),
                     write_bytes=sum(m.write_bytes for m in done))
    return total, done


def run_case(case: Case, runs: int, scratch: Path, cleanup: Callable[[], None]) -> None:
    images: dict[str, Path] = {}
    for rep in range(runs):
        for tool, make in (("dirtybits", case.ours), ("qemu", case.theirs)):
            img = case.template
            if case.changes:
                img = scratch / f"result-{tool}.qcow2"
                copy_sparse(case.template, img)
            images[tool] = img
            try:
                total, done = run_steps(make(img))
            finally:
                cleanup()
            if not total.ok:
                case.problems.append(f"{case.name}: {tool} (run {rep + 1}) failed: "
                                     f"{' '.join(make(img)[len(done) - 1])}\n{total.tail()}")
                return
            case.seconds[tool].append(total.seconds)
            case.wchar[tool].append(total.wchar)
            case.write_bytes[tool].append(total.write_bytes)
            case.outputs[tool] = total.output
    if case.changes:
        verify_change(case, images)


def verify_change(case: Case, images: dict[str, Path]) -> None:
    for img in images.values():
        if (problem := qemu_img_check(img)) is not None:
            case.problems.append(f"{case.name}: {problem}")
    lists = {tool: qemu_bitmap_list(img) for tool, img in images.items()}
    if lists["dirtybits"] != lists["qemu"]:
        case.problems.append(f"{case.name}: qemu-img info lists differ:\n  dirtybits "
                             f"{lists['dirtybits']}\n  qemu      {lists['qemu']}")
    digests = {tool: bitmap_digests(img) for tool, img in images.items()}
    if digests["dirtybits"] != digests["qemu"]:
        diff = sorted(n for n in digests["dirtybits"].keys() | digests["qemu"].keys()
                      if digests["dirtybits"].get(n) != digests["qemu"].get(n))
        case.problems.append(f"{case.name}: bitmap contents differ: {diff}")
    before = (qemu_bitmap_list(case.template), bitmap_digests(case.template))
    if (lists["dirtybits"], digests["dirtybits"]) == before:
        case.problems.append(f"{case.name}: the command changed nothing")


def verify_info(case: Case, img: Path) -> None:
    run = run_measured([*DB, "info", "--output=json", str(img)])
    if not run.ok:
        case.problems.append(f"{case.name}: dirtybits info --output=json failed\n{run.tail()}")
        return
    ours = json.loads(run.output)["format-specific"]["data"].get("bitmaps", [])
    keys = ("name", "granularity", "flags")
    ours = [{k: b.get(k) for k in keys} for b in ours]
    theirs = [{k: b.get(k) for k in keys} for b in qemu_bitmap_list(img)]
    if ours != theirs:
        case.problems.append(f"{case.name}: dirtybits info lists {ours[:3]}... "
                             f"qemu-img info lists {theirs[:3]}...")


def verify_dump(case: Case, runs: int) -> None:
    ours, theirs = case.outputs.get("dirtybits"), case.outputs.get("qemu")
    if ours != theirs:
        a, b = (ours or "").splitlines(), (theirs or "").splitlines()
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
        case.problems.append(
            f"{case.name}: outputs differ ({len(a)} vs {len(b)} lines), first at line "
            f"{first + 1}: {a[first:first + 1]} vs {b[first:first + 1]}")
        return
    dirty = sum(1 for line in (ours or "").splitlines() if line.endswith(" dirty"))
    if dirty != runs:
        case.problems.append(f"{case.name}: {dirty} dirty extents, expected {runs}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="CI sizes: 64G and 1T disks, 1,000 dump runs, 1 run (unless given)")
    p.add_argument("--runs", type=int, help="runs per tool and case; the median counts "
                   "(default 3)")
    p.add_argument("--size", type=parse_size, help="disk of the add/merge/clear/remove and "
                   "100-bitmap cases (default 1T)")
    p.add_argument("--bitmaps", type=int, default=10, help="bitmaps for add/merge/clear/remove")
    p.add_argument("--many", type=int, default=100, help="bitmaps of the crowded image")
    p.add_argument("--big-size", type=parse_size, help="disk of the 8-bitmap info case and of "
                   "the dump (default 16T)")
    p.add_argument("--big-bitmaps", type=int, default=8)
    p.add_argument("--dump-runs", type=int, help="dirty runs in the dumped bitmap "
                   "(default 10000)")
    p.add_argument("--cases", default="ops,add-many,info,dump",
                   help="comma-separated subset of ops, add-many, info, dump")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, help="scratch directory (default: a new one in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch images")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.size = args.size or (64 * GiB if args.quick else 1 << 40)
    args.big_size = args.big_size or (1 << 40 if args.quick else 16 << 40)
    args.dump_runs = args.dump_runs or (1000 if args.quick else 10000)
    return args


def build_templates(args: argparse.Namespace, scratch: Path, want: set[str]) -> dict[str, Path]:
    t: dict[str, Path] = {}
    jobs: list[tuple[str, int, list[tuple[str, Any]]]] = []
    seed = args.seed
    if "ops" in want:
        jobs.append(("ops", args.size, [
            (f"b{i}", populated_bitmap(args.size, GRAN, 64 * KiB, seed + i))
            for i in range(args.bitmaps)]))
    if want & {"add-many", "info"}:
        jobs.append(("many", args.size, [
            (f"bitmap-{i:03d}", populated_bitmap(args.size, GRAN, 64 * KiB, seed + 100 + i))
            for i in range(args.many)]))
    if "info" in want:
        jobs.append(("big", args.big_size, [
            (f"b{i}", populated_bitmap(args.big_size, GRAN, 64 * KiB, seed + 300 + i))
            for i in range(args.big_bitmaps)]))
    if "dump" in want:
        jobs.append(("dump", args.big_size, [
            ("scattered", scattered_bitmap(args.big_size, GRAN, args.dump_runs, seed))]))
    for key, size, bitmaps in jobs:
        path = scratch / f"template-{key}.qcow2"
        make_bitmap_image(path, size, bitmaps)
        if (problem := qemu_img_check(path)) is not None:
            raise SystemExit(f"bitmap_ops_bench: template {key} is broken: {problem}")
        t[key] = path
    return t


def bitmap_cmd(*action: str) -> tuple[Callable[[Path], list[list[str]]],
                                      Callable[[Path], list[list[str]]]]:
    *opts, name = action
    return (lambda img: [[*DB, "bitmap", *opts, str(img), name]],
            lambda img: [["qemu-img", "bitmap", "-f", "qcow2", *opts, str(img), name]])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("qemu-img", "qemu-nbd", "nbdinfo", "cp"):
        need(tool)
    want = {c.strip() for c in args.cases.split(",") if c.strip()}
    if unknown := want - {"ops", "add-many", "info", "dump"}:
        sys.exit(f"bitmap_ops_bench: unknown cases {sorted(unknown)}")
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dirtybits-bitmap-ops-", dir=args.dir or "/var/tmp"))
    warm_bytecode(scratch)
    sock, pidfile = scratch / "nbd.sock", scratch / "qemu-nbd.pid"
    records: list[dict[str, Any]] = []
    failed = False
    try:
        print(f"bitmap_ops_bench: {human_disk(args.size)} disk with {args.bitmaps} and with "
              f"{args.many} populated bitmaps, {human_disk(args.big_size)} disk with "
              f"{args.big_bitmaps}; dump of {args.dump_runs} runs; granularity 64k, cluster "
              f"64k; median of {args.runs} run(s); scratch {scratch}", flush=True)
        t = build_templates(args, scratch, want)
        size, many, big = (human_disk(args.size), args.many, human_disk(args.big_size))
        cases: list[Case] = []
        if "ops" in want:
            ten = f"({size}, {args.bitmaps} bitmaps)"
            for label, action in (("--add", ("--add", "new")),
                                  ("--merge", ("--merge", "b1", "b0")),
                                  ("--clear", ("--clear", "b0")),
                                  ("--remove", ("--remove", "b0"))):
                ours, theirs = bitmap_cmd(*action)
                cases.append(Case(f"bitmap {label} {ten}", ours, theirs, t["ops"], True))
        if "add-many" in want:
            ours, theirs = bitmap_cmd("--add", "new")
            cases.append(Case(f"bitmap --add ({size}, {many} bitmaps)", ours, theirs,
                              t["many"], True, aim=(0.1, MiB)))
        if "info" in want:
            cases.append(Case(f"info ({size}, {many} bitmaps)",
                              lambda img: [[*DB, "info", str(img)]],
                              lambda img: [["qemu-img", "info", str(img)]], t["many"], False))
            cases.append(Case(f"info ({big}, {args.big_bitmaps} bitmaps)",
                              lambda img: [[*DB, "info", str(img)]],
                              lambda img: [["qemu-img", "info", str(img)]], t["big"], False,
                              aim=(0.1, 0)))
        if "dump" in want:
            cases.append(Case(f"dump ({big}, {args.dump_runs} runs)",
                              lambda img: [[*DB, "bitmap", "--dump", str(img), "scattered"]],
                              qemu_nbd_map("scattered", sock, pidfile), t["dump"], False,
                              aim=(1.0, 0)))

        table = Table(["case", "dirtybits ms", "qemu ms", "time", "dirtybits wrote",
                       "qemu wrote", "aim"], [34, 12, 9, 7, 15, 11, 24])
        for path in t.values():  # warm the page cache and the bytecode; not counted
            for warm in ([*DB, "info", str(path)], ["qemu-img", "info", str(path)]):
                run_measured(warm)
        for case in cases:
            run_case(case, args.runs, scratch, lambda: stop_qemu_nbd(pidfile, sock))
            if not case.problems and case.name.startswith("info"):
                verify_info(case, case.template)
            if not case.problems and case.name.startswith("dump"):
                verify_dump(case, args.dump_runs)
            rec = report(case, table)
            records.append(rec)
            for problem in case.problems:
                fail(problem)
            failed |= bool(case.problems)
        print("(time = dirtybits / qemu wall clock, below 1 = dirtybits faster; wrote = wchar "
              "of the process from /proc/PID/io; qemu for dump = qemu-nbd start + nbdinfo; "
              "aim: issue 3's target, time ratio and dirtybits bytes)")
    finally:
        stop_qemu_nbd(pidfile, sock)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    write_json(args.json, {
        "benchmark": "bitmap_ops", "environment": environment(), "ok": not failed,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": records,
    })
    if failed:
        fail("bitmap_ops_bench: results above are INVALID (a run failed or the results differ)")
        return 1
    print("bitmap_ops_bench: all runs exited 0; qemu-img check clean; bitmaps identical in "
          "both tools' results; dump outputs identical")
    return 0


def report(case: Case, table: Table) -> dict[str, Any]:
    med = {t: median(v) if v else None for t, v in case.seconds.items()}
    wrote = {t: median(v) if v else None for t, v in case.wchar.items()}
    ratio = (med["dirtybits"] / med["qemu"]
             if med["dirtybits"] is not None and med["qemu"] else None)
    aim_text, met = "", None
    if case.aim is not None and ratio is not None and wrote["dirtybits"] is not None:
        max_ratio, max_bytes = case.aim
        met = ratio <= max_ratio and (max_bytes == 0 or wrote["dirtybits"] <= max_bytes)
        aim_text = f"<={max_ratio:g}x{f',<={fmt_bytes(max_bytes)}' if max_bytes else ''}"
        aim_text = f"{'met' if met else 'MISSED'} {aim_text}"
    table.row(
        case.name,
        "-" if med["dirtybits"] is None else f"{med['dirtybits'] * 1000:.0f}",
        "-" if med["qemu"] is None else f"{med['qemu'] * 1000:.0f}",
        "-" if ratio is None else f"{ratio:.2f}x",
        fmt_bytes(wrote["dirtybits"]), fmt_bytes(wrote["qemu"]), aim_text,
    )
    return {"case": case.name, "ok": not case.problems, "problems": case.problems,
            "seconds": case.seconds, "median_seconds": med, "time_ratio": ratio,
            "wchar": case.wchar, "write_bytes": case.write_bytes, "median_wchar": wrote,
            "aim": case.aim, "aim_met": met}


if __name__ == "__main__":
    sys.exit(main())
