"""Helpers shared by the benchmarks: tools, fresh images, timed runs, tables, JSON notes.

Every timing is wall clock around a whole process (start-up, the commands, the final ``flush``,
exit), because that is what a user of either tool pays.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# tests/peers runs the QEMU tools, for the benches (``from common import peers``) as for the tests
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import peers

ROOT = Path(__file__).resolve().parent.parent

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
Feed = Literal["args", "stdin"]

_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": GiB << 10}


def parse_size(text: str) -> int:
    """``"64k"``, ``"1M"``, ``"1GiB"``, ``"4096"`` -> bytes (binary units, as qemu-img)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtb]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m[1]) * _UNITS[m[2]]


def human_size(n: int) -> str:
    for unit, scale in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def dirtybits_argv() -> list[str]:
    """How to start the ``dirtybits`` CLI of this checkout with this interpreter."""
    script = Path(sys.executable).with_name("dirtybits")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "dirtybits.cli.main"]


def warm_bytecode(scratch: Path) -> None:
    """Let the child Pythons use compiled bytecode, as an installed dirtybits does, even when
    ``PYTHONDONTWRITEBYTECODE`` is set: compile the package into a cache under ``scratch``."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src" / "dirtybits")],
                   check=True)


def dirtybits_has(subcommand: str) -> bool:
    """Whether ``dirtybits SUBCOMMAND`` exists yet (``--help`` exits 0)."""
    proc = subprocess.run([*dirtybits_argv(), subcommand, "--help"], capture_output=True)
    return proc.returncode == 0


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"bench: {tool} not found (run scripts/setup)")
    return path


def create_image(path: Path, size: int, cluster_size: int = 64 * KiB) -> None:
    """A fresh qcow2 made by qemu-img, so every tool starts from the same bytes."""
    path.unlink(missing_ok=True)
    peers.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path,
                   str(size))


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (needs root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class Run:
    seconds: float
    returncode: int
    output: str  # stdout + stderr, kept for error reports

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 8) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


def run_timed(argv: Sequence[str], stdin: bytes | None = None, timeout: float = 3600) -> Run:
    """Run one process; wall clock from just before the fork to just after it exits. The page
    cache's dirty pages are written back first (not timed): a run never pays for the last
    one's."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(
        list(argv), input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - start
    return Run(seconds, proc.returncode, proc.stdout.decode(errors="replace"))


def command_argv(
    tool: Sequence[str], image: Path, commands: Sequence[str], feed: Feed
) -> list[str]:
    if feed == "args":
        return [*tool, *(a for c in commands for a in ("-c", c)), str(image)]
    return [*tool, str(image)]


def run_commands(tool: Sequence[str], image: Path, commands: Sequence[str], feed: Feed) -> Run:
    """Run qemu-io style ``commands`` and a final ``flush`` on ``image`` in one process."""
    cmds = [*commands, "flush"]
    stdin = "".join(c + "\n" for c in cmds).encode() if feed == "stdin" else None
    return run_timed(command_argv(tool, image, cmds, feed), stdin)


def argv_fits(argv: Sequence[str], margin: int = 256 * KiB) -> bool:
    """Whether ``execve`` takes ``argv`` with the current environment (ARG_MAX, MAX_ARG_STRLEN)."""
    ptr = 8
    need_bytes = sum(len(a.encode()) + 1 + ptr for a in argv)
    need_bytes += sum(len(k) + len(v) + 2 + ptr for k, v in os.environ.items())
    longest = max((len(a.encode()) for a in argv), default=0)
    return need_bytes + margin < os.sysconf("SC_ARG_MAX") and longest < 128 * KiB


def choose_feed(feed: str, argvs: Sequence[Sequence[str]]) -> Feed:
    """``args`` or ``stdin`` as asked; ``auto``: ``-c`` arguments when every command line fits
    ARG_MAX, else one command a line on standard input."""
    if feed in ("args", "stdin"):
        return feed  # type: ignore[return-value]
    return "args" if all(argv_fits(a) for a in argvs) else "stdin"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}" if value >= 1 else f"{value:.3f}"


def fmt_ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "-"
    return f"{ours / theirs:.2f}x"


class Table:
    """A plain ``a | b | c`` table printed row by row as results come in."""

    def __init__(self, headers: Sequence[str], widths: Sequence[int]):
        self.widths = list(widths)
        self.row(*headers)
        print("-+-".join("-" * w for w in self.widths), flush=True)

    def row(self, *cells: str) -> None:
        first, *rest = cells
        parts = [first.ljust(self.widths[0])] + [
            c.rjust(w) for c, w in zip(rest, self.widths[1:], strict=True)
        ]
        print(" | ".join(parts), flush=True)


def tool_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def environment() -> dict[str, Any]:
    """Where the numbers came from, for the JSON notes."""
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": rev,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "qemu_io": tool_version("qemu-io"),
        "qemu_img": tool_version("qemu-img"),
    }


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {path}")


