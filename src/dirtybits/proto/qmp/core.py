"""The QMP wire protocol, both ends, with no I/O (QEMU 7.2's ``docs/interop/qmp-spec.txt``).

Wire layout: a stream of JSON values in UTF-8, not one per line: a value may span several
``receive`` calls and several may arrive in one. The server speaks first::

    S: {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""},
                "capabilities": ["oob"]}}
    C: {"execute": "qmp_capabilities", "id": 1}          # negotiation: nothing else allowed
    S: {"return": {}, "id": 1}
    C: {"execute": NAME, "arguments": {...}, "id": ANY}  # "arguments" and "id" optional
    S: {"return": VALUE, "id": ANY} | {"error": {"class": CLASS, "desc": TEXT}, "id": ANY}
    S: {"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}

Every server message ends with ``\\r\\n`` and uses QEMU's spacing (``", "``, ``": "``).

Two kinds of failure are kept apart. A message QEMU answers with an error and then carries
on (bad JSON, not an object, a bad member, a command before negotiation) comes back from
``ServerConnection.receive`` as a ready ``Reply``, with QEMU's text. A peer that breaks the
protocol beyond that (a message past the size or nesting limit, bytes that are not UTF-8)
raises ``QmpProtocolError``: drop the connection. A command that fails is the service's
business: it answers with ``ServerConnection.error``.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dirtybits.errors import DirtybitsError

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 << 20  # bytes of one JSON value (QEMU's json-streamer MAX_TOKEN_SIZE)
MAX_DEPTH = 1024  # nesting of one value (QEMU's MAX_NESTING)
EOL = b"\r\n"


class QmpProtocolError(DirtybitsError):
    """The peer broke the protocol: the connection cannot go on."""


class ErrorClass(enum.Enum):
    """QMP's error classes (``QapiErrorClass``)."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpError(DirtybitsError):
    """A command failed: the error reply's class and text."""

    def __init__(self, desc: str, cls: ErrorClass = ErrorClass.GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class State(enum.Enum):
    NEGOTIATION = "negotiation"  # only qmp_capabilities
    COMMAND = "command"


_NO_ID = object()


@dataclass(frozen=True)
class Command:
    """One command to run; answer it with ``ok`` or ``error``."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = _NO_ID
    oob: bool = False

    @property
    def has_id(self) -> bool:
        return self.id is not _NO_ID


@dataclass(frozen=True)
class Reply:
    """A reply the protocol core made itself (negotiation, or an error QEMU answers)."""

    data: bytes


def dumps(obj: Any) -> bytes:
    """One server message, spaced as QEMU spaces it, with its line end. An ``id`` nested as
    deep as QEMU allows (``MAX_DEPTH``) is echoed too (the encoder recurses per level)."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))
    except RecursionError:
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(old + 2 * MAX_DEPTH + 100)
        try:
            text = json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))
        finally:
            sys.setrecursionlimit(old)
    return text.encode() + EOL


class JsonSplitter:
    """Cuts a byte stream into complete top-level JSON texts (QEMU's json-streamer).

    Inside a value only strings and brackets matter; outside, a closing bracket or a bare
    token is a complete (bad) text of its own, as QEMU sees it. Raises ``QmpProtocolError``
    past ``max_message`` bytes or ``max_depth`` nesting.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self.max_message = max_message
        self.max_depth = max_depth
        self._buf = bytearray()
        self._pos = 0  # how far _buf has been scanned
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        i = self._pos
        start = 0
        n = len(buf)
        while i < n:
            c = buf[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_string = False
                i += 1
                continue
            if self._depth == 0:
                if c in b" \t\r\n":
                    i += 1
                    start = i
                    continue
                if c in b"{[":
                    start = i
                    self._depth = 1
                elif c in b"}]":
                    out.append(bytes(buf[i:i + 1]))
                    start = i + 1
                elif c == 0x22:
                    self._in_string = True
                    start = i
                    self._depth = 0
                    # a top-level string: collected until its closing quote below
                    j = self._scan_string(i + 1)
                    if j is None:
                        break
                    out.append(bytes(buf[i:j]))
                    i = j
                    start = i
                    continue
                else:  # a bare token runs to whitespace or a structural character
                    j = i
                    while j < n and buf[j] not in b" \t\r\n{}[]\",:":
                        j += 1
                    if j == n:
                        break
                    out.append(bytes(buf[i:max(j, i + 1)]))
                    i = max(j, i + 1)
                    start = i
                    continue
                i += 1
                continue
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > self.max_depth:
                    raise QmpProtocolError(f"JSON nesting deeper than {self.max_depth}")
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    if i + 1 - start > self.max_message:
                        raise QmpProtocolError(
                            f"a JSON message longer than {self.max_message} bytes")
                    out.append(bytes(buf[start:i + 1]))
                    start = i + 1
            i += 1
        del buf[:start]
        self._pos = i - start
        if len(buf) > self.max_message:
            raise QmpProtocolError(f"a JSON message longer than {self.max_message} bytes")
        return out

    def _scan_string(self, i: int) -> int | None:
        """End (past the quote) of a top-level string starting before ``i``, or None."""
        buf, esc = self._buf, False
        while i < len(buf):
            c = buf[i]
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                self._in_string = False
                return i + 1
            i += 1
        self._in_string = False  # rescanned from its quote when more arrives
        return None

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message held back."""
        return len(self._buf)


