"""Running the QEMU peers (and our CLI) from tests and benchmarks: one copy of the plumbing.

``import peers`` works from every test directory (pytest puts ``tests/`` on ``sys.path``:
``pythonpath`` in pyproject's pytest config). Modules that also run as scripts put ``tests/``
there themselves: ``bench/common.py`` (the benches use ``from common import peers``),
``tests/crash/harness.py`` (its workers, ``powerloss.py``, ``bench/torture``) and
``tests/fuzz/test_fuzz_images.py`` (its ``--worker`` child). ``peers.qmp`` starts
``qemu-system-x86_64 -M none`` and ``qemu-storage-daemon`` with a QMP socket (it needs
``qemu.qmp``, from the test extras). ``peers.nbd`` serves an image with ``qemu-nbd`` or
``dirtybits nbd`` (``peers.qemu_nbd`` is its qemu-nbd case) and runs the NBD clients:
nbdinfo, nbdcopy, libnbd's Python bindings (under Debian's python3), x509 certificates.

Every command runs with a timeout, its output captured as UTF-8 text (bad bytes replaced);
the functions that check the exit status take ``ok`` (the statuses allowed, ``None`` for any)
and fail with an ``AssertionError`` that shows the command and its output.

    from peers import db, nbd_map, qemu_img, qemu_io

    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write -P 0x5a 0 1M")
    assert nbd_map(img, "b0") == db("bitmap", "--dump", img, "b0").stdout
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peers.nbd import Served

Arg = str | os.PathLike[str]
Done = subprocess.CompletedProcess[str]
Ok = tuple[int, ...] | None

TIMEOUT = 300.0  # seconds one tool run may take (every call here has one)
QEMU_TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
DIRTYBITS = (sys.executable, "-m", "dirtybits.cli.main")  # the CLI as a user runs it


# ---------------------------------------------------------------------------- running commands
def argv(*cmd: Arg) -> list[str]:
    return [os.fspath(c) for c in cmd]


def sh(*cmd: Arg, ok: Ok = (0,), cwd: Arg | None = None, input: str | None = None,
       timeout: float = TIMEOUT, env: Mapping[str, str] | None = None) -> Done:
    """Run a command, output captured; its exit status must be in ``ok`` (``None``: any)."""
    proc = subprocess.run(argv(*cmd), capture_output=True, encoding="utf-8", errors="replace",
                          cwd=cwd, input=input, timeout=timeout,
                          env=None if env is None else dict(env),
                          stdin=subprocess.DEVNULL if input is None else None)
    assert ok is None or proc.returncode in ok, (
        f"{' '.join(argv(*cmd))} exited {proc.returncode} (allowed: {ok})\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run(*cmd: Arg, cwd: Arg | None = None, input: str | None = None,
        timeout: float = TIMEOUT, env: Mapping[str, str] | None = None) -> Done:
    """Run a command, output captured, whatever its exit status."""
    return sh(*cmd, ok=None, cwd=cwd, input=input, timeout=timeout, env=env)


def qemu_img(*args: Arg, ok: Ok = (0,), cwd: Arg | None = None,
             timeout: float = TIMEOUT) -> Done:
    """``qemu-img ARGS``."""
    return sh("qemu-img", *args, ok=ok, cwd=cwd, timeout=timeout)


def qemu_io(image: Arg, *commands: str, fmt: str | None = None, readonly: bool = False,
            options: Iterable[Arg] = (), ok: Ok = (0,), cwd: Arg | None = None,
            input: str | None = None, timeout: float = TIMEOUT) -> Done:
    """``qemu-io [-f FMT] [-r] OPTIONS -c COMMAND... IMAGE`` (commands in order)."""
    return sh("qemu-io", *(["-f", fmt] if fmt else []), *(["-r"] if readonly else []),
              *options, *[a for c in commands for a in ("-c", c)], image,
              ok=ok, cwd=cwd, input=input, timeout=timeout)


def qemu_bitmaps(image: Arg, *, force_share: bool = False,
                 cwd: Arg | None = None) -> list[dict[str, object]]:
    """``format-specific.data.bitmaps`` of ``qemu-img info --output=json``."""
    info = json.loads(qemu_img("info", "--output=json", *(["-U"] if force_share else []),
                               image, cwd=cwd).stdout)
    return list(info["format-specific"]["data"].get("bitmaps", []))


def db(*args: Arg, ok: Ok = (0,), cwd: Arg | None = None, input: str | None = None,
       timeout: float = TIMEOUT, env: Mapping[str, str] | None = None) -> Done:
    """``dirtybits ARGS`` in a fresh interpreter, as a user runs it."""
    return sh(*DIRTYBITS, *args, ok=ok, cwd=cwd, input=input, timeout=timeout, env=env)


def session(*cmd: Arg, cwd: Arg | None = None,
            stderr: int | None = None) -> subprocess.Popen[str]:
    """An interactive process (``qemu-io IMAGE``, ``dirtybits io IMAGE``) with a pipe to its
    standard input and one from its standard output, both text: ``say`` talks to it. The
    caller ends it (``communicate``, ``kill_after``); ``with session(...) as proc:`` waits for
    it at the end."""
    return subprocess.Popen(argv(*cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, encoding="utf-8", cwd=cwd)


def db_session(*args: Arg, cwd: Arg | None = None,
               stderr: int | None = None) -> subprocess.Popen[str]:
    """``session`` of ``dirtybits ARGS`` (``io IMAGE``, say)."""
    return session(*DIRTYBITS, *args, cwd=cwd, stderr=stderr)


Until = str | Callable[[str], bool]  # a line that contains this string, or that passes this test


def say(proc: subprocess.Popen[str], line: str, until: Until) -> str:
    """Send ``line`` to a ``session``, then read its output up to the first line that contains
    ``until`` (or for which ``until(line)`` is true): that line, with its newline (fails when
    the output ends first)."""
    assert proc.stdin is not None and proc.stdout is not None
    done = until if callable(until) else lambda out: until in out
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    while not done(out := proc.stdout.readline()):
        assert out, f"{line!r}: the output ended before the line awaited ({until!r})"
    return out


def kill_after(proc: subprocess.Popen[str], commands: Iterable[str], until: Until) -> None:
    """``say`` each command to a ``session`` (each done once a line shows ``until``), then kill
    it with SIGKILL (also when a command failed), reap it and close its pipes."""
    with proc:
        try:
            for c in commands:
                say(proc, c, until)
        finally:
            proc.send_signal(signal.SIGKILL)


def db_crash_after(img: Arg, *commands: str,
                   options: Iterable[Arg] = ("--checkpoint=none",)) -> None:
    """Run commands in ``dirtybits io OPTIONS IMG`` (by default with no checkpoints), killed
    with SIGKILL once each command has been done (a ``length`` after it is the fence)."""
    proc = db_session("io", *options, img)
    kill_after(proc, (f"{c}\nlength" for c in commands), lambda out: out.endswith(" MiB\n"))


# ---------------------------------------------------------------------------- servers
def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL when it has not exited within ``timeout`` seconds; reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def listening(sock: Path) -> bool:
    """Whether a process listens on the unix socket ``sock`` (``/proc/net/unix``: the socket
    file exists a moment before its server calls listen())."""
    path = os.fspath(sock)
    with open("/proc/net/unix") as f:
        next(f)  # Num RefCount Protocol Flags Type St Inode Path
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].rstrip("\n") == path \
                    and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                return True
    return False


@contextmanager
def socket_dir(prefix: str) -> Iterator[Path]:
    """A fresh private directory under /tmp for unix sockets (a socket's path must stay short:
    108 bytes; a test's tmp_path may be longer), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def qemu_nbd(image: Arg, *, fmt: str | None = "qcow2", bitmaps: Iterable[str] = (),
             readonly: bool = True, options: Iterable[Arg] = (), cwd: Arg | None = None,
             timeout: float = 10) -> Iterator[Served]:
    """``nbd.serve("qemu-nbd", ...)`` on a unix socket, default export: ``qemu-nbd -t``, each
    of ``bitmaps`` exported (``-B``); yields once it listens (within ``timeout`` seconds, or
    fails with its stderr). Stopped (SIGTERM, then SIGKILL) and its socket removed after."""
    from peers import nbd  # imports this package: not at the top

    with nbd.serve("qemu-nbd", image, fmt=fmt, bitmaps=bitmaps, readonly=readonly,
                   options=options, cwd=cwd, timeout=timeout) as served:
        yield served


