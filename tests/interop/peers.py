"""Running the QEMU peers (and our CLI) from interop tests: one copy of the plumbing.

Test modules import it after putting this folder on ``sys.path`` (pytest runs them with
``--import-mode=importlib``, which does not).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

Arg = str | os.PathLike[str]
Done = subprocess.CompletedProcess[str]


def sh(*cmd: Arg, ok: tuple[int, ...] = (0,)) -> Done:
    """Run a command; its exit status must be in ``ok``."""
    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode in ok, (cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc


def db(*args: Arg, ok: tuple[int, ...] = (0,)) -> Done:
    """``dirtybits ARGS`` in a fresh interpreter, as a user runs it."""
    return sh(sys.executable, "-m", "dirtybits.cli.main", *args, ok=ok)


def nbd_map(path: Path, bitmap: str, *extra: str) -> str:
    """``nbdinfo --map=qemu:dirty-bitmap:BITMAP`` through ``qemu-nbd -r -B BITMAP``."""
    sock = path.parent / f"nbd-{os.getpid()}.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-k", str(sock), "-f", "qcow2", "-B",
                             bitmap, str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        for _ in range(200):  # the socket exists a moment before qemu-nbd listens on it
            if sock.exists():
                done = sh("nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}", *extra,
                          f"nbd+unix:///?socket={sock}", ok=(0, 1))
                if done.returncode == 0:
                    return done.stdout
                assert "Connection refused" in done.stderr, done.stderr
            time.sleep(0.05)
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"qemu-nbd did not come up: {proc.returncode} {err!r}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def nbd_dirty_bytes(path: Path, bitmap: str) -> int:
    """Sum of the dirty extents nbdinfo reports through ``qemu-nbd -B``."""
    return sum(e["length"] for e in json.loads(nbd_map(path, bitmap, "--json"))
               if e["type"] == 1)


def qemu_bitmaps(path: Path, *, force_share: bool = False) -> list[dict[str, object]]:
    """``format-specific.data.bitmaps`` of ``qemu-img info --output=json``."""
    info = json.loads(sh("qemu-img", "info", "--output=json", *(["-U"] if force_share else []),
                         path).stdout)
    return list(info["format-specific"]["data"].get("bitmaps", []))


def db_crash_after(img: Path, *commands: str) -> None:
    """Run ``dirtybits io`` commands in a session (no checkpoints) that is then killed with
    SIGKILL, once each command has been done."""
    proc = subprocess.Popen([sys.executable, "-m", "dirtybits.cli.main", "io",
                             "--checkpoint=none", str(img)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    for c in commands:
        proc.stdin.write(c + "\nlength\n")
        proc.stdin.flush()
        while not proc.stdout.readline().endswith(" MiB\n"):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
