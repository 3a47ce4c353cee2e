#!/usr/bin/env python3
"""``dirtybits bitmap --recover`` against ``qemu-img compare``: the same pair, whole processes.

The pair (sizes are the defaults; ``--quick`` shrinks them): a 10 GiB qcow2 *backup* with
``--data`` of it allocated (1 MiB runs of non-zero data spread over the disk), and the *image*,
a copy of it in which a writer set bitmap ``b`` in_use and then changed ``--changed`` of the
disk in scattered 64 KiB writes (half over data, half over holes) before "crashing".

Timed (wall clock, fork to exit, page cache warm, median of ``--runs`` runs, tools
interleaved):

- ``dirtybits bitmap --recover --reference BACKUP IMAGE b``: reads both allocation maps, reads
  and compares every chunk where either side has data, stores the rebuilt bitmap;
- ``qemu-img compare IMAGE COPY`` where COPY is a byte copy of IMAGE: the same allocation, so
  the same bytes to read and compare, but no early exit (``qemu-img compare BACKUP IMAGE``
  stops at the first difference; it is timed too and shown for reference).

The throughput ratio is qemu-img's time over ours for the same bytes (aim >= 0.8x).

Checks (otherwise the bench fails, exit 1): every run exits as expected, the rebuilt bitmap
equals the granules the writes changed, ``qemu-img info`` shows it without in-use and
``qemu-img check`` is clean.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    GiB,
    KiB,
    MiB,
    Run,
    Table,
    copy_sparse,
    dirtybits_argv,
    dirtybits_has,
    environment,
    fail,
    fmt_bytes,
    human_size,
    import_dirtybits,
    median,
    need,
    parse_size,
    qemu_bitmap_list,
    qemu_img_check,
    run_timed,
    warm_bytecode,
    write_json,
)

GRAN = 64 * KiB
WRITE = 64 * KiB
RUN = 1 * MiB

# The recover step exactly as ``dirtybits bitmap --recover`` runs it after parsing (used
# until cli/bitmap.py wires ``--recover``).
_STANDALONE = """
import argparse, sys
from dirtybits.block.open import open_for_bitmaps
from dirtybits.cli.bitmap_recover import apply_recover
ref, img, name = sys.argv[1:4]
with open_for_bitmaps(img, readonly=False) as node:
    ns = argparse.Namespace(reference=ref, reference_format=None, progress=False)
    apply_recover(node, name, ns, sys.stdout)
