"""``dirtybits io``: the executor against raw images, its output helpers, and the CLI."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dirtybits.block.raw import RawImage
from dirtybits.cli.io import parse_io_args
from dirtybits.cli.main import main
from dirtybits.errors import ImageError, UsageError
from dirtybits.qcow2.extent import MapExtent
from dirtybits.services.qemu_io import Executor, cvtstr, dump_buffer, report, timestr

MiB = 1 << 20
STATS = re.compile(r"^\S+ \S+, 1 ops; (\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) "
                   r"\(\S+ \S+/sec and [\d.]+ ops/sec\)$")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    RawImage.create(str(path), MiB)
    return path


class Run:
    """An executor over a raw image with captured stdout/stderr."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.driver = RawImage(str(path), readonly=readonly)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.slept: list[float] = []
        self.ex = Executor(self.driver, self.out, self.err, sleep=self.slept.append)

    def __call__(self, *lines: str) -> list[str]:
        self.ex.run_lines(lines)
        return self.out.getvalue().splitlines()


@pytest.fixture
def run(image: Path) -> Iterator[Run]:
    r = Run(image)
    yield r
    r.driver.close()


# ---------------------------------------------------------------------------- read / write


def test_write_then_read_back(run: Run, image: Path) -> None:
    out = run("write -P 0xab 0 64k", "write 1 3", "read -P 0xab 4 65532")
    assert out[0] == "wrote 65536/65536 bytes at offset 0"
    assert out[2] == "wrote 3/3 bytes at offset 1"
    assert out[4] == "read 65532/65532 bytes at offset 4"
    for stats in (out[1], out[3], out[5]):
        assert STATS.match(stats), stats
    assert out[1].startswith("64 KiB, 1 ops; ")
    assert out[3].startswith("3 bytes, 1 ops; ")
    assert not run.ex.failed
    data = image.read_bytes()
    assert data[:4] == b"\xab\xcd\xcd\xcd" and data[4:65536] == b"\xab" * 65532
    assert data[65536:] == bytes(MiB - 65536)


def test_quiet_prints_nothing(run: Run, image: Path) -> None:
    assert run("write -q -P 7 0 512", "read -q -P 7 0 512", "discard -q 0 512") == []
    assert not run.ex.failed


def test_pattern_mismatch_is_reported_and_fails(run: Run) -> None:
    out = run("write -P 1 0 4k", "read -P 2 0 4k")
    assert out[2] == "Pattern verification failed at offset 0, 4096 bytes"
    assert out[3] == "read 4096/4096 bytes at offset 0"
    assert run.ex.failed


def test_pattern_window_checks_only_its_bytes(run: Run) -> None:
    out = run("write -P 1 0 8", "write -P 2 8 8", "read -q -P 2 -s 8 0 16",
              "read -q -P 1 -s 8 -l 8 0 16")
    assert out[4:] == ["Pattern verification failed at offset 8, 8 bytes"]


def test_quiet_still_reports_a_mismatch(run: Run) -> None:
    assert run("read -q -P 1 0 16") == ["Pattern verification failed at offset 0, 16 bytes"]
    assert run.ex.failed


def test_hexdump_like_qemu(run: Run) -> None:
    out = run("write -P 0x41 0 3", "write -P 0x7a 3 1", "read -v 0 20")
    assert out[4:6] == [
        "00000000:  41 41 41 7a 00 00 00 00 00 00 00 00 00 00 00 00  AAAz............",
        "00000010:  00 00 00 00  ....",
    ]
    assert out[6] == "read 20/20 bytes at offset 0"


def test_out_of_range_requests_fail_with_eio(run: Run) -> None:
    out = run("read 1020k 8k", "write 2M 0", "discard 1M 1", "write -z 1023k 2k",
              "read 1M 0", "write 1M 0")
    assert out[:4] == ["read failed: Input/output error", "write failed: Input/output error",
                       "discard failed: Input/output error", "write failed: Input/output error"]
    assert out[4] == "read 0/0 bytes at offset 1048576"  # empty request at the end: fine
    assert out[6] == "wrote 0/0 bytes at offset 1048576"
    assert run.ex.failed


def test_a_failure_does_not_stop_later_commands(run: Run, image: Path) -> None:
    run("read 2M 1", "bogus", "write -q -P 9 0 1")
    assert run.ex.failed
    assert image.read_bytes()[0] == 9
    assert run.err.getvalue() == 'command "bogus" not found\n'


