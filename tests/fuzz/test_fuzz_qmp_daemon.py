"""Hypothesis against a running daemon's QMP monitors: any bytes, any JSON, any arguments.

The daemon (``services.daemon.Daemon``, in process, on a thread of its own with its asyncio
loop; its ``QmpServer`` built with a small ``MAX_MESSAGE``) serves an 8 MiB qcow2 image as
node ``n0``. Each example opens a monitor (negotiated or not) and sends one of: a random
JSON value; a command (a known name or a random one) with arguments of the right shape, of
random types, with unknown members, random bitmap and node names, a random ``id``; a long
string near the size limit; deep nesting; bytes that are not UTF-8 inside a string; random
bytes; a message cut in two sends; a message cut short by a disconnect; several messages in
one send; two monitors sending batches at once. The properties:

- every complete message gets exactly one reply, in order, with its ``id``: a ``return``
  or an ``error`` with a known class and a non-empty text, strict JSON (no ``NaN``); only a
  protocol break (bytes that are not UTF-8, a message past the size limit, nesting past the
  depth limit) may close the connection instead, and then it must;
- no reply says ``internal error`` (the server's text for an unexpected Python exception in
  a handler: a bug), no monitor task dies (the loop's exception handler is never called),
  the daemon's thread runs on;
- a second, well-behaved monitor, connected for the whole module, answers ``query-version``
  after every example.

Then a state machine of valid bitmap commands (add, remove, clear, enable, disable, merge,
copy, edit, transactions, checkpoints) and guest requests through ``qemu-io`` (writes,
write-zeroes, discards; some unaligned) keeps a model (which bitmaps exist, their
granularity, persistence and recording, the dirty granules of each) and compares it with
``query-named-block-nodes`` (and one bitmap's ``x-debug-block-dirty-bitmap-sha256``) after
every step.

The bugs it found (lone surrogate escapes, nesting near the limit, NaN, a message over the
limit in one read, unchecked ``blockdev-add`` options, ``block-dirty-bitmap-edit`` under
the same name) are fixed; each keeps a test of its own at the end.
``DIRTYBITS_FUZZ_EXAMPLES=N`` sets the examples; derandomized when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, event, given, note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

sys.path.insert(0, str(Path(__file__).parent))
from fuzzfiles import fuzz_settings, time_limit

from dirtybits.proto.qmp.core import MAX_DEPTH, ErrorClass

TIME_LIMIT = 30.0
# (the examples' own guard, ``time_limit``, replaces pytest-timeout's alarm while it runs)
pytestmark = pytest.mark.timeout(300)
MAX_MESSAGE = 16 << 10  # the daemon's limit here (QEMU's is 64 MiB)
MiB = 1 << 20
DISK = 8 * MiB
NODE = "n0"
CLASSES = {c.value for c in ErrorClass}
# Nesting up to MAX_DEPTH is answered (test_nesting_under_the_limit_gets_a_reply); the
# examples stay below ~975 because this test's own json parser recurses per level.
RECURSION_FREE_DEPTH = 800



# ============================================================================ the daemon
@dataclass
class Served:
    """A daemon on a thread of its own; what its loop reported."""

    sock: str
    image: str
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    daemon: Any
    hmp: list[str]
    loop_errors: list[str] = field(default_factory=list)

    def check_alive(self) -> None:
        assert self.thread.is_alive(), "the daemon's thread ended"
        assert not self.daemon._stopped.is_set(), "the daemon stopped"
        assert not self.loop_errors, self.loop_errors[:3]


@contextlib.contextmanager
def serve(max_message: int = MAX_MESSAGE, **options: Any) -> Iterator[Served]:
    """A daemon serving a fresh image as ``NODE`` (``options``: more of its blockdev's)."""
    from dirtybits.qcow2.image import Qcow2Image
    from dirtybits.services.daemon import Daemon, DaemonConfig, Monitor
    from dirtybits.services.qmp.server import QmpServer

    d = tempfile.mkdtemp(prefix="dirtybits-qmpfuzz-", dir="/tmp")
    image = os.path.join(d, "a.qcow2")
    Qcow2Image.create(image, DISK)
    sock = os.path.join(d, "qmp.sock")
    hmp: list[str] = []
    ready = threading.Event()
    box: dict[str, Any] = {}

    def errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        box["served"].loop_errors.append(f"{context.get('message')}: {exc!r}")
        loop.default_exception_handler(context)

    async def main() -> None:
        daemon = Daemon(DaemonConfig(
            blockdevs=[{"driver": "qcow2", "node-name": NODE, **options,
                        "file": {"driver": "file", "filename": image}}],
            monitors=[Monitor(sock)]), hmp_out=hmp.append)
        daemon.server = QmpServer(daemon.commands, max_message=max_message)
        loop = asyncio.get_running_loop()
        box["served"] = Served(sock, image, threading.current_thread(), loop, daemon, hmp)
        loop.set_exception_handler(errors)
        await daemon.start()
        ready.set()
        await daemon.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # recorded for the test (the thread would hide it)
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="qmp-fuzz-daemon", daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and "error" not in box, box.get("error")
        yield box["served"]
    finally:
        served = box.get("served")
        if served is not None and thread.is_alive():
            served.loop.call_soon_threadsafe(served.daemon.stop)
        thread.join(30)
        shutil.rmtree(d, ignore_errors=True)
    assert "error" not in box, box["error"]


class Closed(Exception):
    """The daemon closed the connection."""


def _no_constants(text: str) -> Any:
    raise ValueError(f"not JSON: {text}")


class Conn:
    """A blocking QMP connection (the test's side: bytes in, messages out)."""

    def __init__(self, path: str, *, negotiate: bool = True, timeout: float = 5) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        greeting = self.message()
        assert "QMP" in greeting, greeting
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}\n')
            assert self.message() == {"return": {}}

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Closed(str(exc)) from None

    def message(self) -> dict[str, Any]:
        """The next message (strict JSON: QEMU never sends NaN); ``Closed`` at EOF."""
        while b"\r\n" not in self.buf:
            try:
                more = self.sock.recv(1 << 16)
            except ConnectionResetError:
                more = b""
            if not more:
                raise Closed(self.buf[:200].decode(errors="replace"))
            self.buf += more
        line, _, self.buf = self.buf.partition(b"\r\n")
        msg = json.loads(line, parse_constant=_no_constants)
        assert isinstance(msg, dict), line[:200]
        return msg

    def reply(self) -> dict[str, Any]:
        """The next reply (events skipped)."""
        while "event" in (msg := self.message()):
            pass
        return msg

    def execute(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        cmd: dict[str, Any] = {"execute": name}
        if args is not None:
            cmd["arguments"] = args
        self.send(json.dumps(cmd).encode() + b"\n")
        return self.reply()

    def closed_soon(self) -> bool:
        """Does the daemon close the connection (replies before that are returned by
        ``message``)?"""
        with contextlib.suppress(Closed):
            while True:
                self.message()
        return True

    def close(self) -> None:
        self.sock.close()


def check_reply(reply: dict[str, Any], ident: Any = None, has_id: bool = False) -> None:
    """A return or an error of a known class with a text; its id; never an internal error."""
    keys = set(reply) - {"id"}
    assert keys in ({"return"}, {"error"}), reply
    if "error" in reply:
        err = reply["error"]
        assert set(err) == {"class", "desc"}, reply
        assert err["class"] in CLASSES, reply
        assert isinstance(err["desc"], str) and err["desc"], reply
        assert "internal error" not in err["desc"], reply
    if has_id:
        assert "id" in reply and reply["id"] == ident, (ident, reply)
    else:
        assert "id" not in reply, reply


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Served, Conn]]:
    with serve() as s:
        watcher = Conn(s.sock)
        yield s, watcher
        watcher.close()


