"""The QAPI checker's enums, unions, alternates and keyval mode (``proto.qmp.schema``) and
``BlockdevOptions`` (``proto.qmp.blockdev``). Every expected text was checked against QEMU 7.2
(``blockdev-add`` on ``qemu-system-x86_64 -M none`` for JSON, ``qemu-storage-daemon
--blockdev`` for keyval; tests/interop/test_blockdev_options_vs_qemu.py keeps a table of them
running against QEMU)."""

from __future__ import annotations

from typing import Any

import pytest

from dirtybits.proto.keyval import parse
from dirtybits.proto.qmp import schema
from dirtybits.proto.qmp.blockdev import BLOCKDEV_OPTIONS, DRIVERS, blockdev_options
from dirtybits.proto.qmp.core import ErrorClass, QmpError
from dirtybits.proto.qmp.schema import (
    ANY,
    BOOL,
    INT,
    NUMBER,
    SIZE,
    STR,
    UINT32,
    UINT64,
    Alternate,
    Enum,
    List,
    Member,
    Struct,
    Union,
    check,
    first_unvisited,
    qdict_order,
)


def error_of(args: Any, spec: Struct | Union, *, keyval: bool = False) -> str:
    with pytest.raises(QmpError) as err:
        check(args, spec, keyval=keyval)
    assert err.value.cls is ErrorClass.GENERIC
    return str(err.value)


def blockdev_error(args: Any, *, keyval: bool = False) -> str:
    with pytest.raises(QmpError) as err:
        blockdev_options(args, keyval=keyval)
    return str(err.value)


def kv(text: str) -> dict[str, Any]:
    """A --blockdev keyval argument, checked."""
    return blockdev_options(parse(text, "driver"), keyval=True)


def kv_error(text: str) -> str:
    return blockdev_error(parse(text, "driver"), keyval=True)


# ---------------------------------------------------------------------------- the checker

COLOR = Enum("Color", ("red", "green"))
SHAPE = Union("Shape", (Member("kind", Enum("Kind", ("circle", "square", "dot"))),
                        Member("color", COLOR, True)), "kind",
              {"circle": Struct("Circle", (Member("radius", INT),)),
               "square": Struct("Square", (Member("side", INT), Member("round", BOOL, True)))})
SPEC = schema.command(
    "x", Member("shape", SHAPE, True),
    Member("ref", Alternate("ShapeRef", SHAPE), True),
    Member("maybe", Alternate("ShapeRefOrNull", SHAPE, null=True), True),
    Member("mode", Alternate("ModeOrFlags", Struct("Flags", (Member("a", BOOL, True),)),
                             Enum("Mode", ("none", "all"))), True),
    Member("shapes", List(SHAPE), True),
    Member("n", NUMBER, True), Member("sz", SIZE, True), Member("u64", UINT64, True),
    Member("u32", UINT32, True), Member("i", INT, True), Member("any", ANY, True),
    Member("s", STR, True))


def test_union_visits_base_then_variant() -> None:
    assert check({"shape": {"kind": "square", "side": 2, "color": "red"}}, SPEC) == {
        "shape": {"kind": "square", "color": "red", "side": 2}}
    assert check({"shape": {"kind": "dot"}}, SPEC) == {"shape": {"kind": "dot"}}  # no members


