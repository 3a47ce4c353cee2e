"""``dirtybits demo``: a guided tour that runs the real subcommands on a sample disk.

The tour is a list of steps (``STEPS``); each prints a header, the equivalent command line, and
what the command printed. Subcommands run in-process through their modules, exactly as
``dirtybits SUBCOMMAND ...`` would run them. When qemu-img is installed, it checks the image we
wrote, so the tour shows QEMU's own verdict. Later features (backups) add steps.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = "demo-output"
DISK_NAME = "disk.qcow2"
DISK_SIZE = "1G"

# (qemu-io command, what it does): written, then read back and verified.
PATTERNS: list[tuple[str, str]] = [
    ("write -P 0xaa 0 64k", "64 KiB of 0xaa at the start of the disk"),
    ("write -P 0x55 1M 1M", "1 MiB of 0x55 at offset 1 MiB"),
    ("write -P 0x0f 1023M 1M", "1 MiB of 0x0f in the last megabyte"),
    ("write -z 1M 64k", "zeroes over the first 64 KiB of the 0x55 run"),
]
VERIFY: list[str] = [
    "read -P 0xaa 0 64k",
    "read -P 0 1M 64k",
    "read -P 0x55 1088k 960k",
    "read -P 0x0f 1023M 1M",
    "read -P 0 512M 64k",
]


@dataclass
class Demo:
    """What the steps share: where the files go."""

    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / DISK_NAME


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[Demo], int]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the built-in demonstration",
        description=(
            "Create a sample 1 GiB qcow2 disk, write patterns to it, inspect and check it "
            "(and let qemu-img check it too, when installed)."
        ),
    )
    p.add_argument(
        "--dir",
        default=DEFAULT_DIR,
        help=f"directory for the demo's files (default: ./{DEFAULT_DIR})",
    )


def _say(text: str = "") -> None:
    print(text, flush=True)


def dirtybits(name: str, *argv: str) -> int:
    """Run ``dirtybits NAME ARGV...`` in-process; return its exit status."""
    from dirtybits.cli.main import SUBCOMMANDS, build_parser

    _say("$ " + shlex.join(["dirtybits", name, *argv]))
    try:
        args = build_parser(name).parse_args([name, *argv])
    except SystemExit as exc:  # argparse reports bad arguments by exiting
        return exc.code if isinstance(exc.code, int) else 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    status = int(module.run(args))
    sys.stdout.flush()
    return status


def prepare_dir(demo: Demo) -> None:
    """Make the demo's directory and remove an old disk (a rerun starts from a new one).

    Raises ``UsageError`` when the place is not a usable directory (a file, a FIFO, somewhere
    that cannot be written), with the system's reason.
    """
    from dirtybits.errors import UsageError

    try:
        demo.dir.mkdir(parents=True, exist_ok=True)
        demo.disk.unlink(missing_ok=True)
    except FileExistsError:
        raise UsageError(f"cannot use '{demo.dir}' for the demo's files: it exists and is "
                         "not a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot use '{demo.dir}' for the demo's files: "
                         f"{exc.strerror or exc}") from None


def step_create(demo: Demo) -> int:
    return dirtybits("create", "-f", "qcow2", str(demo.disk), DISK_SIZE)


def step_add_bitmap(demo: Demo) -> int:
    return dirtybits("bitmap", "--add", str(demo.disk), "since-full")


def step_write(demo: Demo) -> int:
    for _, what in PATTERNS:
        _say(f"# {what}")
    cmds = [arg for command, _ in PATTERNS for arg in ("-c", command)]
    return dirtybits("io", "-f", "qcow2", *cmds, str(demo.disk))


def step_verify(demo: Demo) -> int:
    cmds = [arg for command in VERIFY for arg in ("-c", command)]
    return dirtybits("io", "-f", "qcow2", *cmds, str(demo.disk))


def step_dump_bitmap(demo: Demo) -> int:
    _say("# the bitmap now lists exactly the 64 KiB granules the writes touched")
    return dirtybits("bitmap", "--dump", str(demo.disk), "since-full")


def step_info(demo: Demo) -> int:
    return dirtybits("info", str(demo.disk))


def step_check(demo: Demo) -> int:
    return dirtybits("check", str(demo.disk))


def step_qemu_img_check(demo: Demo) -> int:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        _say("qemu-img is not installed: skipped (scripts/setup installs it)")
        return 0
    cmd = [qemu_img, "check", "-f", "qcow2", str(demo.disk)]
    _say("$ " + shlex.join(["qemu-img", *cmd[1:]]))
    proc = subprocess.run(cmd, check=False)
    verdicts = {
        0: "clean: no errors, no leaks",
        1: "check not completed (internal error)",
        2: "CORRUPT: errors found",
        3: "leaked clusters found",
    }
    _say(f"qemu-img's verdict: {verdicts.get(proc.returncode, f'exit {proc.returncode}')}")
    return proc.returncode


STEPS: list[Step] = [
    Step("Create a sample 1 GiB qcow2 disk", step_create),
    Step("Add a persistent dirty bitmap (stored in the image, QEMU's format)", step_add_bitmap),
    Step("Write a few patterns (qemu-io syntax); the bitmap records them", step_write),
    Step("Read them back and verify", step_verify),
    Step("Show what the bitmap recorded (as nbdinfo --map would)", step_dump_bitmap),
    Step("Show the image", step_info),
    Step("Check the image with dirtybits", step_check),
    Step("Check the image with QEMU's own qemu-img", step_qemu_img_check),
]


def run(args: argparse.Namespace) -> int:
    from dirtybits.errors import DirtybitsError

    demo = Demo(dir=Path(args.dir))
    try:
        prepare_dir(demo)
    except DirtybitsError as exc:
        print(f"dirtybits demo: {exc}", file=sys.stderr)
        return 1
    for number, step in enumerate(STEPS, 1):
        _say()
        _say(f"==> Step {number}/{len(STEPS)}: {step.title}")
        try:
            status = step.run(demo)
        except DirtybitsError as exc:
            print(f"dirtybits demo: step {number} failed: {exc}", file=sys.stderr)
            return 1
        if status != 0:
            print(f"dirtybits demo: step {number} failed (exit {status})", file=sys.stderr)
            return status
    _say()
    _say(f"Demo finished: the image is {demo.disk}")
    return 0