def still_serving(s: Served, watcher: Conn, tag: int) -> None:
    watcher.send(json.dumps({"execute": "query-version", "id": tag}).encode() + b"\n")
    reply = watcher.reply()
    assert reply.get("id") == tag and reply["return"]["qemu"]["major"] == 7, reply
    s.check_alive()


# ============================================================================ strategies
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=10), kids, max_size=4)),
    max_leaves=12)

COMMANDS = ("query-commands", "query-version", "blockdev-del", "query-block",
            "query-named-block-nodes", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
            "x-debug-block-dirty-bitmap-sha256", "block-dirty-bitmap-copy",
            "block-dirty-bitmap-edit", "x-dirtybits-checkpoint", "transaction",
            "human-monitor-command", "qmp_capabilities")
# not sent: quit (it stops the daemon) and blockdev-add (it would open whatever file a
# random name finds; its bad options have a test of their own below)
MEMBERS = ("node", "name", "target", "bitmaps", "granularity", "persistent", "disabled",
           "x-mode", "x-target", "new-name", "auto", "node-name", "flat", "actions",
           "properties", "command-line", "cpu-index", "type", "data", "completion-mode")
names = st.one_of(st.sampled_from(("a", "b", "c", "n0", "", "#block001", "a" * 1100)),
                  st.text(max_size=12))
nodes = st.one_of(st.sampled_from((NODE, "n0", "zz", "#block001", "")), st.text(max_size=8))
QEMU_IO_VERBS = ("write", "w", "read", "r", "discard", "d", "flush", "f", "info", "i",
                 "length", "l", "map", "alloc", "a", "help", "?", "quit", "q", "bogus", "")
qemu_io_args = st.lists(st.one_of(
    st.sampled_from(("-P", "0xab", "-z", "-u", "-c", "-q", "-C", "-v", "-s", "-l", "0",
                     "512", "4k", "64k", "1M", "8M", "9M", "1G", "-1", "0x10", "1.5M", "x")),
    st.integers(-1, 1 << 40).map(str)), max_size=5)