@pytest.mark.parametrize("args, desc", [
    ({"shape": {}}, "Parameter 'shape.kind' is missing"),
    ({"shape": {"kind": 1}}, "Invalid parameter type for 'shape.kind', expected: string"),
    ({"shape": {"kind": "hexagon"}}, "Parameter 'kind' does not accept value 'hexagon'"),
    ({"shape": {"kind": "circle", "color": "blue"}},
     "Parameter 'color' does not accept value 'blue'"),
    ({"shape": {"kind": "circle"}}, "Parameter 'shape.radius' is missing"),
    ({"shape": {"kind": "circle", "radius": 1, "side": 2}}, "Parameter 'shape.side' is unexpected"),
    ({"shape": "circle"}, "Invalid parameter type for 'shape', expected: object"),
    ({"ref": 1}, "Invalid parameter type for 'ref', expected: ShapeRef"),
    ({"ref": None}, "Invalid parameter type for 'ref', expected: ShapeRef"),
    ({"ref": {"kind": "square"}}, "Parameter 'ref.side' is missing"),
    ({"maybe": []}, "Invalid parameter type for 'maybe', expected: ShapeRefOrNull"),
    ({"mode": "some"}, "Parameter 'mode' does not accept value 'some'"),
    ({"mode": {"a": 1}}, "Invalid parameter type for 'mode.a', expected: boolean"),
    ({"mode": True}, "Invalid parameter type for 'mode', expected: ModeOrFlags"),
    ({"shapes": [{"kind": "circle", "radius": 1}, {}]}, "Parameter 'shapes[1].kind' is missing"),
    ({"shapes": [{"kind": "circle", "radius": 1, "color": "x"}]},
     "Parameter 'color' does not accept value 'x'"),
    ({"n": "1"}, "Invalid parameter type for 'n', expected: number"),
    ({"n": True}, "Invalid parameter type for 'n', expected: number"),
    ({"sz": "1k"}, "Parameter 'sz' expects uint64"),  # JSON has no size syntax
    ({"u64": 1.0}, "Parameter 'u64' expects uint64"),
    ({"u64": 1 << 64}, "Parameter 'u64' expects uint64"),
    ({"u64": -(1 << 63) - 1}, "Parameter 'u64' expects uint64"),
    ({"u32": 1 << 32}, "Parameter 'u32' expects uint32_t"),
    ({"u32": -1}, "Parameter 'u32' expects uint32_t"),
    ({"i": 1 << 63}, "Invalid parameter type for 'i', expected: integer"),
    ({"i": -(1 << 63) - 1}, "Invalid parameter type for 'i', expected: integer"),
    ({"i": 1.5}, "Invalid parameter type for 'i', expected: integer"),
    ({"i": False}, "Invalid parameter type for 'i', expected: integer"),
    ({"s": None}, "Invalid parameter type for 's', expected: string"),
])
def test_json_errors(args: dict[str, Any], desc: str) -> None:
    assert error_of(args, SPEC) == desc


def test_json_values() -> None:
    got = check({"ref": "node0", "maybe": None, "mode": "all", "n": 2, "sz": 4096,
                 "u64": -1, "u32": 7, "i": -(1 << 63), "any": [{"x": None}], "s": ""}, SPEC)
    assert got == {"ref": "node0", "maybe": None, "mode": "all", "n": 2.0, "sz": 4096,
                   "u64": (1 << 64) - 1, "u32": 7, "i": -(1 << 63), "any": [{"x": None}],
                   "s": ""}
    assert isinstance(got["n"], float)  # a negative uint64 wraps, as QEMU accepts it
    assert check({"n": 10 ** 400}, SPEC) == {"n": float("inf")}  # QEMU: a double


@pytest.mark.parametrize("value, expected", [
    ("on", True), ("yes", True), ("true", True), ("y", True),
    ("off", False), ("no", False), ("false", False), ("n", False),
])
def test_keyval_booleans(value: str, expected: bool) -> None:
    assert check({"shape": {"kind": "square", "side": "1", "round": value}}, SPEC,
                 keyval=True)["shape"]["round"] is expected


@pytest.mark.parametrize("value, expected", [
    ("0", 0), ("42", 42), ("-42", -42), ("+5", 5), (" 5", 5), ("\t-0x10", -16), ("0x10", 16),
    ("0X1f", 31), ("010", 8), ("-9223372036854775808", -(1 << 63)),
    ("9223372036854775807", (1 << 63) - 1),
])
def test_keyval_integers(value: str, expected: int) -> None:
    assert check({"i": value}, SPEC, keyval=True) == {"i": expected}


