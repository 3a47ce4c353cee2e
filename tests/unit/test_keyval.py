"""QEMU's keyval syntax and its JSON reader (``dirtybits.proto.keyval``): every expected text
here is what ``qemu-storage-daemon --blockdev`` 7.2 prints (tests/interop/
test_blockdev_options_vs_qemu.py runs a table of them against QEMU itself)."""

from __future__ import annotations

from typing import Any

import pytest

from dirtybits.proto.keyval import from_json, parse, parse_blockdev, parse_help
from dirtybits.proto.qmp.core import ErrorClass, QmpError


def error_of(fn: Any, *args: Any) -> str:
    with pytest.raises(QmpError) as err:
        fn(*args)
    assert err.value.cls is ErrorClass.GENERIC
    return str(err.value)


# ---------------------------------------------------------------------------- keyval


@pytest.mark.parametrize("text, parsed", [
    ("", {}),
    ("a=1", {"a": "1"}),
    ("a=1,", {"a": "1"}),  # one trailing comma
    ("a=", {"a": ""}),
    ("a=1,b=2,a=3", {"a": "3", "b": "2"}),  # the last wins, in its first place
    ("file.driver=file,file.filename=a.qcow2",
     {"file": {"driver": "file", "filename": "a.qcow2"}}),
    ("a.b.c=1,a.b.d=2,a.e=3", {"a": {"b": {"c": "1", "d": "2"}, "e": "3"}}),
    ("filename=a,,b,,,c=d", {"filename": "a,b,", "c": "d"}),  # ,, is a comma
    ("a=x,,", {"a": "x,"}),
    ("a==b", {"a": "=b"}),
    ("a.0=x,a.1=y", {"a": ["x", "y"]}),
    ("a.1=y,a.0=x", {"a": ["x", "y"]}),  # indexes in any order
    ("a.0.b=x,a.0.c=y,a.1.b=z", {"a": [{"b": "x", "c": "y"}, {"b": "z"}]}),
    ("a.01=x,a.0=y", {"a": ["y", "x"]}),  # 01 is index 1
    ("a.0.0=x", {"a": [["x"]]}),
    ("__com.redhat_x=1", {"__com.redhat_x": "1"}),  # a downstream name
    ("x-y_z=1", {"x-y_z": "1"}),
    ("a=é", {"a": "é"}),
    ("a=1\0,b=2", {"a": "1"}),  # a C string ends at NUL
])
def test_parse(text: str, parsed: dict[str, Any]) -> None:
    assert parse(text) == parsed


def test_the_last_of_repeated_keys_wins_in_its_first_place() -> None:
    assert list(parse("a=1,b=2,a=3")) == ["a", "b"]


@pytest.mark.parametrize("text, parsed", [
    ("qcow2", {"driver": "qcow2"}),
    ("qcow2,file=f", {"driver": "qcow2", "file": "f"}),
    ("driver=raw", {"driver": "raw"}),  # an explicit key needs no implying
    ("x,driver=y", {"driver": "y"}),
])
def test_implied_key(text: str, parsed: dict[str, Any]) -> None:
    assert parse(text, "driver") == parsed


@pytest.mark.parametrize("text, implied, desc", [
    ("=1", None, "Invalid parameter ''"),
    ("driver=file,=1", None, "Invalid parameter ''"),
    ("1=x", None, "Invalid parameter '1'"),
    ("_x=1", None, "Invalid parameter '_x'"),
    ("x.=1", None, "Invalid parameter 'x.'"),
    ("a.1b=x", None, "Invalid parameter 'a.1b'"),
    ("a.b c=1", None, "Invalid parameter 'a.b c'"),
    ("é=1", None, "Invalid parameter 'é'"),
    ("fi,,le", "driver", "Invalid parameter ''"),  # no ,, in an implied value
    ("x", None, "Expected '=' after parameter 'x'"),
    ("driver=file,x", None, "Expected '=' after parameter 'x'"),
    ("a.b", None, "Expected '=' after parameter 'a.b'"),
    ("help,x", "driver", "Expected '=' after parameter 'x'"),  # parsing first, help after
    ("a.b=1,a=2", None, "Parameters 'a.*' used inconsistently"),
    ("a=2,a.b=1", None, "Parameters 'a.*' used inconsistently"),
    ("a.b.c=1,a.b=2", None, "Parameters 'a.b.*' used inconsistently"),
    ("a.0=1,a.b=1", None, "Parameters 'a.*' used inconsistently"),
    ("x=1,a.b.0=1,a.b.c=2", None, "Parameters 'a.b.*' used inconsistently"),
    ("a.1=1", None, "Parameter 'a.0' missing"),
    ("a.5=x", None, "Parameter 'a.0' missing"),
    ("a.0=x,a.2=y", None, "Parameter 'a.1' missing"),
    ("a.b.0=x,a.b.99999999999999999999=y", None, "Parameter 'a.b.1' missing"),
    ("a" * 128 + "=1", None, f"Parameter '{'a' * 128}' is too long"),
    ("a" * 128 + ".x=1", None, f"Parameter fragment '{'a' * 128}' is too long"),
    ("x." + "a" * 128 + "=1", None, f"Parameter fragment '{'a' * 128}' is too long"),
    ("help", "driver", "Help is not available for this option"),
    ("?", "driver", "Help is not available for this option"),
    ("x,help", "driver", "Help is not available for this option"),
    ("driver=file,help,filename=/x", None, "Help is not available for this option"),
])
def test_parse_errors(text: str, implied: str | None, desc: str) -> None:
    assert error_of(parse, text, implied) == desc


