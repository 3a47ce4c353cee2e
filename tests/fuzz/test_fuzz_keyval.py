"""Hypothesis over the option parsers of ``dirtybits serve``: QEMU's keyval syntax and JSON
reader (``dirtybits.proto.keyval``), the QAPI checker with ``BlockdevOptions``, and the daemon's
own ``--drive``/``--dirty-bitmap`` options.

Random text never raises anything but the parsers' own error (``QmpError``, ``UsageError``):
no IndexError, RecursionError, ValueError... And what the parsers accept means what it says:
nested options written out in keyval form (by a formatter here: dotted keys, ``.N`` list
indexes, ``,,`` for commas) or as JSON parse back to the same options.

Example counts: ``DIRTYBITS_FUZZ_EXAMPLES=N`` runs every test here with N examples; with ``CI``
set the runs are derandomized. Each example runs under the fuzz tests' shared time limit.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from fuzzfiles import fuzz_settings, time_limit

from dirtybits.errors import UsageError
from dirtybits.proto.keyval import from_json, parse, parse_blockdev
from dirtybits.proto.qmp.blockdev import blockdev_options
from dirtybits.proto.qmp.core import QmpError
from dirtybits.services.serve_options import parse_dirty_bitmap, parse_drive, resolve

TIME_LIMIT = 10.0  # seconds per example; each takes milliseconds



# ---------------------------------------------------------------------------- random text

KEYVAL_CHARS = st.sampled_from([*"ab01._-=,=,.?", "help", "driver", "file", "raw", "qcow2",
                                 "filename", "node-name", "é", "\0"])
keyval_text = st.one_of(
    st.text(max_size=60),
    st.lists(KEYVAL_CHARS, max_size=40).map("".join),
)

JSON_TOKENS = st.sampled_from([
    "{", "}", "[", "]", ":", ",", " ", '"driver"', '"raw"', '"file"', '"x"', "'y'", "1", "-0",
    "01", "1.5e3", "1.", "-", "tru", "true", "null", '"\\u00e9"', '"\\ud83d\\ude00"', '"\\q"',
    '"\\u12"', '"a', "X", "%", '"\t"', "\n", "1e999", "18446744073709551616", '"node-name"',
    '"n"', "é", "'\\''", "\\", '"\\ud800"'])
json_text = st.one_of(
    st.text(max_size=60).map(lambda t: "{" + t),
    st.lists(JSON_TOKENS, max_size=30).map(lambda toks: "{" + "".join(toks)),
)


@fuzz_settings(400)
@given(keyval_text, st.sampled_from([None, "driver"]))
def test_keyval_raises_only_qmp_errors(text: str, implied: str | None) -> None:
    with time_limit(TIME_LIMIT):
        try:
            out = parse(text, implied)
        except QmpError:
            return
    assert isinstance(out, dict)
    assert_strings_only(out)


def assert_strings_only(value: Any) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            assert (v and all(isinstance(k, str) for k in v)) or v is value
            stack.extend(v.values())
        elif isinstance(v, list):
            assert v
            stack.extend(v)
        else:
            assert isinstance(v, str)


@fuzz_settings(400)
@given(json_text)
def test_json_raises_only_qmp_errors(text: str) -> None:
    with time_limit(TIME_LIMIT):
        try:
            out = from_json(text)
        except QmpError:
            return
    assert isinstance(out, dict)


@fuzz_settings(400)
@given(st.one_of(keyval_text, json_text))
def test_blockdev_raises_only_qmp_errors(text: str) -> None:
    with time_limit(TIME_LIMIT):
        try:
            out = parse_blockdev(text)
        except QmpError:
            return
    assert out["driver"] in ("file", "qcow2", "raw") and "node-name" in out


# ---------------------------------------------------------------------------- random options

MEMBER_NAMES = ["driver", "node-name", "file", "filename", "backing", "cache", "direct",
                "no-flush", "read-only", "size", "offset", "aio", "locking", "overlap-check",
                "template", "discard", "detect-zeroes", "lazy-refcounts", "x", "y"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                    st.floats(allow_nan=False), st.sampled_from(
                        ["file", "raw", "qcow2", "on", "off", "n", "0x10", "unmap", "all", "",
                         "bogus", "1k"]))
json_values = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(MEMBER_NAMES), inner, max_size=5)),
    max_leaves=20)
keyval_values = st.recursive(
    st.sampled_from(["file", "raw", "qcow2", "on", "off", "y", "0x10", "010", "unmap", "cached",
                     "", "bogus", "1k", "-1", "null"]),
    lambda inner: st.one_of(st.lists(inner, min_size=1, max_size=3),
                            st.dictionaries(st.sampled_from(MEMBER_NAMES), inner, min_size=1,
                                            max_size=5)),
    max_leaves=20)


@fuzz_settings(250)
@given(st.dictionaries(st.sampled_from(MEMBER_NAMES), json_values, max_size=8))
def test_blockdev_options_json_raise_only_qmp_errors(obj: dict[str, Any]) -> None:
    with time_limit(TIME_LIMIT), contextlib.suppress(QmpError):
        blockdev_options(obj)


@fuzz_settings(250)
@given(st.dictionaries(st.sampled_from(MEMBER_NAMES), keyval_values, max_size=8))
def test_blockdev_options_keyval_raise_only_qmp_errors(obj: dict[str, Any]) -> None:
    with time_limit(TIME_LIMIT):
        try:
            out = blockdev_options(obj, keyval=True)
        except QmpError:
            return
    assert out["driver"] in ("file", "qcow2", "raw")


# ---------------------------------------------------------------------------- round trips

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.builds(str.__add__, st.sampled_from(LETTERS),
                  st.text(LETTERS + "0123456789_-", max_size=8))  # QAPI names
values = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)),
                 max_size=12)
trees = st.recursive(
    values,
    lambda inner: st.one_of(st.lists(inner, min_size=1, max_size=4),
                            st.dictionaries(names, inner, min_size=1, max_size=4)),
    max_leaves=25)


def keyval_format(options: dict[str, Any]) -> str:
    """Nested options in keyval form: dotted keys, list indexes, ``,,`` for commas."""
    items: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            items.append(f"{prefix}={value.replace(',', ',,')}")

    walk("", options)
    return ",".join(items)


@fuzz_settings(200)
@given(st.dictionaries(names, trees, max_size=6))
def test_keyval_round_trip(options: dict[str, Any]) -> None:
    text = keyval_format(options)
    with time_limit(TIME_LIMIT):
        assert parse(text) == options


@fuzz_settings(100)
@given(st.dictionaries(names, trees, min_size=1, max_size=6), st.integers(0, 100))
def test_keyval_round_trip_with_an_implied_key(options: dict[str, Any], seed: int) -> None:
    driver = ["file", "qcow2", "raw", "x-y"][seed % 4]
    options.pop("driver", None)
    text = f"{driver},{keyval_format(options)}" if options else driver
    with time_limit(TIME_LIMIT):
        assert parse(text, "driver") == {"driver": driver, **options}


def noncharacter(c: str) -> bool:
    cp = ord(c)
    return 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE


json_strings = st.text(st.characters(exclude_categories=("Cs",)).filter(
    lambda c: not noncharacter(c)), max_size=12)
json_trees = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
              st.floats(allow_nan=False, allow_infinity=False), json_strings),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(json_strings, inner, max_size=4)),
    max_leaves=25)


@fuzz_settings(200)
@given(st.dictionaries(json_strings, json_trees, max_size=6), st.booleans())
def test_json_round_trip(obj: dict[str, Any], ascii_only: bool) -> None:
    text = json.dumps(obj, ensure_ascii=ascii_only)
    with time_limit(TIME_LIMIT):
        got = from_json(text)
    assert got == obj
    assert_same_types(got, obj)


def assert_same_types(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        for k in a:
            assert_same_types(a[k], b[k])
    elif isinstance(a, list):
        for x, y in zip(a, b, strict=True):
            assert_same_types(x, y)
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b))


# ---------------------------------------------------------------------------- serve options

SERVE_CHARS = st.sampled_from([*"ab0=,.", "file", "id", "d0", "name", "drive", "format", "qcow2",
                               "on", "off", "granularity", "64k", "create", "file_id", "cache",
                               "none", "é"])
serve_text = st.one_of(st.text(max_size=40), st.lists(SERVE_CHARS, max_size=30).map("".join))


@fuzz_settings(400)
@given(st.lists(st.tuples(st.booleans(), serve_text), max_size=5))
def test_serve_options_raise_only_usage_errors(args: list[tuple[bool, str]]) -> None:
    with time_limit(TIME_LIMIT), contextlib.suppress(UsageError):
        resolve([parse_drive(text) if drive else parse_dirty_bitmap(text)
                 for drive, text in args])
