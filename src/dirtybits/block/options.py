"""The block layer's configuration language: QEMU's QemuOpts option lists and the creation
options of each format, with qemu's messages.

Scripts written for qemu-img pass the same ``-o`` strings here, and read the same
``Formatting ...`` line and error texts, so this module follows QEMU 7.2's QemuOpts rules
(``key=value`` split on single commas, ``,,`` for a literal comma, a bare ``key`` meaning
``key=on`` and ``nokey`` meaning ``key=off``, the last of repeated keys wins) and its messages.
Sizes are read by ``dirtybits.sizes``. Failures are ``QemuError`` with qemu's lines; how they
are printed (``qemu-img: ...``, exit 1) is the command line's business (``dirtybits.cli``).
A ``blockdev-add`` / ``--blockdev`` parser belongs beside this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dirtybits.errors import UsageError
from dirtybits.sizes import SizeError, parse_size

INT64_MAX = (1 << 63) - 1
SECTOR = 512
FORMATS = ("qcow2", "raw")


class QemuError(UsageError):
    """A failure qemu-img reports with ``error_report``: ``lines`` each get the program prefix,
    ``hint`` (``error_append_hint``) is printed as is. ``status`` is the exit code."""

    def __init__(self, *lines: str, hint: str = "", status: int = 1):
        super().__init__("\n".join(lines))
        self.lines = list(lines)
        self.hint = hint
        self.status = status

    def prefixed(self, prefix: str) -> QemuError:
        """The same error with ``prefix`` before its first line (qemu's ``FILE: ...``)."""
        first, *rest = self.lines or [""]
        return QemuError(prefix + first, *rest, hint=self.hint, status=self.status)


# ---------------------------------------------------------------------------- -o option lists

OptType = Literal["size", "number", "bool", "string"]
_TYPE_HELP = {"size": "size", "number": "num", "bool": "bool (on/off)", "string": "str"}


@dataclass(frozen=True)
class OptDesc:
    """One QemuOptDesc: its name, type, help text and default (printed when unset)."""

    name: str
    type: OptType
    help: str
    default: str | None = None


def _d(name: str, type_: OptType, help_: str, default: str | None = None) -> OptDesc:
    return OptDesc(name, type_, help_, default)


# In qemu's QemuOptsList order: ``Formatting ...`` prints the options in this order.
QCOW2_CREATE_OPTS = (
    _d("encryption", "bool",
       "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    _d("encrypt.format", "string", "Encrypt the image, format choices: 'aes', 'luks'"),
    _d("encrypt.key-secret", "string", "ID of secret providing qcow AES key or LUKS passphrase"),
    _d("encrypt.cipher-alg", "string", "Name of encryption cipher algorithm"),
    _d("encrypt.cipher-mode", "string", "Name of encryption cipher mode"),
    _d("encrypt.ivgen-alg", "string", "Name of IV generator algorithm"),
    _d("encrypt.ivgen-hash-alg", "string", "Name of IV generator hash algorithm"),
    _d("encrypt.hash-alg", "string", "Name of encryption hash algorithm"),
    _d("encrypt.iter-time", "number", "Time to spend in PBKDF in milliseconds"),
    _d("cluster_size", "size", "qcow2 cluster size", "65536"),
    _d("extended_l2", "bool", "Extended L2 tables", "off"),
    _d("preallocation", "string",
       "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    _d("compression_type", "string", "Compression method used for image cluster compression",
       "zlib"),
    _d("size", "size", "Virtual disk size"),
    _d("compat", "string", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    _d("backing_file", "string", "File name of a base image"),
    _d("backing_fmt", "string", "Image format of the base image"),
    _d("data_file", "string", "File name of an external data file"),
    _d("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    _d("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    _d("refcount_bits", "number", "Width of a reference count entry in bits", "16"),
)
RAW_CREATE_OPTS = (_d("size", "size", "Virtual disk size"),)
# The file protocol's own options, appended after the format's (first name wins).
FILE_CREATE_OPTS = (
    _d("size", "size", "Virtual disk size"),
    _d("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    _d("preallocation", "string", "Preallocation mode (allowed values: off, falloc, full)"),
    _d("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
)


def create_opts(fmt: str, with_protocol: bool = True) -> list[OptDesc]:
    """The merged option list of ``fmt`` (and the file protocol), as qemu_opts_append builds it."""
    own = QCOW2_CREATE_OPTS if fmt == "qcow2" else RAW_CREATE_OPTS
    merged: dict[str, OptDesc] = {}
    for desc in (*own, *(FILE_CREATE_OPTS if with_protocol else ())):
        merged.setdefault(desc.name, desc)
    return list(merged.values())


def option_help(fmt: str, filename: str | None) -> str:
    """``qemu-img create -o help``: sorted names, types and help texts."""
    lines = ["Supported options:\n" if filename else f"Supported {fmt} options:\n"]
    for desc in sorted(create_opts(fmt, filename is not None), key=lambda d: d.name):
        head = f"  {desc.name}=<{_TYPE_HELP[desc.type]}>"
        lines.append(f"{head:<24} - {desc.help}\n")
    if not filename:
        lines.append("\nThe protocol level may support further options.\n"
                     "Specify the target filename to include those options.\n")
    return "".join(lines)


def check_option_list(text: str) -> None:
    """qemu-img's ``is_valid_option_list`` for one ``-o`` argument."""
    trailing = len(text) - len(text.rstrip(","))
    if not text or text[0] == "," or trailing % 2:
        raise QemuError(f"Invalid option list: {text}")


def split_option_list(text: str) -> list[tuple[str, str]]:
    """``key=value`` pairs as qemu's ``get_opt_name_value`` reads them (no type checks)."""
    out: list[tuple[str, str]] = []
    pos, n = 0, len(text)
    while pos < n:
        stop = pos
        while stop < n and text[stop] not in "=,":
            stop += 1
        name = text[pos:stop]
        if stop < n and text[stop] == "=":
            value, pos = _opt_value(text, stop + 1)
        else:
            value, pos = ("off", stop) if name.startswith("no") else ("on", stop)
            name = name[2:] if name.startswith("no") else name
        out.append((name, value))
        if pos < n:  # at a single comma
            pos += 1
    return out


def _opt_value(text: str, pos: int) -> tuple[str, int]:
    """A value up to a single comma; ``,,`` is a literal comma."""
    chars: list[str] = []
    n = len(text)
    while pos < n:
        if text[pos] == ",":
            if pos + 1 < n and text[pos + 1] == ",":
                chars.append(",")
                pos += 2
                continue
            break
        chars.append(text[pos])
        pos += 1
    return "".join(chars), pos


def has_help_option(text: str) -> bool:
    return any(name in ("help", "?") for name, _ in split_option_list(text))


def _parse_number(text: str) -> int | None:
    """``qemu_strtou64(s, NULL, 0)`` as a signed 64-bit value (``-1`` wraps like strtoull)."""
    s = text.lstrip(" \t\n\v\f\r")
    neg = s[:1] == "-"
    if s[:1] in "+-":
        s = s[1:]
    if s[:2].lower() == "0x":
        digits, base, valid = s[2:], 16, "0123456789abcdefABCDEF"
    elif s[:1] == "0":
        digits, base, valid = s, 8, "01234567"
    else:
        digits, base, valid = s, 10, "0123456789"
    if not digits or any(c not in valid for c in digits):
        return None
    value = int(digits, base)
    if value >= 1 << 64:
        return None
    value = (-value) % (1 << 64) if neg else value
    return value - (1 << 64) if value > INT64_MAX else value


def _parse_value(desc: OptDesc, text: str) -> object:
    if desc.type == "size":
        try:
            return parse_size(text)
        except SizeError as exc:
            if exc.too_large:
                raise QemuError(f"Value '{text}' is out of range for parameter "
                                f"'{desc.name}'") from None
            raise QemuError(
                f"Parameter '{desc.name}' expects a non-negative number below 2^64",
                hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                     "peta-\nand exabytes, respectively.\n") from None
    if desc.type == "number":
        number = _parse_number(text)
        if number is None:
            raise QemuError(f"Parameter '{desc.name}' expects a number")
        return number
    if desc.type == "bool":
        if text in ("on", "yes", "true", "y"):
            return True
        if text in ("off", "no", "false", "n"):
            return False
        raise QemuError(f"Parameter '{desc.name}' expects 'on' or 'off'")
    return text


class QemuOpts:
    """A set of typed options over one option list, printed the way ``qemu_opts_print`` does."""

    def __init__(self, descs: Sequence[OptDesc]):
        self.descs = {d.name: d for d in descs}
        self._text: dict[str, str] = {}
        self._value: dict[str, object] = {}

    def parse(self, text: str) -> None:
        """Apply an option list (``-o``); errors carry qemu's texts."""
        for name, value in split_option_list(text):
            self.set(name, value)

    def set(self, name: str, text: str) -> None:
        desc = self.descs.get(name)
        if desc is None:
            raise QemuError(f"Invalid parameter '{name}'")
        self._value[name] = _parse_value(desc, text)
        self._text[name] = text

    def set_number(self, name: str, value: int) -> None:
        self._value[name] = value
        self._text[name] = str(value)

    def is_set(self, name: str) -> bool:
        return name in self._value

    def get(self, name: str) -> Any:
        """The typed value (int, bool or str), the default when unset, else None."""
        if name in self._value:
            return self._value[name]
        desc = self.descs[name]
        return None if desc.default is None else _parse_value(desc, desc.default)

    def format(self) -> str:
        """``qemu_opts_print(opts, " ")``: set or defaulted options in list order."""
        parts = []
        for desc in self.descs.values():
            is_set = desc.name in self._value
            text = self._text[desc.name] if is_set else desc.default
            if text is None:
                continue
            if desc.type == "string":
                text = text.replace(",", ",,")
            elif desc.type in ("size", "number") and is_set:
                text = str(self._value[desc.name])
            parts.append(f"{desc.name}={text}")
        return " ".join(parts)


# ---------------------------------------------------------------------------- creation

@dataclass(frozen=True)
class Qcow2Create:
    """Validated arguments for ``Qcow2Image.create``."""

    size: int
    cluster_size: int
    refcount_bits: int
    compat: str
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    data_file_raw: bool
    lazy_refcounts: bool
    extended_l2: bool = False
    compression_type: str = "zlib"


def _enum(opts: QemuOpts, name: str, qapi_name: str, allowed: Sequence[str]) -> str | None:
    value: str | None = opts.get(name)
    if value is not None and value not in allowed:
        raise QemuError(f"Parameter '{qapi_name}' does not accept value '{value}'")
    return value


def qcow2_create_args(opts: QemuOpts) -> Qcow2Create:
    """Check qcow2 creation options in the order QEMU 7.2's qcow2 driver does, with its
    messages; then refuse, by name, what the engine cannot write (encryption, subclusters,
    preallocation) rather than silently making a different image."""
    compat = _enum(opts, "compat", "version", ("0.10", "1.1", "v2", "v3"))
    version = 2 if compat in ("0.10", "v2") else 3
    backing_fmt = _enum(opts, "backing_fmt", "backing-fmt", FORMATS)
    prealloc = _enum(opts, "preallocation", "preallocation", ("off", "metadata", "falloc", "full"))
    compression = _enum(opts, "compression_type", "compression-type", ("zlib", "zstd"))
    extended_l2 = bool(opts.get("extended_l2"))
    if extended_l2 and version < 3:
        raise QemuError("Extended L2 entries are only supported with compatibility level 1.1 "
                        "and above (use version=v3 or greater)")
    cluster_size = int(opts.get("cluster_size"))
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        raise QemuError("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 16384:
        raise QemuError("Extended L2 entries are only supported with cluster sizes of at least "
                        "16384 bytes")
    backing_file: str | None = opts.get("backing_file")
    if backing_file is not None and prealloc not in (None, "off") and not extended_l2:
        raise QemuError("Backing file and preallocation can only be used at the same time if "
                        "extended_l2 is on")
    if backing_fmt is not None and backing_file is None:
        raise QemuError("Backing format cannot be used without backing file")
    lazy = bool(opts.get("lazy_refcounts"))
    if version < 3 and lazy:
        raise QemuError("Lazy refcounts only supported with compatibility level 1.1 and above "
                        "(use version=v3 or greater)")
    refcount_bits = int(opts.get("refcount_bits")) % (1 << 64)
    if refcount_bits > 64 or refcount_bits & (refcount_bits - 1) or not refcount_bits:
        raise QemuError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise QemuError("Different refcount widths than 16 bits require compatibility level 1.1 "
                        "or above (use version=v3 or greater)")
    data_file: str | None = opts.get("data_file")
    data_file_raw = bool(opts.get("data_file_raw"))
    if data_file_raw and data_file is None:
        raise QemuError("data-file-raw requires data-file")
    if data_file_raw and backing_file is not None:
        raise QemuError("Backing file and data-file-raw cannot be used at the same time")
    if data_file is not None and version < 3:
        raise QemuError("External data files are only supported with compatibility level 1.1 "
                        "and above (use version=v3 or greater)")
    if compression == "zstd" and version < 3:
        raise QemuError("Non-zlib compression type is only supported with compatibility level "
                        "1.1 and above (use version=v3 or greater)")
    # what QEMU would do but this engine does not
    if opts.get("encryption") or any(opts.is_set(n) for n in opts.descs
                                     if n.startswith("encrypt.")):
        raise QemuError("encrypted qcow2 images are not supported")
    if prealloc not in (None, "off"):
        raise QemuError(f"preallocation={prealloc} is not supported for qcow2 (only off)")
    _refuse_protocol_opts(opts)
    size = -(-int(opts.get("size")) // SECTOR) * SECTOR  # the L1 limit: Qcow2Image.create
    return Qcow2Create(size, cluster_size, refcount_bits, "0.10" if version == 2 else "1.1",
                       backing_file, backing_fmt, data_file, data_file_raw, lazy,
                       extended_l2, compression or "zlib")


def raw_preallocation(opts: QemuOpts) -> str:
    """The raw preallocation mode (file-posix's checks and texts): off, falloc or full."""
    mode = opts.get("preallocation") or "off"
    if mode == "metadata":
        raise QemuError("Unsupported preallocation mode: metadata")
    if mode not in ("off", "falloc", "full"):
        raise QemuError(f"invalid parameter value: {mode}")
    _refuse_protocol_opts(opts)
    return str(mode)


def _refuse_protocol_opts(opts: QemuOpts) -> None:
    if opts.get("nocow"):
        raise QemuError("nocow=on is not supported")
    if opts.is_set("extent_size_hint"):
        raise QemuError("extent_size_hint is not supported")