class _NotPlainJson(Exception):
    """Python's json would read this text differently from QEMU's parser."""


def _no_constant(name: str) -> Any:
    raise _NotPlainJson(name)  # NaN, Infinity, -Infinity: not JSON, QEMU refuses them


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _NotPlainJson("duplicate key")
    return out


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _loads(decoded: str, raw: bytes) -> Any:
    """One JSON text as QEMU's parser reads it. The common case takes Python's C parser;
    anything it would read differently (QEMU's extensions and refusals: single quotes,
    duplicate keys, NaN, surrogate escapes, nesting past Python's recursion) and every
    error go to the port of QEMU's parser, for its result and its texts. Raises
    ``QmpError``."""
    from dirtybits.proto.keyval import from_json

    if not _SURROGATE.search(raw):
        try:
            return json.loads(decoded, parse_constant=_no_constant,
                              object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError, _NotPlainJson):
            pass
    try:
        return from_json(decoded)
    except RecursionError:  # pragma: no cover - the port does not recurse per level
        raise QmpError("JSON nesting depth limit exceeded") from None


def _error(cls: ErrorClass, desc: str, ident: Any = _NO_ID) -> bytes:
    """An error reply; QEMU puts its ``id`` first (a return's last)."""
    msg: dict[str, Any] = {} if ident is _NO_ID else {"id": ident}
    msg["error"] = {"class": cls.value, "desc": desc}
    return dumps(msg)


class ServerConnection:
    """The server side of one QMP connection."""

    def __init__(self, version: Mapping[str, int], package: str = "", *,
                 capabilities: Iterable[str] = ("oob",), max_message: int = MAX_MESSAGE,
                 max_depth: int = MAX_DEPTH) -> None:
        self.version = dict(version)
        self.package = package
        self.capabilities = list(capabilities)
        self.enabled: set[str] = set()
        self.state = State.NEGOTIATION
        self._split = JsonSplitter(max_message, max_depth)

    def greeting(self) -> bytes:
        return dumps({"QMP": {"version": {"qemu": self.version, "package": self.package},
                              "capabilities": self.capabilities}})

    def receive(self, data: bytes) -> list[Command | Reply]:
        """Commands to run and replies to send, in order. Raises ``QmpProtocolError``."""
        out: list[Command | Reply] = []
        for text in self._split.feed(data):
            out.append(self._message(text))
        return out

    def _message(self, text: bytes) -> Command | Reply:
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise QmpProtocolError(f"QMP input is not UTF-8: {exc}") from None
        try:
            obj = _loads(decoded, text)
        except QmpError as exc:
            return Reply(_error(ErrorClass.GENERIC, exc.desc))
        if not isinstance(obj, dict):
            return Reply(_error(ErrorClass.GENERIC, "QMP input must be a JSON object"))
        ident = obj.get("id", _NO_ID)
        oob = "oob" in self.enabled
        for key, value in obj.items():
            if key == "execute" or (key == "exec-oob" and oob):
                if not isinstance(value, str):
                    return Reply(_error(ErrorClass.GENERIC,
                                        f"QMP input member '{key}' must be a string", ident))
            elif key == "arguments":
                if not isinstance(value, dict):
                    return Reply(_error(ErrorClass.GENERIC,
                                        "QMP input member 'arguments' must be an object",
                                        ident))
            elif key != "id":
                return Reply(_error(ErrorClass.GENERIC,
                                    f"QMP input member '{key}' is unexpected", ident))
        if "execute" in obj and "exec-oob" in obj:
            return Reply(_error(ErrorClass.GENERIC,
                                "QMP input must not have both 'execute' and 'exec-oob'", ident))
        name = obj.get("execute", obj.get("exec-oob"))
        if name is None:
            return Reply(_error(ErrorClass.GENERIC, "QMP input lacks member 'execute'", ident))
        cmd = Command(name, dict(obj.get("arguments", {})), ident, "exec-oob" in obj)
        if self.state is State.NEGOTIATION:
            if name != "qmp_capabilities":
                return Reply(_error(ErrorClass.COMMAND_NOT_FOUND,
                                    "Expecting capabilities negotiation with "
                                    "'qmp_capabilities'", ident))
            return self._negotiate(cmd)
        if name == "qmp_capabilities":
            return Reply(_error(ErrorClass.COMMAND_NOT_FOUND,
                                "Capabilities negotiation is already complete, command "
                                "ignored", ident))
        return cmd

    def _negotiate(self, cmd: Command) -> Reply:
        args = dict(cmd.arguments)
        enable = args.pop("enable", [])
        if args:
            return Reply(self.error(cmd, ErrorClass.GENERIC,
                                    f"Parameter '{next(iter(args))}' is unexpected"))
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            return Reply(self.error(cmd, ErrorClass.GENERIC,
                                    "Invalid parameter type for 'enable', expected: array"))
        for cap in enable:
            if cap not in self.capabilities:
                return Reply(self.error(cmd, ErrorClass.GENERIC,
                                        f"Capability '{cap}' not available"))
        self.enabled = set(enable)
        self.state = State.COMMAND
        return Reply(self.ok(cmd, {}))

    def ok(self, cmd: Command, value: Any = None) -> bytes:
        """The success reply to ``cmd`` (``{}`` when ``value`` is None)."""
        msg: dict[str, Any] = {"return": {} if value is None else value}
        if cmd.has_id:
            msg["id"] = cmd.id
        return dumps(msg)

    def error(self, cmd: Command, cls: ErrorClass, desc: str) -> bytes:
        return _error(cls, desc, cmd.id)

    @staticmethod
    def event(name: str, data: Mapping[str, Any] | None = None, *,
              now: float | None = None) -> bytes:
        """An event message, timestamped as QEMU stamps them."""
        t = time.time() if now is None else now
        sec = int(t)
        msg: dict[str, Any] = {"event": name}
        if data is not None:
            msg["data"] = dict(data)
        msg["timestamp"] = {"seconds": sec, "microseconds": round((t - sec) * 1e6)}
        return dumps(msg)

    @property
    def pending(self) -> int:
        return self._split.pending