@pytest.mark.parametrize("value", ["", " ", "x", "5 ", "0x", "08", "1.0", "1k", "--1", "+-1",
                                   "9223372036854775808", "-9223372036854775809", "\u0661"])
def test_keyval_integer_errors(value: str) -> None:
    assert error_of({"i": value}, SPEC, keyval=True) == "Parameter 'i' expects integer"


@pytest.mark.parametrize("value, expected", [
    ("0", 0), ("-1", (1 << 64) - 1), ("-18446744073709551615", 1),  # strtoull's wrap
    ("18446744073709551615", (1 << 64) - 1), ("0xffffffffffffffff", (1 << 64) - 1),
])
def test_keyval_uint64(value: str, expected: int) -> None:
    assert check({"u64": value}, SPEC, keyval=True) == {"u64": expected}


def test_keyval_unsigned_errors() -> None:
    assert error_of({"u64": "18446744073709551616"}, SPEC, keyval=True) == (
        "Parameter 'u64' expects integer")
    assert error_of({"u64": "-18446744073709551616"}, SPEC, keyval=True) == (
        "Parameter 'u64' expects integer")
    assert error_of({"u32": "4294967296"}, SPEC, keyval=True) == "Parameter 'u32' expects uint32_t"
    assert error_of({"u32": "-1"}, SPEC, keyval=True) == "Parameter 'u32' expects uint32_t"
    assert check({"u32": "4294967295"}, SPEC, keyval=True) == {"u32": (1 << 32) - 1}


@pytest.mark.parametrize("value, expected", [
    ("4k", 4096), ("1.5M", 3 << 19), ("0x1000", 4096), ("64", 64), ("1E", 1 << 60),
    ("18446744073709551615", (1 << 64) - 1),
])
def test_keyval_sizes(value: str, expected: int) -> None:
    assert check({"sz": value}, SPEC, keyval=True) == {"sz": expected}


@pytest.mark.parametrize("value", ["", "x", "-1", "1.5", "16E", "1kk", "18446744073709551616"])
def test_keyval_size_errors(value: str) -> None:
    assert error_of({"sz": value}, SPEC, keyval=True) == "Parameter 'sz' expects size"


@pytest.mark.parametrize("value, expected", [
    ("1", 1.0), ("-1.5", -1.5), (".5", 0.5), ("1e3", 1000.0), (" 2", 2.0), ("0x1.8p1", 3.0),
    ("0", 0.0), ("0e5", 0.0),
])
def test_keyval_numbers(value: str, expected: float) -> None:
    assert check({"n": value}, SPEC, keyval=True) == {"n": expected}


@pytest.mark.parametrize("value", ["", "x", "inf", "nan", "1e999", "1e-999", "1,5", "1e"])
def test_keyval_number_errors(value: str) -> None:
    assert error_of({"n": value}, SPEC, keyval=True) == (
        "Invalid parameter type for 'n', expected: number")


@pytest.mark.parametrize("args, desc", [
    ({"s": {"a": "1"}}, "Parameters 's.*' are unexpected"),
    ({"i": ["1"]}, "Parameters 'i.*' are unexpected"),
    ({"mode": ["x"]}, "Invalid parameter type for 'mode', expected: ModeOrFlags"),
    ({"mode": "some"}, "Parameter 'mode' does not accept value 'some'"),
    ({"shape": {"kind": {"x": "1"}}}, "Parameters 'shape.kind.*' are unexpected"),
    ({"shape": "circle"}, "Invalid parameter type for 'shape', expected: object"),
    ({"shapes": [{"kind": "circle"}]}, "Parameter 'shapes.0.radius' is missing"),  # keyval: .N
    ({"shapes": "x"}, "Invalid parameter type for 'shapes', expected: array"),
    ({"s": 1}, "Internal error: parameter s invalid"),  # not from the keyval parser
])
def test_keyval_errors(args: dict[str, Any], desc: str) -> None:
    assert error_of(args, SPEC, keyval=True) == desc


