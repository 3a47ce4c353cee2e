"""``dirtybits serve``'s own options, ``--drive`` and ``--dirty-bitmap``, parsed with no I/O.

Both take QemuOpts-style text, ``key=value`` items split on single commas, ``,,`` for a
literal comma in a value::

    --drive file=PATH,id=ID[,format=qcow2|raw][,bitmap=auto|no][,read-only=on|off]
            [,cache=writeback|none|writethrough|directsync|unsafe][,bitmap-file=CONTAINER]
    --dirty-bitmap name=NAME,drive=ID[,file=PATH][,file_id=FID][,granularity=SIZE]
            [,enabled=on|off][,create=on|off][,auto=on|off][,persistent=on|off]

Unlike QemuOpts every item needs its ``=`` (QemuOpts reads a bare ``key`` as ``key=on`` and
``nokey`` as ``key=off``, so ``--drive file`` would name a file called ``on``), and a key given
twice is an error rather than the last one winning. Booleans take what QEMU takes
(``on``/``yes``/``true``/``y``, ``off``/``no``/``false``/``n``); sizes QEMU's size syntax
(``64k``, ``1M``, ``0x10000``).

A drive's ``id`` is its node name, so it follows QEMU's rule for node names (``id_wellformed``:
a letter, then letters, digits, ``-``, ``.``, ``_``; at most 31 characters).

A bitmap's container: ``file=PATH,file_id=FID`` declares container FID at PATH and keeps the
bitmap there; a later ``--dirty-bitmap`` may say ``file_id=FID`` alone to use the same file;
``file=PATH`` alone uses PATH directly. ``resolve`` checks what needs several options (and no
I/O): ids used twice, bitmaps on undefined drives or twice on one drive, containers used before
they are declared or declared twice with different paths.

Every failure is a ``UsageError`` whose text names the option (``--drive: ...``,
``--dirty-bitmap name=b0: ...``); the command line prints it after ``dirtybits serve:``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from dirtybits.errors import UsageError
from dirtybits.format.qcow2.bitmaps import BME_MAX_GRANULARITY, BME_MIN_GRANULARITY
from dirtybits.sizes import SizeError, parse_size

Format = Literal["qcow2", "raw"]
BitmapMode = Literal["auto", "no"]
CacheMode = Literal["writeback", "none", "writethrough", "directsync", "unsafe"]

FORMATS: tuple[Format, ...] = ("qcow2", "raw")
BITMAP_MODES: tuple[BitmapMode, ...] = ("auto", "no")
CACHE_MODES: tuple[CacheMode, ...] = ("writeback", "none", "writethrough", "directsync",
                                      "unsafe")
NODE_NAME_MAX = 31  # BlockDriverState.node_name is char[32]

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


@dataclass(frozen=True)
class DriveOption:
    """One ``--drive``: an image served as node ``id``.

    ``format`` None: probe the image. ``cache`` defaults to QEMU's default, writeback.
    ``bitmap_file``: a container file for the drive's bitmaps (a path)."""

    id: str
    file: str
    format: Format | None = None
    bitmap: BitmapMode = "auto"
    read_only: bool = False
    cache: CacheMode = "writeback"
    bitmap_file: str | None = None


@dataclass(frozen=True)
class DirtyBitmapOption:
    """One ``--dirty-bitmap``: bitmap ``name`` of drive ``drive``.

    ``file``/``file_id``: where the bitmap lives (see the module's text); ``granularity`` only
    with ``create``. ``enabled``, ``auto`` and ``persistent`` are None when not given: the
    daemon's defaults apply."""

    name: str
    drive: str
    file: str | None = None
    file_id: str | None = None
    granularity: int | None = None
    enabled: bool | None = None
    create: bool = False
    auto: bool | None = None
    persistent: bool | None = None

    @property
    def label(self) -> str:
        """How messages name this option."""
        return f"--dirty-bitmap name={_escape(self.name)},drive={_escape(self.drive)}"


def _escape(value: str) -> str:
    return value.replace(",", ",,")


def node_name_problem(name: str) -> str | None:
    """QEMU's text for a node name it refuses (``Invalid node-name: 'NAME'``, ``Node name
    too long``), None for a good one."""
    if not (name[:1].isascii() and name[:1].isalpha()) or any(
            not (c.isascii() and (c.isalnum() or c in "-._")) for c in name[1:]):
        return f"Invalid node-name: '{name}'"
    if len(name) > NODE_NAME_MAX:
        return "Node name too long"
    return None