def test_quit_stops(run: Run, image: Path) -> None:
    run("write -q -P 9 0 1", "quit", "write -q -P 8 0 1")
    assert image.read_bytes()[0] == 9
    assert not run.ex.failed


def test_zero_writes_and_discard(run: Run, image: Path) -> None:
    run("write -q -P 5 0 64k", "write -q -z 0 4k", "write -q -z -u 4k 4k", "discard -q 8k 8k")
    data = image.read_bytes()
    assert data[:16384] == bytes(16384)
    assert data[16384:65536] == b"\x05" * (65536 - 16384)
    out = run("discard 0 4k")
    assert out == ["discard 4096/4096 bytes at offset 0", out[1]]
    assert STATS.match(out[1])


def test_source_file_is_repeated(run: Run, image: Path, tmp_path: Path) -> None:
    (tmp_path / "pat").write_bytes(b"xyz")
    (tmp_path / "empty").write_bytes(b"")
    out = run(f"write -s {tmp_path / 'pat'} 0 8", f"write -s {tmp_path / 'empty'} 0 8",
              f"write -s {tmp_path / 'nope'} 0 8")
    assert out[0] == "wrote 8/8 bytes at offset 0"
    assert image.read_bytes()[:9] == b"xyzxyzxy\0"
    assert run.err.getvalue().splitlines() == [f"{tmp_path / 'empty'}: file is empty",
                                               f"{tmp_path / 'nope'}: No such file or directory"]
    assert run.ex.failed


def test_machine_readable_stats(run: Run) -> None:
    out = run("write -C 0 4k", "read -C 0 512")
    assert re.fullmatch(r"4096,1,0:00:00\.\d\d,[\d.]+,[\d.]+", out[0])
    assert re.fullmatch(r"512,1,0:00:00\.\d\d,[\d.]+,[\d.]+", out[1])


def test_parse_errors_are_printed_where_qemu_prints_them(run: Run) -> None:
    out = run("read abc 4k", "read -x 0 1", "write -P 0x10k 0 1", "read -q 0x10k 0")
    assert out == [
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc",
        "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- "
        "reads a number of bytes at a specified offset",
        "0x10k is not a valid pattern byte",
    ]
    assert run.err.getvalue().splitlines() == [
        "read: invalid option -- 'x'",
        "dirtybits io: warning: Using a multiplier suffix on hex numbers is deprecated: 0x10k",
    ]


def test_vmstate_and_compressed_are_not_supported(run: Run) -> None:
    assert run("read -b 0 512", "write -b 0 512", "write -c 0 512") == [
        "read failed: Operation not supported", "write failed: Operation not supported",
        "write failed: Operation not supported"]


def test_read_only_image_refuses_writes(image: Path) -> None:
    r = Run(image, readonly=True)
    try:
        assert r("write -P 1 0 4k", "discard 0 4k", "truncate 2M", "read -q 0 4k") == []
        assert r.err.getvalue().splitlines() == ["dirtybits io: Block node is read-only"] * 3
        assert r.ex.failed
    finally:
        r.driver.close()
    assert image.read_bytes() == bytes(MiB)


# ---------------------------------------------------------------------------- the rest


def test_length_truncate_info(run: Run, image: Path) -> None:
    out = run("length", "truncate 1536k", "length", "info")
    assert out == ["1 MiB", "1.500 MiB", "format name: raw", "cluster size: 0 bytes",
                   "vm state offset: 0 bytes"]
    assert image.stat().st_size == 1536 << 10


def test_truncate_failures_are_reported_on_stderr(run: Run) -> None:
    run("truncate -m metadata 2M")
    assert run.err.getvalue() == "dirtybits io: Unsupported preallocation mode: metadata\n"
    assert run.ex.failed
    d = FakeDriver()
    err = io.StringIO()
    ex = Executor(d, io.StringIO(), err)  # type: ignore[arg-type]
    ex.run_lines(["truncate 1M"])
    assert err.getvalue() == "dirtybits io: cannot resize to 1048576\n"
    assert ex.failed