def test_fragments_of_127_are_fine() -> None:
    assert parse("a" * 127 + "=1") == {"a" * 127: "1"}


def test_which_inconsistency_is_reported_follows_qemus_dict_order() -> None:
    """Two inconsistent objects: QEMU reports the one its QDict yields first (by hash), not
    the first written."""
    for text in ("z.0=1,z.x=2,a.0=1,a.x=2", "a.0=1,a.x=2,z.0=1,z.x=2"):
        assert error_of(parse, text) == "Parameters 'a.*' used inconsistently"


def test_parse_help() -> None:
    assert parse_help("help", "driver") == ({}, True)
    assert parse_help("driver=file,?,a=1") == ({"driver": "file", "a": "1"}, True)
    assert parse_help("qcow2", "driver") == ({"driver": "qcow2"}, False)
    assert parse_help("helpme=1") == ({"helpme": "1"}, False)


def test_deep_keys_do_not_overflow_the_stack() -> None:
    value: Any = parse("a" + ".a" * 5000 + "=1")
    for _ in range(5001):
        value = value["a"]
    assert value == "1"
    value = parse("a" + ".0" * 3000 + "=1")["a"]
    for _ in range(3000):
        value = value[0]
    assert value == "1"


# ---------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("text, value", [
    ('{"a":1}', {"a": 1}),
    ('{ }', {}),
    ('{"a":"x"} ', {"a": "x"}),
    ("{'a':'it\\'s', \"b\":'\"'}", {"a": "it's", "b": '"'}),  # single quotes: QEMU's extension
    ('{"a":[1,-0,1.5,1e5,1E+2,true,false,null,{}]}',
     {"a": [1, 0, 1.5, 1e5, 100.0, True, False, None, {}]}),
    ('{"a":9223372036854775808}', {"a": 9223372036854775808}),  # a uint64
    ('{"a":18446744073709551616}', {"a": 18446744073709551616.0}),  # beyond: a double
    ('{"a":-9223372036854775809}', {"a": -9223372036854775809.0}),
    ('{"a":"\\u00e9\\ud83d\\ude00\\u0000\\n\\/"}', {"a": "é😀\0\n/"}),
    ('{"a":"é"}', {"a": "é"}),
])
def test_from_json(text: str, value: Any) -> None:
    got = from_json(text)
    assert got == value and [type(v) for v in got.values()] == [type(v) for v in value.values()]