def test_keyval_alternates_take_strings() -> None:
    assert check({"ref": "null", "maybe": "", "mode": "none", "any": {"x": ["1"]}}, SPEC,
                 keyval=True) == {"ref": "null", "maybe": "", "mode": "none", "any": {"x": ["1"]}}


def test_nesting_is_limited() -> None:
    variants: dict[str, Struct] = {}
    spec = Union("Node", (Member("kind", Enum("K", ("leaf", "node"))),), "kind", variants)
    variants["node"] = Struct("N", (Member("child", Alternate("NodeRef", spec)),))
    deep: dict[str, Any] = {"kind": "leaf"}
    for _ in range(99):
        deep = {"kind": "node", "child": deep}
    check(deep, spec)
    desc = error_of({"kind": "node", "child": deep}, spec)
    assert desc.startswith("Parameter 'child.child.") and desc.endswith(
        f"' nests objects and lists more than {schema.MAX_NESTING} deep")


# ---------------------------------------------------------------------------- key order


def test_qdict_order_is_by_hash_bucket() -> None:
    assert qdict_order(["a", "b", "c", "d", "x", "y", "z"]) == ["d", "x", "a", "y", "b", "z", "c"]


@pytest.mark.parametrize("keys, visited, first", [
    (["driver", "file", "a", "b", "c"], ["driver", "file"], "b"),
    (["driver", "file", *(f"k{i}" for i in range(10))], ["driver", "file"], "k6"),
    ([*(f"k{i}" for i in range(9, -1, -1)), "driver", "file"], ["driver", "file"], "k6"),
    (["driver", "file", "node-name", "offset", "size", "read-only", "force-share", "zz", "yy"],
     ["driver", "node-name", "read-only", "force-share", "file", "offset", "size"], "yy"),
    (["direct", "no-flush", "p", "q", "r"], ["direct", "no-flush"], "p"),
    (["a"], ["a"], None),
])
def test_first_unvisited_is_qemus(keys: list[str], visited: list[str], first: str | None) -> None:
    """What blockdev-add says for these keys (checked with QEMU 7.2 and GLib 2.74)."""
    assert first_unvisited(keys, visited) == first


def test_unexpected_members_reported_as_qemu() -> None:
    args = {"driver": "raw", "file": "x", **{f"k{i}": i for i in range(10)}}
    assert blockdev_error(args) == "Parameter 'k6' is unexpected"
    many = {"driver": "raw", "file": "x", **{f"key{i}": i for i in range(200)}}
    assert blockdev_error(many).startswith("Parameter 'key")


# ---------------------------------------------------------------------------- BlockdevOptions


def test_blockdev_drivers() -> None:
    assert DRIVERS == ("file", "qcow2", "raw")
    assert BLOCKDEV_OPTIONS.discriminator == "driver"


@pytest.mark.parametrize("args", [
    {"driver": "file", "node-name": "f0", "filename": "/x"},
    {"driver": "file", "node-name": "f0", "filename": "/x", "locking": "off", "aio": "native",
     "aio-max-batch": 8, "drop-cache": False, "x-check-cache-dropped": True,
     "cache": {"direct": True, "no-flush": False}, "discard": "unmap", "read-only": True,
     "auto-read-only": False, "force-share": True, "detect-zeroes": "unmap"},
    {"driver": "raw", "node-name": "r", "file": "f0", "offset": 512, "size": 1 << 20},
    {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "a.qcow2"},
     "backing": None, "lazy-refcounts": True, "cache-size": 1 << 20, "l2-cache-size": 65536,
     "l2-cache-entry-size": 4096, "refcount-cache-size": 4096, "cache-clean-interval": 0,
     "pass-discard-request": True, "pass-discard-snapshot": False, "pass-discard-other": True,
     "overlap-check": {"template": "all", "active-l2": False},
     "data-file": {"driver": "file", "filename": "a.data"}},
    {"driver": "qcow2", "node-name": "q", "file": "f0", "backing": "b0", "overlap-check": "none"},
    {"driver": "qcow2", "node-name": "q", "file": "f0",
     "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "base.qcow2"},
                 "backing": None}},
])
def test_blockdev_good(args: dict[str, Any]) -> None:
    assert blockdev_options(args) == args


