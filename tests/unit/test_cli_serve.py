"""``dirtybits serve`` as a user starts it: --daemonize returns once the socket accepts,
the pidfile, socket modes, several monitors, SIGTERM/SIGINT closing every bitmap cleanly,
and start-up failures that say why and leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

import dirtybits
import peers
from dirtybits.qcow2.image import Qcow2Image

pytestmark = pytest.mark.timeout(60)


def qcow2(path: Path) -> str:
    Qcow2Image.create(str(path), 64 << 20)
    return str(path)


def blockdev(name: str, path: str) -> str:
    return json.dumps({"driver": "qcow2", "node-name": name,
                       "file": {"driver": "file", "filename": path}})


def qmp(sock: str, *commands: dict[str, object]) -> list[dict[str, object]]:
    """A bare QMP session: negotiate, run ``commands``, return their replies."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock)
        f = s.makefile("rwb")
        assert b"QMP" in f.readline()
        out = []
        for cmd in ({"execute": "qmp_capabilities"}, *commands):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "event" not in msg:
                    break
            out.append(msg)
        return out[1:]


def wait_gone(pid: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still running")


def test_daemonize_pidfile_and_sigterm(tmp_path: Path) -> None:
    img = qcow2(tmp_path / "a.qcow2")
    sock, sock2, pidfile = tmp_path / "q.sock", tmp_path / "q2.sock", tmp_path / "d.pid"
    done = peers.db("serve", "--daemonize", "--pidfile", pidfile, "--blockdev",
                    blockdev("n0", img), "--qmp", f"unix:{sock}",
                    "--qmp", f"unix:{sock2},mode=0660", timeout=30)
    assert done.stdout == "" and done.stderr == ""
    pid = int(pidfile.read_text())
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600   # accepting already
        assert stat.S_IMODE(sock2.stat().st_mode) == 0o660
        replies = qmp(str(sock), {"execute": "block-dirty-bitmap-add",
                                  "arguments": {"node": "n0", "name": "b", "persistent": True}},
                      {"execute": "human-monitor-command",
                       "arguments": {"command-line": 'qemu-io n0 "write 0 64k"'}})
        assert replies == [{"return": {}}, {"return": ""}]
        (nodes,) = qmp(str(sock2), {"execute": "query-named-block-nodes",
                                    "arguments": {"flat": True}})
        assert nodes["return"][0]["dirty-bitmaps"][0]["count"] == 65536  # type: ignore[index]
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    assert not pidfile.exists()
    with dirtybits.open(img, readonly=True) as node:
        info = node.bitmaps.info("b")
        assert info.disk_state.value == "clean" and info.count == 65536


def test_sigint_in_the_foreground_closes_cleanly(tmp_path: Path) -> None:
    img = qcow2(tmp_path / "a.qcow2")
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen([*peers.DIRTYBITS, "serve", "--blockdev", blockdev("n0", img),
                             "--qmp", f"unix:{sock}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 20
        while not peers.listening(sock):
            assert proc.poll() is None and time.monotonic() < end, proc.stderr
            time.sleep(0.02)
        qmp(str(sock), {"execute": "block-dirty-bitmap-add",
                        "arguments": {"node": "n0", "name": "b", "persistent": True}},
            {"execute": "human-monitor-command",
             "arguments": {"command-line": 'qemu-io n0 "write 64k 4k"'}})
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "wrote 4096/4096 bytes at offset 65536" in out
    assert peers.qemu_bitmaps(img) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]


@pytest.mark.parametrize("daemonize", [False, True])
def test_start_up_failure_says_why_and_leaves_nothing(tmp_path: Path, daemonize: bool) -> None:
    sock, pidfile = tmp_path / "q.sock", tmp_path / "d.pid"
    img = qcow2(tmp_path / "a.qcow2")
    args = ["serve", "--pidfile", pidfile, "--qmp", f"unix:{sock}",
            "--blockdev", blockdev("n0", img),
            "--blockdev", blockdev("n1", str(tmp_path / "missing.qcow2"))]
    if daemonize:
        args.insert(1, "--daemonize")
    done = peers.db(*args, ok=(1,), timeout=30)
    assert done.stderr == (f"dirtybits serve: Could not open '{tmp_path}/missing.qcow2': "
                           "No such file or directory\n")
    assert not sock.exists() and not pidfile.exists()
    peers.qemu_img("check", img)  # closed again, not left locked or dirty
    done = peers.db("serve", "--qmp", f"unix:{tmp_path}/no/such/dir/q.sock", ok=(1,))
    assert done.stderr == (f"dirtybits serve: cannot listen on '{tmp_path}/no/such/dir/"
                           "q.sock': No such file or directory\n")
    done = peers.db("serve", "--qmp", "tcp:1234", ok=(1,))
    assert "only unix:PATH" in done.stderr
    done = peers.db("serve", "--blockdev", "{bad", ok=(1,))
    assert done.stderr.startswith("dirtybits serve: --blockdev {bad: JSON parse error")