def test_alloc_and_map_on_raw_count_everything_allocated(run: Run) -> None:
    out = run("alloc 0", "alloc 1020k 8k", "alloc 2M", "alloc 0x10 0", "map")
    assert out == [
        "512/512 bytes allocated at offset 0 bytes",
        "4096/4096 bytes allocated at offset 1020 KiB",
        "0/0 bytes allocated at offset 2 MiB",
        "0/0 bytes allocated at offset 16 bytes",
        "1 MiB (0x100000) bytes     allocated at offset 0 bytes (0x0)",
    ]


class FakeDriver:
    """Records calls; block_status answers from a fixed extent list."""

    format_name = "qcow2"
    path = "fake"
    readonly = False
    cluster_size = 65536
    l2_entries = 8192

    def __init__(self, extents: list[MapExtent] | None = None):
        self.calls: list[tuple[Any, ...]] = []
        self.extents = extents or []
        self.size = 4 * MiB

    def write(self, offset: int, data: bytes, *, compress: bool = False) -> None:
        self.calls.append(("write_compressed" if compress else "write", offset, data))

    def flush(self) -> None:
        self.calls.append(("flush",))

    def block_status(self, offset: int, length: int) -> Iterator[MapExtent]:
        yield from self.extents

    def resize(self, new_size: int) -> None:
        raise ImageError(f"cannot resize to {new_size}")


def fake_run(driver: FakeDriver, *lines: str) -> list[str]:
    out = io.StringIO()
    Executor(driver, out, io.StringIO()).run_lines(lines)  # type: ignore[arg-type]
    return out.getvalue().splitlines()


def test_pattern_buffers_are_built_once_per_byte_and_length() -> None:
    d = FakeDriver()
    fake_run(d, "write -q -P 0xab 0 64k", "write -q -P 0xab 1M 64k", "write -q -P 0xac 0 64k")
    first, second, other = (c[2] for c in d.calls)
    assert first is second
    assert first == b"\xab" * 65536 and other == b"\xac" * 65536


def test_fua_flushes_and_compressed_uses_the_driver() -> None:
    d = FakeDriver()
    fake_run(d, "write -q -f 0 512", "write -q -c 0 64k")
    assert [c[0] for c in d.calls] == ["write", "flush", "write_compressed"]


def test_map_and_alloc_use_top_layer_allocation() -> None:
    d = FakeDriver([
        MapExtent(0, 64 << 10, 0, False, True, False),            # unallocated
        MapExtent(64 << 10, 64 << 10, 0, True, False, True),      # data
        MapExtent(128 << 10, 64 << 10, 0, True, True, False),     # zero cluster: allocated
        MapExtent(192 << 10, 64 << 10, 1, True, False, True),     # from the backing file
        MapExtent(256 << 10, (4 << 20) - (256 << 10), 0, False, True, False),
    ])
    assert fake_run(d, "map", "alloc 0 4M") == [
        "64 KiB (0x10000) bytes not allocated at offset 0 bytes (0x0)",
        "128 KiB (0x20000) bytes     allocated at offset 64 KiB (0x10000)",
        "3.812 MiB (0x3d0000) bytes not allocated at offset 192 KiB (0x30000)",
        "131072/4194304 bytes allocated at offset 0 bytes",
    ]  # info reads the engine's live header: tests/interop/test_io_vs_qemu_io.py


def test_sleep_and_help(run: Run) -> None:
    out = run("sleep 250", "help", "help bogus", "help r")
    assert run.slept == [0.25]
    assert out[0].startswith("alloc offset [count] -- ")
    assert "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of " \
           "bytes at a specified offset" in out
    assert out[-2:] == ["command bogus not found",
                        "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- "
                        "reads a number of bytes at a specified offset"]


# ---------------------------------------------------------------------------- output helpers


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 bytes"), (3, "3 bytes"), (3.5, "3.500000 bytes"), (1013.479274, "1013.479274 bytes"),
    (1024, "1 KiB"), (65536, "64 KiB"), (1536 << 10, "1.500 MiB"), (3.24 * 1024, "3.240 KiB"),
    (1 << 30, "1 GiB"), (1 << 40, "1 TiB"), (1 << 50, "1 PiB"), (1 << 60, "1 EiB"),
    (float("inf"), "inf EiB"), (1000 << 10, "1000 KiB"),
])
def test_cvtstr(value: float, text: str) -> None:
    assert cvtstr(value) == text


