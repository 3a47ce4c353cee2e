"""``dirtybits serve``'s ``--drive`` and ``--dirty-bitmap`` options and the checks across them
(``dirtybits.services.serve_options``). The node-name texts are QEMU 7.2's (``--blockdev
...,node-name=1a``), the granularity ones QEMU's ``block-dirty-bitmap-add``'s and qcow2's."""

from __future__ import annotations

import pytest

from dirtybits.errors import UsageError
from dirtybits.services.serve_options import (
    PARSERS,
    DirtyBitmapOption,
    DriveOption,
    ServeOptions,
    node_name_problem,
    parse_dirty_bitmap,
    parse_drive,
    resolve,
    split_items,
)


def error_of(parse: object, text: str) -> str:
    assert callable(parse)
    with pytest.raises(UsageError) as err:
        parse(text)
    return str(err.value)


# ---------------------------------------------------------------------------- items


@pytest.mark.parametrize("text, items", [
    ("", {}),
    ("a=1", {"a": "1"}),
    ("a=1,", {"a": "1"}),
    ("a=,b=2", {"a": "", "b": "2"}),
    ("file=a,,b.qcow2,id=d0", {"file": "a,b.qcow2", "id": "d0"}),
    ("a=1,,,b=2", {"a": "1,", "b": "2"}),
    ("a=x=y", {"a": "x=y"}),
])
def test_split_items(text: str, items: dict[str, str]) -> None:
    assert split_items(text, "--x") == items


@pytest.mark.parametrize("text, desc", [
    ("file", "--x: 'file' needs a value (file=...)"),
    ("a=1,read-only", "--x: 'read-only' needs a value (read-only=...)"),
    (",a=1", "--x: an empty item in ',a=1'"),
    ("=1", "--x: a value with no key in '=1'"),
    ("a=1,a=2", "--x: 'a' is given twice"),
])
def test_split_items_errors(text: str, desc: str) -> None:
    assert error_of(lambda t: split_items(t, "--x"), text) == desc


@pytest.mark.parametrize("name, problem", [
    ("d0", None), ("a.b-c_d", None), ("A" * 31, None),
    ("A" * 32, "Node name too long"),
    ("", "Invalid node-name: ''"), ("1a", "Invalid node-name: '1a'"),
    ("_a", "Invalid node-name: '_a'"), ("a#", "Invalid node-name: 'a#'"),
    ("é", "Invalid node-name: 'é'"), ("a b", "Invalid node-name: 'a b'"),
])
def test_node_names_as_qemu(name: str, problem: str | None) -> None:
    assert node_name_problem(name) == problem


# ---------------------------------------------------------------------------- --drive


def test_drive_defaults() -> None:
    assert parse_drive("file=a.qcow2,id=d0") == DriveOption("d0", "a.qcow2")
    d = parse_drive("file=a.qcow2,id=d0")
    assert (d.format, d.bitmap, d.read_only, d.cache, d.bitmap_file) == (
        None, "auto", False, "writeback", None)


def test_drive_everything() -> None:
    assert parse_drive("id=d0,file=/i/a,,b.img,format=raw,bitmap=auto,read-only=yes,"
                       "cache=directsync,bitmap-file=c.qcow2") == DriveOption(
        "d0", "/i/a,b.img", "raw", "auto", True, "directsync", "c.qcow2")
    for value, ro in (("on", True), ("true", True), ("y", True), ("off", False),
                      ("no", False), ("false", False), ("n", False)):
        assert parse_drive(f"file=f,id=d,read-only={value}").read_only is ro
    for mode in ("writeback", "none", "writethrough", "directsync", "unsafe"):
        assert parse_drive(f"file=f,id=d,cache={mode}").cache == mode
    assert parse_drive("file=f,id=d,format=qcow2,bitmap=no").bitmap == "no"


