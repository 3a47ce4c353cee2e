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
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
         str(path), str(size)],
        check=True,
    )


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
    """Run one process; wall clock from just before the fork to just after it exits."""
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