def split_items(text: str, option: str) -> dict[str, str]:
    """``key=value`` items of an option (``,,`` is a comma in a value), each key once.
    Raises ``UsageError`` naming ``option``."""
    items: dict[str, str] = {}
    pos, n = 0, len(text)
    while pos < n:
        eq = pos
        while eq < n and text[eq] not in "=,":
            eq += 1
        key = text[pos:eq]
        if eq == n or text[eq] != "=":
            if not key:
                raise UsageError(f"{option}: an empty item in '{text}'")
            raise UsageError(f"{option}: '{key}' needs a value ({key}=...)")
        if not key:
            raise UsageError(f"{option}: a value with no key in '{text}'")
        chars: list[str] = []
        i = eq + 1
        while i < n:
            if text[i] == ",":
                if i + 1 < n and text[i + 1] == ",":
                    chars.append(",")
                    i += 2
                    continue
                i += 1
                break
            chars.append(text[i])
            i += 1
        if key in items:
            raise UsageError(f"{option}: '{key}' is given twice")
        items[key] = "".join(chars)
        pos = i
    return items


def _unknown(option: str, items: Mapping[str, str], known: Sequence[str]) -> None:
    for key in items:
        if key not in known:
            raise UsageError(f"{option}: unknown option '{key}' (known: {', '.join(known)})")


