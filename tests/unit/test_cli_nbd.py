"""``dirtybits nbd`` as a user starts it: qemu-nbd's option mistakes refused in words before
anything opens, ``--fork`` returning once the socket accepts, the pid file, the exit when
the last client leaves (no ``-t``), and the image's bitmaps left clean on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dirtybits
import peers
from dirtybits.qcow2.image import Qcow2Image

pytestmark = pytest.mark.timeout(60)
CLI = (sys.executable, "-m", "dirtybits.cli.main", "nbd")


def image(tmp_path: Path) -> str:
    path = str(tmp_path / "d.qcow2")
    Qcow2Image.create(path, 16 << 20)
    with dirtybits.open(path) as node:
        node.bitmaps.add("b0", persistent=True)
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--cache", "bogus"], "Invalid cache mode 'bogus'"),
    (["--discard", "bogus"], "Invalid discard mode `bogus'"),
    (["--detect-zeroes", "unmap"], "setting detect-zeroes to unmap is not allowed without "
                                   "setting discard operation to unmap"),
    (["-k", "/tmp/x.sock", "-p", "10809"], "-p and -b are incompatible with -k"),
    (["-e", "-1"], "Invalid shared device number '-1'"),
    (["--tls-creds", "t0"], "No TLS credentials with id 't0'"),
    (["--object", "secret,id=s0,data=x"],
     "--object secret,id=s0,data=x: only tls-creds-x509 objects are supported"),
    (["--object", "tls-creds-x509,id=t0,endpoint=client,dir=/tmp", "--tls-creds", "t0"],
     "Expecting TLS credentials with a server endpoint"),
    (["-r", "-B", "nope", "-k", "@/s"], "Bitmap 'nope' is not found"),
    (["-k", "/nonexistent/dir/s"], "Failed to bind socket to /nonexistent/dir/s: No such file "
                                   "or directory"),
])
def test_mistakes_are_refused_in_words(tmp_path: Path, args: list[str], message: str) -> None:
    img = image(tmp_path)
    before = Path(img).read_bytes()
    args = [a.replace("@", str(tmp_path)) for a in args]
    proc = subprocess.run([*CLI, *args, img], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc
    assert proc.stderr == f"dirtybits nbd: {message}\n"
    assert Path(img).read_bytes() == before  # nothing touched
    assert not (tmp_path / "s").exists()


def test_fork_pidfile_and_exit_after_the_last_client(tmp_path: Path) -> None:
    img = image(tmp_path)
    with peers.socket_dir("dbnbdcli-") as d:
        sock, pidfile = d / "s", tmp_path / "pid"
        start = time.monotonic()
        proc = subprocess.run([*CLI, "--fork", "--pid-file", str(pidfile), "-f", "qcow2",
                               "-B", "b0", "-k", str(sock), img],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert peers.listening(sock)  # --fork returned once the socket accepts
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        peers.sh("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k",
                 f"nbd+unix:///?socket={sock}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the server did not exit after its only client left")
        assert not pidfile.exists() and not sock.exists()
        assert time.monotonic() - start < 30
    with dirtybits.open(img, readonly=True) as node:
        info = node.bitmaps.info("b0")
        assert not info.inconsistent and info.disk_state.value == "clean"
        assert node.bitmaps.extents("b0") == [(1 << 20, 65536)]
        assert node.read(1 << 20, 4) == b"\x07" * 4