def nbdinfo_map(uri: str, context: str = "base:allocation", *extra: str,
                ok: Ok = (0,)) -> Done:
    """``nbdinfo --map=CONTEXT EXTRA... URI``."""
    return sh("nbdinfo", f"--map={context}", *extra, uri, ok=ok)


def nbd_map(image: Arg, bitmap: str, *extra: str, fmt: str | None = "qcow2") -> str:
    """What ``nbdinfo --map=qemu:dirty-bitmap:BITMAP EXTRA...`` prints through ``qemu-nbd -r
    -B BITMAP``."""
    with qemu_nbd(image, fmt=fmt, bitmaps=[bitmap]) as nbd:
        return nbdinfo_map(nbd.uri, f"qemu:dirty-bitmap:{bitmap}", *extra).stdout


def nbd_dirty_runs(image: Arg, bitmap: str) -> list[tuple[int, int]]:
    """(offset, length) of each dirty extent nbdinfo reports through ``qemu-nbd -B``."""
    return [(e["offset"], e["length"]) for e in json.loads(nbd_map(image, bitmap, "--json"))
            if e["type"] == 1]


def nbd_dirty_bytes(image: Arg, bitmap: str) -> int:
    """Sum of the dirty extents nbdinfo reports through ``qemu-nbd -B``."""
    return sum(length for _, length in nbd_dirty_runs(image, bitmap))


def missing_tools(tools: Iterable[str] = QEMU_TOOLS) -> list[str]:
    """The tools (of ``QEMU_TOOLS`` by default) not on PATH."""
    return [t for t in tools if shutil.which(t) is None]