@pytest.mark.parametrize("text, desc", [
    ("", "--drive: 'file' is missing (file=...)"),
    ("id=d0", "--drive: 'file' is missing (file=...)"),
    ("file=a", "--drive: 'id' is missing (id=...)"),
    ("file=,id=d0", "--drive: 'file' is empty"),
    ("file=a,id=", "--drive: 'id' is empty"),
    ("file=a,id=1a", "--drive: id=1a: Invalid node-name: '1a' (an id is a letter, then "
                     "letters, digits, '-', '.' or '_', at most 31 in all)"),
    ("file=a,id=" + "d" * 32, "--drive: id=" + "d" * 32 + ": Node name too long (an id is a "
                              "letter, then letters, digits, '-', '.' or '_', at most 31 in all)"),
    ("file=a,id=d0,format=vmdk", "--drive: format=vmdk is not one of qcow2, raw"),
    ("file=a,id=d0,bitmap=yes", "--drive: bitmap=yes is not one of auto, no"),
    ("file=a,id=d0,cache=off", "--drive: cache=off is not one of writeback, none, "
                               "writethrough, directsync, unsafe"),
    ("file=a,id=d0,read-only=1", "--drive: Parameter 'read-only' expects 'on' or 'off'"),
    ("file=a,id=d0,node-name=x", "--drive: unknown option 'node-name' (known: file, id, "
                                 "format, bitmap, read-only, cache, bitmap-file)"),
    ("file=a,id=d0,bitmap-file=", "--drive: 'bitmap-file' is empty"),
    ("file=a,id=d0,bitmap=no,bitmap-file=c", "--drive id=d0: bitmap-file is not allowed with "
                                             "bitmap=no"),
    ("file=a,id=d0,id=d1", "--drive: 'id' is given twice"),
    ("file", "--drive: 'file' needs a value (file=...)"),
])
def test_drive_errors(text: str, desc: str) -> None:
    assert error_of(parse_drive, text) == desc


# ---------------------------------------------------------------------------- --dirty-bitmap


def test_dirty_bitmap_defaults() -> None:
    assert parse_dirty_bitmap("name=b0,drive=d0") == DirtyBitmapOption("b0", "d0")
    b = parse_dirty_bitmap("name=b0,drive=d0")
    assert (b.file, b.file_id, b.granularity, b.enabled, b.create, b.auto, b.persistent) == (
        None, None, None, None, False, None, None)


def test_dirty_bitmap_everything() -> None:
    assert parse_dirty_bitmap("name=b,,1,drive=d0,file=c.qcow2,file_id=c0,granularity=64k,"
                              "enabled=off,create=on,auto=yes,persistent=n") == (
        DirtyBitmapOption("b,1", "d0", "c.qcow2", "c0", 65536, False, True, True, False))
    for text, value in (("512", 512), ("1M", 1 << 20), ("0x10000", 65536), ("2G", 1 << 31)):
        assert parse_dirty_bitmap(f"name=b,drive=d,create=on,granularity={text}"
                                  ).granularity == value
    assert parse_dirty_bitmap("name=b,drive=d,file_id=c0").file_id == "c0"


@pytest.mark.parametrize("text, desc", [
    ("drive=d0", "--dirty-bitmap: 'name' is missing (name=...)"),
    ("name=b0", "--dirty-bitmap: 'drive' is missing (drive=...)"),
    ("name=,drive=d0", "--dirty-bitmap: 'name' is empty"),
    ("name=b0,drive=0d", "--dirty-bitmap: drive=0d: Invalid node-name: '0d' (an id is a "
                         "letter, then letters, digits, '-', '.' or '_', at most 31 in all)"),
    ("name=b0,drive=d0,file=", "--dirty-bitmap name=b0: 'file' is empty"),
    ("name=b0,drive=d0,file_id=", "--dirty-bitmap name=b0: file_id=: Invalid node-name: '' "
                                  "(an id is a letter, then letters, digits, '-', '.' or '_', "
                                  "at most 31 in all)"),
    ("name=b0,drive=d0,granularity=64k", "--dirty-bitmap name=b0: granularity is only allowed "
                                         "with create=on"),
    ("name=b0,drive=d0,granularity=64k,create=off", "--dirty-bitmap name=b0: granularity is "
                                                    "only allowed with create=on"),
    ("name=b0,drive=d0,create=on,granularity=x", "--dirty-bitmap name=b0: granularity=x is "
                                                 "not a size (512, 64k, 1M, ...)"),
    ("name=b0,drive=d0,create=on,granularity=-512", "--dirty-bitmap name=b0: granularity=-512 "
                                                    "is not a size (512, 64k, 1M, ...)"),
    ("name=b0,drive=d0,create=on,granularity=256", "--dirty-bitmap name=b0: Granularity must "
                                                   "be power of 2 and at least 512"),
    ("name=b0,drive=d0,create=on,granularity=0", "--dirty-bitmap name=b0: Granularity must be "
                                                 "power of 2 and at least 512"),
    ("name=b0,drive=d0,create=on,granularity=65535", "--dirty-bitmap name=b0: Granularity "
                                                     "must be power of 2 and at least 512"),
    ("name=b0,drive=d0,create=on,granularity=4G", "--dirty-bitmap name=b0: Granularity exceeds "
                                                  "maximum (2147483648 bytes)"),
    ("name=b0,drive=d0,enabled=maybe", "--dirty-bitmap name=b0: Parameter 'enabled' expects "
                                       "'on' or 'off'"),
    ("name=b0,drive=d0,create=1", "--dirty-bitmap name=b0: Parameter 'create' expects 'on' or "
                                  "'off'"),
    ("name=b0,drive=d0,disabled=on", "--dirty-bitmap: unknown option 'disabled' (known: name, "
                                     "drive, file, file_id, granularity, enabled, create, "
                                     "auto, persistent)"),
    ("name=b0,name=b1,drive=d0", "--dirty-bitmap: 'name' is given twice"),
])
def test_dirty_bitmap_errors(text: str, desc: str) -> None:
    assert error_of(parse_dirty_bitmap, text) == desc


