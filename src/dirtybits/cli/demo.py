"""``dirtybits demo``: a guided tour that runs the real subcommands on a sample disk.

The tour is a list of steps (``STEPS``); each prints a header, the equivalent command line, and
what the command printed. Subcommands run in-process through their modules, exactly as
``dirtybits SUBCOMMAND ...`` would run them. When qemu-img is installed, it checks the image we
wrote, so the tour shows QEMU's own verdict. The backup steps pull an incremental backup over
NBD with dirtybits' own client; later features (backup jobs, the backup tool) add steps.
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

    @property
    def socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "serve.pid"

    @property
    def full(self) -> Path:
        return self.dir / "backup-0-full.qcow2"

    @property
    def incremental(self) -> Path:
        return self.dir / "backup-1-incr.qcow2"

    @property
    def restored(self) -> Path:
        return self.dir / "restored.raw"

    @property
    def nbd_socket(self) -> Path:
        return self.dir / "nbd.sock"


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
        for old in (demo.disk, demo.full, demo.incremental, demo.restored):
            old.unlink(missing_ok=True)
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


def step_full_backup(demo: Demo) -> int:
    _say("# a full backup: a copy of the whole disk; from now on the bitmap counts the")
    _say("# changes since this copy")
    status = dirtybits("convert", "-f", "qcow2", "-O", "qcow2", str(demo.disk),
                       str(demo.full))
    if status != 0:
        return status
    return dirtybits("bitmap", "--clear", str(demo.disk), "since-full")


def _serve_argv(demo: Demo) -> list[str]:
    return ["serve", "--daemonize", "--pidfile", str(demo.pidfile),
            "--blockdev", f"driver=file,node-name=f0,filename={demo.disk}",
            "--blockdev", "driver=qcow2,node-name=disk,file=f0",
            "--qmp", f"unix:{demo.socket}"]


def _start_daemon(demo: Demo) -> int:
    argv = _serve_argv(demo)
    _say("$ " + shlex.join(["dirtybits", *argv]))
    proc = subprocess.run([sys.executable, "-m", "dirtybits.cli.main", *argv], check=False)
    return proc.returncode


def _qmp(demo: Demo, name: str, arguments: dict[str, object] | None = None) -> object:
    import json

    from dirtybits.services.qmp.client import QmpClient

    _say(f"(QMP) {name}" + (f" {json.dumps(arguments)}" if arguments else ""))
    with QmpClient.connect(str(demo.socket)) as c:
        return c.execute(name, arguments)


def _show_bitmaps(demo: Demo) -> None:
    nodes = _qmp(demo, "query-named-block-nodes", {"flat": True})
    assert isinstance(nodes, list)
    for node in nodes:
        for b in node.get("dirty-bitmaps", []):
            ext = b.get("x-dirtybits", {})
            state = ext.get("disk-state", "?")
            why = f" ({ext['reason']})" if "reason" in ext else ""
            _say(f"  {node['node-name']}/{b['name']}: {b['count']} dirty bytes, "
                 f"{'recording' if b['recording'] else 'not recording'}, on disk: "
                 f"{state}{why}")


def step_serve(demo: Demo) -> int:
    _say("# resilient mode: a coarse write-intent map lets a crash be recovered without a")
    _say("# full backup (the bitmaps come back as a superset of the truth)")
    status = dirtybits("amend", "-o", "resilient=on", str(demo.disk))
    if status != 0:
        return status
    _say("# the daemon keeps the disk open; any QMP client drives it (qmp-shell, libvirt)")
    status = _start_daemon(demo)
    if status != 0:
        return status
    _qmp(demo, "block-dirty-bitmap-add", {"node": "disk", "name": "live", "persistent": True})
    _say("# a guest-like write through the daemon, in qemu-io syntax (QEMU's HMP command)")
    _qmp(demo, "human-monitor-command",
         {"command-line": 'qemu-io disk "write -P 0x33 4M 128k"'})
    _show_bitmaps(demo)
    return 0


def step_crash(demo: Demo) -> int:
    import os
    import signal
    import time

    pid = int(demo.pidfile.read_text())
    _qmp(demo, "human-monitor-command",
         {"command-line": 'qemu-io disk "write -P 0x44 8M 64k"'})
    _say(f"$ kill -9 {pid}      # no checkpoint, no clean close")
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    demo.pidfile.unlink(missing_ok=True)
    _say("# the same command line again: every bitmap comes back clean (its last checkpoint")
    _say("# covers every write), recovered (resilient mode: a superset, still usable for an")
    _say("# incremental backup) or inconsistent (never trusted), and says which and why")
    status = _start_daemon(demo)
    if status != 0:
        return status
    _show_bitmaps(demo)
    _qmp(demo, "quit")
    for _ in range(500):
        if not demo.pidfile.exists():
            break
        time.sleep(0.01)
    return 0


def step_pull(demo: Demo) -> int:
    """An incremental backup pulled over NBD: the export's dirty-bitmap context says which
    extents changed since the full backup; only those are read and written into a qcow2
    over the full one."""
    import os
    import time

    from dirtybits.proto.nbd.constants import NBD_STATE_DIRTY
    from dirtybits.services.nbd.client import NbdClient

    status = dirtybits("create", "-f", "qcow2", "-b", demo.full.name, "-F", "qcow2",
                       str(demo.incremental))
    if status != 0:
        return status
    demo.nbd_socket.unlink(missing_ok=True)
    argv = ["nbd", "--fork", "-r", "-f", "qcow2", "-B", "since-full", "-k",
            str(demo.nbd_socket), str(demo.disk)]
    _say("$ " + shlex.join(["dirtybits", *argv]) + "      # qemu-nbd's options")
    proc = subprocess.run([sys.executable, "-m", "dirtybits.cli.main", *argv], check=False)
    if proc.returncode != 0:
        return proc.returncode
    context = "qemu:dirty-bitmap:since-full"
    _say(f"# the client reads {context} to learn what changed, then just those extents")
    copied = 0
    import dirtybits as db

    with NbdClient.connect_unix(str(demo.nbd_socket), contexts=[context]) as client, \
            db.open(str(demo.incremental)) as out:
        for offset, length, flags in client.block_status(context):
            if flags & NBD_STATE_DIRTY:
                _say(f"  dirty {offset:>12} {length:>10}: copied")
                out.write(offset, client.read(offset, length))
                copied += length
        size = client.size
    _say(f"# {copied} of {size} bytes copied ({100 * copied / size:.3f}% of the disk); the")
    _say("# crash made the bitmap a superset (whole write-intent regions): more than was")
    _say("# written, never less")
    for _ in range(500):  # not persistent (no -t): it exits once its client left
        if not demo.nbd_socket.exists():
            break
        time.sleep(0.01)
    del os
    return 0


def step_restore(demo: Demo) -> int:
    _say("# restore the latest point (the incremental over the full backup) to a new raw")
    _say("# disk, then compare it with the disk itself")
    status = dirtybits("convert", "-O", "raw", str(demo.incremental), str(demo.restored))
    if status != 0:
        return status
    return dirtybits("compare", "-f", "qcow2", "-F", "raw", str(demo.disk),
                     str(demo.restored))


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
    Step("Take a full backup; the bitmap now counts changes since it", step_full_backup),
    Step("Serve the disk over QMP (dirtybits serve, a qemu-storage-daemon peer)", step_serve),
    Step("Crash the daemon (kill -9) and start it again", step_crash),
    Step("Pull an incremental backup over NBD (dirtybits nbd, a qemu-nbd peer)", step_pull),
    Step("Restore the backup chain and compare it with the disk", step_restore),
    Step("Show the image", step_info),
    Step("Check the image with dirtybits", step_check),
    Step("Check the image with QEMU's own qemu-img", step_qemu_img_check),
]


def run(args: argparse.Namespace) -> int:
    from dirtybits.errors import DirtybitsError

    demo = Demo(dir=Path(args.dir))
    try:
        prepare_dir(demo)
        demo.socket.unlink(missing_ok=True)
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
