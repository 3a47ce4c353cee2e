"""``dirtybits io``: run qemu-io commands against an image, printing what qemu-io prints.

The point is one command list for both tools: a test script's ``-c 'write -P 0xab 0 64k'``
lines give the same image and the same first output line under ``qemu-io`` and here. What
qemu-io 7.2 does, and this module copies:

- Commands run in order; a failing command prints its complaint and the next one still runs.
  The exit status is 1 when any command failed (a ``read -P`` mismatch counts), else 0.
- Value errors and I/O errors go to stdout (``read failed: Input/output error``); unknown
  commands, bad argument counts and getopt complaints go to stderr.
- A request that reaches past the end of the image fails with EIO, even a zero-length one
  starting beyond the end.

Differences, on purpose: with no ``-c``, commands come from stdin without the ``qemu-io>``
prompt, and blank lines and ``#`` comments are skipped; ``truncate -m`` modes are checked, not
applied;
``help`` lists only the commands run here (qemu-io's aio, vectored, breakpoint and
open/close commands are refused by name); ``info`` does not list qcow2 bitmaps.

This module reads the options, opens the image and feeds the command lines; the commands run
in ``dirtybits.services.qemu_io`` (parsed by ``dirtybits.proto.qemu_io``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from dirtybits.errors import DirtybitsError, ImageError, UsageError
from dirtybits.services.qemu_io import Executor

if TYPE_CHECKING:
    from dirtybits.block.driver import ImageDriver

PROG = "dirtybits io"
# qemu's bdrv_parse_cache_mode accepts these ("off" is "none").
CACHE_MODES = ("none", "off", "directsync", "writeback", "writethrough", "unsafe")
DEFAULT_CACHE = "writethrough"  # qemu-io's: every write is durable before the next command

USAGE = """\
usage: dirtybits io [-f FMT] [-r] [-U] [-t CACHE] [-c CMD]... FILE

Run qemu-io commands against FILE with qemu-io's syntax, output and exit status. Without -c,
commands are read from standard input, one a line; blank lines and '#' comments are skipped.
Commands: read, write, discard, flush, truncate, length, info, alloc, map, sleep, help, quit
('dirtybits io -c help FILE' lists their options).

options:
  -c, --cmd CMD        run CMD (repeatable, run in order)
  -f, --format FMT     image format (raw, qcow2); probed when omitted
  -r, --read-only      open the image read-only
  -t, --cache CACHE    cache mode, as qemu-io's:
                         writethrough (default) page cache, flushed after every write
                         writeback      page cache, durable at flush and close
                         none           O_DIRECT for aligned I/O, durable at flush, close
                         directsync     O_DIRECT, flushed after every write
                         unsafe         page cache, flushes ignored (a host crash may lose
                                        anything; bitmaps stay safe only against a process
                                        crash)
  -n, --nocache        short for -t none
  -U, --force-share    force shared permissions (needs -r, as in qemu-io)
  --bitmaps=auto|no    auto (default): enabled persistent bitmaps record every write;
                       no: load none (enabled ones are marked inconsistent before a write)
  --bitmap-file=C      FILE is a raw drive attached to container C (dirtybits container):
                       its bitmaps in C record every write (identity and size checked)
  --checkpoint=SPEC    when bitmaps are made consistent on disk besides close and flush:
                       interval=S,idle=S,threshold=BITS (each may be 'off'; 'none' = all off;
                       defaults interval=5,idle=0.5,threshold=524288)
  -h, --help           show this help and exit