def _bool(option: str, key: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{option}: Parameter '{key}' expects 'on' or 'off'")


_C = TypeVar("_C", bound=str)


def _choice(option: str, key: str, value: str, allowed: tuple[_C, ...]) -> _C:
    for choice in allowed:
        if value == choice:
            return choice
    raise UsageError(f"{option}: {key}={value} is not one of {', '.join(allowed)}")


def _required(option: str, items: Mapping[str, str], key: str) -> str:
    if key not in items:
        raise UsageError(f"{option}: '{key}' is missing ({key}=...)")
    if not items[key]:
        raise UsageError(f"{option}: '{key}' is empty")
    return items[key]


def _path(option: str, items: Mapping[str, str], key: str) -> str | None:
    if key in items and not items[key]:
        raise UsageError(f"{option}: '{key}' is empty")
    return items.get(key)


def _id(option: str, key: str, value: str) -> str:
    problem = node_name_problem(value)
    if problem is not None:
        raise UsageError(f"{option}: {key}={value}: {problem} (an id is a letter, then "
                         f"letters, digits, '-', '.' or '_', at most {NODE_NAME_MAX} in all)")
    return value


DRIVE_KEYS = ("file", "id", "format", "bitmap", "read-only", "cache", "bitmap-file")


def parse_drive(text: str) -> DriveOption:
    """One ``--drive`` argument. Raises ``UsageError`` (``--drive: ...``)."""
    opt = "--drive"
    items = split_items(text, opt)
    _unknown(opt, items, DRIVE_KEYS)
    file = _required(opt, items, "file")
    ident = _id(opt, "id", _required(opt, items, "id"))
    fmt = _choice(opt, "format", items["format"], FORMATS) if "format" in items else None
    bitmap = _choice(opt, "bitmap", items.get("bitmap", "auto"), BITMAP_MODES)
    read_only = _bool(opt, "read-only", items["read-only"]) if "read-only" in items else False
    cache = _choice(opt, "cache", items.get("cache", "writeback"), CACHE_MODES)
    bitmap_file = _path(opt, items, "bitmap-file")
    if bitmap_file is not None and bitmap == "no":
        raise UsageError(f"{opt} id={ident}: bitmap-file is not allowed with bitmap=no")
    return DriveOption(ident, file, fmt, bitmap, read_only, cache, bitmap_file)


BITMAP_KEYS = ("name", "drive", "file", "file_id", "granularity", "enabled", "create", "auto",
               "persistent")


def _granularity(option: str, value: str) -> int:
    try:
        granularity = parse_size(value)
    except SizeError:
        raise UsageError(f"{option}: granularity={value} is not a size (512, 64k, 1M, "
                         "...)") from None
    if granularity < BME_MIN_GRANULARITY or granularity & (granularity - 1):
        raise UsageError(f"{option}: Granularity must be power of 2 and at least 512")
    if granularity > BME_MAX_GRANULARITY:
        raise UsageError(f"{option}: Granularity exceeds maximum ({BME_MAX_GRANULARITY} "
                         "bytes)")
    return granularity


def parse_dirty_bitmap(text: str) -> DirtyBitmapOption:
    """One ``--dirty-bitmap`` argument. Raises ``UsageError`` (``--dirty-bitmap: ...``)."""
    opt = "--dirty-bitmap"
    items = split_items(text, opt)
    _unknown(opt, items, BITMAP_KEYS)
    name = _required(opt, items, "name")
    drive = _id(opt, "drive", _required(opt, items, "drive"))
    opt = f"{opt} name={_escape(name)}"
    file = _path(opt, items, "file")
    file_id = _id(opt, "file_id", items["file_id"]) if "file_id" in items else None
    flags: dict[str, bool | None] = {
        key: _bool(opt, key, items[key]) if key in items else None
        for key in ("enabled", "create", "auto", "persistent")}
    create = bool(flags["create"])
    granularity = None
    if "granularity" in items:
        if not create:
            raise UsageError(f"{opt}: granularity is only allowed with create=on")
        granularity = _granularity(opt, items["granularity"])
    return DirtyBitmapOption(name, drive, file, file_id, granularity, flags["enabled"], create,
                             flags["auto"], flags["persistent"])


@dataclass(frozen=True)
class ServeOptions:
    """The daemon's drives and bitmaps, checked together (``resolve``).

    ``containers``: each declared ``file_id`` and its path."""

    drives: tuple[DriveOption, ...]
    bitmaps: tuple[DirtyBitmapOption, ...]
    containers: Mapping[str, str] = field(default_factory=dict, hash=False)

    def drive(self, ident: str) -> DriveOption:
        """The drive with this id (``KeyError`` if none)."""
        for d in self.drives:
            if d.id == ident:
                return d
        raise KeyError(ident)

    def bitmaps_of(self, ident: str) -> tuple[DirtyBitmapOption, ...]:
        return tuple(b for b in self.bitmaps if b.drive == ident)

    def container_path(self, bitmap: DirtyBitmapOption) -> str | None:
        """The container file that keeps ``bitmap``: its ``file``, else its ``file_id``'s
        path, else its drive's ``bitmap-file``; None: the image itself."""
        if bitmap.file is not None:
            return bitmap.file
        if bitmap.file_id is not None:
            return self.containers[bitmap.file_id]
        return self.drive(bitmap.drive).bitmap_file


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def resolve(options: Sequence[DriveOption | DirtyBitmapOption]) -> ServeOptions:
    """The options checked together, in command-line order. Raises ``UsageError`` naming the
    option at fault: a drive id used twice, a bitmap whose drive no ``--drive`` defines, the
    same bitmap twice on one drive, a ``file_id`` used before it is declared, or declared
    again with another path."""
    drives: dict[str, DriveOption] = {}
    for o in options:
        if isinstance(o, DriveOption):
            if o.id in drives:
                raise UsageError(f"--drive id={o.id}: the id is already used by another "
                                 f"--drive (file={drives[o.id].file})")
            drives[o.id] = o
    containers: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    bitmaps: list[DirtyBitmapOption] = []
    for o in options:
        if not isinstance(o, DirtyBitmapOption):
            continue
        if o.drive not in drives:
            raise UsageError(f"{o.label}: no --drive has id={o.drive}")
        if (o.drive, o.name) in seen:
            raise UsageError(f"{o.label}: the bitmap is given twice for drive {o.drive}")
        seen.add((o.drive, o.name))
        if o.file_id is not None:
            declared = containers.get(o.file_id)
            if o.file is None and declared is None:
                raise UsageError(f"{o.label}: file_id={o.file_id} is used before it is "
                                 f"declared (file=PATH,file_id={o.file_id})")
            if o.file is not None and declared is not None and not _same_path(o.file,
                                                                               declared):
                raise UsageError(f"{o.label}: file_id={o.file_id} is already declared as "
                                 f"file={_escape(declared)}, not file={_escape(o.file)}")
            if o.file is not None and declared is None:
                containers[o.file_id] = o.file
        bitmaps.append(o)
    return ServeOptions(tuple(drives.values()), tuple(bitmaps), containers)


Parser = Callable[[str], DriveOption | DirtyBitmapOption]
PARSERS: Mapping[str, Parser] = {"--drive": parse_drive, "--dirty-bitmap": parse_dirty_bitmap}

__all__ = ["BITMAP_MODES", "CACHE_MODES", "FORMATS", "PARSERS", "DirtyBitmapOption",
           "DriveOption", "ServeOptions", "node_name_problem", "parse_dirty_bitmap",
           "parse_drive", "resolve", "split_items"]
