#!/usr/bin/env python3
"""Hot operations of the bitmap engine (``dirtybits.bitmap.DirtyBitmap``, numpy words), timed
in-process, beside the same operations on a ``bitarray`` when that package is importable.

The default disk is QEMU's sizing example: 16 TiB at 64 KiB granularity = 2^28 bits = 32 MiB.
There is no QEMU process doing these operations on its own, so instead of a QEMU ratio the
table shows numpy vs bitarray: the measurement behind the engine's choice of numpy (see the
``dirty_bitmap`` module docstring). Every timing is the median of several runs; each workload
is first checked to give the same answer through both implementations.

    .venv/bin/python bench/bitmap_bench.py [--quick] [--json PATH]
    PYTHONPATH=/some/dir/with/bitarray .venv/bin/python bench/bitmap_bench.py   # comparison
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from common import GiB, KiB, MiB, Table, environment, fail, write_json

from dirtybits.bitmap import DirtyBitmap

TiB = GiB << 10

try:
    import bitarray as _bitarray
    import bitarray.util as _bitarray_util
except ImportError:  # the engine does not depend on it
    _bitarray = None  # type: ignore[assignment]


class BitarrayBitmap:
    """The same hot operations over one ``bitarray`` (little-endian bit order = QEMU's)."""

    def __init__(self, size: int, granularity: int) -> None:
        self.size, self.g = size, granularity
        self.gbits = granularity.bit_length() - 1
        self.bits = -(-size // granularity)
        self.ba = _bitarray.bitarray(self.bits, endian="little")
        self.ba.setall(0)
        self.nset = 0
        self.flags = bytearray(-(-self.bits // 64) * 8 // (64 * KiB) + 1)

    def set(self, offset: int, length: int) -> None:
        first, stop = offset >> self.gbits, ((offset + length - 1) >> self.gbits) + 1
        had = self.ba.count(1, first, stop)
        if had != stop - first:
            self.ba[first:stop] = 1
            self.nset += stop - first - had
            self.flags[first >> 19] = 1  # 64 KiB chunks; exact marking would cost more

    def count(self) -> int:
        return self.ba.count() << self.gbits

    def dirty_extents(self) -> Iterator[tuple[int, int]]:
        g = self.gbits
        for value, start, stop in _bitarray_util.intervals(self.ba):
            if value:
                yield start << g, min(stop << g, self.size) - (start << g)

    def merge_from(self, other: BitarrayBitmap) -> None:
        self.ba |= other.ba

    def to_bytes(self) -> bytes:
        data = self.ba.tobytes()
        return data + bytes(-len(data) % 8)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_call(fn: Callable[[], object], calls: int, repeat: int) -> float:
    """Median seconds per call of ``calls`` back-to-back calls (for sub-microsecond ops)."""
    return timed(lambda: [fn() for _ in range(calls)], repeat) / calls


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:,.2f} {unit}"
    return f"{seconds / 1e-9:,.0f} ns"


def measure(
    cls: Callable[[int, int], Any], size: int, gran: int, writes: list[tuple[int, int]], repeat: int
) -> tuple[dict[str, float], dict[str, object]]:
    """Time the operations both implementations have; return (timings, answers to compare)."""
    r: dict[str, float] = {}
    a: dict[str, object] = {}
    blanks = [cls(size, gran) for _ in range(repeat)]
    for b in blanks:
        if isinstance(b, DirtyBitmap):  # numpy's zeros are lazily mapped: pay the page faults
            b.fill()  # here, as bitarray's setall(0) does, so the rows time the set path
            b.clear()
    blank = iter(blanks)

    def write_all() -> None:
        target = next(blank)
        for o, n in writes:
            target.set(o, n)

    r[f"set {len(writes)} ranges (each)"] = timed(write_all, repeat) / len(writes)
    bm = cls(size, gran)
    for o, n in writes:
        bm.set(o, n)
    hot = writes[len(writes) // 2][0] // gran * gran
    r["set 4 KiB, already dirty"] = per_call(lambda: bm.set(hot, 4 * KiB), 20000, repeat)
    fresh = cls(size, gran)
    it = iter([(i * 7919 % (size // gran)) * gran for i in range(20000 * repeat)])
    r["set 4 KiB, clean area"] = per_call(lambda: fresh.set(next(it), 4 * KiB), 20000, repeat)
    r["count"] = per_call(bm.count, 100, repeat)
    a["count"] = bm.count()
    r["iterate dirty runs"] = timed(lambda: list(bm.dirty_extents()), repeat)
    a["runs"] = list(bm.dirty_extents())
    full = cls(size, gran)
    r["set whole disk"] = timed(lambda: full.set(0, size), repeat)
    other = cls(size, gran)
    other.set(size // 3, size // 3)
    r["merge (OR)"] = timed(lambda: other.merge_from(bm), repeat)
    a["merged"] = other.sha256()
    r["serialize (all bytes)"] = timed(bm.to_bytes, repeat)
    r["sha256"] = timed(bm.sha256, repeat)
    a["sha256"] = bm.sha256()
    return r, a


def run_workload(size: int, gran: int, nruns: int, repeat: int) -> list[dict[str, Any]]:
    rng = random.Random(2015)
    writes = sorted(
        (rng.randrange(0, size - 8 * MiB) // 512 * 512, rng.choice([4 * KiB, 64 * KiB, 8 * MiB]))
        for _ in range(nruns)
    )
    impls: dict[str, Callable[[int, int], Any]] = {"numpy": DirtyBitmap}
    if _bitarray is not None:
        impls["bitarray"] = BitarrayBitmap
    results: dict[str, dict[str, float]] = {}
    answers: dict[str, dict[str, object]] = {}
    for name, cls in impls.items():
        results[name], answers[name] = measure(cls, size, gran, writes, repeat)
    if len(impls) == 2:
        for key in answers["numpy"]:
            if answers["numpy"][key] != answers["bitarray"][key]:
                fail(f"numpy and bitarray disagree on {key}")
                sys.exit(1)
    # Engine-only operations (the change tracker, QEMU-style area loop, sparse merge).
    r = results["numpy"]
    hot = writes[len(writes) // 2][0] // gran * gran
    bm = DirtyBitmap(size, gran)
    bm.track_changes(64 * KiB)
    for o, n in writes:
        bm.set(o, n)
    r["take changed chunks"] = timed(bm.take_changed_chunks, repeat)
    r["set 4 KiB, dirty, tracked"] = per_call(lambda: bm.set(hot, 4 * KiB), 20000, repeat)

    def area_loop() -> int:
        n, pos = 0, 0
        while (area := bm.next_dirty_area(pos, size)) is not None:
            pos = area[0] + area[1]
            n += 1
        return n

    r["next_dirty_area loop"] = timed(area_loop, repeat)
    r["extents (clean+dirty)"] = timed(lambda: sum(1 for _ in bm.extents()), repeat)
    coarse = DirtyBitmap(size, gran * 16)
    r["merge into 16x coarser"] = timed(lambda: coarse.merge_from(bm), repeat)
    finer = DirtyBitmap(size, gran)
    r["merge from 16x coarser"] = timed(lambda: finer.merge_from(coarse), repeat)
    cluster = 64 * KiB

    def store() -> int:
        written = 0
        for i in range(bm.cluster_count(cluster)):
            if not bm.is_zero_range(i * cluster, cluster):
                written += len(bm.to_bytes(i * cluster, cluster))
        return written

    r["store clusters (skip zero)"] = timed(store, repeat)
    data = bm.to_bytes()

    def load() -> None:
        fresh = DirtyBitmap(size, gran)
        for i in range(bm.cluster_count(cluster)):
            fresh.load_bytes(i * cluster, data[i * cluster : (i + 1) * cluster])

    r["load clusters"] = timed(load, repeat)
    rows = []
    for op in results["numpy"]:
        rows.append({"op": op, **{name: results[name].get(op) for name in impls}})
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 TiB disk, 3 repeats (CI size)")
    p.add_argument("--size", type=int, default=16 * TiB, help="disk bytes (default 16 TiB)")
    p.add_argument("--granularity", type=int, default=64 * KiB)
    p.add_argument("--runs", type=int, default=10_000, help="dirty ranges written")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    size, repeat = (TiB, 3) if args.quick else (args.size, args.repeat)
    bits = -(-size // args.granularity)
    print(
        f"disk {size / TiB:g} TiB, granularity {args.granularity // KiB} KiB: {bits:,} bits, "
        f"{bits // 8 / MiB:g} MiB; {args.runs:,} written ranges; median of {repeat}"
    )
    if _bitarray is None:
        print("(bitarray not importable: numpy column only)")
    rows = run_workload(size, args.granularity, args.runs, repeat)
    table = Table(["operation", "numpy", "bitarray", "numpy/bitarray"], [28, 12, 12, 14])
    for row in rows:
        ours, theirs = row["numpy"], row.get("bitarray")
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        table.row(row["op"], fmt_time(ours), fmt_time(theirs), ratio)
    write_json(
        args.json,
        {
            "environment": environment(),
            "size": size,
            "granularity": args.granularity,
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