def test_timestr() -> None:
    assert timestr(0) == "00.00 sec"
    assert timestr(123_456_789) == "00.12 sec"
    assert timestr(999_000_000) == "01.00 sec"  # %05.2f rounds, as qemu's does
    assert timestr(4_840_000_000) == "0:00:04.84"
    assert timestr(3_723_500_000_000) == "1:02:03.50"
    assert timestr(0, machine=True) == "0:00:00.00"


def test_report_lines() -> None:
    assert report("wrote", 500_000_000, 0, 65536, 65536) == (
        "wrote 65536/65536 bytes at offset 0\n"
        "64 KiB, 1 ops; 00.50 sec (128 KiB/sec and 2.0000 ops/sec)\n")
    assert report("read", 2_000_000_000, 512, 4096, 4096, machine=True) == (
        "4096,1,0:00:02.00,2048.000,0.500\n")
    assert report("read", 0, 0, 0, 0).endswith("(-nan bytes/sec and inf ops/sec)\n")


def test_dump_buffer_addresses_grow_past_eight_digits() -> None:
    assert dump_buffer(b"\x00aZ9.", 0x123456789) == (
        "123456789:  00 61 5a 39 2e  .aZ9.\n")
    assert dump_buffer(b"", 0) == ""


# ---------------------------------------------------------------------------- command line


def test_io_options_follow_getopt_long() -> None:
    opts = parse_io_args(["x.img", "-c", "read 0 1", "--form=qcow2", "-cwrite 0 1", "-rU",
                          "--cmd", "flush", "-n"])
    assert (opts.filename, opts.fmt, opts.read_only, opts.force_share, opts.cache) == (
        "x.img", "qcow2", True, True, "none")
    assert opts.commands == ["read 0 1", "write 0 1", "flush"]
    assert parse_io_args(["--", "-weird"]).filename == "-weird"
    assert parse_io_args(["x"]).commands is None
    assert parse_io_args(["-h"]).help


@pytest.mark.parametrize(("argv", "message"), [
    (["-x", "f"], "invalid option -- 'x'"),
    (["--bogus", "f"], "unrecognized option '--bogus'"),
    (["--f", "f"], "ambiguous option '--f'"),
    (["--read-only=yes", "f"], "option '--read-only' doesn't allow an argument"),
    (["f", "-c"], "option requires an argument -- 'c'"),
    ([], "no FILE given"),
    (["a", "b"], "expected exactly one FILE"),
])
def test_io_option_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_io_args(argv)


def test_exit_status_is_1_when_any_command_failed(image: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["io", "-f", "raw", "-c", "write -P 3 0 4k", str(image)]) == 0
    assert main(["io", "-c", "read -P 4 0 4k", "-c", "read -q 0 1", str(image)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "wrote 4096/4096 bytes at offset 0"
    assert out[2] == "Pattern verification failed at offset 0, 4096 bytes"


def test_commands_from_stdin_skip_blanks_and_comments(image: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    script = "# set up\n\nwrite -P 0x11 0 512\n   # indented comment\nread -P 0x11 0 512\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["io", "-f", "raw", str(image)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert [line for line in out.out.splitlines() if not STATS.match(line)] == [
        "wrote 512/512 bytes at offset 0", "read 512/512 bytes at offset 0"]


def test_open_and_option_errors(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["io", "-c", "read 0 1", str(image) + ".missing"]) == 1
    assert main(["io", "-U", "-c", "read 0 1", str(image)]) == 1
    assert main(["io", "-t", "bogus", "-c", "read 0 1", str(image)]) == 1
    assert main(["io", "-r", "-U", "-t", "writeback", "-c", "read -q 0 1", str(image)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"dirtybits io: can't open device {image}.missing: "
        f"Could not open '{image}.missing': No such file or directory",
        f"dirtybits io: can't open device {image}: "
        "force-share=on can only be used with read-only images",
        "dirtybits io: Invalid cache option: bogus",
    ]


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["io", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: dirtybits io ")


def test_startup_imports_stay_light(image: Path) -> None:
    code = (
        "import sys\n"
        "from dirtybits.cli.main import main\n"
        f"rc = main(['io', '-c', 'read -q 0 4k', {str(image)!r}])\n"
        "heavy = sorted(m for m in ('numpy', 'tqdm', 'asyncio') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.strip() == "0 []", proc.stderr