@pytest.mark.parametrize("text, desc", [
    ("{", "JSON parse error, premature EOI"),
    ('{"driver":"file"', "JSON parse error, premature EOI"),
    ('{"a":[1,', "JSON parse error, premature EOI"),
    ("{]", "JSON parse error, expecting value"),
    ('{"driver":"file",}', "JSON parse error, expecting value"),
    ('{"a":[1,]}', "JSON parse error, expecting value"),
    ('{"a":1} x', "Expecting at most one JSON value"),
    ('{"driver":"file"}}', "Expecting at most one JSON value"),
    ("{} {}", "Expecting at most one JSON value"),
    ('{"a":1}]', "Expecting at most one JSON value"),
    ('{"a":tRue}', "JSON parse error, stray 'R'"),
    ('{"a":"file', "JSON parse error, stray '\"file'"),
    ("{X}", "JSON parse error, stray 'X'"),
    ('{"a":01}', "JSON parse error, stray '01'"),
    ('{"a":1.}', "JSON parse error, stray '1.}'"),
    ('{"a":-}', "JSON parse error, stray '-}'"),
    ('{"a":1e}', "JSON parse error, stray '1e}'"),
    ('{"a":+1}', "JSON parse error, stray '+'"),
    ('{"a":NaN}', "JSON parse error, stray 'N'"),
    ('{"a":%d}', "JSON parse error, stray '%'"),
    ('{"a":"\t"}', "JSON parse error, stray '\"\t'"),  # a raw control character
    ('{"a":"\\q"}', "JSON parse error, invalid escape sequence in string"),
    ('{"a":"\\u12"}', 'JSON parse error, \\u12" is not a valid Unicode character'),
    ('{"a":"\\ud800"}', "JSON parse error, \\ud800 is not a valid Unicode character"),
    ('{"a":"\\ud83d\\u0041"}', "JSON parse error, \\ud83d is not a valid Unicode character"),
    ('{"a":"\\uffff"}', "JSON parse error, \\uffff is not a valid Unicode character"),
    ('{"a":"\\uFDD0"}', "JSON parse error, \\uFDD0 is not a valid Unicode character"),
    ('{"a":"\uffff"}', "JSON parse error, invalid UTF-8 sequence in string"),
    ("{1:2}", "JSON parse error, key is not a string in object"),
    ("{null:2}", "JSON parse error, key is not a string in object"),
    ('{{"a" 1}:2}', "JSON parse error, missing : in object pair"),  # the key's own error first
    ('{"a" 1}', "JSON parse error, missing : in object pair"),
    ('{"a":1 "b":2}', "JSON parse error, expected separator in dict"),
    ('{"a":[1 2]}', "JSON parse error, expected separator in list"),
    ('{"a":tru}', "JSON parse error, invalid keyword 'tru'"),
    ('{"driver":"file","driver":"raw"}', "JSON parse error, duplicate key"),
    ('{"a":' + "[" * 1024 + "]" * 1024 + "}", "JSON nesting depth limit exceeded"),
])
def test_from_json_errors(text: str, desc: str) -> None:
    assert error_of(from_json, text) == desc


def test_json_nesting_to_qemus_limit() -> None:
    value: Any = from_json('{"a":' + "[" * 1023 + "]" * 1023 + "}")["a"]
    for _ in range(1022):
        value = value[0]
    assert value == []


def test_bytes_that_are_not_utf8_come_back_as_they_came() -> None:
    """A command line's stray bytes (surrogate-escaped by Python) are in QEMU's text as
    QEMU prints them."""
    assert error_of(from_json, '{"a":é}') == "JSON parse error, stray '\udcc3'"  # its 1st byte
    text = b'{"a":"\xff"}'.decode("utf-8", "surrogateescape")
    assert error_of(from_json, text) == "JSON parse error, stray '\"\udcff'"
    assert error_of(from_json, '{"a":"\ud800"}') == ("JSON parse error, invalid UTF-8 "
                                                     "sequence in string")


# ---------------------------------------------------------------------------- --blockdev


def test_parse_blockdev_keyval_and_json_agree() -> None:
    want = {"driver": "qcow2", "node-name": "d0", "read-only": True,
            "file": {"driver": "file", "filename": "a,b.qcow2"}, "cache-size": 1048576}
    assert parse_blockdev("qcow2,node-name=d0,read-only=on,file.driver=file,"
                          "file.filename=a,,b.qcow2,cache-size=0x100000") == want
    assert parse_blockdev('{"driver": "qcow2", "node-name": "d0", "read-only": true, '
                          '"file": {"driver": "file", "filename": "a,b.qcow2"}, '
                          '"cache-size": 1048576}') == want


@pytest.mark.parametrize("text, desc", [
    ("", "Parameter 'driver' is missing"),
    ("driver=bogus", "Parameter 'driver' does not accept value 'bogus'"),
    ("file", "Parameter 'filename' is missing"),
    ("driver=file,filename=/x,bogus=1", "Parameter 'bogus' is unexpected"),
    ("driver=file,filename=/x", "'node-name' must be specified for the root node"),
    ("driver=file,filename=/x,node-name=n,read-only=1",
     "Parameter 'read-only' expects 'on' or 'off'"),
    ('{"driver":"file","filename":"/x","node-name":"n","read-only":"on"}',
     "Invalid parameter type for 'read-only', expected: boolean"),
    ("{", "JSON parse error, premature EOI"),
    ("help", "Help is not available for this option"),
])
def test_parse_blockdev_errors(text: str, desc: str) -> None:
    assert error_of(parse_blockdev, text) == desc