# ---------------------------------------------------------------------------- resolve


def opts(*args: str) -> list[DriveOption | DirtyBitmapOption]:
    """``--drive X --dirty-bitmap Y ...`` as the command line gives them."""
    return [PARSERS[args[i]](args[i + 1]) for i in range(0, len(args), 2)]


def test_resolve() -> None:
    got = resolve(opts("--drive", "file=a.qcow2,id=d0",
                       "--dirty-bitmap", "name=b0,drive=d0",
                       "--dirty-bitmap", "name=b1,drive=d0,file=c.qcow2,file_id=c0",
                       "--drive", "file=b.img,id=d1,format=raw,bitmap-file=d1.bitmaps",
                       "--dirty-bitmap", "name=b0,drive=d1,file_id=c0",
                       "--dirty-bitmap", "name=b1,drive=d1",
                       "--dirty-bitmap", "name=b2,drive=d1,file=./x/../c.qcow2,file_id=c0",
                       "--dirty-bitmap", "name=b3,drive=d1,file=direct.qcow2"))
    assert isinstance(got, ServeOptions)
    assert [d.id for d in got.drives] == ["d0", "d1"]
    assert got.drive("d1").format == "raw"
    assert got.containers == {"c0": "c.qcow2"}
    assert [(b.drive, b.name, got.container_path(b)) for b in got.bitmaps] == [
        ("d0", "b0", None), ("d0", "b1", "c.qcow2"), ("d1", "b0", "c.qcow2"),
        ("d1", "b1", "d1.bitmaps"), ("d1", "b2", "./x/../c.qcow2"),
        ("d1", "b3", "direct.qcow2")]
    assert [b.name for b in got.bitmaps_of("d1")] == ["b0", "b1", "b2", "b3"]
    with pytest.raises(KeyError):
        got.drive("d9")


def test_a_bitmap_may_come_before_its_drive() -> None:
    got = resolve(opts("--dirty-bitmap", "name=b0,drive=d0", "--drive", "file=a,id=d0"))
    assert [b.name for b in got.bitmaps_of("d0")] == ["b0"]


def test_resolve_nothing() -> None:
    assert resolve([]) == ServeOptions((), ())


@pytest.mark.parametrize("args, desc", [
    (("--drive", "file=a,id=d0", "--drive", "file=b,id=d0"),
     "--drive id=d0: the id is already used by another --drive (file=a)"),
    (("--drive", "file=a,id=d0", "--dirty-bitmap", "name=b0,drive=d1"),
     "--dirty-bitmap name=b0,drive=d1: no --drive has id=d1"),
    (("--drive", "file=a,id=d0", "--dirty-bitmap", "name=b0,drive=d0",
      "--dirty-bitmap", "name=b0,drive=d0,create=on"),
     "--dirty-bitmap name=b0,drive=d0: the bitmap is given twice for drive d0"),
    (("--drive", "file=a,id=d0", "--dirty-bitmap", "name=b0,drive=d0,file_id=c0"),
     "--dirty-bitmap name=b0,drive=d0: file_id=c0 is used before it is declared "
     "(file=PATH,file_id=c0)"),
    (("--drive", "file=a,id=d0", "--dirty-bitmap", "name=b0,drive=d0,file_id=c0",
      "--dirty-bitmap", "name=b1,drive=d0,file=c,file_id=c0"),
     "--dirty-bitmap name=b0,drive=d0: file_id=c0 is used before it is declared "
     "(file=PATH,file_id=c0)"),
    (("--drive", "file=a,id=d0", "--dirty-bitmap", "name=b0,drive=d0,file=c,,1,file_id=c0",
      "--dirty-bitmap", "name=b1,drive=d0,file=d,file_id=c0"),
     "--dirty-bitmap name=b1,drive=d0: file_id=c0 is already declared as file=c,,1, "
     "not file=d"),
])
def test_resolve_errors(args: tuple[str, ...], desc: str) -> None:
    with pytest.raises(UsageError) as err:
        resolve(opts(*args))
    assert str(err.value) == desc


def test_the_same_bitmap_name_on_two_drives_is_fine() -> None:
    got = resolve(opts("--drive", "file=a,id=d0", "--drive", "file=b,id=d1",
                       "--dirty-bitmap", "name=b0,drive=d0", "--dirty-bitmap", "name=b0,drive=d1"))
    assert len(got.bitmaps) == 2
