"""qemu-io's command language, parsed without doing any I/O.

One command line in, one typed command out, following qemu-io 7.2 token for token so a script
drives ``qemu-io`` and ``dirtybits io`` alike: the line is split on single spaces (qemu's
``breakline``), options are read the way glibc's permuting ``getopt`` reads them, sizes the way
``qemu_strtosz`` does (``4k``, ``1.5M``, ``0x1000``; a hex number with a suffix is accepted with a
deprecation warning), pattern bytes and sleep times the way ``strtol(..., 0)`` does (``010`` is
octal). Rejections carry qemu-io's text and the stream it prints it on (see ``CommandError``),
and the checks run in qemu-io's order, so the first complaint about a bad line is the same one.
Sizes are read by ``dirtybits.sizes``; ``dirtybits.services.qemu_io`` runs the commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from dirtybits import sizes
from dirtybits.errors import UsageError

# BDRV_REQUEST_MAX_BYTES: the largest single request QEMU's block layer takes.
MAX_REQUEST_BYTES = 2147483136
SECTOR_SIZE = 512
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
DEFAULT_WRITE_PATTERN = 0xCD

Warn = Callable[[str], None]


class CommandError(UsageError):
    """A command line qemu-io would reject, with what it prints and where.

    qemu-io 7.2 prints some complaints on stdout (value errors: ``Parsing error: ...``) and
    others on stderr (``command "x" not found``, getopt's ``read: invalid option -- 'x'``);
    ``stderr`` says which. ``usage`` is the command's usage line, printed on stdout after a
    getopt complaint. ``prefixed`` marks qemu's ``error_report`` messages, which carry the
    program name (``qemu-io: Block node is read-only``).
    """

    def __init__(self, message: str, *, stderr: bool = False, usage: str | None = None,
                 prefixed: bool = False):
        super().__init__(message)
        self.message = message
        self.stderr = stderr
        self.usage = usage
        self.prefixed = prefixed


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Read:
    """``read [-bCqv] [-P pattern [-s off] [-l len]] off len``.

    ``pattern_count`` is already resolved (qemu: the rest of the read after ``pattern_offset``).
    """

    offset: int
    length: int
    pattern: int | None = None
    pattern_offset: int = 0
    pattern_count: int = 0
    quiet: bool = False
    verbose: bool = False
    machine: bool = False
    vmstate: bool = False


@dataclass(frozen=True)
class Write:
    """``write [-bcCfnquz] [-P pattern | -s source_file] off len``."""

    offset: int
    length: int
    pattern: int = DEFAULT_WRITE_PATTERN
    zeroes: bool = False
    unmap: bool = False
    fua: bool = False
    no_fallback: bool = False
    compressed: bool = False
    vmstate: bool = False
    source_file: str | None = None
    quiet: bool = False
    machine: bool = False


@dataclass(frozen=True)
class Discard:
    """``discard [-Cq] off len``."""

    offset: int
    length: int
    quiet: bool = False
    machine: bool = False


@dataclass(frozen=True)
class Flush:
    """``flush``."""


@dataclass(frozen=True)
class Truncate:
    """``truncate [-m prealloc_mode] off``."""

    size: int
    prealloc: str = "off"


@dataclass(frozen=True)
class Length:
    """``length``: print the virtual size."""


@dataclass(frozen=True)
class Info:
    """``info``: format name, cluster size, VM state offset."""


@dataclass(frozen=True)
class Alloc:
    """``alloc offset [count]``: how much of a range the top image itself allocates."""

    offset: int
    count: int = SECTOR_SIZE


@dataclass(frozen=True)
class Map:
    """``map``: allocated / not allocated runs of the whole image."""


@dataclass(frozen=True)
class Sleep:
    """``sleep MS``."""

    ms: int


@dataclass(frozen=True)
class Help:
    """``help [command]``."""

    command: str | None = None


@dataclass(frozen=True)
class Quit:
    """``quit``: stop, skipping the remaining commands."""


Command = (Read | Write | Discard | Flush | Truncate | Length | Info | Alloc | Map | Sleep | Help
           | Quit)


# ---------------------------------------------------------------------------- number syntax

_WHITESPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale


def parse_size(text: str, warn: Warn | None = None) -> int:
    """qemu-io's ``cvtnum``: a byte count with an optional binary suffix (b k m g t p e).

    Raises CommandError with qemu-io's ``Parsing error: ...`` text. ``warn`` receives the
    deprecation warning qemu prints for a hex number with a suffix (``0x10k``).
    """
    try:
        return sizes.parse_size(text, warn)
    except sizes.SizeError as exc:
        raise CommandError(exc.message) from None


def _strtol0(s: str) -> int | None:
    """``strtol(s, &end, 0)`` that must consume all of ``s``; None when it does not."""
    n = len(s)
    i = 0
    while i < n and s[i] in _WHITESPACE:
        i += 1
    sign = 1
    if i < n and s[i] in "+-":
        sign = -1 if s[i] == "-" else 1
        i += 1
    if i + 1 < n and s[i] == "0" and s[i + 1] in "xX":
        digits, base = s[i + 2:], 16
        valid = "0123456789abcdefABCDEF"
        if not digits:  # "0x": strtol converts the "0" and stops at "x"
            return None
    elif i < n and s[i] == "0":
        digits, base, valid = s[i:], 8, "01234567"
    else:
        digits, base, valid = s[i:], 10, "0123456789"
    if not digits or any(c not in valid for c in digits):
        return None
    return sign * int(digits, base)


_pattern_cache: dict[str, int] = {}


def parse_pattern(text: str) -> int:
    """A pattern byte (``-P``): ``strtol`` base 0, 0..255."""
    value = _pattern_cache.get(text)
    if value is not None:
        return value
    value = _strtol0(text)
    if value is None or not 0 <= value <= 255:
        raise CommandError(f"{text} is not a valid pattern byte")
    if len(_pattern_cache) < 4096:  # scripts spell a byte a few ways; keep them all
        _pattern_cache[text] = value
    return value


# ---------------------------------------------------------------------------- getopt


def _getopt(name: str, argv: list[str], optstring: dict[str, bool], usage: str,
            operands: list[str]) -> Iterator[tuple[str, str]]:
    """glibc ``getopt`` with argument permutation: yields (flag, value) in order.

    Operands (non-options, wherever they stand, and everything after ``--``) are appended to
    ``operands``. Yielding lazily keeps qemu-io's order of complaints: a bad ``-P`` value is
    reported before an unknown option that follows it.
    """
    i, n = 1, len(argv)
    while i < n:
        arg = argv[i]
        if arg == "--":
            operands.extend(argv[i + 1:])
            return
        if len(arg) < 2 or arg[0] != "-":
            operands.append(arg)
            i += 1
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            takes_value = optstring.get(c)
            if takes_value is None:
                raise CommandError(f"{name}: invalid option -- '{c}'", stderr=True, usage=usage)
            if takes_value:
                if j + 1 < len(arg):
                    value = arg[j + 1:]
                elif i + 1 < n:
                    i += 1
                    value = argv[i]
                else:
                    raise CommandError(f"{name}: option requires an argument -- '{c}'",
                                       stderr=True, usage=usage)
                yield c, value
                break
            yield c, ""
            j += 1
        i += 1


# ---------------------------------------------------------------------------- command table


class CommandSpec(NamedTuple):
    """One qemu-io command: names, argument counts, and whether it needs write permission."""

    name: str
    altname: str | None
    argmin: int
    argmax: int  # -1: no maximum
    args: str | None
    oneline: str
    writes: bool = False

    @property
    def usage(self) -> str:
        """qemu's ``qemuio_command_usage`` line, printed after a getopt complaint."""
        return f"{self.name} {self.args} -- {self.oneline}"


_SPECS_LIST = (
    CommandSpec("alloc", "a", 1, 2, "offset [count]", "checks if offset is allocated in the file"),
    CommandSpec("discard", "d", 2, -1, "[-Cq] off len",
                "discards a number of bytes at a specified offset", writes=True),
    CommandSpec("flush", "f", 0, 0, None, "flush all in-core file state to disk"),
    CommandSpec("help", "?", 0, 1, "[command]", "help for one or all commands"),
    CommandSpec("info", "i", 0, 0, None, "prints information about the current file"),
    CommandSpec("length", "l", 0, 0, None, "gets the length of the current file"),
    CommandSpec("map", None, 0, 0, "", "prints the allocated areas of a file"),
    CommandSpec("quit", "q", -1, -1, None, "exit the program"),
    CommandSpec("read", "r", 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                "reads a number of bytes at a specified offset"),
    CommandSpec("sleep", None, 1, 1, None, "waits for the given value in milliseconds"),
    CommandSpec("truncate", "t", 1, 3, "[-m prealloc_mode] off",
                "truncates the current file at the given offset", writes=True),
    CommandSpec("write", "w", 2, -1, "[-bcCfnquz] [-P pattern | -s source_file] off len",
                "writes a number of bytes at a specified offset", writes=True),
)
SPECS: dict[str, CommandSpec] = {s.name: s for s in _SPECS_LIST}
_LOOKUP: dict[str, CommandSpec] = {
    **{s.altname: s for s in _SPECS_LIST if s.altname}, **SPECS
}

# qemu-io 7.2 commands this tool does not run: named as such rather than "not found".
UNSUPPORTED = frozenset({
    "abort", "aio_flush", "aio_read", "aio_write", "break", "close", "open", "readv",
    "remove_break", "reopen", "resume", "sigraise", "wait_break", "writev",
})


def help_line(spec: CommandSpec) -> str:
    """The line ``help`` prints for a command (qemu: name, args when set, oneline)."""
    if spec.args is None:
        return f"{spec.name} -- {spec.oneline}"
    return f"{spec.name} {spec.args} -- {spec.oneline}"


def lookup(name: str) -> CommandSpec | None:
    return _LOOKUP.get(name)


def split_line(line: str) -> list[str]:
    """qemu's ``breakline``: split on single spaces, dropping empty words (tabs are kept)."""
    words = line.split(" ")
    if "" in words:
        words = [w for w in words if w]
    return words


def parse_command(line: str, *, readonly: bool = False, warn: Warn | None = None) -> Command | None:
    """Parse one qemu-io command line; None for a line with no words.

    ``readonly``: the image is open read-only, so a writing command is refused with qemu's
    permission error, which qemu-io checks after the argument count and before the options.
    """
    argv = split_line(line)
    if not argv:
        return None
    return parse_argv(argv, readonly=readonly, warn=warn)


def parse_argv(argv: list[str], *, readonly: bool = False,
               warn: Warn | None = None) -> Command:
    name = argv[0]
    spec = _LOOKUP.get(name)
    if spec is None:
        if name in UNSUPPORTED:
            raise CommandError(f'command "{name}" is not supported by dirtybits io', stderr=True)
        raise CommandError(f'command "{name}" not found', stderr=True)
    nargs = len(argv) - 1
    if spec.argmin >= 0 and (nargs < spec.argmin or (spec.argmax != -1 and nargs > spec.argmax)):
        if spec.argmax == -1:
            expected = f"at least {spec.argmin} arguments"
        elif spec.argmin == spec.argmax:
            expected = f"{spec.argmin} arguments"
        else:
            expected = f"between {spec.argmin} and {spec.argmax} arguments"
        raise CommandError(f"bad argument count {nargs} to {name}, expected {expected}",
                           stderr=True)
    if spec.writes and readonly:
        raise CommandError("Block node is read-only", stderr=True, prefixed=True)
    return _PARSERS[spec.name](argv, spec, warn)


def _request_length(text: str, warn: Warn | None, *, hint: str = "") -> int:
    count = parse_size(text, warn)
    if count > MAX_REQUEST_BYTES:
        raise CommandError(f"length cannot exceed {MAX_REQUEST_BYTES}{hint}, given {text}")
    return count


def _check_sector_aligned(offset: int, count: int) -> None:
    if offset % SECTOR_SIZE:
        raise CommandError(f"{offset} is not a sector-aligned value for 'offset'")
    if count % SECTOR_SIZE:
        raise CommandError(f"{count} is not a sector-aligned value for 'count'")


_READ_OPTS = {"b": False, "C": False, "l": True, "p": False, "P": True, "q": False, "s": True,
              "v": False}


def _parse_read(argv: list[str], spec: CommandSpec, warn: Warn | None) -> Read:
    machine = quiet = verbose = vmstate = False
    pattern: int | None = None
    pattern_offset = 0
    pattern_count: int | None = None
    have_offset = False
    operands: list[str] = []
    for c, value in _getopt("read", argv, _READ_OPTS, spec.usage, operands):
        if c == "P":
            pattern = parse_pattern(value)
        elif c == "q":
            quiet = True
        elif c == "v":
            verbose = True
        elif c == "C":
            machine = True
        elif c == "b":
            vmstate = True
        elif c == "l":
            pattern_count = parse_size(value, warn)
        elif c == "s":
            pattern_offset = parse_size(value, warn)
            have_offset = True
        # "p": ignored, as in qemu-io
    if len(operands) != 2:
        raise CommandError(spec.usage)
    offset = parse_size(operands[0], warn)
    count = _request_length(operands[1], warn)
    if pattern is None and (pattern_count is not None or have_offset):
        raise CommandError(spec.usage)
    if pattern_count is None:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        raise CommandError("pattern verification range exceeds end of read data")
    if vmstate:
        _check_sector_aligned(offset, count)
    return Read(offset, count, pattern, pattern_offset, pattern_count, quiet, verbose, machine,
                vmstate)


_WRITE_OPTS = {"b": False, "c": False, "C": False, "f": False, "n": False, "p": False,
               "P": True, "q": False, "s": True, "u": False, "z": False}


def _parse_write(argv: list[str], spec: CommandSpec, warn: Warn | None) -> Write:
    args = argv
    # Fast path for the commonest script line, "write -P N OFF LEN": same checks, no getopt.
    if len(args) == 5 and args[1] == "-P" and args[3][:1] != "-" and args[4][:1] != "-":
        byte = parse_pattern(args[2])
        return Write(parse_size(args[3], warn),
                     _request_length(args[4], warn, hint=" without -n"), byte)
    vmstate = compressed = machine = fua = no_fallback = quiet = unmap = zeroes = False
    pattern: int | None = None
    source_file: str | None = None
    operands: list[str] = []
    for c, value in _getopt("write", argv, _WRITE_OPTS, spec.usage, operands):
        if c == "P":
            pattern = parse_pattern(value)
        elif c == "q":
            quiet = True
        elif c == "z":
            zeroes = True
        elif c == "u":
            unmap = True
        elif c == "C":
            machine = True
        elif c == "f":
            fua = True
        elif c == "n":
            no_fallback = True
        elif c == "c":
            compressed = True
        elif c == "b":
            vmstate = True
        elif c == "s":
            source_file = value
        # "p": ignored, as in qemu-io
    if len(operands) != 2:
        raise CommandError(spec.usage)
    if vmstate and zeroes:
        raise CommandError("-b and -z cannot be specified at the same time")
    if fua and (vmstate or compressed):
        raise CommandError("-f and -b or -c cannot be specified at the same time")
    if no_fallback and not zeroes:
        raise CommandError("-n requires -z to be specified")
    if unmap and not zeroes:
        raise CommandError("-u requires -z to be specified")
    if zeroes + (pattern is not None) + (source_file is not None) > 1:
        raise CommandError("Only one of -z, -P, and -s can be specified at the same time")
    offset = parse_size(operands[0], warn)
    count = parse_size(operands[1], warn)
    if count > MAX_REQUEST_BYTES and not no_fallback:
        raise CommandError(
            f"length cannot exceed {MAX_REQUEST_BYTES} without -n, given {operands[1]}")
    if vmstate or compressed:
        _check_sector_aligned(offset, count)
    return Write(offset, count, DEFAULT_WRITE_PATTERN if pattern is None else pattern, zeroes,
                 unmap, fua, no_fallback, compressed, vmstate, source_file, quiet, machine)


_DISCARD_OPTS = {"C": False, "q": False}


def _parse_discard(argv: list[str], spec: CommandSpec, warn: Warn | None) -> Discard:
    machine = quiet = False
    operands: list[str] = []
    for c, _ in _getopt("discard", argv, _DISCARD_OPTS, spec.usage, operands):
        if c == "q":
            quiet = True
        else:
            machine = True
    if len(operands) != 2:
        raise CommandError(spec.usage)
    offset = parse_size(operands[0], warn)
    return Discard(offset, _request_length(operands[1], warn), quiet, machine)


def _parse_truncate(argv: list[str], spec: CommandSpec, warn: Warn | None) -> Truncate:
    prealloc = "off"
    operands: list[str] = []
    for _, value in _getopt("truncate", argv, {"m": True}, spec.usage, operands):
        if value not in PREALLOC_MODES:
            raise CommandError(f"Invalid preallocation mode '{value}'", stderr=True,
                               prefixed=True)
        prealloc = value
    if not operands:  # qemu-io 7.2 crashes here; a usage line is kinder
        raise CommandError(spec.usage)
    try:
        size = parse_size(operands[0], warn)
    except CommandError as exc:
        # qemu-io names argv[1] in this message, whatever it is ("-m" when -m comes first).
        raise CommandError(exc.message.replace(f"-- {operands[0]}", f"-- {argv[1]}")) from None
    return Truncate(size, prealloc)


def _parse_alloc(argv: list[str], spec: CommandSpec, warn: Warn | None) -> Alloc:
    offset = parse_size(argv[1], warn)
    return Alloc(offset, parse_size(argv[2], warn) if len(argv) == 3 else SECTOR_SIZE)


def _parse_sleep(argv: list[str], spec: CommandSpec, warn: Warn | None) -> Sleep:
    ms = _strtol0(argv[1])
    if ms is None or ms < 0:
        raise CommandError(f"{argv[1]} is not a valid number")
    return Sleep(ms)


def _parse_help(argv: list[str], spec: CommandSpec, warn: Warn | None) -> Help:
    return Help(argv[1] if len(argv) > 1 else None)


_PARSERS: dict[str, Callable[[list[str], CommandSpec, Warn | None], Command]] = {
    "read": _parse_read,
    "write": _parse_write,
    "discard": _parse_discard,
    "truncate": _parse_truncate,
    "alloc": _parse_alloc,
    "sleep": _parse_sleep,
    "help": _parse_help,
    "flush": lambda argv, spec, warn: Flush(),
    "length": lambda argv, spec, warn: Length(),
    "info": lambda argv, spec, warn: Info(),
    "map": lambda argv, spec, warn: Map(),
    "quit": lambda argv, spec, warn: Quit(),
}