"""

# Option letters (value taken?) and long names, as qemu-io's getopt_long spells them.
# Long-only options (ours) use their long name as the key: no single letter reaches them.
_SHORT = {"c": True, "f": True, "r": False, "t": True, "n": False, "U": False, "h": False,
          "bitmaps": True, "checkpoint": True, "bitmap-file": True}
_LONG = {"cmd": "c", "format": "f", "read-only": "r", "cache": "t", "nocache": "n",
         "force-share": "U", "help": "h", "bitmaps": "bitmaps", "checkpoint": "checkpoint",
         "bitmap-file": "bitmap-file"}


class IoOptions:
    """What ``dirtybits io`` was asked to do."""

    def __init__(self) -> None:
        self.commands: list[str] | None = None
        self.fmt: str | None = None
        self.read_only = False
        self.cache: str | None = None
        self.force_share = False
        self.bitmaps = "auto"
        self.checkpoint: str | None = None
        self.bitmap_file: str | None = None
        self.help = False
        self.filename: str | None = None


def add_parser(subparsers: Any) -> None:
    # argparse only hands the words on: its option loop is quadratic in the number of
    # options, and scripts pass thousands of -c. parse_io_args reads them, like qemu-io's
    # getopt_long (options and FILE in any order, "--" ends options).
    p = subparsers.add_parser("io", help="run qemu-io style commands on an image",
                              usage="dirtybits io [-f FMT] [-r] [-U] [-t CACHE] [-c CMD]... FILE",
                              add_help=False, prefix_chars="\x00")
    p.add_argument("io_argv", nargs=argparse.REMAINDER)


def parse_io_args(argv: list[str]) -> IoOptions:
    """``dirtybits io`` options with glibc getopt_long rules (permuting, ``--opt=value``)."""
    opts = IoOptions()
    operands: list[str] = []
    i, n = 0, len(argv)

    def value_for(flag: str, inline: str | None) -> str:
        nonlocal i
        if inline is not None:
            return inline
        if i + 1 >= n:
            raise UsageError(f"option requires an argument -- '{flag}'")
        i += 1
        return argv[i]

    while i < n:
        arg = argv[i]
        if arg == "--":
            operands.extend(argv[i + 1:])
            break
        if arg.startswith("--"):
            name, eq, inline = arg[2:].partition("=")
            matches = [k for k in _LONG if k.startswith(name)] if name not in _LONG else [name]
            if len(matches) != 1:
                what = "ambiguous" if matches else "unrecognized"
                raise UsageError(f"{what} option '--{name}'")
            flag = _LONG[matches[0]]
            if _SHORT[flag]:
                _apply_io_option(opts, flag, value_for(flag, inline if eq else None))
            elif eq:
                raise UsageError(f"option '--{matches[0]}' doesn't allow an argument")
            else:
                _apply_io_option(opts, flag, "")
        elif len(arg) > 1 and arg[0] == "-":
            for j in range(1, len(arg)):
                flag = arg[j]
                takes_value = _SHORT.get(flag)
                if takes_value is None:
                    raise UsageError(f"invalid option -- '{flag}'")
                if takes_value:
                    _apply_io_option(opts, flag, value_for(flag, arg[j + 1:] or None))
                    break
                _apply_io_option(opts, flag, "")
        else:
            operands.append(arg)
        i += 1
    if opts.help:
        return opts
    if len(operands) != 1:
        raise UsageError("expected exactly one FILE" if operands else "no FILE given")
    opts.filename = operands[0]
    return opts


def _apply_io_option(opts: IoOptions, flag: str, value: str) -> None:
    if flag == "c":
        if opts.commands is None:
            opts.commands = []
        opts.commands.append(value)
    elif flag == "f":
        opts.fmt = value
    elif flag == "r":
        opts.read_only = True
    elif flag == "t":
        opts.cache = value
    elif flag == "n":
        opts.cache = "none"
    elif flag == "U":
        opts.force_share = True
    elif flag == "bitmaps":
        if value not in ("auto", "no"):
            raise UsageError(f"--bitmaps takes 'auto' or 'no', not '{value}'")
        opts.bitmaps = value
    elif flag == "checkpoint":
        opts.checkpoint = value
    elif flag == "bitmap-file":
        opts.bitmap_file = value
    else:
        opts.help = True


def run(args: argparse.Namespace) -> int:
    opts = parse_io_args(args.io_argv)
    if opts.help:
        sys.stdout.write(USAGE)
        return 0
    return run_options(opts)


def run_options(opts: IoOptions) -> int:
    """Open the image, run the commands, close; 1 when any command failed."""
    if opts.cache is not None and opts.cache not in CACHE_MODES:
        raise UsageError(f"Invalid cache option: {opts.cache}")
    assert opts.filename is not None
    if opts.force_share and not opts.read_only:
        raise UsageError(f"can't open device {opts.filename}: "
                         "force-share=on can only be used with read-only images")
    from dirtybits.block.checkpoint import CheckpointPolicy
    from dirtybits.block.open import open_image

    try:
        policy = CheckpointPolicy.parse(opts.checkpoint) if opts.checkpoint else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        if opts.bitmap_file is not None:
            driver = _open_with_bitmap_file(opts, policy)
        else:
            driver = open_image(opts.filename, opts.fmt, readonly=opts.read_only,
                                cache=_cache_mode(opts.cache), bitmaps=opts.bitmaps,
                                checkpoint=policy, force_share=opts.force_share)
    except DirtybitsError as exc:
        raise ImageError(f"can't open device {opts.filename}: {exc}") from exc
    executor = Executor(driver, sys.stdout, sys.stderr, prog=PROG)
    try:
        executor.run_lines(opts.commands if opts.commands is not None
                           else stdin_commands(sys.stdin))
    finally:
        sys.stdout.flush()
        driver.close()
        for name in getattr(driver, "invalidated", ()):
            print(f"dirtybits io: warning: bitmap '{name}' is damaged and cannot record "
                  "writes; it was marked in use (inconsistent) before the first write",
                  file=sys.stderr)
    return 1 if executor.failed else 0


def _open_with_bitmap_file(opts: IoOptions, policy: Any) -> ImageDriver:
    """A raw drive whose bitmaps live in a container (``--bitmap-file``)."""
    from dirtybits.block.container import open_drive
    from dirtybits.block.open import probe_format

    assert opts.filename is not None and opts.bitmap_file is not None
    if opts.force_share:
        raise UsageError("--bitmap-file cannot be combined with -U")
    fmt = opts.fmt or probe_format(opts.filename)
    if fmt != "raw":
        raise UsageError(f"--bitmap-file needs a raw drive, '{opts.filename}' is {fmt}")
    return open_drive(opts.bitmap_file, opts.filename, readonly=opts.read_only,
                      checkpoint=policy, bitmaps=opts.bitmaps, cache=_cache_mode(opts.cache))


def _cache_mode(option: str | None) -> str:
    if option is None:
        return DEFAULT_CACHE
    return "none" if option == "off" else option


def stdin_commands(stream: Iterable[str]) -> Iterator[str]:
    """Command lines from a script or pipe, skipping blank lines and ``#`` comments."""
    for raw in stream:
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield line
