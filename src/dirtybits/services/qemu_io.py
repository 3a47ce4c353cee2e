"""Run qemu-io commands against an open node, producing the text qemu-io prints.

The executor behind ``dirtybits io`` and, later, a daemon's ``human-monitor-command``
``qemu-io NODE "CMD"``: one command line in (parsed by ``dirtybits.proto.qemu_io``), the
command run on the caller's thread against one open driver or node (a daemon calls it on its
block thread), qemu-io 7.2's output out. What it copies from qemu-io:

- A failing command prints its complaint and the next one still runs; ``failed`` records that
  some command failed (a ``read -P`` mismatch counts).
- Value errors and I/O errors go to ``out`` (``read failed: Input/output error``); unknown
  commands, bad argument counts and getopt complaints go to ``err``, prefixed with ``prog``.
- A request that reaches past the end of the image fails with EIO, even a zero-length one
  starting beyond the end.

``Executor.execute`` runs one line and returns its text (both streams, in order) instead of
writing to the streams given at construction.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from dirtybits.errors import (
    DirtybitsError,
    ImageIOError,
    UnsupportedFeatureError,
    UsageError,
)
from dirtybits.proto import qemu_io as syn

if TYPE_CHECKING:
    from dirtybits.block.driver import ImageDriver
    from dirtybits.block.node import BlockNode
    from dirtybits.qcow2.image import Qcow2Image

log = logging.getLogger(__name__)

PROG = "dirtybits io"  # the prefix of error_report-style messages; a daemon passes its own
_EIO = os.strerror(errno.EIO)
_ENOTSUP = os.strerror(errno.ENOTSUP)
_EINVAL = os.strerror(errno.EINVAL)
# Keep at most this many bytes of cached pattern buffers (one per (byte, length) pair).
PATTERN_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class CommandOutput:
    """What one command line printed (stdout and stderr interleaved, as a monitor shows
    them), whether it failed, and whether it was ``quit``."""

    text: str
    failed: bool
    quit: bool


@dataclass(frozen=True)
class MonitorOutput:
    """One command line as QEMU's HMP ``qemu-io`` splits its output: what qemu-io prints
    (``stdout``), what it writes to stderr (``stderr``: unknown commands, argument counts),
    and its ``error_report`` messages, which in a monitor go to the monitor's reply
    (``reply``, without the program prefix)."""

    stdout: str
    stderr: str
    reply: str


#: qemu-io commands that exist only in the qemu-io program, not in HMP's ``qemu-io``.
NOT_IN_MONITOR = frozenset({"open", "close", "quit"})


class Executor:
    """Runs qemu-io command lines against one open driver, printing qemu-io's output on
    ``out`` and ``err``. Synchronous: it belongs to the thread that owns the driver."""

    def __init__(self, driver: ImageDriver, out: TextIO, err: TextIO, *, prog: str = PROG,
                 sleep: Callable[[float], None] = time.sleep):
        self.driver = driver
        self.out = out
        self.err = err
        self.prog = prog
        self.failed = False
        self._sleep = sleep
        self._readonly = driver.readonly
        self._patterns: dict[tuple[int, int], bytes] = {}
        self._pattern_cache_bytes = 0
        self._report: TextIO | None = None  # error_report's sink in a monitor
        self._read_buf = bytearray()  # reused by reads: no fresh pages to fault in per read
        self._handlers: dict[type, Callable[[Any], bool]] = {
            syn.Read: self._read,
            syn.Write: self._write,
            syn.Discard: self._discard,
            syn.Flush: self._flush,
            syn.Truncate: self._truncate,
            syn.Length: self._length,
            syn.Info: self._info,
            syn.Alloc: self._alloc,
            syn.Map: self._map,
            syn.Sleep: self._do_sleep,
            syn.Help: self._help,
        }

    # ------------------------------------------------------------------ driving
    def run_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            if not self.run_line(line):
                return

    def execute(self, line: str) -> CommandOutput:
        """Run one command line and return what it printed, instead of printing it."""
        buf = io.StringIO()
        out, err, failed = self.out, self.err, self.failed
        self.out = self.err = buf
        self.failed = False
        try:
            go_on = self.run_line(line)
            return CommandOutput(buf.getvalue(), self.failed, not go_on)
        finally:
            self.failed = failed or self.failed
            self.out, self.err = out, err

    def execute_in_monitor(self, line: str) -> MonitorOutput:
        """Run one command line as HMP's ``qemu-io`` runs it (``MonitorOutput``): without
        the program-only commands, ``aio_flush`` a no-op (nothing is ever in flight here)."""
        out, err, rep = io.StringIO(), io.StringIO(), io.StringIO()
        saved = self.out, self.err, self.failed, self._report
        self.out, self.err, self._report = out, err, rep
        try:
            words = line.split(None, 1)
            name = words[0] if words else ""
            if name in NOT_IN_MONITOR:
                self._stderr(f'command "{name}" not found')
            elif name != "aio_flush":
                self.run_line(line)
            return MonitorOutput(out.getvalue(), err.getvalue(), rep.getvalue())
        finally:
            self.out, self.err, failed, self._report = saved[0], saved[1], saved[2], saved[3]
            self.failed = failed or self.failed

    def run_line(self, line: str) -> bool:
        """Run one command line; False once ``quit`` says to stop."""
        log.debug("%s: %s", self.prog, line)
        try:
            cmd = syn.parse_command(line, readonly=self._readonly, warn=self._warn)
        except syn.CommandError as exc:
            self.failed = True
            if exc.prefixed and self._report is not None:
                self._report.write(exc.message + "\n")
            elif exc.stderr:
                self._stderr(f"{self.prog}: {exc.message}" if exc.prefixed else exc.message)
            else:
                self.out.write(exc.message + "\n")
            if exc.usage is not None:
                self.out.write(exc.usage + "\n")
            return True
        if cmd is None:
            return True
        if type(cmd) is syn.Quit:
            return False
        if not self._handlers[type(cmd)](cmd):
            self.failed = True
        return True

    # ------------------------------------------------------------------ output helpers
    def _stderr(self, text: str) -> None:
        self.out.flush()  # keep stdout and stderr in order when both go to one place
        self.err.write(text + "\n")
        self.err.flush()

    def _warn(self, message: str) -> None:
        self._stderr(f"{self.prog}: warning: {message}")

    def _fail(self, text: str) -> bool:
        self.out.write(text + "\n")
        return False

    def _in_range(self, offset: int, length: int) -> bool:
        """qemu's blk_check_byte_request: past the end is EIO, even for zero bytes."""
        return length <= self.driver.size - offset

    def _pattern(self, byte: int, length: int) -> bytes:
        """A buffer of ``length`` copies of ``byte``, built once per (byte, length)."""
        key = (byte, length)
        buf = self._patterns.get(key)
        if buf is None:
            buf = bytes((byte,)) * length
            if self._pattern_cache_bytes + length > PATTERN_CACHE_BYTES:
                self._patterns.clear()
                self._pattern_cache_bytes = 0
            self._patterns[key] = buf
            self._pattern_cache_bytes += length
        return buf

    # ------------------------------------------------------------------ commands
    def _read(self, c: syn.Read) -> bool:
        if c.vmstate:
            return self._fail(f"read failed: {_ENOTSUP}")
        if not self._in_range(c.offset, c.length):
            return self._fail(f"read failed: {_EIO}")
        t0 = time.perf_counter_ns()
        try:
            data: bytes | bytearray
            read_into = getattr(self.driver, "read_into", None)
            if read_into is not None and c.length <= 64 << 20:
                # the same buffer while the length stays (a bytearray: compares at C speed)
                if len(self._read_buf) != c.length:
                    self._read_buf = bytearray(c.length)
                data = self._read_buf
                read_into(c.offset, data)
            else:
                data = self.driver.read(c.offset, c.length)
        except DirtybitsError as exc:
            return self._fail(f"read failed: {_reason(exc)}")
        elapsed = time.perf_counter_ns() - t0
        ok = True
        if c.pattern is not None:
            count = c.pattern_count
            region: bytes | bytearray | memoryview = data
            if c.pattern_offset or count != c.length:
                region = memoryview(data)[c.pattern_offset:c.pattern_offset + count].tobytes()
            if region != self._pattern(c.pattern, count):
                self.out.write(f"Pattern verification failed at offset "
                               f"{c.offset + c.pattern_offset}, {count} bytes\n")
                ok = False
        if c.quiet:
            return ok
        if c.verbose:
            self.out.write(dump_buffer(bytes(data), c.offset))
        self.out.write(report("read", elapsed, c.offset, c.length, c.length, c.machine))
        return ok

    def _write(self, c: syn.Write) -> bool:
        data: bytes | None = None
        if c.source_file is not None:
            data = self._source_data(c.source_file, c.length)
            if data is None:
                return False
        elif not c.zeroes:
            data = self._pattern(c.pattern, c.length)
        if c.vmstate:
            return self._fail(f"write failed: {_ENOTSUP}")
        if not self._in_range(c.offset, c.length):
            return self._fail(f"write failed: {_EIO}")
        driver = self.driver
        t0 = time.perf_counter_ns()
        try:
            if c.length:
                if data is None:
                    driver.write_zeroes(c.offset, c.length, unmap=c.unmap)
                elif c.compressed:
                    driver.write(c.offset, data, compress=True)
                else:
                    driver.write(c.offset, data)
                if c.fua:
                    driver.flush()
        except UnsupportedFeatureError as exc:
            return self._fail(f"write failed: {_ENOTSUP if c.compressed else _reason(exc)}")
        except UsageError as exc:  # a compressed write that is not whole clusters
            return self._fail(f"write failed: {_EINVAL if c.compressed else _reason(exc)}")
        except DirtybitsError as exc:
            return self._fail(f"write failed: {_reason(exc)}")
        elapsed = time.perf_counter_ns() - t0
        if not c.quiet:
            self.out.write(report("wrote", elapsed, c.offset, c.length, c.length, c.machine))
        return True

    def _source_data(self, path: str, length: int) -> bytes | None:
        """``write -s``: the file's first bytes, repeated to fill the request."""
        try:
            with open(path, "rb") as f:
                head = f.read(length)
        except OSError as exc:
            self._stderr(f"{path}: {exc.strerror}")
            return None
        if not head:  # qemu says so for a zero-length request too
            self._stderr(f"{path}: file is empty")
            return None
        reps = -(-length // len(head))
        return (head * reps)[:length]

    def _discard(self, c: syn.Discard) -> bool:
        if not self._in_range(c.offset, c.length):
            return self._fail(f"discard failed: {_EIO}")
        t0 = time.perf_counter_ns()
        try:
            if c.length:
                self.driver.discard(c.offset, c.length)
        except DirtybitsError as exc:
            return self._fail(f"discard failed: {_reason(exc)}")
        elapsed = time.perf_counter_ns() - t0
        if not c.quiet:
            self.out.write(report("discard", elapsed, c.offset, c.length, c.length, c.machine))
        return True

    def _flush(self, c: syn.Flush) -> bool:
        try:
            self.driver.flush()
        except DirtybitsError as exc:
            self._stderr(f"{self.prog}: flush failed: {_reason(exc)}")
            return False
        return True

    def _truncate(self, c: syn.Truncate) -> bool:
        if c.prealloc == "metadata" and self.driver.format_name == "raw":
            self._stderr(f"{self.prog}: Unsupported preallocation mode: metadata")
            return False
        try:
            self.driver.resize(c.size)
        except DirtybitsError as exc:
            self._stderr(f"{self.prog}: {exc}")
            return False
        return True

    def _length(self, c: syn.Length) -> bool:
        self.out.write(cvtstr(self.driver.size) + "\n")
        return True

    def _info(self, c: syn.Info) -> bool:
        from dirtybits.block.node import BlockNode
        from dirtybits.qcow2.image import Qcow2Image

        node = self.driver if isinstance(self.driver, BlockNode) else None
        engine = node.driver if node is not None else self.driver
        cluster = vm_state = 0
        if isinstance(engine, Qcow2Image):
            cluster = engine.cluster_size
            # qcow2 puts the VM state after the last L1 entry the disk needs.
            span = cluster * engine.l2_entries
            vm_state = -(-engine.size // span) * span
        self.out.write(f"format name: {engine.format_name}\n"
                       f"cluster size: {cvtstr(cluster)}\n"
                       f"vm state offset: {cvtstr(vm_state)}\n")
        specific = _format_specific(engine, node)
        if specific and self._report is not None:
            # in a monitor, qemu-io prints the heading and QEMU's dump goes to the monitor
            head, _, body = specific.partition("\n")
            self.out.write(head + "\n")
            self._report.write(body)
        else:
            self.out.write(specific)
        return True

    def _allocated_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, length, allocated in the top image) runs, neighbours of one state merged."""
        end = offset + length
        run_start, run_alloc = offset, None
        pos = offset
        for ext in self.driver.block_status(offset, length):
            start, stop = max(ext.start, pos), min(ext.start + ext.length, end)
            if stop <= start:
                continue
            alloc = ext.depth == 0 and ext.present
            if run_alloc is None:
                run_start, run_alloc = start, alloc
            elif alloc != run_alloc or start != pos:
                yield run_start, pos - run_start, run_alloc
                run_start, run_alloc = start, alloc
            pos = stop
        if run_alloc is not None and pos > run_start:
            yield run_start, pos - run_start, run_alloc

    def _alloc(self, c: syn.Alloc) -> bool:
        count = max(0, min(c.offset + c.count, self.driver.size) - c.offset)
        try:
            allocated = sum(n for _, n, a in self._allocated_runs(c.offset, count) if a) \
                if count else 0
        except DirtybitsError as exc:
            return self._fail(f"is_allocated failed: {_reason(exc)}")
        self.out.write(f"{allocated}/{count} bytes allocated at offset {cvtstr(c.offset)}\n")
        return True

    def _map(self, c: syn.Map) -> bool:
        try:
            lines = [
                f"{cvtstr(n)} (0x{n:x}) bytes {'    allocated' if a else 'not allocated'} "
                f"at offset {cvtstr(start)} (0x{start:x})\n"
                for start, n, a in self._allocated_runs(0, self.driver.size)
            ]
        except DirtybitsError as exc:
            return self._fail(f"Failed to get allocation status: {_reason(exc)}")
        self.out.write("".join(lines))
        return True

    def _do_sleep(self, c: syn.Sleep) -> bool:
        self.out.flush()
        self._sleep(c.ms / 1000)
        return True

    def _help(self, c: syn.Help) -> bool:
        if c.command is None:
            self.out.write("".join(syn.help_line(s) + "\n" for s in sorted(
                syn.SPECS.values(), key=lambda s: s.name)))
            self.out.write("\nUse 'help commandname' for extended help.\n")
            return True
        spec = syn.lookup(c.command)
        if spec is None:
            return self._fail(f"command {c.command} not found")
        self.out.write(syn.help_line(spec) + "\n")
        return True


def _format_specific(engine: ImageDriver, node: BlockNode | None) -> str:
    """qcow2's "Format specific information" block, from the live header, with the bitmaps
    block as qemu-io prints it."""
    from dirtybits.qcow2.image import Qcow2Image

    if not isinstance(engine, Qcow2Image):
        return ""
    header = engine.header
    from dirtybits.format.qcow2 import header as h

    def flag(value: int) -> str:
        return "true" if value else "false"

    compression = "zstd" if header.compression_type == h.COMPRESSION_ZSTD else "zlib"
    refcount_bits = 1 << header.refcount_order
    if header.version == 2:
        lines = ["compat: 0.10", f"compression type: {compression}",
                 f"refcount bits: {refcount_bits}"]
    else:
        lines = ["compat: 1.1", f"compression type: {compression}",
                 f"lazy refcounts: {flag(header.compatible_features & h.COMPAT_LAZY_REFCOUNTS)}"]
        lines += _bitmap_lines(engine, node)
        lines.append(f"refcount bits: {refcount_bits}")
        data_file = engine.hc.data_file
        if data_file is not None:
            raw = header.autoclear_features & h.AUTOCLEAR_DATA_FILE_RAW
            lines += [f"data file: {data_file}", f"data file raw: {flag(raw)}"]
        lines += [f"corrupt: {flag(header.incompatible_features & h.INCOMPAT_CORRUPT)}",
                  f"extended l2: {flag(header.incompatible_features & h.INCOMPAT_EXTL2)}"]
    return "Format specific information:\n" + "".join(f"    {line}\n" for line in lines)


def _bitmap_lines(engine: Qcow2Image, node: BlockNode | None) -> list[str]:
    """The stored bitmaps, in directory order, as qemu-io's ``info`` lists them.

    QEMU sets ``in_use`` on every bitmap when it opens an image read-write, so its listing
    shows "in-use" for all of them then; dirtybits sets the flag only before the first write,
    but the bitmaps are just as much in use by this writer, so the listing says the same.
    A read-only open shows the flags as stored."""
    from dirtybits.block.qcow2_bitmaps import Qcow2BitmapStore
    from dirtybits.format.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS

    if engine.hc.extension(EXT_BITMAPS) is None or \
            not engine.header.autoclear_features & AUTOCLEAR_BITMAPS:
        return []
    store = node.store if node is not None and node.store is not None else None
    if store is None:
        try:
            store = Qcow2BitmapStore(engine)
        except DirtybitsError:
            return []
    if not store.bitmaps:
        return []
    lines = ["bitmaps:"]
    for i, sb in enumerate(store.bitmaps):
        flags = []
        if sb.entry.in_use or not engine.readonly:
            flags.append("in-use")
        if sb.entry.auto:
            flags.append("auto")
        lines += [f"    [{i}]:", "        flags:"]
        lines += [f"            [{k}]: {f}" for k, f in enumerate(flags)]
        lines += [f"        name: {sb.name}", f"        granularity: {sb.entry.granularity}"]
    return lines


def _reason(exc: DirtybitsError) -> str:
    """strerror() when the driver saw an OS error, as qemu prints; else the driver's words."""
    if isinstance(exc, ImageIOError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc)


# ---------------------------------------------------------------------------- qemu-io's output

_EIB, _PIB, _TIB, _GIB, _MIB, _KIB = (1 << 60, 1 << 50, 1 << 40, 1 << 30, 1 << 20, 1 << 10)


_cvtstr_cache: dict[int, str] = {}


def cvtstr(value: float) -> str:
    """qemu-io's human size: ``64 KiB``, ``1.500 MiB``, ``3 bytes``, ``1013.479274 bytes``."""
    if type(value) is int:  # request sizes repeat: format each once
        text = _cvtstr_cache.get(value)
        if text is None:
            text = _cvtstr(value)
            if len(_cvtstr_cache) < 4096:
                _cvtstr_cache[value] = text
        return text
    return _cvtstr(value)


def _cvtstr(value: float) -> str:
    if value >= _EIB:
        s, suffix = f"{value / _EIB:.3f}", " EiB"
    elif value >= _PIB:
        s, suffix = f"{value / _PIB:.3f}", " PiB"
    elif value >= _TIB:
        s, suffix = f"{value / _TIB:.3f}", " TiB"
    elif value >= _GIB:
        s, suffix = f"{value / _GIB:.3f}", " GiB"
    elif value >= _MIB:
        s, suffix = f"{value / _MIB:.3f}", " MiB"
    elif value >= _KIB:
        s, suffix = f"{value / _KIB:.3f}", " KiB"
    elif value != value:  # NaN: glibc prints the x86 default NaN as "-nan"
        s, suffix = "-nan", " bytes"
    else:
        s, suffix = f"{value:f}", " bytes"
    trim = s.find(".000")
    return (s[:trim] if trim >= 0 else s) + suffix


def timestr(ns: int, machine: bool = False) -> str:
    """``00.00 sec`` under a second, else ``H:MM:SS.ss`` (always that form with ``-C``)."""
    sec, rem = divmod(ns, 1_000_000_000)
    frac = rem / 1e9
    if machine or sec:
        return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60 + frac:05.2f}"
    return f"{frac:05.2f} sec"