@pytest.mark.parametrize("args, desc", [
    ({}, "Parameter 'driver' is missing"),
    ({"driver": 1}, "Invalid parameter type for 'driver', expected: string"),
    ({"driver": "bogus"}, "Parameter 'driver' does not accept value 'bogus'"),
    ({"driver": "nbd", "node-name": "n"}, "Parameter 'driver' does not accept value 'nbd'"),
    ({"driver": "vmdk", "file": "x"}, "Parameter 'driver' does not accept value 'vmdk'"),
    ({"driver": "file"}, "Parameter 'filename' is missing"),
    ({"driver": "file", "filename": 1}, "Invalid parameter type for 'filename', expected: string"),
    ({"driver": "file", "filename": "x"}, "'node-name' must be specified for the root node"),
    ({"driver": "file", "filename": "x", "locking": "maybe"},
     "Parameter 'locking' does not accept value 'maybe'"),
    ({"driver": "file", "filename": "x", "pr-manager": "p"},
     "Parameter 'pr-manager' is unexpected"),  # left out: refused as unknown
    ({"driver": "file", "filename": "x", "aio-max-batch": 1.5},
     "Invalid parameter type for 'aio-max-batch', expected: integer"),
    ({"driver": "file", "filename": "x", "aio-max-batch": 1 << 63},
     "Invalid parameter type for 'aio-max-batch', expected: integer"),
    ({"driver": "raw", "file": None}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ({"driver": "raw", "file": 1}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ({"driver": "raw", "file": {"driver": "raw", "file": 1}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),  # the member, not its path
    ({"driver": "raw", "file": {}}, "Parameter 'file.driver' is missing"),
    ({"driver": "raw", "file": {"driver": 1}},
     "Invalid parameter type for 'file.driver', expected: string"),
    ({"driver": "raw", "file": {"driver": "bogus"}},
     "Parameter 'driver' does not accept value 'bogus'"),
    ({"driver": "raw", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
    ({"driver": "raw", "file": {"driver": "raw", "file": {"driver": "file", "filename": 1}}},
     "Invalid parameter type for 'file.file.filename', expected: string"),
    ({"driver": "raw", "file": {"driver": "raw", "bogus": 2,
                                "file": {"driver": "file", "filename": "x", "bogus": 1}}},
     "Parameter 'file.file.bogus' is unexpected"),  # the inner object is done first
    ({"driver": "raw", "file": "x", "discard": "x"},
     "Parameter 'discard' does not accept value 'x'"),
    ({"driver": "raw", "file": {"driver": "raw", "file": "y", "discard": 1}},
     "Invalid parameter type for 'file.discard', expected: string"),
    ({"driver": "raw", "file": "x", "cache": 1},
     "Invalid parameter type for 'cache', expected: object"),
    ({"driver": "file", "filename": "x", "cache": {"bogus": 1}},
     "Parameter 'cache.bogus' is unexpected"),
    ({"driver": "raw", "file": "x", "a": 1, "b": 2, "c": 3}, "Parameter 'b' is unexpected"),
    ({"driver": "raw", "file": "x", "node-name": "n", "offset": 1.5},
     "Invalid parameter type for 'offset', expected: integer"),
    ({"driver": "qcow2", "file": "x", "backing": 1},
     "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ({"driver": "qcow2", "file": "x", "backing": []},
     "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ({"driver": "qcow2", "file": "x", "backing": {"driver": "raw"}},
     "Parameter 'backing.file' is missing"),
    ({"driver": "qcow2", "file": "x", "overlap-check": 1},
     "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
    ({"driver": "qcow2", "file": "x", "overlap-check": {"template": "bad"}},
     "Parameter 'template' does not accept value 'bad'"),
    ({"driver": "qcow2", "file": "x", "encrypt": {"format": "luks"}},
     "Parameter 'encrypt' is unexpected"),  # left out: refused as unknown
])
def test_blockdev_json_errors(args: dict[str, Any], desc: str) -> None:
    assert blockdev_error(args) == desc


def test_blockdev_non_root_needs_no_node_name() -> None:
    assert blockdev_options({"driver": "file", "filename": "x"}, root=False) == {
        "driver": "file", "filename": "x"}


def test_blockdev_keyval_good() -> None:
    assert kv("qcow2,node-name=q,file.driver=file,file.filename=a.qcow2,backing=,"
              "lazy-refcounts=on,cache-size=1048576,read-only=yes,"
              "cache.direct=off,overlap-check.template=cached,overlap-check.main-header=n") == {
        "driver": "qcow2", "node-name": "q", "read-only": True, "cache": {"direct": False},
        "file": {"driver": "file", "filename": "a.qcow2"}, "backing": "",
        "lazy-refcounts": True, "cache-size": 1048576,
        "overlap-check": {"template": "cached", "main-header": False}}
    assert kv("raw,node-name=r,file=f0,offset=0x200,size=010") == {
        "driver": "raw", "node-name": "r", "file": "f0", "offset": 512, "size": 8}
    assert kv("qcow2,node-name=q,file=f,backing=null,overlap-check=all")["backing"] == "null"


@pytest.mark.parametrize("text, desc", [
    ("", "Parameter 'driver' is missing"),
    ("nbd", "Parameter 'driver' does not accept value 'nbd'"),
    ("driver=raw,file.driver=bogus", "Parameter 'driver' does not accept value 'bogus'"),
    ("driver=raw,file.driver=file", "Parameter 'file.filename' is missing"),
    ("driver=raw,file.0=x", "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("driver=raw,file=", "'node-name' must be specified for the root node"),
    ("driver=qcow2,file=x,backing.driver=raw", "Parameter 'backing.file' is missing"),
    ("driver=file,filename.x=1", "Parameters 'filename.*' are unexpected"),
    ("driver=file,filename=x,aio.0=1", "Parameters 'aio.*' are unexpected"),
    ("driver=file,cache=x", "Invalid parameter type for 'cache', expected: object"),
    ("driver=file,cache.direct=x", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("driver=file,cache.bogus=x", "Parameter 'cache.bogus' is unexpected"),
    ("driver=file,filename=/x,node-name=n,read-only=ON",
     "Parameter 'read-only' expects 'on' or 'off'"),
    ("driver=file,filename=/x,node-name=n,read-only=",
     "Parameter 'read-only' expects 'on' or 'off'"),
    ("driver=file,filename=/x,aio-max-batch=x", "Parameter 'aio-max-batch' expects integer"),
    ("driver=file,filename=/x,aio-max-batch=99999999999999999999",
     "Parameter 'aio-max-batch' expects integer"),
    ("driver=raw,file=x,size=1k", "Parameter 'size' expects integer"),
    ("driver=raw,file=x,size=9223372036854775808", "Parameter 'size' expects integer"),
    ("driver=raw,file=x,node-name=n,size=0x", "Parameter 'size' expects integer"),
    ("driver=raw,file=x,node-name=n,size=08", "Parameter 'size' expects integer"),
    ("driver=raw,file=x,node-name=n,size=5 ", "Parameter 'size' expects integer"),
    ("driver=raw,file=x,a=1,b=2,c=3", "Parameter 'b' is unexpected"),
    ("driver=qcow2,file=x,node-name=n,overlap-check=bogus",
     "Parameter 'overlap-check' does not accept value 'bogus'"),
    ("driver=qcow2,file=x,node-name=n,overlap-check.template=bogus",
     "Parameter 'template' does not accept value 'bogus'"),
    ("driver=file,a.0.x=1,a.1=2", "Parameter 'filename' is missing"),
])
def test_blockdev_keyval_errors(text: str, desc: str) -> None:
    assert kv_error(text) == desc