"""


def recover_argv(backup: Path, image: Path) -> list[str]:
    if recover_argv.wired:  # type: ignore[attr-defined]
        return [*dirtybits_argv(), "bitmap", "--recover", "--reference", str(backup),
                str(image), "b"]
    return [sys.executable, "-c", _STANDALONE, str(backup), str(image), "b"]


recover_argv.wired = False  # type: ignore[attr-defined]


def build(scratch: Path, size: int, data: float, changed: float, seed: int) -> tuple[
        Path, Path, Any]:
    """(backup, image, the expected DirtyBitmap)."""
    import_dirtybits()
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    rnd = random.Random(seed)
    block = rnd.randbytes(RUN + WRITE)
    backup, image = scratch / "backup.qcow2", scratch / "image.qcow2"
    Qcow2Image.create(str(backup), size)
    slots = size // RUN
    data_slots = sorted(rnd.sample(range(slots), int(slots * data)))
    with Qcow2Image.open(str(backup)) as img:
        for i, s in enumerate(data_slots):
            k = (i * 4099) % WRITE  # every run different
            img.write(s * RUN, block[k:k + RUN])
    copy_sparse(backup, image)
    expected = DirtyBitmap(size, GRAN)
    n = int(size * changed) // WRITE
    data_set = set(data_slots)
    with Qcow2Image.open(str(image), keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        store.add("b", GRAN)
        store.set_in_use(["b"], True)  # a writer began...
        hole_slots = [s for s in range(slots) if s not in data_set]
        for j in range(n):
            pool = data_slots if j % 2 or not hole_slots else hole_slots
            off = rnd.choice(pool) * RUN + rnd.randrange(RUN // WRITE) * WRITE
            img.write(off, rnd.randbytes(WRITE))
            expected.set(off, WRITE)
    return backup, image, expected  # ...and crashed: b is left in_use


def verify(image: Path, expected: Any) -> list[str]:
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    problems = []
    with Qcow2Image.open(str(image), readonly=True) as img:
        got = Qcow2BitmapStore(img).load("b")
    if got != expected:
        problems.append(f"rebuilt bitmap {got!r} != expected {expected!r}")
    flags = [b["flags"] for b in qemu_bitmap_list(image)]
    if flags != [["auto"]]:
        problems.append(f"qemu-img info flags after --recover: {flags}")
    if (msg := qemu_img_check(image)) is not None:
        problems.append(msg)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI sizes: 256M disk, 1 run")
    ap.add_argument("--size", type=parse_size, help="disk size (default 10G, quick 256M)")
    ap.add_argument("--data", type=float, default=0.25,
                    help="fraction of the disk allocated in the backup (default 0.25)")
    ap.add_argument("--changed", type=float, default=0.01,
                    help="fraction of the disk changed after it (default 0.01)")
    ap.add_argument("--runs", type=int, help="timed runs per tool (default 3, quick 1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path, help="scratch directory (default: under /var/tmp)")
    ap.add_argument("--json", type=Path, help="also write the results there")
    a = ap.parse_args()
    size = a.size or (256 * MiB if a.quick else 10 * GiB)
    runs = a.runs or (1 if a.quick else 3)
    need("qemu-img")
    scratch = Path(tempfile.mkdtemp(prefix="recover-bench-", dir=a.dir or "/var/tmp"))
    try:
        return _bench(a, size, runs, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bench(a: argparse.Namespace, size: int, runs: int, scratch: Path) -> int:
    warm_bytecode(scratch)
    help_text = subprocess.run([*dirtybits_argv(), "bitmap", "--help"], capture_output=True,
                               text=True).stdout
    wired = dirtybits_has("bitmap") and "--recover" in help_text
    recover_argv.wired = wired  # type: ignore[attr-defined]
    how = ("dirtybits bitmap --recover" if wired else
           "the same code via python -c (--recover not wired in cli/bitmap.py yet)")
    print(f"recover bench: {human_size(size)} disk, {a.data:.0%} allocated in the backup, "
          f"{a.changed:.1%} changed in 64 KiB writes, granularity 64 KiB, {runs} run(s), "
          f"page cache warm; ours via {how}")
    backup, image, expected = build(scratch, size, a.data, a.changed, a.seed)
    copy = scratch / "image-copy.qcow2"
    copy_sparse(image, copy)
    for p in (backup, image, copy):  # warm the page cache for both tools alike
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)
    problems: list[str] = []
    times: dict[str, list[float]] = {"dirtybits --recover": [], "qemu-img compare (full)": [],
                                     "qemu-img compare (pair)": []}
    argvs = {
        "dirtybits --recover": (recover_argv(backup, image), 0),
        "qemu-img compare (full)": (["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                                     str(image), str(copy)], 0),
        "qemu-img compare (pair)": (["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                                     str(backup), str(image)], 1),
    }
    output = ""
    for _ in range(runs):
        for name, (argv, want_rc) in argvs.items():
            r: Run = run_timed(argv)
            if r.returncode != want_rc:
                problems.append(f"{name}: exit {r.returncode} (want {want_rc}): {r.tail()}")
            times[name].append(r.seconds)
            if name.startswith("dirtybits"):
                output = r.output.strip()
    problems += verify(image, expected)
    # bytes either tool must read: where backup or image (the same for image and copy) has data
    import_dirtybits()
    from dirtybits.block.recover import DataCompare
    from dirtybits.qcow2.image import Qcow2Image

    with Qcow2Image.open(str(image), readonly=True) as i, \
            Qcow2Image.open(str(backup), readonly=True) as b:
        to_read = DataCompare(i, b, GRAN).total
    print(f"bytes to compare: {fmt_bytes(to_read)} per side; {output}")
    table = Table(["tool", "seconds", "GiB/s of disk", "vs ours"], [26, 9, 13, 8])
    ours = median(times["dirtybits --recover"])
    results = {}
    for name, ts in times.items():
        t = median(ts)
        results[name] = {"seconds": ts, "median": t}
        table.row(name, f"{t:.2f}", f"{size / GiB / t:.2f}", f"{t / ours:.2f}x")
    ratio = median(times["qemu-img compare (full)"]) / ours
    print(f"throughput ratio dirtybits / qemu-img compare (full scan) = {ratio:.2f}x "
          f"(aim >= 0.8x)")
    for p in problems:
        fail(p)
    write_json(a.json, {"bench": "recover", "env": environment(), "size": size,
                        "data": a.data, "changed": a.changed, "bytes_to_compare": to_read,
                        "results": results, "ratio": ratio, "ok": not problems,
                        "problems": problems})
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