def _per_second(value: float, seconds: float) -> float:
    if seconds:
        return value / seconds
    return float("inf") if value else float("nan")  # C's double division by zero


def report(op: str, ns: int, offset: int, count: int, total: int, machine: bool = False,
           ops: int = 1) -> str:
    """qemu-io's ``print_report``: the two result lines (one with ``-C``)."""
    seconds = ns / 1e9
    if machine:
        return (f"{total},{ops},{timestr(ns, True)},{_per_second(total, seconds):.3f},"
                f"{_per_second(ops, seconds):.3f}\n")
    return (f"{op} {total}/{count} bytes at offset {offset}\n"
            f"{cvtstr(total)}, {ops} ops; {timestr(ns)} "
            f"({cvtstr(_per_second(total, seconds))}/sec and "
            f"{_per_second(ops, seconds):.4f} ops/sec)\n")


# C isalnum() in the "C" locale; everything else shows as "."
_PRINTABLE = bytes(
    c if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else 46 for c in range(256)
)


def dump_buffer(data: bytes, offset: int) -> str:
    """``read -v``: 16 bytes a line, ``%08x:  `` address, hex bytes, then alphanumerics."""
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        lines.append(f"{offset + i:08x}:  {chunk.hex(' ')}  "
                     f"{chunk.translate(_PRINTABLE).decode('ascii')}\n")
    return "".join(lines)