@st.composite
def hmp_lines(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(st.text(max_size=30))
    verb = draw(st.sampled_from(QEMU_IO_VERBS))
    cmd = " ".join([verb, *draw(qemu_io_args)])
    node = draw(nodes)
    return draw(st.sampled_from((f'qemu-io {node} "{cmd}"', f"qemu-io -d {node} '{cmd}'",
                                 f"qemu-io {node} {cmd}", f"qemu-io {node}", "qemu-io",
                                 f'qemu-io "{cmd}')))


def bitmap_ref() -> st.SearchStrategy[Any]:
    return st.one_of(names, st.fixed_dictionaries({"node": nodes, "name": names}),
                     json_values)


member_values: dict[str, st.SearchStrategy[Any]] = {
    "node": nodes, "name": names, "target": names, "new-name": names, "node-name": nodes,
    "bitmaps": st.one_of(st.lists(bitmap_ref(), max_size=3), json_values),
    "granularity": st.one_of(st.sampled_from((512, 4096, 65536, 1 << 20, 1 << 31, 1000, 0,
                                              -1, 1 << 32, 1 << 64)), json_values),
    "persistent": st.one_of(st.booleans(), json_values), "disabled": st.booleans(),
    "auto": st.booleans(), "flat": st.booleans(),
    "x-mode": st.one_of(st.sampled_from(("none", "self", "file", "bogus")), json_values),
    "x-target": st.one_of(st.just("/nonexistent"), st.text(max_size=8)),
    "command-line": hmp_lines(),
    "cpu-index": st.one_of(st.integers(-(1 << 64), 1 << 64), json_values),
    "properties": st.one_of(st.fixed_dictionaries(
        {}, optional={"completion-mode": st.sampled_from(("individual", "grouped", "x"))}),
        json_values),
    "completion-mode": st.sampled_from(("individual", "grouped")),
}


@st.composite
def arguments(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    """Members of the commands' schemas with values of their type or not, and unknown
    members now and then."""
    keys = draw(st.lists(st.sampled_from(MEMBERS), max_size=5, unique=True))
    out: dict[str, Any] = {}
    for k in keys:
        if k == "actions":
            out[k] = draw(st.one_of(st.lists(action(depth), max_size=3), json_values))
        elif k in ("type", "data"):
            out[k] = draw(json_values)
        else:
            out[k] = draw(st.one_of(member_values[k], json_values)
                          if draw(st.integers(0, 4)) == 0 else member_values[k])
    if draw(st.integers(0, 5)) == 0:
        out[draw(st.text(max_size=8))] = draw(json_values)
    return out


def action(depth: int) -> st.SearchStrategy[Any]:
    kinds = st.sampled_from(("block-dirty-bitmap-add", "block-dirty-bitmap-remove",
                             "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                             "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
                             "abort", "bogus"))
    data = arguments(depth + 1) if depth < 1 else st.dictionaries(st.text(max_size=4),
                                                                 scalars, max_size=2)
    return st.one_of(st.fixed_dictionaries({"type": kinds, "data": data}),
                     st.fixed_dictionaries({"type": kinds}, optional={
                         "data": json_values, "extra": scalars}), json_values)


def _table() -> dict[str, Any]:
    """The daemon's command table: each command's argument schema."""
    from dirtybits.services.qmp.commands import Commands

    cmds = Commands(None, None, version={}, package="",  # type: ignore[arg-type]
                    quit=lambda: None)
    return {n: spec.args for n, spec in cmds.table.items()}


SCHEMAS = _table()


POOL_NAMES = st.one_of(st.sampled_from(("a", "b", "c")), names)
POOL_NODES = st.sampled_from((NODE, NODE, NODE, "zz"))
VALID: dict[str, st.SearchStrategy[Any]] = {
    "granularity": st.sampled_from((512, 4096, 65536, 1 << 20)),
    "x-mode": st.sampled_from(("none", "self")),
    "cpu-index": st.integers(0, 8),
    "properties": st.fixed_dictionaries({}, optional={
        "completion-mode": st.sampled_from(("individual", "grouped"))}),
    "bitmaps": st.lists(st.one_of(POOL_NAMES, st.fixed_dictionaries(
        {"node": st.just(NODE), "name": POOL_NAMES})), min_size=1, max_size=3),
}


def typed(member: str, t: Any, valid: bool) -> st.SearchStrategy[Any]:
    """A value of type ``t`` for ``member`` (names from small pools, so commands meet)."""
    from dirtybits.proto.qmp import schema as sc

    if valid and member in ("node", "node-name"):
        return POOL_NODES
    if valid and member in ("name", "target", "new-name"):
        return POOL_NAMES
    if valid and member in VALID:
        return VALID[member]
    if member in member_values and not isinstance(t, sc.List):
        return member_values[member]
    if isinstance(t, sc.Scalar):
        return {sc.Scalar.STR: POOL_NAMES if valid else names, sc.Scalar.BOOL: st.booleans(),
                sc.Scalar.INT: st.integers(-(1 << 63), (1 << 63) - 1),
                sc.Scalar.UINT32: st.integers(0, (1 << 32) - 1),
                sc.Scalar.UINT64: st.integers(0, (1 << 64) - 1),
                sc.Scalar.ANY: json_values}[t]
    if isinstance(t, sc.List):
        return st.lists(typed(member, t.of, valid), max_size=3)
    if isinstance(t, sc.Alternate):
        return st.one_of(POOL_NAMES if valid else names, schema_args(t.struct, valid=valid))
    return schema_args(t, valid=valid)


@st.composite
def schema_args(draw: st.DrawFn, struct: Any, depth: int = 0, *,
                valid: bool | None = None) -> dict[str, Any]:
    """Arguments of a schema. ``valid`` (drawn when None): every required member, some
    optional ones, each of its type. Else now and then a required member missing, values
    of any type, an unknown member."""
    if valid is None:
        valid = draw(st.integers(0, 4)) > 1
    out: dict[str, Any] = {}
    for m in struct.members:
        if (m.optional or not valid) and draw(st.integers(0, 1 if m.optional else 19)) == 0:
            continue
        if valid and m.name == "x-target":
            continue
        if m.name == "actions":
            out[m.name] = draw(st.lists(tx_action(depth, valid), max_size=3))
        elif not valid and draw(st.integers(0, 4)) == 0:
            out[m.name] = draw(json_values)
        else:
            out[m.name] = draw(typed(m.name, m.type, valid))
    if not valid and draw(st.integers(0, 3)) == 0:
        out[draw(st.sampled_from(MEMBERS) | st.text(max_size=8))] = draw(json_values)
    return out


@st.composite
def tx_action(draw: st.DrawFn, depth: int, valid: bool = False) -> Any:
    from dirtybits.services.qmp.commands import TRANSACTION_ACTIONS

    kind = draw(st.sampled_from(sorted(TRANSACTION_ACTIONS)))
    if depth > 0 or (not valid and draw(st.integers(0, 4)) == 0):
        return draw(action(depth))
    return {"type": kind, "data": draw(schema_args(TRANSACTION_ACTIONS[kind], depth + 1,
                                                   valid=valid))}


@st.composite
def valid_commands(draw: st.DrawFn) -> tuple[dict[str, Any], bool, Any]:
    """A known command with arguments of its schema (values random but of their type)."""
    name = draw(st.sampled_from([c for c in COMMANDS
                                 if c not in ("blockdev-del", "qmp_capabilities")]))
    msg: dict[str, Any] = {"execute": name, "arguments": draw(schema_args(SCHEMAS[name],
                                                                          valid=True))}
    if not msg["arguments"] and draw(st.booleans()):
        del msg["arguments"]
    ident = draw(st.integers(0, 1 << 40))
    msg["id"] = ident
    return msg, True, ident


@st.composite
def commands(draw: st.DrawFn) -> tuple[dict[str, Any], bool, Any]:
    """(message, has an id, the id)."""
    if draw(st.integers(0, 6)):
        name = draw(st.sampled_from(COMMANDS))
    else:
        name = draw(st.text(max_size=20))
    assume(name not in ("quit", "blockdev-add"))
    msg: dict[str, Any] = {"execute": name}
    if draw(st.integers(0, 9)):
        if name in SCHEMAS and draw(st.integers(0, 4)):
            msg["arguments"] = draw(schema_args(SCHEMAS[name]))
        else:
            msg["arguments"] = draw(arguments())
    has_id = draw(st.booleans())
    ident = draw(json_values) if has_id else None
    if has_id:
        msg["id"] = ident
    if draw(st.integers(0, 19)) == 0:  # an unknown member, or exec-oob
        msg[draw(st.sampled_from(("exec-oob", "bogus", "control")))] = draw(json_values)
    # not the node itself: blockdev-del would take it away from every later example
    assume(name != "blockdev-del" or msg.get("arguments", {}).get("node-name") != NODE)
    order = draw(st.permutations(list(msg)))
    return {k: msg[k] for k in order}, has_id, ident


def encode(obj: Any, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode()


def blocked(obj: Any) -> bool:
    """A message the examples steer clear of (quit, blockdev-add: see ``COMMANDS``)."""
    return isinstance(obj, dict) and (obj.get("execute") in ("quit", "blockdev-add")
                                      or obj.get("exec-oob") in ("quit", "blockdev-add"))


# ============================================================================ the examples
@dataclass
class Outcome:
    replies: list[dict[str, Any]]
    closed: bool


def exchange(s: Served, payloads: list[bytes], expect: int, *, negotiate: bool,
             pause: float = 0.0, hang_up: bool = False) -> Outcome:
    """Send the payloads (one send each, ``pause`` apart), then read ``expect`` replies or
    up to the daemon's close."""
    c = Conn(s.sock, negotiate=negotiate)
    replies: list[dict[str, Any]] = []
    closed = False
    try:
        try:
            for i, p in enumerate(payloads):
                if i and pause:
                    time.sleep(pause)
                c.send(p)
            if hang_up:
                return Outcome([], False)
            while len(replies) < expect:
                replies.append(c.reply())
        except Closed:
            closed = True
    finally:
        c.close()
    return Outcome(replies, closed)


@fuzz_settings(400)
@given(data=st.data())
def test_every_message_gets_a_reply_or_a_protocol_close(served: tuple[Served, Conn],
                                                        data: st.DataObject) -> None:
    s, watcher = served
    kind = data.draw(st.sampled_from((
        "value", "command", "command", "valid", "valid", "commands", "split", "hang-up",
        "bytes", "long", "deep", "not-utf8", "side-by-side")), label="kind")
    negotiate = data.draw(st.integers(0, 9), label="negotiate") > 0
    event(kind)
    with time_limit(TIME_LIMIT):
        if kind == "value":
            value = data.draw(json_values, label="value")
            assume(not blocked(value))
            out = exchange(s, [encode(value, data.draw(st.booleans())) + b"\n"], 1,
                           negotiate=negotiate)
            assert not out.closed and len(out.replies) == 1, out
            has_id = isinstance(value, dict) and "id" in value
            check_reply(out.replies[0], value.get("id") if has_id else None, has_id)
        elif kind in ("command", "commands", "split", "valid"):
            if kind == "valid":
                msgs = data.draw(st.lists(valid_commands(), min_size=1, max_size=8),
                                 label="cmds")
            else:
                msgs = data.draw(st.lists(commands(), min_size=1,
                                          max_size=4 if kind == "commands" else 1),
                                 label="cmds")
            raw = b"".join(encode(m, data.draw(st.booleans())) + data.draw(
                st.sampled_from((b"\n", b"", b" ", b"\r\n\t"))) for m, _, _ in msgs) + b"\n"
            note(f"sent {raw[:2000]!r}")
            if kind == "split":
                cut = data.draw(st.integers(1, len(raw) - 1), label="cut")
                payloads = [raw[:cut], raw[cut:]]
            else:
                payloads = [raw]
            if len(raw) > MAX_MESSAGE:
                return  # the long ones below
            out = exchange(s, payloads, len(msgs), negotiate=negotiate,
                           pause=data.draw(st.sampled_from((0.0, 0.001, 0.02))))
            assert not out.closed and len(out.replies) == len(msgs), out
            for (m, has_id, ident), reply in zip(msgs, out.replies, strict=True):
                check_reply(reply, ident, has_id)
                if m.get("execute") in COMMANDS and negotiate:
                    event(f"{m['execute']}: "
                          f"{'ok' if 'return' in reply else reply['error']['desc'][:50]}")
                if not negotiate:  # nothing but qmp_capabilities runs before it succeeds
                    if m.get("execute") == "qmp_capabilities" and "return" in reply:
                        negotiate = True
                    else:
                        assert "error" in reply, reply
        elif kind == "side-by-side":  # two monitors at once: each its replies, in order
            batches = [data.draw(st.lists(valid_commands(), min_size=1, max_size=6),
                                 label=f"cmds{i}") for i in range(2)]
            conns = [Conn(s.sock) for _ in batches]
            try:
                for c, msgs in zip(conns, batches, strict=True):
                    c.send(b"".join(encode(m, True) + b"\n" for m, _, _ in msgs))
                for c, msgs in zip(conns, batches, strict=True):
                    for _, has_id, ident in msgs:
                        check_reply(c.reply(), ident, has_id)
            finally:
                for c in conns:
                    c.close()
        elif kind == "hang-up":
            msg, _, _ = data.draw(commands(), label="cmd")
            raw = encode(msg, True)
            cut = data.draw(st.integers(0, max(0, len(raw) - 1)), label="cut")
            exchange(s, [raw[:cut]], 0, negotiate=negotiate, hang_up=True)
        elif kind == "bytes":
            raw = data.draw(st.binary(max_size=300), label="bytes")
            c = Conn(s.sock, negotiate=negotiate)
            c.sock.settimeout(0.2)  # then the replies it gets (any number) have come
            try:
                with contextlib.suppress(Closed):
                    c.send(raw + b"\n")
                    with contextlib.suppress(TimeoutError):
                        while True:
                            _check_any(c.reply())
            finally:
                c.close()
        elif kind == "long":
            size = data.draw(st.one_of(st.integers(0, MAX_MESSAGE + 100),
                                       st.integers(MAX_MESSAGE - 100, 3 * MAX_MESSAGE)),
                             label="size")
            name = data.draw(st.sampled_from(("block-dirty-bitmap-add", "query-version",
                                              "human-monitor-command", "nope")))
            arg = data.draw(st.sampled_from(("name", "node", "command-line", "x")))
            raw = encode({"execute": name, "arguments": {"node": NODE, arg: "x" * size}},
                         True) + b"\n"
            out = exchange(s, [raw], 1, negotiate=negotiate)
            if len(raw) - 1 > MAX_MESSAGE:  # a protocol break: closed, however it arrives
                assert out.closed and not out.replies, out
            else:
                assert not out.closed and len(out.replies) == 1, out
            for reply in out.replies:
                check_reply(reply)
        elif kind == "deep":
            depth = data.draw(st.one_of(st.integers(1, RECURSION_FREE_DEPTH),
                                        st.integers(MAX_DEPTH + 1, 4 * MAX_DEPTH)),
                              label="depth")
            opener = data.draw(st.sampled_from(("[", '{"a":')))
            closer = "]" if opener == "[" else "}"
            where = data.draw(st.sampled_from(("top", "id", "argument")))
            inner = opener * depth + "1" + closer * depth
            if where == "top":
                text = inner
            elif where == "id":
                text = f'{{"execute": "query-version", "id": {inner}}}'
            else:
                text = f'{{"execute": "query-version", "arguments": {{"x": {inner}}}}}'
            top = depth + (where != "top")
            raw = text.encode() + b"\n"
            assume(len(raw) <= MAX_MESSAGE)
            out = exchange(s, [raw], 1, negotiate=negotiate)
            if top > MAX_DEPTH:
                assert out.closed and not out.replies, out
            else:
                assert not out.closed and len(out.replies) == 1, out
                _check_any(out.replies[0])
        else:  # bytes that are not UTF-8, inside a string
            bad = data.draw(st.sampled_from((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80",
                                             b"\xf8\x88\x80\x80\x80")), label="bad")
            raw = b'{"execute": "query-version", "id": "x' + bad + b'y"}\n'
            out = exchange(s, [raw], 1, negotiate=negotiate)
            assert out.closed and not out.replies, out
    still_serving(s, watcher, data.draw(st.integers(0, 1 << 30), label="tag"))


def _check_any(reply: dict[str, Any]) -> None:
    """A reply to bytes of unknown shape: well formed, not an internal error."""
    check_reply(reply, reply.get("id"), "id" in reply)


# ============================================================================ the oracle
@dataclass
class Bm:
    gran: int
    persistent: bool
    enabled: bool
    dirty: set[int] = field(default_factory=set)  # granules

    def copy(self) -> Bm:
        return Bm(self.gran, self.persistent, self.enabled, set(self.dirty))


Model = dict[str, Bm]
BITMAPS = ("a", "b", "c", "d")
GRANS = (512, 4096, 65536, 1 << 20)


def mark(bm: Bm, start: int, end: int) -> None:
    """Byte range [start, end) dirty in ``bm``."""
    bm.dirty.update(range(start // bm.gran, (min(end, DISK) - 1) // bm.gran + 1))


class Refused(Exception):
    """The model says the daemon must refuse this."""


def apply(model: Model, op: dict[str, Any], removed: set[str]) -> None:
    """One bitmap operation on the model (``Refused`` where the daemon must refuse it).
    ``removed``: names removed earlier in the same transaction: as in QEMU, such a bitmap
    is only hidden until the transaction commits, so its name cannot be added again."""
    kind, name = op["op"], op.get("name")
    if kind == "add":
        if name in model or name in removed:
            raise Refused(f"{name} exists")
        model[name] = Bm(op["gran"], op["persistent"], not op["disabled"])
        return
    if kind == "merge":
        if op["target"] not in model or any(s not in model for s in op["sources"]):
            raise Refused("missing bitmap")
        target = model[op["target"]]
        for src in [model[s].copy() for s in op["sources"]]:
            for g in src.dirty:
                mark(target, g * src.gran, (g + 1) * src.gran)
        return
    if name not in model:
        raise Refused(f"{name} missing")
    if kind == "remove":
        del model[name]
        removed.add(name)
    elif kind == "clear":
        model[name].dirty.clear()
    elif kind in ("enable", "disable"):
        model[name].enabled = kind == "enable"
    elif kind == "copy":
        if op["new"] in model:
            raise Refused(f"{op['new']} exists")
        new = model[name].copy()
        new.persistent = op["persistent"]
        if op["disabled"] is not None:
            new.enabled = not op["disabled"]
        model[op["new"]] = new
    elif kind == "rename":  # block-dirty-bitmap-edit
        bm = model[name]
        gran = op.get("gran") or bm.gran
        if gran < bm.gran and bm.dirty:
            raise Refused("finer granularity of a bitmap with bits")
        new = op["new"] or name
        if new != name and new in model:
            raise Refused(f"{new} exists")
        del model[name]
        out = Bm(gran, bm.persistent if op.get("persistent") is None else op["persistent"],
                 bm.enabled if op["auto"] is None else op["auto"])
        for g in bm.dirty:
            mark(out, g * bm.gran, (g + 1) * bm.gran)
        model[new] = out
    else:
        raise AssertionError(kind)


def steer_edit(op: dict[str, Any], model: Model) -> dict[str, Any]:
    """Clear of a known bug (``test_edit_that_rebuilds_keeps_the_name``): an edit that
    rebuilds the bitmap (a change of persistence or granularity) gets a new name."""
    bm = model.get(op.get("name", ""))
    if op["op"] != "rename" or bm is None or (op["new"] or op["name"]) != op["name"]:
        return op
    if (op["persistent"] is None or op["persistent"] == bm.persistent) and \
            (op["gran"] is None or op["gran"] == bm.gran):
        return op
    free = [n for n in BITMAPS if n not in model]
    if free:
        op["new"] = free[0]
    else:
        op["persistent"] = op["gran"] = None
    return op


def qmp_action(op: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kind = op["op"]
    if kind == "add":
        return "block-dirty-bitmap-add", {"node": NODE, "name": op["name"],
                                          "granularity": op["gran"],
                                          "persistent": op["persistent"],
                                          "disabled": op["disabled"]}
    if kind == "merge":
        return "block-dirty-bitmap-merge", {
            "node": NODE, "target": op["target"],
            "bitmaps": [s if i % 2 else {"node": NODE, "name": s}
                        for i, s in enumerate(op["sources"])]}
    if kind == "copy":
        args = {"node": NODE, "name": op["name"], "new-name": op["new"],
                "persistent": op["persistent"]}
        if op["disabled"] is not None:
            args["disabled"] = op["disabled"]
        return "block-dirty-bitmap-copy", args
    if kind == "rename":
        args = {"node": NODE, "name": op["name"]}
        for key, member in (("new", "new-name"), ("auto", "auto"),
                            ("persistent", "persistent"), ("gran", "granularity")):
            if op.get(key) is not None:
                args[member] = op[key]
        return "block-dirty-bitmap-edit", args
    return f"block-dirty-bitmap-{kind}", {"node": NODE, "name": op["name"]}


TX_KINDS = ("add", "remove", "clear", "enable", "disable", "merge")


@st.composite
def bitmap_ops(draw: st.DrawFn, kinds: tuple[str, ...] = (*TX_KINDS, "copy", "rename"),
               existing: tuple[str, ...] = ()) -> dict[str, Any]:
    """An operation; its names mostly of ``existing`` bitmaps (most then succeed)."""
    kind = draw(st.sampled_from(kinds))
    op: dict[str, Any] = {"op": kind}
    bitmap_names = st.sampled_from(BITMAPS)
    if existing and kind != "add":
        bitmap_names = st.one_of(st.sampled_from(existing), st.sampled_from(existing),
                                 bitmap_names)
    if kind == "merge":
        op["target"] = draw(bitmap_names)
        op["sources"] = draw(st.lists(bitmap_names, min_size=1, max_size=3))
        return op
    op["name"] = draw(bitmap_names)
    if kind == "add":
        op.update(gran=draw(st.sampled_from(GRANS)), persistent=draw(st.booleans()),
                  disabled=draw(st.booleans()))
    elif kind == "copy":
        op.update(new=draw(bitmap_names), persistent=draw(st.booleans()),
                  disabled=draw(st.one_of(st.none(), st.booleans())))
    elif kind == "rename":  # edit: a new name, recording, persistence, granularity
        maybe_bool = st.one_of(st.none(), st.booleans())
        op.update(new=draw(st.one_of(st.none(), bitmap_names)), auto=draw(maybe_bool),
                  persistent=draw(maybe_bool),
                  gran=draw(st.one_of(st.none(), st.sampled_from(GRANS))))
    return op


def expected_sha256(bm: Bm) -> str:
    """sha256 of the bitmap's bits as QEMU hashes them: max(1, ceil(granules/64)) LE words."""
    import hashlib

    import numpy as np

    n = -(-DISK // bm.gran)
    bits = np.zeros(max(1, -(-n // 64)) * 64, dtype=bool)
    bits[sorted(bm.dirty)] = True
    return hashlib.sha256(np.packbits(bits, bitorder="little").tobytes()).hexdigest()


class BitmapMachine(RuleBasedStateMachine):
    """Valid bitmap commands and writes, the daemon against a model of its bitmaps."""

    def __init__(self, served: Served) -> None:
        super().__init__()
        self.served = served
        self.conn = Conn(served.sock)
        self.model: Model = {}
        self.checkpointed = False

    def teardown(self) -> None:
        self.conn.close()

    def run(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        note(f"-> {name} {json.dumps(args)}")
        reply = self.conn.execute(name, args)
        note(f"<- {json.dumps(reply)[:300]}")
        check_reply(reply)
        return reply

    def expect(self, ops: list[dict[str, Any]], name: str, args: dict[str, Any]) -> None:
        """Run the command of ``ops`` (all or nothing); the model decides its fate."""
        after = {n: b.copy() for n, b in self.model.items()}
        removed: set[str] = set()
        try:
            for op in ops:
                apply(after, op, removed)
            refused = None
        except Refused as exc:
            refused = str(exc)
        reply = self.run(name, args)
        event(f"{name}: {'refused' if refused else 'done'}")
        if refused is None:
            assert "return" in reply, (ops, reply)
            self.model = after
            self.checkpointed = False
        else:
            assert "error" in reply, (ops, refused, reply)
            assert reply["error"]["class"] == "GenericError", reply

    @initialize()
    def empty(self) -> None:
        """The daemon is shared by the examples: start from no bitmap."""
        for b in self.bitmaps():
            reply = self.run("block-dirty-bitmap-remove", {"node": NODE, "name": b["name"]})
            assert reply == {"return": {}}, reply

    def bitmaps(self) -> list[dict[str, Any]]:
        nodes = self.run("query-named-block-nodes", {})["return"]
        top = next(n for n in nodes if n["node-name"] == NODE)
        return list(top.get("dirty-bitmaps", []))

    @rule(data=st.data())
    def bitmap_command(self, data: st.DataObject) -> None:
        op = data.draw(bitmap_ops(existing=tuple(sorted(self.model))))
        self.expect([steer_edit(op, self.model)], *qmp_action(op))

    @rule(data=st.data())
    def transaction(self, data: st.DataObject) -> None:
        ops = data.draw(st.lists(bitmap_ops(TX_KINDS, tuple(sorted(self.model))),
                                 min_size=1, max_size=4))
        actions = [dict(zip(("type", "data"), qmp_action(op), strict=True)) for op in ops]
        self.expect(ops, "transaction", {"actions": actions})

    @rule(sector=st.integers(0, DISK // 512 - 1), sectors=st.integers(1, 300),
          pat=st.integers(0, 255), skew=st.one_of(st.just(0), st.integers(0, 511)),
          how=st.sampled_from(("write -P {pat}", "write -P {pat}", "write -z",
                               "write -z -u", "discard")))
    def write(self, sector: int, sectors: int, pat: int, skew: int, how: str) -> None:
        """A guest request (a few unaligned: ``skew`` bytes into its first sector, and
        short): every enabled bitmap records its whole range (a discard too: the node has
        discard=unmap; with QEMU's default, ignore, a discard does nothing at all)."""
        off = sector * 512 + skew
        length = min(sectors * 512 - skew, DISK - off)
        before = len("".join(self.served.hmp))
        cmd = how.format(pat=pat)
        reply = self.run("human-monitor-command", {
            "command-line": f'qemu-io {NODE} "{cmd} {off} {length}"'})
        assert reply == {"return": ""}, reply
        out = "".join(self.served.hmp)[before:]
        assert out.startswith("discard " if how == "discard" else "wrote "), out
        for bm in self.model.values():
            if bm.enabled:
                mark(bm, off, off + length)
        self.checkpointed = False

    @rule()
    def checkpoint(self) -> None:
        reply = self.run("x-dirtybits-checkpoint", {"node": NODE})
        assert [e["node"] for e in reply["return"]] == [NODE], reply
        self.checkpointed = True

    @invariant()
    def agrees(self) -> None:
        got = {b["name"]: b for b in self.bitmaps()}
        assert set(got) == set(self.model), (sorted(got), sorted(self.model))
        for name, bm in self.model.items():
            b = got[name]
            want = {"name": name, "granularity": bm.gran, "persistent": bm.persistent,
                    "recording": bm.enabled, "busy": False,
                    "count": min(len(bm.dirty) * bm.gran, DISK)}
            assert {k: b.get(k) for k in want} == want, (b, want)
            assert "inconsistent" not in b, b
            if bm.persistent and self.checkpointed:
                assert b["x-dirtybits"]["disk-state"] == "clean", b
        if self.model:
            name = sorted(self.model)[0]
            sha = self.run("x-debug-block-dirty-bitmap-sha256", {"node": NODE, "name": name})
            assert sha["return"]["sha256"] == expected_sha256(self.model[name]), name


@pytest.fixture(scope="module")
def oracle_daemon() -> Iterator[Served]:
    with serve(discard="unmap") as s:  # discards are passed down, and recorded (as QEMU)
        yield s


def test_bitmaps_follow_a_model(oracle_daemon: Served) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    with time_limit(10 * TIME_LIMIT):
        run_state_machine_as_test(lambda: BitmapMachine(oracle_daemon),
                                  settings=fuzz_settings(80, stateful_step_count=30))
    oracle_daemon.check_alive()


# ============================================================================ found bugs
# Each reproduces one bug (strict: it fails now, and says so once fixed); the examples
# above steer clear of them. What QEMU does is what qemu-storage-daemon 7.2 answers.
def one_reply(s: Served, raw: bytes) -> tuple[dict[str, Any] | None, bool]:
    """(the reply to ``raw`` or None, whether the connection still answers after it)."""
    c = Conn(s.sock)
    try:
        c.send(raw)
        try:
            reply: dict[str, Any] | None = c.reply()
        except (Closed, ValueError):
            return None, False
        try:
            assert c.execute("query-version")["return"]["qemu"]["major"] == 7
        except Closed:
            return reply, False
        return reply, True
    finally:
        c.close()


SURROGATES = {
    # QEMU: {"error": {"class": "GenericError", "desc": "JSON parse error, \\ud800 is not
    # a valid Unicode character"}}, and the monitor goes on. Here the reply cannot be
    # encoded (UnicodeEncodeError in core.dumps): the monitor's task dies with it ("Unhandled
    # exception in client_connected_cb"), the connection is dropped with no reply.
    "unknown command": b'{"execute": "nope\\ud800"}\n',
    "id of a command": b'{"execute": "query-version", "id": "\\udc80"}\n',
    "id of a bad message": b'{"execute": 5, "id": "\\ud800"}\n',
    # here the name reaches the registry: "internal error in block-dirty-bitmap-add:
    # UnicodeEncodeError: 'utf-8' codec can't encode character '\\ud800' ..."
    "bitmap name": b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "n0", '
                   b'"name": "x\\ud800"}}\n',
}


@pytest.mark.parametrize("where", sorted(SURROGATES))
def test_lone_surrogate_escapes_get_an_error_reply(where: str) -> None:
    with serve() as s:
        reply, alive = one_reply(s, SURROGATES[where])
        assert reply is not None and alive, (reply, alive, s.loop_errors)
        check_reply(reply, reply.get("id"), "id" in reply)
        assert "error" in reply
        s.check_alive()


@pytest.mark.parametrize("where", ["top", "id"])
def test_nesting_under_the_limit_gets_a_reply(where: str) -> None:
    inner = "[" * 1000 + "]" * 1000
    text = inner if where == "top" else f'{{"execute": "query-version", "id": {inner}}}'
    with serve() as s:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + 3000)  # the test's own json.loads of the echoed id
        try:
            reply, alive = one_reply(s, text.encode() + b"\n")
        finally:
            sys.setrecursionlimit(limit)
        assert reply is not None and alive, (reply, alive, s.loop_errors)
        if where == "top":  # QEMU's answer
            assert reply == {"error": {"class": "GenericError",
                                       "desc": "QMP input must be a JSON object"}}
        else:
            depth, ident = 0, reply["id"]
            while isinstance(ident, list) and ident:
                depth, ident = depth + 1, ident[0]
            assert depth == 999 and ident == []  # the id echoed whole, 1000 levels
        s.check_alive()


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_tokens_are_refused(token: str) -> None:
    with serve() as s:
        c = Conn(s.sock)
        try:
            c.send(f'{{"execute": "query-version", "id": {token}}}\n'.encode())
            while b"\r\n" not in c.buf:
                c.buf += c.sock.recv(65536)
            line = c.buf.partition(b"\r\n")[0]
        finally:
            c.close()
        # now: b'{"return": {...}, "id": NaN}'
        reply = json.loads(line, parse_constant=_no_constants)
        assert "error" in reply, reply


def test_a_message_over_the_limit_is_refused_however_it_arrives() -> None:
    from dirtybits.proto.qmp.core import QmpProtocolError, ServerConnection

    conn = ServerConnection({"major": 7, "minor": 2, "micro": 0}, max_message=100)
    conn.receive(b'{"execute": "qmp_capabilities"}\n')
    msg = json.dumps({"execute": "query-version", "arguments": {"x": "y" * 200}}).encode()
    with pytest.raises(QmpProtocolError):
        conn.receive(msg + b"\n")


BLOCKDEV_ADD = {
    # each answered "internal error in blockdev-add: ..." (the options are not checked
    # yet); QEMU: "Invalid parameter type for 'node-name', expected: string", "Parameter
    # 'filename' is missing", ...
    "node-name not a string": {"driver": "file", "node-name": 5, "filename": "IMG"},
    "filename missing": {"driver": "file", "node-name": "x"},
    "filename not a string": {"driver": "file", "node-name": "x", "filename": 5},
    "cache not an object": {"driver": "file", "node-name": "x", "filename": "IMG",
                            "cache": "x"},
    "file missing": {"driver": "qcow2", "node-name": "x"},
    "file a number": {"driver": "qcow2", "node-name": "x", "file": 5},
    "file a list": {"driver": "qcow2", "node-name": "x", "file": ["IMG"]},
    "file without filename": {"driver": "qcow2", "node-name": "x", "file": {"driver": "file"}},
    "backing a number": {"driver": "qcow2", "node-name": "x", "backing": 5,
                         "file": {"driver": "file", "filename": "IMG"}},
    "data-file a number": {"driver": "qcow2", "node-name": "x", "data-file": 5,
                           "file": {"driver": "file", "filename": "IMG"}},
    "inline child's node-name": {"driver": "raw", "node-name": "x", "file": {
        "driver": "file", "filename": "IMG", "node-name": 7}},
}


@pytest.mark.parametrize("case", sorted(BLOCKDEV_ADD))
def test_blockdev_add_with_bad_options_is_an_error_not_a_bug(case: str) -> None:
    with serve() as s:
        img = os.path.join(os.path.dirname(s.image), "b.qcow2")
        shutil.copyfile(s.image, img)
        args = json.loads(json.dumps(BLOCKDEV_ADD[case]).replace('"IMG"', json.dumps(img)))
        c = Conn(s.sock)
        try:
            reply = c.execute("blockdev-add", args)
        finally:
            c.close()
        check_reply(reply)
        assert "error" in reply, reply


@pytest.mark.parametrize("change", [{"persistent": True}, {"granularity": 1 << 20},
                                    {"new-name": "a", "persistent": True}])
def test_edit_that_rebuilds_keeps_the_name(change: dict[str, Any]) -> None:
    with serve() as s:
        c = Conn(s.sock)
        try:
            assert c.execute("block-dirty-bitmap-add", {"node": NODE, "name": "a"}) == \
                {"return": {}}
            reply = c.execute("block-dirty-bitmap-edit", {"node": NODE, "name": "a", **change})
        finally:
            c.close()
        # now: {"error": {"class": "GenericError", "desc": "Bitmap already exists: a"}}
        assert reply == {"return": {}}, reply
