"""The QMP core against QEMU itself: the same bytes, cut the same way, sent to
``qemu-system-x86_64 -M none`` and to ``ServerConnection``, get the same replies (the
service behind our core knows only ``query-version`` and answers it with QEMU's own value)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dirtybits.proto.qmp import schema
from dirtybits.proto.qmp.core import ErrorClass, QmpError, Reply, ServerConnection

STEPS = [b'{"execute":"query-version"}', b"[1]", b'{"execute":"qmp_capabilities","id":7}',
         b'{"execute":"qmp_capabilities"}', b'{"execute":"query-version","id":{"a":1}}',
         b'{"foo":1}', b'{"execute":1}', b'{"execute":"query-version","arguments":[]}',
         b'{"execute":"query-version","bogus":1}', b'{"execute":"nope","id":"n"}',
         b'{"exec-oob":"query-version"}', b'{"execute":"query-',
         b'version"} {"execute":"query-version","id":2}', b'{"execute":tru}', b'"str"', b"}",
         b"{}", b'{"execute":"query-version","id":3}\n']


def _recv_all(sock: socket.socket, settle: float = 0.3) -> bytes:
    """Everything the server sends until it has been quiet for ``settle`` seconds."""
    out = b""
    sock.settimeout(settle)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return out
        if not chunk:
            return out
        out += chunk


def _qemu(path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display",
                             "none", "-qmp", f"unix:{path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "QEMU did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.timeout(60)
def test_same_bytes_same_replies_as_qemu(tmp_path: Path) -> None:
    path = tmp_path / "q.sock"
    proc = _qemu(path)
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        greeting = json.loads(_recv_all(sock))
        qemu: list[bytes] = []
        version = None
        for step in STEPS:
            sock.sendall(step)
            got = _recv_all(sock)
            qemu.append(got)
            for line in got.splitlines():
                msg = json.loads(line)
                if isinstance(msg.get("return"), dict) and "qemu" in msg["return"]:
                    version = msg["return"]
        sock.close()
    finally:
        proc.kill()
        proc.wait(10)
    assert version is not None
    ver = greeting["QMP"]["version"]
    server = ServerConnection(ver["qemu"], ver["package"])
    assert json.loads(server.greeting()) == greeting
    ours: list[bytes] = []
    for step in STEPS:
        out = b""
        for item in server.receive(step):
            if isinstance(item, Reply):
                out += item.data
            elif item.name == "query-version" and not item.arguments:
                out += server.ok(item, version)
            else:
                out += server.error(item, ErrorClass.COMMAND_NOT_FOUND,
                                    f"The command {item.name} has not been found")
        ours.append(out)
    assert ours == qemu


BITMAP_OR_STR = schema.Alternate("BlockDirtyBitmapOrStr", schema.Struct(
    "BlockDirtyBitmap", (schema.Member("node", schema.STR), schema.Member("name", schema.STR))))
SPECS = {
    "block-dirty-bitmap-add": schema.command(
        "block-dirty-bitmap-add", schema.Member("node", schema.STR),
        schema.Member("name", schema.STR), schema.Member("granularity", schema.UINT32, True),
        schema.Member("persistent", schema.BOOL, True),
        schema.Member("disabled", schema.BOOL, True)),
    "block-dirty-bitmap-merge": schema.command(
        "block-dirty-bitmap-merge", schema.Member("node", schema.STR),
        schema.Member("target", schema.STR),
        schema.Member("bitmaps", schema.List(BITMAP_OR_STR))),
}
ARGUMENTS = [
    ("block-dirty-bitmap-add", {}), ("block-dirty-bitmap-add", {"node": "n"}),
    ("block-dirty-bitmap-add", {"bogus": 1}), ("block-dirty-bitmap-add", {"node": 1, "name": "b"}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": "x"}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": -1}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": 1.5}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": 1 << 32}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": True}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "persistent": "yes"}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "disabled": None}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "bogus": 1}),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": 65536}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t"}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": "x"}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [1]}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [{"node": "a"}]}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t",
                                  "bitmaps": ["a", {"node": "a", "name": "b", "x": 1}]}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t",
                                  "bitmaps": ["a", {"node": "a", "name": "b"}]}),
]


@pytest.mark.timeout(60)
def test_argument_errors_as_qemus(tmp_path: Path) -> None:
    """QEMU checks arguments before it looks the node up: where QEMU reports an argument
    error, ``schema.check`` reports the same text; where QEMU gets as far as the node
    lookup, ``check`` accepts the arguments."""
    path = tmp_path / "q.sock"
    proc = _qemu(path)
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        _recv_all(sock)
        sock.sendall(b'{"execute":"qmp_capabilities"}')
        _recv_all(sock)
        answers = []
        for name, args in ARGUMENTS:
            sock.sendall(json.dumps({"execute": name, "arguments": args}).encode())
            answers.append(json.loads(_recv_all(sock))["error"]["desc"])
        sock.close()
    finally:
        proc.kill()
        proc.wait(10)
    for (name, args), qemu_says in zip(ARGUMENTS, answers, strict=True):
        try:
            schema.check(args, SPECS[name])
        except QmpError as exc:
            assert str(exc) == qemu_says, (name, args)
        else:
            assert qemu_says.startswith(("Cannot find device", "Node ")), (name, args, qemu_says)