def fail(message: str) -> None:
    print(f"\n*** FAIL: {message}\n", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- bytes written by a process
@dataclass
class Measured(Run):
    """A run plus the child's I/O counters from ``/proc/PID/io``, read after it exited and
    before it was reaped: ``wchar`` counts every byte the process handed to write(2)/pwrite(2)
    (image, pipes, everything, cached or not); ``write_bytes`` what it sent towards the block
    layer (page-cache pages it dirtied, O_DIRECT writes)."""

    wchar: int = 0
    write_bytes: int = 0
    rchar: int = 0
    read_bytes: int = 0


def proc_io(pid: int) -> dict[str, int]:
    """``/proc/PID/io`` as a dict (all threads of the process, dead ones included)."""
    fields = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = int(value)
    return fields


def run_measured(argv: Sequence[str], stdin: bytes | None = None,
                 timeout: float = 3600) -> Measured:
    """Run one process like :func:`run_timed` and also count what it read and wrote.

    ``os.waitid(WEXITED | WNOWAIT)`` returns when the child has exited but leaves it a zombie,
    whose ``/proc/PID/io`` still holds the totals of all its threads; then it is reaped. Output
    goes to a pipe drained by a thread, so it is not counted as disk writes (it is in ``wchar``:
    keep it in mind for commands that print a lot)."""
    import tempfile
    import threading

    with tempfile.TemporaryFile() as feed:
        if stdin is not None:
            feed.write(stdin)
            feed.seek(0)
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdin=feed if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        chunks: list[bytes] = []
        assert proc.stdout is not None
        out = proc.stdout
        reader = threading.Thread(target=lambda: chunks.append(out.read()), daemon=True)
        reader.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            seconds = time.perf_counter() - start
            io = proc_io(proc.pid)
        finally:
            timer.cancel()
            proc.wait()
            reader.join()
            out.close()
    return Measured(seconds, proc.returncode, b"".join(chunks).decode(errors="replace"),
                    wchar=io.get("wchar", 0), write_bytes=io.get("write_bytes", 0),
                    rchar=io.get("rchar", 0), read_bytes=io.get("read_bytes", 0))


def human_disk(n: int) -> str:
    """``human_size`` that also says ``16T``."""
    tib = GiB << 10
    return f"{n // tib}T" if n >= tib and n % tib == 0 else human_size(n)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def copy_sparse(src: Path, dst: Path) -> None:
    """A fresh copy of a template image for a run that changes it (holes stay holes)."""
    dst.unlink(missing_ok=True)
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


# ---------------------------------------------------------------- images with bitmaps
def import_dirtybits() -> None:
    """Make ``import dirtybits`` work in the bench process (the checkout's ``src`` if the
    package is not installed)."""
    try:
        import dirtybits  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))


def populated_bitmap(size: int, granularity: int, cluster_size: int, seed: int,
                     extra_runs: int = 64) -> Any:
    """A ``DirtyBitmap`` whose every on-disk data cluster has dirty bits (so QEMU and we must
    store every cluster): one granule at a seeded place in each cluster's span of the disk,
    plus ``extra_runs`` seeded runs of 1-16 granules, so bitmaps of different seeds differ."""
    import random

    import_dirtybits()
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

    rnd = random.Random(seed)
    bm = DirtyBitmap(size, granularity)
    span = cluster_size * 8 * granularity  # disk bytes one bitmap data cluster covers
    granules = -(-size // granularity)
    for start in range(0, size, span):
        g = start // granularity + rnd.randrange(min(span, size - start) // granularity or 1)
        bm.set(g * granularity, granularity)
    for _ in range(extra_runs):
        g = rnd.randrange(granules)
        bm.set(g * granularity, rnd.randint(1, 16) * granularity)
    return bm


def scattered_bitmap(size: int, granularity: int, runs: int, seed: int) -> Any:
    """A ``DirtyBitmap`` with exactly ``runs`` separate dirty runs of 1-16 granules at seeded
    places (never touching: each starts on its own 32-granule slot)."""
    import random

    import_dirtybits()
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

    rnd = random.Random(seed)
    bm = DirtyBitmap(size, granularity)
    slots = (size // granularity) // 32
    if runs > slots:
        raise ValueError(f"{runs} runs do not fit a {size}-byte disk at {granularity}")
    for slot in sorted(rnd.sample(range(slots), runs)):
        bm.set(slot * 32 * granularity, rnd.randint(1, 16) * granularity)
    return bm


def make_bitmap_image(path: Path, size: int, bitmaps: Sequence[tuple[str, Any]],
                      cluster_size: int = 64 * KiB) -> None:
    """A qemu-img-created qcow2 with the given ``(name, DirtyBitmap)`` stored as persistent
    enabled bitmaps, written in-process through dirtybits' bitmap store (seconds for 256 MiB
    of bitmap data, where QEMU would need a write per dirty run). Callers check the result
    with ``qemu-img check`` / ``qemu-img info``."""
    import_dirtybits()
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.qcow2.image import Qcow2Image

    create_image(path, size, cluster_size)
    with Qcow2Image.open(str(path), keep_bitmaps=True) as img:
        store = Qcow2BitmapStore(img)
        for name, bm in bitmaps:
            store.add(name, bm.granularity)
            if bm.count_bits():
                store.store(name, bm)


def qemu_img_check(path: Path) -> str | None:
    """None when ``qemu-img check`` is clean, else what it said."""
    proc = peers.run("qemu-img", "check", "-f", "qcow2", path)
    if proc.returncode == 0:
        return None
    return f"qemu-img check {path.name}: exit {proc.returncode}: " \
           f"{(proc.stdout + proc.stderr).strip()[-500:]}"


def qemu_bitmap_list(path: Path) -> list[dict[str, Any]]:
    """The bitmaps ``qemu-img info --output=json`` lists (name, granularity, flags)."""
    return peers.qemu_bitmaps(path, force_share=True)


def bitmap_digests(path: Path) -> dict[str, str]:
    """name -> QEMU's sha256 of each bitmap, read through dirtybits (``"in-use"`` or the error
    for a bitmap that cannot be read)."""
    import_dirtybits()
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.errors import DirtybitsError
    from dirtybits.qcow2.image import Qcow2Image

    digests: dict[str, str] = {}
    with Qcow2Image.open(str(path), readonly=True) as img:
        store = Qcow2BitmapStore(img)
        for sb in store.bitmaps:
            try:
                digests[sb.name] = store.load(sb.name).sha256()
            except DirtybitsError as exc:
                digests[sb.name] = f"unreadable: {exc}"
    return digests
