"""The QMP protocol core in memory: a client core paired with the server core, the JSON
stream cut at any byte, QEMU's protocol-level errors, and the limits."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtybits.proto.qmp.core import (
    ClientConnection,
    Command,
    ErrorClass,
    ErrorReply,
    Event,
    Greeting,
    JsonSplitter,
    QmpProtocolError,
    Reply,
    Return,
    ServerConnection,
    State,
)

VERSION = {"micro": 0, "minor": 1, "major": 0}


def serve(server: ServerConnection, data: bytes) -> bytes:
    """What a trivial service answers: query-version, else CommandNotFound."""
    out = b""
    for item in server.receive(data):
        if isinstance(item, Reply):
            out += item.data
        elif item.name == "query-version":
            out += server.ok(item, {"qemu": VERSION, "package": "dirtybits"})
        else:
            out += server.error(item, ErrorClass.COMMAND_NOT_FOUND,
                                f"The command {item.name} has not been found")
    return out


def test_client_and_server_in_memory() -> None:
    server, client = ServerConnection(VERSION, "dirtybits"), ClientConnection()
    (greeting,) = client.receive(server.greeting())
    assert isinstance(greeting, Greeting) and greeting.capabilities == ["oob"]
    replies = client.receive(serve(server, client.command("query-version", id=1)))
    assert replies == [ErrorReply("CommandNotFound",
                                  "Expecting capabilities negotiation with 'qmp_capabilities'",
                                  1)]
    assert client.receive(serve(server, client.command("qmp_capabilities", id="a"))) == [
        Return({}, "a")]
    assert server.state is State.COMMAND
    (ret,) = client.receive(serve(server, client.command("query-version", id={"x": [1]})))
    assert isinstance(ret, Return) and ret.id == {"x": [1]} and ret.value["qemu"] == VERSION
    (ev,) = client.receive(server.event("BLOCK_IMAGE_CORRUPTED", {"device": "d"}, now=12.5))
    assert ev == Event("BLOCK_IMAGE_CORRUPTED", {"device": "d"},
                       {"seconds": 12, "microseconds": 500000})


def test_replies_are_spaced_and_ended_as_qemus() -> None:
    server = ServerConnection(VERSION)
    (reply,) = server.receive(b'{"execute":"qmp_capabilities","id":7}')
    assert isinstance(reply, Reply) and reply.data == b'{"return": {}, "id": 7}\r\n'


@pytest.mark.parametrize("sent, desc", [
    (b"[1]", "QMP input must be a JSON object"),
    (b'"str"', "QMP input must be a JSON object"),
    (b"}", "JSON parse error, expecting value"),
    (b'{"execute":tru}', "JSON parse error, invalid keyword 'tru'"),
    (b'{"foo":1}', "QMP input member 'foo' is unexpected"),
    (b'{"execute":1}', "QMP input member 'execute' must be a string"),
    (b'{"execute":"x","arguments":[]}', "QMP input member 'arguments' must be an object"),
    (b'{"exec-oob":"x"}', "QMP input member 'exec-oob' is unexpected"),
    (b"{}", "QMP input lacks member 'execute'"),
])
def test_protocol_errors_as_qemu(sent: bytes, desc: str) -> None:
    server = ServerConnection(VERSION)
    server.receive(b'{"execute":"qmp_capabilities"}')
    (reply,) = server.receive(sent)
    assert isinstance(reply, Reply)
    assert json.loads(reply.data) == {"error": {"class": "GenericError", "desc": desc}}


def test_negotiation_only_once_and_commands_after() -> None:
    server = ServerConnection(VERSION)
    server.receive(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    (again,) = server.receive(b'{"execute":"qmp_capabilities"}')
    assert isinstance(again, Reply) and b"already complete" in again.data
    (cmd,) = server.receive(b'{"exec-oob":"query-status","id":3}')
    assert cmd == Command("query-status", {}, 3, oob=True)


def test_unknown_capability_refused() -> None:
    server = ServerConnection(VERSION)
    (reply,) = server.receive(b'{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}')
    assert isinstance(reply, Reply) and b"Capability 'x' not available" in reply.data
    assert server.state is State.NEGOTIATION


@given(st.lists(st.integers(1, 40), min_size=1, max_size=40))
def test_any_cut_of_the_stream_gives_the_same_messages(cuts: list[int]) -> None:
    stream = (b'{"execute": "a", "arguments": {"s": "}{\\" ]["}, "id": 1}\n'
              b'  {"execute":"b"}{"execute":"c","id":[1,{"d":"\\\\"}]}\r\n[2] "x\\"y" }'
              b' {"execute":"e"}')
    whole = JsonSplitter().feed(stream)
    split, got, pos = JsonSplitter(), [], 0
    for n in cuts:
        got += split.feed(stream[pos:pos + n])
        pos += n
    got += split.feed(stream[pos:])
    assert got == whole == [
        b'{"execute": "a", "arguments": {"s": "}{\\" ]["}, "id": 1}', b'{"execute":"b"}',
        b'{"execute":"c","id":[1,{"d":"\\\\"}]}', b"[2]", b'"x\\"y"', b"}",
        b'{"execute":"e"}']
    assert split.pending == 0


def test_a_half_sent_message_waits() -> None:
    server = ServerConnection(VERSION)
    assert server.receive(b'{"execute":"qmp_cap') == []
    assert server.pending > 0
    (reply,) = server.receive(b'abilities"}')
    assert isinstance(reply, Reply) and reply.data.startswith(b'{"return"')


def test_limits_break_the_connection() -> None:
    server = ServerConnection(VERSION, max_message=1024, max_depth=8)
    with pytest.raises(QmpProtocolError, match="longer than 1024"):
        server.receive(b'{"execute":"' + b"x" * 2000)
    server = ServerConnection(VERSION, max_depth=8)
    with pytest.raises(QmpProtocolError, match="nesting"):
        server.receive(b"[" * 9)
    with pytest.raises(QmpProtocolError, match="UTF-8"):
        ServerConnection(VERSION).receive(b'{"execute":"\xff"}')


def test_schema_checks_in_schema_order_with_qemus_texts() -> None:
    from dirtybits.proto.qmp import schema
    from dirtybits.proto.qmp.core import QmpError

    spec = schema.command("x", schema.Member("node", schema.STR),
                          schema.Member("n", schema.UINT32, True),
                          schema.Member("l", schema.List(schema.Alternate(
                              "Alt", schema.Struct("S", (schema.Member("a", schema.STR),)))),
                              True))
    assert schema.check({"node": "d", "l": ["s", {"a": "b"}]}, spec) == {
        "node": "d", "l": ["s", {"a": "b"}]}
    for args, desc in [({"bogus": 1}, "Parameter 'node' is missing"),
                       ({"node": "d", "bogus": 1}, "Parameter 'bogus' is unexpected"),
                       ({"node": "d", "n": -1}, "Parameter 'n' expects uint32_t"),
                       ({"node": "d", "n": "1"}, "Parameter 'n' expects uint64"),
                       ({"node": "d", "l": [{}]}, "Parameter 'l[0].a' is missing"),
                       ({"node": "d", "l": [1]}, "Invalid parameter type for 'null', "
                                                  "expected: Alt")]:
        with pytest.raises(QmpError) as err:
            schema.check(args, spec)
        assert str(err.value) == desc and err.value.cls is ErrorClass.GENERIC