@dataclass(frozen=True)
class Greeting:
    version: dict[str, Any]
    capabilities: list[str]


@dataclass(frozen=True)
class Return:
    value: Any
    id: Any = _NO_ID


@dataclass(frozen=True)
class ErrorReply:
    cls: str
    desc: str
    id: Any = _NO_ID


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]
    timestamp: dict[str, int]


class ClientConnection:
    """The client side: commands as bytes, the server's messages parsed (for tests and
    tools; services use ``ServerConnection``)."""

    def __init__(self) -> None:
        self._split = JsonSplitter()

    @staticmethod
    def command(name: str, arguments: Mapping[str, Any] | None = None, *,
                id: Any = _NO_ID) -> bytes:
        msg: dict[str, Any] = {"execute": name}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        if id is not _NO_ID:
            msg["id"] = id
        return json.dumps(msg).encode() + b"\n"

    def receive(self, data: bytes) -> list[Greeting | Return | ErrorReply | Event]:
        """The server's messages; raises ``QmpProtocolError`` on anything else."""
        out: list[Greeting | Return | ErrorReply | Event] = []
        for text in self._split.feed(data):
            try:
                obj = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise QmpProtocolError(f"the server sent bad JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise QmpProtocolError(f"the server sent a non-object: {text[:80]!r}")
            ident = obj.get("id", _NO_ID)
            if "QMP" in obj:
                out.append(Greeting(obj["QMP"]["version"], list(obj["QMP"]["capabilities"])))
            elif "return" in obj:
                out.append(Return(obj["return"], ident))
            elif "error" in obj:
                out.append(ErrorReply(obj["error"]["class"], obj["error"]["desc"], ident))
            elif "event" in obj:
                out.append(Event(obj["event"], obj.get("data", {}), obj["timestamp"]))
            else:
                raise QmpProtocolError(f"the server sent an unknown message: {text[:80]!r}")
        return out


__all__ = [
    "MAX_DEPTH",
    "MAX_MESSAGE",
    "ClientConnection",
    "Command",
    "ErrorClass",
    "ErrorReply",
    "Event",
    "Greeting",
    "JsonSplitter",
    "QmpError",
    "QmpProtocolError",
    "Reply",
    "Return",
    "ServerConnection",
    "State",
]
